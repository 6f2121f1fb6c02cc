"""Train the miniature world from scratch: CLIP, VAE, oracle, UNet.

    python train_world.py --preset cpu --out checkpoints/world   (= `oneword world train ...`)


The result is a standard diffusers `StableDiffusionPipeline` folder (tokenizer/, text_encoder/,
unet/, vae/, scheduler/, plus the CLIP vision tower as image_encoder/ and the oracle as
oracle/), loadable offline by any diffusers-based tool. Stages run in order and each is
resumable: its state (weights, optimizer, step, RNG and data-stream state) is saved
atomically every `save_every` steps under `--work`, and a finished stage is exported into
the output folder and skipped on the next run.

Design (see shared world notes): latent space (64x64 -> 16x16x4), SD's noise schedule,
a UNet conditioned on the frozen CLIP text tower, caption dropout for classifier-free
guidance. The CLIP is trained on captions that name every value, unnamed ones included,
plus an attribute-classification head on its image features, so its image features
separate values that the UNet's captions never name (the encoder needs that).
"""

from __future__ import annotations

import argparse
import copy
import functools
import hashlib
import json
import logging
import math
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from oneword.datasets import world
from oneword.errors import OnewordError
from oneword.io import atomic_path, atomic_write_text
from oneword.tokenizer import tokenize
from oneword.world.fidelity import noise_scheduler_config, quick_fidelity, zero_shot_accuracy
from oneword.world.oracle import Oracle, OracleConfig, oracle_accuracy

log = logging.getLogger("oneword.world")

STAGES = ("clip", "vae", "oracle", "unet")
# Run only when named in --stages, after the VAE: more decoder training with the encoder
# frozen, so a UNet trained on the encoder's latents stays valid (as SD's fine-tuned
# ft-MSE/ft-EMA decoders did). It overwrites the exported VAE's decoder.
# clip_vision: more vision-tower training with the text tower frozen (the UNet's captions
# stay encoded as it saw them), so it can run beside the UNet with --jobs.
OPTIONAL_STAGES = ("vae_decoder", "clip_vision")


@dataclass
class WorldTrainConfig:
    out: str = "checkpoints/world"  # the diffusers folder that ships
    work: str = ".world-train"  # resumable stage states (not shipped)
    seed: int = 0
    resolution: int = 64
    device: str = "auto"
    # CPU threads for torch (0 = torch's default). On a shared 2-core machine, 1 thread per
    # process beats 2 threads fighting another job (measured: 0.6 s vs 7 s per VAE step).
    threads: int = 0
    # Stages run side by side, one process each (1 = one after another). With 2 on a 2-core
    # CPU, the CLIP trains beside the VAE and the oracle beside the UNet, one thread each;
    # a stage left running alone is raised to all `jobs` threads (see `train_world`).
    jobs: int = 1
    stages: tuple[str, ...] = STAGES
    save_every: int = 500  # steps between resumable checkpoints
    # Optional wall-time caps per stage ({"unet": 300, ...}); a capped stage ends early, still
    # exports its weights, and the UNet's learning-rate schedule follows elapsed time instead.
    stage_seconds: dict = field(default_factory=dict)
    # CLIP (text + vision towers, contrastive + attribute heads on image features)
    clip_steps: int = 3000
    clip_batch: int = 256
    clip_lr: float = 5e-4
    clip_aux_weight: float = (
        1.0  # attribute classification on image features (the "image-only objective")
    )
    text_width: int = 96  # token-embedding width d of the learned words (and cross-attention width)
    text_layers: int = 4
    vision_width: int = 192
    vision_layers: int = 4
    projection_dim: int = 128
    clip_vision_steps: int = 500  # the optional clip_vision stage (steps of clip_batch)
    # VAE (64x64x3 <-> 16x16x4)
    vae_steps: int = 3000
    vae_batch: int = 64
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-6
    # L1 on horizontal/vertical pixel differences: without it the VAE painted striped,
    # dotted and checkered objects in one flat colour (measured: the oracle read the pattern
    # of 29% of reconstructions after 1,000 steps; L1 + L2 alone reward the mean colour).
    vae_edge_weight: float = 1.0
    vae_decoder_steps: int = 1000  # the optional vae_decoder stage (steps of vae_batch)
    vae_channels: tuple[int, ...] = (32, 64, 64)
    # Train the VAE on square crops of this side around the object (0 = whole images).
    # The object is 5-20% of a 64x64 render, so whole images spend most of the loss and
    # compute on flat background; the VAE is convolutional and learns the same mapping on
    # crops at a quarter of the cost per image.
    vae_crop: int = 0
    # Latent channels (SD 1.x/2.x/XL: 4; SD3: 16). The UNet reads and writes this many.
    vae_latent_channels: int = 4
    # oracle
    oracle_steps: int = 1500
    oracle_batch: int = 256
    oracle_lr: float = 1e-3
    # An oracle folder to start from instead of random weights (after a change of the world
    # that keeps its attributes, fine-tuning the previous oracle is far cheaper).
    oracle_init: str = ""
    # UNet
    unet_steps: int = 20000
    unet_batch: int = 96
    unet_lr: float = 3e-4
    unet_warmup: int = 200
    unet_channels: tuple[int, ...] = (64, 128, 128)
    unet_layers: int = 1
    # Levels, counted from the lowest resolution up, whose blocks carry transformer blocks
    # (self- and cross-attention to the caption). 2 of 3: 8x8 and 4x4 (v2). SD 1.x has them
    # at every level but its lowest; all 3 here adds text conditioning at 16x16, where the
    # patterns (2-3 latent pixels per period) are drawn, at ~2x the step time.
    unet_attention_levels: int = 2
    # Attention heads per transformer block (diffusers' `attention_head_dim`, which its
    # UNet reads as a head count; SD 1.x: 8): one count for every level, or one per level
    # from the highest resolution down. Fewer, wider heads are cheaper on a CPU (measured:
    # with attention at 16x16, 2 heads instead of 8 cut the step by ~25%); per level, a
    # grown UNet keeps the head count of the blocks it copies.
    unet_attention_heads: tuple[int, ...] = (8,)
    # A diffusers UNet folder to start from: tensors whose name and shape match are copied;
    # transformer blocks the folder lacks start as identities (zero output projection), so
    # the model begins as exactly the folder's UNet.
    unet_init: str = ""
    # Renders encoded once by the VAE and reused (posterior mean and std, sampled per step);
    # captions stay fresh every step. 0 = render and encode every batch.
    unet_pool: int = 40000
    # Min-SNR-gamma loss weighting (Hang et al., ICCV 2023): converges faster; 0 = plain MSE.
    unet_min_snr_gamma: float = 5.0
    caption_dropout: float = 0.1  # empty caption for classifier-free guidance
    # What the UNet's captions teach about patterns. Unnamed patterns (split, concentric) are
    # never written, so their images share the no-pattern-word captions with most solid
    # objects; over half of v3's pattern errors draw an unnamed pattern for a named one
    # (model card). Both default to the recipe every shipped world was trained with.
    # How often a caption leaves out "solid" (3 of the 12 templates have no place for it:
    # at 0.6 it is written in 30% of solid objects' captions, at 0 in 75%).
    unet_omit_solid: float = 0.6
    # Draw weight of an unnamed-pattern image relative to a named one (1: as rendered, a
    # third of the images; 0.25: 11%). Must stay > 0: the unnamed values have to appear.
    unet_unnamed_pattern_weight: float = 1.0
    # Draw weights of single patterns by name, over the above (e.g. {"checkered": 2}: v3's
    # weakest value, read as dotted, drawn twice as often as another named one). Each > 0.
    unet_pattern_weight: dict = field(default_factory=dict)
    ema_decay: float = 0.999
    fidelity_every: int = 0  # steps between quick oracle checks of samples (0 = only at the end)
    fidelity_captions: int = 64
    eval_renders: int = 2048  # fresh renders for the oracle's and CLIP's accuracy reports
    mixed_precision: str = "bf16"  # on CUDA only; the CPU trains in fp32
    extra: dict = field(default_factory=dict)


