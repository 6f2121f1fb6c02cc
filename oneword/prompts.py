"""Prompt encoding as the diffusers pipelines do it, shared by training and sampling.

A token learned with these embeddings means the same thing at sampling time: SD 1.x/2.x
use the last hidden state of the text encoder; SDXL concatenates the penultimate hidden
states of both encoders and conditions the UNet on the second encoder's pooled projection
plus the six "add_time_ids".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from einops import repeat

from .tokenizer import tokenize

__all__ = ["PromptEmbeddings", "add_time_ids", "encode_prompts", "tokenize", "unet_conditioning"]


@dataclass
class PromptEmbeddings:
    """What the UNet is conditioned on.

    Attributes:
        hidden: (b, n, d) token features (SDXL: both encoders concatenated, d = d1 + d2).
        pooled: (b, p) pooled projection of the last encoder (SDXL only), else None.
    """

    hidden: torch.Tensor
    pooled: torch.Tensor | None = None


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
