"""The inversion objective: encode prompts, denoise, compare (Eq. 2 of Gal et al., 2023).

    v* = argmin_v E_{z, y, eps, t} || eps - eps_theta(z_t, t, c_theta(y)) ||^2

z are the VAE latents of the concept images, y a template prompt containing S*, eps
Gaussian noise and t a uniform timestep. For v-prediction models (SD 2.x at 768 px, the
tiny sd2) the target is the velocity v = sqrt(a_t) eps - sqrt(1 - a_t) z instead, as
diffusers' `DDPMScheduler.get_velocity` computes it.

Prompts are encoded the way the pipelines do it (`oneword.prompts`, shared with sampling),
so a token learned here means the same thing at sampling time.

SD3 and FLUX.1 are rectified-flow models (Esser et al., 2024; Liu et al., 2023): the noisy
latents are x_t = (1 - t) x0 + t eps with t in [0, 1], and the transformer predicts the
velocity eps - x0. Training timesteps follow SD3's recipe: t = shift(u) with u logit-normal
(0, 1) (Esser et al., Sec. 3.1 and 5.3.2) and the model's own shift: SD3's static shift 3
(t' = s t / (1 + (s - 1) t)) or FLUX's resolution-dependent one (mu from the number of
latent tokens, t' = e^mu / (e^mu + 1/t - 1)), as their `FlowMatchEulerDiscreteScheduler`
configs state. SD3 conditions on CLIP-L and CLIP-G penultimate states (zero-padded to T5's
width) followed by T5's, plus both pooled projections; FLUX on T5's states, CLIP-L's pooled
output and, for FLUX.1-dev, a guidance embedding.

The optional identity loss L_clip compares CLIP image features of a one-step denoised
estimate of the image with the mean feature of the concept images (1 - cosine).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange, repeat

from ..clip import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from ..errors import OnewordError
from ..prompts import (  # noqa: F401  (re-exported: the objective's inputs)
    PromptEmbeddings,
    add_time_ids,
    encode_prompts,
    tokenize,
    unet_conditioning,
)

# FLUX.1-dev is guidance-distilled: the transformer takes the guidance scale as an input.
# Training uses 3.5, the default of diffusers' FLUX training scripts (the advanced
# textual-inversion one included) and of FluxPipeline's sampling.
FLUX_TRAIN_GUIDANCE = 3.5


def scale_latents(model, sample: torch.Tensor) -> torch.Tensor:
    """VAE posterior samples -> the latents the denoiser sees: (z - shift) * scale."""
    return (sample - model.shift_factor) * model.scaling_factor


def draw_timesteps(model, batch: int, generator: torch.Generator) -> torch.Tensor:
    """(b,) training timesteps from `generator` (CPU): int64 in [0, 1000) for DDPM models;
    for flow models fp32 sigmas t in (0, 1), logit-normal then shifted (see module docs)."""
    if not model.is_flow:
        num_timesteps = model.noise_scheduler.config.num_train_timesteps
        return torch.randint(num_timesteps, (batch,), generator=generator)
    u = torch.sigmoid(torch.randn(batch, generator=generator))  # logit-normal(0, 1)
    config = model.noise_scheduler.config
    if config.use_dynamic_shifting:
        # FLUX: mu grows linearly with the number of 2x2 latent tokens (FluxPipeline's
        # calculate_shift), the exponential time shift of its scheduler.
        tokens = (model.resolution // model.vae_scale // 2) ** 2
        slope = (config.max_shift - config.base_shift) / (
            config.max_image_seq_len - config.base_image_seq_len
        )
        mu = config.base_shift + slope * (tokens - config.base_image_seq_len)
        return math.exp(mu) / (math.exp(mu) + (1 / u - 1))
    shift = float(config.shift)
    return shift * u / (1 + (shift - 1) * u)


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """FLUX's 2x2 patch packing: (b, c, h, w) -> (b, h/2 * w/2, 4c), as FluxPipeline."""
    return rearrange(latents, "b c (h ph) (w pw) -> b (h w) (c ph pw)", ph=2, pw=2)


def unpack_latents(packed: torch.Tensor, height: int) -> torch.Tensor:
    """Inverse of `pack_latents` for a square latent of side `height`: (b, c, h, w)."""
    side = height // 2
    return rearrange(packed, "b (h w) (c ph pw) -> b c (h ph) (w pw)", h=side, w=side, ph=2, pw=2)


def flux_ids(height: int, text_length: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """FLUX's rotary position ids: image (h/2 * w/2, 3) = (0, row, col), text (n, 3) zeros."""
    side = height // 2
    rows = repeat(torch.arange(side), "h -> (h w)", w=side)
    cols = repeat(torch.arange(side), "w -> (h w)", h=side)
    image_ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1)
    text_ids = torch.zeros(text_length, 3)
    return image_ids.to(device, dtype), text_ids.to(device, dtype)


