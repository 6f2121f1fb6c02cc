"""`oneword eval`: compare token-learning methods on a concept suite."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from ..evaluation import harness
from ..evaluation.harness import METHODS, EvalConfig, evaluate
from .commands import command_help
from .common import add_model_argument
from .config import add_config_flags, config_from_flags

EXAMPLES = """\
examples:
  oneword eval --suite runs/world-suite --methods classword,classic:50,classic:400 --out runs/eval
  oneword eval --suite runs/world-suite --methods classic:2 --concepts 1 --samples 1 --steps 2 --out /tmp/e
  oneword eval --suite runs/world-suite --methods classword,classic:3000 --out runs/eval --resume
  oneword eval --model /models/sd15 --suite dreambooth/ --methods classword,classic:3000 \\
      --clip open_clip:ViT-L-14:openai --dino /models/dino-vits16 --out runs/db
"""


def run_eval(args: argparse.Namespace) -> int:
    """`oneword eval ...`: evaluate and print the table."""
    from ..evaluation.report import format_table
    from ..io import prepare_out_dir

    owned = prepare_out_dir(args.out)  # noqa: F841 (first, and held for the run's life)
    methods = {"methods": lambda text: tuple(m.strip() for m in text.split(",") if m.strip())}
    config = config_from_flags(args, EvalConfig, convert=methods)
    if args.no_check_score:
        config = replace(config, check="none")
    results = evaluate(args.model, args.suite, config, args.out, resume=args.resume)
    print(format_table(results))
    print(f"wrote {args.out}/results.json, results.md, tradeoff.png and grids/")
    return 0


def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    """Register `oneword eval` on an argparse subparsers object."""
    from ..encoder.encode import CHECKS

    defaults = EvalConfig()
    parser = subparsers.add_parser(
        "eval",
        help=command_help("eval"),
        description=harness.__doc__,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add_model_argument(parser)
    add("--suite", required=True, type=Path, help="concept suite folder (ours or DreamBooth's)")
    add(
        "--methods",
        default=",".join(defaults.methods),
        help=f"comma-separated NAME[:ARG] (known: {', '.join(sorted(METHODS))}; "
        "classic:STEPS, encoder+refine:STEPS[:lr=X][:l2=Y]); default: %(default)s",
    )
    add_config_flags(
        parser,
        EvalConfig,
        ["samples", "identity_samples", "seed", "steps", "guidance"],
        overrides={
            "samples": {"default": defaults.samples, "help": "samples per prompt per concept"},
            "identity_samples": {
                "type": int,
                "metavar": "N",
                "help": "samples of the identity prompt (>= --samples; default: --samples): "
                "identity is a share of these, so more of them sharpen it cheaply",
            },
            "seed": {"default": defaults.seed, "help": None},
            "steps": {"default": defaults.steps, "help": "sampling steps (DDIM)"},
            "guidance": {"default": defaults.guidance, "help": None},
        },
    )
    add(
        "--clip",
        default=None,
        help="world | open_clip:NAME[:PRETRAINED|FILE|DIR] | transformers:FOLDER "
        "(default: world when the model has image_encoder/, else no CLIP scores)",
    )
    add("--dino", default=None, metavar="DIR", help="transformers ViT/Dinov2 folder for DINO")
    add(
        "--concepts",
        default=None,
        metavar="N|START:END",
        help="only the first N concepts, or those from START to END (0-based, END excluded)",
    )
    add("--grid-concepts", type=int, default=defaults.grid_concepts, help="concepts per grid")
    add("--encoder", default=None, metavar="FILE", help="encoder file of the encoder methods")
    add(
        "--check",
        choices=CHECKS,
        default=defaults.check,
        help="score every token with this oneword encode check, untimed, and report its "
        "fallback rates (default: %(default)s)",
    )
    add("--no-check-score", action="store_true", help="the same as --check none")
    add(
        "--check-threshold",
        type=float,
        default=defaults.check_threshold,
        help="threshold whose fallback rates the report gives (default: oneword encode's for "
        "the check: 0.825 for clip, 1.0 for loss)",
    )
    add(
        "--right-identity",
        type=float,
        default=defaults.right_identity,
        help="a concept is 'right' for the fallback rates at this identity or above "
        "(default: %(default)s)",
    )
    add("--device", default=None, help="cpu, cuda, ... (default: CUDA if available)")
    add("--quiet", action="store_true", help="no progress bar")
    add("--out", required=True, type=Path, help="output folder")
    add(
        "--resume",
        action="store_true",
        help="continue a stopped run in --out: keep its finished rows (OUT/progress/) and "
        "score only the rest; the settings must be the same",
    )
    parser.set_defaults(func=run_eval)
    return parser
