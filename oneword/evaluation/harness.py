"""`oneword eval`: run token-learning methods over a concept suite and score them.

For every method and concept: learn a token (timed, UNet passes counted, peak memory
read), sample "a photo of S*" and the concept's prompts with the same seeds for every
method (so the token is the only difference), then score identity/editability with the
world's oracle and CLIP-I/CLIP-T (and DINO) with a fixed scorer. Writes results.json,
results.md, tradeoff.png (Gal et al.'s reconstruction-vs-editability figure) and one
sample grid per method.

Methods live in `oneword.evaluation.methods.METHODS`, one fixed table name ->
function(model, concept, run) -> `LearnedToken`; "NAME:ARG" in --methods passes ARG
(e.g. "classic:400" = 400 steps).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import torch
from PIL import Image

from ..errors import OnewordError
from ..io import atomic_path, atomic_write_text
from ..provenance import checkpoint_digest, code_version
from .methods import (  # noqa: F401  (re-exported: the harness's API)
    ARG_CHECKS,
    METHODS,
    LearnedToken,
    MethodFn,
    MethodRun,
)
from .metrics import (
    fallback_rates,
    load_clip_scorer,
    load_dino_scorer,
    matched_similarity,
    oracle_predict,
    oracle_scores,
    pairwise_similarity,
    peak_memory_mib,
    reset_peak_memory,
    strip_token,
)

# The metrics a run reports per method, and that two runs with one seed must agree on.
QUALITY_METRICS: tuple[str, ...] = ("identity", "editability", "clip_i", "clip_t", "dino")


@dataclass
class EvalConfig:
    """What decides an evaluation run; stored in results.json."""

    # Methods to compare, "NAME[:ARG]" (see `METHODS`); classword is the no-learning floor.
    methods: tuple[str, ...] = ("classword", "classic")
    # Samples per prompt per concept; sample j of every prompt starts from seed + j.
    samples: int = 4
    # Samples of the identity prompt alone (>= samples; None = samples). Identity is a share
    # of these few samples per concept, so it is far noisier than editability (which pools
    # every edit prompt's): more of them sharpen it at a fraction of the cost of raising
    # `samples`. The first `samples` are the same images as without it.
    identity_samples: int | None = None
    # Seeds the samples and every learning method.
    seed: int = 0
    # DDIM steps and classifier-free guidance of the samples.
    steps: int = 30
    guidance: float = 5.0
    # The reconstruction prompt that identity, CLIP-I and DINO are measured on (Gal et al.).
    identity_prompt: str = "a photo of {}"
    # CLIP for CLIP-I/CLIP-T: "world", "open_clip:...", "transformers:..."; None = the
    # model folder's own CLIP if it has one (the world), else no CLIP scores.
    clip: str | None = None
    # A transformers ViT/Dinov2 folder for the DINO score; None = no DINO score.
    dino: str | None = None
    # Only the first N concepts of the suite (quick runs), or "START:END" (0-based, end
    # excluded: "12:24" = the 13th to the 24th, e.g. to validate a threshold chosen on the
    # first 12); None = all.
    concepts: int | str | None = None
    # Concepts shown in each method's grid, and edit prompts per concept there.
    grid_concepts: int = 4
    grid_edits: int = 2
    # The encoder file of the "encoder" methods; None = checkpoints/world-encoder.safetensors.
    encoder: str | None = None
    # Score every learned token with one of `oneword encode`'s checks, outside the timed
    # learning, so the report can say how well the check separates good tokens from bad
    # ones: "auto" (as `oneword encode`: "clip" when a CLIP scorer is loaded, else "loss"),
    # "loss" (denoising loss on the concept's images relative to the class word's),
    # "clip" (CLIP image distance of "a photo of a S*" samples relative to the class
    # word's) or "none". Lower is better for both; a concept counts as "right" when its
    # identity is >= right_identity.
    check: str = "auto"
    # The threshold whose fallback rates the report gives; None: `oneword encode`'s default
    # for the check (encode.THRESHOLDS).
    check_threshold: float | None = None
    right_identity: float = 0.5
    device: str | None = None
    quiet: bool = False

    def check_values(self) -> None:
        """Raise `OnewordError` for values that cannot work."""
        for name in ("samples", "steps", "grid_concepts"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < (0 if name == "grid_concepts" else 1):
                raise OnewordError(
                    f"--{name.replace('_', '-')} must be a positive integer, got {value!r}"
                )
        if self.seed < 0:
            raise OnewordError(f"--seed must be >= 0, got {self.seed}")
        if self.identity_samples is not None and not (
            isinstance(self.identity_samples, int) and self.identity_samples >= self.samples
        ):
            raise OnewordError(
                f"--identity-samples must be an integer >= --samples ({self.samples}), got "
                f"{self.identity_samples!r}"
            )
        from ..encoder.encode import CHECKS

        if self.check not in CHECKS:
            raise OnewordError(f"--check must be one of {', '.join(CHECKS)}, got {self.check!r}")
        if self.check_threshold is not None and not self.check_threshold >= 0:  # refuses NaN
            raise OnewordError(f"--check-threshold must be >= 0, got {self.check_threshold}")
        if not 0 < self.right_identity <= 1:
            raise OnewordError(f"--right-identity must be in (0, 1], got {self.right_identity}")
        concept_slice(self.concepts)  # raises on a bad value
        if "{}" not in self.identity_prompt:
            raise OnewordError(
                f"identity prompt {self.identity_prompt!r} needs a {{}} for the token"
            )
        if not self.methods:
            raise OnewordError("give at least one method (--methods classword,classic:400)")


def concept_slice(spec: int | str | None) -> slice:
    """`--concepts` as a slice: N -> the first N, "START:END" -> those (0-based), None -> all."""
    if spec is None:
        return slice(None)
    text = str(spec).strip()
    try:
        if ":" in text:
            start, end = (int(part) if part.strip() else None for part in text.split(":"))
        else:
            start, end = 0, int(text)
    except ValueError:
        start = end = -1
    if (
        (start is not None and start < 0)
        or (end is not None and end < 1)
        or (start is not None and end is not None and end <= start)
    ):
        raise OnewordError(
            f"--concepts must be N >= 1 (the first N) or START:END with 0 <= START < END, "
            f"got {spec!r}"
        )
    return slice(start, end)


def parse_methods(specs: str | Sequence[str]) -> list[tuple[str, MethodFn, str | None]]:
    """ "classword,classic:50" (or a list) -> [(label, function, arg)], checked before any work."""
    if isinstance(specs, str):
        specs = specs.split(",")
    parsed, labels = [], set()
    for spec in (s.strip() for s in specs):
        if not spec:
            continue
        name, _, arg = spec.partition(":")
        if name not in METHODS:
            raise OnewordError(
                f"unknown method {name!r} in --methods; known: {', '.join(sorted(METHODS))} "
                "(NAME or NAME:ARG, e.g. classic:400)"
            )
        if spec in labels:
            raise OnewordError(f"method {spec!r} is listed twice")
        labels.add(spec)
        if name in ARG_CHECKS:
            ARG_CHECKS[name](arg or None)
        parsed.append((spec, METHODS[name], arg or None))
    if not parsed:
        raise OnewordError("give at least one method (--methods classword,classic:400)")
    return parsed


# ---------------------------------------------------------------------------------------
# Helpers


def fill_prompt(template: str, word: str, class_word: str | None = None) -> str:
    """Put `word` where "{}" is; when `word` is the class word itself, "a {} dog" becomes
    "a dog", not "a dog dog" (DreamBooth's prompts already name the class)."""
    if class_word and word == class_word:
        template = template.replace("{} " + class_word, "{}")
    return template.replace("{}", word)


def _file_name(label: str) -> str:
    return re.sub(r"[^\w+.-]+", "-", label)


def _uses_encoder(config) -> bool:
    return any(str(method).startswith("encoder") for method in config.methods)


def _encoder_file(config) -> str:
    from ..encoder.encode import DEFAULT_ENCODER

    return config.encoder or DEFAULT_ENCODER


def _mean(values: Sequence) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


@dataclass
class _Reference:
    """A concept's images and their features (computed once, shared by every method)."""

    images: list[Image.Image]
    clip: torch.Tensor | None  # (n, p)
    dino: torch.Tensor | None  # (n, q)
    check: object | None = None  # the concept's `LossCheck` or `ClipCheck`, made on first use


@dataclass
class _Scorers:
    oracle: object | None
    clip: object | None
    dino: object | None


# What a resumed evaluation must share with the stopped one for their rows to mix. The
# checkpoints' digests too: an encoder retrained into the same path must not resume the old
# one's rows.
RESUME_KEYS: tuple[str, ...] = (
    "model", "suite", "device", "seed", "samples", "identity_samples", "steps", "guidance",
    "identity_prompt", "clip", "dino", "encoder", "check", "grid_concepts", "grid_edits", "checkpoints",
)  # fmt: skip


def classic_run_path(progress: Path, concept: str) -> Path:
    """Where an evaluation's progress folder keeps `concept`'s shared classic run."""
    return progress / "classic" / f"{_file_name(concept)}.safetensors"


def read_classic_run(progress: str | os.PathLike, concept: str) -> dict | None:
    """The classic run an evaluation kept for `concept` under its progress folder
    (OUT/progress), or None: {"snapshots": {step: (rows per text encoder, seconds)},
    "steps_done", "loss"}."""
    from safetensors import safe_open

    path = classic_run_path(Path(progress), concept)
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as f:
        log = json.loads(f.metadata()["log"])
        snapshots = {
            int(n): ([f.get_tensor(f"{n}/{i}") for i in range(log["encoders"])], at)
            for n, at in log["seconds"].items()
        }
    return {"snapshots": snapshots, "steps_done": log["steps_done"], "loss": log["loss"]}


class _Progress:
    """The finished (method, concept) rows of one evaluation, under OUT/progress/.

    Each row is written (atomically) as soon as its concept is scored, with its grid tiles
    and, for classic inversion, the shared run's snapshots, so `evaluate(..., resume=True)`
    after a stop scores only what is missing. `run.json` holds the settings (`RESUME_KEYS`)
    that a resumed run must repeat.
    """

    def __init__(self, folder: Path, settings: dict, resume: bool):
        self.folder = folder
        settings = json.loads(json.dumps(settings))  # tuples -> lists, as stored
        run_file = folder / "run.json"
        if resume and run_file.is_file():
            stored = json.loads(run_file.read_text())
            # A checkpoint that one of the two runs did not use (None: no encoder method)
            # made no rows in it, so it is not compared; the digest stays on record for a
            # later resume that uses it.
            if isinstance(stored.get("checkpoints"), dict) and settings.get("checkpoints"):
                now, before = settings["checkpoints"], stored["checkpoints"]
                known = {
                    k: now.get(k) if now.get(k) is not None else before.get(k)
                    for k in {*now, *before}
                }
                settings["checkpoints"] = known
                stored["checkpoints"] = {
                    k: v if v is not None else known[k] for k, v in before.items()
                }
            # A key an older oneword did not store (the checkpoints' digests) is not compared.
            differs = [k for k in RESUME_KEYS if k in stored and stored[k] != settings.get(k)]
            if differs:
                detail = "; ".join(
                    f"{k}: {stored.get(k)!r} there, {settings.get(k)!r} now" for k in differs
                )
                raise OnewordError(
                    f"--resume: the evaluation in {folder.parent} was made with other settings "
                    f"({detail}); repeat them or write to a new --out"
                )
            self.kept = sum(1 for _ in folder.glob("rows/*/*.json"))
        else:
            if folder.exists():  # a fresh run: rows of an earlier one must not mix in
                shutil.rmtree(folder)
            self.kept = 0
        atomic_write_text(run_file, json.dumps(settings, indent=2) + "\n")

    def _row_path(self, label: str, concept: str) -> Path:
        return self.folder / "rows" / _file_name(label) / f"{_file_name(concept)}.json"

    def row(self, label: str, concept: str) -> tuple[dict, list[Image.Image], list[str]] | None:
        """A finished row with its grid tiles and labels, or None."""
        path = self._row_path(label, concept)
        if not path.is_file():
            return None
        kept = json.loads(path.read_text())
        tiles: list[Image.Image] = []
        if kept["grid_labels"]:
            with Image.open(path.with_suffix(".png")) as strip:
                width = strip.width // kept["grid_tiles"]
                tiles = [
                    strip.crop((i * width, 0, (i + 1) * width, strip.height)).convert("RGB")
                    for i in range(kept["grid_tiles"])
                ]
        return kept["row"], tiles, kept["grid_labels"]

    def save_row(
        self, label: str, concept: str, row: dict, tiles: list[Image.Image], labels: list[str]
    ) -> None:
        path = self._row_path(label, concept)
        if tiles:  # the tiles side by side in one PNG; all are the samples' size
            width, height = tiles[0].size
            strip = Image.new("RGB", (width * len(tiles), height))
            for i, tile in enumerate(tiles):
                strip.paste(tile, (i * width, 0))
            with atomic_path(path.with_suffix(".png")) as tmp:
                strip.save(tmp, format="PNG")
        kept = {"row": row, "grid_labels": labels, "grid_tiles": len(tiles)}
        atomic_write_text(path, json.dumps(kept, indent=2) + "\n")  # last: marks it finished

    def _classic_path(self, concept: str) -> Path:
        return classic_run_path(self.folder, concept)

    def classic_run(self, concept: str, steps: set[int]) -> dict | None:
        """A kept classic run of `concept` with a snapshot at every step of `steps`, or None."""
        kept = read_classic_run(self.folder, concept)
        if kept is None or not steps <= kept["snapshots"].keys():
            return None  # none, or asked for other step counts than the kept run has
        return kept

    def save_classic_run(self, concept: str, run: dict) -> None:
        from safetensors.torch import save_file

        tensors, seconds, encoders = {}, {}, 0
        for n, (rows, at) in run["snapshots"].items():
            encoders = len(rows)
            seconds[str(n)] = at
            tensors |= {f"{n}/{i}": r.detach().cpu().contiguous() for i, r in enumerate(rows)}
        log = {
            "seconds": seconds,
            "encoders": encoders,
            "steps_done": run["steps_done"],
            "loss": run["loss"],
        }
        with atomic_path(self._classic_path(concept)) as tmp:
            save_file(tensors, str(tmp), metadata={"log": json.dumps(log)})


def _resume_settings(results: dict, config: EvalConfig) -> dict:
    """`RESUME_KEYS` of a run, with paths made absolute (a resumed run may name them another way)."""

    def where(value):
        return str(Path(value).resolve()) if value and Path(value).exists() else value

    settings = {k: results.get(k, getattr(config, k, None)) for k in RESUME_KEYS}
    for key in ("model", "suite", "encoder", "clip", "dino"):
        settings[key] = where(settings[key])
    return settings


def _score(
    concept,
    samples: list[Image.Image],
    reference: _Reference,
    scorers: _Scorers,
    per_prompt: int,
    extra_identity: Sequence[Image.Image] = (),
) -> dict:
    """Scores of one concept's samples: identity prompt first, then the concept's prompts;
    `extra_identity`: more samples of the identity prompt (`EvalConfig.identity_samples`)."""
    identity_samples = [*samples[:per_prompt], *extra_identity]
    everything = [*samples, *extra_identity]
    n = len(samples)
    row: dict = {"identity": None, "editability": None, "per_attribute": None}
    if scorers.oracle is not None and concept.attributes:
        predictions = oracle_predict(scorers.oracle, everything)

        def part(index: int) -> dict:  # predictions of the samples of prompt `index`
            span = slice(index * per_prompt, (index + 1) * per_prompt)
            if index == 0:  # the identity prompt's samples: the first ones and the extra
                return {name: [*v[span], *v[n:]] for name, v in predictions.items()}
            return {name: values[span] for name, values in predictions.items()}

        edits = concept.edits or []
        scores = oracle_scores(
            part(0), [part(i + 1) for i in range(len(edits))], edits, concept.attributes
        )
        row.update(scores)
    row["clip_i"] = row["clip_t"] = row["dino"] = None
    if scorers.clip is not None:
        features = scorers.clip.image_features(everything)  # (n + extra, p)
        identity_features = torch.cat([features[:per_prompt], features[n:]])
        row["clip_i"] = pairwise_similarity(identity_features, reference.clip)
        # The prompt without the token (Gal et al.), the same text for every method.
        texts = [strip_token(t) for t in concept.prompts for _ in range(per_prompt)]
        row["clip_t"] = matched_similarity(
            features[per_prompt:n], scorers.clip.text_features(texts)
        )
    if scorers.dino is not None:
        row["dino"] = pairwise_similarity(
            scorers.dino.image_features(identity_samples), reference.dino
        )
    return row


def _check_score(
    model, concept, reference: _Reference, learned, config: EvalConfig, clip
) -> float | None:
    """`oneword encode`'s check (`config.check`) of a learned token (None for a plain word).

    The check's class-word half (the loss check's draws and class-word loss, the CLIP
    check's class-word samples) depends only on the concept and the seed, so it is made
    once per concept (`reference.check`) and shared by every method.
    """
    from ..encoder.encode import ClipCheck, EncodeConfig, LossCheck

    if len(learned.placeholders) != 1:
        return None
    if reference.check is None:
        settings = EncodeConfig(seed=config.seed, check=config.check, quiet=config.quiet)
        if config.check == "clip":
            reference.check = ClipCheck(
                model, reference.images, concept.class_word, settings, scorer=clip
            )
        else:
            reference.check = LossCheck(model, reference.images, concept.class_word, settings)
    return reference.check.score(learned.placeholders[0])


def _grid_rows(concept, learned, reference, samples, config: EvalConfig, per_prompt: int):
    """Images and labels for one concept in a method's grid: its images, then the identity
    prompt and `grid_edits` prompts."""
    white = Image.new("RGB", samples[0].size, (255, 255, 255))
    images = [image.resize(samples[0].size) for image in reference.images[:per_prompt]]
    images += [white] * (per_prompt - len(images))
    labels = [f"{concept.name}: its images"]
    shown = min(config.grid_edits, len(concept.prompts))
    templates = [config.identity_prompt, *concept.prompts[:shown]]
    for index, template in enumerate(templates):
        images += samples[index * per_prompt : (index + 1) * per_prompt]
        labels.append(fill_prompt(template, learned.word, concept.class_word))
    return images, labels


def summarise_method(label: str, rows: list[dict], grid: str | None) -> dict:
    """One method's results.json entry from its per-concept rows (means over concepts)."""
    name, _, arg = label.partition(":")
    per_attribute: dict[str, list] = {}
    for row in rows:
        for attribute, value in (row.get("per_attribute") or {}).items():
            per_attribute.setdefault(attribute, []).append(value)
    peaks = [row["peak_memory_mib"] for row in rows if row["peak_memory_mib"] is not None]
    steps = [row["cost"].get("steps") for row in rows if row["cost"].get("steps") is not None]
    return {
        "method": name,
        "arg": arg or None,
        "steps": max(steps) if steps else None,
        **{metric: _mean([row[metric] for row in rows]) for metric in QUALITY_METRICS},
        "per_attribute": {a: _mean(v) for a, v in per_attribute.items()} or None,
        "seconds_per_concept": _mean([row["seconds"] for row in rows]),
        "unet_passes_per_concept": _mean([row["unet_forward_passes"] for row in rows]),
        "unet_samples_per_concept": _mean([row["unet_samples"] for row in rows]),
        "peak_memory_mib": max(peaks) if peaks else None,
        "sampling_seconds_per_concept": _mean([row["sampling_seconds"] for row in rows]),
        "check_score": _mean([row.get("check_score") for row in rows]),
        "concepts": len(rows),
        "grid": grid,
        "per_concept": rows,
    }


def _write_outputs(results: dict, out: Path) -> None:
    from .report import write_report

    atomic_write_text(out / "results.json", json.dumps(results, indent=2) + "\n")
    write_report(results, out)


# ---------------------------------------------------------------------------------------
# The harness


def evaluate(
    model,
    suite: str | os.PathLike,
    config: EvalConfig | None = None,
    out_dir=None,
    *,
    resume: bool = False,
) -> dict:
    """Run every method of `config` over the suite and score it.

    Args:
        model: a diffusers folder / hub id, or a `LoadedModel` (tokens are added to it).
        suite: a suite folder (`oneword.datasets.suite.read_suite`: ours or DreamBooth's).
        config: `EvalConfig`; defaults if None.
        out_dir: where results.json, results.md, tradeoff.png, grids/ and embeddings/ go
            (rewritten after each method), with progress/: every finished (method,
            concept) row; None writes nothing.
        resume: keep the rows in out_dir/progress/ of a stopped run with the same settings
            (`RESUME_KEYS`; others raise `OnewordError`) and score only the missing ones.
            False starts afresh (progress/ is cleared).

    Returns:
        The results.json contents: {"methods": {label: {"identity", "editability",
        "clip_i", "clip_t", "dino" (means over concepts, None where not measured),
        "seconds_per_concept", "unet_passes_per_concept", "peak_memory_mib",
        "per_concept": [...], ...}}, "model", "suite", "seed", "device", "samples",
        "commit", "date", ...}.
    """
    from tqdm.auto import tqdm

    from .. import __version__
    from ..datasets.suite import read_suite
    from ..embeddings import save_embedding
    from ..images import load_images, save_grid
    from ..models import load_model
    from ..sampling import generate, make_pipeline

    # 1. Check everything cheap before the model loads: config, methods, suite.
    config = config or EvalConfig()
    config.check_values()
    methods = parse_methods(config.methods)
    concepts = read_suite(suite)[concept_slice(config.concepts)]
    if not concepts:
        raise OnewordError(f"--concepts {config.concepts} selects no concept of {suite}")
    out = Path(out_dir) if out_dir is not None else None

    # 2. The model, its oracle (if it has one), the CLIP and DINO scorers.
    if isinstance(model, (str, os.PathLike)):
        model = load_model(model, device=config.device)
    device = model.device
    folder = Path(model.extra["folder"]) if model.extra.get("folder") else None
    oracle = None
    if folder is not None and (folder / "oracle" / "config.json").is_file():
        from ..world.oracle import Oracle

        oracle = Oracle.load(folder / "oracle", device)
    scorers = _Scorers(
        oracle,
        load_clip_scorer(config.clip, folder, device),
        load_dino_scorer(config.dino, device) if config.dino else None,
    )
    # "auto" and the default threshold mean what they mean for `oneword encode`.
    from ..encoder.encode import EncodeConfig, resolve_check

    check = resolve_check(
        EncodeConfig(check=config.check, threshold=config.check_threshold, clip=config.clip),
        model,
    )
    config = replace(config, check=check.check, check_threshold=check.threshold)
    pipe = make_pipeline(model)

    # 3. Each concept's images and reference features, once.
    references = []
    for concept in concepts:
        images = load_images(concept.images, model.resolution)
        references.append(
            _Reference(
                images,
                scorers.clip.image_features(images) if scorers.clip else None,
                scorers.dino.image_features(images) if scorers.dino else None,
            )
        )

    results = {
        "model": str(model.source),
        "family": model.family,
        "suite": str(suite),
        "concepts": [c.name for c in concepts],
        "seed": config.seed,
        "samples": config.samples,
        "identity_samples": config.identity_samples,
        "steps": config.steps,
        "guidance": config.guidance,
        "identity_prompt": config.identity_prompt,
        "device": str(device),
        "cuda_device": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "oracle": oracle is not None and any(c.attributes for c in concepts),
        "clip": scorers.clip.name if scorers.clip else None,
        "dino": scorers.dino.name if scorers.dino else None,
        "commit": code_version(),  # "+dirty": tracked files differed from the commit
        "checkpoints": {
            "model": checkpoint_digest(model.source),
            "encoder": checkpoint_digest(_encoder_file(config)) if _uses_encoder(config) else None,
        },
        "date": datetime.now(timezone.utc).replace(microsecond=0).isoformat(),
        "oneword_version": __version__,
        "torch_version": torch.__version__,
        "config": {**asdict(config), "methods": list(config.methods)},
        "methods": {},
    }
    progress = None
    if out is not None:
        progress = _Progress(out / "progress", _resume_settings(results, config), resume)
        results["resumed_rows"] = progress.kept
        if resume and not config.quiet:
            print(f"--resume: {progress.kept} finished rows kept from {out / 'progress'}")
    if scorers.clip is None:
        print(
            "no CLIP scores: this model has no image_encoder/ CLIP; pass --clip "
            "open_clip:ViT-L-14:openai or --clip transformers:FOLDER for CLIP-I/CLIP-T"
        )

    # 4. Every method over every concept; the same sample seeds for all of them.
    per_prompt = config.samples
    shared: dict = {}  # what methods share within this evaluation (see MethodRun)
    bar = tqdm(total=len(methods) * len(concepts), disable=config.quiet, unit="concept")
    for method_index, (label, fn, arg) in enumerate(methods):
        name = label.partition(":")[0]
        siblings = tuple(a for (other, _, a) in methods if other.partition(":")[0] == name)
        bar.set_description(label)
        rows, grid_images, grid_labels = [], [], []
        for concept_index, (concept, reference) in enumerate(zip(concepts, references)):
            in_grid = concept_index < config.grid_concepts
            kept = progress.row(label, concept.name) if progress else None
            if kept is not None and (kept[1] or not in_grid):  # finished before a stop
                rows.append(kept[0])
                if in_grid:
                    grid_images += kept[1]
                    grid_labels += kept[2]
                bar.update(1)
                continue
            run = MethodRun(
                arg,
                f"<m{method_index}c{concept_index:04d}>",
                reference.images,
                config.seed,
                encoder=config.encoder,
                siblings=siblings,
                shared=shared,
                store=progress,
            )
            # 4a. Learn, timed, with the peak memory of learning alone.
            reset_peak_memory(device)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            started = time.perf_counter()
            learned = fn(model, concept, run)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            # A method that shares work across labels reports its own learning time.
            seconds = learned.cost.get("seconds", time.perf_counter() - started)
            peak = peak_memory_mib(device)
            # 4b. The fallback check's score, untimed: a diagnostic, not part of learning.
            check_score = None
            if config.check != "none":
                check_score = _check_score(model, concept, reference, learned, config, scorers.clip)
            # 4c. Sample the identity prompt and the concept's prompts.
            started = time.perf_counter()
            templates = [config.identity_prompt, *concept.prompts]
            samples = generate(
                model,
                [fill_prompt(t, learned.word, concept.class_word) for t in templates],
                placeholders=learned.placeholders,
                num_per_prompt=per_prompt,
                steps=config.steps,
                guidance=config.guidance,
                seed=config.seed,
                pipeline=pipe,
                progress=not config.quiet,
            )
            extra_identity = []
            if config.identity_samples and config.identity_samples > per_prompt:
                # Sample j of a prompt starts from seed + j: these continue the first ones.
                extra_identity = generate(
                    model,
                    [fill_prompt(templates[0], learned.word, concept.class_word)],
                    placeholders=learned.placeholders,
                    num_per_prompt=config.identity_samples - per_prompt,
                    steps=config.steps,
                    guidance=config.guidance,
                    seed=config.seed + per_prompt,
                    pipeline=pipe,
                    progress=not config.quiet,
                )
            sampling_seconds = time.perf_counter() - started
            # 4d. Score.
            row = {"concept": concept.name, "word": learned.word, "check_score": check_score}
            row |= _score(concept, samples, reference, scorers, per_prompt, extra_identity)
            row |= {
                "seconds": seconds,
                "unet_forward_passes": learned.cost.get("unet_forward_passes", 0),
                "unet_samples": learned.cost.get("unet_samples", 0),
                "peak_memory_mib": peak,
                "sampling_seconds": sampling_seconds,
                "cost": learned.cost,
            }
            rows.append(row)
            images, labels = [], []
            if in_grid:
                images, labels = _grid_rows(
                    concept, learned, reference, samples, config, per_prompt
                )
                grid_images += images
                grid_labels += labels
            if out is not None and learned.embedding is not None:
                path = (
                    out
                    / "embeddings"
                    / _file_name(label)
                    / f"{_file_name(concept.name)}.safetensors"
                )
                save_embedding(path, learned.embedding)
            if progress is not None:
                progress.save_row(label, concept.name, row, images, labels)
            bar.update(1)
        grid = None
        if out is not None and grid_images:
            grid = f"grids/{_file_name(label)}.png"
            save_grid(grid_images, out / grid, columns=per_prompt, labels=grid_labels)
        results["methods"][label] = summarise_method(label, rows, grid)
        results["methods"][label]["fallback"] = fallback_rates(
            rows, config.check_threshold, config.right_identity
        )
        if out is not None:
            _write_outputs(results, out)
    bar.close()
    return results
