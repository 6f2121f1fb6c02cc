"""`oneword encode`: a concept token from a trained encoder in about a second, refined in a
few steps, with an automatic fallback to full inversion.

1. Predict: the concept encoder (`oneword.encoder`) reads the images through its frozen
   image tower and predicts the word's rows in one forward pass (`encode_concept`).
2. Refine: classic textual inversion (Gal et al., 2023) for `refine_steps` steps,
   warm-started from the prediction. It *is* `oneword.inversion.invert` (cached latents, one
   text-encoder and one UNet call per step); the warm start also moves the anchor of the
   L2 pull (`l2_weight`) to the predicted rows, so the refinement stays near the encoder's
   answer (`add_placeholder(init_rows=...)` stores them as `Placeholder.init_rows`, which
   `invert` uses as the anchor).
3. Check, and fall back: score the token on the concept's own images (see `check`); when
   the score is above `threshold`, continue with full inversion (`fallback_steps`) from the
   refined rows and score again.

Two quality checks; lower is better for both and 1.0 means "no better than the class word".
`check="loss"` is the relative denoising loss: D fixed draws (image, template, timestep,
noise; seeded, the same for every candidate) and

    score = mean_D L(token prompts) / mean_D L(class-word prompts)

with L the denoising loss of Eq. 2 of Gal et al. and the class word in the same templates
("a photo of a <t>" vs "a photo of a cup"). `check="clip"` compares CLIP image distances:

    score = (1 - CLIP-I(samples of "a photo of a S*")) / (1 - CLIP-I(class word's samples))

against the concept's images, with the same sample seeds for both words. An untrained
encoder predicts exactly the class word's rows, so either score is 1.0. `check="auto"` (the
default) takes "clip" when a CLIP is at hand (`clip`, or the model folder's own, as in the
world) and "loss" otherwise; `check="none"` skips the check (and the fallback).

Measured on the miniature world (`oneword eval --check ...`): the loss check does not
separate tokens whose samples keep the concept from those that do not (every token scored
0.90-1.00, right and wrong ones interleaved); the CLIP check partly does. Default thresholds
(`THRESHOLDS`): 1.0 for "loss", and for "clip" 0.825, chosen on the validation split for
the shipped encoder + the default refinement (24 concepts, 16 identity samples; a token is
right at identity >= 50%): the lowest threshold that sends none of the 7 right tokens on,
and it sends 8 of the 17 wrong ones (`evaluation.report.choose_threshold`'s "spare"). No
threshold there meets both of the targets (>= 80% of wrong, <= 10% of right ones sent):
catching 14 of the 17 wrong ones (0.707) would also send 5 of the 7 right ones, 19 of 24
concepts in all, to a full inversion that on this world is no better on average (classic
inversion peaks at 50-300 steps and declines by 1,000), so the check spares right tokens
and sends on the clearly failed ones.

Paths: "encoder" (prediction only: refine_steps=0, check passed or fallback off),
"refined" (prediction + refinement kept) and "fallback" (full inversion ran).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..errors import OnewordError

log = logging.getLogger("oneword.encode")

# Where `oneword encode` and `oneword eval`'s encoder methods look when no --encoder is given.
DEFAULT_ENCODER = "checkpoints/world-encoder.safetensors"
CHECKS = ("auto", "loss", "clip", "none")
# Default fallback thresholds per check (see the module docstring for how they were chosen).
THRESHOLDS = {"loss": 1.0, "clip": 0.825}
MAX_REFINE_STEPS = 200  # a refinement is short; longer runs are the fallback's (or invert's) job


@dataclass
class EncodeConfig:
    """Everything that decides an `encode` run; stored in log.json and the embedding file."""

    # Classic steps from the prediction (0 = prediction only), at an Adam lr below classic
    # inversion's 5e-3: 10 steps move a row by about lr * steps = 0.02 at most, a local
    # correction, not a new search. Chosen on the validation split (24 concepts, 16 identity
    # samples; benchmarks/results/world-v3.1/eval/validation-encoder-arms-round6/): from
    # the shipped encoder, 10 steps at 2e-3 keep the prediction's quality (identity /
    # editability 31.8 / 35.4% against 31.2 / 35.5% alone; paired +0.5 ± 3.9 / -0.2 ± 2.5),
    # while 5e-3 walks away from it (10 steps: 31.8 / 31.6%, 50 steps: 23.7 / 30.3%). So the
    # refinement is a cheap safety margin, not where the quality comes from;
    # --refine-steps 0 is as good on validation in 0.03 s instead of ~1.7 s.
    refine_steps: int = 10
    refine_lr: float = 2e-3
    # Pull toward the prediction: weight * mean_k ||v_k - v_k^pred||^2 (the denoising loss is
    # ~0.1). Measured with an earlier encoder after 50 steps at lr 5e-3 on the 24 concepts
    # that became the test split, before the splits existed: identity / editability 21.9 /
    # 26.0% at 0, 26.0 / 26.5% at 1e-3, 26.0 / 25.8% at 3e-3, 27.1 / 23.4% at 1e-2. At the
    # 10-step default it barely acts: on validation (16 identity samples) 0 reads +0.8 ± 0.4
    # identity points against 1e-3 and the same editability; it stays for longer refinements.
    l2_weight: float = 1e-3
    # Continue with full inversion when the check fails (score > threshold).
    fallback: bool = True
    fallback_steps: int | None = None  # None: InversionConfig's default (classic inversion)
    # "auto" (clip when a CLIP is at hand, else loss), "loss" (relative denoising loss),
    # "clip" (relative CLIP image distance of samples) or "none".
    check: str = "auto"
    # Fall back above this score (1.0 = "no better than the class word"); None: the check's
    # measured default in THRESHOLDS.
    threshold: float | None = None
    check_draws: int = 16  # fixed (image, template, timestep, noise) draws of the loss check
    clip: str | None = None  # CLIP of check "clip" (see oneword.clip); None: the model's
    templates: str = "object"  # prompt templates of refinement, fallback and check
    seed: int = 0  # seeds refinement, fallback, the check's draws and the samples
    # Frozen parts' precision on a GPU ("bf16", "fp16", "fp32"); used when the CLI loads.
    precision: str | None = None
    # samples.png after learning: DDIM steps and images per prompt; samples=False skips it.
    samples: bool = True
    sample_steps: int = 30
    sample_seeds: int = 4
    quiet: bool = False

    def check_values(self) -> None:
        """Raise `OnewordError` for values that cannot work."""
        if not isinstance(self.refine_steps, int) or not 0 <= self.refine_steps <= MAX_REFINE_STEPS:
            raise OnewordError(
                f"--refine-steps must be an integer in 0..{MAX_REFINE_STEPS}, got "
                f"{self.refine_steps!r}; for a longer run use --fallback-steps or "
                "oneword invert --warm-start"
            )
        if self.fallback_steps is not None and (
            not isinstance(self.fallback_steps, int) or self.fallback_steps < 1
        ):
            raise OnewordError(
                f"--fallback-steps must be a positive integer, got {self.fallback_steps!r}"
            )
        for name in ("check_draws", "sample_steps", "sample_seeds"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise OnewordError(
                    f"--{name.replace('_', '-')} must be a positive integer, got {value!r}"
                )
        if not (self.refine_lr > 0 and math.isfinite(self.refine_lr)):
            raise OnewordError(f"--refine-lr must be a positive number, got {self.refine_lr!r}")
        if not (self.l2_weight >= 0 and math.isfinite(self.l2_weight)):
            raise OnewordError(f"--l2-weight must be >= 0, got {self.l2_weight!r}")
        if self.check not in CHECKS:
            raise OnewordError(f"--check must be one of {', '.join(CHECKS)}, got {self.check!r}")
        if self.threshold is not None and (math.isnan(self.threshold) or self.threshold < 0):
            raise OnewordError(f"--threshold must be a number >= 0, got {self.threshold!r}")
        if self.precision not in (None, "bf16", "fp16", "fp32"):
            raise OnewordError(f"--precision must be bf16, fp16 or fp32, got {self.precision!r}")


@dataclass
class EncodeResult:
    """What `encode` returns.

    Attributes:
        token: the learned word.
        placeholder: its `Placeholder` in the model (which keeps the final rows).
        vectors: per text encoder, the final (K, d) fp32 rows (CPU copies).
        path_taken: "encoder", "refined" or "fallback" (see the module docstring).
        score: the final check score (lower is better), None with check "none".
        threshold: the threshold it was compared with.
        timings: seconds per stage ("load_tower", "encoder", "refine", "check",
            "fallback", "samples", "total").
        log: the contents of log.json.
        files: name -> Path of each file written ("embedding", "samples", "log").
    """

    token: str
    placeholder: object
    vectors: list[torch.Tensor]
    path_taken: str
    score: float | None
    threshold: float
    timings: dict[str, float]
    log: dict
    files: dict = field(default_factory=dict)

    def summary(self) -> str:
        """One line for the console: the path taken, the score and the threshold."""
        stages = [f"encoder {self.timings['encoder']:.2f} s"]
        refine = self.log.get("refine")
        if refine:
            stages.append(f"refined {refine['steps_done']} steps {self.timings['refine']:.1f} s")
        fallback = self.log.get("fallback")
        if fallback:
            stages.append(
                f"full inversion {fallback['steps_done']} steps {self.timings['fallback']:.1f} s"
            )
        check = self.log["check"]
        if self.score is None:
            verdict = "no check"
        else:
            first = self.log["scores"][self.log["checked"]]
            passed = "<=" if first <= self.threshold else ">"
            verdict = f"check {check}: score {first:.3f} {passed} threshold {self.threshold:g}"
            if fallback:
                verdict += f", after full inversion {self.score:.3f}"
        return f"{self.token}: {', '.join(stages)}; {verdict}; path: {self.path_taken}"


# ---------------------------------------------------------------------------------------
# Helpers


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def default_class_word(encoder) -> str:
    """The class word the encoder was trained with for unlabelled data, else "object"."""
    metadata = getattr(encoder, "metadata", None) or {}
    try:
        return json.loads(metadata.get("train_config", "{}")).get("class_word") or "object"
    except (ValueError, AttributeError):
        return "object"


def _resolve_config(config: EncodeConfig | None, settings: dict) -> EncodeConfig:
    config = config or EncodeConfig()
    known = {f.name for f in dataclasses.fields(EncodeConfig)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise OnewordError(f"unknown encode settings {unknown}; known: {sorted(known)}")
    config = dataclasses.replace(config, **{k: v for k, v in settings.items() if v is not None})
    config.check_values()
    return config


def resolve_check(config: EncodeConfig, model) -> EncodeConfig:
    """`config` with "auto" replaced by the check it means for `model`, and a threshold."""
    from ..clip import has_world_clip

    check = config.check
    if check == "auto":
        folder = model.extra.get("folder") if isinstance(model.extra, dict) else None
        check = "clip" if config.clip or (folder and has_world_clip(folder)) else "loss"
    threshold = config.threshold
    if threshold is None:
        threshold = THRESHOLDS.get(check, 1.0)
    return dataclasses.replace(config, check=check, threshold=threshold)


def _inversion_config(config: EncodeConfig, vectors: int, **overrides):
    from ..inversion import InversionConfig

    settings = dict(
        vectors=vectors,
        templates=config.templates,
        seed=config.seed,
        precision=config.precision,
        samples=False,
        quiet=config.quiet,
    )
    return InversionConfig(**(settings | overrides))


def _run_facts(result) -> dict:
    """The parts of an `invert` log worth keeping in ours."""
    keys = ("steps_done", "seconds_total", "seconds_per_step", "unet_forward_passes")
    keys += ("unet_samples", "loss", "final_loss_ema", "nonfinite_steps", "config")
    return {key: result.log.get(key) for key in keys}


# ---------------------------------------------------------------------------------------
# The quality check


class LossCheck:
    """score = mean denoising loss with the token / with the class word, on fixed draws.

    The draws (image, template, posterior sample, timestep, noise) come from one seeded
    CPU generator and are the same for every candidate, so scores are comparable across
    the stages of one run and the class word's loss is computed once.
    """

    def __init__(self, model, images, class_word: str, config: EncodeConfig, batch: int = 8):
        """`images`: fitted PIL images, or `PreparedImages` (their posterior is reused)."""
        from ..inversion.invert import PreparedImages
        from ..inversion.templates import fill, load_templates

        self.model, self.batch, self.unet_passes = model, batch, 0
        draws = config.check_draws
        generator = torch.Generator().manual_seed(config.seed)
        templates = load_templates(config.templates)
        if isinstance(images, PreparedImages):  # encoded once for the whole `encode` call
            n = len(images.images)
            mean, std = images.latent_mean[:n], images.latent_std[:n]  # (n, 4, h, w)
        else:
            from ..images import images_to_tensor

            with torch.no_grad():
                pixels = images_to_tensor(images).to(model.device, model.dtype)  # (n, 3, H, W)
                posterior = model.vae.encode(pixels).latent_dist
                mean, std = posterior.mean.float(), posterior.std.float()  # (n, 4, h, w)
        chosen = torch.randint(mean.shape[0], (draws,), generator=generator).to(model.device)
        self.templates = [
            templates[i] for i in torch.randint(len(templates), (draws,), generator=generator)
        ]
        sample = torch.randn((draws, *mean.shape[1:]), generator=generator).to(model.device)
        from ..inversion.objective import draw_timesteps, scale_latents

        self.latents = scale_latents(model, mean[chosen] + std[chosen] * sample)  # (D, c, h, w)
        self.timesteps = draw_timesteps(model, draws, generator).to(model.device)
        self.noise = torch.randn(self.latents.shape, generator=generator).to(model.device)
        self.class_loss = self._mean_loss([fill(t, class_word) for t in self.templates])

    @torch.no_grad()
    def _mean_loss(self, prompts: list[str]) -> float:
        from ..inversion.objective import denoising_loss
        from ..prompts import encode_prompts

        losses = []
        for start in range(0, len(prompts), self.batch):
            part = slice(start, start + self.batch)
            embeds = encode_prompts(self.model, prompts[part])
            output = denoising_loss(
                self.model, self.latents[part], embeds, self.noise[part], self.timesteps[part]
            )
            losses.append(output.loss)
            self.unet_passes += 1
        return torch.cat(losses).mean().item()

    def score(self, placeholder) -> float:
        """The placeholder's current rows, scored (lower is better; 1.0 = the class word)."""
        from ..inversion.templates import fill
        from ..tokens import expand_prompt

        prompts = [expand_prompt(fill(t, placeholder.token), [placeholder]) for t in self.templates]
        return self._mean_loss(prompts) / max(self.class_loss, 1e-12)


