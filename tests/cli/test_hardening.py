"""Hostile and unlucky input: every case ends in one clear line, before work is lost.

One test per numbered item of the hardening list (docs/guarantees.md), at the command line
where possible, on the tiny random models (CPU, seconds each). Item 8 (shards) is in
tests/datasets/test_shard_faults.py; fault injection for encoder training (SIGKILL and
resume, a corrupt checkpoint, a full disk) in tests/scripts/test_train_encoder_faults.py.
New library names are imported inside the tests, so each test fails on its own on a tree
without them.
"""

from __future__ import annotations

import errno
import importlib
import json
import logging
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import error_line, read_safetensors, root_script
from PIL import Image
from safetensors.torch import load_file, save_file

from oneword.cli import main

ROOT = Path(__file__).resolve().parents[2]
MISSING_MODEL = "/nonexistent/model"  # a command that reaches the model load fails on this


def _images(folder: Path, n: int = 3, size: int = 32, seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for index in range(n):
        pixels = (rng.random((size, size, 3)) * 255).astype("uint8")
        Image.fromarray(pixels).save(folder / f"{index}.png")
    return folder


def _invert_args(model, images, out, *extra) -> list[str]:
    return [
        "invert", "--model", str(model), "--images", str(images), "--token", "<t>",
        "--init", "dog", "--out", str(out), "--device", "cpu", "--quiet", "--no-samples",
        "--steps", "1", "--batch", "1", *extra,
    ]  # fmt: skip


def _encoder_file(path: Path, **overrides) -> Path:
    from oneword.encoder.model import ConceptEncoder, EncoderConfig, save_encoder

    settings = dict(pooled_dim=8, token_dim=8, widths=(32,), dim=8, queries=2, heads=2)
    return save_encoder(path, ConceptEncoder(EncoderConfig(**(settings | overrides))))


# --- 1. an --out that cannot be a folder ----------------------------------------------------


def test_1_out_that_cannot_be_a_folder_fails_before_the_model_loads(tmp_path, capsys):
    images = _images(tmp_path / "images")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    encoder = _encoder_file(tmp_path / "enc.safetensors")
    commands = {
        "invert FILE": _invert_args(MISSING_MODEL, images, blocker),
        "invert FILE/sub": _invert_args(MISSING_MODEL, images, blocker / "sub"),
        "invert --concepts": [
            "invert", "--model", MISSING_MODEL, "--concepts", str(tmp_path), "--init", "dog",
            "--out", str(blocker),
        ],
        "encode": [
            "encode", "--model", MISSING_MODEL, "--encoder", str(encoder), "--images",
            str(images), "--token", "<t>", "--out", str(blocker),
        ],
        "eval": ["eval", "--model", MISSING_MODEL, "--suite", str(tmp_path), "--out", str(blocker)],
        "demo": ["demo", "--model", MISSING_MODEL, "--out", str(blocker / "demo")],
        "generate": [
            "generate", "--model", MISSING_MODEL, "--embedding", str(encoder), "--prompt", "a <t>",
            "--out", str(blocker / "grid.png"),
        ],
        "world shards": ["world", "shards", "--out", str(blocker / "s"), "--count", "1"],
        "world suite": ["world", "suite", "--out", str(blocker / "s")],
    }  # fmt: skip
    for name, argv in commands.items():
        started = time.perf_counter()
        assert main(argv) == 2, name
        line = error_line(capsys)
        assert str(blocker) in line and "file" in line, (name, line)
        assert time.perf_counter() - started < 10, name
    train_encoder = root_script("train_encoder")
    argv = ["--preset", "tiny", "--model", MISSING_MODEL, "--out", str(blocker / "enc")]
    assert train_encoder.main(argv) == 2
    assert str(blocker) in error_line(capsys)


# --- 2. two runs on one --out ---------------------------------------------------------------


@pytest.mark.slow  # a second process and its model load: ~6 s
def test_2_a_second_run_on_the_same_out_is_refused(tiny_sd1_dir, tmp_path, capsys):
    images = _images(tmp_path / "images")
    out = tmp_path / "run"
    argv = _invert_args(tiny_sd1_dir, images, out, "--steps", "100000")
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    first = subprocess.Popen(
        [sys.executable, "-m", "oneword.cli", *argv], env=env, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 120
        lock = tmp_path / ".run.oneword.lock"
        # Started: it holds the lock (or, without one, has written a checkpoint).
        while (
            not (lock.is_file() and lock.read_text().strip()) and not (out / "checkpoints").exists()
        ):
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        argv2 = _invert_args(tiny_sd1_dir, images, out).copy()
        argv2[argv2.index("<t>")] = "<u>"
        assert main(argv2) == 2
        line = error_line(capsys)
        assert str(out) in line and f"pid {first.pid}" in line
        assert not (out / "learned_embeds.safetensors").exists()
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # The owner is gone: its lock went with it, and a run (resuming or not) may start.
    assert main(_invert_args(tiny_sd1_dir, images, tmp_path / "other")) == 0


# --- 3. more vectors than the prompt can hold -----------------------------------------------


def test_3_more_vectors_than_the_prompt_holds_are_refused(tiny_sd1_dir, tmp_path, capsys):
    from oneword.embeddings import TokenEmbedding, save_embedding

    images = _images(tmp_path / "images")
    for vectors in ("1000", "70"):
        assert (
            main(_invert_args(tiny_sd1_dir, images, tmp_path / vectors, "--vectors", vectors)) == 2
        )
        line = error_line(capsys)
        fit = int(line.split("at most ")[1].split()[0])
        assert 60 <= fit < 70 and f"--vectors {fit} or fewer" in line, line
    assert not (tmp_path / "70" / "learned_embeds.safetensors").exists()
    # A file with 100 vectors: generate refuses a prompt it would cut; a warm start says how
    # many fit instead of suggesting --vectors 100.
    wide = save_embedding(
        tmp_path / "wide.safetensors", TokenEmbedding("<w>", [torch.randn(100, 32) * 0.3])
    )
    argv = [
        "generate", "--model", str(tiny_sd1_dir), "--embedding", str(wide), "--prompt",
        "a photo of <w> on a red background", "--num", "1", "--steps", "1", "--device", "cpu",
        "--out", str(tmp_path / "grid.png"),
    ]  # fmt: skip
    assert main(argv) == 2
    assert "cut off" in error_line(capsys) and not (tmp_path / "grid.png").exists()
    argv = _invert_args(tiny_sd1_dir, images, tmp_path / "warm", "--warm-start", str(wide))
    assert main(argv) == 2
    line = error_line(capsys)
    assert "fit" in line and "--vectors 100" not in line


# --- 4. an encoder file whose tensors do not match its own config ---------------------------


def _encode_error_after_editing(path: Path, edit, tmp_path: Path, capsys) -> str:
    """Rewrite the encoder file at `path` with `edit(tensors)` applied (metadata kept), run
    `oneword encode` on it and return its one error line."""
    tensors, metadata = read_safetensors(path)
    edit(tensors)
    save_file(tensors, str(path), metadata=metadata)
    argv = [
        "encode", "--model", MISSING_MODEL, "--encoder", str(path), "--images", str(tmp_path),
        "--token", "<t>", "--out", str(tmp_path / "out"),
    ]  # fmt: skip
    assert main(argv) == 2
    return error_line(capsys)


def test_4_encoder_tensors_that_do_not_match_its_config(tmp_path, capsys):
    path = _encoder_file(tmp_path / "enc.safetensors")
    name = next(k for k, v in load_file(str(path)).items() if v.ndim == 2)

    def grow(tensors):
        tensors[name] = torch.zeros(tensors[name].shape[0] + 3, tensors[name].shape[1])

    line = _encode_error_after_editing(path, grow, tmp_path, capsys)
    assert str(path) in line and name in line and "config" in line


# --- 5. resuming another run; --out inside the images ---------------------------------------


def test_5_resume_refuses_other_images_templates_and_out_in_the_images(
    tiny_sd1_dir, tmp_path, capsys
):
    images = _images(tmp_path / "images")
    out = tmp_path / "run"
    assert main(_invert_args(tiny_sd1_dir, images, out)) == 0
    capsys.readouterr()
    other = _images(tmp_path / "other", seed=1)
    assert main(_invert_args(tiny_sd1_dir, other, out, "--steps", "2", "--resume")) == 2
    line = error_line(capsys)
    assert "images: 3 of 3 differ" in line
    templates = tmp_path / "templates.txt"
    templates.write_text("a drawing of {}\n")
    argv = _invert_args(tiny_sd1_dir, images, out, "--steps", "2", "--resume")
    assert main([*argv, "--templates", str(templates)]) == 2
    assert "templates" in error_line(capsys)
    log_before = (out / "log.json").read_text()
    assert main(argv) == 0  # the same run resumes
    assert json.loads((out / "log.json").read_text())["steps_done"] == 2 != log_before
    capsys.readouterr()
    # --out equal to the images folder, inside a glob's folder, inside a --concepts folder.
    concepts = tmp_path / "concepts"
    _images(concepts / "cup")
    for argv in (
        _invert_args(tiny_sd1_dir, images, images),
        _invert_args(tiny_sd1_dir, f"{images}/*.png", images / "run"),
        ["invert", "--model", str(tiny_sd1_dir), "--concepts", str(concepts), "--init", "cup",
         "--out", str(concepts / "run")],
    ):  # fmt: skip
        assert main(argv) == 2
        assert "inside the images folder" in error_line(capsys)
    assert sorted(p.name for p in images.iterdir()) == ["0.png", "1.png", "2.png"]
    assert sorted(p.name for p in concepts.iterdir()) == ["cup"]


# --- 6. non-finite rows in a checkpoint or a warm start -------------------------------------


def test_6_nonfinite_checkpoint_and_warm_start_rows_are_named(tiny_sd1_dir, tmp_path, capsys):
    from oneword.embeddings import TokenEmbedding
    from oneword.errors import OnewordError
    from oneword.inversion import InversionConfig, invert
    from oneword.models import load_model

    images = _images(tmp_path / "images")
    out = tmp_path / "run"
    assert main(_invert_args(tiny_sd1_dir, images, out)) == 0
    state = out / "checkpoints" / "step-000001" / "state.safetensors"
    tensors = load_file(str(state))
    tensors["concept.0.rows.0"][0, 0] = float("nan")
    save_file(tensors, str(state))
    capsys.readouterr()
    assert main(_invert_args(tiny_sd1_dir, images, out, "--steps", "3", "--resume")) == 2
    line = error_line(capsys)
    assert "step-000001" in line and "'<t>'" in line and "NaN" in line
    warm = TokenEmbedding("<w>", [torch.full((1, 32), float("inf"))])
    config = InversionConfig(steps=1, batch=1, quiet=True, samples=False)
    with pytest.raises(OnewordError, match="NaN/inf"):
        invert(
            load_model(tiny_sd1_dir, device="cpu"),
            str(images),
            "<w>",
            "dog",
            config,
            warm_start=warm,
        )


# --- 7. absurd norms ------------------------------------------------------------------------


def test_7_rows_far_longer_than_the_vocabulary_are_refused(tiny_sd1_dir, tmp_path, capsys):
    from oneword.embeddings import TokenEmbedding, save_embedding

    huge = save_embedding(
        tmp_path / "huge.safetensors", TokenEmbedding("<h>", [torch.full((1, 32), 1e30)])
    )
    argv = [
        "generate", "--model", str(tiny_sd1_dir), "--embedding", str(huge), "--prompt",
        "a photo of <h>", "--num", "1", "--steps", "1", "--device", "cpu",
        "--out", str(tmp_path / "grid.png"),
    ]  # fmt: skip
    assert main(argv) == 2
    line = error_line(capsys)
    assert str(huge) in line and "100x the median norm" in line
    assert not (tmp_path / "grid.png").exists()
    normal = save_embedding(
        tmp_path / "ok.safetensors", TokenEmbedding("<o>", [torch.randn(1, 32) * 0.5])
    )
    argv[argv.index(str(huge))] = str(normal)
    argv[argv.index("a photo of <h>")] = "a photo of <o>"
    assert main(argv) == 0


# --- 9. an encoder with NaN weights ---------------------------------------------------------


def test_9_encoder_with_nan_weights_is_a_broken_encoder_file(tmp_path, capsys):
    path = _encoder_file(tmp_path / "enc.safetensors")

    def poison(tensors):
        name = sorted(tensors)[0]
        tensors[name] = torch.full_like(tensors[name], float("nan"))

    line = _encode_error_after_editing(path, poison, tmp_path, capsys)
    assert f"encoder file {path} is broken" in line and "NaN" in line and "fp16" not in line


# --- 10. --max-pixels / --min-side ----------------------------------------------------------


def test_10_image_limits_are_flags_of_the_commands_that_read_images(tiny_sd1_dir, tmp_path, capsys):
    images = _images(tmp_path / "images", n=2, size=12)
    assert main(_invert_args(tiny_sd1_dir, images, tmp_path / "a")) == 2
    line = error_line(capsys)
    assert "below the minimum side of 16" in line and "--min-side" in line
    assert main(_invert_args(tiny_sd1_dir, images, tmp_path / "b", "--min-side", "8")) == 0
    assert (tmp_path / "b" / "learned_embeds.safetensors").is_file()
    argv = _invert_args(tiny_sd1_dir, images, tmp_path / "c", "--max-pixels", "100")
    assert main(argv) == 2
    assert "--max-pixels" in error_line(capsys)
    # Later commands in the same process are back at the defaults.
    assert main(_invert_args(tiny_sd1_dir, images, tmp_path / "d")) == 2


# --- 11. a batch far above the images -------------------------------------------------------


def test_11_batch_above_the_views_warns_with_an_estimate(
    tiny_sd1_dir, tmp_path, caplog, monkeypatch
):
    images = _images(tmp_path / "images", n=2)
    with caplog.at_level(logging.WARNING, logger="oneword.inversion"):
        assert main(_invert_args(tiny_sd1_dir, images, tmp_path / "run", "--batch", "16")) == 0
    assert "--batch 16 with 2 image(s)" in caplog.text and "GB" in caplog.text
    from oneword.errors import OnewordError
    from oneword.inversion.invert import InversionConfig, check_batch, step_memory_estimate
    from oneword.models import load_model

    model = load_model(tiny_sd1_dir, device="cpu")
    need = step_memory_estimate(model, 1000)
    assert need == 1000 * step_memory_estimate(model, 1) > 0
    module = importlib.import_module("oneword.inversion.invert")  # not the function it exports
    monkeypatch.setattr(module, "available_memory", lambda device: need // 2)
    with pytest.raises(
        OnewordError, match=r"--batch 1000 needs about .* GB.*pass --batch 4 or fewer"
    ):
        check_batch(model, 2, InversionConfig(batch=1000), name="<t>")


# --- 12. a token inside a template word -----------------------------------------------------


def test_12_token_inside_a_template_word_is_refused(tiny_sd1_dir, tmp_path, capsys):
    images = _images(tmp_path / "images")
    argv = _invert_args(tiny_sd1_dir, images, tmp_path / "run")
    argv[argv.index("<t>")] = "phot"
    assert main(argv) == 2
    line = error_line(capsys)
    assert "'phot'" in line and "'photo'" in line
    assert not (tmp_path / "run" / "learned_embeds.safetensors").exists()


# --- 13. pickle advice, the SDXL A1111 warning, an absurd safetensors header ----------------


def test_13_one_line_for_pickles_export_warnings_and_broken_headers(tiny_sd1_dir, tmp_path, capsys):
    import shutil

    from oneword.embeddings import TokenEmbedding, save_embedding

    # A model folder whose text encoder is a code-running pickle.
    model = tmp_path / "model"
    shutil.copytree(tiny_sd1_dir, model)
    for file in (model / "text_encoder").glob("*.safetensors"):
        file.unlink()

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with open(model / "text_encoder" / "pytorch_model.bin", "wb") as handle:
        pickle.dump({"weight": Evil()}, handle, protocol=2)
    assert main(["info", str(model)]) == 2
    line = error_line(capsys)
    assert "text_encoder" in line and "weights_only" not in line and "likely succeed" not in line
    # SDXL to A1111's .pt name: once a raw UserWarning with a source line; now the name picks
    # the container (a weights-only pickle of clip_l/clip_g, which A1111 reads) and nothing
    # is printed on stderr at all.
    sdxl = TokenEmbedding("<x>", [torch.randn(1, 32) * 0.3, torch.randn(1, 48) * 0.3])
    source = save_embedding(tmp_path / "x.safetensors", sdxl)
    capsys.readouterr()
    assert main(["export", str(source), "--to", "a1111", str(tmp_path / "x.pt")]) == 0
    assert capsys.readouterr().err == ""
    assert set(torch.load(tmp_path / "x.pt", weights_only=True)) == {"clip_l", "clip_g"}
    # A safetensors file whose header length is absurd.
    broken = tmp_path / "broken.safetensors"
    data = bytearray((tmp_path / "x.safetensors").read_bytes())
    data[:8] = (2**63 + 0x80).to_bytes(8, "little")  # starts with 0x80, like a pickle
    broken.write_bytes(bytes(data))
    assert main(["export", str(broken), "--to", "oneword", str(tmp_path / "y.safetensors")]) == 2
    line = error_line(capsys)
    assert "broken safetensors file" in line and "not a readable pickle" not in line


def test_a_full_disk_keeps_the_old_file_and_says_so_in_one_line(tmp_path, monkeypatch, capsys):
    from oneword.embeddings import TokenEmbedding, save_embedding

    target = save_embedding(tmp_path / "t.safetensors", TokenEmbedding("<t>", [torch.ones(1, 32)]))
    before = target.read_bytes()
    source = save_embedding(tmp_path / "s.safetensors", TokenEmbedding("<t>", [torch.zeros(1, 32)]))

    def full(path):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("oneword.io.fsync_path", full)
    assert main(["export", str(source), "--to", "oneword", str(target)]) == 2
    line = error_line(capsys)
    assert str(target) in line and "No space left on device" in line
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.safetensors", "t.safetensors"]
