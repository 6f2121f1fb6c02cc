"""Frozen CLIP image towers: pooled and penultimate token features for the concept encoder.

A tower is chosen by a config string, stored in the encoder file so that loading an encoder
knows which tower it was trained on:

| spec                              | what it loads                                                |
|-----------------------------------|--------------------------------------------------------------|
| `world`                           | `<model>/image_encoder` (transformers) with the preprocessing |
|                                   | of `<model>/feature_extractor` (mean/std 0.5 without one)     |
| `transformers:FOLDER_OR_HUB_ID`   | `CLIPVisionModelWithProjection` (or `CLIPVisionModel`)        |
| `open_clip:NAME[:PRETRAINED]`     | an open_clip model's visual tower, e.g. `ViT-L-14:openai`     |
| `open_clip:local-dir:/path`       | an open_clip folder (config + weights)                        |

Towers that match Stable Diffusion's text encoders: `open_clip:ViT-L-14:openai` (SD 1.x),
`open_clip:ViT-H-14:laion2b_s32b_b79k` (SD 2.x), `open_clip:ViT-bigG-14:laion2b_s39b_b160k`
(SDXL's second encoder). `pretrained` left out gives random weights, which is only useful
for tests.

Features, as in the image-prompt adapters (IP-Adapter "plus" reads the penultimate layer):
the pooled (projected) image embedding (b, p) and the penultimate layer's tokens (b, t, w),
class token included (transformers `hidden_states[-2]`, open_clip `forward_intermediates`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import OnewordError

# OpenAI CLIP's pixel statistics: the default for transformers towers without a
# preprocessor_config.json. The world's CLIP was trained with mean = std = 0.5.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
WORLD_MEAN = WORLD_STD = (0.5, 0.5, 0.5)


@dataclass
class ImageFeatures:
    """What the encoder reads from a tower, fp32.

    Attributes:
        pooled: (b, p) the pooled (projected when the tower has a projection) embedding.
        tokens: (b, t, w) the penultimate layer's tokens, class token first.
    """

    pooled: torch.Tensor
    tokens: torch.Tensor


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def _read_preprocessing(folder: Path, default_mean, default_std):
    """mean/std from a CLIPImageProcessor's preprocessor_config.json, else the defaults."""
    config_file = folder / "preprocessor_config.json"
    if not config_file.is_file():
        return tuple(default_mean), tuple(default_std)
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as error:
        raise OnewordError(f"cannot read {config_file}: {error}") from None
    return tuple(config.get("image_mean", default_mean)), tuple(
        config.get("image_std", default_std)
    )


class ImageTower(nn.Module):
    """A frozen CLIP vision tower with its own preprocessing.

    Call it with images in [-1, 1] (b, 3, H, W) of any size; it resizes them to its
    `image_size`, normalises them and returns `ImageFeatures`.
    """

    def __init__(self, spec: str, backbone: nn.Module, kind: str, *, image_size: int, mean, std):
        super().__init__()
        self.spec = spec
        self.kind = kind  # "transformers" or "open_clip"
        self.backbone = backbone.requires_grad_(False).eval()
        self.image_size = int(image_size)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        with torch.no_grad():
            probe = self(torch.zeros(1, 3, self.image_size, self.image_size))
        self.pooled_dim = int(probe.pooled.shape[-1])
        self.token_dim = int(probe.tokens.shape[-1])
        self.num_tokens = int(probe.tokens.shape[1])

    def train(self, mode: bool = True) -> ImageTower:
        super().train(False)  # frozen: dropout and the like stay off
        return self

    @property
    def dtype(self) -> torch.dtype:
        return next(self.backbone.parameters()).dtype

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """(b, 3, H, W) in [-1, 1] (or uint8) -> normalised (b, 3, S, S) in the tower's dtype."""
        if images.dtype == torch.uint8:
            images = images.float() / 127.5 - 1.0
        pixels = (images.float().to(self.mean.device) + 1) / 2  # (b, 3, H, W) in [0, 1]
        if pixels.shape[-1] != self.image_size or pixels.shape[-2] != self.image_size:
            pixels = F.interpolate(
                pixels, size=(self.image_size, self.image_size), mode="bicubic", antialias=True
            ).clamp(0, 1)
        return ((pixels - self.mean) / self.std).to(self.dtype)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> ImageFeatures:
        pixels = self.preprocess(images)
        if self.kind == "open_clip":
            visual = self.backbone
            layers = len(visual.transformer.resblocks)
            out = visual.forward_intermediates(
                pixels,
                indices=[max(0, layers - 2)],  # the penultimate block's output
                output_fmt="NLC",
                output_extra_tokens=True,
            )
            tokens = torch.cat(
                [out["image_intermediates_prefix"][0], out["image_intermediates"][0]], dim=1
            )  # (b, 1 + patches, w)
            return ImageFeatures(out["image_features"].float(), tokens.float())
        out = self.backbone(pixel_values=pixels, output_hidden_states=True)
        pooled = out.image_embeds if hasattr(out, "image_embeds") else out.pooler_output
        return ImageFeatures(pooled.float(), out.hidden_states[-2].float())


