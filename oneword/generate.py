"""`oneword generate`: sample a grid of images with one or more learned tokens.

Any embedding file `oneword.embeddings.load_embedding` reads (oneword, diffusers, A1111,
kohya) is added to the model as a placeholder token, then `oneword.sampling.generate`
samples every prompt with the same seeds, so the rows of the grid differ only by the
prompt. The grid (rows = prompts, columns = samples, each row labelled with its prompt)
is written atomically.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from .embeddings import TokenEmbedding, load_embedding, load_into_model
from .errors import EmbeddingFileError, OnewordError


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
    progress: bool = False,
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
        progress: show a progress bar over the denoising steps.

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
        progress=progress,
    )