class ClipCheck:
    """score = (1 - CLIP-I of the token's samples) / (1 - CLIP-I of the class word's samples).

    CLIP-I is the mean cosine between samples of "a photo of a {}" (`sample_seeds` seeds,
    `sample_steps` DDIM steps, the same seeds for both words) and the concept's images.
    Lower is better; 1.0 = as close to the images as the class word's samples.
    """

    def __init__(self, model, images, class_word: str, config: EncodeConfig, scorer=None):
        """`scorer`: a loaded CLIP scorer to reuse (`oneword eval`); None loads `config.clip`."""
        from ..clip import load_clip_scorer

        folder = model.extra.get("folder") if isinstance(model.extra, dict) else None
        self.scorer = scorer or load_clip_scorer(config.clip, folder, model.device)
        if self.scorer is None:
            raise OnewordError(
                f"--check clip needs a CLIP: {model.source} has no image_encoder/ CLIP; pass "
                "--clip open_clip:ViT-L-14:openai (or transformers:FOLDER), or use --check loss"
            )
        self.model, self.config, self.unet_passes = model, config, 0
        self.references = self.scorer.image_features(images)  # (n, p)
        self.class_distance = self._distance(class_word, [])

    def _distance(self, word: str, placeholders) -> float:
        from ..clip import pairwise_similarity
        from ..sampling import generate

        samples = generate(
            self.model,
            [f"a photo of a {word}"],
            placeholders=placeholders,
            num_per_prompt=self.config.sample_seeds,
            steps=self.config.sample_steps,
            seed=self.config.seed,
            progress=not self.config.quiet,
        )
        self.unet_passes += self.config.sample_steps  # one batched (CFG) UNet call per step
        return 1 - pairwise_similarity(self.scorer.image_features(samples), self.references)

    def score(self, placeholder) -> float:
        """The placeholder's current rows, scored (lower is better; 1.0 = the class word)."""
        return self._distance(placeholder.token, [placeholder]) / max(self.class_distance, 1e-6)


