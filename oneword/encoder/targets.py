"""The target factory: classic inversion of every training identity, the encoder's targets.

A *target* is the word classic inversion (Gal et al., 2023) learns for one training identity
of the miniature world from one *image set* (the images a world suite written with seed s
holds for it: `concept_image_set`). Every target starts from the class word with the same
seed, steps and learning rate, so that targets differ only by identity and image set: a
regression onto them learns one consistent function, and the spread between the image sets
of an identity says how well a target is determined by its identity.

The factory is one resumable job over `target_specs(...)`:

1. the targets are cut into fixed chunks of `batch_concepts` consecutive targets (one UNet
   batch each, `invert_together`); chunk c belongs to rank c % world_size, so ranks (from
   `accelerate launch` or `torchrun`) take disjoint shares and a target is learned in the
   same company whatever the number of processes;
2. each finished target is written at once, atomically, to OUT/targets/<key>.safetensors
   (its rows; identity, image set, steps, final loss, seconds and the settings in the
   metadata) and recorded in the rank's manifest OUT/manifest/rank-R.jsonl;
3. a restart (`resume=True`) checks every target file of its share: a valid one is skipped,
   a corrupt, partial or foreign one is named in the log and learned again, and it says
   how many are kept and left, naming those a killed run was learning when it stopped
   (each UNet batch is logged as "learning" before its work);
4. the process that finds every target done assembles the target table
   OUT/targets.safetensors (`load_targets` reads it; `train_encoder.py --targets`).

The table: tensors "rows.E" fp32 (N, K, d_E) per text encoder E, "image_set", "steps" int64
(N,), "final_loss", "seconds" fp32 (N,); metadata "identities" and "class_words" (JSON lists,
one per row), "settings" (JSON) and "format". Seconds per target: the wall time of its UNet
batch (rendering, VAE encoding and inversion) divided by the targets in it.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..datasets import world
from ..errors import OnewordError
from ..provenance import checkpoint_digest, code_version

TARGET_FORMAT = "oneword-target/1"
TABLE_FORMAT = "oneword-targets/1"
TABLE_NAME = "targets.safetensors"
# Classic inversion's step count for the targets: where classic's validation identity reaches
# its plateau. Validation concepts 1-12, 2 samples per prompt: 41.7% identity at 100 steps, the
# best of 10-300 (150: 37.5%, 300: 16.7%); to confirm on all 24 at 4 samples
# (docs/encoder-plan.md, step 2). The factory in runs/targets uses it.
PLATEAU_STEPS = 100
# Settings that decide a target's values; a restart must share them with the run it continues.
RESUME_KEYS = ("steps", "images", "seed", "lr", "batch", "vectors", "templates", "model")
# Placeholder words stay in the model after their batch: each target gets a word never used.
_TOKEN_NUMBERS = itertools.count()


# ---------------------------------------------------------------------------------------
# What to learn


@dataclass(frozen=True)
class TargetSpec:
    """One target: an identity and the seed of its image set."""

    identity: world.Identity
    image_set: int

    @property
    def key(self) -> str:
        """Unique, folder-safe: "teal-hexagon-striped@1"."""
        return f"{self.identity.name}@{self.image_set}"


def factory_identities(limit: int | None = None) -> list[world.Identity]:
    """The training split in a fixed pseudo-random order (by a hash of the name), so that the
    first `limit` identities cover shapes, colours and patterns evenly, not only circles."""
    ordered = sorted(
        world.training_identities(),
        key=lambda i: hashlib.blake2b(f"oneword-targets:{i.name}".encode()).digest(),
    )
    if limit is not None:
        if limit < 1:
            raise OnewordError(f"--identities must be >= 1, got {limit}")
        ordered = ordered[:limit]
    return ordered


def target_specs(identities: Sequence[world.Identity], image_sets: int) -> list[TargetSpec]:
    """Every identity with image sets 0 .. image_sets - 1 (identity-major order)."""
    if image_sets < 1:
        raise OnewordError(f"--image-sets must be >= 1, got {image_sets}")
    never = {i.name for i in world.HELD_OUT + world.VALIDATION}
    leaked = sorted(i.name for i in identities if i.name in never)
    if leaked:
        raise OnewordError(f"identities {leaked[:4]} are validation or test ones: no targets")
    return [TargetSpec(identity, s) for identity in identities for s in range(image_sets)]


@dataclass
class FactoryConfig:
    """The factory's settings; those in `RESUME_KEYS` are in every target file. lr, batch and
    templates are InversionConfig's defaults, the recipe `oneword eval`'s classic uses; the
    field comments are make_targets.py's help texts."""

    steps: int = PLATEAU_STEPS  # classic inversion steps per target
    image_sets: int = 2  # independent image sets (scene seeds 0, 1, ...) per identity
    images: int = 5  # images per image set (as in the world suites)
    identities: int | None = None  # only the first N of `factory_identities()`; None: all
    batch_concepts: int = 8  # targets per UNet batch
    seed: int = 0  # classic inversion's seed, the same for every target
    lr: float = 5e-3  # classic inversion's learning rate
    batch: int = 4  # images per inversion step
    vectors: int = 1  # K vectors per target word (train_encoder.py --vectors must match)
    templates: str = "object"  # prompt templates of classic inversion
    quiet: bool = False  # no progress bar

    def check(self) -> None:
        for name in ("steps", "image_sets", "images", "batch_concepts", "batch", "vectors"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise OnewordError(
                    f"--{name.replace('_', '-')} must be a positive integer, got {value!r}"
                )
        if self.identities is not None and self.identities < 1:
            raise OnewordError(f"--identities must be >= 1, got {self.identities}")

    def inversion_config(self):
        from ..inversion import InversionConfig

        return InversionConfig(
            steps=self.steps,
            lr=self.lr,
            batch=self.batch,
            vectors=self.vectors,
            templates=self.templates,
            seed=self.seed,
            samples=False,
            quiet=True,
        )


def model_fingerprint(model) -> str:
    """The model by content: its folder's name and a SHA-1 of its UNet and text encoder
    weights (so a factory moved to another machine, under another path, still resumes)."""
    folder = model.extra.get("folder")
    if not folder:
        return str(model.source)
    digest = hashlib.sha1()
    for part in ("unet", "text_encoder", "text_encoder_2"):
        for file in sorted((Path(folder) / part).glob("*.safetensors")):
            with open(file, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 24), b""):
                    digest.update(block)
    return f"{Path(folder).name}:{digest.hexdigest()[:16]}"


