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