def flow_denoise(model, noisy_latents, embeds: PromptEmbeddings, sigmas) -> torch.Tensor:
    """The transformer's velocity prediction (b, 16, h, w) for noisy latents at sigmas (b,)."""
    dtype = model.dtype
    if model.family == "sd3":
        return model.unet(
            hidden_states=noisy_latents.to(dtype),
            encoder_hidden_states=embeds.hidden.to(dtype),
            pooled_projections=embeds.pooled.to(dtype),
            timestep=(sigmas * 1000).to(dtype),  # SD3 takes t in [0, 1000]
        ).sample
    height = noisy_latents.shape[-1]
    image_ids, text_ids = flux_ids(height, embeds.hidden.shape[1], noisy_latents.device, dtype)
    guidance = None
    if getattr(model.unet.config, "guidance_embeds", False):
        guidance = torch.full_like(sigmas, FLUX_TRAIN_GUIDANCE, dtype=torch.float32)
    packed = model.unet(
        hidden_states=pack_latents(noisy_latents).to(dtype),
        encoder_hidden_states=embeds.hidden.to(dtype),
        pooled_projections=embeds.pooled.to(dtype),
        timestep=sigmas.to(dtype),  # FLUX takes t in [0, 1]
        img_ids=image_ids,
        txt_ids=text_ids,
        guidance=guidance,
    ).sample
    return unpack_latents(packed, height)


def denoising_target(model, latents, noise, timesteps) -> torch.Tensor:
    """eps (epsilon models), v = sqrt(a_t) eps - sqrt(1 - a_t) z (v-prediction models) or
    the rectified-flow velocity eps - z (flow matching)."""
    if model.prediction_type == "flow_matching":
        return noise - latents
    if model.prediction_type == "epsilon":
        return noise
    if model.prediction_type == "v_prediction":
        return model.noise_scheduler.get_velocity(latents, noise, timesteps)
    raise OnewordError(
        f"prediction type {model.prediction_type!r} of {model.source} is not supported "
        "(expected 'epsilon' or 'v_prediction')"
    )


def predict_x0(model, noisy_latents, prediction, timesteps) -> torch.Tensor:
    """One-step estimate of the clean latents z_0 from the denoiser's output, (b, c, h, w)."""
    if model.prediction_type == "flow_matching":
        sigmas = rearrange(timesteps, "b -> b 1 1 1").to(noisy_latents.dtype)
        return noisy_latents - sigmas * prediction  # x_t - t (eps - x0) = x0
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
        latents: (b, c, h, w) scaled clean latents z_0, fp32 (c = 4, or 16 for SD3/FLUX).
        embeds: the prompts' `PromptEmbeddings` (b rows).
        noise: (b, c, h, w) fp32 Gaussian noise.
        timesteps: (b,) int64 in [0, num_train_timesteps), or fp32 sigmas in (0, 1) for
            flow models (`draw_timesteps`).

    Returns:
        `DenoisingOutput` with loss (b,) fp32 = mean over (c, h, w) of the squared error.
    """
    if model.is_flow:
        sigmas = rearrange(timesteps, "b -> b 1 1 1").to(latents.dtype)
        noisy_latents = (1 - sigmas) * latents + sigmas * noise  # x_t of rectified flow
        prediction = flow_denoise(model, noisy_latents, embeds, timesteps)
        target = denoising_target(model, latents, noise, timesteps)
        squared = F.mse_loss(prediction.float(), target.float(), reduction="none")
        return DenoisingOutput(squared.mean(dim=(1, 2, 3)), noisy_latents, prediction)
    noisy_latents = model.noise_scheduler.add_noise(latents, noise, timesteps)
    prediction = model.unet(
        noisy_latents.to(model.dtype), timesteps, **unet_conditioning(model, embeds)
    ).sample
    target = denoising_target(model, latents, noise, timesteps)
    squared = F.mse_loss(prediction.float(), target.float(), reduction="none")  # (b, c, h, w)
    return DenoisingOutput(squared.mean(dim=(1, 2, 3)), noisy_latents, prediction)


def decode_latents(model, latents: torch.Tensor) -> torch.Tensor:
    """(b, c, h, w) scaled latents -> (b, 3, H, W) images in about [-1, 1] (differentiable)."""
    unscaled = latents / model.scaling_factor + getattr(model, "shift_factor", 0.0)
    return model.vae.decode(unscaled.to(model.dtype)).sample


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
