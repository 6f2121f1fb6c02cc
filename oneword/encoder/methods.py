"""The encoder's methods for `oneword eval`: "encoder" and "encoder+refine:K".

- "encoder": the prediction alone (one forward pass of the image tower and the head);
  cost = its seconds and no UNet pass.
- "encoder+refine:K": the prediction, then K steps of classic inversion warm-started from
  it and pulled toward it (`oneword.encode`, default K = `EncodeConfig.refine_steps`);
  cost = the encoder's seconds plus K UNet passes.

Neither runs the quality check or the fallback: the harness measures quality itself.
The encoder file is `EvalConfig.encoder` (`oneword eval --encoder FILE`), else
`checkpoints/world-encoder.safetensors`. The harness registers both methods when it is
imported (`register_encoder_methods`), so `oneword eval --help` lists them.
"""

from __future__ import annotations

import time
from pathlib import Path

from ..errors import OnewordError

# The loaded encoder and tower of the last (file, model folder, device) asked for: the first
# concept of a run pays the loading, the others reuse it.
_LOADED: dict[tuple, tuple] = {}


def _no_arg(arg: str | None) -> None:
    if arg is not None:
        raise OnewordError(f"method encoder takes no argument, got encoder:{arg}")


def refine_steps(arg: str | None) -> int | None:
    """ "encoder+refine:K" -> K (None: `EncodeConfig`'s default)."""
    from ..encode import MAX_REFINE_STEPS

    if arg is None:
        return None
    if not arg.isdigit() or not 1 <= int(arg) <= MAX_REFINE_STEPS:
        raise OnewordError(
            f"encoder+refine:{arg}: the argument is a step count in 1..{MAX_REFINE_STEPS}, "
            "e.g. encoder+refine:50"
        )
    return int(arg)


def _encoder_and_tower(run, model):
    from ..encode import DEFAULT_ENCODER
    from .features import load_tower
    from .model import check_compatible, load_encoder

    path = Path(getattr(run, "encoder", None) or DEFAULT_ENCODER)
    if not path.is_file():
        raise OnewordError(
            f"the encoder methods need an encoder file: {path} does not exist; pass "
            "oneword eval --encoder FILE (train one with train_encoder.py)"
        )
    folder = model.extra.get("folder") if isinstance(model.extra, dict) else None
    key = (str(path.resolve()), path.stat().st_mtime_ns, str(folder), str(model.device))
    if key not in _LOADED:
        encoder = load_encoder(path, device=model.device)
        check_compatible(encoder.config, model)
        tower = load_tower(encoder.config.tower, model_folder=folder, device=model.device)
        _LOADED.clear()
        _LOADED[key] = (encoder, tower)
    return _LOADED[key]


def _learn(model, concept, run, steps: int):
    from ..encode import encode
    from ..evaluation.harness import LearnedToken

    encoder, tower = _encoder_and_tower(run, model)
    started = time.perf_counter()
    result = encode(
        model,
        encoder,
        run.images,
        run.token,
        class_word=concept.class_word,
        tower=tower,
        refine_steps=steps,
        check="none",
        fallback=False,
        seed=run.seed,
        samples=False,
        quiet=run.quiet,
    )
    seconds = time.perf_counter() - started
    cost = {
        "unet_forward_passes": result.log["unet_forward_passes"],
        "unet_samples": result.log["unet_samples"],
        "steps": result.log["steps_done"],
        "encoder_seconds": result.timings["encoder"],
        "refine_seconds": result.timings.get("refine", 0.0),
        "seconds": seconds,
    }
    embedding = _embedding(result, concept, model, "encoder" if steps == 0 else "encoder+refine")
    return LearnedToken(run.token, [result.placeholder], cost, embedding)


def _embedding(result, concept, model, method: str):
    from ..embeddings import TokenEmbedding

    metadata = {
        "base_model": str(model.source),
        "model_family": model.family,
        "method": method,
        "steps": str(result.log["steps_done"]),
        "init_text": result.log["class_word"],
        "concept": concept.name,
        "encoder": str(result.log["encoder"]["source"]),
    }
    return TokenEmbedding(result.token, result.vectors, metadata)


def encoder_method(model, concept, run):
    """The encoder's prediction alone (no UNet pass)."""
    _no_arg(run.arg)
    return _learn(model, concept, run, 0)


def encoder_refine_method(model, concept, run):
    """The prediction, then K refinement steps ("encoder+refine:K")."""
    from ..encode import EncodeConfig

    steps = refine_steps(run.arg)
    return _learn(model, concept, run, EncodeConfig().refine_steps if steps is None else steps)


def register_encoder_methods() -> None:
    """Add "encoder" and "encoder+refine" to `oneword.evaluation.harness.METHODS`."""
    from ..evaluation.harness import register_method

    register_method("encoder", encoder_method, _no_arg)
    register_method("encoder+refine", encoder_refine_method, refine_steps)


__all__ = ["encoder_method", "encoder_refine_method", "refine_steps", "register_encoder_methods"]