# `oneword world train --help`: one line per config field (the comments above say why).
FLAG_HELP: dict[str, str] = {
    "out": "the diffusers pipeline folder written (oracle and world.json included)",
    "work": "folder of resumable stage states; a rerun resumes unfinished stages",
    "seed": "seed of every stage's weights and data",
    "resolution": "image side in pixels",
    "device": "auto, cpu, cuda or cuda:N",
    "threads": "torch CPU threads per stage process (0: torch's default)",
    "jobs": "stages run side by side, one process each (1: one after another)",
    "save_every": "steps between resumable checkpoints",
    "clip_steps": "CLIP steps",
    "clip_batch": "CLIP batch (image-caption pairs)",
    "clip_lr": "CLIP learning rate",
    "clip_aux_weight": "weight of the attribute heads on both towers' features",
    "text_width": "text tower width = token-embedding width of the learned words",
    "text_layers": "text tower layers",
    "vision_width": "vision tower width",
    "vision_layers": "vision tower layers",
    "projection_dim": "CLIP projection width",
    "clip_vision_steps": "steps of the optional clip_vision stage (text tower frozen)",
    "vae_steps": "VAE steps",
    "vae_batch": "VAE batch (images)",
    "vae_lr": "VAE learning rate (also the vae_decoder stage's)",
    "vae_kl_weight": "weight of the VAE's KL term",
    "vae_edge_weight": "weight of the L1 loss on pixel differences (keeps patterns)",
    "vae_decoder_steps": "steps of the optional vae_decoder stage (encoder frozen)",
    "vae_channels": "VAE channels per level; the latent side is resolution / 2**(levels - 1)",
    "vae_crop": "train the VAE on square crops of this side around the object (0: whole images)",
    "vae_latent_channels": "latent channels (SD 1.x/2.x/XL: 4)",
    "oracle_steps": "oracle steps",
    "oracle_batch": "oracle batch (images)",
    "oracle_lr": "oracle learning rate",
    "oracle_init": "oracle folder to fine-tune instead of starting from random weights",
    "unet_steps": "UNet steps (with a --stage-seconds cap, the lr schedule follows time too)",
    "unet_batch": "UNet batch (latents)",
    "unet_lr": "UNet peak learning rate (linear warmup, then cosine down to 10%%)",
    "unet_warmup": "UNet warmup steps",
    "unet_channels": "UNet channels per level, highest resolution first",
    "unet_layers": "UNet resnet layers per block",
    "unet_attention_levels": "levels, from the lowest resolution up, with transformer blocks",
    "unet_attention_heads": "attention heads: one count, or one per level from the highest resolution",
    "unet_init": "diffusers UNet folder to start from (matching tensors copied, new blocks identities)",
    "unet_pool": "renders encoded once by the VAE and reused (0: encode every batch)",
    "unet_min_snr_gamma": "Min-SNR-gamma loss weighting (0: plain MSE)",
    "caption_dropout": "fraction of empty captions (for classifier-free guidance)",
    "unet_omit_solid": "how often a UNet caption leaves out solid (3 of 12 templates never write it)",
    "unet_unnamed_pattern_weight": "draw weight of unnamed-pattern images vs named ones (> 0)",
    "unet_pattern_weight": "draw weight of single patterns by name, over the unnamed weight "
    "(each > 0), e.g. checkered=2",
    "ema_decay": "decay of the UNet's EMA weights",
    "fidelity_every": "UNet steps between quick oracle checks (0: only at the end)",
    "fidelity_captions": "captions of each quick oracle check",
    "eval_renders": "fresh renders for the oracle's and CLIP's accuracy reports",
    "mixed_precision": "bf16, fp16 or no (CUDA only; the CPU trains in fp32)",
}


PRESETS: dict[str, dict] = {
    # Seconds on a CPU; for tests and first contact. Quality: none.
    "tiny": dict(
        clip_steps=4,
        clip_batch=8,
        text_width=32,
        text_layers=1,
        vision_width=32,
        vision_layers=1,
        projection_dim=16,
        vae_steps=4,
        vae_batch=4,
        vae_channels=(8, 16, 16),
        oracle_steps=4,
        oracle_batch=8,
        unet_steps=4,
        unet_batch=4,
        unet_channels=(16, 32, 32),
        unet_layers=1,
        unet_warmup=1,
        unet_pool=16,
        save_every=2,
        fidelity_captions=4,
        eval_renders=32,
    ),
    # The 2-hour budget on a 2-core CPU.
    "cpu": dict(
        clip_steps=1500,
        clip_batch=128,
        vae_steps=800,
        vae_batch=32,
        oracle_steps=800,
        oracle_batch=128,
        unet_steps=4000,
        unet_batch=96,
        fidelity_every=1000,
    ),
    # One GPU (minutes).
    "gpu": dict(
        clip_steps=4000,
        clip_batch=512,
        vae_steps=3000,
        vae_batch=128,
        oracle_steps=2000,
        oracle_batch=512,
        unet_steps=30000,
        unet_batch=256,
        unet_lr=5e-4,
        unet_warmup=500,
        ema_decay=0.9995,
        fidelity_every=2000,
        fidelity_captions=256,
    ),
}


# ----------------------------------------------------------------------------- helpers


def _device(cfg: WorldTrainConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def _autocast(device: torch.device, cfg: WorldTrainConfig):
    enabled = device.type == "cuda" and cfg.mixed_precision in ("bf16", "fp16")
    dtype = torch.bfloat16 if cfg.mixed_precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype, enabled=enabled)


class Batches:
    """An endless, seeded, resumable stream of rendered scenes with captions and labels."""

    def __init__(self, seed: int, resolution: int, device: torch.device):
        self.generator = torch.Generator().manual_seed(seed)
        self.rng = random.Random(seed)
        self.resolution = resolution
        self.device = device

    def next(
        self,
        n: int,
        *,
        name_all: bool = False,
        drop_prob: float = 0.0,
        named_only: bool = False,
        omit_solid: float = world.OMIT_SOLID_PROB,
        pattern_weights: Sequence[float] | None = None,
    ):
        scenes = world.sample_scenes(
            n, self.generator, named_only=named_only, pattern_weights=pattern_weights
        )
        pixels = world.render(scenes, self.resolution, device=self.device)  # (n, 3, H, W) uint8
        captions = world.caption_batch(
            scenes, self.rng, name_all=name_all, drop_prob=drop_prob, omit_solid=omit_solid
        )
        return pixels, captions, world.labels(scenes), scenes

    def next_with_mentions(self, n: int):
        """Like `next(n, name_all=True)`, plus labels that are -100 where the caption leaves
        the attribute out (for the text tower's attribute heads)."""
        scenes = world.sample_scenes(n, self.generator)
        pixels = world.render(scenes, self.resolution, device=self.device)
        captions = []
        mentions = {a: torch.zeros(n, dtype=torch.bool) for a in world.ATTRIBUTES}
        for i, scene in enumerate(scenes):
            mentioned: set[str] = set()
            captions.append(world.caption(scene, self.rng, name_all=True, mentioned=mentioned))
            for a in mentioned:
                mentions[a][i] = True
        labels = world.labels(scenes)
        text_labels = {a: labels[a].masked_fill(~mentions[a], -100) for a in world.ATTRIBUTES}
        return pixels, captions, labels, text_labels

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "rng": self.rng.getstate()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.rng.setstate(state["rng"])


