"""Shared fixtures: tiny random SD 1.x / 2.x / XL pipelines, built once per test session."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

from oneword.tiny import build_tiny_pipeline

ROOT = Path(__file__).resolve().parents[1]


def root_script(name: str):
    """A root script (train_world, train_encoder) imported as a module by its name, with the
    repository root on sys.path (spawned worker processes import it the same way)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    return importlib.import_module(name)


def error_lines(text: str) -> list[str]:
    """A command's stderr as its non-blank lines, progress bars left out."""
    text = text.replace("\r", "\n")
    return [line for line in text.splitlines() if line.strip() and "%|" not in line]


def error_line(capsys) -> str:
    """The command's stderr, which must be exactly one line (progress bars aside)."""
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1, lines
    return lines[0]


def read_safetensors(path) -> tuple[dict, dict]:
    """A safetensors file's tensors and metadata (to rewrite it with a change)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys()}, handle.metadata()


def noise_images(n: int = 3, seed: int = 0, size: int = 32):
    """`n` random RGB PIL images (size x size): concept images for the tiny models."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray((rng.random((size, size, 3)) * 255).astype("uint8")) for _ in range(n)]


def quick_inversion_config(**overrides):
    """A tiny InversionConfig: a few steps, no sample grid, no progress bar."""
    from oneword.inversion import InversionConfig

    values = {"steps": 4, "batch": 2, "lr": 0.05, "quiet": True, "samples": False}
    return InversionConfig(**(values | overrides))


@pytest.fixture(scope="session")
def tiny_sd1_dir(tmp_path_factory):
    """A tiny SD 1.x diffusers folder (one text encoder, width 32)."""
    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "sd1", "sd1")


@pytest.fixture(scope="session")
def tiny_sd2_dir(tmp_path_factory):
    """A tiny SD 2.x diffusers folder (one text encoder, width 40, v-prediction)."""
    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "sd2", "sd2")


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory):
    """A tiny SDXL diffusers folder (two text encoders, widths 32 and 48)."""
    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "sdxl", "sdxl")


@pytest.fixture(scope="session")
def tiny_world_dir(tmp_path_factory):
    """A miniature world trained for a few steps with the `tiny` preset (quality: none).

    Same folder layout as checkpoints/world: a StableDiffusionPipeline with image_encoder/
    and oracle/. For code paths that need the world's parts, not its quality."""
    from dataclasses import replace

    train = root_script("train_world")
    PRESETS, WorldTrainConfig, train_world = (
        train.PRESETS,
        train.WorldTrainConfig,
        train.train_world,
    )

    root = tmp_path_factory.mktemp("world")
    cfg = replace(
        WorldTrainConfig(out=str(root / "world"), work=str(root / "work")), **PRESETS["tiny"]
    )
    train_world(cfg)
    return root / "world"


@pytest.fixture(scope="session")
def tiny_sd3_dir(tmp_path_factory):
    """A tiny SD3 diffusers folder (CLIP-L 32, CLIP-G 48, T5 96; MMDiT; flow matching)."""
    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "sd3", "sd3")


@pytest.fixture(scope="session")
def tiny_flux_dir(tmp_path_factory):
    """A tiny FLUX.1 diffusers folder (CLIP-L 32 pooled, T5 64; guidance embedding)."""
    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "flux", "flux")


@pytest.fixture(scope="session")
def tiny_clip_vision_dir(tmp_path_factory) -> Path:
    """A tiny random transformers CLIP vision tower folder (width 32, 2 layers, 32 px,
    8-px patches: 17 tokens, projection 24), as `transformers:FOLDER` towers load."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    folder = tmp_path_factory.mktemp("clip") / "tower"
    with torch.random.fork_rng():
        torch.manual_seed(0)
        config = CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
            projection_dim=24,
        )
        CLIPVisionModelWithProjection(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def world_tower(tiny_world_dir):
    """The tiny world's own CLIP image tower (the encoder's "world" tower), frozen."""
    from oneword.clip import load_tower

    return load_tower("world", model_folder=tiny_world_dir)


@pytest.fixture(scope="session")
def tiny_encoder(tiny_world_dir, tmp_path_factory) -> Path:
    """An encoder for the tiny world, trained for 2 steps (the tiny preset, no validation)."""
    out = tmp_path_factory.mktemp("encoder") / "run"
    args = ["--preset", "tiny", "--model", str(tiny_world_dir), "--out", str(out), "--quiet"]
    main = root_script("train_encoder").main
    assert main([*args, "--steps", "2", "--val-suite", "none"]) == 0
    return out / "encoder.safetensors"


def small_encoder_config(tower, model, **overrides):
    """A small `EncoderConfig` (width 32, 2 queries, 2 heads) for `tower` and `model`."""
    from oneword.encoder.model import EncoderConfig

    settings = dict(
        tower=tower.spec,
        pooled_dim=tower.pooled_dim,
        token_dim=tower.token_dim,
        family=model.family,
        widths=tuple(model.widths),
        dim=32,
        queries=2,
        heads=2,
    )
    return EncoderConfig(**(settings | overrides))
