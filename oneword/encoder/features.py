"""The concept encoder's view of the images: tower features and VAE latents, cached on disk.

The frozen CLIP image towers themselves (`ImageTower`, `load_tower` and their specs) live in
`oneword.clip`, the one CLIP loader; they are re-exported here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..clip import (  # noqa: F401  (re-exported: the encoder's towers)
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    WORLD_MEAN,
    WORLD_STD,
    ImageFeatures,
    ImageTower,
    load_tower,
)
from ..errors import OnewordError

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