class LatentPool:
    """A fixed set of scenes encoded once by the frozen VAE; batches draw from it with fresh
    captions. Rebuilt from the seed on resume (the draw position lives in `Batches`).

    With `cache` (a .safetensors path), the encoded posteriors are saved there and a later
    run with the same size, seed, resolution and VAE weights loads them instead of
    re-encoding (the scenes are re-drawn from the seed, which is cheap): a resumed UNet
    stage starts in seconds, not minutes.
    """

    def __init__(
        self,
        vae,
        size: int,
        seed: int,
        resolution: int,
        device: torch.device,
        cache: str | Path | None = None,
    ):
        self._draw_weights: dict[tuple[float, ...], torch.Tensor] = {}
        generator = torch.Generator().manual_seed(seed)
        chunk = 256
        chunks = [
            world.sample_scenes(min(chunk, size - s), generator) for s in range(0, size, chunk)
        ]
        self.scenes: list = [scene for part in chunks for scene in part]
        key = {"size": str(size), "seed": str(seed), "resolution": str(resolution),
               "vae": _fingerprint(vae), "renderer": _render_fingerprint(resolution)}  # fmt: skip
        cached = _load_pool(cache, key) if cache is not None else None
        if cached is not None:
            self.mean, self.std = (t.to(device) for t in cached)
            return
        means, stds = [], []
        with torch.no_grad():
            for scenes in tqdm(chunks, desc="encode latent pool", leave=False):
                pixels = to_unit(world.render(scenes, resolution, device=device))
                posterior = vae.encode(pixels).latent_dist
                means.append(posterior.mean)
                stds.append(posterior.std)
        self.mean = torch.cat(means)  # (size, 4, h, w)
        self.std = torch.cat(stds)
        if cache is not None:
            from safetensors.torch import save_file

            with atomic_path(Path(cache)) as tmp:
                tensors = {"mean": self.mean.cpu().contiguous(), "std": self.std.cpu().contiguous()}
                save_file(tensors, str(tmp), metadata=key)

    def next(
        self,
        batches: Batches,
        n: int,
        drop_prob: float,
        omit_solid: float = world.OMIT_SOLID_PROB,
        pattern_weights: Sequence[float] | None = None,
    ):
        """`n` latents (posterior samples) and fresh captions; with `pattern_weights` (one per
        `world.PATTERNS`), each pattern is drawn with that weight's share (the pool itself,
        and so its cache, stays as rendered)."""
        if pattern_weights is None:
            index = torch.randint(len(self.scenes), (n,), generator=batches.generator)
        else:
            index = torch.multinomial(
                self._scene_weights(tuple(pattern_weights)), n, replacement=True,
                generator=batches.generator,
            )  # fmt: skip
        scenes = [self.scenes[i] for i in index.tolist()]
        captions = world.caption_batch(
            scenes, batches.rng, drop_prob=drop_prob, omit_solid=omit_solid
        )
        index = index.to(self.mean.device)
        mean = self.mean[index]
        return mean + self.std[index] * torch.randn_like(mean), captions

    def _scene_weights(self, pattern_weights: tuple[float, ...]) -> torch.Tensor:
        """Per-scene draw weights: a pattern's weight split over the pool's scenes of it
        (computed once per setting: a training run asks for the same one every step)."""
        if pattern_weights in self._draw_weights:
            return self._draw_weights[pattern_weights]
        share = world.check_pattern_weights(pattern_weights)
        ids = torch.tensor([world.PATTERNS.index(s.pattern) for s in self.scenes])
        counts = torch.bincount(ids, minlength=len(world.PATTERNS)).to(torch.float64)
        if bool(((share > 0) & (counts == 0)).any()):
            missing = [p for p, w, c in zip(world.PATTERNS, share, counts) if w > 0 and c == 0]
            raise OnewordError(f"the latent pool holds no scene with pattern {missing}")
        weights = self._draw_weights[pattern_weights] = (share / counts.clamp(min=1))[ids]
        return weights


def unet_pattern_weights(cfg: WorldTrainConfig) -> tuple[float, ...] | None:
    """The UNet stream's weight per `world.PATTERNS` value, or None for the renderer's
    uniform draw (the recipe of every shipped world, random stream included)."""
    w = cfg.unet_unnamed_pattern_weight
    if not (math.isfinite(w) and w > 0):
        raise OnewordError(
            f"--unet-unnamed-pattern-weight must be > 0 (the unnamed patterns have to appear "
            f"in the UNet's images), got {w}"
        )
    if not 0.0 <= cfg.unet_omit_solid <= 1.0:
        raise OnewordError(f"--unet-omit-solid must be in [0, 1], got {cfg.unet_omit_solid}")
    weights = {p: w if p in world.UNNAMED_PATTERNS else 1.0 for p in world.PATTERNS}
    for name, value in cfg.unet_pattern_weight.items():
        if name not in weights:
            raise OnewordError(
                f"--unet-pattern-weight {name}=...: no such pattern (expected one of "
                f"{', '.join(world.PATTERNS)})"
            )
        if not (math.isfinite(value) and value > 0):
            raise OnewordError(
                f"--unet-pattern-weight {name}={value}: must be > 0 (every pattern has to "
                f"appear in the UNet's images)"
            )
        if name in world.UNNAMED_PATTERNS and w != 1.0:
            raise OnewordError(
                f"--unet-pattern-weight {name}=... and --unet-unnamed-pattern-weight {w} both "
                f"set the weight of {name}: give one of them"
            )
        weights[name] = float(value)
    if all(value == 1.0 for value in weights.values()):
        return None
    return tuple(weights.values())


def check_stage_seconds(cfg: WorldTrainConfig) -> None:
    """Refuse a `--stage-seconds` cap for a stage that does not exist or is negative."""
    for name, seconds in cfg.stage_seconds.items():
        if name not in STAGES + OPTIONAL_STAGES:
            raise OnewordError(
                f"--stage-seconds {name}=...: no such stage (expected one of "
                f"{', '.join(STAGES + OPTIONAL_STAGES)})"
            )
        if not (math.isfinite(seconds) and seconds >= 0):
            raise OnewordError(
                f"--stage-seconds {name}={seconds}: must be >= 0 seconds (0: no cap)"
            )


def _fingerprint(module: torch.nn.Module) -> str:
    """A digest of a module's weights (which VAE encoded a cached pool)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


@functools.lru_cache(maxsize=4)
def _render_fingerprint(resolution: int) -> str:
    """A digest of a few fixed renders: a pool cached before a change of the renderer's
    geometry (world v3 moved and resized the objects) is not reused."""
    scenes = world.sample_scenes(32, torch.Generator().manual_seed(0))
    pixels = world.render(scenes, resolution)
    return hashlib.sha256(pixels.numpy().tobytes()).hexdigest()[:16]


def _load_pool(path: str | Path, key: dict) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The cached (mean, std) when `path` holds a pool made with `key`, else None."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            if f.metadata() != key:
                log.info("latent pool cache %s is for other settings: re-encoding", path)
                return None
            return f.get_tensor("mean"), f.get_tensor("std")
    except Exception as exc:  # a damaged cache only costs the re-encoding
        log.warning("latent pool cache %s is unreadable (%s): re-encoding", path, exc)
        return None


def to_unit(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 (b, 3, H, W) -> float in [-1, 1] (the VAE's and our CLIP's input range)."""
    return pixels.float() / 127.5 - 1.0


class StageState:
    """Atomic, resumable state of one stage: `work/<stage>/state.pt` and a `done` marker."""

    def __init__(self, cfg: WorldTrainConfig, stage: str):
        self.folder = Path(cfg.work) / stage
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = self.folder / "state.pt"

    @property
    def done(self) -> bool:
        return (self.folder / "done").exists()

    @property
    def stop_requested(self) -> bool:
        """`touch WORK/STAGE/stop` ends a running stage early, as its time cap would: saved,
        exported and marked done (remove the file and `done` to train it on later)."""
        return (self.folder / "stop").exists()

    def mark_done(self, info: dict) -> None:
        atomic_write_text(self.folder / "done", json.dumps(info, indent=2))

    def save(self, state: dict) -> None:
        with atomic_path(self.path) as tmp:
            torch.save(state, tmp)

    def load(self) -> dict | None:
        if not self.path.exists():
            return None
        return torch.load(self.path, map_location="cpu", weights_only=False)  # our own file


def _log(cfg: WorldTrainConfig, stage: str, record: dict) -> None:
    path = Path(cfg.work) / "log.jsonl"
    with open(path, "a") as handle:
        handle.write(json.dumps({"stage": stage, **record}) + "\n")


# ----------------------------------------------------------------------------- building blocks


