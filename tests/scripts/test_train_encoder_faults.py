"""Fault injection for encoder training (docs/guarantees.md): SIGKILL mid-run and resume
(nothing finished is lost, the restart names what it redoes), a corrupt checkpoint (named),
and a full disk while writing a checkpoint (one line, nothing already written lost)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import error_line, root_script
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[2]


# --- fault injection: encoder training -------------------------------------------------------


@pytest.mark.slow
def test_train_encoder_survives_sigkill_a_corrupt_checkpoint_and_a_full_disk(
    tiny_world_dir, tmp_path, capsys, monkeypatch
):
    from oneword.inversion import checkpoint as ckpt

    train_encoder = root_script("train_encoder")
    out = tmp_path / "enc"
    common = ["--preset", "tiny", "--model", str(tiny_world_dir), "--out", str(out), "--quiet"]
    common += ["--checkpoint-every", "2", "--val-every", "1000"]
    # 1. SIGKILL a worker mid-run (a long run, killed once two checkpoints exist).
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "train_encoder.py"), *common, "--steps", "100000"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 240
        while len(ckpt.list_checkpoints(out / "checkpoints")) < 2:
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(0.3)  # a few steps past the checkpoint
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    kept = ckpt.list_checkpoints(out / "checkpoints")
    # The kill may land mid-write; make sure one half-written folder is there either way.
    (out / "checkpoints" / ".step-999999.killed.tmp").mkdir(exist_ok=True)
    last = kept[-1]
    _, state = ckpt.load_checkpoint(last)  # the last complete checkpoint loads
    done = state["step"]
    lines = (out / "log.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines if line.endswith("}")]  # a torn last line
    reached = max(r["step"] for r in records if r.get("event") == "train")
    assert reached >= done
    # 2. Resume: nothing finished is lost, and the restart names what it redoes.
    assert train_encoder.main([*common, "--steps", str(done + 2), "--resume"]) == 0
    err = capsys.readouterr().err
    assert f"resuming from {last.name} (step {done})" in err
    if reached > done:
        assert f"steps {done + 1}-{reached}" in err and "redone" in err
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert any(r.get("resumed_from") == done for r in records)
    assert (out / "encoder.safetensors").is_file()
    # 3. A corrupt checkpoint is named.
    latest = ckpt.list_checkpoints(out / "checkpoints")[-1]
    tensors = load_file(str(latest / "state.safetensors"))
    name = next(
        k for k in sorted(tensors) if k.startswith("head.") and tensors[k].is_floating_point()
    )
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    save_file(tensors, str(latest / "state.safetensors"))
    assert train_encoder.main([*common, "--steps", str(done + 4), "--resume"]) == 2
    line = error_line(capsys)
    assert latest.name in line and name in line and "NaN" in line
    # 4. The disk fills up while the next checkpoint is written: one line, nothing lost.
    shutil.rmtree(latest)
    survivors = {
        p.name: (p / "state.json").read_text() for p in ckpt.list_checkpoints(out / "checkpoints")
    }
    encoder_bytes = (out / "encoder.safetensors").read_bytes()

    def full(path):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("oneword.io.fsync_path", full)
    assert train_encoder.main([*common, "--steps", str(done + 6), "--resume"]) == 2
    text = capsys.readouterr().err.replace("\r", "\n")
    errors = [line for line in text.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith("train_encoder.py: error: cannot write")
    assert "No space left on device" in errors[0] and "earlier checkpoints are kept" in errors[0]
    after = {
        p.name: (p / "state.json").read_text() for p in ckpt.list_checkpoints(out / "checkpoints")
    }
    assert after == survivors
    assert (out / "encoder.safetensors").read_bytes() == encoder_bytes
    assert not list((out / "checkpoints").glob(".*"))  # no half-written folder left behind
