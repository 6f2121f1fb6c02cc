"""`oneword world ...`: train's flags (from train_world.py), suite and shards."""

from __future__ import annotations

import pytest
from conftest import root_script

root_script("train_world")  # the root script, importable by name from here on

from train_world import PRESETS, config_from_args  # noqa: E402


def test_world_suite_and_shards_commands(tmp_path):
    from oneword.cli import main
    from oneword.datasets.suite import read_suite

    assert main(["world", "suite", "--out", str(tmp_path / "suite"), "--images", "3"]) == 0
    concepts = read_suite(tmp_path / "suite")
    assert len(concepts) >= 20 and all(len(c.images) == 3 for c in concepts)
    assert (
        main(
            [
                "world",
                "shards",
                "--out",
                str(tmp_path / "shards"),
                "--count",
                "12",
                "--per-shard",
                "5",
            ]
        )
        == 0
    )
    assert len(list((tmp_path / "shards").glob("*.tar"))) == 3


def test_cli_flags_override_the_preset():
    import argparse

    from oneword.cli.world import add_world_parser
    from oneword.errors import OnewordError

    parser = argparse.ArgumentParser()
    add_world_parser(parser.add_subparsers())
    args = parser.parse_args(
        [
            "world",
            "train",
            "--preset",
            "tiny",
            "--unet-steps",
            "7",
            "--unet-channels",
            "8",
            "16",
            "--stage-seconds",
            "unet=30",
            "--unet-pattern-weight",
            "checkered=2",
            "dotted=1.5",
        ]
    )
    cfg = config_from_args(args)
    assert (
        cfg.unet_steps == 7 and cfg.unet_channels == (8, 16) and cfg.stage_seconds == {"unet": 30.0}
    )
    assert cfg.unet_pattern_weight == {"checkered": 2.0, "dotted": 1.5}
    assert cfg.clip_steps == PRESETS["tiny"]["clip_steps"]
    for bad in ("checkered", "checkered=two", "=2"):
        args = parser.parse_args(["world", "train", "--unet-pattern-weight", bad])
        with pytest.raises(OnewordError, match=f"--unet-pattern-weight {bad}: expected NAME="):
            config_from_args(args)


def test_every_config_flag_has_help_with_the_cpu_presets_value(capsys):
    import argparse
    from dataclasses import fields

    from oneword.cli.world import add_world_parser
    from train_world import FLAG_HELP, WorldTrainConfig

    flagged = {f.name for f in fields(WorldTrainConfig)} - {"extra", "stages", "stage_seconds"}
    assert set(FLAG_HELP) == flagged  # a new field needs a line; a removed one loses it
    parser = argparse.ArgumentParser()
    add_world_parser(parser.add_subparsers())
    with pytest.raises(SystemExit):
        parser.parse_args(["world", "train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert (
        "square crops of this side around the object (0: whole images) (the cpu preset: 0)" in text
    )
    assert f"(the cpu preset: {PRESETS['cpu']['unet_steps']})" in text
    assert "--unet-channels UNET_CHANNELS [UNET_CHANNELS ...] UNet channels per level" in text