def build_clip(cfg: WorldTrainConfig):
    from transformers import CLIPConfig, CLIPTextConfig, CLIPVisionConfig

    from oneword.tokenizer import CLIP_VOCAB_SIZE

    text = CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE,
        hidden_size=cfg.text_width,
        intermediate_size=4 * cfg.text_width,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=max(1, cfg.text_width // 32),
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        projection_dim=cfg.projection_dim,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    vision = CLIPVisionConfig(
        hidden_size=cfg.vision_width,
        intermediate_size=4 * cfg.vision_width,
        num_hidden_layers=cfg.vision_layers,
        num_attention_heads=max(1, cfg.vision_width // 48),
        image_size=cfg.resolution,
        patch_size=8,
        hidden_act="quick_gelu",
        projection_dim=cfg.projection_dim,
    )
    from transformers import CLIPModel

    return CLIPModel(
        CLIPConfig(
            text_config=text.to_dict(),
            vision_config=vision.to_dict(),
            projection_dim=cfg.projection_dim,
        )
    )


def build_vae(cfg: WorldTrainConfig):
    from diffusers import AutoencoderKL

    n = len(cfg.vae_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=cfg.vae_latent_channels,
        block_out_channels=tuple(cfg.vae_channels),
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=cfg.resolution,
    )


def build_unet(cfg: WorldTrainConfig, latent_size: int):
    from diffusers import UNet2DConditionModel

    channels = tuple(cfg.unet_channels)
    n = len(channels)
    attended = cfg.unet_attention_levels
    if not 1 <= attended <= n:
        raise OnewordError(f"--unet-attention-levels must be 1..{n} (levels), got {attended}")
    # By default no attention at the 16x16 level: it costs ~2-3x the step time on a 2-core
    # CPU (measured: 0.83 s vs 3.0 s per batch of 96); cross-attention at 8x8 and 4x4 binds
    # words. Levels are listed from the highest resolution down.
    plain = n - attended
    heads = tuple(cfg.unet_attention_heads)
    if len(heads) not in (1, n) or min(heads) < 1:
        raise OnewordError(
            f"--unet-attention-heads takes one count or {n} (one per level), got {list(heads)}"
        )
    heads = heads[0] if len(heads) == 1 else heads
    return UNet2DConditionModel(
        sample_size=latent_size,
        in_channels=cfg.vae_latent_channels,
        out_channels=cfg.vae_latent_channels,
        block_out_channels=channels,
        layers_per_block=cfg.unet_layers,
        down_block_types=("DownBlock2D",) * plain + ("CrossAttnDownBlock2D",) * attended,
        up_block_types=("CrossAttnUpBlock2D",) * attended + ("UpBlock2D",) * plain,
        cross_attention_dim=cfg.text_width,
        attention_head_dim=heads,
        norm_num_groups=8,
    )


def warm_start_unet(unet, folder: str | Path) -> dict:
    """Copy a saved UNet's matching tensors into `unet`; new transformer blocks become
    identities (their output projection zeroed: Transformer2DModel adds it to its input).

    Returns {"copied": n, "new": [names of tensors the folder lacks]}. A tensor present in
    both with another shape is an error (the folder is another architecture, not a subset).
    """
    from diffusers import UNet2DConditionModel

    source = UNet2DConditionModel.from_pretrained(str(folder), torch_dtype=torch.float32)
    theirs, ours = source.state_dict(), unet.state_dict()
    mismatched = [k for k in theirs if k in ours and theirs[k].shape != ours[k].shape]
    missing = [k for k in theirs if k not in ours]
    if mismatched or missing:
        raise OnewordError(
            f"--unet-init {folder}: not a subset of this UNet ({len(mismatched)} tensors of "
            f"another shape, e.g. {(mismatched or missing)[0]}; {len(missing)} unknown); "
            "match --unet-channels and --unet-layers to it"
        )
    new = sorted(set(ours) - set(theirs))
    unet.load_state_dict(theirs, strict=False)
    with torch.no_grad():
        for name, module in unet.named_modules():
            if type(module).__name__ == "Transformer2DModel" and any(
                k.startswith(name + ".proj_out") for k in new
            ):
                module.proj_out.weight.zero_()
                module.proj_out.bias.zero_()
    return {"copied": len(theirs), "new": new}


def _save_fp16(module, folder: Path) -> None:
    """save_pretrained with fp16 weights (half the size) but dtype float32 in the config, so
    `from_pretrained` without torch_dtype still gives an fp32 model (CPU-friendly)."""
    # .half(), not .to(dtype): diffusers warns on a dtype cast through to() for models that
    # list modules to keep in fp32; those are fp32 again on load (the config says float32).
    module = copy.deepcopy(module).cpu().half()
    module.save_pretrained(folder, safe_serialization=True)
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    for key in ("torch_dtype", "dtype"):
        if key in config:
            config[key] = "float32"
    config_path.write_text(json.dumps(config, indent=2))


def load_clip_parts(out: Path, device: torch.device):
    """The exported text tower (CLIPTextModel) and tokenizer, frozen."""
    from transformers import CLIPTextModel

    from oneword.tokenizer import load_clip_tokenizer

    text_encoder = CLIPTextModel.from_pretrained(out / "text_encoder", torch_dtype=torch.float32)
    return load_clip_tokenizer(out / "tokenizer"), text_encoder.to(device).eval().requires_grad_(
        False
    )


# ----------------------------------------------------------------------------- stages


def _run_loop(
    cfg,
    stage: str,
    steps: int,
    state: StageState,
    modules: dict,
    optimizer,
    batches: Batches,
    step_fn,
    start_step: int,
    scheduler=None,
    started: float | None = None,
) -> int:
    """The shared outer loop: step -> log -> periodic save; stops at `steps` or the time cap."""
    start = started or time.time()
    cap = float(cfg.stage_seconds.get(stage, 0) or 0)
    bar = tqdm(range(start_step, steps), desc=f"world {stage}", initial=start_step, total=steps)
    step = start_step
    for step in bar:
        if step % 25 == 0:
            _follow_threads(cfg, stage)
        loss, info = step_fn()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(
            [p for m in modules.values() for p in m.parameters() if p.requires_grad], 1.0
        )
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        if "ema" in info:
            info.pop("ema")()
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % 50 == 0 or step + 1 == steps:
            _log(
                cfg,
                stage,
                {"step": step + 1, "loss": loss.item(), "seconds": time.time() - start, **info},
            )
        if (step + 1) % cfg.save_every == 0 or step + 1 == steps:
            state.save(_snapshot(modules, optimizer, batches, step + 1, scheduler))
        if (cap and time.time() - start > cap) or state.stop_requested:
            state.save(_snapshot(modules, optimizer, batches, step + 1, scheduler))
            return step + 1
    return step + 1


def _snapshot(modules, optimizer, batches, step, scheduler) -> dict:
    return {
        "modules": {k: m.state_dict() for k, m in modules.items()},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "batches": batches.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "step": step,
    }


def _restore(snapshot, modules, optimizer, batches, scheduler) -> int:
    for k, m in modules.items():
        m.load_state_dict(snapshot["modules"][k])
    optimizer.load_state_dict(snapshot["optimizer"])
    if scheduler is not None and snapshot.get("scheduler"):
        scheduler.load_state_dict(snapshot["scheduler"])
    batches.load_state_dict(snapshot["batches"])
    torch.set_rng_state(snapshot["torch_rng"])
    if snapshot.get("cuda_rng") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(snapshot["cuda_rng"])
    return int(snapshot["step"])


def _masked_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over labels != -100; 0 (not NaN) when a batch has none."""
    total = F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")
    return total / (labels != -100).sum().clamp(min=1)


def train_clip(cfg: WorldTrainConfig, device: torch.device) -> dict:
    """Contrastive CLIP on captions naming every value + attribute heads on image features."""
    return _train_clip(cfg, device, vision_only=False)


def train_clip_vision(cfg: WorldTrainConfig, device: torch.device) -> dict:
    """More training of the CLIP's vision tower with its text tower frozen (contrastive
    against the fixed text features, plus the image attribute heads). The UNet reads only
    the text tower, so this can run beside the UNet; only image_encoder/ is re-exported."""
    return _train_clip(cfg, device, vision_only=True)


def _train_clip(cfg: WorldTrainConfig, device: torch.device, *, vision_only: bool) -> dict:
    from transformers import CLIPVisionModelWithProjection

    from oneword.tokenizer import load_clip_tokenizer, write_clip_tokenizer

    out = Path(cfg.out)
    if not (out / "tokenizer" / "vocab.json").exists():
        write_clip_tokenizer(out / "tokenizer")
    tokenizer = load_clip_tokenizer(out / "tokenizer")
    clip = build_clip(cfg).to(device)
    heads = nn.ModuleDict(
        {a: nn.Linear(cfg.vision_width, len(world.VALUES[a])) for a in world.ATTRIBUTES}
    ).to(device)
    # The same on the text side: the caption's end token must tell which value it names.
    # Without it, contrastive training alone let the text tower erase the shape words while
    # the vision tower could not yet see shapes (measured: hidden states of captions that
    # differ only in the shape had cosine 0.94-0.998), and the UNet never learned shapes.
    text_heads = nn.ModuleDict(
        {a: nn.Linear(cfg.text_width, len(world.VALUES[a])) for a in world.ATTRIBUTES}
    ).to(device)
    modules = {"clip": clip, "heads": heads, "text_heads": text_heads}
    stage = "clip_vision" if vision_only else "clip"
    if vision_only:
        clip_state = StageState(cfg, "clip").load()
        if clip_state is not None:
            for name, module in modules.items():
                module.load_state_dict(clip_state["modules"][name])
        elif (out / "image_encoder").is_dir() and (out / "text_encoder").is_dir():
            _load_exported_clip(clip, out)  # a world whose work folder is gone; heads start anew
        else:
            raise OnewordError(
                f"the clip_vision stage starts from {cfg.work}/clip/state.pt or an exported "
                f"CLIP in {out}: train the clip stage first"
            )
        # Everything the text side exports stays as the UNet saw it.
        for module in (clip.text_model, clip.text_projection, text_heads):
            module.requires_grad_(False)
        clip.logit_scale.requires_grad_(False)
    optimizer = torch.optim.AdamW(
        [p for m in modules.values() for p in m.parameters() if p.requires_grad],
        lr=cfg.clip_lr,
        weight_decay=0.05,
    )
    batches = Batches(cfg.seed + (9 if vision_only else 1), cfg.resolution, device)
    state = StageState(cfg, stage)
    start_step = (
        _restore(state.load(), modules, optimizer, batches, None) if state.path.exists() else 0
    )

    def step_fn():
        pixels, captions, labels, text_labels = batches.next_with_mentions(cfg.clip_batch)
        input_ids = tokenizer(
            captions, padding=True, truncation=True, max_length=77, return_tensors="pt"
        ).input_ids.to(device)
        with _autocast(device, cfg):
            output = clip(input_ids=input_ids, pixel_values=to_unit(pixels), return_loss=True)
            pooled = output.vision_model_output.last_hidden_state[:, 0]  # class token (b, width)
            aux = sum(
                F.cross_entropy(heads[a](pooled).float(), labels[a].to(device))
                for a in world.ATTRIBUTES
            )
            # The first end-of-text token (padding repeats it), before the projection.
            hidden = output.text_model_output.last_hidden_state  # (b, n, text_width)
            end = (input_ids == tokenizer.eos_token_id).int().argmax(-1)
            end_token = hidden[torch.arange(hidden.shape[0], device=device), end]
            text_aux = sum(
                _masked_cross_entropy(text_heads[a](end_token).float(), text_labels[a].to(device))
                for a in world.ATTRIBUTES
            )
            if vision_only:
                text_aux = text_aux.detach()  # frozen: reported, not trained
        loss = output.loss + cfg.clip_aux_weight * (aux + text_aux)
        return loss, {"aux": aux.item(), "text_aux": text_aux.item()}

    clip.train()
    total = cfg.clip_vision_steps if vision_only else cfg.clip_steps
    steps = _run_loop(cfg, stage, total, state, modules, optimizer, batches, step_fn, start_step)

    # Zero-shot check on fresh renders: does the image feature pick the right attribute value
    # among prompts that name each value? (reported in the model card)
    clip.eval()
    accuracy = clip_zero_shot(
        clip, tokenizer, device, cfg.resolution, seed=cfg.seed + 99, n=cfg.eval_renders // 4
    )
    probe = {
        a: float(v)
        for a, v in _head_accuracy(
            clip, heads, device, cfg.resolution, cfg.seed + 98, n=cfg.eval_renders // 4
        ).items()
    }

    # Export: the text tower as the pipeline's text_encoder, the vision tower as image_encoder.
    from transformers import CLIPImageProcessor, CLIPTextModel

    if not vision_only:
        text_encoder = CLIPTextModel(clip.config.text_config)
        text_encoder.load_state_dict(clip.text_model.state_dict(), strict=False)
        _save_fp16(text_encoder, out / "text_encoder")
    vision = CLIPVisionModelWithProjection(clip.config.vision_config)
    vision.load_state_dict(
        {
            k: v
            for k, v in clip.state_dict().items()
            if k.startswith(("vision_model.", "visual_projection."))
        }
    )
    _save_fp16(vision, out / "image_encoder")
    CLIPImageProcessor(
        do_resize=True,
        size={"shortest_edge": cfg.resolution},
        do_center_crop=True,
        crop_size={"height": cfg.resolution, "width": cfg.resolution},
        do_normalize=True,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    ).save_pretrained(out / "feature_extractor")
    from safetensors.torch import save_file

    # The text projection and temperature complete the CLIP for CLIP-T scoring.
    with atomic_path(out / "image_encoder" / "text_projection.safetensors") as tmp:
        save_file(
            {
                "text_projection.weight": clip.text_projection.weight.detach().cpu().contiguous(),
                "logit_scale": clip.logit_scale.detach().cpu().reshape(1),
            },
            str(tmp),
        )
    info = {"steps": steps, "zero_shot_accuracy": accuracy, "linear_head_accuracy": probe}
    state.mark_done(info)
    return info


def _load_exported_clip(clip, out: Path) -> None:
    """Fill a `CLIPModel` from a world folder's text_encoder/ and image_encoder/ (with its
    text_projection.safetensors), as the clip stage exported them."""
    from safetensors.torch import load_file
    from transformers import CLIPTextModel, CLIPVisionModelWithProjection

    text = CLIPTextModel.from_pretrained(out / "text_encoder", torch_dtype=torch.float32)
    vision = CLIPVisionModelWithProjection.from_pretrained(
        out / "image_encoder", torch_dtype=torch.float32
    )
    extra = load_file(str(out / "image_encoder" / "text_projection.safetensors"))
    # CLIPTextModel's keys lack the "text_model." prefix in transformers >= 5, not before.
    state = {
        **{k if k.startswith("text_model.") else f"text_model.{k}": v
           for k, v in text.state_dict().items()},
        **vision.state_dict(),
    }  # fmt: skip
    state["text_projection.weight"] = extra["text_projection.weight"].float()
    state["logit_scale"] = extra["logit_scale"].float().reshape(())
    mine = clip.state_dict()
    wrong = [k for k in state if k in mine and state[k].shape != mine[k].shape]
    if wrong:
        raise OnewordError(
            f"the CLIP in {out} has other widths than this config ({wrong[0]}: "
            f"{tuple(state[wrong[0]].shape)} vs {tuple(mine[wrong[0]].shape)}); "
            "match --text-width/--vision-width/--projection-dim to it"
        )
    missing = clip.load_state_dict(state, strict=False).missing_keys
    if [k for k in missing if "position_ids" not in k]:
        raise OnewordError(f"the CLIP in {out} lacks {missing[:3]}")


def _tensor(features) -> torch.Tensor:
    # transformers >= 5 returns a model output whose pooler_output is the projected feature.
    return features if isinstance(features, torch.Tensor) else features.pooler_output


@torch.no_grad()
def clip_zero_shot(
    clip, tokenizer, device, resolution: int, seed: int, n: int = 512
) -> dict[str, float]:
    """Per attribute: share of fresh renders whose image feature is closest to the prompt
    naming the right value ("a {value} object", "... background", ...)."""
    scenes = world.sample_scenes(n, torch.Generator().manual_seed(seed))
    pixels = world.render(scenes, resolution, device=device)
    image = F.normalize(
        _tensor(clip.get_image_features(pixel_values=to_unit(pixels))).float(), dim=-1
    )

    def text_features(prompts: list[str]) -> torch.Tensor:
        ids = tokenizer(prompts, padding=True, return_tensors="pt").input_ids.to(device)
        return F.normalize(_tensor(clip.get_text_features(input_ids=ids)).float(), dim=-1)

    return zero_shot_accuracy(image, text_features, scenes)


@torch.no_grad()
def _head_accuracy(
    clip, heads, device, resolution: int, seed: int, n: int = 512
) -> dict[str, float]:
    scenes = world.sample_scenes(n, torch.Generator().manual_seed(seed))
    pooled = clip.vision_model(
        pixel_values=to_unit(world.render(scenes, resolution, device=device))
    ).last_hidden_state[:, 0]
    labels = world.labels(scenes)
    return {
        a: float((heads[a](pooled).argmax(-1).cpu() == labels[a]).float().mean())
        for a in world.ATTRIBUTES
    }


def _reconstruction_loss(cfg, recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L1 + L2 + `vae_edge_weight` * L1 between the finite differences along x and y;
    (b, c, h, w) images in [-1, 1] -> scalar. Shared by the vae and vae_decoder stages."""
    loss = F.l1_loss(recon, target) + F.mse_loss(recon, target)
    if cfg.vae_edge_weight:
        dx = F.l1_loss(recon.diff(dim=-1), target.diff(dim=-1))
        dy = F.l1_loss(recon.diff(dim=-2), target.diff(dim=-2))
        loss = loss + cfg.vae_edge_weight * (dx + dy)
    return loss


