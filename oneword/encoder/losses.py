"""Regression losses onto classic inversion's targets, in the spaces the model reads them.

`train_encoder.py --regress-space text|unet` (rows space is a one-line norm and stays there).
Both are relative to the class word's error, so 1 means "no better than the class word"
whatever the prompt, timestep or model.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..inversion.objective import denoising_loss, draw_timesteps
from ..inversion.templates import fill
from ..prompts import encode_prompts
from ..tokens import expand_prompt
from .model import with_placeholder_rows


def text_space_regression(
    model,
    slots,
    predicted: list[torch.Tensor],
    targets: list[torch.Tensor],
    class_rows: list[torch.Tensor],
    templates: list[str],
    generator: torch.Generator,
) -> torch.Tensor:
    """The regression loss in the text encoder's output space.

    One template prompt per target holds its slot; the prompt is encoded three times, with the
    predicted rows, the target rows and the class word's rows in the slot. The loss is
    ||h(v) - h(v*)||^2 / ||h(c) - h(v*)||^2 per prompt (h: all hidden states, summed over
    positions and width), so 1 is "no better than the class word" whatever the prompt.

    Args:
        model: the `LoadedModel` with the slots added.
        slots: B placeholders, one per target.
        predicted, targets, class_rows: per text encoder (B, K, d_e) rows.
        templates: prompt templates with one {}.
        generator: draws the templates.

    Returns:
        The mean over the B prompts, a scalar with the predicted rows' autograd history.
    """
    choices = torch.randint(len(templates), (len(slots),), generator=generator).tolist()
    prompts = [
        expand_prompt(fill(templates[i], slot.token), [slot]) for i, slot in zip(choices, slots)
    ]

    def hidden(rows):
        return encode_prompts(with_placeholder_rows(model, slots, rows), prompts).hidden.float()

    with torch.no_grad():
        target = hidden(targets)  # (B, n, d)
        scale = (hidden(class_rows) - target).pow(2).sum((1, 2)).clamp_min(1e-12)  # (B,)
    return ((hidden(predicted) - target).pow(2).sum((1, 2)) / scale).mean()


def denoising_draws(
    model, slots, latents: torch.Tensor, templates: list[str], generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """What one denoising-loss batch draws, in this order: a timestep, the noise and a
    template per latent.

    Args:
        model: the `LoadedModel` with the slots added.
        slots: B placeholders; latents are target-major, M = len(latents) // B per slot.
        latents: (B M, c, h, w) scaled clean latents.
        templates: prompt templates with one {}.
        generator: the draws' generator.

    Returns:
        timesteps (B M,), noise (B M, c, h, w) and B M prompts holding each latent's slot.
    """
    views = len(latents) // len(slots)
    timesteps = draw_timesteps(model, len(latents), generator).to(model.device)
    noise = torch.randn(latents.shape, generator=generator).to(model.device)
    choices = torch.randint(len(templates), (len(latents),), generator=generator).tolist()
    prompts = [
        expand_prompt(fill(templates[choices[b * views + m]], slots[b].token), [slots[b]])
        for b in range(len(slots))
        for m in range(views)
    ]
    return timesteps, noise, prompts


def unet_predictor(
    model, slots, latents: torch.Tensor, templates: list[str], generator: torch.Generator
) -> Callable[[list[torch.Tensor]], torch.Tensor]:
    """Draw timesteps, noise and one template per latent once; return rows -> the frozen
    UNet's prediction on those draws.

    Args:
        model: the `LoadedModel` with the slots added.
        slots: B placeholders, one per target.
        latents: (B M, c, h, w) scaled clean latents of M images per target, target-major.
        templates: prompt templates with one {}.
        generator: draws timesteps, noise and templates (`denoising_draws`).

    Returns:
        A function: per text encoder (B, K, d_e) rows -> the prediction (B M, c, h, w) fp32,
        with the rows' autograd history. Called with several rows, it compares them on the
        same draws.
    """
    timesteps, noise, prompts = denoising_draws(model, slots, latents, templates, generator)

    def prediction(rows: list[torch.Tensor]) -> torch.Tensor:
        embeds = encode_prompts(with_placeholder_rows(model, slots, rows), prompts)
        return denoising_loss(model, latents, embeds, noise, timesteps).prediction.float()

    return prediction


def unet_space_regression(
    model,
    slots,
    predicted: list[torch.Tensor],
    targets: list[torch.Tensor],
    class_rows: list[torch.Tensor],
    latents: torch.Tensor,
    templates: list[str],
    generator: torch.Generator,
) -> torch.Tensor:
    """The regression loss in the UNet's output space: the frozen UNet's prediction with the
    predicted rows against its prediction with the target rows, on the same noisy latents.

    The denoising loss compares the prediction with the noise, whose variance dwarfs what
    the word changes (on the world the loss moves by ~0.001 between good and bad tokens);
    comparing two predictions removes that variance, and weighs each direction of the
    embedding by what the UNet reads (a Fisher-like metric), which the rows metric does not.
    The loss is sum ||eps(v) - eps(v*)||^2 / sum ||eps(c) - eps(v*)||^2 over the batch, so
    1 is "no better than the class word".

    Args:
        model: the `LoadedModel` with the slots added.
        slots: B placeholders, one per target.
        predicted, targets, class_rows: per text encoder (B, K, d_e) rows.
        latents: (B M, c, h, w) scaled clean latents of M images per target, target-major.
        templates: prompt templates with one {}.
        generator: draws templates, timesteps and noise (`unet_predictor`).

    Returns:
        A scalar with the predicted rows' autograd history.
    """
    prediction = unet_predictor(model, slots, latents, templates, generator)
    with torch.no_grad():
        target = prediction(targets)
        scale = (prediction(class_rows) - target).pow(2).sum().clamp_min(1e-12)
    return (prediction(predicted) - target).pow(2).sum() / scale


__all__ = [
    "denoising_draws",
    "text_space_regression",
    "unet_predictor",
    "unet_space_regression",
]
