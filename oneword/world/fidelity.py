"""Prompt fidelity of the world model, judged by the oracle.

For captions that name every attribute (named values only), sample images and ask the
oracle what it sees: per attribute, the share of samples whose value matches the caption,
and the share where all of them match at once. This is the bar that makes the world model
fit to judge inversion (a token can only be as good as the model it lives in).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from ..datasets import world
from ..errors import OnewordError
from .oracle import Oracle


def noise_scheduler_config() -> dict:
    """The world's noise schedule: Stable Diffusion's (scaled-linear betas 0.00085 -> 0.012,
    1000 steps, epsilon prediction), as a diffusers scheduler config."""
    from ..tiny import _scheduler_config

    return _scheduler_config("epsilon")


@torch.no_grad()
def ddim_sample(
    unet,
    vae,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    *,
    steps: int = 30,
    guidance: float = 5.0,
    generator: torch.Generator | None = None,
    scaling: float | None = None,
) -> torch.Tensor:
    """Classifier-free-guided DDIM sampling; cond/uncond (b, 77, d) -> uint8 images (b, 3, H, W)."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(noise_scheduler_config())
    scheduler.set_timesteps(steps)
    device = cond.device
    size = unet.config.sample_size
    channels = unet.config.in_channels
    latents = torch.randn((cond.shape[0], channels, size, size), generator=generator).to(device)
    dtype = next(unet.parameters()).dtype
    for t in scheduler.timesteps:
        both = torch.cat([latents, latents]).to(dtype)
        prediction = unet(both, t, torch.cat([uncond, cond]).to(dtype)).sample.float()
        uncond_eps, cond_eps = prediction.chunk(2)
        eps = uncond_eps + guidance * (cond_eps - uncond_eps)
        latents = scheduler.step(eps, t, latents).prev_sample
    scaling = scaling if scaling is not None else vae.config.scaling_factor
    images = vae.decode((latents / scaling).to(next(vae.parameters()).dtype)).sample.float()
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def fidelity_captions(n: int, seed: int) -> tuple[list[world.Scene], list[str]]:
    scenes = world.sample_scenes(n, torch.Generator().manual_seed(seed), named_only=True)
    return scenes, [world.full_caption(s) for s in scenes]


def score(oracle: Oracle, images: torch.Tensor, scenes, *, confusion: bool = False) -> dict:
    """Per-attribute agreement between the oracle's reading and the scenes, plus all at once.

    With `confusion`, also `result["confusion"][attribute][asked][read]`: how many samples
    asked for value `asked` were read as `read` (where a weak attribute goes wrong).
    """
    predicted = oracle.predict(images)
    result, all_right = {}, torch.ones(len(scenes), dtype=torch.bool)
    table: dict[str, dict[str, dict[str, int]]] = {}
    for attribute in world.ATTRIBUTES:
        asked = [getattr(s, attribute) for s in scenes]
        right = torch.tensor([p == a for p, a in zip(predicted[attribute], asked)])
        result[attribute] = float(right.float().mean())
        all_right &= right
        rows = table.setdefault(attribute, {})
        for a, p in zip(asked, predicted[attribute]):
            rows.setdefault(a, {})
            rows[a][p] = rows[a].get(p, 0) + 1
    result["all"] = float(all_right.float().mean())
    if confusion:
        result["confusion"] = table
    return result


# The prompts of the CLIP's zero-shot reading: one per value of each attribute.
ZERO_SHOT_PROMPTS: dict[str, str] = {
    "shape": "a {}",
    "colour": "a {} object",
    "pattern": "a {} object",
    "background": "an object on a {} background",
    "size": "a {} object",
    "position": "an object at the {}",
}


@torch.no_grad()
def zero_shot_accuracy(
    image_features: torch.Tensor, text_features: Callable[[list[str]], torch.Tensor], scenes
) -> dict[str, float]:
    """Per attribute: share of `scenes` whose image feature is closest to the prompt that
    names the right value (`ZERO_SHOT_PROMPTS`, unnamed values included).

    Args:
        image_features: (n, p) unit-norm features of the scenes' renders.
        text_features: prompts -> (m, p) unit-norm features.
    """
    labels = world.labels(scenes)
    result = {}
    for attribute, template in ZERO_SHOT_PROMPTS.items():
        text = text_features([template.format(v) for v in world.VALUES[attribute]])
        predicted = (image_features.float() @ text.float().T).argmax(-1).cpu()
        result[attribute] = float((predicted == labels[attribute]).float().mean())
    return result


