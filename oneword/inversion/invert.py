"""Classic per-concept textual inversion (Gal et al., "An Image is Worth One Word", ICLR 2023).

A new word S* is added to the text encoder(s) and only its embedding rows v* are optimised
with Adam so that the frozen diffusion model, prompted with template captions containing
S*, denoises the concept's images well (Eq. 2 of the paper; see `objective.py`).

`invert` learns one concept; `invert_many` learns many in one job, several concepts per
UNet batch, each with its own placeholder, generator and optimizer state, so every concept
gets the same gradients it would get alone. Both run the loop in `_train`, which reads top
to bottom: draw -> encode -> denoise -> loss -> backward -> skip non-finite -> Adam step ->
log -> checkpoint.

Randomness (image and template choice, augmentation, latent sampling, timesteps, noise) is
drawn only from one explicit CPU `torch.Generator` per concept, in a fixed order, and its
state is checkpointed, so a resumed run is bitwise equal to an uninterrupted one on the CPU.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from ..errors import OnewordError
from ..images import fit_images
from ..tokens import (
    Placeholder,
    add_placeholder,
    expand_prompt,
    get_rows,
    placeholder_embedding,
    set_rows,
    trainable_rows,
)
from . import checkpoint as ckpt
from .objective import (
    ClipIdentityLoss,
    decode_latents,
    default_clip_model,
    denoising_loss,
    draw_timesteps,
    encode_prompts,
    predict_x0,
    scale_latents,
)
from .templates import OBJECT_SAMPLE_PROMPTS, STYLE_SAMPLE_PROMPTS, fill, load_templates

log = logging.getLogger("oneword.inversion")
ENCODER_CHOICES = ("all", "clip", "t5")


@dataclass
class InversionConfig:
    """Everything that decides a run; stored in log.json, checkpoints and the embedding file.

    The defaults were chosen on the tiny random models and from the paper; they will be
    re-tuned on the miniature world (`checkpoints/world`).
    """

    # Gal et al. train 5k steps; diffusers' example uses 3k, where most concepts have settled.
    steps: int = 3000
    # Adam on the new rows only. The paper uses a base lr of 5e-3 scaled by the total batch
    # (8 -> 0.04); unscaled 5e-3 with batch 4 is diffusers' default and stays stable in bf16.
    lr: float = 5e-3
    # Images (with their own prompt, timestep and noise) per concept per step.
    batch: int = 4
    # K vectors for the token (the paper: 1; more vectors fit more detail, edit worse).
    vectors: int = 1
    # Which text encoders learn the token: "all", "clip" (CLIP-L/G only) or "t5" (SD3 and
    # FLUX). The others still get the token as one new id, frozen at the initializer's rows,
    # so every encoder reads the word the same way at sampling time. "all" measured best on
    # the tiny SD3 and FLUX checks (docs/models.md).
    encoders: str = "all"
    # "object", "style" or a file with one template per line (see templates.py).
    templates: str = "object"
    # "a photo of a S* dog" instead of "a photo of a S*": ties the token to its class.
    class_word_cue: bool = False
    # Seeds the run's generator (all sampling of data, timesteps and noise).
    seed: int = 0
    # lambda for L_clip (1 - cosine to the concept's mean CLIP image feature); 0 = off, as
    # in the paper. Needs a CLIP tower: `clip_model` or <model>/image_encoder.
    clip_weight: float = 0.0
    clip_model: str | None = None
    # Pull toward the initial rows: weight * mean_k ||v_k - v_k^init||^2. Keeps the norm
    # from blowing up (tokens that ignore the rest of the prompt); 0 = off, as in the paper.
    l2_weight: float = 0.0
    # Random resized crop + colour jitter + flip per step (VAE encode per step). Off: the
    # latent distributions of the images and their mirror images are computed once.
    augment: bool = False
    # Stop when the EMA of the loss has not improved by min_delta for `patience` steps.
    early_stop: bool = False
    patience: int = 300
    min_delta: float = 1e-4
    ema_beta: float = 0.98  # EMA over ~50 steps: the per-step loss is very noisy (random t)
    # Checkpoint every N steps (and at the end) when an output folder is given.
    checkpoint_every: int = 500
    # Frozen parts' precision on a GPU ("bf16", "fp16", "fp32"); used when the CLI loads
    # the model. The learned rows are always fp32.
    precision: str | None = None
    quiet: bool = False
    # Abort after this many non-finite losses/gradients in a row (each one is skipped).
    max_nonfinite: int = 10
    # Sample grid after training: DDIM steps and images per prompt; samples=False skips it.
    samples: bool = True
    sample_steps: int = 30
    sample_seeds: int = 4

    def check(self) -> None:
        """Raise `OnewordError` for values that cannot work."""
        positive = {"steps": self.steps, "batch": self.batch, "vectors": self.vectors}
        positive |= {"checkpoint_every": self.checkpoint_every, "max_nonfinite": self.max_nonfinite}
        for name, value in positive.items():
            if not isinstance(value, int) or value < 1:
                raise OnewordError(
                    f"--{name.replace('_', '-')} must be a positive integer, got {value!r}"
                )
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise OnewordError(f"--lr must be a positive number, got {self.lr!r}")
        if self.clip_weight < 0 or self.l2_weight < 0:
            raise OnewordError("--clip-weight and --l2-weight must be >= 0")
        if self.encoders not in ENCODER_CHOICES:
            raise OnewordError(
                f"--encoders must be one of {', '.join(ENCODER_CHOICES)}, got {self.encoders!r}"
            )
        if self.precision not in (None, "bf16", "fp16", "fp32"):
            raise OnewordError(f"--precision must be bf16, fp16 or fp32, got {self.precision!r}")


# Settings a resumed run must share with the run it continues (steps may grow).
_RESUME_KEYS = (
    "lr", "batch", "vectors", "templates", "class_word_cue", "seed", "clip_weight",
    "l2_weight", "augment", "early_stop", "patience", "min_delta", "ema_beta", "encoders",
)  # fmt: skip


def trained_encoders(model, which: str = "all") -> list[bool]:
    """Per text encoder of `model`, whether `which` ("all", "clip", "t5") trains its rows.

    Raises:
        OnewordError: `which` selects no encoder of this model (e.g. "t5" on SDXL).
    """
    keys = getattr(model, "encoder_keys", None) or ("clip",) * len(model.text_encoders)
    mask = [which == "all" or key.startswith(which) for key in keys]
    if not any(mask):
        raise OnewordError(
            f"--encoders {which}: {model.source} ({model.family}) has no such text encoder "
            f"(it has {', '.join(keys)}); use --encoders all"
        )
    return mask


@dataclass
class ConceptSpec:
    """One concept for `invert_many`.

    Attributes:
        name: folder-safe name; outputs go to DIR/<name>/.
        images: PIL images or paths (files, folders, globs).
        token: the new word; default "<name>".
        init_text: initializer word(s); default the class word.
        class_word: e.g. "dog" (for the class-word cue and as the initializer).
        seed: the concept's generator seed; default the config's seed (as a single run).
    """

    name: str
    images: Sequence
    token: str | None = None
    init_text: str | None = None
    class_word: str | None = None
    seed: int | None = None


@dataclass
class InversionResult:
    """What `invert` returns.

    Attributes:
        token: the learned word.
        placeholder: its `Placeholder` (ids in the model, which keeps the learned rows).
        vectors: per text encoder, the learned (K, d) fp32 rows (CPU copies).
        log: the contents of log.json.
        files: name -> Path of each file written ("embedding", "samples", "log").
        snapshots: step -> (rows per text encoder at that step, seconds from the start of
            `invert` to that step), for the steps asked for with `snapshots=`.
    """

    token: str
    placeholder: Placeholder
    vectors: list[torch.Tensor]
    log: dict
    files: dict = field(default_factory=dict)
    snapshots: dict[int, tuple[list[torch.Tensor], float]] = field(default_factory=dict)


# --- helpers -------------------------------------------------------------------------------


def _write_json(path: Path, data: dict) -> Path:
    """Atomic JSON write (temporary file beside it, fsync, rename)."""
    from ..io import atomic_write_text

    return atomic_write_text(path, json.dumps(data, indent=2))


@torch.no_grad()
def _latent_distribution(model, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 3, H, W) in [-1, 1] -> mean and std of the VAE posterior, each (n, 4, h, w) fp32."""
    means, stds = [], []
    for chunk in pixels.split(8):
        posterior = model.vae.encode(chunk.to(model.dtype)).latent_dist
        means.append(posterior.mean.float())
        stds.append(posterior.std.float())
    return torch.cat(means), torch.cat(stds)


