"""Sample images from a `LoadedModel`, learned placeholder tokens included.

`make_pipeline` wraps the model's own modules (no copies) in a diffusers
`StableDiffusionPipeline` / `StableDiffusionXLPipeline`; `generate` encodes the prompts
with the same code that training uses (`oneword.prompts.encode_prompts`,
multi-vector tokens expanded with `expand_prompt`) and passes the embeddings to the
pipeline, so a token means at sampling time exactly what it meant during training.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image
from tqdm.auto import tqdm

from .errors import OnewordError
from .tokens import Placeholder, expand_prompt

SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "dpm": "DPMSolverMultistepScheduler",
    "ddpm": "DDPMScheduler",
}


def make_pipeline(model, scheduler: str = "ddim"):
    """A diffusers pipeline built from the model's modules (shared, not copied).

    Args:
        model: a `LoadedModel`.
        scheduler: "ddim" (default), "euler", "dpm" or "ddpm", configured from the model's
            training schedule.

    Returns:
        `StableDiffusionPipeline` (sd1, sd2) or `StableDiffusionXLPipeline` (sdxl), progress
        bar off.
    """
    import diffusers

    if scheduler not in SCHEDULERS:
        raise OnewordError(f"scheduler must be one of {sorted(SCHEDULERS)}, got {scheduler!r}")
    sampler = getattr(diffusers, SCHEDULERS[scheduler]).from_config(model.noise_scheduler.config)
    if model.family == "sdxl":
        index = model.extra.get("index", {}) if isinstance(model.extra, dict) else {}
        pipe = diffusers.StableDiffusionXLPipeline(
            vae=model.vae,
            text_encoder=model.text_encoders[0],
            text_encoder_2=model.text_encoders[1],
            tokenizer=model.tokenizers[0],
            tokenizer_2=model.tokenizers[1],
            unet=model.unet,
            scheduler=sampler,
            force_zeros_for_empty_prompt=index.get("force_zeros_for_empty_prompt", True),
        )
    else:
        pipe = diffusers.StableDiffusionPipeline(
            vae=model.vae,
            text_encoder=model.text_encoders[0],
            tokenizer=model.tokenizers[0],
            unet=model.unet,
            scheduler=sampler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def generate(
    model,
    prompts: Sequence[str],
    *,
    placeholders: Sequence[Placeholder] = (),
    num_per_prompt: int = 4,
    steps: int = 30,
    guidance: float = 5.0,
    seed: int = 0,
    negative_prompt: str | None = None,
    scheduler: str = "ddim",
    pipeline=None,
    progress: bool = False,
) -> list[Image.Image]:
    """Generate `num_per_prompt` images for each prompt.

    Image j of every prompt starts from the noise of seed `seed + j` (a CPU generator), so
    the same seed gives the same images whatever the batch, and the same noise across
    prompts (rows of a grid differ only by the prompt).

    Args:
        model: a `LoadedModel`.
        prompts: prompts that may contain placeholder tokens.
        placeholders: the placeholders whose multi-vector tokens need expanding.
        num_per_prompt: images per prompt.
        steps: denoising steps.
        guidance: classifier-free guidance scale (1 = off).
        seed: seed of the first image of each prompt.
        negative_prompt: the unconditional prompt (default: empty; SDXL zeros, as diffusers).
        scheduler: see `make_pipeline`.
        pipeline: reuse a pipeline from `make_pipeline`.
        progress: show a progress bar over every prompt's denoising steps.

    Returns:
        len(prompts) * num_per_prompt RGB images of model.resolution, prompt-major.
    """
    from .prompts import encode_prompts

    pipe = pipeline if pipeline is not None else make_pipeline(model, scheduler)
    zero_negative = (
        model.family == "sdxl"
        and negative_prompt is None
        and pipe.config.get("force_zeros_for_empty_prompt", True)
    )
    negative = encode_prompts(model, [expand_prompt(negative_prompt or "", placeholders)])
    if zero_negative:
        negative.hidden = torch.zeros_like(negative.hidden)
        negative.pooled = torch.zeros_like(negative.pooled)
    images: list[Image.Image] = []
    # One bar over all prompts' denoising steps, moved by the pipeline's step callback (the
    # pipeline's own bar stays off: it would restart for every prompt).
    bar = tqdm(
        total=len(prompts) * steps, desc="sampling", unit="step", disable=not progress, leave=False
    )

    def on_step_end(pipe, step, timestep, callback_kwargs):
        bar.update(1)
        return callback_kwargs

    for prompt in prompts:
        embeds = encode_prompts(model, [expand_prompt(prompt, placeholders)])  # (1, n, d)
        kwargs = {"prompt_embeds": embeds.hidden, "negative_prompt_embeds": negative.hidden}
        if model.family == "sdxl":
            kwargs["pooled_prompt_embeds"] = embeds.pooled
            kwargs["negative_pooled_prompt_embeds"] = negative.pooled
        generators = [torch.Generator().manual_seed(seed + j) for j in range(num_per_prompt)]
        # The pipelines cast prompt embeddings and latents to `text_encoder.dtype`, which is
        # fp32 once a PlaceholderEmbedding (fp32 rows, listed first) is installed; in a
        # bf16/fp16 model autocast lets those fp32 tensors meet the half-precision weights.
        half = model.dtype != torch.float32
        with torch.autocast(model.device.type, dtype=model.dtype, enabled=half):
            result = pipe(
                **kwargs,
                num_images_per_prompt=num_per_prompt,
                num_inference_steps=steps,
                guidance_scale=guidance,
                generator=generators,
                height=model.resolution,
                width=model.resolution,
                output_type="pil",
                callback_on_step_end=on_step_end,
            )
        images.extend(result.images)
    bar.close()
    return images
