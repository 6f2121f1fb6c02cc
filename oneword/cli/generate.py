"""`oneword generate`: sample a grid with learned tokens."""

from __future__ import annotations

import argparse
from pathlib import Path

from .. import generate as generate_module
from ..errors import OnewordError
from ..generate import generate_with_embeddings, parse_embedding_arg
from .commands import command_help
from .common import add_model_argument

EXAMPLES = """\
examples:
  oneword generate --embedding runs/cup/learned_embeds.safetensors \\
      --prompt "a photo of <my-cup>" --prompt "<my-cup> on a green background" --out cup.png
  oneword generate --model /models/sd15 --embedding cat.pt:'<cat>' --embedding style.safetensors \\
      --prompt "a painting of <cat> in the style of <style>" --num 8 --seed 3 --out cat.png
"""


def run_generate(args: argparse.Namespace) -> int:
    """`oneword generate ...`: write the grid and say where it is."""
    from ..images import save_grid
    from ..io import check_out_dir
    from ..models import load_model

    # Fail on a bad --out or a missing embedding file before the (slow) model load.
    if Path(args.out).is_dir():
        raise OnewordError(
            f"--out {args.out} is a folder; pass the PNG file to write, e.g. grid.png"
        )
    check_out_dir(Path(args.out).parent, what=f"--out {args.out}: its folder")
    embeddings = [parse_embedding_arg(value) for value in args.embedding]
    model = load_model(args.model, device=args.device)
    images = generate_with_embeddings(
        model,
        embeddings,
        args.prompt,
        num_per_prompt=args.num,
        steps=args.steps,
        guidance=args.guidance,
        seed=args.seed,
        negative_prompt=args.negative,
        scheduler=args.scheduler,
        progress=not args.quiet,
    )
    out = save_grid(images, args.out, columns=args.num, labels=list(args.prompt))
    print(f"wrote {out} ({len(args.prompt)} prompts x {args.num} samples, seed {args.seed})")
    return 0


def add_generate_parser(subparsers) -> argparse.ArgumentParser:
    """Register `oneword generate` on an argparse subparsers object."""
    from ..sampling import SCHEDULERS

    parser = subparsers.add_parser(
        "generate",
        help=command_help("generate"),
        description=generate_module.__doc__,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add_model_argument(parser)
    add(
        "--embedding",
        action="append",
        required=True,
        metavar="FILE[:TOKEN]",
        help="a learned token (any layout `oneword export` knows); repeat for several; "
        ":TOKEN renames its trigger word",
    )
    add(
        "--prompt",
        action="append",
        required=True,
        help='e.g. "a painting of <t>"; repeat for more rows',
    )
    add("--negative", default=None, metavar="TEXT", help="negative prompt (default: empty)")
    add("--steps", type=int, default=30, help="denoising steps (default: 30)")
    add("--guidance", type=float, default=5.0, help="classifier-free guidance scale (default: 5)")
    add("--seed", type=int, default=0, help="sample j of every prompt uses seed + j (default: 0)")
    add("--num", type=int, default=4, help="samples per prompt (default: 4)")
    add("--scheduler", choices=sorted(SCHEDULERS), default="ddim")
    add("--device", default=None, help="cpu, cuda, ... (default: CUDA if available)")
    add("--quiet", action="store_true", help="no progress bar")
    add("--out", required=True, type=Path, help="the PNG grid to write")
    parser.set_defaults(func=run_generate)
    return parser