@dataclass
class PreparedImages:
    """A concept's images made ready once (`prepare_images`), for every stage that reads them:
    `invert` (refinement and fallback alike), `oneword encode`'s checks, the encoder.

    Attributes:
        images: the PIL images, fitted to the model's resolution.
        pixels: (n, 3, H, W) in [-1, 1], the model's dtype and device.
        model: the model whose VAE encodes them.
        latent_mean, latent_std: (2n, 4, h, w) fp32 VAE posterior of the images, then of
            their mirror images (what `invert` samples from with augmentation off), computed
            on first use and kept: the encoder alone never needs the VAE (it was 65% of its
            time on the world's CPU).
    """

    images: list
    pixels: torch.Tensor
    model: object = field(repr=False)
    _posterior: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    def posterior(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The VAE posterior's mean and std, each (2n, 4, h, w) fp32, encoded once."""
        if self._posterior is None:
            views = torch.cat([self.pixels, self.pixels.flip(-1)])  # (2n, 3, H, W)
            self._posterior = _latent_distribution(self.model, views)
        return self._posterior

    @property
    def latent_mean(self) -> torch.Tensor:
        return self.posterior()[0]

    @property
    def latent_std(self) -> torch.Tensor:
        return self.posterior()[1]


def prepare_images(model, images) -> PreparedImages:
    """Fit `images` (PIL images or paths, folders, globs) to `model`, once; their VAE posterior
    follows on first use. Pass the result wherever images are taken (`invert(model, prepared,
    ...)`)."""
    if isinstance(images, PreparedImages):
        return images
    from ..images import images_to_tensor

    fitted = fit_images(images, model.resolution)
    pixels = images_to_tensor(fitted).to(model.device, model.dtype)  # (n, 3, H, W)
    return PreparedImages(fitted, pixels, model)


def _augment(pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """`oneword.images.augment` on (b, 3, H, W) pixels in [-1, 1], in their dtype."""
    from ..images import augment

    return (augment((pixels.float() + 1) / 2, generator) * 2 - 1).to(pixels.dtype)


@dataclass
class _Concept:
    """The state of one concept during `_train` (everything a checkpoint must hold)."""

    name: str
    token: str
    class_word: str | None
    placeholder: Placeholder
    images: list
    pixels: torch.Tensor  # (n, 3, H, W) in [-1, 1], model dtype
    templates: list[str]
    generator: torch.Generator
    leaves: list[torch.Tensor]  # per encoder (K, d) fp32, what Adam updates
    init_rows: list[torch.Tensor]  # per encoder (K, d), the anchor of the L2 pull
    latent_mean: torch.Tensor | None = None  # (2n, 4, h, w): images then their mirrors
    latent_std: torch.Tensor | None = None
    clip_reference: torch.Tensor | None = None  # (p,)
    losses: list = field(default_factory=list)  # per step; None for a skipped step
    clip_losses: list = field(default_factory=list)
    nonfinite_in_row: int = 0
    nonfinite_total: int = 0
    ema: float | None = None
    best_ema: float = math.inf
    since_best: int = 0
    stopped_at: int | None = None

    def run_facts(self, model) -> dict:
        """What a resumed run must share with the run it continues (`ckpt.check_same_run`)."""
        return {
            "token": self.token,
            "images": image_hashes(self.images),
            "model": model_fingerprint(model),
            "templates": self.templates,
            "vectors": self.placeholder.num_vectors,
        }

    def scalars(self) -> dict:
        names = ("name", "token", "losses", "clip_losses", "nonfinite_in_row", "nonfinite_total")
        names += ("ema", "best_ema", "since_best", "stopped_at")
        out = {name: getattr(self, name) for name in names}
        out["best_ema"] = None if math.isinf(self.best_ema) else self.best_ema
        return out

    def load_scalars(self, state: dict) -> None:
        for name, value in state.items():
            if name not in ("name", "token"):
                setattr(self, name, value)
        if self.best_ema is None:
            self.best_ema = math.inf


def prompt_texts(config: InversionConfig, templates: list[str], class_word: str | None) -> list:
    """Every text the token is used in ("{}" = the token): the training templates and, with
    samples on, the sample-grid prompts, with the class-word cue filled in."""
    texts = list(templates)
    if config.samples:
        texts += STYLE_SAMPLE_PROMPTS if config.templates == "style" else OBJECT_SAMPLE_PROMPTS
    cue = class_word if config.class_word_cue else None
    return [fill(text, "{}", cue) for text in texts]


def check_prompts(model, token: str, config: InversionConfig, templates, class_word) -> None:
    """Refuse, before any work, a token that collides with the templates' words and more
    vectors than the templates leave room for in the text encoder."""
    from ..tokens import check_token_collisions, check_vectors_fit, sub_token_names

    texts = prompt_texts(config, templates, class_word)
    check_token_collisions(sub_token_names(token, config.vectors), texts, what="template")
    name = config.templates if config.templates in ("object", "style") else "your"
    check_vectors_fit(model, config.vectors, texts, what=f"the {name} templates")


# Saved activations per sample, in values per UNet feature-map element (channels * side^2,
# summed over the UNet's levels). Rough: calibrated on the miniature world (latent 16x16,
# widths 64/128/128, fp32, CPU), where the peak RSS of `oneword invert --steps 1` grew by
# 1.77 GiB from --batch 8 to --batch 128: 15.4 MiB per sample = 148 * 26,624 * 4 bytes.
_ACTIVATIONS_PER_ELEMENT = 148


def step_memory_estimate(model, batch: int) -> int:
    """A rough estimate (bytes) of one training step's denoiser activations at `batch` samples."""
    config = model.unet.config
    side = model.resolution // model.vae_scale
    itemsize = torch.empty((), dtype=model.dtype).element_size()  # bf16/fp16: half of fp32
    if "block_out_channels" not in config:  # the SD3/FLUX transformer
        # Korthikanti et al. 2022 (Reducing Activation Recomputation), Eq. 1: a transformer
        # layer keeps s*h*(34 + 5*a*s/h) bytes of 16-bit activations per sample (s tokens,
        # width h, a heads). Image tokens only (the text tokens add a few per cent); not
        # calibrated on a real SD3/FLUX run.
        tokens = (side // getattr(config, "patch_size", 1)) ** 2
        heads = config.num_attention_heads
        width = heads * config.attention_head_dim
        layers = config.num_layers + getattr(config, "num_single_layers", 0)
        per_layer = tokens * width * (34 + 5 * heads * tokens / width)
        return int(batch * layers * per_layer * itemsize / 2)
    elements = sum(
        channels * (side // 2**level) ** 2
        for level, channels in enumerate(config.block_out_channels)
    )
    return int(batch * elements * _ACTIVATIONS_PER_ELEMENT * itemsize)


def available_memory(device) -> int | None:
    """Free bytes on `device` (GPU: free memory; CPU: MemAvailable, which counts the page
    cache the kernel can drop, unlike MemFree), or None where unknown."""
    try:
        if torch.device(device).type == "cuda":
            return int(torch.cuda.mem_get_info(torch.device(device))[0])
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (ValueError, OSError, RuntimeError, AttributeError):
        return None
    return None


def check_batch(model, num_images: int, config: InversionConfig, *, name: str) -> None:
    """Warn when --batch exceeds the distinct views (each image and its mirror; any number with
    --augment) and refuse when the step would not fit in memory, with the estimate."""
    need = step_memory_estimate(model, config.batch)
    free = available_memory(model.device)
    views = 2 * num_images
    estimate = f"about {need / 2**30:.1f} GB of activations per step, roughly estimated"
    if free is not None and need > free:
        fit = max(1, int(config.batch * free / need))
        raise OnewordError(
            f"{name}: --batch {config.batch} needs {estimate}, but only {free / 2**30:.1f} GB "
            f"are free on {model.device}; pass --batch {min(fit, views)} or fewer"
        )
    if not config.augment and config.batch > views:
        log.warning(
            "%s: --batch %d with %d image(s) draws each of the %d views (images and mirrors) "
            "%.0f times per step: repeats that cost memory (%s) but add little; --batch %d "
            "is enough",
            name,
            config.batch,
            num_images,
            views,
            config.batch / views,
            estimate,
            views,
        )


def image_hashes(images) -> list[str]:
    """SHA-256 of each fitted image's pixels: what a resumed run must train on again."""
    import hashlib

    return [hashlib.sha256(image.tobytes()).hexdigest()[:16] for image in images]


def model_fingerprint(model) -> str:
    """The model folder and its shape: a resumed run must use the same model."""
    folder = model.extra.get("folder") if isinstance(model.extra, dict) else None
    where = os.path.realpath(folder) if folder else str(model.source)
    return f"{where} ({model.family}, widths {list(model.widths)}, {model.resolution}px)"


def _prepare(
    model, spec: ConceptSpec, config: InversionConfig, templates, clip, init_rows=None, source=None
):
    """Add the placeholder, fit the images and (augment off) cache their latent distributions
    (taken as they are from `PreparedImages`)."""
    token = spec.token or f"<{spec.name}>"
    check_prompts(model, token, config, templates, spec.class_word)
    prepared = spec.images if isinstance(spec.images, PreparedImages) else None
    images = prepared.images if prepared else fit_images(spec.images, model.resolution)
    check_batch(model, len(images), config, name=token)
    init_text = spec.init_text or spec.class_word
    if not init_text:
        raise OnewordError(
            f"concept {spec.name!r}: give an initializer word (--init, or 'class_word' in concept.json)"
        )
    if config.class_word_cue and not spec.class_word:
        raise OnewordError(
            f"concept {spec.name!r}: the class-word cue is on but no class word was given "
            "(--class-word, or 'class_word' in concept.json)"
        )
    placeholder = add_placeholder(
        model, token, init_text, config.vectors, init_rows=init_rows, source=source
    )
    from ..images import images_to_tensor

    if prepared is not None:
        pixels = prepared.pixels
    else:
        pixels = images_to_tensor(images).to(model.device, model.dtype)  # (n, 3, H, W)
    seed = config.seed if spec.seed is None else spec.seed
    concept = _Concept(
        name=spec.name,
        token=token,
        class_word=spec.class_word,
        placeholder=placeholder,
        images=images,
        pixels=pixels,
        templates=templates,
        generator=torch.Generator().manual_seed(seed),
        leaves=[
            rows.clone().requires_grad_(trained)
            for rows, trained in zip(
                get_rows(model, placeholder), trained_encoders(model, config.encoders)
            )
        ],
        init_rows=[rows.to(model.device) for rows in placeholder.init_rows],
    )
    if not config.augment:
        # The images and their mirror images, encoded once: sampling the cached posterior each
        # step is what encoding every step would give, without the VAE.
        if prepared is not None:
            concept.latent_mean, concept.latent_std = prepared.latent_mean, prepared.latent_std
        else:
            views = torch.cat([pixels, pixels.flip(-1)])  # (2n, 3, H, W)
            concept.latent_mean, concept.latent_std = _latent_distribution(model, views)
    if clip is not None:
        concept.clip_reference = clip.reference(pixels)
    return concept


def _draw(model, concept: _Concept, config: InversionConfig):
    """One concept's share of a step, drawn from its generator in a fixed order.

    Returns:
        latents (b, c, h, w) fp32 scaled, prompts (b), noise (b, c, h, w), timesteps (b,)
        (int64, or fp32 sigmas for flow models).
    """
    generator, batch, device = concept.generator, config.batch, model.device
    if concept.latent_mean is not None:
        views = torch.randint(concept.latent_mean.shape[0], (batch,), generator=generator)
        mean, std = concept.latent_mean[views.to(device)], concept.latent_std[views.to(device)]
    else:
        chosen = torch.randint(concept.pixels.shape[0], (batch,), generator=generator)
        views = _augment(concept.pixels[chosen.to(device)], generator)
        mean, std = _latent_distribution(model, views)
    template_ids = torch.randint(len(concept.templates), (batch,), generator=generator).tolist()
    cue = concept.class_word if config.class_word_cue else None
    prompts = [
        expand_prompt(fill(concept.templates[i], concept.token, cue), [concept.placeholder])
        for i in template_ids
    ]
    posterior_noise = torch.randn(mean.shape, generator=generator).to(device)
    latents = scale_latents(model, mean + std * posterior_noise)  # (b, c, h, w)
    timesteps = draw_timesteps(model, batch, generator).to(device)
    noise = torch.randn(mean.shape, generator=generator).to(device)
    return latents, prompts, noise, timesteps


def _row_offsets(model, placeholder: Placeholder) -> list[list[int]]:
    return [
        [i - placeholder_embedding(te).base_vocab for i in ids]
        for te, ids in zip(model.text_encoders, placeholder.ids)
    ]


def smoothed_loss(ema: float | None, losses: Sequence[float | None], beta: float) -> float | None:
    """The loss EMA that early stopping and the logs use, advanced over `losses` (skipped,
    non-finite steps are None); the first finite value starts it."""
    for value in losses:
        if value is not None:
            ema = value if ema is None else beta * ema + (1 - beta) * value
    return ema


def _l2_pull(model, concept: _Concept) -> torch.Tensor:
    """mean_k ||v_k - v_k^init||^2, summed over text encoders (differentiable)."""
    total = 0.0
    for te, offsets, init in zip(
        model.text_encoders, _row_offsets(model, concept.placeholder), concept.init_rows
    ):
        rows = placeholder_embedding(te).rows[offsets]  # (K, d)
        total = total + (rows - init).pow(2).sum(-1).mean()
    return total


def _save(folder, step, concepts, optimizer, config, stats, model) -> Path:
    tensors, rng = ckpt.rng_states({f"concept{i}": c.generator for i, c in enumerate(concepts)})
    for i, concept in enumerate(concepts):
        for e, (leaf, init) in enumerate(zip(concept.leaves, concept.init_rows)):
            tensors[f"concept.{i}.rows.{e}"] = leaf
            tensors[f"concept.{i}.init.{e}"] = init
    optimizer_tensors, optimizer_state = ckpt.optimizer_tensors(optimizer)
    tensors |= optimizer_tensors
    state = {
        "step": step,
        "config": asdict(config),
        "concepts": [c.scalars() for c in concepts],
        "run": [c.run_facts(model) for c in concepts],
        "optimizer": optimizer_state,
        "stats": stats,
        **rng,
    }
    return ckpt.save_checkpoint(folder, step, tensors, state)


def _load(folder, concepts, optimizer, config, stats, model) -> int:
    path = ckpt.latest_checkpoint(folder)
    tensors, state = ckpt.load_checkpoint(path)
    saved = state.get("config", {})
    changed = [k for k in _RESUME_KEYS if k in saved and saved[k] != getattr(config, k)]
    if changed:
        diff = ", ".join(f"{k}: {saved[k]!r} -> {getattr(config, k)!r}" for k in changed)
        raise OnewordError(
            f"--resume from {path}: the run was started with other settings ({diff}); "
            "use the same settings (only --steps may change) or a new --out"
        )
    names = [c["token"] for c in state.get("concepts", [])]
    if names != [c.token for c in concepts]:
        raise OnewordError(
            f"--resume from {path}: it holds tokens {names}, not {[c.token for c in concepts]}"
        )
    for saved_run, concept in zip(state.get("run") or [], concepts):
        ckpt.check_same_run(path, saved_run, concept.run_facts(model))
    from ..tokens import check_rows, vocabulary_norm

    for i, concept in enumerate(concepts):
        for e, text_encoder in enumerate(model.text_encoders):
            check_rows(
                tensors[f"concept.{i}.rows.{e}"],
                where=f"checkpoint {path}",
                token=concept.token,
                encoder=e,
                reference_norm=vocabulary_norm(text_encoder),
                error=OnewordError,
                advice="delete that folder to resume from the one before it",
            )
        with torch.no_grad():
            for e, leaf in enumerate(concept.leaves):
                leaf.copy_(tensors[f"concept.{i}.rows.{e}"])
                concept.init_rows[e] = tensors[f"concept.{i}.init.{e}"].to(leaf.device)
        concept.load_scalars(state["concepts"][i])
    ckpt.restore_optimizer(optimizer, tensors, state["optimizer"])
    ckpt.restore_rng_states(
        tensors, state, {f"concept{i}": c.generator for i, c in enumerate(concepts)}
    )
    stats |= state["stats"]
    stats["resumed_from_step"] = state["step"]
    log.info("resumed from %s", path)
    return state["step"]


# --- the loop ------------------------------------------------------------------------------


def _train(
    model,
    concepts: list[_Concept],
    config: InversionConfig,
    *,
    checkpoint_dir=None,
    resume=False,
    clip=None,
    snapshots: dict[int, tuple] | None = None,
    progress: Callable[[dict], None] | None = None,
) -> dict:
    """Optimise the concepts' rows together; returns timing and counters for log.json.

    `snapshots` (one concept only): a dict whose keys are steps; each is filled with
    (rows per text encoder, time.perf_counter() at that step) when the run passes it.
    `progress`: called after every step with {"stage": "invert", "step", "total", "loss"}
    (the loss EMA, None before the first finite step); an exception it raises ends the run.
    """
    # 1. The optimizer sees exactly these placeholders' rows: one leaf per concept and text
    # encoder, written into the shared `rows` parameter before each forward. Rows of other
    # placeholders in the model are never written and carry no optimizer state.
    # Encoders left out by --encoders keep their rows at the initializer: no gradient flows
    # into them (for T5 that also saves its backward pass) and Adam never sees them.
    trained = trained_encoders(model, config.encoders)
    for text_encoder, train in zip(model.text_encoders, trained):
        placeholder_embedding(text_encoder).rows.requires_grad_(train)
    optimizer = torch.optim.Adam(
        [leaf for c in concepts for leaf in c.leaves if leaf.requires_grad], lr=config.lr
    )
    stats = {
        "unet_forward_passes": 0,
        "unet_samples": 0,
        "seconds_total": 0.0,
        "resumed_from_step": None,
    }
    step = 0
    if resume:
        step = _load(checkpoint_dir, concepts, optimizer, config, stats, model)
    last_saved = step if resume else None

    bar = tqdm(
        total=config.steps,
        initial=step,
        disable=config.quiet,
        unit="step",
        desc=concepts[0].token if len(concepts) == 1 else f"{len(concepts)} concepts",
    )
    step_seconds, started = [], time.perf_counter()
    run_started = started
    while step < config.steps:
        active = [c for c in concepts if c.stopped_at is None]
        if not active:
            break
        tic = time.perf_counter()
        # 2. Data: each concept draws its images, prompts, timesteps and noise.
        drawn = [_draw(model, c, config) for c in active]
        latents = torch.cat([d[0] for d in drawn])  # (C*b, 4, h, w)
        prompts = [prompt for d in drawn for prompt in d[1]]
        noise = torch.cat([d[2] for d in drawn])
        timesteps = torch.cat([d[3] for d in drawn])

        # 3. Forward: one text-encoder call and one UNet call for every concept's samples.
        for concept in active:
            set_rows(model, concept.placeholder, concept.leaves)
        embeds = encode_prompts(model, prompts)
        output = denoising_loss(model, latents, embeds, noise, timesteps)
        clip_per_sample = None
        if clip is not None:
            x0 = predict_x0(model, output.noisy_latents, output.prediction, timesteps)
            references = torch.cat(
                [c.clip_reference.expand(config.batch, -1) for c in active]
            )  # (C*b, p)
            clip_per_sample = clip(decode_latents(model, x0), references)
        stats["unet_forward_passes"] += 1
        stats["unet_samples"] += latents.shape[0]

        # 4. Loss: each concept's own mean, summed, so each concept's rows get exactly the
        # gradient of its own loss (as in a single-concept run).
        objectives, clip_terms = [], []
        for j, concept in enumerate(active):
            part = slice(j * config.batch, (j + 1) * config.batch)
            objective = output.loss[part].mean()
            if clip_per_sample is not None:
                clip_terms.append(clip_per_sample[part].mean())
                objective = objective + config.clip_weight * clip_terms[-1]
            if config.l2_weight > 0:
                objective = objective + config.l2_weight * _l2_pull(model, concept)
            objectives.append(objective)

        # 5. Backward into the shared rows, then hand each concept its rows' gradient.
        for rows in trainable_rows(model):
            rows.grad = None
        torch.stack(objectives).sum().backward()
        for j, (concept, objective) in enumerate(zip(active, objectives)):
            value = objective.item()
            grads = [
                placeholder_embedding(te).rows.grad[offsets].clone() if train else None
                for te, offsets, train in zip(
                    model.text_encoders, _row_offsets(model, concept.placeholder), trained
                )
            ]  # per trained encoder (K, d)
            finite = math.isfinite(value) and all(
                bool(torch.isfinite(g).all()) for g in grads if g is not None
            )
            # 6. Skip (counted, warned) a non-finite loss or gradient; abort after N in a row.
            for leaf, grad in zip(concept.leaves, grads):
                leaf.grad = grad if finite else None  # Adam leaves a None-grad leaf untouched
            concept.losses.append(value if finite else None)
            if clip_terms:
                concept.clip_losses.append(clip_terms[j].item() if finite else None)
            if not finite:
                concept.nonfinite_in_row += 1
                concept.nonfinite_total += 1
                log.warning(
                    "%s: non-finite loss or gradient at step %d, skipped (%d in a row, %d in all)",
                    concept.token,
                    step + 1,
                    concept.nonfinite_in_row,
                    concept.nonfinite_total,
                )
                if concept.nonfinite_in_row >= config.max_nonfinite:
                    bar.close()
                    raise OnewordError(
                        f"{concept.token}: the loss or its gradient was non-finite for "
                        f"{concept.nonfinite_in_row} steps in a row (up to step {step + 1}); "
                        "lower --lr, use --precision fp32, or check the images"
                    )
                continue
            concept.nonfinite_in_row = 0
            # 7. Early stopping on a plateau of the EMA-smoothed loss.
            concept.ema = smoothed_loss(concept.ema, [value], config.ema_beta)
            if concept.ema < concept.best_ema - config.min_delta:
                concept.best_ema, concept.since_best = concept.ema, 0
            else:
                concept.since_best += 1
            if config.early_stop and concept.since_best >= config.patience:
                concept.stopped_at = step + 1
                log.info("%s: loss plateaued, stopped at step %d", concept.token, step + 1)
        optimizer.step()
        step += 1
        if snapshots is not None and step in snapshots:
            rows = [leaf.detach().cpu().clone() for leaf in concepts[0].leaves]
            snapshots[step] = (rows, time.perf_counter())

        # 8. Log and checkpoint.
        step_seconds.append(time.perf_counter() - tic)
        emas = [c.ema for c in active if c.ema is not None]
        bar.update(1)
        if emas:
            bar.set_postfix(loss=f"{sum(emas) / len(emas):.4f}", refresh=False)
        if progress is not None:
            loss = sum(emas) / len(emas) if emas else None
            try:
                progress({"stage": "invert", "step": step, "total": config.steps, "loss": loss})
            except BaseException:
                bar.close()
                raise
        if checkpoint_dir is not None and step % config.checkpoint_every == 0:
            stats["seconds_total"] += time.perf_counter() - started
            started = time.perf_counter()
            _save(checkpoint_dir, step, concepts, optimizer, config, stats, model)
            last_saved = step
    bar.close()
    for concept in concepts:
        set_rows(model, concept.placeholder, concept.leaves)
    for text_encoder in model.text_encoders:
        placeholder_embedding(text_encoder).rows.requires_grad_(True)
    stats["seconds_total"] += time.perf_counter() - started
    if checkpoint_dir is not None and last_saved != step:
        _save(checkpoint_dir, step, concepts, optimizer, config, stats, model)
    return {
        "steps_done": step,
        "seconds_total": stats["seconds_total"],
        "seconds_this_run": time.perf_counter() - run_started,
        "seconds_per_step": sum(step_seconds) / len(step_seconds) if step_seconds else None,
        "step_seconds": step_seconds,
        "unet_forward_passes": stats["unet_forward_passes"],
        "unet_samples": stats["unet_samples"],
        "resumed_from_step": stats["resumed_from_step"],
    }


# --- outputs -------------------------------------------------------------------------------


def _environment(model) -> dict:
    import diffusers
    import transformers

    return {
        "device": str(model.device),
        "dtype": str(model.dtype).replace("torch.", ""),
        "torch_version": torch.__version__,
        "diffusers_version": diffusers.__version__,
        "transformers_version": transformers.__version__,
        "cuda_device": torch.cuda.get_device_name(model.device)
        if model.device.type == "cuda"
        else None,
    }


def _concept_log(model, concept: _Concept, config: InversionConfig, run: dict) -> dict:
    return {
        "method": "classic",
        "token": concept.token,
        "names": concept.placeholder.names,
        "init_text": concept.placeholder.init_text,
        "class_word": concept.class_word,
        "num_images": len(concept.images),
        "config": asdict(config),
        "model": model.describe(),
        **_environment(model),
        **{k: v for k, v in run.items() if k != "step_seconds"},
        "step_seconds": run["step_seconds"],
        "loss": concept.losses,
        "clip_loss": concept.clip_losses or None,
        "final_loss_ema": concept.ema,
        "nonfinite_steps": concept.nonfinite_total,
        "early_stop_step": concept.stopped_at,
        "vector_norms": [leaf.detach().norm(dim=-1).tolist() for leaf in concept.leaves],
    }


def _save_embedding(path: Path, model, concept: _Concept, config: InversionConfig, steps: int):
    from ..embeddings import save_model_token

    return save_model_token(
        path,
        model,
        concept.placeholder,
        method="classic",
        steps=steps,
        extra_metadata={"config": json.dumps(asdict(config))},
    )


def _save_samples(path: Path, model, concept: _Concept, config: InversionConfig) -> Path:
    """Grid: the training images, then a reconstruction prompt and edits, `sample_seeds` each."""
    from ..images import save_grid
    from ..sampling import generate

    columns = config.sample_seeds
    first_row = list(concept.images[:columns])
    while len(first_row) < columns:
        first_row.append(Image.new("RGB", first_row[0].size, (255, 255, 255)))
    prompts = STYLE_SAMPLE_PROMPTS if config.templates == "style" else OBJECT_SAMPLE_PROMPTS
    cue = concept.class_word if config.class_word_cue else None
    prompts = [fill(p, concept.token, cue) for p in prompts]
    images = generate(
        model,
        prompts,
        placeholders=[concept.placeholder],
        num_per_prompt=columns,
        steps=config.sample_steps,
        seed=config.seed,
        progress=not config.quiet,
    )
    return save_grid(
        first_row + images, path, columns=columns, labels=["training images", *prompts]
    )


def _load_clip(model, config: InversionConfig):
    if config.clip_weight <= 0:
        return None
    folder = config.clip_model or default_clip_model(model)
    if folder is None:
        raise OnewordError(
            f"--clip-weight {config.clip_weight} needs a CLIP image tower: pass --clip-model DIR "
            f"(a transformers CLIPVisionModelWithProjection folder); {model.source} has no image_encoder/"
        )
    return ClipIdentityLoss.from_folder(folder, model.device, model.dtype)


def _warm_rows(warm_start, config: InversionConfig, model, templates, class_word):
    """(per-encoder rows, where they came from) of a warm start, or (None, None)."""
    if warm_start is None:
        return None, None
    from ..embeddings import load_embedding
    from ..tokens import vectors_that_fit

    embedding = (
        load_embedding(warm_start) if isinstance(warm_start, (str, os.PathLike)) else warm_start
    )
    source = f"--warm-start {warm_start}" if isinstance(warm_start, (str, os.PathLike)) else None
    source = source or f"the warm start {getattr(embedding, 'token', '?')!r}"
    vectors = [v.detach().float() for v in embedding.vectors]
    have = vectors[0].shape[0]
    if have != config.vectors:
        fit, _ = vectors_that_fit(model, prompt_texts(config, templates, class_word))
        if have > fit:
            raise OnewordError(
                f"{source} has {have} vector(s), more than the {fit} that fit in the prompt "
                f"with these templates (the text encoder reads 77 tokens); it cannot be "
                "trained further here: learn a new token with --vectors "
                f"{min(fit, config.vectors)} or fewer"
            )
        raise OnewordError(
            f"{source} has {have} vector(s) but --vectors is {config.vectors}; "
            f"pass --vectors {have}"
        )
    return vectors, source


def check_out_not_in_images(out: Path, images, *, nested: bool = False) -> None:
    """Refuse an output folder whose files a later run would read as its input: the images
    folder itself (the samples grid would become a training image of a resumed run), a
    folder a glob reaches (it or any folder under it), and with `nested` (a --concepts
    folder, whose sub-folders are concepts) any folder inside. A sub-folder of a plain
    images folder is allowed: folders are listed without recursion."""
    if isinstance(images, (str, os.PathLike)):
        images = [images]
    if not isinstance(images, (list, tuple)):
        return
    target = Path(os.path.realpath(out))
    for item in images:
        if not isinstance(item, (str, os.PathLike)):
            continue
        text = os.path.expanduser(os.fspath(item))
        folder, inside_counts = Path(text), nested
        if any(c in text for c in "*?[") and not folder.exists():
            folder, inside_counts = Path(glob_root(text)), True
        elif not folder.is_dir():
            continue  # a named file: nothing written beside it is picked up
        folder = Path(os.path.realpath(folder))
        if target == folder or (inside_counts and folder in target.parents):
            raise OnewordError(
                f"--out {out} is inside the images folder {item}: the samples grid and "
                "checkpoints written there would become training images (or concepts) of "
                "the next run; choose another --out"
            )


def glob_root(pattern: str) -> str:
    """The folder part of a glob before its first wildcard ("a/b/*.png" -> "a/b")."""
    fixed = []
    for part in Path(pattern).parts:
        if any(c in part for c in "*?["):
            break
        fixed.append(part)
    return str(Path(*fixed)) if fixed else "."


def _check_out_dir(checkpoints: Path, resume: bool) -> None:
    if not resume and ckpt.list_checkpoints(checkpoints):
        latest = ckpt.list_checkpoints(checkpoints)[-1].name
        raise OnewordError(
            f"{checkpoints} holds checkpoints of an earlier run (latest {latest}); pass --resume "
            "to continue it, or choose a new --out"
        )


# --- the API -------------------------------------------------------------------------------


def invert(
    model,
    images,
    token: str,
    init_text: str,
    config: InversionConfig | None = None,
    out_dir: str | os.PathLike | None = None,
    *,
    class_word: str | None = None,
    resume: bool = False,
    warm_start=None,
    snapshots: Sequence[int] = (),
    progress: Callable[[dict], None] | None = None,
) -> InversionResult:
    """Learn one placeholder token for a concept (Gal et al., 2023).

    Args:
        model: a `LoadedModel` (the token is added to it and keeps the learned rows).
        images: PIL images, or paths/folders/globs (fitted to `model.resolution`), or
            `PreparedImages` (`prepare_images`: fitted and VAE-encoded once, reused as is).
        token: the new word, e.g. "<my-cat>".
        init_text: initializer word(s), e.g. "cat".
        config: `InversionConfig`; default settings if None.
        out_dir: where to write learned_embeds.safetensors, samples.png, log.json and
            checkpoints/; None writes nothing.
        class_word: the class word for the cue ("a photo of a <my-cat> cat").
        resume: continue from the latest checkpoint in out_dir/checkpoints (required to exist).
        warm_start: a `TokenEmbedding` or an embedding file to start from instead of init_text.
        snapshots: steps at which to keep a copy of the rows (`InversionResult.snapshots`).
            With a constant lr and one seed, the rows at step n of a longer run are those of
            an n-step run, so one run gives a whole identity-vs-steps curve.
        progress: called after every step with a dict {"stage": "invert", "step": n,
            "total": steps, "loss": EMA of the loss or None} (a web page's progress bar);
            an exception it raises (a user's cancel) ends the run before any file is
            written except the checkpoints already saved.

    Returns:
        `InversionResult`; `vectors` per text encoder (K, d) fp32.
    """
    started = time.perf_counter()
    config = config or InversionConfig()
    config.check()
    wanted = sorted({int(s) for s in snapshots})
    if wanted and not 1 <= wanted[0] <= wanted[-1] <= config.steps:
        raise OnewordError(f"snapshot steps {wanted} must lie in 1..--steps ({config.steps})")
    out = Path(out_dir) if out_dir is not None else None
    if resume and out is None:
        raise OnewordError("--resume needs the --out folder of the run to continue")
    checkpoints = out / "checkpoints" if out is not None else None
    # Released when the run ends, however it ends: a caller that keeps the exception (a web
    # page) would otherwise keep the frame, and the lock, alive.
    with contextlib.ExitStack() as owned:
        if out is not None:
            from ..io import prepare_out_dir

            check_out_not_in_images(out, images)
            owned.enter_context(prepare_out_dir(out))
            _check_out_dir(checkpoints, resume)
            if resume:
                ckpt.latest_checkpoint(checkpoints)  # fail before any work if there is none
        templates = load_templates(config.templates)
        check_prompts(model, token, config, templates, class_word)
        warm_rows, source = _warm_rows(warm_start, config, model, templates, class_word)
        clip = _load_clip(model, config)
        spec = ConceptSpec("concept", images, token, init_text, class_word)
        concept = _prepare(model, spec, config, templates, clip, warm_rows, source)

        wanted_rows: dict[int, tuple | None] = dict.fromkeys(wanted)
        run = _train(
            model,
            [concept],
            config,
            checkpoint_dir=checkpoints,
            resume=resume,
            clip=clip,
            snapshots=wanted_rows if wanted else None,
            progress=progress,
        )
        # A run that stopped early keeps its final rows at the later snapshot steps; steps
        # before a resumed run's start were not seen by this process and are left out.
        finished = time.perf_counter()
        taken = {}
        for step, value in wanted_rows.items():
            if value is None and step > run["steps_done"]:
                value = ([leaf.detach().cpu().clone() for leaf in concept.leaves], finished)
            if value is not None:
                taken[step] = (value[0], value[1] - started)

        data = _concept_log(model, concept, config, run)
        files = {}
        if out is not None:
            files["embedding"] = _save_embedding(
                out / "learned_embeds.safetensors", model, concept, config, run["steps_done"]
            )
            if config.samples:
                files["samples"] = _save_samples(out / "samples.png", model, concept, config)
            files["log"] = out / "log.json"
            data["files"] = {name: str(path) for name, path in files.items()}
            _write_json(out / "log.json", data)
        vectors = [leaf.detach().cpu().clone() for leaf in concept.leaves]
        return InversionResult(token, concept.placeholder, vectors, data, files, taken)


def _folder_name(name: str) -> str:
    cleaned = re.sub(r"[^\w.-]+", "-", name).strip(".-")
    if not cleaned:
        raise OnewordError(f"concept name {name!r} cannot be used as a folder name")
    return cleaned


def invert_many(
    model,
    concepts: Sequence[ConceptSpec],
    config: InversionConfig | None = None,
    out_dir: str | os.PathLike = "out",
    *,
    chunk: int = 8,
    shard: tuple[int, int] = (0, 1),
    resume: bool = False,
) -> dict[str, dict]:
    """Learn many concepts in one job, `chunk` concepts per UNet batch.

    Each concept has its own placeholder, generator (seeded like a single run: `spec.seed`
    or `config.seed`) and Adam state, and the loss is the sum of each concept's own mean
    loss, so each concept receives exactly its single-run gradient. Results match
    `invert(...)` with the same seed up to floating-point differences of the batched UNet
    (tested: max |rows difference| < 1e-4 after 5 steps on the tiny sd1 model, CPU, fp32).

    Args:
        model: a `LoadedModel`.
        concepts: the concepts; names must be unique.
        config: shared `InversionConfig` (its `batch` is per concept).
        out_dir: writes out_dir/<name>/learned_embeds.safetensors and log.json (no sample
            grids), and checkpoints under out_dir/checkpoints/.
        chunk: concepts optimised together (UNet batch = chunk * config.batch).
        shard: (rank, world_size): this process takes concepts[rank::world_size].
        resume: skip finished concepts and continue an interrupted chunk from its checkpoint.

    Returns:
        name -> that concept's log.json contents, for the concepts of this shard.
    """
    config = config or InversionConfig()
    config.check()
    rank, world_size = shard
    if not (0 <= rank < world_size):
        raise OnewordError(f"shard {shard}: rank must be in [0, world_size)")
    names = [_folder_name(spec.name) for spec in concepts]
    if len(set(names)) != len(names):
        raise OnewordError("concept names must be unique (they name the output folders)")
    if chunk < 1:
        raise OnewordError(f"--chunk must be >= 1, got {chunk}")
    out = Path(out_dir)
    from ..io import prepare_out_dir

    for spec in concepts:
        check_out_not_in_images(out, spec.images)
    with prepare_out_dir(out, rank=rank):  # released when the run ends, however it ends
        mine = list(concepts)[rank::world_size]
        templates = load_templates(config.templates)
        clip = _load_clip(model, config)
        done_any = False
        results = {}
        for index in range(0, len(mine), chunk):
            specs = mine[index : index + chunk]
            checkpoints = (
                out
                / "checkpoints"
                / f"shard-{rank}-of-{world_size}"
                / f"chunk-{index // chunk:05d}"
            )
            finished = all((out / _folder_name(s.name) / "log.json").is_file() for s in specs)
            if resume and finished:
                done_any = True
                for spec in specs:
                    results[spec.name] = json.loads(
                        (out / _folder_name(spec.name) / "log.json").read_text()
                    )
                continue
            resume_chunk = resume and bool(ckpt.list_checkpoints(checkpoints))
            done_any = done_any or resume_chunk
            if resume and not resume_chunk and not done_any:
                raise OnewordError(
                    f"--resume: nothing to resume in {out} (no finished concept, no checkpoint under "
                    f"{out / 'checkpoints'}); run without --resume to start"
                )
            _check_out_dir(checkpoints, resume_chunk)
            chunk_concepts = [_prepare(model, s, config, templates, clip) for s in specs]
            run = _train(
                model,
                chunk_concepts,
                config,
                checkpoint_dir=checkpoints,
                resume=resume_chunk,
                clip=clip,
            )
            for spec, concept in zip(specs, chunk_concepts):
                folder = out / _folder_name(spec.name)
                data = _concept_log(model, concept, config, run)
                data["name"] = spec.name
                data["concepts_per_batch"] = len(specs)
                _save_embedding(
                    folder / "learned_embeds.safetensors", model, concept, config, run["steps_done"]
                )
                _write_json(folder / "log.json", data)
                results[spec.name] = data
        return results


def invert_together(
    model, concepts: Sequence[ConceptSpec], config: InversionConfig | None = None
) -> list[dict]:
    """Learn a few concepts in one UNet batch and write nothing (one chunk of `invert_many`).

    Each concept keeps its own placeholder, generator and Adam state (see `invert_many`),
    so each gets its single-run gradient. For callers that store results their own way
    (the encoder's target factory, `oneword.encoder.targets`).

    Args:
        model: a `LoadedModel` (the placeholders are added to it).
        concepts: the concepts of this UNet batch (UNet batch = len(concepts) * config.batch).
        config: shared `InversionConfig`; no checkpoints, no samples.

    Returns:
        Per concept, in order: {"name", "vectors" (per text encoder (K, d) fp32, CPU),
        "losses" (per step; None where skipped), "final_loss_ema", "steps_done",
        "nonfinite_steps", "seconds" (the whole batch's wall time: preparing and training)}.
    """
    config = config or InversionConfig()
    config.check()
    started = time.perf_counter()
    templates = load_templates(config.templates)
    clip = _load_clip(model, config)
    prepared = [_prepare(model, spec, config, templates, clip) for spec in concepts]
    run = _train(model, prepared, config, clip=clip)
    seconds = time.perf_counter() - started
    return [
        {
            "name": concept.name,
            "vectors": [leaf.detach().cpu().clone() for leaf in concept.leaves],
            "losses": list(concept.losses),
            "final_loss_ema": concept.ema,
            "steps_done": run["steps_done"],
            "nonfinite_steps": concept.nonfinite_total,
            "seconds": seconds,
        }
        for concept in prepared
    ]


__all__ = [
    "ConceptSpec",
    "InversionConfig",
    "InversionResult",
    "invert",
    "invert_many",
    "invert_together",
]
