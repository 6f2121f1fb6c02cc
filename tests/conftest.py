"""Shared fixtures: tiny random SD 1.x / 2.x / XL pipelines, built once per test session."""

from __future__ import annotations

import pytest

from oneword.tiny import build_tiny_pipeline


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

    from oneword.world.train import PRESETS, WorldTrainConfig, train_world

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
