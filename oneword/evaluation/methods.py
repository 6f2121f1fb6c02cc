"""Every method `oneword eval` compares, in one fixed table (`METHODS`).

- "classword": no learning; the class word stands in for the token (the floor).
- "classic:STEPS": classic textual inversion (Gal et al.), initialised from the class word;
  every step count of one run shares one inversion per concept (snapshots).
- "encoder": the encoder's prediction alone (one forward pass of the image tower and the
  head); cost = its seconds and no UNet pass.
- "encoder+refine:K": the prediction, then K steps of classic inversion warm-started from
  it and pulled toward it (`oneword.encoder.encode`, default K = `EncodeConfig.refine_steps`);
  cost = the encoder's seconds plus K UNet passes. Refinement settings other than the
  defaults follow the step count: "encoder+refine:50:lr=1e-2:l2=0" (`EncodeConfig`'s
  `refine_lr` and `l2_weight`), so arms of one setting sit side by side in one report.

The encoder methods run neither the quality check nor the fallback: the harness measures
quality itself. Their encoder file is `EvalConfig.encoder` (`oneword eval --encoder FILE`),
else `checkpoints/world-encoder.safetensors`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from PIL import Image

from ..errors import OnewordError


@dataclass
class MethodRun:
    """What a method gets besides the model and the concept.

    Attributes:
        arg: the text after "NAME:" in --methods ("400" in "classic:400"), or None.
        token: a new word unique to this method and concept, e.g. "<m1c0007>".
        images: the concept's images, fitted to the model's resolution.
        seed: the run's seed.
        quiet: no progress bars.
    """

    arg: str | None
    token: str
    images: list[Image.Image]
    seed: int
    quiet: bool = True
    encoder: str | None = None  # EvalConfig.encoder, for the encoder methods
    # The ARGs that every label of this method name has in the run ("classic:50,classic:500"
    # -> ("50", "500")), and a dict shared by all methods and concepts of one evaluation:
    # classic inversion learns each concept once, to the longest step count, and keeps a
    # snapshot of the rows at every other.
    siblings: tuple = ()
    shared: dict = field(default_factory=dict)
    # Where work worth keeping across a stopped run goes (`_Progress`; None: not kept).
    store: object | None = None  # the harness's `_Progress`


@dataclass
class LearnedToken:
    """What a method returns.

    Attributes:
        word: what replaces "{}" in the prompts (the token, or a plain word).
        placeholders: the `Placeholder`s the prompts use (for multi-vector expansion).
        cost: "unet_forward_passes" and "unet_samples" spent learning (0 for none), plus
            any facts worth reporting ("steps", ...).
        embedding: the learned `TokenEmbedding`, saved beside the results; None if nothing
            was learned.
    """

    word: str
    placeholders: list = field(default_factory=list)
    cost: dict = field(default_factory=dict)
    embedding: object | None = None


MethodFn = Callable[[object, object, MethodRun], LearnedToken]


def _no_arg(name: str) -> Callable[[str | None], None]:
    def check(arg: str | None) -> None:
        if arg is not None:
            raise OnewordError(f"method {name} takes no argument, got {name}:{arg}")

    return check


def _classic_steps(arg: str | None) -> int | None:
    """ "classic:STEPS" -> STEPS (None: `InversionConfig`'s default)."""
    if arg is None:
        return None
    if not arg.isdigit() or int(arg) < 1:
        raise OnewordError(
            f"classic:{arg}: the argument is a positive step count, e.g. classic:400"
        )
    return int(arg)


def _classword(model, concept, run: MethodRun) -> LearnedToken:
    """No learning: the class word stands in for the token (the floor every method must beat)."""
    return LearnedToken(concept.class_word, [], {"unet_forward_passes": 0, "unet_samples": 0})


def _classic_run(model, concept, run: MethodRun) -> dict:
    """One classic run per concept for every "classic:STEPS" of the evaluation.

    With a constant lr and one seed, the rows at step n of a longer run are exactly those
    of an n-step run (the data, timesteps and noise of each step come from the same
    generator), so the run goes to the longest step count and keeps snapshots at the
    others, with the seconds it had taken by then: an identity-vs-steps curve costs one run.
    Returns {"snapshots": {step: (rows per text encoder, seconds)}, "steps_done", "loss",
    "config"}; kept in `run.store` too, so a resumed evaluation does not learn it again.
    """
    from ..inversion import InversionConfig, invert

    key = ("classic", concept.name)
    if key not in run.shared:
        default = InversionConfig().steps
        wanted = {_classic_steps(arg) or default for arg in (run.siblings or (run.arg,))}
        config = InversionConfig(seed=run.seed, samples=False, quiet=True, steps=max(wanted))
        kept = run.store.classic_run(concept.name, wanted) if run.store else None
        if kept is None:
            result = invert(
                model,
                run.images,
                f"{run.token}-run",  # a scratch word: each label gets its own copy of its rows
                concept.class_word,
                config,
                class_word=concept.class_word,
                snapshots=sorted(wanted),
            )
            kept = {
                "snapshots": result.snapshots,
                "steps_done": result.log["steps_done"],
                "loss": list(result.log["loss"]),
            }
            if run.store:
                run.store.save_classic_run(concept.name, kept)
        run.shared[key] = {**kept, "config": config}
    return run.shared[key]


def _classic(model, concept, run: MethodRun) -> LearnedToken:
    """Classic textual inversion (Gal et al.), initialised from the class word; "classic:STEPS"."""
    from ..embeddings import TokenEmbedding
    from ..inversion import InversionConfig
    from ..inversion.invert import smoothed_loss
    from ..tokens import add_placeholder

    steps = _classic_steps(run.arg) or InversionConfig().steps
    shared = _classic_run(model, concept, run)
    config = shared["config"]
    vectors, seconds = shared["snapshots"][steps]
    done = min(steps, shared["steps_done"])  # fewer after an early stop
    placeholder = add_placeholder(
        model, run.token, concept.class_word, config.vectors, init_rows=vectors
    )
    cost = {
        "unet_forward_passes": done,  # one UNet call per step (batch = config.batch)
        "unet_samples": done * config.batch,
        "steps": done,
        "final_loss_ema": smoothed_loss(None, shared["loss"][:done], config.ema_beta),
        "seconds": seconds,
        "shared_run_steps": shared["steps_done"],
    }
    metadata = {
        "base_model": str(model.source),
        "model_family": model.family,
        "method": "classic",
        "steps": str(done),
        "init_text": concept.class_word,
        "concept": concept.name,
        "config": json.dumps({**asdict(config), "steps": steps}),
    }
    embedding = TokenEmbedding(run.token, vectors, metadata)
    return LearnedToken(run.token, [placeholder], cost, embedding)


# ---------------------------------------------------------------------------------------
# The encoder's methods

# The loaded encoder and tower of the last (file, model folder, device) asked for: the first
# concept of a run pays the loading, the others reuse it.
_LOADED: dict[tuple, tuple] = {}


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
    _no_arg("encoder")(run.arg)
    return _learn(model, concept, run, "encoder", refine_steps=0)


def encoder_refine_method(model, concept, run):
    """The prediction, then K refinement steps ("encoder+refine:K")."""
    return _learn(model, concept, run, "encoder+refine", **refine_settings(run.arg))


# The one table: name -> function(model, concept, run: MethodRun) -> LearnedToken.
METHODS: dict[str, MethodFn] = {
    "classword": _classword,
    "classic": _classic,
    "encoder": encoder_method,
    "encoder+refine": encoder_refine_method,
}
# name -> a function that raises `OnewordError` for a bad ARG, run before any work starts.
ARG_CHECKS: dict[str, Callable[[str | None], object]] = {
    "classword": _no_arg("classword"),
    "classic": _classic_steps,
    "encoder": _no_arg("encoder"),
    "encoder+refine": refine_settings,
}

__all__ = [
    "ARG_CHECKS",
    "METHODS",
    "LearnedToken",
    "MethodFn",
    "MethodRun",
    "encoder_method",
    "encoder_refine_method",
    "refine_settings",
]
