"""Inversion on the flow-matching families (SD3, FLUX.1) beside SDXL, on the tiny models.

Two measurements:

1. Per-step time and peak memory of `oneword.inversion.invert` on tiny SDXL, SD3 and FLUX
   models (built on the fly), each family in a fresh child process so the peak-memory
   numbers do not mix (peak memory as in bench_inversion.py: CUDA max allocated, on the CPU
   the growth of VmHWM over the loop). The first `--warmup` steps are left out of the time.
   On a GPU (`--device cuda`) it adds steps/s at batch 1 and 4 in bf16.
2. `--encoders`: which text encoders should learn the token. For each family and choice
   (all, clip, t5) it inverts a concept and scores the learned rows on fixed held-out draws
   (images, templates, timesteps, noise from a separate generator): the mean denoising loss
   with the learned rows divided by the loss with the initializer's rows (lower is better).
   The tiny models are random, so this says which choice the objective can use, not which
   gives better images on real models.

    OMP_NUM_THREADS=1 python benchmarks/bench_flow.py                # time and memory
    OMP_NUM_THREADS=1 python benchmarks/bench_flow.py --encoders     # the encoder choice
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a plain script from anywhere
    sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

FAMILIES = ("sdxl", "sd3", "flux")


def _images(n: int, size: int, seed: int = 0):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray((rng.random((size, size, 3)) * 255).astype("uint8")) for _ in range(n)]


def _load(family: str, folder: Path, device: str, precision: str | None = None):
    from oneword.models import load_model
    from oneword.tiny import build_tiny_pipeline

    if not (folder / "model_index.json").is_file():
        build_tiny_pipeline(folder, family)
    return load_model(folder, device=device, precision=precision)


def time_family(family: str, folder: Path, device: str, steps: int, batch: int) -> dict:
    """One family's per-step seconds and peak memory growth (run in a child process)."""
    from bench_inversion import _peak_growth, _peak_start

    from oneword.inversion import InversionConfig, invert

    model = _load(family, folder, device)
    images = _images(4, model.resolution)
    config = InversionConfig(steps=steps, batch=batch, quiet=True, samples=False)
    start = _peak_start(model.device)
    result = invert(model, images, "<bench>", "dog", config)
    out = {
        "step_seconds": result.log["step_seconds"],
        "peak_mib": _peak_growth(model.device, start),
    }
    if model.device.type == "cuda":
        out["gpu"] = {}
        for gpu_batch in (1, 4):
            bf16 = _load(family, folder, device, "bf16")
            run = invert(
                bf16,
                images,
                f"<b{gpu_batch}>",
                "dog",
                InversionConfig(steps=steps, batch=gpu_batch, quiet=True, samples=False),
            )
            seconds = statistics.median(run.log["step_seconds"][2:])
            out["gpu"][gpu_batch] = 1 / seconds
    return out


@torch.no_grad()
def _heldout_loss(model, placeholder, rows, images, draws: int = 32) -> float:
    """Mean denoising loss of `rows` on fixed draws (their own generator, seed 1234)."""
    from oneword.images import images_to_tensor
    from oneword.inversion.objective import denoising_loss, draw_timesteps, scale_latents
    from oneword.inversion.templates import OBJECT_TEMPLATES, fill
    from oneword.prompts import encode_prompts
    from oneword.tokens import set_rows

    set_rows(model, placeholder, rows)
    generator = torch.Generator().manual_seed(1234)
    pixels = images_to_tensor(images).to(model.device, model.dtype)
    posterior = model.vae.encode(pixels).latent_dist
    chosen = torch.randint(len(images), (draws,), generator=generator)
    sample = torch.randn((draws, *posterior.mean.shape[1:]), generator=generator)
    latents = scale_latents(model, posterior.mean[chosen] + posterior.std[chosen] * sample)
    noise = torch.randn(latents.shape, generator=generator)
    timesteps = draw_timesteps(model, draws, generator)
    templates = torch.randint(len(OBJECT_TEMPLATES), (draws,), generator=generator).tolist()
    prompts = [fill(OBJECT_TEMPLATES[i], placeholder.token) for i in templates]
    losses = []
    for part in range(0, draws, 8):
        window = slice(part, part + 8)
        embeds = encode_prompts(model, prompts[window])
        output = denoising_loss(model, latents[window], embeds, noise[window], timesteps[window])
        losses.append(output.loss)
    return torch.cat(losses).mean().item()


def encoder_choice(folder: Path, family: str, seeds: int, steps: int) -> dict:
    """Held-out loss ratio (learned / initializer) per --encoders choice, over seeds."""
    from oneword.inversion import InversionConfig, invert

    ratios = {}
    for choice in ("all", "clip", "t5"):
        values = []
        for seed in range(seeds):
            model = _load(family, folder, "cpu")
            images = _images(4, model.resolution, seed=seed)
            config = InversionConfig(
                steps=steps, batch=4, lr=0.05, seed=seed, encoders=choice, quiet=True, samples=False
            )
            result = invert(model, images, "<c>", "dog", config)
            learned = _heldout_loss(model, result.placeholder, result.vectors, images)
            start = _heldout_loss(model, result.placeholder, result.placeholder.init_rows, images)
            values.append(learned / start)
        ratios[choice] = statistics.mean(values)
    return ratios


def _child(args) -> None:
    result = time_family(args.child, Path(args.folder), args.device, args.steps, args.batch)
    print(json.dumps(result))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="steps per family (default 20)")
    parser.add_argument("--batch", type=int, default=4, help="images per step (default 4)")
    parser.add_argument("--warmup", type=int, default=3, help="steps left out of the time")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--encoders", action="store_true", help="measure the --encoders choice")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per choice (--encoders)")
    parser.add_argument("--child", choices=FAMILIES, help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(args)
        return 0
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        if args.encoders:
            print(
                f"--encoders: held-out loss, learned / initializer rows ({args.seeds} seeds, "
                f"{args.steps} steps, batch 4, lr 0.05; lower is better)"
            )
            print("| family | all | clip | t5 |\n|---|---|---|---|")
            for family in ("sd3", "flux"):
                ratios = encoder_choice(Path(tmp) / family, family, args.seeds, args.steps)
                print(f"| {family} | " + " | ".join(f"{ratios[c]:.4f}" for c in ratios) + " |")
            return 0
        print(
            f"inversion, tiny models, {args.device}, {threads} thread(s), batch {args.batch}, "
            f"{args.steps} steps (first {args.warmup} left out)"
        )
        print("| family | text encoders (widths) | latents | s/step (median) | peak MiB |")
        print("|---|---|---|---|---|")
        for family in FAMILIES:
            folder = Path(tmp) / family
            command = [sys.executable, str(Path(__file__).resolve()), "--child", family,
                       "--folder", str(folder), "--device", args.device,
                       "--steps", str(args.steps), "--batch", str(args.batch)]  # fmt: skip
            done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=1800)
            if done.returncode != 0:
                print(done.stderr[-2000:], file=sys.stderr)
                return 1
            result = json.loads(done.stdout.strip().splitlines()[-1])
            seconds = statistics.median(result["step_seconds"][args.warmup :])
            widths = {"sdxl": "32+48", "sd3": "32+48+96 (T5)", "flux": "32+64 (T5)"}[family]
            latents = "4x16x16" if family == "sdxl" else "16x16x16"
            print(f"| {family} | {widths} | {latents} | {seconds:.4f} | {result['peak_mib']:.1f} |")
            if "gpu" in result:
                rates = ", ".join(f"batch {b}: {r:.1f} it/s" for b, r in result["gpu"].items())
                print(f"|   bf16 GPU | {rates} | | | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