def _settings(config: FactoryConfig, model) -> dict:
    """The values of `RESUME_KEYS` (the model by `model_fingerprint`)."""
    values = asdict(config) | {"model": model_fingerprint(model)}
    return {key: values[key] for key in RESUME_KEYS}


# ---------------------------------------------------------------------------------------
# One target file


def target_path(out: Path, spec: TargetSpec) -> Path:
    return out / "targets" / f"{spec.key}.safetensors"


def _rows_digest(rows: Sequence[torch.Tensor]) -> str:
    """SHA-256 of the rows' fp32 bytes, in encoder order: safetensors has no checksum, and a
    flipped bit in the data would otherwise pass for a learned target."""
    digest = hashlib.sha256()
    for tensor in rows:
        digest.update(tensor.float().contiguous().numpy().tobytes())
    return digest.hexdigest()


def write_target(path: Path, spec: TargetSpec, result: dict, settings: dict, **facts) -> Path:
    """Atomically write one target: rows "rows.E" (K, d_E) and its facts as metadata (with
    the rows' SHA-256, which `read_target` checks)."""
    from safetensors.torch import save_file

    from ..io import atomic_path

    tensors = {f"rows.{e}": v.float().contiguous() for e, v in enumerate(result["vectors"])}
    metadata = {
        "format": TARGET_FORMAT,
        "rows_sha256": _rows_digest(list(tensors.values())),
        "key": spec.key,
        "identity": spec.identity.name,
        "class_word": spec.identity.class_word(),
        "image_set": str(spec.image_set),
        "steps": str(result["steps_done"]),
        "final_loss": json.dumps(result["final_loss_ema"]),
        "nonfinite_steps": str(result["nonfinite_steps"]),
        "settings": json.dumps(settings, sort_keys=True),
        **{name: json.dumps(value) for name, value in facts.items()},
    }
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path


