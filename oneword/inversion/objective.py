"""The inversion objective: encode prompts, denoise, compare (Eq. 2 of Gal et al., 2023).

    v* = argmin_v E_{z, y, eps, t} || eps - eps_theta(z_t, t, c_theta(y)) ||^2

z are the VAE latents of the concept images, y a template prompt containing S*, eps
Gaussian noise and t a uniform timestep. For v-prediction models (SD 2.x at 768 px, the
tiny sd2) the target is the velocity v = sqrt(a_t) eps - sqrt(1 - a_t) z instead, as
diffusers' `DDPMScheduler.get_velocity` computes it.

Prompts are encoded the way the pipelines do it (`oneword.prompts`, shared with sampling),
so a token learned here means the same thing at sampling time.

The optional identity loss L_clip compares CLIP image features of a one-step denoised
estimate of the image with the mean feature of the concept images (1 - cosine).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange

from ..clip import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from ..errors import OnewordError
from ..prompts import (  # noqa: F401  (re-exported: the objective's inputs)
    PromptEmbeddings,
    add_time_ids,
    encode_prompts,
    tokenize,
    unet_conditioning,
)


def denoising_target(model, latents, noise, timesteps) -> torch.Tensor:
    """eps (epsilon models) or v = sqrt(a_t) eps - sqrt(1 - a_t) z (v-prediction models)."""
    if model.prediction_type == "epsilon":
        return noise
    if model.prediction_type == "v_prediction":
        return model.noise_scheduler.get_velocity(latents, noise, timesteps)
    raise OnewordError(
        f"prediction type {model.prediction_type!r} of {model.source} is not supported "
        "(expected 'epsilon' or 'v_prediction')"
    )


def predict_x0(model, noisy_latents, prediction, timesteps) -> torch.Tensor:
    """One-step estimate of the clean latents z_0 from the UNet's output, (b, 4, h, w)."""
    alphas = model.noise_scheduler.alphas_cumprod.to(noisy_latents.device)[timesteps]
    sqrt_alpha = rearrange(alphas.sqrt(), "b -> b 1 1 1").to(noisy_latents.dtype)
    sqrt_one_minus = rearrange((1 - alphas).sqrt(), "b -> b 1 1 1").to(noisy_latents.dtype)
    if model.prediction_type == "v_prediction":
        return sqrt_alpha * noisy_latents - sqrt_one_minus * prediction
    return (noisy_latents - sqrt_one_minus * prediction) / sqrt_alpha


@dataclass
class DenoisingOutput:
    """Per-sample loss (b,) in fp32, and what L_clip needs (noisy latents and the prediction)."""

    loss: torch.Tensor
    noisy_latents: torch.Tensor
    prediction: torch.Tensor


def denoising_loss(model, latents, embeds: PromptEmbeddings, noise, timesteps) -> DenoisingOutput:
    """Eq. 2 of Gal et al.: MSE between the UNet's prediction and its target, per sample.

    Args:
        model: a `LoadedModel`.
        latents: (b, 4, h, w) scaled clean latents z_0, fp32.
        embeds: the prompts' `PromptEmbeddings` (b rows).
        noise: (b, 4, h, w) fp32 Gaussian noise.
        timesteps: (b,) int64 in [0, num_train_timesteps).

    Returns:
        `DenoisingOutput` with loss (b,) fp32 = mean over (c, h, w) of the squared error.
    """
    noisy_latents = model.noise_scheduler.add_noise(latents, noise, timesteps)
    prediction = model.unet(
        noisy_latents.to(model.dtype), timesteps, **unet_conditioning(model, embeds)
    ).sample
    target = denoising_target(model, latents, noise, timesteps)
    squared = F.mse_loss(prediction.float(), target.float(), reduction="none")  # (b, c, h, w)
    return DenoisingOutput(squared.mean(dim=(1, 2, 3)), noisy_latents, prediction)


def decode_latents(model, latents: torch.Tensor) -> torch.Tensor:
    """(b, 4, h, w) scaled latents -> (b, 3, H, W) images in about [-1, 1] (differentiable)."""
    return model.vae.decode((latents / model.scaling_factor).to(model.dtype)).sample


def default_clip_model(model) -> Path | None:
    """`<model folder>/image_encoder` when the model ships one (the miniature world does)."""
    folder = model.extra.get("folder") if isinstance(model.extra, dict) else None
    if folder and (Path(folder) / "image_encoder" / "config.json").is_file():
        return Path(folder) / "image_encoder"
    return None


class ClipIdentityLoss:
    """L_clip = 1 - cos(CLIP(x0_hat), mean CLIP feature of the concept images).

    The CLIP tower is a transformers `CLIPVisionModelWithProjection` folder, frozen.
    """

    def __init__(self, tower, *, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD):
        self.tower = tower.requires_grad_(False).eval()
        self.size = int(tower.config.image_size)
        param = next(tower.parameters())
        self.mean = torch.tensor(mean, device=param.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=param.device).view(1, 3, 1, 1)

    @classmethod
    def from_folder(cls, folder, device, dtype) -> ClipIdentityLoss:
        """Load a `CLIPVisionModelWithProjection` folder, or "transformers:FOLDER" / "world"
        (`oneword.clip.load_clip_vision`)."""
        from ..clip import load_clip_vision

        tower, mean, std = load_clip_vision(folder, device=device, dtype=dtype)
        return cls(tower, mean=mean, std=std)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(b, 3, H, W) in [-1, 1] -> (b, p) unit-norm fp32 image features."""
        param = next(self.tower.parameters())
        pixels = (images.float() + 1) / 2  # (b, 3, H, W) in [0, 1]
        pixels = F.interpolate(pixels, size=(self.size, self.size), mode="bilinear", antialias=True)
        pixels = ((pixels - self.mean) / self.std).to(param.dtype)
        return F.normalize(self.tower(pixel_values=pixels).image_embeds.float(), dim=-1)

    @torch.no_grad()
    def reference(self, images: torch.Tensor) -> torch.Tensor:
        """(n, 3, H, W) concept images -> (p,) unit-norm mean feature."""
        return F.normalize(self.features(images).mean(0), dim=-1)

    def __call__(self, images: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        """Per-sample 1 - cosine (b,) between images (b, 3, H, W) and references (b, p)."""
        return 1 - (self.features(images) * reference).sum(-1)
