"""Pretrain the concept encoder: a few images of an identity -> the rows of a new word.

The encoder (`oneword.encoder.model`) reads N reference images through a frozen CLIP image
tower and predicts K rows per text encoder. It is trained through the frozen diffusion
model, with the objective of textual inversion (Eq. 2 of Gal et al., 2023) averaged over
identities instead of optimised per concept (as in E4T/ELITE-style encoders):

    L = E_{identity, t, eps} || eps - eps_theta(z_t, t, c_theta(y(S*))) ||^2     (M target views)
      + reg_weight     * mean_k ||v_k - c_k||^2 / ||c_k||^2                   (stay near the class word)
      + distill_weight * mean_k ||v_k - v*_k||^2 / ||c_k||^2                  (optional, toward
                                                                               classic inversion)

S* = the predicted rows v (placed in template prompts through the placeholder path, see
`with_placeholder_rows`), z = VAE latents of M *other* images of the same identity (so the
encoder must capture the identity, not one image's layout), c = the class word's rows and
v* = rows learned by classic inversion for that identity (`--distill DIR`).

--objective regress replaces the denoising term by a regression onto a target table
(`make_targets.py`: classic inversion of every training identity on several image sets):

    L = E_target mean_k ||v_k - v*_k||^2 / ||c_k||^2 + reg_weight * (offset term)

where v is predicted from N of the images v* was learned from, through the frozen tower
only (features computed once and cached): no UNet, no VAE in the loop. With --regress-space
text the two are compared after the frozen text encoder instead, on one template prompt per
target: ||h(v) - h(v*)||^2 / ||h(c) - h(v*)||^2 (1 = no better than the class word); start it
from a rows run (--init-encoder): from the class word, a fresh head first runs to its offset
bound. With --regress-space unet they are compared through the frozen UNet, on M (--targets)
of the target's own images at a random timestep: sum ||eps(v) - eps(v*)||^2 / sum ||eps(c) -
eps(v*)||^2, the denoising loss without the noise's variance (three UNet forwards, one
backward). --objective mix adds
regress_weight times it to the denoising loss. --init-encoder starts from an encoder file
(e.g. a regression run, then the denoising loss). The plan and commands for the world:
docs/encoder-plan.md. Validation (and every choice) is on the world's validation split,
never the test split, and no validation or test identity is ever trained on.

Defaults: reg_weight 1e-3 (the offset term is at most alpha^2; the shipped encoder's
recipe). Beside the denoising loss it is not small: on the world the loss moves by ~0.001
between good and bad tokens, the term is ~0.005 at classic's distances, and it pulls a
regressed start back to the class word (offset ratio 4.7 -> 0.6 in 300 steps; with
--reg-weight 0 it stays near 3, and validation editability alone was +6.7 +- 2.6 points:
docs/encoder-plan.md, round 5). distill_weight 0.1 when --distill is given (on the
world the distillation term starts near 10 and dominates the loss: the denoising loss moves
by ~0.001 between good and bad tokens), AdamW lr 3e-4 with 500 warmup steps, 8 identities
x (4 references + 4 targets) per step. --offset-scale (alpha) bounds ||v - c|| by alpha
||c||: classic inversion's tokens on the world lie 4.2-6.3 ||c|| from the class word, so the
world's encoder uses alpha 6 (the default 1 confines it to a ball none of them is in; the
"distill_targets" record of log.jsonl and a warning report this for any --distill folder).

The ablation on the world is `benchmarks/ablate_encoder.sh` (targets, arms, evaluation on
held-out concepts; the README has the measured table):

    python -c "from oneword.datasets.suite import write_world_suite as w; \\
        from oneword.datasets.world import training_identities as t; \\
        w('runs/ablate-encoder/train-suite', identities=t()[::7])"
    oneword invert --model checkpoints/world --concepts runs/ablate-encoder/train-suite \\
        --init object --steps 500 --no-samples --seed 0 --out runs/ablate-encoder/distill
    python train_encoder.py --preset world-cpu --model checkpoints/world --steps 1500 \\
        --offset-scale 6 --distill runs/ablate-encoder/distill --distill-weight 0.1 \\
        --out runs/ablate-encoder/arm-distill0.1-offset6

(every 7th training identity: 100 concepts, 500 steps in batches of 8, ~27 minutes at two
threads; identities without a target train on the other terms only).

Training the world's encoder on a 2-core CPU (the preset sets --offset-scale 6; add
--distill DIR for the shipped encoder's recipe, see checkpoints/README.md):

    python train_encoder.py --preset world-cpu --model checkpoints/world --out runs/encoder

`benchmarks/bench_encoder_data.py` measured 0.71 s per step for 8 identities x (4 + 4)
views on the world's architecture at one CPU thread (90 training images/s; the world source
alone renders ~5,000 images/s, so training is compute-bound): the preset's 1,500 steps take
about 17 minutes plus validation (use --threads 2 once nothing else runs on the machine).
Watch val's loss_gain and oracle identity in log.jsonl; continue with --resume --steps N
while they still improve (on the world they did not: 3,500 steps gave no better held-out
identity than 1,500, see the README's ablation).

Outputs in --out: encoder.safetensors (the final encoder; config in its metadata),
checkpoints/step-XXXXXX/ (head + optimizer + step + data-stream state; pickle-free),
log.jsonl (config, loader throughput, training and validation records) and val/*.png.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from oneword.encoder.data import NEVER_TRAIN_NAMES, make_source, mix_seed
from oneword.encoder.features import FeatureCache, Featurizer, load_tower
from oneword.encoder.losses import (
    denoising_draws,
    text_space_regression,
    unet_space_regression,
)
from oneword.encoder.model import (
    ConceptEncoder,
    EncoderConfig,
    EncoderOutput,
    class_word_rows,
    save_encoder,
    with_placeholder_rows,
)
from oneword.encoder.targets import (
    TargetRegression,
    TargetTable,
    image_set_spread,
    load_targets,
)
from oneword.errors import OnewordError
from oneword.inversion import checkpoint as ckpt
from oneword.inversion.objective import denoising_loss, draw_timesteps, scale_latents
from oneword.inversion.templates import fill, load_templates
from oneword.io import prepare_out_dir
from oneword.models import DEFAULT_MODEL
from oneword.prompts import encode_prompts
from oneword.provenance import checkpoint_digest, code_version
from oneword.tokens import add_placeholder, expand_prompt, set_rows


@dataclass
class TrainConfig:
    """Every setting of a run; logged at the start and stored in every checkpoint."""

    model: str = DEFAULT_MODEL  # the frozen diffusion model (a world folder or any SD folder)
    out: str = "runs/encoder"
    data: str = "world"  # world | shards:PATTERN | folders:DIR (see oneword.encoder.data)
    tower: str = "world"  # image tower spec (see oneword.encoder.features)
    # The encoder head (EncoderConfig).
    vectors: int = 1  # K rows per text encoder
    dim: int = 128
    queries: int = 4
    heads: int = 4
    mlp_ratio: int = 2
    offset_scale: float = 1.0  # alpha: ||v - c|| <= alpha ||c||
    # Data: per process and micro-step, `batch` identities with N references + M targets.
    batch: int = 8
    references: int = 4
    targets: int = 4
    augment: bool = False  # random crop/flip/jitter of every view
    workers: int = 0  # DataLoader worker processes (0: load in the training process)
    shuffle: int = 1000  # shard sample shuffle buffer
    max_error_rate: float = 0.1  # stop when more shard samples than this fraction are bad
    class_word: str = "object"  # class word for data without one
    templates: str = "object"  # prompt templates: object, style or a file
    # Objective.
    reg_weight: float = 1e-3
    distill: str | None = None  # folder of <identity>/learned_embeds.safetensors
    distill_weight: float = 0.1
    # denoise: the denoising loss through the frozen UNet on the data stream (+ --distill);
    # regress: no UNet: the rows regressed onto --target-table's classic targets from the
    # tower features of the images each was learned from (cached in memory); mix: both,
    # denoise + regress_weight * regress. The default stays denoise until validation says.
    objective: str = "denoise"
    target_table: str | None = None  # make_targets.py's table: a folder or targets.safetensors
    regress_weight: float = 1.0  # weight of the regression term with --objective mix
    # Where the regression compares prediction and target: "rows" (the word embeddings,
    # ||v - v*||^2 / ||c||^2) or "text" (the frozen text encoder's output for a template
    # prompt holding the word, relative to the class word's: errors weigh by what the UNet's
    # cross-attention reads, not equally in every direction of the embedding).
    regress_space: str = "rows"
    # Start the head from an encoder file of the same shape (e.g. a regression run, then a
    # run on the denoising loss through the UNet, E4T-style); None: a fresh head.
    init_encoder: str | None = None
    # Optimisation.
    steps: int = 20000
    lr: float = 3e-4
    weight_decay: float = 0.01
    warmup: int = 500
    lr_schedule: str = "constant"  # constant after warmup, or cosine down to 10% at --steps
    grad_accum: int = 1
    max_grad_norm: float = 1.0  # 0: no clipping
    mixed_precision: str = "auto"  # auto (bf16 on CUDA, no on CPU), no, fp16, bf16
    precision: str | None = None  # the frozen model's precision on a GPU (bf16/fp16/fp32)
    seed: int = 0
    max_nonfinite: int = 10  # abort after this many skipped (non-finite) steps in a row
    # Logging, checkpoints, validation.
    log_every: int = 50
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2
    val_every: int = 1000  # 0: only at the end
    val_suite: str | None = None  # default: the world's validation split; "none": no validation
    val_concepts: int = 8
    val_draws: int = 16  # fixed (image, template, t, noise) draws per concept for the val loss
    val_samples: int = 4  # oracle samples per concept ("a photo of <t>")
    val_sample_steps: int = 20
    tensorboard: bool = False
    cache_features: str | None = None
    log_keys: bool = False  # per-rank files of the image keys each step read (debugging)
    probe_batches: int = 3  # batches read by the loader alone to measure its throughput
    threads: int = 0  # torch CPU threads (0: torch's default)
    device: str = "auto"  # auto, cpu or cuda
    quiet: bool = False

    def check(self) -> None:
        positive = ("vectors", "batch", "references", "targets", "steps", "grad_accum")
        positive += ("log_every", "checkpoint_every", "keep_checkpoints", "val_concepts")
        positive += ("val_draws", "val_samples", "val_sample_steps", "probe_batches")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise OnewordError(
                    f"--{name.replace('_', '-')} must be a positive integer, got {value!r}"
                )
        if self.objective not in ("denoise", "regress", "mix"):
            raise OnewordError(
                f"--objective must be denoise, regress or mix, got {self.objective!r}"
            )
        if self.objective != "denoise" and not self.target_table:
            raise OnewordError(
                f"--objective {self.objective} needs --target-table (made by make_targets.py)"
            )
        if self.regress_space not in ("rows", "text", "unet"):
            raise OnewordError(
                f"--regress-space must be rows, text or unet, got {self.regress_space!r}"
            )
        names = ("reg_weight", "distill_weight", "weight_decay", "max_grad_norm", "warmup")
        for name in names + ("regress_weight",):
            if not getattr(self, name) >= 0:
                raise OnewordError(f"--{name.replace('_', '-')} must be >= 0")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise OnewordError(f"--lr must be a positive number, got {self.lr}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise OnewordError(
                f"--lr-schedule must be constant or cosine, got {self.lr_schedule!r}"
            )
        if self.mixed_precision not in ("auto", "no", "fp16", "bf16"):
            raise OnewordError(
                f"--mixed-precision must be auto, no, fp16 or bf16, got {self.mixed_precision!r}"
            )
        if self.device not in ("auto", "cpu", "cuda"):
            raise OnewordError(f"--device must be auto, cpu or cuda, got {self.device!r}")


PRESETS: dict[str, dict] = {
    # Seconds on a CPU with a tiny world; for tests and first contact. Quality: none.
    "tiny": dict(
        steps=4,
        batch=2,
        references=2,
        targets=2,
        dim=32,
        queries=2,
        heads=2,
        warmup=1,
        log_every=1,
        checkpoint_every=2,
        val_every=4,
        val_concepts=2,
        val_draws=2,
        val_samples=2,
        val_sample_steps=2,
        probe_batches=1,
        shuffle=10,
    ),
    # The miniature world on a 2-core CPU: ~0.7 s per step at one thread (about 17 minutes).
    # offset_scale 6: classic inversion's tokens on the world lie 4.2-6.3 ||c|| away.
    # steps 1,500: trained on to 3,500 the held-out identity did not rise (README ablation).
    "world-cpu": dict(
        steps=1500, batch=8, references=4, targets=4, threads=1, val_every=500, offset_scale=6.0
    ),
}

# Settings a resumed run must share with the run it continues (--steps may grow).
RESUME_KEYS = (
    "model", "data", "tower", "vectors", "dim", "queries", "heads", "mlp_ratio", "offset_scale",
    "batch", "references", "targets", "augment", "templates", "reg_weight", "distill",
    "distill_weight", "objective", "target_table", "regress_weight", "regress_space", "init_encoder", "lr", "weight_decay", "warmup", "lr_schedule", "grad_accum", "seed",
)  # fmt: skip


# ---------------------------------------------------------------------------------------
# Helpers


def lr_factor(cfg: TrainConfig, step: int) -> float:
    """Linear warmup, then constant (or cosine down to 10% at --steps)."""
    if cfg.warmup and step < cfg.warmup:
        return (step + 1) / cfg.warmup
    if cfg.lr_schedule == "cosine":
        progress = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
    return 1.0


def weights_digest(module: torch.nn.Module) -> str:
    """SHA-1 of every parameter's bytes (to compare ranks or runs bitwise)."""
    digest = hashlib.sha1()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class JsonLog:
    """Append-only JSON lines (one record per line, flushed at once)."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path = path
        self.enabled = enabled
        if enabled:
            path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as handle:
                handle.write(json.dumps(record) + "\n")


def logged_step(path: Path) -> int:
    """The last training step an (interrupted) run logged to `path` (0 if none)."""
    reached = 0
    with contextlib.suppress(OSError):
        for line in path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict) and record.get("event") == "train":
                    reached = max(reached, int(record.get("step", 0)))
    return reached


def open_tensorboard(cfg: TrainConfig, out: Path, is_main: bool):
    if not (cfg.tensorboard and is_main):
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        print(
            "train_encoder.py: --tensorboard: tensorboard is not installed "
            "(pip install 'oneword[tensorboard]'); continuing without it",
            file=sys.stderr,
        )
        return None
    return SummaryWriter(str(out / "tensorboard"))


def save_checkpoint(folder: Path, step: int, head, optimizer, state: dict, keep: int) -> Path:
    """Atomic, pickle-free: head weights + optimizer tensors (safetensors) + state (JSON)."""
    from safetensors.torch import save_file

    from oneword import io as oneword_io

    tensors = {f"head.{k}": v for k, v in head.state_dict().items()}
    optimizer_tensors, optimizer_state = ckpt.optimizer_tensors(optimizer)
    tensors |= optimizer_tensors
    final = folder / ckpt.checkpoint_name(step)
    try:
        with oneword_io.atomic_dir(final) as tmp:
            save_file(
                {k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                str(tmp / "state.safetensors"),
                metadata={"config": json.dumps(state["config"]), "encoder": head.config.to_json()},
            )
            (tmp / "state.json").write_text(json.dumps({**state, "optimizer": optimizer_state}))
            for file in tmp.iterdir():
                oneword_io.fsync_path(file)
    except OSError as error:  # disk full, ...: one line, and say what is still there
        kept = [p.name for p in ckpt.list_checkpoints(folder)]
        reason = error.strerror or str(error)
        raise OnewordError(
            f"cannot write checkpoint {final.name} in {folder}: {reason.split(': ', 1)[-1]}; "
            + (f"the earlier checkpoints are kept ({', '.join(kept)})" if kept else "none written")
        ) from None
    for old in ckpt.list_checkpoints(folder)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_distill_targets(cfg: TrainConfig, model) -> dict[str, list[torch.Tensor]]:
    """identity name -> per text encoder (K, d) rows learned by classic inversion."""
    if not cfg.distill:
        return {}
    from oneword.embeddings import load_embedding

    root = Path(cfg.distill)
    files = sorted(root.glob("*/learned_embeds.safetensors"))
    if not files:
        raise OnewordError(
            f"--distill {root}: no <identity>/learned_embeds.safetensors inside; make them with "
            "oneword invert --concepts SUITE --out DIR"
        )
    # Targets of validation or test identities are left out (the encoder never trains on
    # them); folders made before the validation split existed may hold some.
    kept = [file for file in files if file.parent.name not in NEVER_TRAIN_NAMES]
    if len(kept) < len(files):
        left_out = sorted(file.parent.name for file in files if file not in kept)
        print(
            f"train_encoder.py: --distill {root}: {len(left_out)} target(s) of validation or "
            f"test identities left out ({', '.join(left_out[:4])}{', ...' if len(left_out) > 4 else ''})",
            file=sys.stderr,
        )
    targets = {}
    for file in kept:
        embedding = load_embedding(file)
        if embedding.widths != list(model.widths) or embedding.num_vectors != cfg.vectors:
            raise OnewordError(
                f"{file}: {embedding.describe()}, but the encoder predicts K={cfg.vectors} rows "
                f"of widths {model.widths}"
            )
        targets[file.parent.name] = [v.to(model.device) for v in embedding.vectors]
    return targets


def load_target_table(cfg: TrainConfig, model, is_main: bool = True) -> TargetTable:
    """--target-table, less any row of a validation or test identity, checked against the model."""
    table = load_targets(cfg.target_table)
    keep = [i for i, name in enumerate(table.names) if name not in NEVER_TRAIN_NAMES]
    if len(keep) < len(table) and is_main:
        print(
            f"train_encoder.py: --target-table {cfg.target_table}: {len(table) - len(keep)} "
            "row(s) of validation or test identities left out",
            file=sys.stderr,
        )
    if not keep:
        raise OnewordError(f"--target-table {cfg.target_table}: no row of a training identity")
    table = table.select(keep)
    widths = [r.shape[-1] for r in table.rows]
    vectors = table.rows[0].shape[1]
    if widths != list(model.widths) or vectors != cfg.vectors:
        raise OnewordError(
            f"--target-table {cfg.target_table}: rows of K={vectors}, widths {widths}; the "
            f"encoder predicts K={cfg.vectors} rows of widths {list(model.widths)}"
        )
    return table


def target_reach(
    targets: dict[str, list[torch.Tensor]], class_rows: list[torch.Tensor], offset_scale: float
) -> dict | None:
    """How far the distillation targets lie from the class word, in units of its norm.

    The encoder's rows stay within `offset_scale` * ||c|| of the class word c; a target
    beyond that cannot be reached, and the distillation term then only pulls the
    prediction to the edge of the ball. Returns quantiles of ||v* - c|| / ||c|| (over
    targets and text encoders) and the share of targets beyond `offset_scale`.
    """
    if not targets:
        return None
    ratios = torch.stack(
        [
            (v.float().cpu() - c.float().cpu()).norm() / c.float().cpu().norm().clamp_min(1e-12)
            for rows in targets.values()
            for v, c in zip(rows, class_rows)
        ]
    )
    quantiles = torch.quantile(ratios, torch.tensor([0.0, 0.5, 1.0]))
    return {
        "offset_over_class_norm": dict(zip(("min", "median", "max"), quantiles.tolist())),
        "beyond_offset_scale": (ratios > offset_scale).float().mean().item(),
        "offset_scale": offset_scale,
    }


def flat(batch: dict, name: str) -> tuple[torch.Tensor, list, list[bool]]:
    """(B, V, 3, H, W) views -> (B V, 3, H, W), their keys and whether each may be cached."""
    views = batch[name]
    keys = [k for row in batch[name.rstrip("s") + "_keys"] for k in row]
    per_view = views.shape[1]
    usable = [
        key is not None and not augmented
        for key, augmented in zip(keys, [a for a in batch["augmented"] for _ in range(per_view)])
    ]
    return views.flatten(0, 1), keys, usable


def measure_loader(cfg: TrainConfig, make, batches: int) -> dict:
    """Images/s of the data loader alone: a fresh copy of the source, read for a few batches."""
    source = make()
    loader = torch.utils.data.DataLoader(source, batch_size=None, num_workers=cfg.workers)
    iterator = iter(loader)
    started = time.perf_counter()
    next(iterator)  # the first batch also pays for worker start-up
    first = time.perf_counter()
    for _ in range(batches - 1):
        next(iterator)
    done = time.perf_counter()
    del iterator
    per_batch = cfg.batch * (cfg.references + cfg.targets)
    if batches > 1:
        rate = per_batch * (batches - 1) / max(done - first, 1e-9)
    else:
        rate = per_batch / max(done - started, 1e-9)
    return {
        "loader_images_per_s": rate,
        "loader_batches": batches,
        "loader_startup_s": first - started,
    }


# ---------------------------------------------------------------------------------------
# Validation


class Validator:
    """Loss of the predicted word vs the class word on held-out concepts, and oracle identity.

    Every validation uses the same draws (image, template, timestep, noise) per concept, so
    the numbers are comparable across steps. The oracle part needs <model>/oracle/.
    """

    def __init__(self, cfg: TrainConfig, model, featurizer: Featurizer, suite_dir: Path, out: Path):
        from oneword.datasets.suite import read_suite
        from oneword.images import images_to_tensor, load_images

        self.cfg, self.model, self.featurizer, self.out = cfg, model, featurizer, out
        self.templates = load_templates(cfg.templates)
        self.concepts = read_suite(suite_dir)[: cfg.val_concepts]
        self.pixels, self.draws, self.placeholders = [], [], []
        for index, concept in enumerate(self.concepts):
            pixels = images_to_tensor(load_images(concept.images, model.resolution))  # (n, 3, H, W)
            self.pixels.append(pixels)
            generator = torch.Generator().manual_seed(mix_seed("val", cfg.seed, concept.name))
            uint8 = ((pixels + 1) * 127.5).round().to(torch.uint8)
            mean, std = featurizer.latent_distribution(
                uint8, [None] * len(pixels), [False] * len(pixels)
            )
            which = torch.randint(len(pixels), (cfg.val_draws,), generator=generator)
            eps = torch.randn((cfg.val_draws, *mean.shape[1:]), generator=generator)
            self.draws.append(
                {
                    "latents": scale_latents(model, mean[which] + std[which] * eps.to(mean.device)),
                    "templates": torch.randint(
                        len(self.templates), (cfg.val_draws,), generator=generator
                    ).tolist(),
                    "timesteps": draw_timesteps(model, cfg.val_draws, generator).to(model.device),
                    "noise": torch.randn((cfg.val_draws, *mean.shape[1:]), generator=generator).to(
                        model.device
                    ),
                }
            )
            zeros = [torch.zeros(cfg.vectors, w) for w in model.widths]
            self.placeholders.append(
                add_placeholder(
                    model, f"<oneword-val-{index}>", "object", cfg.vectors, init_rows=zeros
                )
            )
        self.oracle = None
        oracle_dir = Path(model.extra.get("folder", "")) / "oracle"
        if (oracle_dir / "config.json").is_file():
            from oneword.world.oracle import Oracle

            try:
                self.oracle = Oracle.load(oracle_dir, model.device)
            except (OnewordError, RuntimeError) as error:  # e.g. a world made by an older oneword
                print(
                    f"train_encoder.py: validation without the oracle ({oracle_dir}: {error})",
                    file=sys.stderr,
                )

    def _loss(self, draws, word: str, placeholder=None) -> float:
        prompts = [fill(self.templates[t], word) for t in draws["templates"]]
        if placeholder is not None:
            prompts = [expand_prompt(p, [placeholder]) for p in prompts]
        embeds = encode_prompts(self.model, prompts)
        loss = denoising_loss(
            self.model, draws["latents"], embeds, draws["noise"], draws["timesteps"]
        )
        return float(loss.loss.mean())

    @torch.no_grad()
    def __call__(self, head, step: int) -> dict:
        from oneword.images import save_grid, tensor_to_images
        from oneword.sampling import generate

        model, cfg = self.model, self.cfg
        head.eval()
        encoder_losses, class_losses, grid, labels = [], [], [], []
        oracle_hits = {"shape": 0, "colour": 0, "pattern": 0, "identity": 0}
        oracle_total = 0
        for concept, pixels, draws, placeholder in zip(
            self.concepts, self.pixels, self.draws, self.placeholders
        ):
            # 1. Predict the word from all of the concept's images.
            uint8 = ((pixels + 1) * 127.5).round().to(torch.uint8)
            pooled, tokens = self.featurizer.features(
                uint8, [None] * len(uint8), [False] * len(uint8)
            )
            class_rows = [
                r.unsqueeze(0) for r in class_word_rows(model, concept.class_word, cfg.vectors)
            ]
            rows = [r[0] for r in head(pooled.unsqueeze(0), tokens.unsqueeze(0), class_rows).rows]
            set_rows(model, placeholder, rows)
            # 2. Denoising loss with the word vs with the class word, on the same draws.
            encoder_losses.append(self._loss(draws, placeholder.token, placeholder))
            class_losses.append(self._loss(draws, concept.class_word))
            # 3. Samples of "a photo of <t>" and the oracle's reading of them.
            images = generate(
                model,
                [f"a photo of {placeholder.token}"],
                placeholders=[placeholder],
                num_per_prompt=cfg.val_samples,
                steps=cfg.val_sample_steps,
                seed=cfg.seed,
            )
            references = tensor_to_images(pixels[: cfg.val_samples])
            grid += references + [
                references[0].copy() for _ in range(cfg.val_samples - len(references))
            ]
            grid += images
            labels += [f"{concept.name}: images", f"'a photo of <t>' (step {step})"]
            attributes = concept.attributes or {}
            if self.oracle is not None and all(
                a in attributes for a in ("shape", "colour", "pattern")
            ):
                from oneword.images import images_to_tensor

                samples = ((images_to_tensor(images) + 1) * 127.5).round().to(torch.uint8)
                predicted = self.oracle.predict(samples)
                for i in range(len(images)):
                    right = {
                        a: predicted[a][i] == attributes[a] for a in ("shape", "colour", "pattern")
                    }
                    for a, ok in right.items():
                        oracle_hits[a] += int(ok)
                    oracle_hits["identity"] += int(all(right.values()))
                oracle_total += len(images)
        head.train()
        grid_path = save_grid(
            grid, self.out / "val" / f"step-{step:06d}.png", columns=cfg.val_samples, labels=labels
        )
        record = {
            "event": "val",
            "step": step,
            "concepts": len(self.concepts),
            "loss_encoder": sum(encoder_losses) / len(encoder_losses),
            "loss_classword": sum(class_losses) / len(class_losses),
            "grid": str(grid_path),
        }
        record["loss_gain"] = record["loss_classword"] - record["loss_encoder"]
        if oracle_total:
            record["oracle"] = {k: v / oracle_total for k, v in oracle_hits.items()}
            record["oracle_samples"] = oracle_total
        return record


def default_val_suite(cfg: TrainConfig, model, stack: contextlib.ExitStack) -> Path | None:
    """--val-suite ("none": no validation), else for a world its validation split (temp
    folder): choices are made there, the test split is only for reported numbers."""
    if cfg.val_suite == "none":
        return None
    if cfg.val_suite:
        return Path(cfg.val_suite)
    folder = Path(model.extra.get("folder", ""))
    if not (folder / "world.json").is_file():
        return None
    from oneword.datasets.suite import write_world_suite
    from oneword.datasets.world import VALIDATION

    temp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="oneword-val-")))
    return write_world_suite(
        temp / "suite", resolution=model.resolution, seed=cfg.seed, identities=VALIDATION
    )


# ---------------------------------------------------------------------------------------
# Training


def train(cfg: TrainConfig, *, resume: bool = False) -> dict:
    """Run (or resume) a pretraining run; returns the final summary record."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, gather_object

    from oneword.models import load_model

    cfg.check()
    out = Path(cfg.out)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    cuda = torch.cuda.is_available() and cfg.device != "cpu"
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise OnewordError("--device cuda, but no CUDA device is available")
    mixed = cfg.mixed_precision if cfg.mixed_precision != "auto" else ("bf16" if cuda else "no")

    # 1. Accelerate: one process per device; each rank reads its own data stream. Checkpoints
    # are our own (`save_checkpoint`: only the head, pickle-free), not `save_state`, whose
    # `load_state` unpickles; the project configuration only names the output folders.
    accelerator = Accelerator(
        mixed_precision=mixed,
        gradient_accumulation_steps=cfg.grad_accum,
        project_config=ProjectConfiguration(
            project_dir=str(out), logging_dir=str(out / "tensorboard")
        ),
        cpu=not cuda,
    )
    rank, world_size, is_main = (
        accelerator.process_index,
        accelerator.num_processes,
        accelerator.is_main_process,
    )
    # Before the model loads: a bad --out, or one another run owns, fails in a second.
    owned = prepare_out_dir(out, rank=rank)  # noqa: F841 (held for the run's life)
    checkpoints = out / "checkpoints"
    if not resume and ckpt.list_checkpoints(checkpoints):
        latest = ckpt.list_checkpoints(checkpoints)[-1].name
        raise OnewordError(
            f"{checkpoints} holds checkpoints of an earlier run (latest {latest}); pass --resume "
            "to continue it, or choose a new --out"
        )
    if resume:
        ckpt.latest_checkpoint(checkpoints)  # fail before any work if there is nothing to resume
    if is_main:  # a run killed while writing a checkpoint left its half-written folder
        ckpt.remove_half_written(checkpoints)
    log = JsonLog(out / "log.jsonl", enabled=is_main)
    rank_log = JsonLog(out / "ranks" / f"rank-{rank}.jsonl", enabled=cfg.log_keys)

    # 2. The frozen model and image tower; the encoder head.
    model = load_model(cfg.model, device=accelerator.device, precision=cfg.precision)
    tower = load_tower(
        cfg.tower, model_folder=model.extra.get("folder"), device=model.device, dtype=model.dtype
    )
    encoder_config = EncoderConfig(
        tower=cfg.tower,
        pooled_dim=tower.pooled_dim,
        token_dim=tower.token_dim,
        family=model.family,
        widths=tuple(model.widths),
        num_vectors=cfg.vectors,
        dim=cfg.dim,
        queries=cfg.queries,
        heads=cfg.heads,
        mlp_ratio=cfg.mlp_ratio,
        offset_scale=cfg.offset_scale,
    )
    torch.manual_seed(cfg.seed)  # the same initial head on every rank
    head = ConceptEncoder(encoder_config)
    if cfg.init_encoder and not resume:  # a resumed run restores its own head below
        from oneword.encoder.model import load_encoder

        start = load_encoder(cfg.init_encoder)
        if start.config != encoder_config:
            raise OnewordError(
                f"--init-encoder {cfg.init_encoder}: its config {start.config} is not this "
                f"run's {encoder_config}; give the same --dim/--queries/--heads/--vectors/"
                "--offset-scale"
            )
        head.load_state_dict(start.state_dict())
    head = head.to(model.device).train()

    # 3. One placeholder slot per identity of a micro-batch; the predicted rows go there.
    zeros = [torch.zeros(cfg.vectors, width) for width in model.widths]
    slots = [
        add_placeholder(model, f"<oneword-slot-{i}>", "object", cfg.vectors, init_rows=zeros)
        for i in range(cfg.batch)
    ]
    templates = load_templates(cfg.templates)
    distill_targets = load_distill_targets(cfg, model)
    class_rows_cache: dict[str, list[torch.Tensor]] = {}

    def sample_latents(mean, std, generator) -> torch.Tensor:
        """A draw from the VAE posterior, scaled for the denoiser (SD3/FLUX: (z - shift) *
        scale, 16 channels)."""
        noise = torch.randn(mean.shape, generator=generator).to(mean.device)
        return scale_latents(model, mean + std * noise)

    def class_rows_of(word: str) -> list[torch.Tensor]:
        if word not in class_rows_cache:
            class_rows_cache[word] = [
                r.to(model.device) for r in class_word_rows(model, word, cfg.vectors)
            ]
        return class_rows_cache[word]

    # 4. Optimizer; Accelerate wraps the head in DDP when there are several processes.
    optimizer = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    head, optimizer = accelerator.prepare(head, optimizer)
    plain_head = accelerator.unwrap_model(head)

    # 5. Data: each rank its own stream (world/folders: its own seed; shards: its own shards).
    def make():
        return make_source(
            cfg.data,
            batch_size=cfg.batch,
            references=cfg.references,
            targets=cfg.targets,
            resolution=model.resolution,
            seed=cfg.seed,
            rank=rank,
            world_size=world_size,
            augment=cfg.augment,
            workers=cfg.workers,
            shuffle=cfg.shuffle,
            max_error_rate=cfg.max_error_rate,
            default_class_word=cfg.class_word,
        )

    stream = cfg.objective != "regress"  # the data stream feeds the denoising loss only
    source = make() if stream else None
    cache = None
    if cfg.cache_features:
        if cfg.data == "world":
            print(
                "train_encoder.py: --cache-features is ignored for --data world (every image is new)",
                file=sys.stderr,
            )
        else:
            fingerprint = {
                "tower": cfg.tower,
                "model": model.extra.get("folder", cfg.model),
                "resolution": model.resolution,
            }
            fingerprint |= {"dtype": str(model.dtype), "data": cfg.data}
            cache = FeatureCache(cfg.cache_features, fingerprint)
    featurizer = Featurizer(tower, model, cache)
    regression = None
    if cfg.objective != "denoise":
        table_cache = None
        if cfg.cache_features:
            fingerprint = {
                "tower": cfg.tower,
                "model": model.extra.get("folder", cfg.model),
                "resolution": model.resolution,
                "dtype": str(model.dtype),
                "data": "target-table",
            }
            table_cache = FeatureCache(Path(cfg.cache_features) / "targets", fingerprint)
        regression = TargetRegression(
            load_target_table(cfg, model, is_main),
            Featurizer(tower, model, table_cache),
            model.resolution,
            model.device,
        )

    # 6. Resume: head, optimizer, step and the data stream's position.
    step, stats = 0, {"skipped_steps": 0, "nonfinite_in_row": 0, "seconds": 0.0, "images": 0}
    if resume:
        path = ckpt.latest_checkpoint(checkpoints)
        tensors, state = ckpt.load_checkpoint(path)
        # A key missing from an older run's checkpoint did not exist then: that run had the
        # field's default behaviour.
        stored = {**asdict(TrainConfig()), **state["config"]}
        changed = [k for k in RESUME_KEYS if stored.get(k) != getattr(cfg, k)]
        if changed:
            diff = ", ".join(f"{k}: {stored.get(k)!r} -> {getattr(cfg, k)!r}" for k in changed)
            raise OnewordError(
                f"--resume from {path}: the run was started with other settings ({diff}); use the "
                "same settings (only --steps and logging options may change) or a new --out"
            )
        if state.get("world_size", 1) != world_size:
            raise OnewordError(
                f"--resume from {path}: it ran on {state.get('world_size')} process(es), this run on "
                f"{world_size}; the data streams are per rank, so use the same number"
            )
        plain_head.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("head.")})
        ckpt.restore_optimizer(optimizer, tensors, state["optimizer"])
        step, stats = state["step"], state["stats"]
        if source is not None:
            source.load_state_dict(state["data"][rank])
        if is_main:
            reached = logged_step(out / "log.jsonl")
            redo = (
                f"steps {step + 1}-{reached}, done after it by the interrupted run, are redone"
                if reached > step
                else "no finished step is redone"
            )
            print(
                f"train_encoder.py: resuming from {path.name} (step {step}); {redo}",
                file=sys.stderr,
            )
    else:  # a fresh run: logs of an earlier, checkpoint-less attempt are replaced
        if is_main:
            (out / "log.jsonl").unlink(missing_ok=True)
        (out / "ranks" / f"rank-{rank}.jsonl").unlink(missing_ok=True)
    resumed_from = step if resume else None

    stack = contextlib.ExitStack()
    validator = None
    if is_main:
        suite = default_val_suite(cfg, model, stack)
        if suite is not None:
            validator = Validator(cfg, model, featurizer, suite, out)
    tensorboard = open_tensorboard(cfg, out, is_main)
    log.write(
        {
            "event": "start",
            "config": asdict(cfg),
            "encoder": asdict(encoder_config),
            "model": model.describe(),
            "model_sha256": checkpoint_digest(cfg.model),
            "commit": code_version(),  # "+dirty": tracked files differed from the commit
            "world_size": world_size,
            "mixed_precision": mixed,
            "resumed_from": resumed_from,
            "head_parameters": sum(p.numel() for p in plain_head.parameters()),
            "validation": None if validator is None else [c.name for c in validator.concepts],
        }
    )
    if regression is not None:
        table = regression.table
        as_dict = {
            f"{name}@{int(table.image_sets[i])}": [rows[i] for rows in table.rows]
            for i, name in enumerate(table.names)
        }
        log.write(
            {
                "event": "target_table",
                "count": len(table),
                "identities": len(set(table.names)),
                "image_set_spread": image_set_spread(table),
                "settings": table.settings,
                **(target_reach(as_dict, class_rows_of(cfg.class_word), cfg.offset_scale) or {}),
            }
        )
    reach = target_reach(distill_targets, class_rows_of(cfg.class_word), cfg.offset_scale)
    if reach is not None:
        log.write({"event": "distill_targets", "count": len(distill_targets), **reach})
        if is_main and reach["beyond_offset_scale"] > 0:
            spread = reach["offset_over_class_norm"]
            print(
                f"train_encoder.py: {100 * reach['beyond_offset_scale']:.0f}% of the --distill "
                f"targets lie beyond --offset-scale {cfg.offset_scale:g} (||v* - c|| / ||c|| "
                f"from {spread['min']:.2f} to {spread['max']:.2f}, c = the {cfg.class_word!r} "
                "row): the encoder cannot reach them; raise --offset-scale above the maximum",
                file=sys.stderr,
            )

    # 7. The loader, and its own throughput (a separate copy, so the stream is untouched).
    loader_rate, batches, data_state = {}, None, {"next_batch": 0}
    if stream:
        loader_rate = measure_loader(cfg, make, cfg.probe_batches) if is_main else {}
        log.write({"event": "loader", **loader_rate})
        loader = torch.utils.data.DataLoader(source, batch_size=None, num_workers=cfg.workers)
        batches = iter(loader)
        data_state = source.state_dict()

    def checkpoint_state() -> dict:
        states = gather_object([data_state]) if world_size > 1 else [data_state]  # per rank
        return {
            "step": step,
            "config": asdict(cfg),
            "world_size": world_size,
            "data": states,
            "stats": stats,
        }

    views = (cfg.references + cfg.targets if stream else 0) + (cfg.references if regression else 0)
    images_per_step = world_size * cfg.grad_accum * cfg.batch * views
    bar = tqdm(
        total=cfg.steps, initial=step, disable=cfg.quiet or not is_main, unit="step", desc="encoder"
    )
    last_saved = step if resume else None
    step_times, window = [], []
    finite, grad_norm = True, None
    run_started = time.perf_counter()
    while step < cfg.steps:
        tic = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * lr_factor(cfg, step)
        for micro in range(cfg.grad_accum):
            inputs = []  # (pooled (b, N, p), tokens (b, N, t, w), class rows per encoder (b, K, d))
            batch, count = None, 0
            if stream:
                # 8. Data: B identities, N references and M targets each.
                batch = next(batches)
                data_state = {"next_batch": batch["batch_index"] + 1}
                count = len(batch["names"])
                if cfg.log_keys:
                    rank_log.write(
                        {"step": step, "micro": micro, "batch_index": batch["batch_index"], "names": batch["names"],
                         "keys": [k for row in batch["reference_keys"] + batch["target_keys"] for k in row]}
                    )  # fmt: skip
                pixels, keys, usable = flat(batch, "references")
                pooled, tokens = featurizer.features(pixels, keys, usable)
                pooled = pooled.view(count, cfg.references, -1)  # (B, N, p)
                tokens = tokens.view(count, cfg.references, *tokens.shape[1:])  # (B, N, t, w)
                class_rows = [
                    torch.stack([class_rows_of(w)[e] for w in batch["class_words"]])
                    for e in range(len(model.widths))
                ]  # per encoder (B, K, d)
                inputs.append((pooled, tokens, class_rows))
            picks = None
            if regression is not None:
                # 8b. Regression data: B targets, N of the images each was learned from.
                generator = torch.Generator().manual_seed(
                    mix_seed("regress", cfg.seed, rank, step, micro)
                )
                picks, pooled, tokens = regression.batch(cfg.batch, cfg.references, generator)
                class_rows = [
                    torch.stack([class_rows_of(regression.table.class_words[i])[e] for i in picks])
                    for e in range(len(model.widths))
                ]  # per encoder (B, K, d)
                inputs.append((pooled, tokens, class_rows))
            zero = torch.zeros((), device=model.device)
            loss_denoise, loss_reg, loss_distill, loss_regress = zero, zero, zero, zero
            with accelerator.accumulate(head):
                # 9. Forward: features -> encoder -> rows, in ONE call (DDP allows one forward
                # per backward): the stream's identities first, then the regression targets.
                with accelerator.autocast():
                    both = head(
                        torch.cat([i[0] for i in inputs]),
                        torch.cat([i[1] for i in inputs]),
                        [torch.cat([i[2][e] for i in inputs]) for e in range(len(model.widths))],
                    )
                loss_reg = both.offset_ratio().mean()
                loss = cfg.reg_weight * loss_reg
                if batch is not None:
                    # 10. The denoising loss through the frozen UNet on M target views.
                    output = EncoderOutput(
                        [r[:count] for r in both.rows], [c[:count] for c in both.class_rows]
                    )
                    pixels, keys, usable = flat(batch, "targets")
                    mean, std = featurizer.latent_distribution(
                        pixels, keys, usable
                    )  # (B M, 4, h, w)
                    generator = torch.Generator().manual_seed(
                        mix_seed("step", cfg.seed, rank, step, micro)
                    )
                    latents = sample_latents(mean, std, generator)  # (B M, c, h, w)
                    timesteps, noise, prompts = denoising_draws(
                        model, slots[:count], latents, templates, generator
                    )
                    view = with_placeholder_rows(model, slots[:count], output.rows)
                    denoise = denoising_loss(
                        model, latents, encode_prompts(view, prompts), noise, timesteps
                    ).loss
                    loss_denoise = denoise.mean()
                    loss = loss + loss_denoise
                    # (+ distillation toward --distill's classic rows, where an identity has one)
                    have = [i for i, name in enumerate(batch["names"]) if name in distill_targets]
                    if have and cfg.distill_weight > 0:
                        terms = []
                        for e, (rows, c) in enumerate(zip(output.rows, output.class_rows)):
                            target = torch.stack(
                                [distill_targets[batch["names"][i]][e] for i in have]
                            )
                            scale = c[have].pow(2).sum(-1).clamp_min(1e-12)
                            terms.append(((rows[have] - target).pow(2).sum(-1) / scale).mean())
                        loss_distill = torch.stack(terms).mean()
                        loss = loss + cfg.distill_weight * loss_distill
                if picks is not None and cfg.regress_space == "text":
                    # 10b. Regression onto the classic targets through the frozen text
                    # encoder (no UNet): ||h(v) - h(v*)||^2 / ||h(c) - h(v*)||^2 over one
                    # template prompt per target, h the text encoder's hidden states.
                    predicted = [r[count:] for r in both.rows]
                    loss_regress = text_space_regression(
                        model,
                        slots[: len(picks)],
                        predicted,
                        [r[picks] for r in regression.rows],
                        [c[count:] for c in both.class_rows],
                        templates,
                        generator,
                    )
                elif picks is not None and cfg.regress_space == "unet":
                    # 10b. Regression onto the classic targets through the frozen UNet:
                    # its prediction with the predicted rows against with the target rows,
                    # on M of the images each target was learned from.
                    mean, std = regression.latents(picks, cfg.targets, generator)
                    latents = sample_latents(mean, std, generator)  # (B M, c, h, w)
                    loss_regress = unet_space_regression(
                        model,
                        slots[: len(picks)],
                        [r[count:] for r in both.rows],
                        [r[picks] for r in regression.rows],
                        [c[count:] for c in both.class_rows],
                        latents,
                        templates,
                        generator,
                    )
                elif picks is not None:
                    # 10b. Regression onto the classic targets, no UNet:
                    # mean_k ||v_k - v*_k||^2 / ||c_k||^2, as the distillation term.
                    terms = []
                    for e, (rows, c) in enumerate(zip(both.rows, both.class_rows)):
                        target = regression.rows[e][picks]  # (B, K, d)
                        scale = c[count:].pow(2).sum(-1).clamp_min(1e-12)
                        terms.append(((rows[count:] - target).pow(2).sum(-1) / scale).mean())
                    loss_regress = torch.stack(terms).mean()
                if picks is not None:
                    loss = loss + (cfg.regress_weight if stream else 1.0) * loss_regress
                # 11. Backward; at the end of the accumulation: clip, skip non-finite, step.
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
                    grad_norm = float(accelerator.clip_grad_norm_(head.parameters(), max_norm))
                    finite = math.isfinite(grad_norm)  # the same on every rank (reduced gradients)
                    if finite:
                        optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
            window.append(
                {
                    "loss": loss.item(),
                    "denoise": loss_denoise.item(),
                    "reg": loss_reg.item(),
                    "distill": loss_distill.item(),
                    "regress": loss_regress.item(),
                }
            )
        if not finite:
            stats["skipped_steps"] += 1
            stats["nonfinite_in_row"] += 1
            if stats["nonfinite_in_row"] >= cfg.max_nonfinite:
                raise OnewordError(
                    f"the loss or its gradient was non-finite for {stats['nonfinite_in_row']} steps in a "
                    f"row (up to step {step + 1}); lower --lr, use --mixed-precision no, or check the data"
                )
        else:
            stats["nonfinite_in_row"] = 0
        step += 1
        seconds = time.perf_counter() - tic
        step_times.append(seconds)
        stats["seconds"] += seconds
        stats["images"] += images_per_step
        bar.update(1)

        # 12. Log, validate, checkpoint.
        if step % cfg.log_every == 0 or step == cfg.steps:
            means = {k: sum(r[k] for r in window) / len(window) for k in window[0]}
            record = {
                "event": "train",
                "step": step,
                **means,
                "lr": optimizer.param_groups[0]["lr"],
                "grad_norm": grad_norm,
                "seconds_per_step": seconds,
                "images_per_s": images_per_step / seconds,
                "unet_samples_per_s": (
                    world_size * cfg.grad_accum * cfg.batch * cfg.targets / seconds
                    if stream or cfg.regress_space == "unet"
                    else 0.0  # regression in rows or text space: no UNet
                ),
                "skipped_steps": stats["skipped_steps"],
                "data": batch["stats"] if batch is not None else None,
            }
            if cache is not None:
                record["cache"] = {"hits": cache.hits, "misses": cache.misses}
            log.write(record)
            # The objective's own term: regression alone has no denoising loss to show.
            shown = "denoise" if stream else "regress"
            bar.set_postfix({shown: f"{means[shown]:.4f}"}, refresh=False)
            if tensorboard is not None:
                for name in ("loss", "denoise", "reg", "distill", "regress", "lr", "images_per_s"):
                    tensorboard.add_scalar(f"train/{name}", record[name], step)
            window = []
        if validator is not None and (
            step == cfg.steps or (cfg.val_every and step % cfg.val_every == 0)
        ):
            record = validator(plain_head, step)
            log.write(record)
            if tensorboard is not None:
                for name in ("loss_encoder", "loss_classword", "loss_gain"):
                    tensorboard.add_scalar(f"val/{name}", record[name], step)
                for name, value in record.get("oracle", {}).items():
                    tensorboard.add_scalar(f"val/oracle_{name}", value, step)
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            state = checkpoint_state()  # every rank takes part in gathering the data states
            if is_main:
                save_checkpoint(
                    checkpoints, step, plain_head, optimizer, state, cfg.keep_checkpoints
                )
            last_saved = step
        accelerator.wait_for_everyone()
    bar.close()

    # 13. The final encoder (config in its metadata) and a summary.
    if last_saved != step:
        state = checkpoint_state()
        if is_main:
            save_checkpoint(checkpoints, step, plain_head, optimizer, state, cfg.keep_checkpoints)
    summary = {
        "event": "end",
        "step": step,
        "seconds_this_run": time.perf_counter() - run_started,
        "seconds_per_step": sum(step_times) / len(step_times) if step_times else None,
        "images_per_s": images_per_step * len(step_times) / sum(step_times) if step_times else None,
        **loader_rate,
        "skipped_steps": stats["skipped_steps"],
        "weights_sha1": weights_digest(plain_head),
    }
    if is_main:
        metadata = {"step": step, "base_model": cfg.model, "train_config": json.dumps(asdict(cfg))}
        summary["encoder"] = str(
            save_encoder(out / "encoder.safetensors", plain_head, metadata=metadata)
        )
    log.write(summary)
    rank_log.write(
        {"event": "end", "rank": rank, "step": step, "weights_sha1": summary["weights_sha1"]}
    )
    if tensorboard is not None:
        tensorboard.close()
    stack.close()
    accelerator.end_training()
    return summary


