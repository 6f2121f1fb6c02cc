"""The world's readers and fidelity measurement (oneword.world): oracle, zero-shot CLIP,
prompt fidelity, confusion counts."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import root_script

PRESETS = root_script("train_world").PRESETS


def test_oracle_loads_and_reads_every_attribute(tiny_world_dir):
    from oneword.datasets import world
    from oneword.world.oracle import Oracle

    oracle = Oracle.load(tiny_world_dir / "oracle")
    scenes = world.sample_scenes(3, torch.Generator().manual_seed(0))
    predicted = oracle.predict(world.render(scenes))
    assert set(predicted) == set(world.ATTRIBUTES)
    assert all(len(v) == 3 and all(x in world.VALUES[a] for x in v) for a, v in predicted.items())


@pytest.mark.slow
def test_fidelity_report_has_every_attribute(tiny_world_dir, tmp_path):
    from oneword.world.fidelity import measure_fidelity

    report = measure_fidelity(
        tiny_world_dir, captions=2, steps=2, device="cpu", grid=tmp_path / "g.png", ceiling=True
    )
    assert set(report["per_attribute"]) == {
        "shape",
        "colour",
        "pattern",
        "background",
        "size",
        "position",
    }
    assert 0.0 <= report["all"] <= min(report["per_attribute"].values())
    assert (tmp_path / "g.png").exists()
    for attribute, rows in report["confusion"].items():
        assert sum(sum(reads.values()) for reads in rows.values()) == report["n"]
        assert set(report["per_value"][attribute]) == set(rows)
    ceiling = report["vae_ceiling"]
    assert set(ceiling["per_attribute"]) == set(report["per_attribute"])
    assert 0.0 <= ceiling["all"] <= min(ceiling["per_attribute"].values())


def test_fresh_render_readers_match_what_the_training_stages_measured(tiny_world_dir, capsys):
    from types import SimpleNamespace

    from oneword.cli.world import run_fidelity
    from oneword.errors import OnewordError
    from oneword.world.fidelity import fresh_render_accuracy, zero_shot_accuracy

    stages = json.loads((tiny_world_dir / "world.json").read_text())["stages"]
    n = PRESETS["tiny"]["eval_renders"] // 4  # the clip stage's zero-shot: seed 0 + 99, n/4
    fresh = fresh_render_accuracy(tiny_world_dir, n=n, seed=99, device="cpu")
    assert fresh["n"] == n and set(fresh["oracle"]) == set(fresh["clip_zero_shot"])
    # The exported CLIP, read back through the evaluation's scorer, gives the stage's numbers.
    assert fresh["clip_zero_shot"] == pytest.approx(stages["clip"]["zero_shot_accuracy"])
    with pytest.raises(OnewordError, match="--renders must be >= 1"):
        fresh_render_accuracy(tiny_world_dir, n=0)
    # Features that point straight at the right prompts read every attribute right; the
    # same features against the prompts of the next value read none right.
    from oneword.datasets import world
    from oneword.world.fidelity import ZERO_SHOT_PROMPTS

    prompts = [t.format(v) for a, t in ZERO_SHOT_PROMPTS.items() for v in world.VALUES[a]]
    index = {p: i for i, p in enumerate(prompts)}
    assert len(index) == len(prompts)  # no prompt serves two attributes

    def one_hot(texts):
        return torch.nn.functional.one_hot(
            torch.tensor([index[t] for t in texts]), len(index)
        ).float()

    scenes = world.sample_scenes(12, torch.Generator().manual_seed(1))
    truth = [
        [ZERO_SHOT_PROMPTS[a].format(getattr(s, a)) for a in ZERO_SHOT_PROMPTS] for s in scenes
    ]
    image = torch.nn.functional.normalize(torch.stack([one_hot(t).sum(0) for t in truth]), dim=-1)
    assert set(zero_shot_accuracy(image, one_hot, scenes).values()) == {1.0}

    following = {  # each prompt -> the prompt of its attribute's next value
        t.format(v): t.format(values[(i + 1) % len(values)])
        for a, t in ZERO_SHOT_PROMPTS.items()
        for values in [world.VALUES[a]]
        for i, v in enumerate(values)
    }

    def shifted(texts):
        return one_hot([following[t] for t in texts])

    assert set(zero_shot_accuracy(image, shifted, scenes).values()) == {0.0}

    args = SimpleNamespace(model=str(tiny_world_dir), captions=1, samples=1, steps=1,
                           guidance=5.0, seed=0, grid=None, ceiling=False, renders=n, json=None)  # fmt: skip
    assert run_fidelity(args) == 0
    assert f"| {n} fresh renders |" in capsys.readouterr().out


def test_fidelity_confusion_counts_what_was_asked_against_what_was_read():
    import torch

    from oneword.datasets import world
    from oneword.world.fidelity import per_value, score

    scenes = world.sample_scenes(6, torch.Generator().manual_seed(0), named_only=True)
    truth = {a: [getattr(s, a) for s in scenes] for a in world.ATTRIBUTES}
    wrong = [v for v in world.VALUES["pattern"] if v != truth["pattern"][0]][0]

    class Oracle:  # reads everything right except the first sample's pattern
        def predict(self, images):
            read = {a: list(v) for a, v in truth.items()}
            read["pattern"][0] = wrong
            return read

    result = score(Oracle(), torch.zeros(6, 3, 8, 8), scenes, confusion=True)
    first = truth["pattern"][0]
    asked_first = truth["pattern"].count(first)
    assert result["confusion"]["pattern"][first][wrong] == 1
    assert result["pattern"] == pytest.approx(5 / 6) and result["all"] == pytest.approx(5 / 6)
    assert result["shape"] == 1.0
    assert per_value(result["confusion"]["pattern"])[first] == (asked_first - 1) / asked_first