def _save_samples(path: Path, model, placeholder, images, config: EncodeConfig) -> Path:
    """Grid: the concept's images, then a reconstruction prompt and edits (as `invert` writes)."""
    from PIL import Image

    from ..images import save_grid
    from ..inversion.templates import OBJECT_SAMPLE_PROMPTS, STYLE_SAMPLE_PROMPTS, fill
    from ..sampling import generate

    columns = config.sample_seeds
    first_row = list(images[:columns])
    first_row += [Image.new("RGB", first_row[0].size, (255, 255, 255))] * (columns - len(first_row))
    prompts = STYLE_SAMPLE_PROMPTS if config.templates == "style" else OBJECT_SAMPLE_PROMPTS
    prompts = [fill(p, placeholder.token) for p in prompts]
    samples = generate(
        model,
        prompts,
        placeholders=[placeholder],
        num_per_prompt=columns,
        steps=config.sample_steps,
        seed=config.seed,
        progress=not config.quiet,
    )
    return save_grid(
        first_row + samples, path, columns=columns, labels=["training images", *prompts]
    )


# ---------------------------------------------------------------------------------------
# The API


def encode(
    model,
    encoder,
    images,
    token: str,
    *,
    class_word: str | None = None,
    config: EncodeConfig | None = None,
    out_dir: str | os.PathLike | None = None,
    tower=None,
    progress: Callable[[dict], None] | None = None,
    **settings,
) -> EncodeResult:
    """Learn a token for a concept: predict, refine, check, and fall back when needed.

    Args:
        model: a `LoadedModel` (the token is added to it and keeps the final rows).
        encoder: a `ConceptEncoder` or its file (`load_encoder`); it must be trained for
            this model's family and text-encoder widths.
        images: PIL images or paths (files, folders, globs), fitted to `model.resolution`.
        token: the new word, e.g. "<my-cup>".
        class_word: the concept's class ("cup"); default: the encoder's training class
            word for unlabelled data, else "object".
        config: `EncodeConfig`; defaults if None.
        out_dir: where learned_embeds.safetensors, samples.png and log.json go; None
            writes nothing.
        tower: the encoder's loaded `ImageTower` (loaded from its config when None).
        progress: called with a dict at every stage, for a progress display:
            {"stage": "encoder", "seconds"}; {"stage": "refine" or "fallback", "step",
            "total", "loss"} after every step (`invert`'s events, renamed); {"stage":
            "checking", "after", "check"} when a check starts and {"stage": "check",
            "after": "encoder"/"refined"/"fallback", "check", "score", "threshold",
            "passed", "fallback"} when it is done; {"stage": "samples"} before samples.png.
            An exception it raises (a user's cancel) ends the run; nothing is written.
        **settings: `EncodeConfig` fields overriding `config` (refine_steps=0,
            fallback=False, threshold=..., ...); None keeps the config's value.

    Returns:
        `EncodeResult`; `vectors` per text encoder (K, d) fp32.
    """
    from ..embeddings import TokenEmbedding, save_model_token
    from ..inversion import invert
    from ..inversion.invert import prepare_images
    from ..io import atomic_write_text
    from ..tokens import add_placeholder, get_rows, set_rows
    from .features import load_tower
    from .model import ConceptEncoder, check_compatible, encode_concept, load_encoder

    # 1. Settings, the encoder (refused early for another family or width), the images.
    config = resolve_check(_resolve_config(config, settings), model)
    started = time.perf_counter()
    timings: dict[str, float] = {}
    if not isinstance(encoder, ConceptEncoder):
        encoder = load_encoder(encoder, device=model.device)
    check_compatible(encoder.config, model)
    class_word = class_word or default_class_word(encoder)
    # The concept, prepared once: fitted images and pixels, and (on first use: not for the
    # encoder alone) VAE posteriors, shared by the encoder, the refinement, the check and
    # the fallback.
    prepared = prepare_images(model, images)
    images = prepared.images
    vectors = encoder.config.num_vectors
    if tower is None:
        tic = time.perf_counter()
        folder = model.extra.get("folder") if isinstance(model.extra, dict) else None
        tower = load_tower(encoder.config.tower, model_folder=folder, device=model.device)
        timings["load_tower"] = time.perf_counter() - tic

    # 2. Stage 1: the encoder's prediction, one forward pass.
    _sync(model.device)
    tic = time.perf_counter()
    prediction = encode_concept(encoder, model, images, token, class_word, tower=tower)
    _sync(model.device)
    timings["encoder"] = time.perf_counter() - tic
    report = progress or (lambda event: None)
    report({"stage": "encoder", "seconds": timings["encoder"]})

    def stage_progress(stage: str):
        return None if progress is None else (lambda event: progress(event | {"stage": stage}))

    # 3. Stage 2: refine with classic inversion, warm-started from (and pulled toward) it.
    refine = None
    if config.refine_steps > 0:
        tic = time.perf_counter()
        refine_config = _inversion_config(
            config,
            vectors,
            steps=config.refine_steps,
            lr=config.refine_lr,
            l2_weight=config.l2_weight,
        )
        refined = invert(
            model,
            prepared,
            token,
            class_word,
            refine_config,
            class_word=class_word,
            warm_start=prediction,
            progress=stage_progress("refine"),
        )
        placeholder, path_taken, refine = refined.placeholder, "refined", _run_facts(refined)
        timings["refine"] = time.perf_counter() - tic
    else:
        placeholder = add_placeholder(
            model, token, class_word, vectors, init_rows=prediction.vectors
        )
        path_taken = "encoder"

    # 4. Stage 3: check; below the bar, full inversion from the refined rows, then re-check.
    scores: dict[str, float] = {}
    score, checker, fallback = None, None, None
    if config.check != "none":
        tic = time.perf_counter()
        report({"stage": "checking", "after": path_taken, "check": config.check})
        if config.check == "loss":
            checker = LossCheck(model, prepared, class_word, config)
        else:
            checker = ClipCheck(model, images, class_word, config)
        score = scores[path_taken] = checker.score(placeholder)
        timings["check"] = time.perf_counter() - tic
        passed = score <= config.threshold  # False for a NaN score
        report(
            {
                "stage": "check",
                "after": path_taken,
                "check": config.check,
                "score": score,
                "threshold": config.threshold,
                "passed": passed,
                "fallback": config.fallback and not passed,
            }
        )
        if passed:
            log.info("%s: score %.4f <= threshold %g", token, score, config.threshold)
        elif not config.fallback:
            log.warning(
                "%s: score %.4f > threshold %g, but the fallback is off: keeping the %s token",
                token,
                score,
                config.threshold,
                path_taken,
            )
        else:
            log.info(
                "%s: score %.4f > threshold %g: full inversion", token, score, config.threshold
            )
            tic = time.perf_counter()
            overrides = {} if config.fallback_steps is None else {"steps": config.fallback_steps}
            # The model keeps `token` for the final rows; the full run learns a scratch copy
            # (a placeholder cannot be added twice), whose rows are then written into it.
            start = TokenEmbedding(token, get_rows(model, placeholder))
            full = invert(
                model,
                prepared,
                f"{token}_fallback",
                class_word,
                _inversion_config(config, vectors, **overrides),
                class_word=class_word,
                warm_start=start,
                progress=stage_progress("fallback"),
            )
            set_rows(model, placeholder, full.vectors)
            path_taken, fallback = "fallback", _run_facts(full)
            timings["fallback"] = time.perf_counter() - tic
            tic = time.perf_counter()
            report({"stage": "checking", "after": "fallback", "check": config.check})
            score = scores["fallback"] = checker.score(placeholder)
            timings["check"] += time.perf_counter() - tic
            report(
                {
                    "stage": "check",
                    "after": "fallback",
                    "check": config.check,
                    "score": score,
                    "threshold": config.threshold,
                    "passed": score <= config.threshold,
                    "fallback": False,
                }
            )
            if not score <= config.threshold:
                log.warning(
                    "%s: after full inversion the score is still %.4f > threshold %g",
                    token,
                    score,
                    config.threshold,
                )

    # 5. Outputs: the same files as `oneword invert`.
    runs = [r for r in (refine, fallback) if r]
    steps_done = sum(r["steps_done"] for r in runs)
    check_passes = checker.unet_passes if checker is not None else 0
    data = {
        "method": "encode",
        "path_taken": path_taken,
        "score": score,
        "threshold": config.threshold,
        "check": config.check,
        "checked": next(iter(scores), None),  # the stage the decision was made on
        "scores": scores,
        "token": token,
        "names": placeholder.names,
        "class_word": class_word,
        "num_images": len(images),
        "config": asdict(config),
        "encoder": {
            "source": getattr(encoder, "source", None),
            "config": asdict(encoder.config),
            "step": (getattr(encoder, "metadata", None) or {}).get("step"),
        },
        "model": model.describe(),
        "device": str(model.device),
        "dtype": str(model.dtype).replace("torch.", ""),
        "torch_version": torch.__version__,
        "steps_done": steps_done,
        "unet_forward_passes": sum(r["unet_forward_passes"] for r in runs) + check_passes,
        "unet_samples": sum(r["unet_samples"] for r in runs),
        "check_unet_passes": check_passes,
        "refine": refine,
        "fallback": fallback,
        "timings": timings,
        "vector_norms": [rows.norm(dim=-1).tolist() for rows in get_rows(model, placeholder)],
    }
    files = {}
    if out_dir is not None:
        out = Path(out_dir)
        tic = time.perf_counter()
        files["embedding"] = save_model_token(
            out / "learned_embeds.safetensors",
            model,
            placeholder,
            method="encode",
            steps=steps_done,
            extra_metadata={
                "path_taken": path_taken,
                "score": score,
                "threshold": config.threshold,
                "class_word": class_word,
                "encoder": getattr(encoder, "source", None),
                "config": json.dumps(asdict(config)),
            },
        )
        if config.samples:
            report({"stage": "samples"})
            files["samples"] = _save_samples(
                out / "samples.png", model, placeholder, images, config
            )
        timings["samples"] = time.perf_counter() - tic
        files["log"] = out / "log.json"
    timings["total"] = time.perf_counter() - started
    if out_dir is not None:
        data["files"] = {name: str(path) for name, path in files.items()}
        atomic_write_text(files["log"], json.dumps(data, indent=2) + "\n")
    vectors_out = [rows.cpu() for rows in get_rows(model, placeholder)]
    return EncodeResult(
        token, placeholder, vectors_out, path_taken, score, config.threshold, timings, data, files
    )


__all__ = [
    "DEFAULT_ENCODER",
    "ClipCheck",
    "EncodeConfig",
    "EncodeResult",
    "LossCheck",
    "default_class_word",
    "encode",
]