# ---------------------------------------------------------------------------------------
# Command line

EXAMPLES = """\
examples:
  # first contact: a few steps on the CPU (a tiny world: oneword world train --preset tiny)
  python train_encoder.py --preset tiny --model /tmp/w --out /tmp/enc

  # the miniature world, 2-core CPU (validation on its validation split, oracle scores)
  python train_encoder.py --preset world-cpu --model checkpoints/world --out runs/encoder

  # continue an interrupted run (the step count and the data stream continue)
  python train_encoder.py --preset world-cpu --model checkpoints/world --out runs/encoder --resume

  # world shards or img2dataset output, two GPUs, bf16, with distillation targets
  accelerate launch --num_processes 2 train_encoder.py --model checkpoints/world \\
      --data "shards:data/world/shard-{000000..000063}.tar" --workers 2 --distill runs/distill

  # SD 1.5 with OpenAI's ViT-L/14 image tower, image folders (one folder per identity)
  python train_encoder.py --model /models/sd15 --tower open_clip:ViT-L-14:openai \\
      --data folders:data/identities --cache-features /tmp/enc-cache --val-suite suites/dreambooth

  # CPU multi-process (gloo)
  torchrun --nproc_per_node 2 train_encoder.py --preset tiny --model /tmp/w --out /tmp/enc2

Settings: TrainConfig's defaults, then --preset, then --config FILE (JSON with the same
names), then the flags given. Outputs: OUT/encoder.safetensors, OUT/checkpoints/step-*/,
OUT/log.jsonl, OUT/val/step-*.png (and OUT/tensorboard/ with --tensorboard).
"""