def read_target(path: Path, spec: TargetSpec, settings: dict, widths: Sequence[int]) -> dict:
    """Read and check one target file.

    Returns:
        {"vectors": per text encoder (K, d) fp32, "final_loss", "seconds", "steps"}.

    Raises:
        OnewordError: with the reason the file cannot be used (missing, unreadable,
        another target's, other settings, wrong shapes, rows that do not match their
        checksum, non-finite rows).
    """
    from safetensors import safe_open

    if not path.is_file():
        raise OnewordError("missing")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as error:  # a truncated or overwritten file
        raise OnewordError(f"unreadable ({type(error).__name__}: {error})") from None
    if metadata.get("format") != TARGET_FORMAT or metadata.get("key") != spec.key:
        raise OnewordError(f"not the target {spec.key} (format/key {metadata.get('key')!r})")
    if json.loads(metadata.get("settings", "{}")) != settings:
        raise OnewordError("made with other settings")
    vectors = []
    for e, width in enumerate(widths):
        rows = tensors.get(f"rows.{e}")
        if rows is None or tuple(rows.shape) != (settings["vectors"], width):
            raise OnewordError(
                f"rows.{e} has shape {None if rows is None else tuple(rows.shape)}, expected "
                f"({settings['vectors']}, {width})"
            )
        vectors.append(rows)
    expected = metadata.get("rows_sha256")  # absent in files from before the checksum
    if expected is not None and _rows_digest(vectors) != expected:
        raise OnewordError("damaged: its rows do not match their checksum (rows_sha256)")
    for e, rows in enumerate(vectors):
        if not bool(torch.isfinite(rows).all()):
            raise OnewordError(f"rows.{e} holds non-finite values")
    final_loss = json.loads(metadata.get("final_loss", "null"))
    return {
        "vectors": vectors,
        "final_loss": math.nan if final_loss is None else float(final_loss),
        "seconds": float(json.loads(metadata.get("seconds", "nan"))),
        "steps": int(metadata["steps"]),
    }


# ---------------------------------------------------------------------------------------
# The factory


class _JsonLines:
    """Append-only JSON lines (one record per line, flushed at once). A line torn by a killed
    run is ended with a newline on open, so it stays one unreadable line (`_read_records`
    skips it) instead of swallowing the next record."""

    def __init__(self, path: Path):
        from ..io import write_failed

        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.is_file() and path.stat().st_size:
                with open(path, "rb+") as handle:
                    handle.seek(-1, os.SEEK_END)
                    if handle.read(1) != b"\n":
                        handle.write(b"\n")
        except OSError as error:
            raise write_failed(path, error) from None

    def write(self, record: dict) -> None:
        from ..io import write_failed

        try:
            with open(self.path, "a") as handle:
                handle.write(json.dumps(record) + "\n")
        except OSError as error:  # a full disk: one line naming the file, not a traceback
            raise write_failed(self.path, error) from None


def _read_records(path: Path) -> list[dict]:
    """The records of a JSON-lines file; lines torn by a kill are skipped."""
    records = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def _interrupted(log_path: Path) -> set[str]:
    """Targets whose UNet batch the log shows started ("learning") but never finished
    ("chunk"): the work a killed run lost."""
    started, finished = set(), set()
    for record in _read_records(log_path):
        if record.get("event") == "learning":
            started.update(record.get("targets", []))
        elif record.get("event") == "chunk":
            finished.update(record.get("targets", []))
    return started - finished


