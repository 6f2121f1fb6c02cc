"""Benchmark our inversion loop against the loop of the common example scripts.

The REFERENCE loop is written the way diffusers' `examples/textual_inversion/
textual_inversion.py` does it: the token is added with `resize_token_embeddings`, the
WHOLE input-embedding matrix is given to AdamW (weight decay 1e-2) and the original rows
are copied back after every step, the VAE encodes the images every step, and the text
encoder runs a full forward with a trainable embedding matrix. Ours (`oneword.inversion.
invert`) gives Adam only the new rows, samples cached VAE posteriors, and keeps the frozen
parts in the model dtype.

Both run on the same model, batch and number of steps, each in a fresh child process so
the peak-memory numbers do not mix. Peak memory: on CUDA `torch.cuda.max_memory_allocated`;
on the CPU the growth of the peak resident set (VmHWM of /proc/self/status, reset to the
current RSS before the loop by writing 5 to /proc/self/clear_refs; elsewhere the growth of
`resource.getrusage(RUSAGE_SELF).ru_maxrss`, which hides growth below the loading peak).
tracemalloc does not see torch's allocations.

On a GPU it also measures steps/s at batch 1, 4 and 8 in bf16 and the fraction of the
UNet's own forward+backward rate that a whole step reaches (UNet fwd+bwd alone, same
batch, as the reference: fraction = t_unet / t_step).

    python benchmarks/bench_inversion.py --model tiny    # tiny sd1 built on the fly (~1 min)
    python benchmarks/bench_inversion.py --model checkpoints/world --steps 50
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a plain script from anywhere
    sys.path.insert(0, str(REPO))


def _images(n: int, size: int):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    return [Image.fromarray((rng.random((size, size, 3)) * 255).astype("uint8")) for _ in range(n)]


def _vm_hwm_mib() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB -> MiB
    except OSError:
        pass
    return None


def _peak_start(device: torch.device) -> float:
    """Reset the peak counter where possible; returns the baseline in MiB."""
    import gc
    import resource

    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**20
    try:  # Linux: writing 5 to clear_refs resets the peak RSS (VmHWM) to the current RSS
        Path("/proc/self/clear_refs").write_text("5")
        return _vm_hwm_mib()
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB


def _peak_growth(device: torch.device, start: float) -> float:
    import resource

    if device.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20 - start
    peak = _vm_hwm_mib()
    if peak is None:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return peak - start


# --- the two loops (each runs in a child process) ---------------------------------------------


def run_ours(model, images, steps: int, batch: int, token: str = "<bench>") -> dict:
    from oneword.inversion import InversionConfig, invert

    config = InversionConfig(steps=steps, batch=batch, quiet=True, samples=False)
    start = _peak_start(model.device)
    result = invert(model, images, token, "dog", config)
    return {"step_seconds": result.log["step_seconds"], "losses": result.log["loss"],
            "peak_mib": _peak_growth(model.device, start)}  # fmt: skip


def run_reference(model, images, steps: int, batch: int) -> dict:
    """diffusers textual_inversion.py, reduced to its loop (same defaults: AdamW, wd 1e-2)."""
    import torch.nn.functional as F

    from oneword.images import images_to_tensor
    from oneword.inversion.objective import PromptEmbeddings, denoising_target, unet_conditioning
    from oneword.inversion.templates import OBJECT_TEMPLATES

    device, generator = model.device, torch.Generator().manual_seed(0)
    # 1. Add the token: resize every text encoder's matrix, initialise the new row from "dog".
    placeholder_ids, trainable = [], []
    for tokenizer, text_encoder in zip(model.tokenizers, model.text_encoders):
        tokenizer.add_tokens(["<bench>"])
        token_id = tokenizer.convert_tokens_to_ids("<bench>")
        init_id = tokenizer("dog", add_special_tokens=False).input_ids[0]
        text_encoder.resize_token_embeddings(len(tokenizer))
        text_encoder.to(torch.float32)  # the script trains the text encoder in fp32
        weights = text_encoder.get_input_embeddings().weight
        with torch.no_grad():
            weights[token_id] = weights[init_id].clone()
        weights.requires_grad_(True)
        text_encoder.train()
        placeholder_ids.append(token_id)
        trainable.append(weights)
    originals = [w.detach().clone() for w in trainable]
    optimizer = torch.optim.AdamW(
        trainable, lr=5e-3, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8
    )
    pixels = images_to_tensor(images).to(device)
    autocast = torch.autocast("cuda", dtype=model.dtype, enabled=device.type == "cuda")

    start = _peak_start(device)
    step_seconds, losses = [], []
    for _ in range(steps):
        tic = time.perf_counter()
        # 2. Data: random images (flipped with p=0.5) and templates, as the script's dataset.
        chosen = torch.randint(len(images), (batch,), generator=generator)
        flips = torch.rand(batch, generator=generator) < 0.5
        batch_pixels = torch.stack([p.flip(-1) if f else p for p, f in zip(pixels[chosen], flips)])
        templates = torch.randint(len(OBJECT_TEMPLATES), (batch,), generator=generator).tolist()
        prompts = [OBJECT_TEMPLATES[i].format("<bench>") for i in templates]
        with autocast:
            # 3. VAE encode every step.
            with torch.no_grad():
                posterior = model.vae.encode(batch_pixels.to(model.dtype)).latent_dist
                latents = posterior.sample().float() * model.scaling_factor
            noise = torch.randn(latents.shape, generator=generator).to(device)
            timesteps = torch.randint(1000, (batch,), generator=generator).to(device)
            noisy = model.noise_scheduler.add_noise(latents, noise, timesteps)
            # 4. Text encoder forward with the whole matrix trainable.
            hidden, pooled = [], None
            for tokenizer, text_encoder in zip(model.tokenizers, model.text_encoders):
                ids = tokenizer(prompts, padding="max_length", max_length=77, truncation=True,
                                return_tensors="pt").input_ids.to(device)  # fmt: skip
                if model.family == "sdxl":
                    output = text_encoder(ids, output_hidden_states=True)
                    hidden.append(output.hidden_states[-2])
                    pooled = getattr(output, "text_embeds", None)
                else:
                    hidden.append(text_encoder(ids)[0])
            embeds = PromptEmbeddings(torch.cat(hidden, -1), pooled)
            prediction = model.unet(
                noisy.to(model.dtype), timesteps, **unet_conditioning(model, embeds)
            ).sample
            target = denoising_target(model, latents, noise, timesteps)
            loss = F.mse_loss(prediction.float(), target.float(), reduction="mean")
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        # 5. Restore every row but the placeholder's (weight decay and Adam touched them all).
        with torch.no_grad():
            for weights, original, token_id in zip(trainable, originals, placeholder_ids):
                keep = torch.ones(weights.shape[0], dtype=torch.bool, device=device)
                keep[token_id] = False
                weights[keep] = original[keep]
        losses.append(loss.item())
        step_seconds.append(time.perf_counter() - tic)
    return {"step_seconds": step_seconds, "losses": losses, "peak_mib": _peak_growth(device, start)}


def unet_fwd_bwd(model, batch: int, repeats: int = 10) -> dict:
    """Seconds and FLOPs of the UNet's forward + backward alone (grad to the text features)."""
    from torch.utils.flop_counter import FlopCounterMode

    from oneword.inversion.objective import PromptEmbeddings, unet_conditioning

    side = model.resolution // model.vae_scale
    latents = torch.randn(batch, model.unet.config.in_channels, side, side, device=model.device)
    width = model.unet.config.cross_attention_dim
    hidden = torch.randn(batch, 77, width, device=model.device, requires_grad=True)
    pooled = None
    if model.family == "sdxl":
        pooled = torch.randn(
            batch, model.text_encoders[-1].config.projection_dim, device=model.device
        )
    timesteps = torch.randint(1000, (batch,), device=model.device)

    def once():
        embeds = PromptEmbeddings(hidden, pooled)
        out = model.unet(
            latents.to(model.dtype), timesteps, **unet_conditioning(model, embeds)
        ).sample
        out.float().pow(2).mean().backward()

    with FlopCounterMode(display=False) as counter:
        once()
    flops = counter.get_total_flops()
    times = []
    for _ in range(repeats + 2):
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        tic = time.perf_counter()
        once()
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - tic)
    return {"seconds": statistics.median(times[2:]), "flops": flops}


