"""The encoder's methods for `oneword eval`: "encoder" and "encoder+refine:K".

- "encoder": the prediction alone (one forward pass of the image tower and the head);
  cost = its seconds and no UNet pass.
- "encoder+refine:K": the prediction, then K steps of classic inversion warm-started from
  it and pulled toward it (`oneword.encoder.encode`, default K = `EncodeConfig.refine_steps`);
  cost = the encoder's seconds plus K UNet passes. Refinement settings other than the
  defaults follow the step count: "encoder+refine:50:lr=1e-2:l2=0" (`EncodeConfig`'s
  `refine_lr` and `l2_weight`), so arms of one setting sit side by side in one report.

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


# "encoder+refine:K:NAME=VALUE" -> the `EncodeConfig` field it sets.
REFINE_SETTINGS = {"lr": "refine_lr", "l2": "l2_weight"}


def refine_settings(arg: str | None) -> dict:
    """ "encoder+refine:K[:lr=X][:l2=Y]" -> `encode` settings: {"refine_steps": K,
    "refine_lr": X, "l2_weight": Y}, each only when given (the rest: `EncodeConfig`'s)."""
    from ..encoder.encode import MAX_REFINE_STEPS, EncodeConfig

    if arg is None:
        return {}
    steps, *options = arg.split(":")
    if not steps.isdigit() or not 1 <= int(steps) <= MAX_REFINE_STEPS:
        raise OnewordError(
            f"encoder+refine:{arg}: the argument starts with a step count in "
            f"1..{MAX_REFINE_STEPS}, e.g. encoder+refine:50 or encoder+refine:50:lr=1e-2:l2=0"
        )
    settings: dict = {"refine_steps": int(steps)}
    for option in options:
        key, _, text = option.partition("=")
        if key not in REFINE_SETTINGS or not text:
            raise OnewordError(
                f"encoder+refine:{arg}: unknown setting {option!r}; give "
                f"{' or '.join(f'{k}=NUMBER' for k in REFINE_SETTINGS)} after the step count"
            )
        field = REFINE_SETTINGS[key]
        if field in settings:
            raise OnewordError(f"encoder+refine:{arg}: {key} is given twice")
        try:
            settings[field] = float(text)
        except ValueError:
            raise OnewordError(f"encoder+refine:{arg}: {key}={text!r} is not a number") from None
    try:  # the same range checks as `oneword encode`
        EncodeConfig(**settings).check_values()
    except OnewordError as error:
        raise OnewordError(f"encoder+refine:{arg}: {error}") from None
    return settings


def _encoder_and_tower(run, model):
    from ..encoder.encode import DEFAULT_ENCODER
    from ..encoder.features import load_tower
    from ..encoder.model import check_compatible, load_encoder

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


def _learn(model, concept, run, method: str, **settings):
    """`encode` with `settings` (what is not given: `EncodeConfig`'s defaults), no check."""
    from ..encoder.encode import encode
    from .harness import LearnedToken

    encoder, tower = _encoder_and_tower(run, model)
    started = time.perf_counter()
    result = encode(
        model,
        encoder,
        run.images,
        run.token,
        class_word=concept.class_word,
        tower=tower,
        **settings,
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
    embedding = _embedding(result, concept, model, method)
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
    return _learn(model, concept, run, "encoder", refine_steps=0)


def encoder_refine_method(model, concept, run):
    """The prediction, then K refinement steps ("encoder+refine:K")."""
    return _learn(model, concept, run, "encoder+refine", **refine_settings(run.arg))


def register_encoder_methods() -> None:
    """Add "encoder" and "encoder+refine" to `oneword.evaluation.harness.METHODS`."""
    from .harness import register_method

    register_method("encoder", encoder_method, _no_arg)
    register_method("encoder+refine", encoder_refine_method, refine_settings)


__all__ = ["encoder_method", "encoder_refine_method", "refine_settings", "register_encoder_methods"]