def _check_settings_file(out: Path, settings: dict, resume: bool, is_main: bool) -> None:
    """OUT/factory.json: the settings of the targets in OUT; a restart must match them."""
    from ..io import atomic_write_text

    info = out / "factory.json"
    if info.is_file():
        try:
            stored = json.loads(info.read_text())
        except ValueError:
            raise OnewordError(
                f"{info} is not readable JSON (the factory's settings); restore it or choose a "
                "new --out"
            ) from None
        # Only the main process refuses an existing factory on a fresh start: the others may
        # see the file it has just written.
        if not resume and is_main:
            raise OnewordError(
                f"{out} already holds a target factory; pass --resume to continue it, or "
                "choose a new --out"
            )
        changed = [k for k in RESUME_KEYS if stored.get(k) != settings[k]]
        if changed:
            diff = ", ".join(f"{k}: {stored.get(k)!r} -> {settings[k]!r}" for k in changed)
            raise OnewordError(
                f"--resume {out}: the factory was started with other settings ({diff}); use "
                "the same ones or a new --out"
            )
    elif is_main:
        atomic_write_text(info, json.dumps(settings, indent=2, sort_keys=True) + "\n")


def run_factory(
    model,
    config: FactoryConfig,
    out: str | os.PathLike,
    *,
    rank: int = 0,
    world_size: int = 1,
    resume: bool = False,
    max_chunks: int | None = None,
    say: Callable[[str], None] | None = None,
) -> dict:
    """Learn this rank's share of the targets; assemble the table once all are done.

    Args:
        model: a `LoadedModel` of the world (placeholders are added to it).
        config: `FactoryConfig`.
        out: the factory's folder (see the module docstring for what goes in it).
        rank, world_size: this process's share: the chunks c with c % world_size == rank.
        resume: continue a factory in `out` (its settings must match).
        max_chunks: stop after learning this many chunks (a deliberate interruption).
        say: where one-line notices go (default: stderr).

    Returns:
        {"learned", "skipped", "redone" (keys), "chunks", "seconds", "concept_steps_per_s",
        "table" (path or None: not all targets are done yet)}.
    """
    from tqdm.auto import tqdm

    from ..datasets.suite import concept_image_set
    from ..inversion import ConceptSpec, invert_together

    config.check()
    if not 0 <= rank < world_size:
        raise OnewordError(f"rank {rank} is not in [0, {world_size})")
    say = say or (lambda text: print(text, file=sys.stderr))
    out = Path(out)
    settings = _settings(config, model)
    _check_settings_file(out, settings, resume, rank == 0)
    specs = target_specs(factory_identities(config.identities), config.image_sets)
    chunks = [
        specs[i : i + config.batch_concepts] for i in range(0, len(specs), config.batch_concepts)
    ]
    mine = [c for index, c in enumerate(chunks) if index % world_size == rank]
    log = _JsonLines(out / "log" / f"rank-{rank}.jsonl")
    interrupted = _interrupted(log.path)  # before this run's records
    manifest = _JsonLines(out / "manifest" / f"rank-{rank}.jsonl")
    log.write({"event": "start", "rank": rank, "world_size": world_size, "settings": settings,
               "targets": len(specs), "chunks": len(chunks), "my_chunks": len(mine),
               "batch_concepts": config.batch_concepts, "resume": resume,
               "commit": code_version(), "model_sha256": checkpoint_digest(model.source)})  # fmt: skip

    # 1. What is left: every target of this share without a valid file.
    todo, skipped, redone = [], [], []
    for chunk in mine:
        left = []
        for spec in chunk:
            path = target_path(out, spec)
            try:
                read_target(path, spec, settings, model.widths)
                skipped.append(spec.key)
                continue
            except OnewordError as reason:
                if str(reason) != "missing":
                    redone.append(spec.key)
                    log.write({"event": "redo", "target": spec.key, "reason": str(reason)})
                    say(f"target {spec.key}: {path} is {reason}; learning it again")
            left.append(spec)
        if left:
            todo.append(left)
    if skipped and not resume:
        raise OnewordError(f"{out} already holds targets of this share; pass --resume")
    if resume:
        left = [s.key for chunk in todo for s in chunk]
        lost = [key for key in left if key in interrupted]
        log.write({"event": "resume", "kept": len(skipped), "left": len(left),
                   "interrupted": lost})  # fmt: skip
        notice = f"resuming {out}: {len(skipped)} finished targets kept, {len(left)} to learn"
        if lost:
            shown = ", ".join(lost[:8]) + (f" and {len(lost) - 8} more" if len(lost) > 8 else "")
            notice += f"; interrupted by the last run's stop, so learned again: {shown}"
        say(notice)

    # 2. Learn the chunks, one UNet batch each; write each target as soon as it is learned.
    inversion = config.inversion_config()
    bar = tqdm(
        total=sum(map(len, todo)), disable=config.quiet, unit="target", desc=f"targets r{rank}"
    )
    learned, started, chunks_done = [], time.perf_counter(), 0
    from PIL import Image

    for chunk in todo:
        if max_chunks is not None and chunks_done >= max_chunks:
            break
        tic = time.perf_counter()
        # Logged before the work: a restart after a kill names the targets it learns again.
        log.write({"event": "learning", "targets": [s.key for s in chunk]})
        concept_specs = []
        for spec in chunk:
            _, pixels = concept_image_set(
                spec.identity, config.images, spec.image_set, model.resolution
            )  # (n, 3, H, W) uint8
            images = [Image.fromarray(p.permute(1, 2, 0).numpy()) for p in pixels]
            concept_specs.append(
                ConceptSpec(
                    spec.key,
                    images,
                    token=f"<oneword-target-{next(_TOKEN_NUMBERS)}>",  # new in this model
                    init_text=spec.identity.class_word(),
                    class_word=spec.identity.class_word(),
                )
            )
        results = invert_together(model, concept_specs, inversion)
        seconds = time.perf_counter() - tic
        for spec, result in zip(chunk, results):
            path = write_target(
                target_path(out, spec),
                spec,
                result,
                settings,
                seconds=seconds / len(chunk),
                concepts_per_batch=len(chunk),
            )
            manifest.write({"target": spec.key, "file": str(path.relative_to(out)),
                            "final_loss": result["final_loss_ema"],
                            "seconds": seconds / len(chunk), "rank": rank})  # fmt: skip
            learned.append(spec.key)
        log.write({"event": "chunk", "targets": [s.key for s in chunk], "seconds": seconds,
                   "concept_steps_per_s": len(chunk) * config.steps / seconds})  # fmt: skip
        chunks_done += 1
        bar.update(len(chunk))
    bar.close()
    elapsed = time.perf_counter() - started

    # 3. The table, by whichever process finds every target done (each rank writes all of
    # its files before it looks, so the last one to finish sees them all).
    table = None
    if chunks_done == len(todo):
        try:
            table = assemble_table(out, specs, settings, model.widths)
        except OnewordError as missing:
            say(f"rank {rank}: its share is done; the table waits for the others ({missing})")
    summary = {
        "event": "end",
        "rank": rank,
        "learned": learned,
        "skipped": skipped,
        "redone": redone,
        "chunks": chunks_done,
        "seconds": elapsed,
        "concept_steps_per_s": len(learned) * config.steps / elapsed if learned else None,
        "table": str(table) if table else None,
    }
    log.write(summary)
    return summary


