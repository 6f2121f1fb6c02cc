"""The target factory on the tiny world: the table's round trip, resume, damaged files, and
two processes (gloo) giving the same targets as one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import root_script

from oneword.datasets.world import HELD_OUT, VALIDATION
from oneword.encoder.targets import (
    PLATEAU_STEPS,
    FactoryConfig,
    TargetSpec,
    factory_identities,
    load_targets,
    read_target,
    run_factory,
    target_specs,
)
from oneword.errors import OnewordError

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def world_model(tiny_world_dir):
    from oneword.models import load_model

    return load_model(tiny_world_dir, device="cpu")


# 3 identities x 2 image sets = 6 targets in 2 UNet batches of 4 and 2.
SMALL = dict(steps=3, identities=3, image_sets=2, images=3, batch_concepts=4, quiet=True)


def _rows(table) -> torch.Tensor:
    return table.rows[0]


def test_specs_cover_only_the_training_split_in_a_mixed_order():
    identities = factory_identities()
    assert len(identities) == 672 and len(set(identities)) == 672
    assert not set(identities) & set(HELD_OUT + VALIDATION)
    first = factory_identities(24)
    assert first == identities[:24] and len({i.shape for i in first}) >= 8  # not all circles
    specs = target_specs(first[:2], 2)
    assert [s.key for s in specs] == [
        f"{first[0].name}@0",
        f"{first[0].name}@1",
        f"{first[1].name}@0",
        f"{first[1].name}@1",
    ]
    with pytest.raises(OnewordError, match="validation or test"):
        target_specs([VALIDATION[0]], 2)


def test_factory_table_round_trips_through_train_encoders_reader(world_model, tmp_path):
    out = tmp_path / "f"
    summary = run_factory(world_model, FactoryConfig(**SMALL), out)
    assert len(summary["learned"]) == 6 and summary["table"] == str(out / "targets.safetensors")
    table = load_targets(out)  # a folder or the file itself
    specs = target_specs(factory_identities(3), 2)
    assert table.names == [s.identity.name for s in specs] and len(table) == 6
    assert table.image_sets.tolist() == [0, 1] * 3 and table.steps.tolist() == [3] * 6
    assert _rows(table).shape == (6, 1, 32) and bool(torch.isfinite(table.final_loss).all())
    assert bool((table.seconds > 0).all()) and table.settings["steps"] == 3
    # The table holds exactly the rows of the target files, which moved from the class word.
    for index, spec in enumerate(specs):
        single = read_target(
            out / "targets" / f"{spec.key}.safetensors", spec, table.settings, [32]
        )
        assert torch.equal(single["vectors"][0], _rows(table)[index])
    from oneword.encoder.model import class_word_rows

    start = class_word_rows(world_model, specs[0].identity.class_word(), 1)[0]
    assert not torch.allclose(_rows(table)[0], start)
    # The two image sets of an identity are different images, so different targets.
    assert not torch.equal(_rows(table)[0], _rows(table)[1])
    # train_encoder.py reads the same values.
    train_encoder = root_script("train_encoder")
    again = train_encoder.load_targets(out / "targets.safetensors")
    assert torch.equal(again.rows[0], _rows(table)) and again.names == table.names
    # Manifest: one line per target.
    lines = (out / "manifest" / "rank-0.jsonl").read_text().splitlines()
    assert sorted(json.loads(x)["target"] for x in lines) == sorted(s.key for s in specs)


def test_resume_skips_finished_targets_and_equals_an_uninterrupted_run(world_model, tmp_path):
    whole = run_factory(world_model, FactoryConfig(**SMALL), tmp_path / "whole")
    out = tmp_path / "stopped"
    first = run_factory(world_model, FactoryConfig(**SMALL), out, max_chunks=1)
    assert len(first["learned"]) == 4 and first["table"] is None
    assert not (out / "targets.safetensors").exists()
    with pytest.raises(OnewordError, match="--resume"):
        run_factory(world_model, FactoryConfig(**SMALL), out)
    second = run_factory(world_model, FactoryConfig(**SMALL), out, resume=True)
    assert sorted(second["skipped"]) == sorted(first["learned"])
    assert sorted(second["learned"]) == sorted(set(whole["learned"]) - set(first["learned"]))
    a, b = load_targets(tmp_path / "whole"), load_targets(out)
    assert a.names == b.names and torch.equal(_rows(a), _rows(b))
    assert torch.equal(a.final_loss, b.final_loss)
    # Nothing left: a third run learns nothing and rewrites the same table.
    third = run_factory(world_model, FactoryConfig(**SMALL), out, resume=True)
    assert third["learned"] == [] and len(third["skipped"]) == 6 and third["table"]


def test_damaged_target_files_are_named_and_learned_again(world_model, tmp_path):
    out = tmp_path / "f"
    run_factory(world_model, FactoryConfig(**SMALL), out)
    reference = load_targets(out)
    specs = target_specs(factory_identities(3), 2)
    truncated = out / "targets" / f"{specs[1].key}.safetensors"
    truncated.write_bytes(truncated.read_bytes()[:100])  # a partial write
    foreign = out / "targets" / f"{specs[4].key}.safetensors"
    foreign.write_bytes((out / "targets" / f"{specs[0].key}.safetensors").read_bytes())
    notices = []
    summary = run_factory(world_model, FactoryConfig(**SMALL), out, resume=True, say=notices.append)
    assert sorted(summary["redone"]) == sorted([specs[1].key, specs[4].key])
    assert sorted(summary["learned"]) == sorted([specs[1].key, specs[4].key])
    assert any(specs[1].key in n and "unreadable" in n for n in notices)
    assert any(specs[4].key in n and "not the target" in n for n in notices)
    log = [json.loads(x) for x in (out / "log" / "rank-0.jsonl").read_text().splitlines()]
    assert {r["target"] for r in log if r["event"] == "redo"} == {specs[1].key, specs[4].key}
    again = load_targets(out)
    # Learned again in smaller UNet batches: equal up to the batch's float rounding.
    torch.testing.assert_close(_rows(again), _rows(reference), atol=1e-5, rtol=1e-5)


def test_resume_refuses_other_settings_and_missing_tables(world_model, tmp_path):
    out = tmp_path / "f"
    run_factory(world_model, FactoryConfig(**SMALL), out, max_chunks=1)
    with pytest.raises(OnewordError, match="steps: 3 -> 4"):
        run_factory(world_model, FactoryConfig(**(SMALL | {"steps": 4})), out, resume=True)
    with pytest.raises(OnewordError, match="no such file"):
        load_targets(out)
    # More identities later extends the same factory (the first targets are kept).
    bigger = run_factory(
        world_model, FactoryConfig(**(SMALL | {"identities": 4})), out, resume=True
    )
    assert len(bigger["skipped"]) == 4 and len(bigger["learned"]) == 4
    assert len(load_targets(out)) == 8


def test_make_targets_script(tiny_world_dir, tmp_path, capsys):
    make_targets = root_script("make_targets")
    args = ["--model", str(tiny_world_dir), "--out", str(tmp_path / "f"), "--identities", "1"]
    args += ["--steps", "2", "--images", "2", "--quiet", "--device", "cpu"]
    assert make_targets.main(args) == 0
    assert "2 learned" in capsys.readouterr().out
    assert len(load_targets(tmp_path / "f")) == 2
    start = json.loads((tmp_path / "f" / "log" / "rank-0.jsonl").read_text().splitlines()[0])
    assert len(start["model_sha256"]) == 64 and start["commit"]  # what it ran on
    assert make_targets.main(args) == 2  # exists: needs --resume
    assert "--resume" in capsys.readouterr().err
    assert make_targets.main(args + ["--resume"]) == 0
    assert "0 learned, 2 skipped" in capsys.readouterr().out


def test_make_targets_flags_come_from_the_factory_config():
    from oneword.cli.config import config_from_flags

    make_targets = root_script("make_targets")
    parser = make_targets.build_parser()
    args = parser.parse_args(["--out", "x", "--identities", "3", "--lr", "0.01", "--quiet"])
    config = config_from_flags(args, FactoryConfig)
    assert (config.identities, config.lr, config.quiet) == (3, 0.01, True)
    assert config.steps == PLATEAU_STEPS and config.image_sets == FactoryConfig().image_sets
    assert "independent image sets" in parser.format_help()  # help from the field comment


@pytest.mark.slow
def test_two_processes_share_the_targets_and_match_one_process(
    world_model, tiny_world_dir, tmp_path
):
    # Bitwise equality needs the same thread count on both sides (a CPU matmul's reduction
    # order follows its threads): one, as the two torchrun workers below.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_factory(world_model, FactoryConfig(**(SMALL | {"batch_concepts": 2})), tmp_path / "one")
    finally:
        torch.set_num_threads(threads)
    torchrun = Path(sys.executable).with_name("torchrun")
    command = [str(torchrun), "--nproc_per_node", "2", str(ROOT / "make_targets.py")]
    command += ["--model", str(tiny_world_dir), "--out", str(tmp_path / "two"), "--quiet"]
    command += ["--steps", "3", "--identities", "3", "--images", "3", "--batch-concepts", "2"]
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    shares = []
    for rank in range(2):
        lines = (tmp_path / "two" / "manifest" / f"rank-{rank}.jsonl").read_text().splitlines()
        shares.append({json.loads(x)["target"] for x in lines})
    specs = target_specs(factory_identities(3), 2)
    # Chunks of 2: rank 0 takes chunks 0 and 2, rank 1 chunk 1.
    assert shares[0] == {s.key for s in specs[:2] + specs[4:]}
    assert shares[1] == {s.key for s in specs[2:4]}
    one, two = load_targets(tmp_path / "one"), load_targets(tmp_path / "two")
    assert one.names == two.names and torch.equal(_rows(one), _rows(two))
    assert torch.equal(one.final_loss, two.final_loss)


def test_image_set_spread_compares_within_and_between_identities():
    from oneword.encoder.targets import TargetTable, image_set_spread

    rows = torch.tensor([[[0.0, 0.0]], [[0.0, 1.0]], [[10.0, 0.0]], [[10.0, 1.0]]])  # (4, 1, 2)
    table = TargetTable(
        rows=[rows],
        names=["a", "a", "b", "b"],
        class_words=["x"] * 4,
        image_sets=torch.tensor([0, 1, 0, 1]),
        steps=torch.full((4,), 3),
        final_loss=torch.zeros(4),
        seconds=torch.ones(4),
        settings={},
    )
    spread = image_set_spread(table)
    assert spread["within_identity"] == pytest.approx(1.0)
    between = (10.0 + 10.0 + 2 * 101**0.5) / 4  # pairs (a0,b0), (a1,b1), (a0,b1), (a1,b0)
    assert spread["between_identities"] == pytest.approx(between)
    assert spread["ratio"] == pytest.approx(1.0 / between)
    assert image_set_spread(table.select([0, 2])) is None  # no identity with two targets


def test_load_targets_refuses_other_files(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(OnewordError, match="format None"):
        load_targets(tmp_path / "other.safetensors")
    save_file({"rows.0": torch.zeros(2, 1, 4)}, str(tmp_path / "t.safetensors"),
              metadata={"format": "oneword-targets/1"})  # fmt: skip
    with pytest.raises(OnewordError, match="incomplete target table"):
        load_targets(tmp_path / "t.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"not a table")
    with pytest.raises(OnewordError, match="unreadable"):
        load_targets(tmp_path / "bad.safetensors")


def test_target_spec_key():
    assert TargetSpec(HELD_OUT[0], 3).key == f"{HELD_OUT[0].name}@3"


def test_make_targets_refuses_an_out_that_cannot_be_a_folder_before_loading(tmp_path, capsys):
    make_targets = root_script("make_targets")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    # The model path does not exist: the folder check must come first, or this names the model.
    args = ["--model", str(tmp_path / "no-model"), "--out", str(blocker / "f"), "--device", "cpu"]
    assert make_targets.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(blocker) in err and "file" in err, err
