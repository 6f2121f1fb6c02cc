"""Fault injection for the target factory (docs/guarantees.md): make_targets.py killed
mid-run (SIGKILL) and resumed, a damaged target file, and a full disk part-way. Nothing
finished is lost, the restart names what it learns again, and the final table is the one an
uninterrupted run makes, bit for bit (one thread on both sides: a CPU matmul's reduction
order follows its threads)."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import error_lines, root_script

from oneword.encoder.targets import (
    FactoryConfig,
    factory_identities,
    load_targets,
    read_target,
    run_factory,
    target_specs,
)

ROOT = Path(__file__).resolve().parents[2]

# 3 identities x 2 image sets = 6 targets, one UNet batch each (so a target is learned in
# the same company however the run is cut), about 0.3 s each on one CPU thread.
SMALL = dict(steps=8, identities=3, image_sets=2, images=3, batch_concepts=1, quiet=True)
KEYS = [s.key for s in target_specs(factory_identities(3), 2)]


@contextlib.contextmanager
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _flags(model: Path, out: Path) -> list[str]:
    flags = ["--model", str(model), "--out", str(out), "--device", "cpu", "--threads", "1"]
    for name in ("steps", "identities", "image_sets", "images", "batch_concepts"):
        flags += [f"--{name.replace('_', '-')}", str(SMALL[name])]
    return [*flags, "--quiet"]


def _records(path: Path) -> list[dict]:
    """JSON lines, skipping a line torn by the kill."""
    records = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            records.append(json.loads(line))
    return records


def _finished(out: Path) -> dict[str, tuple[bytes, int]]:
    """Target key -> (bytes, mtime in ns) of every finished target file."""
    files = sorted((out / "targets").glob("*.safetensors")) if (out / "targets").is_dir() else []
    return {
        p.name.removesuffix(".safetensors"): (p.read_bytes(), p.stat().st_mtime_ns) for p in files
    }


def _main(argv: list[str]) -> int:
    with _one_thread():
        return root_script("make_targets").main(argv)


@pytest.fixture(scope="module")
def uninterrupted(tiny_world_dir, tmp_path_factory):
    """The table of one uninterrupted run (in-process, one thread)."""
    from oneword.models import load_model

    out = tmp_path_factory.mktemp("targets") / "whole"
    with _one_thread():
        run_factory(load_model(tiny_world_dir, device="cpu"), FactoryConfig(**SMALL), out)
    return load_targets(out)


def _assert_equal_tables(out: Path, reference) -> None:
    table = load_targets(out)
    assert table.names == reference.names and len(table) == len(KEYS)
    assert torch.equal(table.rows[0], reference.rows[0])
    assert torch.equal(table.final_loss, reference.final_loss)


@pytest.mark.slow
def test_a_killed_factory_keeps_its_finished_targets_and_names_what_it_learns_again(
    tiny_world_dir, uninterrupted, tmp_path, capsys
):
    out = tmp_path / "f"
    log = out / "log" / "rank-0.jsonl"
    env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with open(tmp_path / "stderr.txt", "w") as stderr:
        process = subprocess.Popen(
            [sys.executable, str(ROOT / "make_targets.py"), *_flags(tiny_world_dir, out)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    # 1. SIGKILL once a target is finished and the next one is being learned.
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, (
                "ended before the kill: " + (tmp_path / "stderr.txt").read_text()[-2000:]
            )
            assert time.monotonic() < deadline, "no target finished within 120 s"
            done = _finished(out)
            learning = [r for r in _records(log) if r.get("event") == "learning"] if done else []
            if learning and learning[-1]["targets"][0] not in done:
                break
            time.sleep(0.02)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    before = _finished(out)
    assert 1 <= len(before) < len(KEYS), sorted(before)  # killed mid-run
    assert list(before) == KEYS[: len(before)]  # one process learns them in order
    lost = KEYS[len(before)]  # the target its last UNet batch was learning
    settings = json.loads((out / "factory.json").read_text())
    for key in before:  # each finished file is whole (atomic writes)
        spec = next(s for s in target_specs(factory_identities(3), 2) if s.key == key)
        read_target(out / "targets" / f"{key}.safetensors", spec, settings, [32])
    # 2. A line torn by a kill in the middle of a write (here made by hand) costs nothing.
    with open(out / "manifest" / "rank-0.jsonl", "a") as manifest:
        manifest.write('{"target": "torn')
    # 3. Resume: the finished targets are kept as they are, the lost one is named.
    assert _main([*_flags(tiny_world_dir, out), "--resume"]) == 0
    captured = capsys.readouterr()
    assert f"{len(KEYS) - len(before)} learned, {len(before)} skipped, 0 redone" in captured.out
    notice = next(line for line in captured.err.splitlines() if line.startswith("resuming"))
    assert f"{len(before)} finished targets kept, {len(KEYS) - len(before)} to learn" in notice
    assert f"learned again: {lost}" in notice, notice
    after = _finished(out)
    assert {key: after[key] for key in before} == before  # same bytes, same mtime
    resumed = [r for r in _records(log) if r.get("event") == "resume"]
    assert resumed[-1]["interrupted"] == [lost] and resumed[-1]["kept"] == len(before)
    lines = (out / "manifest" / "rank-0.jsonl").read_text().splitlines()
    assert sorted(r["target"] for r in _records(out / "manifest" / "rank-0.jsonl")) == sorted(KEYS)
    assert sum(1 for line in lines if line.startswith('{"target": "torn')) == 1  # alone
    # 4. The table is the one an uninterrupted run makes.
    _assert_equal_tables(out, uninterrupted)


@pytest.mark.slow
def test_a_damaged_target_file_is_named_and_learned_again(
    tiny_world_dir, uninterrupted, tmp_path, capsys
):
    out = tmp_path / "f"
    assert _main(_flags(tiny_world_dir, out)) == 0
    capsys.readouterr()
    truncated = out / "targets" / f"{KEYS[1]}.safetensors"
    truncated.write_bytes(truncated.read_bytes()[:-40])  # a partial file
    # One bit of the rows flipped: still a readable safetensors file with finite values.
    garbled = out / "targets" / f"{KEYS[3]}.safetensors"
    data = bytearray(garbled.read_bytes())
    data[-3] ^= 0x01
    garbled.write_bytes(bytes(data))
    kept = {k: v for k, v in _finished(out).items() if k not in (KEYS[1], KEYS[3])}
    assert _main([*_flags(tiny_world_dir, out), "--resume"]) == 0
    captured = capsys.readouterr()
    assert "2 learned, 4 skipped, 2 redone" in captured.out
    named = [line for line in captured.err.splitlines() if line.startswith("target ")]
    assert len(named) == 2, captured.err
    assert KEYS[1] in named[0] and str(truncated) in named[0] and "unreadable" in named[0]
    assert KEYS[3] in named[1] and str(garbled) in named[1] and "checksum" in named[1]
    assert all(line.endswith("learning it again") for line in named)
    redo = [r for r in _records(out / "log" / "rank-0.jsonl") if r.get("event") == "redo"]
    assert [r["target"] for r in redo] == [KEYS[1], KEYS[3]]
    assert {k: v for k, v in _finished(out).items() if k in kept} == kept
    _assert_equal_tables(out, uninterrupted)


def test_a_full_disk_part_way_ends_in_one_line_and_a_resume_completes(
    tiny_world_dir, uninterrupted, tmp_path, capsys, monkeypatch
):
    import oneword.io

    out = tmp_path / "f"
    real_fsync = oneword.io.fsync_path
    written = []

    def fills_up(path):  # factory.json and two targets fit, then the disk is full
        if len(written) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(Path(path).name)
        real_fsync(path)

    monkeypatch.setattr("oneword.io.fsync_path", fills_up)
    assert _main(_flags(tiny_world_dir, out)) == 2
    (line,) = error_lines(capsys.readouterr().err)
    failed = out / "targets" / f"{KEYS[2]}.safetensors"
    assert line.startswith(f"make_targets.py: error: cannot write {failed}: No space left")
    assert "free some space and run again" in line
    before = _finished(out)
    assert list(before) == KEYS[:2]  # the targets finished before stay, whole
    settings = json.loads((out / "factory.json").read_text())
    for spec in target_specs(factory_identities(3), 2)[:2]:
        read_target(out / "targets" / f"{spec.key}.safetensors", spec, settings, [32])
    assert not list((out / "targets").glob(".*"))  # no temporary file left behind
    # The disk frees up: --resume keeps the two, learns the rest and names the lost one.
    monkeypatch.setattr("oneword.io.fsync_path", real_fsync)
    assert _main([*_flags(tiny_world_dir, out), "--resume"]) == 0
    captured = capsys.readouterr()
    assert "4 learned, 2 skipped, 0 redone" in captured.out
    assert f"learned again: {KEYS[2]}" in captured.err
    after = _finished(out)
    assert {key: after[key] for key in before} == before
    _assert_equal_tables(out, uninterrupted)