def assemble_table(
    out: Path, specs: Sequence[TargetSpec], settings: dict, widths: Sequence[int]
) -> Path:
    """Gather every target file into OUT/targets.safetensors (atomic); raises `OnewordError`
    naming the first target that is not done."""
    from safetensors.torch import save_file

    from ..io import atomic_path

    found = []
    for spec in specs:
        try:
            found.append(read_target(target_path(out, spec), spec, settings, widths))
        except OnewordError as reason:
            raise OnewordError(f"target {spec.key} is {reason}") from None
    tensors = {
        f"rows.{e}": torch.stack([t["vectors"][e] for t in found]).contiguous()
        for e in range(len(widths))
    }  # (N, K, d_e)
    tensors["image_set"] = torch.tensor([s.image_set for s in specs], dtype=torch.int64)
    tensors["steps"] = torch.tensor([t["steps"] for t in found], dtype=torch.int64)
    tensors["final_loss"] = torch.tensor([t["final_loss"] for t in found], dtype=torch.float32)
    tensors["seconds"] = torch.tensor([t["seconds"] for t in found], dtype=torch.float32)
    metadata = {
        "format": TABLE_FORMAT,
        "identities": json.dumps([s.identity.name for s in specs]),
        "class_words": json.dumps([s.identity.class_word() for s in specs]),
        "settings": json.dumps(settings, sort_keys=True),
    }
    path = out / TABLE_NAME
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path