# ---------------------------------------------------------------------------------------
# Loading


def _load_transformers(spec: str, source: str, device, dtype, default_mean, default_std):
    from transformers import CLIPVisionConfig, CLIPVisionModel, CLIPVisionModelWithProjection

    folder = Path(source).expanduser()
    local = folder.is_dir()
    if local and not (folder / "config.json").is_file():
        raise OnewordError(
            f"image tower {folder} has no config.json; expected a transformers "
            "CLIPVisionModelWithProjection folder (config.json + model.safetensors)"
        )
    try:
        config = CLIPVisionConfig.from_pretrained(
            str(folder) if local else source, local_files_only=local or _offline()
        )
        with_projection = "CLIPVisionModel" not in (getattr(config, "architectures", None) or [])
        loader = CLIPVisionModelWithProjection if with_projection else CLIPVisionModel
        backbone = loader.from_pretrained(
            str(folder) if local else source,
            local_files_only=local or _offline(),
            torch_dtype=dtype,
        )
    except Exception as error:
        raise OnewordError(
            f"cannot load the image tower {source!r} ({type(error).__name__}: {error}); pass a "
            "local transformers CLIP vision folder (offline, hub ids only work once downloaded)"
        ) from None
    mean, std = default_mean, default_std
    if local:
        mean, std = _read_preprocessing(folder, default_mean, default_std)
        if not (folder / "preprocessor_config.json").is_file():
            mean, std = _read_preprocessing(folder.parent / "feature_extractor", mean, std)
    return ImageTower(
        spec,
        backbone.to(device),
        "transformers",
        image_size=int(backbone.config.image_size),
        mean=mean,
        std=std,
    )


def _load_open_clip(spec: str, rest: str, device, dtype):
    try:
        import open_clip
    except ImportError as error:
        raise OnewordError(f"tower {spec!r} needs open_clip_torch ({error})") from None
    if rest.startswith("local-dir:"):
        name, pretrained = rest, None
    else:
        name, _, pretrained = rest.partition(":")
        pretrained = pretrained or None
    if not name:
        raise OnewordError(f"tower {spec!r}: give a model name, e.g. open_clip:ViT-L-14:openai")
    try:
        model = open_clip.create_model(name, pretrained=pretrained, device="cpu")
    except Exception as error:
        raise OnewordError(
            f"cannot create open_clip model {name!r} (pretrained={pretrained!r}): "
            f"{type(error).__name__}: {error}. Offline, use open_clip:local-dir:/path or a "
            "checkpoint already in the open_clip cache"
        ) from None
    preprocess = open_clip.get_model_preprocess_cfg(model)
    visual = model.visual
    if not hasattr(visual, "forward_intermediates") or not hasattr(visual, "transformer"):
        raise OnewordError(f"tower {spec!r} is not a ViT; the encoder reads ViT patch tokens")
    size = preprocess.get("size", getattr(visual, "image_size", 224))
    size = size[0] if isinstance(size, (tuple, list)) else size
    return ImageTower(
        spec,
        visual.to(device, dtype),
        "open_clip",
        image_size=int(size),
        mean=tuple(preprocess.get("mean", OPENAI_CLIP_MEAN)),
        std=tuple(preprocess.get("std", OPENAI_CLIP_STD)),
    )