def _export_vae(cfg, vae, state: StageState, steps: int, device, *, scaling: float | None):
    """Measure PSNR on fresh renders, save the VAE, mark the stage done. `scaling` None:
    scale latents to unit variance, as SD does with its 0.18215 (else keep the given one)."""
    vae.eval()
    with torch.no_grad():
        pixels, *_ = Batches(cfg.seed + 3, cfg.resolution, device).next(cfg.eval_renders // 4)
        latents = vae.encode(to_unit(pixels)).latent_dist.sample()
        if scaling is None:
            scaling = float(1.0 / latents.float().std())
        recon = vae.decode(latents).sample.clamp(-1, 1)
        psnr = float(10 * torch.log10(4.0 / F.mse_loss(recon, to_unit(pixels))))
    vae.register_to_config(scaling_factor=scaling)
    _save_fp16(vae, Path(cfg.out) / "vae")
    info = {"steps": steps, "scaling_factor": scaling, "psnr_db": psnr}
    state.mark_done(info)
    return info


def object_crops(
    pixels: torch.Tensor, scenes, size: int, align: int, generator: torch.Generator
) -> torch.Tensor:
    """(n, 3, H, W) renders -> (n, 3, size, size) crops that hold each scene's object centre,
    at a random offset around it; corners on multiples of `align` (the VAE's downsampling)."""
    n, _, height, width = pixels.shape
    if size % align or not align <= size <= min(height, width):
        raise OnewordError(
            f"--vae-crop {size} must be a multiple of {align} (the VAE's downsampling) "
            f"between {align} and the resolution {min(height, width)}"
        )
    jitter = torch.rand(n, 2, generator=generator) - 0.5  # the centre anywhere in the middle half
    crops = []
    for i, scene in enumerate(scenes):
        corner = []
        for axis, limit in ((0, width), (1, height)):
            centre = scene.centre[axis] * limit + float(jitter[i, axis]) * size / 2
            start = round((centre - size / 2) / align) * align
            corner.append(min(max(start, 0), limit - size))
        x0, y0 = corner
        crops.append(pixels[i, :, y0 : y0 + size, x0 : x0 + size])
    return torch.stack(crops)


def train_vae(cfg: WorldTrainConfig, device: torch.device) -> dict:
    """AutoencoderKL with L1 + L2 reconstruction and a tiny KL (SD's VAE is KL-regularised too)."""
    vae = build_vae(cfg).to(device)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    batches = Batches(cfg.seed + 2, cfg.resolution, device)
    state = StageState(cfg, "vae")
    modules = {"vae": vae}
    start_step = (
        _restore(state.load(), modules, optimizer, batches, None) if state.path.exists() else 0
    )
    for group in optimizer.param_groups:  # a resumed run may continue at a lower rate
        group["lr"] = cfg.vae_lr

    align = 2 ** (len(cfg.vae_channels) - 1)  # crops on the latent grid: the same latents

    def step_fn():
        pixels, _, _, scenes = batches.next(cfg.vae_batch)
        if cfg.vae_crop:
            pixels = object_crops(pixels, scenes, cfg.vae_crop, align, batches.generator)
        x = to_unit(pixels)
        with _autocast(device, cfg):
            posterior = vae.encode(x).latent_dist
            recon = vae.decode(posterior.sample()).sample.float()
        kl = posterior.kl().mean()
        loss = _reconstruction_loss(cfg, recon, x) + cfg.vae_kl_weight * kl
        return loss, {"kl": kl.item()}

    vae.train()
    steps = _run_loop(
        cfg, "vae", cfg.vae_steps, state, modules, optimizer, batches, step_fn, start_step
    )
    return _export_vae(cfg, vae, state, steps, device, scaling=None)


def train_vae_decoder(cfg: WorldTrainConfig, device: torch.device) -> dict:
    """More decoder training with the exported encoder frozen; the latent space, its scaling
    factor and so any UNet trained on it are unchanged."""
    vae = load_vae(cfg, device)  # the exported VAE: its encoder is what the UNet saw
    scaling = float(vae.config.scaling_factor)
    vae_state = StageState(cfg, "vae").load()
    if vae_state is not None:  # the fp32 decoder (the export is fp16)
        decoder_state = {
            k: v
            for k, v in vae_state["modules"]["vae"].items()
            if k.startswith(("decoder.", "post_quant_conv."))
        }
        vae.load_state_dict(decoder_state, strict=False)
    decoder = [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]
    for p in decoder:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(decoder, lr=cfg.vae_lr, weight_decay=0.0)
    batches = Batches(cfg.seed + 8, cfg.resolution, device)
    state = StageState(cfg, "vae_decoder")
    modules = {"vae": vae}
    start_step = (
        _restore(state.load(), modules, optimizer, batches, None) if state.path.exists() else 0
    )

    def step_fn():
        pixels, *_ = batches.next(cfg.vae_batch)
        x = to_unit(pixels)
        with torch.no_grad():
            latents = vae.encode(x).latent_dist.sample()
        with _autocast(device, cfg):
            recon = vae.decode(latents).sample.float()
        return _reconstruction_loss(cfg, recon, x), {}

    vae.decoder.train()
    steps = _run_loop(
        cfg,
        "vae_decoder",
        cfg.vae_decoder_steps,
        state,
        modules,
        optimizer,
        batches,
        step_fn,
        start_step,
    )
    return _export_vae(cfg, vae, state, steps, device, scaling=scaling)


def load_vae(cfg: WorldTrainConfig, device):
    from diffusers import AutoencoderKL

    return (
        AutoencoderKL.from_pretrained(Path(cfg.out) / "vae", torch_dtype=torch.float32)
        .to(device)
        .eval()
        .requires_grad_(False)
    )


def train_oracle(cfg: WorldTrainConfig, device: torch.device) -> dict:
    """Attribute classifier on clean renders and on VAE reconstructions of a quarter of each
    batch (samples come out of the VAE decoder, so the oracle must read those too)."""
    vae = load_vae(cfg, device)
    oracle = Oracle(
        OracleConfig(
            resolution=cfg.resolution,
            attributes={a: list(world.VALUES[a]) for a in world.ATTRIBUTES},
        )
    ).to(device)
    optimizer = torch.optim.AdamW(oracle.parameters(), lr=cfg.oracle_lr, weight_decay=0.01)
    batches = Batches(cfg.seed + 4, cfg.resolution, device)
    state = StageState(cfg, "oracle")
    modules = {"oracle": oracle}
    start_step = (
        _restore(state.load(), modules, optimizer, batches, None) if state.path.exists() else 0
    )
    if not start_step and cfg.oracle_init:
        oracle.load_state_dict(Oracle.load(cfg.oracle_init).state_dict())
    for group in optimizer.param_groups:  # a resumed run may continue at a lower rate
        group["lr"] = cfg.oracle_lr

    def step_fn():
        pixels, _, labels, _ = batches.next(cfg.oracle_batch)
        x = to_unit(pixels)
        quarter = x.shape[0] // 4  # a quarter as VAE reconstructions: robust, and cheap enough
        with torch.no_grad():
            x[:quarter] = vae.decode(vae.encode(x[:quarter]).latent_dist.sample()).sample.clamp(
                -1, 1
            )
        with _autocast(device, cfg):
            return oracle.loss(x, labels), {}

    oracle.train()
    steps = _run_loop(
        cfg, "oracle", cfg.oracle_steps, state, modules, optimizer, batches, step_fn, start_step
    )
    oracle.eval()
    pixels, _, labels, _ = Batches(cfg.seed + 5, cfg.resolution, device).next(cfg.eval_renders)
    accuracy = oracle_accuracy(oracle, pixels, labels)
    oracle.save(Path(cfg.out) / "oracle")
    info = {"steps": steps, "accuracy_fresh_renders": accuracy}
    state.mark_done(info)
    return info


def _oracle_ready(cfg: WorldTrainConfig) -> bool:
    """Whether the output folder holds a finished oracle (the UNet's fidelity checks read it)."""
    exported = (Path(cfg.out) / "oracle" / "model.safetensors").is_file()
    in_progress = StageState(cfg, "oracle").path.exists() and not StageState(cfg, "oracle").done
    return exported and not in_progress


def train_unet(cfg: WorldTrainConfig, device: torch.device) -> dict:
    """The denoiser: epsilon-prediction MSE on VAE latents, conditioned on the frozen text tower."""
    from diffusers import DDIMScheduler, DDPMScheduler

    weights = unet_pattern_weights(cfg)  # checks both pattern settings before any work
    out = Path(cfg.out)
    tokenizer, text_encoder = load_clip_parts(out, device)
    vae = load_vae(cfg, device)
    scaling = float(vae.config.scaling_factor)
    noise_scheduler = DDPMScheduler.from_config(noise_scheduler_config())
    latent_size = cfg.resolution // 2 ** (len(cfg.vae_channels) - 1)
    unet = build_unet(cfg, latent_size)
    state = StageState(cfg, "unet")
    if cfg.unet_init and not state.path.exists():  # a resume has its own weights
        started_from = warm_start_unet(unet, cfg.unet_init)
        _log(cfg, "unet-init", {"from": cfg.unet_init, "copied": started_from["copied"],
                                "new": len(started_from["new"])})  # fmt: skip
    unet = unet.to(device)
    ema = copy.deepcopy(unet).requires_grad_(False)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=cfg.unet_lr, weight_decay=0.01)
    warmup = max(1, cfg.unet_warmup)

    cap = float(cfg.stage_seconds.get("unet", 0) or 0)
    started = time.time()

    def lr_factor(s: int) -> float:  # linear warmup, then cosine down to 10%
        progress = s / max(1, cfg.unet_steps)
        if cap:
            progress = max(progress, (time.time() - started) / cap)
        cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return min(1.0, (s + 1) / warmup) * (0.1 + 0.9 * cosine)

    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    batches = Batches(cfg.seed + 6, cfg.resolution, device)
    modules = {"unet": unet, "ema": ema}
    start_step = (
        _restore(state.load(), modules, optimizer, batches, lr_schedule)
        if state.path.exists()
        else 0
    )
    alphas = noise_scheduler.alphas_cumprod.to(device)
    pool = (
        LatentPool(
            vae,
            cfg.unet_pool,
            cfg.seed + 7,
            cfg.resolution,
            device,
            state.folder / "pool.safetensors",
        )
        if cfg.unet_pool
        else None
    )

    def update_ema():
        with torch.no_grad():
            for e, p in zip(ema.parameters(), unet.parameters()):
                e.lerp_(p.detach(), 1 - cfg.ema_decay)

    def step_fn():
        with torch.no_grad():
            if pool is not None:
                latents, captions = pool.next(
                    batches, cfg.unet_batch, cfg.caption_dropout, cfg.unet_omit_solid, weights
                )
            else:
                pixels, captions, *_ = batches.next(
                    cfg.unet_batch,
                    drop_prob=cfg.caption_dropout,
                    omit_solid=cfg.unet_omit_solid,
                    pattern_weights=weights,
                )
                latents = vae.encode(to_unit(pixels)).latent_dist.sample()
            latents = latents * scaling  # (b, 4, 16, 16)
            hidden = text_encoder(tokenize(tokenizer, captions, device))[0]  # (b, 77, d)
        noise = torch.randn_like(latents)
        t = torch.randint(
            0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), device=device
        )
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
        with _autocast(device, cfg):
            prediction = unet(noisy, t, hidden).sample.float()
        per_sample = F.mse_loss(prediction, noise, reduction="none").mean(dim=(1, 2, 3))
        if cfg.unet_min_snr_gamma:
            snr = a.flatten() / (1 - a.flatten())
            per_sample = per_sample * snr.clamp(max=cfg.unet_min_snr_gamma) / snr
        return per_sample.mean(), {
            "ema": update_ema,
            "lr": lr_schedule.get_last_lr()[0],
        }

    history = []
    unet.train()
    total = cfg.unet_steps
    step = start_step
    chunk = cfg.fidelity_every or total
    while step < total:
        target = min(total, (step // chunk + 1) * chunk)
        step = _run_loop(
            cfg,
            "unet",
            target,
            state,
            modules,
            optimizer,
            batches,
            step_fn,
            step,
            lr_schedule,
            started,
        )
        if (cap or state.stop_requested) and step < target:
            break
        if step < total and not _oracle_ready(cfg):
            _log(cfg, "unet-fidelity", {"step": step, "skipped": "the oracle is not trained yet"})
        elif step < total:
            unet.eval()
            record = {
                "step": step,
                "raw": quick_fidelity(unet, vae, tokenizer, text_encoder, cfg, device),
            }
            record["ema"] = quick_fidelity(ema, vae, tokenizer, text_encoder, cfg, device)
            history.append(record)
            _log(cfg, "unet-fidelity", record)
            unet.train()

    # Keep the EMA weights if they are at least as faithful as the raw ones at the end.
    unet.eval()
    while not _oracle_ready(cfg) and _threads_file(cfg, "oracle").exists():
        time.sleep(5.0)  # the oracle is training beside the UNet (--jobs)
    if not _oracle_ready(cfg):
        raise OnewordError(
            f"the UNet's final check needs the oracle in {Path(cfg.out) / 'oracle'}: "
            "train it first (--stages oracle)"
        )
    final = {
        "raw": quick_fidelity(unet, vae, tokenizer, text_encoder, cfg, device),
        "ema": quick_fidelity(ema, vae, tokenizer, text_encoder, cfg, device),
    }

    # All attributes at once first, then the mean over attributes (early on "all" is 0 for both).
    def rank(scores: dict) -> tuple[float, float]:
        return scores["all"], sum(scores[a] for a in world.ATTRIBUTES) / len(world.ATTRIBUTES)

    chosen = "ema" if rank(final["ema"]) >= rank(final["raw"]) else "raw"
    _save_fp16(ema if chosen == "ema" else unet, out / "unet")
    DDIMScheduler.from_config(noise_scheduler_config()).save_pretrained(out / "scheduler")
    info = {
        "steps": step,
        "chosen_weights": chosen,
        "final_quick_fidelity": final,
        "history": history,
    }
    state.mark_done(info)
    return info


# ----------------------------------------------------------------------------- the command


# model_index.json's components (library, class); each is a folder of a finished world.
PIPELINE_COMPONENTS: dict[str, list[str]] = {
    "feature_extractor": ["transformers", "CLIPImageProcessor"],
    "image_encoder": ["transformers", "CLIPVisionModelWithProjection"],
    "scheduler": ["diffusers", "DDIMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}
PIPELINE_PARTS = (*PIPELINE_COMPONENTS, "oracle")  # every folder a finished world holds


def write_pipeline_index(
    cfg: WorldTrainConfig, infos: dict, *, inherited: dict | None = None
) -> None:
    """model_index.json (a StableDiffusionPipeline with its CLIP vision tower) and world.json.

    `inherited`: {"stages": [...], "config": {...}}, the stages whose facts come from the
    folder's earlier world.json (not this run) and the config they were trained with."""
    from oneword import __version__

    out = Path(cfg.out)
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": __import__("diffusers").__version__,
        **PIPELINE_COMPONENTS,
        "requires_safety_checker": False,
        "safety_checker": [None, None],
    }
    atomic_write_text(out / "model_index.json", json.dumps(index, indent=2))
    facts = {
        "kind": "oneword-miniature-world",
        "oneword_version": __version__,
        "resolution": cfg.resolution,
        "attributes": {a: list(world.VALUES[a]) for a in world.ATTRIBUTES},
        "unnamed": sorted(world.UNNAMED) if hasattr(world, "UNNAMED") else [],
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
        "stages": infos,
    }
    if inherited is not None:
        facts["inherited"] = inherited
    atomic_write_text(out / "world.json", json.dumps(facts, indent=2))


# What each stage reads from the output folder (for running stages side by side).
NEEDS: dict[str, tuple[str, ...]] = {
    "clip": (),
    "clip_vision": ("clip",),
    "vae": (),
    "vae_decoder": ("vae",),
    "oracle": ("vae",),
    "unet": ("clip", "vae"),
}


def _threads_file(cfg: WorldTrainConfig, stage: str) -> Path:
    return Path(cfg.work) / stage / "threads"


def _follow_threads(cfg: WorldTrainConfig, stage: str) -> None:
    """Take the thread count the parent of a side-by-side run asks for (`--jobs`)."""
    path = _threads_file(cfg, stage)
    if path.is_file():
        text = path.read_text().strip()
        try:
            wanted = int(text or 0)
        except ValueError:  # a typo must not end hours of training
            log.warning("%s: ignoring %s: %r is not a thread count", stage, path, text)
            return
        if wanted > 0 and wanted != torch.get_num_threads():
            torch.set_num_threads(wanted)
            log.info("%s: now %d threads", stage, wanted)


def _stage_worker(cfg_dict: dict, stage: str) -> None:
    cfg = WorldTrainConfig(**cfg_dict)
    logging.basicConfig(level=logging.INFO)
    train_world(replace(cfg, stages=(stage,), jobs=1, threads=1))


def _train_side_by_side(cfg: WorldTrainConfig) -> None:
    """Run the unfinished stages of `cfg.stages` as up to `cfg.jobs` processes at once, each
    as soon as the stages it reads (`NEEDS`) are done; one thread per process, and all
    `cfg.jobs` threads for a stage that is left running alone with nothing to wait for."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")  # no forked torch thread pools
    order = [s for s in (*STAGES, *OPTIONAL_STAGES) if s in cfg.stages]
    pending = [s for s in order if not StageState(cfg, s).done]
    unknown = [
        n for s in pending for n in NEEDS[s] if n not in order and not StageState(cfg, n).done
    ]
    if unknown:
        raise OnewordError(
            f"stages {pending} need {sorted(set(unknown))} done first: add them to --stages"
        )
    running: dict[str, multiprocessing.Process] = {}
    cfg_dict = asdict(cfg)
    while pending or running:
        for stage, process in list(running.items()):
            if process.is_alive():
                continue
            process.join()
            del running[stage]
            if process.exitcode != 0 or not StageState(cfg, stage).done:
                for other in running.values():
                    other.terminate()
                raise OnewordError(
                    f"world stage {stage!r} failed (exit code {process.exitcode}); its state "
                    f"is in {Path(cfg.work) / stage}, rerun the same command to resume"
                )
        ready = [s for s in pending if all(StageState(cfg, n).done for n in NEEDS[s])]
        for stage in ready[: max(0, cfg.jobs - len(running))]:
            pending.remove(stage)
            _threads_file(cfg, stage).parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(_threads_file(cfg, stage), "1")
            process = context.Process(target=_stage_worker, args=(cfg_dict, stage), name=stage)
            process.start()
            running[stage] = process
        if len(running) == 1:  # nothing else can start until it ends: give it every core
            (alone,) = running
            atomic_write_text(_threads_file(cfg, alone), str(cfg.jobs))
        time.sleep(1.0)


def train_world(cfg: WorldTrainConfig) -> dict:
    """Run the missing stages in order and write the pipeline folder. Returns per-stage info.

    With `cfg.jobs` > 1, independent stages run side by side in their own processes.
    """
    unet_pattern_weights(cfg)  # a bad pattern setting fails now, not after the first stages
    check_stage_seconds(cfg)  # a misspelt stage would otherwise run without its cap
    if cfg.jobs > 1:
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
        Path(cfg.work).mkdir(parents=True, exist_ok=True)
        started = time.time()
        _train_side_by_side(cfg)
        _log(cfg, "run", {"jobs": cfg.jobs, "stages": list(cfg.stages),
                          "wall_seconds": time.time() - started})  # fmt: skip
        return train_world(replace(cfg, jobs=1, stages=()))  # collects infos, writes the index
    device = _device(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    Path(cfg.work).mkdir(parents=True, exist_ok=True)
    runners = {
        "clip": train_clip,
        "clip_vision": train_clip_vision,
        "vae": train_vae,
        "vae_decoder": train_vae_decoder,
        "oracle": train_oracle,
        "unet": train_unet,
    }
    infos = {}
    for stage, runner in runners.items():  # in training order
        state = StageState(cfg, stage)
        if stage in OPTIONAL_STAGES and stage not in cfg.stages and not state.done:
            continue  # never run unless named; once run, its measurements go to world.json
        if state.done:
            infos[stage] = json.loads((state.folder / "done").read_text())
            continue
        if stage not in cfg.stages:
            continue
        started = time.time()
        info = runner(cfg, device)
        info["seconds"] = time.time() - started
        info["device"] = str(device) if device.type == "cpu" else torch.cuda.get_device_name(device)
        state.mark_done(info)
        infos[stage] = info
        print(json.dumps({stage: {k: v for k, v in info.items() if k != "history"}}, default=str))
    if all(StageState(cfg, s).done for s in STAGES):
        write_pipeline_index(cfg, infos)
    elif infos and all((Path(cfg.out) / part).is_dir() for part in PIPELINE_PARTS):
        # A world continued from another one (e.g. its UNet trained on into a copy of its
        # folder): this work folder knows only some stages, the folder's world.json the rest.
        facts = _read_world_facts(Path(cfg.out))
        previous = facts.get("stages", {})
        inherited = {"stages": sorted(set(previous) - set(infos)), "config": facts.get("config")}
        write_pipeline_index(cfg, {**previous, **infos}, inherited=inherited)
    return infos


def _read_world_facts(out: Path) -> dict:
    """The folder's world.json, or {} when it has none or it cannot be read."""
    try:
        return json.loads((out / "world.json").read_text())
    except (OSError, ValueError):
        return {}


# ---------------------------------------------------------------------------------------
# Command line: `python train_world.py ...`, the same as `oneword world train ...`

EXAMPLES = """\
examples:
  python train_world.py --preset cpu --out checkpoints/world
  python train_world.py --preset tiny --out /tmp/w --work /tmp/w-work
  oneword world train --preset cpu --out checkpoints/world      # the same, from the CLI
"""


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags: --preset, then one per `WorldTrainConfig` field (help: `FLAG_HELP`)."""
    from oneword.cli.config import add_config_flags

    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="cpu",
        help="settings the flags below override: cpu (the shipped world's recipe), gpu "
        "(larger batches and more steps), tiny (seconds; for tests)",
    )

    def cpu_preset(f) -> str:
        cpu = PRESETS["cpu"].get(f.name, f.default)
        cpu = " ".join(map(str, cpu)) if isinstance(cpu, tuple) else cpu
        return f" (the cpu preset: {cpu})"

    names = [
        f.name
        for f in fields(WorldTrainConfig)
        if f.name not in ("extra", "stages", "stage_seconds", "unet_pattern_weight")
    ]
    add_config_flags(
        parser,
        WorldTrainConfig,
        names,
        overrides={name: {"help": FLAG_HELP[name]} for name in names},
        help_suffix=cpu_preset,
    )
    parser.add_argument(
        "--stages",
        nargs="+",
        choices=STAGES + OPTIONAL_STAGES,
        default=None,
        help="stages to run (default: all of " + ", ".join(STAGES) + "; vae_decoder only when "
        "named: more decoder training with the encoder frozen, after the UNet has started)",
    )
    parser.add_argument(
        "--stage-seconds",
        nargs="+",
        default=None,
        metavar="STAGE=SECONDS",
        help="wall-time cap per stage, e.g. clip=60 unet=300",
    )
    parser.add_argument(
        "--unet-pattern-weight",
        nargs="+",
        default=None,
        metavar="PATTERN=WEIGHT",
        help=FLAG_HELP["unet_pattern_weight"] + " (the cpu preset: none)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="train_world.py",
        description=__doc__,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_train_arguments(parser)
    return parser


def config_from_args(args) -> WorldTrainConfig:
    from oneword.cli.config import config_from_flags

    base = replace(WorldTrainConfig(), **PRESETS[args.preset])
    convert = {
        name: functools.partial(_name_values, flag="--" + name.replace("_", "-"))
        for name in ("stage_seconds", "unet_pattern_weight")
    }
    return config_from_flags(args, WorldTrainConfig, base, convert=convert)


def _name_values(items: list[str], flag: str) -> dict[str, float]:
    """["clip=60", "unet=300"] -> {"clip": 60.0, "unet": 300.0}."""
    out = {}
    for item in items:
        name, _, value = item.partition("=")
        try:
            out[name] = float(value)  # no "=": value is "", which float() refuses too
        except ValueError:
            name = ""
        if not name:
            raise OnewordError(f"{flag} {item}: expected NAME=NUMBER")
    return out


def run(args: argparse.Namespace) -> int:
    """Train with the parsed flags (`build_parser`); prints the resolved config first.

    --out and --work are checked and owned (`prepare_out_dir`) before any stage runs. Only
    this process holds the locks: the stage processes of --jobs run `train_world`, not
    `run`, so they write into the folders their parent owns."""
    from oneword.io import prepare_out_dir

    cfg = config_from_args(args)
    owned = [prepare_out_dir(cfg.out), prepare_out_dir(cfg.work, what="--work")]  # noqa: F841
    print(json.dumps({"config": asdict(cfg)}, default=str))
    train_world(cfg)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python train_world.py ...`; bad input ends as one line on stderr and exit status 2."""
    import sys

    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except OnewordError as exc:
        print(f"train_world.py: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