# ---------------------------------------------------------------------------------------
# Reading the table


@dataclass
class TargetTable:
    """The target dataset, one row per (identity, image set).

    Attributes:
        rows: per text encoder, (N, K, d_e) fp32 rows learned by classic inversion.
        names: N identity names; class_words: their class words.
        image_sets: (N,) int64 scene seeds of the images each target was learned from.
        steps: (N,) int64; final_loss: (N,) fp32 (the loss EMA at the end); seconds: (N,).
        settings: the factory's settings (steps, images per set, seed, lr, model, ...).
    """

    rows: list[torch.Tensor]
    names: list[str]
    class_words: list[str]
    image_sets: torch.Tensor
    steps: torch.Tensor
    final_loss: torch.Tensor
    seconds: torch.Tensor
    settings: dict

    def __len__(self) -> int:
        return len(self.names)

    def select(self, indices: Sequence[int]) -> TargetTable:
        """The rows at `indices`, in that order."""
        index = torch.tensor(list(indices), dtype=torch.int64)
        return TargetTable(
            rows=[r[index] for r in self.rows],
            names=[self.names[i] for i in indices],
            class_words=[self.class_words[i] for i in indices],
            image_sets=self.image_sets[index],
            steps=self.steps[index],
            final_loss=self.final_loss[index],
            seconds=self.seconds[index],
            settings=dict(self.settings),
        )


def load_targets(path: str | os.PathLike) -> TargetTable:
    """Read a target table (a factory folder or its targets.safetensors).

    Returns:
        `TargetTable`; raises `OnewordError` naming the file for anything else.
    """
    from safetensors import safe_open

    path = Path(path)
    if path.is_dir():
        path = path / TABLE_NAME
    if not path.is_file():
        raise OnewordError(
            f"--targets {path}: no such file; make it with make_targets.py --out DIR "
            "(the table is DIR/targets.safetensors once every target is done)"
        )
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as error:
        raise OnewordError(f"--targets {path}: unreadable ({type(error).__name__})") from None
    if metadata.get("format") != TABLE_FORMAT:
        raise OnewordError(
            f"--targets {path}: format {metadata.get('format')!r}, expected {TABLE_FORMAT!r}"
        )
    try:
        names = json.loads(metadata["identities"])
        rows = [tensors[f"rows.{e}"] for e in range(sum(k.startswith("rows.") for k in tensors))]
        table = TargetTable(
            rows=rows,
            names=names,
            class_words=json.loads(metadata["class_words"]),
            image_sets=tensors["image_set"],
            steps=tensors["steps"],
            final_loss=tensors["final_loss"],
            seconds=tensors["seconds"],
            settings=json.loads(metadata["settings"]),
        )
    except (KeyError, ValueError) as error:
        raise OnewordError(f"--targets {path}: incomplete target table ({error})") from None
    columns = [*rows, table.image_sets, table.steps, table.final_loss, table.seconds]
    if (
        not rows
        or any(len(c) != len(names) for c in columns)
        or len(table.class_words) != len(names)
    ):
        raise OnewordError(f"--targets {path}: its columns and identities disagree in number")
    return table


def image_set_spread(table: TargetTable) -> dict | None:
    """How well a target is determined by its identity: the mean distance between the
    targets of one identity (its image sets), against the mean distance between targets of
    different identities, over all text encoders' rows. A ratio near 0: the identity decides
    the target (a regression can learn it); near 1: the image set matters as much.

    Returns:
        {"within_identity", "between_identities", "ratio"}, or None without any identity
        that has two targets.
    """
    flat = torch.cat([rows.flatten(1) for rows in table.rows], dim=1).float()  # (N, sum K d)
    distances = torch.cdist(flat, flat)  # (N, N)
    names = table.names
    same = torch.tensor([[a == b for b in names] for a in names])
    off_diagonal = ~torch.eye(len(names), dtype=torch.bool)
    within, between = distances[same & off_diagonal], distances[~same]
    if within.numel() == 0 or between.numel() == 0:
        return None
    return {
        "within_identity": float(within.mean()),
        "between_identities": float(between.mean()),
        "ratio": float(within.mean() / between.mean().clamp_min(1e-12)),
    }