HELP = {
    "model": "frozen diffusion model: a diffusers folder or hub id (default: %(default)s)",
    "out": "output folder (default: %(default)s)",
    "data": "world | shards:FOLDER_GLOB_OR_BRACES | folders:DIR (default: %(default)s)",
    "tower": "image tower: world | transformers:DIR | open_clip:NAME[:PRETRAINED] | open_clip:local-dir:/path",
    "vectors": "K rows per text encoder",
    "dim": "encoder head width",
    "queries": "learned queries per image (attention pooling)",
    "heads": "attention heads of the head",
    "mlp_ratio": "feed-forward width in units of --dim",
    "offset_scale": "alpha: the predicted row stays within alpha * ||class word row|| of it",
    "batch": "identities per process and micro-step",
    "references": "N images per identity the encoder sees",
    "targets": "M other images per identity for the denoising loss",
    "augment": "random crop, flip and colour jitter of every view",
    "workers": "DataLoader worker processes",
    "shuffle": "shard sample shuffle buffer",
    "max_error_rate": "stop when a larger fraction of shard samples is unreadable",
    "class_word": "class word for data that has none",
    "templates": "prompt templates: object, style or a file (one per line with {})",
    "reg_weight": "weight of mean ||v - c||^2 / ||c||^2",
    "distill": "folder of <identity>/learned_embeds.safetensors (oneword invert --concepts)",
    "distill_weight": "weight of the distillation term (with --distill)",
    "objective": "denoise (through the frozen UNet), regress (onto --target-table, no UNet) or mix",
    "target_table": "make_targets.py's target table (its --out folder or targets.safetensors)",
    "regress_weight": "weight of the regression term with --objective mix",
    "regress_space": "rows (the embeddings), text (the text encoder's output for a prompt) or "
    "unet (the UNet's prediction on the target's images: M = --targets views, 3 forwards)",
    "init_encoder": "start the head from this encoder file (same shape), e.g. a regression run's",
    "steps": "optimizer steps in all (a resumed run continues to this count)",
    "lr": "AdamW learning rate",
    "weight_decay": "AdamW weight decay",
    "warmup": "linear warmup steps",
    "lr_schedule": "constant or cosine (to 10% at --steps)",
    "grad_accum": "micro-steps per optimizer step",
    "max_grad_norm": "gradient clipping (0: off)",
    "mixed_precision": "auto, no, fp16 or bf16 (the head's autocast)",
    "precision": "frozen model precision on a GPU: bf16, fp16 or fp32",
    "seed": "seed of the data streams, noise and initial weights",
    "max_nonfinite": "abort after this many non-finite steps in a row",
    "log_every": "steps between log records",
    "checkpoint_every": "steps between checkpoints",
    "keep_checkpoints": "checkpoints kept",
    "val_every": "steps between validations (0: only at the end)",
    "val_suite": "concept suite for validation, or none (default for a world: its validation split)",
    "val_concepts": "suite concepts validated",
    "val_draws": "fixed denoising draws per concept",
    "val_samples": "'a photo of <t>' samples per concept (oracle, grid)",
    "val_sample_steps": "DDIM steps of those samples",
    "tensorboard": "also log to OUT/tensorboard (needs tensorboard installed)",
    "cache_features": "folder caching tower features and VAE latents of un-augmented images",
    "log_keys": "write OUT/ranks/rank-R.jsonl with the image keys of every step",
    "probe_batches": "batches read by the loader alone to measure its images/s",
    "threads": "torch CPU threads (0: default)",
    "device": "auto, cpu or cuda",
    "quiet": "no progress bar",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="train_encoder.py",
        description="Pretrain the concept encoder (images -> a new word) through a frozen diffusion model.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--preset", choices=sorted(PRESETS), help="a set of defaults: " + ", ".join(sorted(PRESETS))
    )
    parser.add_argument(
        "--config", type=Path, help="JSON file of TrainConfig fields (flags override it)"
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue the run in --out from its latest checkpoint"
    )
    defaults = TrainConfig()
    for field in fields(TrainConfig):
        flag = "--" + field.name.replace("_", "-")
        default = getattr(defaults, field.name)
        help_text = HELP[field.name].replace("%(default)s", str(default))
        if "(default" not in help_text:
            help_text += f" (default: {default})"
        help_text = help_text.replace("%", "%%")  # argparse formats help with %
        if isinstance(default, bool):
            parser.add_argument(
                flag,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=help_text,
            )
            continue
        kind = {int: int, float: float}.get(type(default), str)
        parser.add_argument(flag, type=kind, default=argparse.SUPPRESS, help=help_text)
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    cfg = TrainConfig()
    if args.preset:
        cfg = replace(cfg, **PRESETS[args.preset])
    if args.config:
        try:
            data = json.loads(Path(args.config).read_text())
        except (OSError, ValueError) as error:
            raise OnewordError(f"--config {args.config}: {error}") from None
        known = {f.name for f in fields(TrainConfig)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise OnewordError(f"--config {args.config}: unknown settings {unknown}")
        cfg = replace(cfg, **data)
    given = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    return replace(cfg, **given)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        train(config_from_args(args), resume=args.resume)
    except OnewordError as error:
        print(f"train_encoder.py: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("train_encoder.py: interrupted (continue with --resume)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