def load_tower(
    spec: str,
    *,
    model_folder: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> ImageTower:
    """Load the frozen image tower named by `spec` (see the module docstring).

    Args:
        spec: "world", "transformers:FOLDER", "open_clip:NAME[:PRETRAINED]" or
            "open_clip:local-dir:/path".
        model_folder: the diffusion model's folder ("world" reads its image_encoder/).
        device, dtype: where and in which precision the tower runs.

    Returns:
        An `ImageTower` (frozen, eval mode).
    """
    if spec == "world":
        if model_folder is None:
            raise OnewordError(
                "tower 'world' reads <model>/image_encoder, but no model folder was given"
            )
        folder = Path(model_folder) / "image_encoder"
        if not (folder / "config.json").is_file():
            raise OnewordError(
                f"tower 'world': {folder} does not exist; the model is not a miniature world. "
                "Pick a tower with --tower, e.g. open_clip:ViT-L-14:openai for SD 1.x"
            )
        return _load_transformers(spec, str(folder), device, dtype, WORLD_MEAN, WORLD_STD)
    kind, _, rest = spec.partition(":")
    if kind == "transformers" and rest:
        return _load_transformers(spec, rest, device, dtype, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    if kind == "open_clip" and rest:
        return _load_open_clip(spec, rest, device, dtype)
    raise OnewordError(
        f"unknown image tower {spec!r}; use world, transformers:FOLDER, "
        "open_clip:NAME[:PRETRAINED] or open_clip:local-dir:/path"
    )


# ---------------------------------------------------------------------------------------
# An on-disk cache of per-image features and VAE latents (for finite data, no augmentation)


class FeatureCache:
    """Tensors per image key, one small safetensors file each: DIR/<kind>/<ab>/<hash>.safetensors.

    `fingerprint` (the tower spec, the model folder, the resolution, ...) is stored in
    DIR/cache.json when the cache is created; a cache built for other settings is refused,
    so features of one tower are never read back as another's. Writes are atomic, so
    several processes may fill the same cache.
    """

    def __init__(self, folder: str | os.PathLike, fingerprint: dict):
        from ..io import atomic_write_text

        self.folder = Path(folder)
        self.fingerprint = {str(k): str(v) for k, v in fingerprint.items()}
        self.hits = 0
        self.misses = 0
        info = self.folder / "cache.json"
        if info.is_file():
            try:
                stored = json.loads(info.read_text())
            except (OSError, ValueError) as error:
                raise OnewordError(f"cannot read {info}: {error}") from None
            if stored != self.fingerprint:
                changed = sorted(
                    k
                    for k in {*stored, *self.fingerprint}
                    if stored.get(k) != self.fingerprint.get(k)
                )
                raise OnewordError(
                    f"--cache-features {self.folder} was built for other settings ({', '.join(changed)} "
                    "differ); use a new folder"
                )
        else:
            atomic_write_text(info, json.dumps(self.fingerprint, indent=2, sort_keys=True))

    def _path(self, kind: str, key: str) -> Path:
        import hashlib

        digest = hashlib.sha1(key.encode()).hexdigest()
        return self.folder / kind / digest[:2] / f"{digest}.safetensors"

    def get(self, kind: str, key: str) -> dict[str, torch.Tensor] | None:
        from safetensors.torch import load_file

        path = self._path(kind, key)
        if not path.is_file():
            self.misses += 1
            return None
        try:
            tensors = load_file(str(path))
        except Exception:  # a damaged entry is recomputed, not fatal
            self.misses += 1
            return None
        self.hits += 1
        return tensors

    def put(self, kind: str, key: str, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        from ..io import atomic_path

        with atomic_path(self._path(kind, key)) as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))


class Featurizer:
    """What the frozen parts compute from images, with an optional `FeatureCache`.

    `features`: the tower's pooled and token features (the encoder's input, for references);
    `latent_distribution`: the VAE posterior (the denoising loss's input, for targets).
    Each image is cached under its key only when `usable` says so (a key, no augmentation).
    """

    def __init__(self, tower: ImageTower, model, cache: FeatureCache | None = None):
        self.tower = tower
        self.model = model
        self.cache = cache

    def _cached(self, kind, pixels, keys, usable, compute):
        """compute(pixels) -> dict of (n, ...) tensors; rows with a usable key go through the cache."""
        if self.cache is None or not any(usable):
            return compute(pixels)
        found = [self.cache.get(kind, k) if ok else None for k, ok in zip(keys, usable)]
        missing = [i for i, f in enumerate(found) if f is None]
        if missing:
            fresh = compute(pixels[missing])
            for j, i in enumerate(missing):
                found[i] = {name: value[j] for name, value in fresh.items()}
                if usable[i]:
                    self.cache.put(kind, keys[i], found[i])
        device = self.model.device
        return {name: torch.stack([f[name].to(device) for f in found]) for name in found[0]}

    @torch.no_grad()
    def features(self, pixels, keys, usable) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 (n, 3, H, W) -> pooled (n, p), tokens (n, t, w) fp32."""

        def compute(chunk):
            out = self.tower(chunk.to(self.model.device))
            return {"pooled": out.pooled, "tokens": out.tokens}

        result = self._cached("tower", pixels, keys, usable, compute)
        return result["pooled"], result["tokens"]

    @torch.no_grad()
    def latent_distribution(self, pixels, keys, usable) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 (n, 3, H, W) -> VAE posterior mean and std, each (n, 4, h, w) fp32."""
        model = self.model

        def compute(chunk):
            images = chunk.to(model.device).float() / 127.5 - 1.0  # (n, 3, H, W) in [-1, 1]
            means, stds = [], []
            for part in images.split(16):
                posterior = model.vae.encode(part.to(model.dtype)).latent_dist
                means.append(posterior.mean.float())
                stds.append(posterior.std.float())
            return {"mean": torch.cat(means), "std": torch.cat(stds)}

        result = self._cached("latents", pixels, keys, usable, compute)
        return result["mean"], result["std"]


__all__ = ["FeatureCache", "Featurizer", "ImageFeatures", "ImageTower", "load_tower"]