def fresh_render_accuracy(
    model_dir: str | Path, n: int = 2048, seed: int = 99, device: str | None = None
) -> dict:
    """The world's readers on `n` fresh renders (seeded): the oracle's accuracy per attribute
    and, where the folder has the world's CLIP, its zero-shot accuracy. The renders are the
    renderer's as it is now, so a change of geometry is measured against the shipped models."""
    from ..clip import has_world_clip, load_clip_scorer
    from ..images import tensor_to_images

    if n < 1:
        raise OnewordError(f"--renders must be >= 1, got {n}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    oracle = Oracle.load(Path(model_dir) / "oracle", device)
    scenes = world.sample_scenes(n, torch.Generator().manual_seed(seed))
    pixels = world.render(scenes, oracle.config.resolution, device=device)
    read = score(oracle, pixels, scenes)
    report = {"n": n, "seed": seed, "oracle": {a: read[a] for a in world.ATTRIBUTES}}
    if has_world_clip(model_dir):
        scorer = load_clip_scorer("world", model_dir, device)
        images = tensor_to_images(pixels.float().cpu() / 127.5 - 1)
        features = scorer.image_features(images)
        report["clip_zero_shot"] = zero_shot_accuracy(features, scorer.text_features, scenes)
    return report


def per_value(confusion: dict[str, dict[str, int]]) -> dict[str, float]:
    """{asked value: share read right} from one attribute's confusion rows."""
    return {asked: reads.get(asked, 0) / sum(reads.values()) for asked, reads in confusion.items()}


@torch.no_grad()
def quick_fidelity(
    unet, vae, tokenizer, text_encoder, cfg, device, *, steps: int = 20, guidance: float = 5.0
) -> dict:
    """A fast fidelity check during training (fewer DDIM steps, `cfg.fidelity_captions` captions)."""
    from ..tokenizer import tokenize

    oracle = Oracle.load(Path(cfg.out) / "oracle", device)
    scenes, captions = fidelity_captions(cfg.fidelity_captions, seed=cfg.seed + 1234)
    cond = text_encoder(tokenize(tokenizer, captions, device))[0]
    uncond = text_encoder(tokenize(tokenizer, [""] * len(captions), device))[0]
    images = torch.cat(
        [
            ddim_sample(
                unet,
                vae,
                cond[i : i + 128],
                uncond[i : i + 128],
                steps=steps,
                guidance=guidance,
                generator=torch.Generator().manual_seed(cfg.seed + i),
            )
            for i in range(0, len(captions), 128)
        ]
    )
    return score(oracle, images, scenes)


def measure_fidelity(
    model_dir: str | Path,
    *,
    captions: int = 240,
    samples: int = 1,
    steps: int = 30,
    guidance: float = 5.0,
    seed: int = 0,
    device: str | None = None,
    grid: str | Path | None = None,
    ceiling: bool = False,
) -> dict:
    """Fidelity of a world pipeline loaded through diffusers' own `StableDiffusionPipeline`.

    Args:
        model_dir: the world folder (with oracle/).
        captions: number of fully named captions; samples: images per caption.
        steps, guidance: DDIM steps and classifier-free guidance scale.
        grid: optional PNG path for a caption -> samples grid (first 8 captions).
        ceiling: also score the VAE's reconstructions of the captions' true renders
            (`report["vae_ceiling"]`): what a UNet that drew every caption perfectly in
            latent space would get from this VAE and oracle.

    Returns:
        {"per_attribute": {...}, "all": float, "n": int, "per_value": {...},
         "confusion": {...}, ...}.
    """
    from diffusers import StableDiffusionPipeline

    from ..images import save_grid

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    # No dtype argument: diffusers renamed it (torch_dtype -> dtype) and warns on the old
    # name, which is the only one older supported versions know. A world folder's configs
    # say float32 (`train._save_fp16`), so its fp16 files load as fp32; others are cast.
    pipe = StableDiffusionPipeline.from_pretrained(str(model_dir), local_files_only=True)
    if pipe.unet.dtype != torch.float32:
        pipe = pipe.to(dtype=torch.float32)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    oracle = Oracle.load(Path(model_dir) / "oracle", device)
    scenes, texts = fidelity_captions(captions, seed)
    all_scenes, images = [], []
    from tqdm.auto import tqdm

    for start in tqdm(range(0, len(texts), 32), desc="fidelity"):
        batch = texts[start : start + 32]
        out = pipe(
            batch,
            num_images_per_prompt=samples,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=torch.Generator().manual_seed(seed + start),
            output_type="pt",
        )
        images.append((out.images * 255).round().to(torch.uint8).cpu())
        all_scenes += [s for s in scenes[start : start + 32] for _ in range(samples)]
    pixels = torch.cat(images)
    result = score(oracle, pixels, all_scenes, confusion=True)
    report = {
        **_shares(result),
        "confusion": result["confusion"],
        "n": len(all_scenes),
        "captions": captions,
        "samples_per_caption": samples,
        "steps": steps,
        "guidance": guidance,
        "seed": seed,
        "device": str(device),
    }
    if ceiling:
        report["vae_ceiling"] = _vae_ceiling(pipe.vae, oracle, scenes, device)
    if grid is not None:
        from ..images import tensor_to_images

        rows = min(8, captions)
        chosen = torch.cat([pixels[i * samples : (i + 1) * samples] for i in range(rows)])
        save_grid(
            tensor_to_images(chosen.float() / 127.5 - 1),
            grid,
            columns=samples,
            labels=[texts[i] for i in range(rows)],
        )
    return report


@torch.no_grad()
def _vae_ceiling(vae, oracle: Oracle, scenes, device) -> dict:
    """The oracle on VAE round trips (posterior mean) of the scenes' true renders."""
    pixels = world.render(scenes, oracle.config.resolution, device=device)
    rebuilt = []
    for start in range(0, len(scenes), 64):
        x = pixels[start : start + 64].float() / 127.5 - 1
        y = vae.decode(vae.encode(x).latent_dist.mean).sample
        rebuilt.append(((y.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8))
    return _shares(score(oracle, torch.cat(rebuilt), scenes, confusion=True))


def _shares(result: dict) -> dict:
    """A `score(..., confusion=True)` result as report fields: per attribute, all, per value."""
    return {
        "per_attribute": {a: result[a] for a in world.ATTRIBUTES},
        "all": result["all"],
        "per_value": {a: per_value(result["confusion"][a]) for a in world.ATTRIBUTES},
    }
