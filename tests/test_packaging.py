"""We install exactly one top-level import name, and it collides with nobody's."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pytest
from setuptools import find_namespace_packages

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parents[1]


def _our_top_level_names() -> set[str]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    include = config["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = find_namespace_packages(where=str(ROOT), include=include)
    return {name.split(".")[0] for name in packages}


def test_only_oneword_is_installed_at_top_level():
    assert _our_top_level_names() == {"oneword"}


def test_no_top_level_name_collides_with_an_installed_distribution():
    owners = importlib.metadata.packages_distributions()
    for name in _our_top_level_names():
        others = {dist for dist in owners.get(name, []) if dist.lower() != "oneword"}
        assert not others, f"top-level import {name!r} is also provided by {sorted(others)}"


def test_no_shadowing_packages_at_the_repository_root():
    # A top-level datasets/ would shadow Hugging Face datasets inside transformers/accelerate.
    for name in ("datasets", "encoder", "inversion", "clip", "webdataset"):
        assert not (ROOT / name / "__init__.py").exists(), name
        assert not (ROOT / f"{name}.py").exists(), name


def test_huggingface_datasets_probe_is_not_fooled():
    # transformers asks importlib for "datasets"; our sub-package must not answer.
    import importlib.util

    spec = importlib.util.find_spec("datasets")
    assert spec is None or "oneword" not in str(spec.origin)