def gpu_scaling(model, images, steps: int, batches: list[int]) -> list[dict]:
    """Our loop and the UNet's fwd+bwd alone at each batch, in one process (one model load)."""
    rows = []
    for batch in batches:
        ours = run_ours(model, images, steps, batch, token=f"<bench-{batch}>")
        rows.append({"batch": batch, "ours": ours, "unet": unet_fwd_bwd(model, batch)})
    return rows


def child(args) -> dict | list:
    from oneword.models import load_model

    model = load_model(args.model, device=args.device, precision="bf16")
    images = _images(4, model.resolution)
    if args.child == "ours":
        return run_ours(model, images, args.steps, args.batch)
    if args.child == "reference":
        return run_reference(model, images, args.steps, args.batch)
    if args.child == "unet":
        return unet_fwd_bwd(model, args.batch, repeats=args.steps)
    return gpu_scaling(model, images, args.steps, _batches(args.gpu_batches))


def _batches(text: str) -> list[int]:
    return [int(b) for b in text.split(",") if b.strip()]


# --- driver ----------------------------------------------------------------------------------


def _spawn(which: str, model: str, device: str, steps: int, batch: int, gpu_batches: str = ""):
    command = [sys.executable, str(Path(__file__).resolve()), "--child", which, "--model", model,
               "--device", device, "--steps", str(steps), "--batch", str(batch),
               "--gpu-batches", gpu_batches]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"{which} child failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _summary(result: dict, warmup: int, batch: int) -> dict:
    times = result["step_seconds"][warmup:]
    per_step = statistics.median(times)
    losses = [v for v in result["losses"] if v is not None]
    return {"per_step": per_step, "images_s": batch / per_step, "peak_mib": result["peak_mib"],
            "first_loss": statistics.mean(losses[:10]), "final_loss": statistics.mean(losses[-10:])}  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model",
        default=None,
        help="diffusers folder, or 'tiny' for a tiny random model of --family built on the fly "
        "(default: checkpoints/world if present, else tiny)",
    )
    parser.add_argument(
        "--family",
        default="sd1",
        choices=["sd1", "sd2", "sdxl"],
        help="family of the tiny model",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of the timing")
    parser.add_argument("--gpu-batches", default="1,4,8", help="batches for the GPU scaling table")
    parser.add_argument(
        "--child", choices=["ours", "reference", "unet", "gpu-scaling"], help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0

    with tempfile.TemporaryDirectory() as scratch:
        model = args.model
        world = REPO / "checkpoints" / "world" / "model_index.json"
        if model is None and world.is_file():
            model = str(world.parent)
        if model is None or model == "tiny":
            from oneword.tiny import build_tiny_pipeline

            model = str(build_tiny_pipeline(Path(scratch) / args.family, args.family))
        ours = _summary(
            _spawn("ours", model, args.device, args.steps, args.batch), args.warmup, args.batch
        )
        reference = _summary(
            _spawn("reference", model, args.device, args.steps, args.batch), args.warmup, args.batch
        )
        # The floor both loops stand on: the frozen UNet's forward + backward alone, same batch.
        # No loop around this UNet can be more than t_reference / t_unet faster per step.
        unet = _spawn("unet", model, args.device, args.steps, args.batch)

        memory = (
            "torch.cuda.max_memory_allocated"
            if args.device.startswith("cuda")
            else "peak RSS (VmHWM) growth"
        )
        print(f"\n### Inversion loop, {model}, device {args.device}, batch {args.batch}, {args.steps} steps "
              f"(median of steps after {args.warmup}); peak memory = {memory}\n")  # fmt: skip
        print("| loop | s/step | images/s | peak MiB | loss first 10 | loss last 10 |")
        print("|---|---:|---:|---:|---:|---:|")
        for name, row in (("oneword", ours), ("reference (diffusers-style)", reference)):
            print(f"| {name} | {row['per_step']:.4f} | {row['images_s']:.1f} | {row['peak_mib']:.1f} | "
                  f"{row['first_loss']:.4f} | {row['final_loss']:.4f} |")  # fmt: skip
        print(f"| ratio (reference / oneword) | {reference['per_step'] / ours['per_step']:.2f}x | "
              f"{ours['images_s'] / reference['images_s']:.2f}x | | | |")  # fmt: skip
        print(f"\nUNet forward + backward alone (batch {args.batch}, median of {args.steps}): "
              f"{unet['seconds']:.4f} s = {unet['seconds'] / ours['per_step']:.0%} of a oneword step; "
              f"the most any loop around this UNet can gain: "
              f"{reference['per_step'] / unet['seconds']:.2f}x.")  # fmt: skip

        if args.device.startswith("cuda"):
            print(f"\n### GPU scaling (bf16), {torch.cuda.get_device_name()}\n")
            print(
                "| batch | steps/s | images/s | UNet fwd+bwd s | step s | fraction of UNet rate | UNet TFLOP/s |"
            )
            print("|---:|---:|---:|---:|---:|---:|---:|")
            rows = _spawn(
                "gpu-scaling", model, args.device, args.steps, args.batch, args.gpu_batches
            )
            for row in rows:
                batch, unet = row["batch"], row["unet"]
                ours_row = _summary(row["ours"], args.warmup, batch)
                print(
                    f"| {batch} | {1 / ours_row['per_step']:.1f} | {ours_row['images_s']:.1f} | "
                    f"{unet['seconds']:.4f} | {ours_row['per_step']:.4f} | "
                    f"{unet['seconds'] / ours_row['per_step']:.2f} | "
                    f"{unet['flops'] / unet['seconds'] / 1e12:.2f} |"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
