"""`oneword generate`: sample a grid of images with one or more learned tokens.

Any embedding file `oneword.embeddings.load_embedding` reads (oneword, diffusers, A1111,
kohya) is added to the model as a placeholder token, then `oneword.sampling.generate`
samples every prompt with the same seeds, so the rows of the grid differ only by the
prompt. The grid (rows = prompts, columns = samples, each row labelled with its prompt)
is written atomically.
"""

from __future__ import annotations

import argparse
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from .embeddings import TokenEmbedding, load_embedding, load_into_model
from .errors import EmbeddingFileError, OnewordError

EXAMPLES = """\
examples:
  oneword generate --embedding runs/cup/learned_embeds.safetensors \\
      --prompt "a photo of <my-cup>" --prompt "<my-cup> on a green background" --out cup.png
  oneword generate --model /models/sd15 --embedding cat.pt:'<cat>' --embedding style.safetensors \\
      --prompt "a painting of <cat> in the style of <style>" --num 8 --seed 3 --out cat.png
"""


def parse_embedding_arg(value: str | os.PathLike) -> tuple[Path, str | None]:
    """`FILE` or `FILE:TOKEN` -> (file, token or None); a path that exists wins over a split.

    Raises:
        EmbeddingFileError: neither the whole string nor the part before the last ':' exists.
    """
    text = str(value)
    path = Path(text).expanduser()
    if path.exists():
        return path, None
    if ":" in text:
        head, token = text.rsplit(":", 1)
        head_path = Path(head).expanduser()
        if head_path.exists() and token.strip():
            return head_path, token.strip()
        if head_path.exists():
            raise EmbeddingFileError(f"--embedding {text!r}: empty token after ':'")
        path = head_path
    raise EmbeddingFileError(
        f"embedding file {path} does not exist (pass FILE or FILE:TOKEN, e.g. cat.pt:'<cat>')"
    )


def _as_embedding(item) -> TokenEmbedding:
    if isinstance(item, TokenEmbedding):
        return item
    if isinstance(item, tuple):
        path, token = item
        return load_embedding(path, token=token)
    path, token = parse_embedding_arg(item)
    return load_embedding(path, token=token)


def _existing_placeholder(model, emb: TokenEmbedding):
    """The `Placeholder` of `emb.token` if an earlier call already added it to `model`."""
    from .tokens import Placeholder, placeholder_embedding, sub_token_names

    names = sub_token_names(emb.token, emb.num_vectors)
    ids = []
    for tokenizer, text_encoder in zip(model.tokenizers, model.text_encoders):
        vocab = tokenizer.get_vocab()
        base_vocab = placeholder_embedding(text_encoder).base_vocab
        if not all(name in vocab and vocab[name] >= base_vocab for name in names):
            return None
        ids.append([vocab[name] for name in names])
    return Placeholder(emb.token, names, ids, "", [])


def load_embeddings(model, embeddings: Sequence) -> list:
    """Add learned tokens to a `LoadedModel`, or overwrite the rows of ones added before.

    Args:
        model: a `LoadedModel`.
        embeddings: `TokenEmbedding`s, paths, "FILE:TOKEN" strings or (path, token) pairs.

    Returns:
        Their `Placeholder`s, in order.
    """
    from .embeddings import _check_widths
    from .tokens import set_rows

    placeholders, seen = [], set()
    for item in embeddings:
        emb = _as_embedding(item)
        if emb.token in seen:
            raise EmbeddingFileError(
                f"two embeddings use the token {emb.token!r}; rename one with FILE:TOKEN"
            )
        seen.add(emb.token)
        placeholder = _existing_placeholder(model, emb)
        if placeholder is None:
            placeholder = load_into_model(model, emb)
        else:  # loaded by an earlier call on this model: take the new rows
            _check_widths(emb, model.widths, model.source, model.family)
            set_rows(model, placeholder, emb.vectors)
        placeholders.append(placeholder)
    return placeholders


def generate_with_embeddings(
    model,
    embeddings: Sequence,
    prompts: Sequence[str],
    *,
    num_per_prompt: int = 4,
    steps: int = 30,
    guidance: float = 5.0,
    seed: int = 0,
    negative_prompt: str | None = None,
    scheduler: str = "ddim",
    device: str | None = None,
) -> list[Image.Image]:
    """Sample prompts that use learned tokens.

    Args:
        model: a `LoadedModel`, or a diffusers folder / hub id to load.
        embeddings: `TokenEmbedding`s, paths, "FILE:TOKEN" strings or (path, token) pairs;
            each is added to the model (a token added by an earlier call is overwritten).
        prompts: prompts naming the tokens; one without any is sampled, with a warning.
        num_per_prompt: samples per prompt (image j of every prompt uses seed + j).
        steps: denoising steps.
        guidance: classifier-free guidance scale.
        seed: seed of the first sample of each prompt.
        negative_prompt: the unconditional prompt (may use tokens too).
        scheduler: "ddim", "euler", "dpm" or "ddpm".
        device: where to load `model` when it is a path (default: CUDA if available).

    Returns:
        len(prompts) * num_per_prompt RGB images, prompt-major.
    """
    from .models import load_model
    from .sampling import generate

    if not prompts:
        raise OnewordError("give at least one --prompt")
    if num_per_prompt < 1 or steps < 1:
        raise OnewordError(f"--num and --steps must be >= 1, got {num_per_prompt} and {steps}")
    if not isinstance(model, (str, os.PathLike)) and not hasattr(model, "text_encoders"):
        raise OnewordError(f"model must be a LoadedModel or a folder, got {type(model).__name__}")
    if isinstance(model, (str, os.PathLike)):
        model = load_model(model, device=device)
    placeholders = load_embeddings(model, embeddings)
    from .tokens import check_prompt_fits

    for prompt in [*prompts, *([negative_prompt] if negative_prompt else [])]:
        check_prompt_fits(model, prompt, placeholders)
    tokens = [p.token for p in placeholders]
    for prompt in prompts:
        if not any(token in prompt for token in tokens):
            warnings.warn(
                f"prompt {prompt!r} uses none of the loaded tokens ({', '.join(tokens) or 'none'})",
                UserWarning,
                stacklevel=2,
            )
    return generate(
        model,
        list(prompts),
        placeholders=placeholders,
        num_per_prompt=num_per_prompt,
        steps=steps,
        guidance=guidance,
        seed=seed,
        negative_prompt=negative_prompt,
        scheduler=scheduler,
    )


# ---------------------------------------------------------------------------------------
# CLI


def run_generate(args: argparse.Namespace) -> int:
    """`oneword generate ...`: write the grid and say where it is."""
    from .images import save_grid
    from .io import check_out_dir
    from .models import load_model

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
    )
    out = save_grid(images, args.out, columns=args.num, labels=list(args.prompt))
    print(f"wrote {out} ({len(args.prompt)} prompts x {args.num} samples, seed {args.seed})")
    return 0


def add_generate_parser(subparsers) -> argparse.ArgumentParser:
    """Register `oneword generate` on an argparse subparsers object."""
    from .models import add_model_argument
    from .sampling import SCHEDULERS

    parser = subparsers.add_parser(
        "generate",
        help="sample a grid of images with learned tokens (rows = prompts, columns = samples)",
        description=__doc__,
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
    add("--out", required=True, type=Path, help="the PNG grid to write")
    parser.set_defaults(func=run_generate)
    return parser