def identity_from_name(name: str) -> world.Identity:
    """ "teal-hexagon-striped" -> Identity("hexagon", "teal", "striped") (world values have
    no hyphen)."""
    parts = name.split("-")
    if len(parts) != 3:
        raise OnewordError(f"{name!r} is not a world identity name (colour-shape-pattern)")
    colour, shape, pattern = parts
    return world.Identity(shape, colour, pattern)


class TargetRegression:
    """What regression onto the targets reads: for target i, the tower features of the
    images it was learned from (its image set, rendered again), computed on first use and
    kept in memory on the CPU, so training needs neither the UNet nor the VAE.

    Args:
        table: the `TargetTable`.
        featurizer: `Featurizer` (its `FeatureCache`, if any, also keeps them on disk).
        resolution: the model's image side.
        device: where `rows` and the batches go.
    """

    def __init__(self, table: TargetTable, featurizer, resolution: int, device):
        self.table = table
        self.featurizer = featurizer
        self.resolution = resolution
        self.device = device
        self.images = int(table.settings["images"])
        self.rows = [r.to(device) for r in table.rows]  # per encoder (N, K, d)
        self._features: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._latents: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def _pixels(self, index: int) -> tuple[torch.Tensor, list[str]]:
        from ..datasets.suite import concept_image_set

        name, image_set = self.table.names[index], int(self.table.image_sets[index])
        _, pixels = concept_image_set(
            identity_from_name(name), self.images, image_set, self.resolution
        )  # (n, 3, H, W) uint8
        return pixels, [f"target:{name}@{image_set}:{k}" for k in range(self.images)]

    def features(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Target `index`'s images -> pooled (n, p) and tokens (n, t, w), fp32 on the CPU."""
        if index not in self._features:
            pixels, keys = self._pixels(index)
            pooled, tokens = self.featurizer.features(pixels, keys, [True] * self.images)
            self._features[index] = (pooled.float().cpu(), tokens.float().cpu())
        return self._features[index]

    def latents(
        self, picks: list[int], views: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """VAE posterior mean and std of `views` random images of each picked target (the
        images it was learned from), each (len(picks) * views, c, h, w) fp32 on `device`,
        target-major. Computed on first use per target and kept on the CPU."""
        if views > self.images:
            raise OnewordError(
                f"--targets {views} is more than the {self.images} images each target was "
                "learned from"
            )
        means, stds = [], []
        for index in picks:
            if index not in self._latents:
                pixels, keys = self._pixels(index)
                mean, std = self.featurizer.latent_distribution(pixels, keys, [True] * self.images)
                self._latents[index] = (mean.float().cpu(), std.float().cpu())
            chosen = torch.randperm(self.images, generator=generator)[:views]
            means.append(self._latents[index][0][chosen])
            stds.append(self._latents[index][1][chosen])
        return torch.cat(means).to(self.device), torch.cat(stds).to(self.device)

    def batch(
        self, size: int, references: int, generator: torch.Generator
    ) -> tuple[list[int], torch.Tensor, torch.Tensor]:
        """`size` random targets, each with `references` of its images (random, distinct).

        Returns:
            (target indices, pooled (size, references, p), tokens (size, references, t, w)).
        """
        if references > self.images:
            raise OnewordError(
                f"--references {references} is more than the {self.images} images each target "
                "was learned from"
            )
        picks = torch.randint(len(self.table), (size,), generator=generator).tolist()
        pooled, tokens = [], []
        for index in picks:
            chosen = torch.randperm(self.images, generator=generator)[:references]
            p, t = self.features(index)
            pooled.append(p[chosen])
            tokens.append(t[chosen])
        return picks, torch.stack(pooled).to(self.device), torch.stack(tokens).to(self.device)


__all__ = [
    "PLATEAU_STEPS",
    "TargetRegression",
    "identity_from_name",
    "image_set_spread",
    "FactoryConfig",
    "TargetSpec",
    "TargetTable",
    "assemble_table",
    "factory_identities",
    "load_targets",
    "model_fingerprint",
    "read_target",
    "run_factory",
    "target_specs",
    "write_target",
]
