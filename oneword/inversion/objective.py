"""The inversion objective: encode prompts, denoise, compare (Eq. 2 of Gal et al., 2023).

    v* = argmin_v E_{z, y, eps, t} || eps - eps_theta(z_t, t, c_theta(y)) ||^2

z are the VAE latents of the concept images, y a template prompt containing S*, eps
Gaussian noise and t a uniform timestep. For v-prediction models (SD 2.x at 768 px, the
tiny sd2) the target is the velocity v = sqrt(a_t) eps - sqrt(1 - a_t) z instead, as
diffusers' `DDPMScheduler.get_velocity` computes it.

Prompts are encoded the way the pipelines do it, so a token learned here means the same
thing at sampling time: SD 1.x/2.x use the last hidden state of the text encoder; SDXL
concatenates the penultimate hidden states of both encoders and conditions the UNet on
the second encoder's pooled projection plus the six "add_time_ids".

The optional identity loss L_clip compares CLIP image features of a one-step denoised
estimate of the image with the mean feature of the concept images (1 - cosine).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange, repeat

from ..errors import OnewordError

# CLIP's pixel normalisation (OpenAI); a folder's preprocessor_config.json overrides it.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class PromptEmbeddings:
    """What the UNet is conditioned on.

    Attributes:
        hidden: (b, n, d) token features (SDXL: both encoders concatenated, d = d1 + d2).
        pooled: (b, p) pooled projection of the last encoder (SDXL only), else None.
    """

    hidden: torch.Tensor
    pooled: torch.Tensor | None = None


def tokenize(tokenizer, prompts: Sequence[str], device: torch.device) -> torch.Tensor:
    """(b, 77) ids, padded and truncated to the tokenizer's context length."""
    return tokenizer(
        list(prompts),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(device)


def encode_prompts(model, prompts: Sequence[str]) -> PromptEmbeddings:
    """Encode prompts (already expanded with `expand_prompt`) in one text-encoder call each.

    Args:
        model: a `LoadedModel`.
        prompts: b prompts.

    Returns:
        `PromptEmbeddings` with hidden (b, 77, d) in the text encoder's dtype.
    """
    if model.family != "sdxl":
        ids = tokenize(model.tokenizers[0], prompts, model.device)
        return PromptEmbeddings(model.text_encoders[0](ids).last_hidden_state)
    hidden, pooled = [], None
    for tokenizer, text_encoder in zip(model.tokenizers, model.text_encoders):
        ids = tokenize(tokenizer, prompts, model.device)
        output = text_encoder(ids, output_hidden_states=True)
        hidden.append(output.hidden_states[-2])  # (b, n, d_i), as the SDXL pipeline does
        pooled = getattr(output, "text_embeds", None)  # (b, p) from CLIPTextModelWithProjection
    return PromptEmbeddings(torch.cat(hidden, dim=-1), pooled)


def add_time_ids(model, batch: int) -> torch.Tensor:
    """SDXL micro-conditioning (b, 6): original size, crop top-left (0, 0), target size.

    Training images are fitted to the native resolution, so all three say "uncropped,
    native size", as sampling does by default.
    """
    side = model.resolution
    ids = torch.tensor([side, side, 0, 0, side, side], dtype=model.dtype, device=model.device)
    return repeat(ids, "six -> b six", b=batch)


def unet_conditioning(model, embeds: PromptEmbeddings) -> dict:
    """Keyword arguments for `unet(...)`: encoder_hidden_states (+ SDXL added_cond_kwargs)."""
    kwargs = {"encoder_hidden_states": embeds.hidden.to(model.dtype)}
    if model.family == "sdxl":
        kwargs["added_cond_kwargs"] = {
            "text_embeds": embeds.pooled.to(model.dtype),
            "time_ids": add_time_ids(model, embeds.hidden.shape[0]),
        }
    return kwargs


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
        """Load a `CLIPVisionModelWithProjection` folder (config.json + weights)."""
        from transformers import CLIPVisionModelWithProjection

        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise OnewordError(
                f"--clip-model {folder} is not a transformers CLIPVisionModelWithProjection "
                "folder (no config.json)"
            )
        try:
            tower = CLIPVisionModelWithProjection.from_pretrained(
                folder, local_files_only=True, torch_dtype=dtype
            ).to(device)
        except Exception as error:
            raise OnewordError(f"cannot load the CLIP tower {folder}: {error}") from None
        mean, std = OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
        preprocessor = folder / "preprocessor_config.json"
        if preprocessor.is_file():
            config = json.loads(preprocessor.read_text())
            mean, std = config.get("image_mean", mean), config.get("image_std", std)
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
