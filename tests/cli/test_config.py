"""cli/config.py: flags from a config dataclass (help from its comments), and back."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

import pytest


@dataclass
class _Config:
    # Steps of the run; a comment above the field is its help.
    steps: int = 10
    lr: float = 1e-3  # a comment after the field works too
    name: str = "x"
    widths: tuple[int, ...] = (1, 2)
    fallback: bool = True
    quiet: bool = False
    path: str | None = field(default=None, metadata={"help": "metadata wins over comments"})


def _parser(**kwargs) -> argparse.ArgumentParser:
    from oneword.cli.config import add_config_flags

    parser = argparse.ArgumentParser()
    add_config_flags(parser, _Config, **kwargs)
    return parser


def test_help_comes_from_comments_and_metadata():
    from oneword.cli.config import field_help

    helps = field_help(_Config)
    assert helps["steps"] == "Steps of the run; a comment above the field is its help."
    assert helps["lr"] == "a comment after the field works too"
    assert helps["path"] == "metadata wins over comments" and helps["name"] == ""


def test_flags_are_typed_and_layer_over_a_base_config():
    from oneword.cli.config import config_from_flags

    parser = _parser()
    args = parser.parse_args(["--steps", "3", "--widths", "4", "5", "--no-fallback", "--quiet"])
    config = config_from_flags(args, _Config, _Config(lr=0.5, name="base"))
    assert config == _Config(
        steps=3, lr=0.5, name="base", widths=(4, 5), fallback=False, quiet=True
    )
    assert config_from_flags(parser.parse_args([]), _Config) == _Config()  # nothing given
    with pytest.raises(SystemExit):
        parser.parse_args(["--steps", "three"])


def test_overrides_and_a_help_suffix(capsys):
    parser = _parser(
        names=["steps", "name"],
        overrides={"name": {"choices": ["x", "y"], "help": "which one"}},
        help_suffix=lambda f: f" (default: {f.default})",
    )
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--name {x,y} which one (default: x)" in text
    assert "--lr" not in text  # only the named fields


def test_world_train_without_the_root_script_is_one_clear_line(tmp_path, monkeypatch, capsys):
    import oneword.cli.world
    from oneword.cli import main

    monkeypatch.setattr(oneword.cli.world, "TRAIN_SCRIPT", tmp_path / "train_world.py")
    assert main(["world", "train", "--preset", "tiny", "--out", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train_world.py" in err[0] and "source checkout" in err[0]
