"""Classic textual inversion on the tiny random SD 1.x / 2.x / XL models (CPU, seconds each)."""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import noise_images as _images
from conftest import quick_inversion_config as _config
from PIL import Image
from safetensors.torch import load_file

from oneword.cli.invert import load_concepts, main, resolve_config
from oneword.errors import OnewordError
from oneword.inversion import ConceptSpec, invert, invert_many, load_templates
from oneword.inversion import checkpoint as ckpt
from oneword.inversion.templates import fill
from oneword.models import load_model
from oneword.tokens import add_placeholder, get_rows

REPO = Path(__file__).resolve().parents[2]
# The module, not the function `oneword.inversion.invert` that the package re-exports.
invert_module = importlib.import_module("oneword.inversion.invert")


def _text_sensitive(model, scale: float = 200.0):
    # The tiny UNet is random: its output barely depends on the prompt, so the token has
    # little to learn. Scaling the cross-attention outputs makes the prediction depend on
    # the text, so the loss falls measurably when the token is optimised.
    with torch.no_grad():
        for name, param in model.unet.named_parameters():
            if "attn2.to_out" in name:
                param.mul_(scale)
    return model


@pytest.fixture
def sd1(tiny_sd1_dir):
    return load_model(tiny_sd1_dir, device="cpu")


@pytest.fixture
def sdxl(tiny_sdxl_dir):
    return load_model(tiny_sdxl_dir, device="cpu")


# --- the objective learns ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("family", "margin"), [("sd1", 0.05), ("sd2", 0.01), ("sdxl", 0.01)]
)  # sd2 exercises v-prediction (get_velocity), sdxl pooled embeds + add_time_ids
def test_loss_falls(request, family, margin):
    """The learned token lowers the loss below a control run that sees the same draws.

    With fixed seeds both runs draw the same images, templates, timesteps and noise, so the
    per-step difference d_t = loss_t(trained) - loss_t(control) is free of the large
    timestep noise that hides a raw first-vs-last comparison on these random models.
    """
    folder = request.getfixturevalue(f"tiny_{family}_dir")
    curves = {}
    for lr in (1e-12, 0.02):  # a control run with (almost) no learning, then a real one
        model = _text_sensitive(load_model(folder, device="cpu"))
        config = _config(steps=30, batch=4, lr=lr, seed=1)
        curves[lr] = np.array(invert(model, _images(), "<t>", "dog", config).log["loss"])
    trained, control = curves[0.02], curves[1e-12]
    difference = trained - control
    assert difference[0] == 0.0  # same start, same draws
    assert difference[-10:].mean() < difference[:10].mean()
    assert difference[-10:].mean() < -margin
    if family == "sd1":  # large enough here to show without the control
        assert trained[-10:].mean() < trained[:10].mean() - margin / 2


def test_only_the_placeholder_rows_change(sdxl):
    other = add_placeholder(sdxl, "<other>", "cat", 2)
    frozen = {
        f"{index}.{name}": tensor.clone()
        for index, module in enumerate([*sdxl.text_encoders, sdxl.unet, sdxl.vae])
        for name, tensor in module.state_dict().items()
        if not name.endswith(".new.weight")  # the placeholder rows (PlaceholderEmbedding.rows)
    }
    other_rows = get_rows(sdxl, other)
    result = invert(sdxl, _images(), "<t>", "dog", _config(steps=3, vectors=2))
    after = {
        f"{index}.{name}": tensor
        for index, module in enumerate([*sdxl.text_encoders, sdxl.unet, sdxl.vae])
        for name, tensor in module.state_dict().items()
        if not name.endswith(".new.weight")  # the placeholder rows (PlaceholderEmbedding.rows)
    }
    assert frozen.keys() == after.keys()
    changed = [name for name in frozen if not torch.equal(frozen[name], after[name])]
    assert changed == []
    for before, now in zip(other_rows, get_rows(sdxl, other)):
        assert torch.equal(before, now)
    for init, learned in zip(result.placeholder.init_rows, result.vectors):
        assert learned.dtype == torch.float32 and learned.shape == init.shape
        assert not torch.equal(init, learned)
    for learned, in_model in zip(result.vectors, get_rows(sdxl, result.placeholder)):
        assert torch.equal(learned, in_model)


# --- resume --------------------------------------------------------------------------------


def test_resume_is_bitwise_exact(tiny_sd1_dir, tmp_path):
    config = _config(steps=6, checkpoint_every=3, augment=True, l2_weight=0.1)
    full = invert(
        load_model(tiny_sd1_dir, device="cpu"), _images(), "<t>", "dog", config, tmp_path / "full"
    )

    first = _config(steps=3, checkpoint_every=3, augment=True, l2_weight=0.1)
    invert(
        load_model(tiny_sd1_dir, device="cpu"), _images(), "<t>", "dog", first, tmp_path / "split"
    )
    resumed = invert(
        load_model(tiny_sd1_dir, device="cpu"),
        _images(),
        "<t>",
        "dog",
        config,
        tmp_path / "split",
        resume=True,
    )

    assert resumed.log["resumed_from_step"] == 3
    assert resumed.log["steps_done"] == full.log["steps_done"] == 6
    assert resumed.log["loss"] == full.log["loss"]  # bitwise: Python floats compared exactly
    for a, b in zip(full.vectors, resumed.vectors):
        assert torch.equal(a, b)
    # Adam moments, generator states and rows in the final checkpoints are identical.
    a = load_file(tmp_path / "full" / "checkpoints" / "step-000006" / "state.safetensors")
    b = load_file(tmp_path / "split" / "checkpoints" / "step-000006" / "state.safetensors")
    assert a.keys() == b.keys() and any(k.startswith("optimizer.") for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # Only the last two checkpoints are kept.
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "split" / "checkpoints")] == [
        "step-000003",
        "step-000006",
    ]


def test_snapshots_equal_shorter_runs(tiny_sd1_dir):
    # The rows at step n of a longer run are the rows of an n-step run (constant lr, one
    # seed): one run gives the identity-vs-steps curve.
    long = invert(
        load_model(tiny_sd1_dir, device="cpu"), _images(), "<t>", "dog", _config(steps=5),
        snapshots=[2, 5],
    )  # fmt: skip
    short = invert(
        load_model(tiny_sd1_dir, device="cpu"), _images(), "<t>", "dog", _config(steps=2)
    )
    assert sorted(long.snapshots) == [2, 5]
    (rows_2, seconds_2), (rows_5, seconds_5) = long.snapshots[2], long.snapshots[5]
    assert all(torch.equal(a, b) for a, b in zip(rows_2, short.vectors))
    assert all(torch.equal(a, b) for a, b in zip(rows_5, long.vectors))
    assert not torch.equal(rows_2[0], rows_5[0]) and 0 < seconds_2 < seconds_5
    with pytest.raises(OnewordError, match=r"snapshot steps \[3, 9\] must lie in 1..--steps \(5\)"):
        invert(
            load_model(tiny_sd1_dir, device="cpu"), _images(), "<t>", "dog", _config(steps=5),
            snapshots=[9, 3],
        )  # fmt: skip


def test_resume_without_a_checkpoint_is_an_error(sd1, tmp_path):
    with pytest.raises(OnewordError, match="no checkpoint"):
        invert(sd1, _images(), "<t>", "dog", _config(), tmp_path / "empty", resume=True)
    bad = tmp_path / "bad" / "checkpoints" / "step-000002"
    bad.mkdir(parents=True)
    (bad / "state.json").write_text("{not json")
    with pytest.raises(OnewordError, match="unreadable"):
        invert(sd1, _images(), "<u>", "dog", _config(), tmp_path / "bad", resume=True)


def test_a_failed_run_releases_its_folder_while_its_error_is_still_held(sd1, tmp_path):
    # The web page keeps a job's exception (and so the frame that took the lock) after the
    # error is shown; the lock must go when the run ends, not when the frame is collected.
    with pytest.raises(OnewordError, match="already exists") as caught:
        invert(sd1, _images(), "dog", "dog", _config(), tmp_path / "out")
    assert caught.value.__traceback__ is not None
    assert not list(tmp_path.glob("*.oneword.lock"))


def test_starting_over_an_old_run_is_an_error(tiny_sd1_dir, tmp_path):
    invert(
        load_model(tiny_sd1_dir, device="cpu"), _images(), "<t>", "dog", _config(steps=1), tmp_path
    )
    with pytest.raises(OnewordError, match="--resume"):
        invert(
            load_model(tiny_sd1_dir, device="cpu"),
            _images(),
            "<t>",
            "dog",
            _config(steps=1),
            tmp_path,
        )


def test_resume_with_other_settings_is_an_error(tiny_sd1_dir, tmp_path):
    invert(
        load_model(tiny_sd1_dir, device="cpu"), _images(), "<t>", "dog", _config(steps=1), tmp_path
    )
    with pytest.raises(OnewordError, match="lr"):
        invert(
            load_model(tiny_sd1_dir, device="cpu"),
            _images(),
            "<t>",
            "dog",
            _config(steps=2, lr=0.5),
            tmp_path,
            resume=True,
        )


@pytest.mark.slow
def test_sigkill_then_resume_through_the_cli(tiny_sd1_dir, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for index, image in enumerate(_images()):
        image.save(images / f"{index}.png")
    out = tmp_path / "run"
    common = [
        "--model",
        str(tiny_sd1_dir),
        "--images",
        str(images),
        "--token",
        "<t>",
        "--init",
        "dog",
        "--out",
        str(out),
        "--device",
        "cpu",
        "--quiet",
        "--no-samples",
        "--checkpoint-every",
        "1",
        "--batch",
        "1",
    ]
    env = os.environ | {"PYTHONPATH": str(REPO)}
    process = subprocess.Popen(
        [sys.executable, "-m", "oneword.cli", "invert", *common, "--steps", "100000"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while len(ckpt.list_checkpoints(out / "checkpoints")) < 2:
            assert process.poll() is None, "the CLI exited before writing checkpoints"
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.05)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    latest = ckpt.list_checkpoints(out / "checkpoints")[-1]
    _, state = ckpt.load_checkpoint(latest)  # the last complete checkpoint loads
    killed_at = state["step"]
    assert len(state["concepts"][0]["losses"]) == killed_at

    assert main(["invert", *common, "--steps", str(killed_at + 2), "--resume"]) == 0
    log = json.loads((out / "log.json").read_text())
    assert log["resumed_from_step"] >= killed_at
    assert log["steps_done"] == killed_at + 2 == len(log["loss"])
    assert log["loss"][:killed_at] == state["concepts"][0]["losses"]


# --- many concepts -------------------------------------------------------------------------


def test_many_concepts_match_single_runs(tiny_sd1_dir, tmp_path):
    config = _config(steps=5, batch=2, lr=0.05)
    specs = [
        ConceptSpec("a", _images(2, seed=1), "<a>", "dog", seed=3),
        ConceptSpec("b", _images(3, seed=2), "<b>", "cup"),
    ]
    logs = invert_many(load_model(tiny_sd1_dir, device="cpu"), specs, config, tmp_path, chunk=2)
    assert logs["a"]["concepts_per_batch"] == 2
    from oneword.embeddings import load_embedding

    for spec in specs:
        seed = config.seed if spec.seed is None else spec.seed
        single = invert(
            load_model(tiny_sd1_dir, device="cpu"),
            spec.images,
            spec.token,
            spec.init_text,
            _config(steps=5, batch=2, lr=0.05, seed=seed),
        )
        many = load_embedding(tmp_path / spec.name / "learned_embeds.safetensors")
        # Tolerance stated in invert_many's docstring: the batched UNet rounds differently.
        assert (many.vectors[0] - single.vectors[0]).abs().max() < 1e-4
        np.testing.assert_allclose(logs[spec.name]["loss"], single.log["loss"], rtol=1e-4)


def test_shards_split_the_concepts(sd1, tmp_path):
    specs = [ConceptSpec(name, _images(1, seed=i), None, "dog") for i, name in enumerate("abc")]
    logs = invert_many(sd1, specs, _config(steps=1), tmp_path, shard=(1, 2))
    assert list(logs) == ["b"]
    assert (tmp_path / "b" / "learned_embeds.safetensors").is_file()
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()


def test_cli_concepts_folder(tiny_sd1_dir, tmp_path):
    for index, name in enumerate(["cup", "dog"]):
        folder = tmp_path / "concepts" / name
        folder.mkdir(parents=True)
        for j, image in enumerate(_images(2, seed=index)):
            image.save(folder / f"{j}.png")
    (tmp_path / "concepts" / "dog" / "concept.json").write_text(
        json.dumps({"class_word": "dog", "token": "<good-dog>"})
    )
    specs = load_concepts(tmp_path / "concepts", init_text="object")
    assert [(s.name, s.token, s.init_text) for s in specs] == [
        ("cup", None, "object"),
        ("dog", "<good-dog>", "dog"),
    ]
    out = tmp_path / "out"
    argv = [
        "invert",
        "--model",
        str(tiny_sd1_dir),
        "--concepts",
        str(tmp_path / "concepts"),
        "--init",
        "object",
        "--steps",
        "2",
        "--batch",
        "1",
        "--out",
        str(out),
        "--device",
        "cpu",
        "--quiet",
    ]
    assert main(argv) == 0
    log = json.loads((out / "dog" / "log.json").read_text())
    assert log["token"] == "<good-dog>" and len(log["loss"]) == 2
    assert (out / "cup" / "learned_embeds.safetensors").is_file()
    assert main([*argv, "--resume"]) == 0  # everything finished: nothing to redo


# --- non-finite losses -----------------------------------------------------------------------


def test_non_finite_steps_are_skipped_then_abort(sd1, monkeypatch, caplog):
    real = invert_module.denoising_loss
    calls = {"n": 0}

    def nan_on_second_call(*args, **kwargs):
        output = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 2:
            output.loss = output.loss * float("nan")
        return output

    monkeypatch.setattr(invert_module, "denoising_loss", nan_on_second_call)
    result = invert(sd1, _images(), "<t>", "dog", _config(steps=4))
    assert result.log["nonfinite_steps"] == 1
    assert result.log["loss"][1] is None and all(v is not None for v in result.log["loss"][2:])
    assert all(torch.isfinite(v).all() for v in result.vectors)
    assert "non-finite" in caplog.text

    def always_nan(*args, **kwargs):
        output = real(*args, **kwargs)
        output.loss = output.loss * float("nan")
        return output

    monkeypatch.setattr(invert_module, "denoising_loss", always_nan)
    with pytest.raises(OnewordError, match="non-finite for 3 steps in a row"):
        invert(sd1, _images(), "<u>", "dog", _config(steps=10, max_nonfinite=3))
    assert calls["n"] == 4


# --- files, diffusers, warm start, options ---------------------------------------------------


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_outputs_load_with_diffusers(request, family, tmp_path):
    from diffusers import DiffusionPipeline

    from oneword.embeddings import load_into_pipeline

    folder = request.getfixturevalue(f"tiny_{family}_dir")
    model = load_model(folder, device="cpu")
    config = _config(steps=2, vectors=2, samples=True, sample_steps=2, sample_seeds=2)
    result = invert(model, _images(3), "<t>", "dog", config, tmp_path)
    assert set(result.files) == {"embedding", "samples", "log"}

    pipe = DiffusionPipeline.from_pretrained(folder, local_files_only=True)
    token = load_into_pipeline(pipe, result.files["embedding"])
    assert token == "<t>"
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if family == "sdxl" else [])
    tokenizers = [pipe.tokenizer] + ([pipe.tokenizer_2] if family == "sdxl" else [])
    for text_encoder, tokenizer, learned in zip(encoders, tokenizers, result.vectors):
        ids = tokenizer.convert_tokens_to_ids(["<t>", "<t>_1"])
        rows = text_encoder.get_input_embeddings().weight[ids].detach()
        torch.testing.assert_close(rows, learned, rtol=0, atol=0)

    grid = Image.open(result.files["samples"])
    assert grid.size[0] == 2 * model.resolution  # sample_seeds columns
    log = json.loads((tmp_path / "log.json").read_text())
    for key in (
        "config",
        "loss",
        "seconds_total",
        "seconds_per_step",
        "unet_forward_passes",
        "device",
        "dtype",
        "torch_version",
        "nonfinite_steps",
        "early_stop_step",
    ):
        assert key in log, key
    assert log["config"]["vectors"] == 2 and log["unet_forward_passes"] == 2
    assert len(log["loss"]) == 2 and all(math.isfinite(v) for v in log["loss"])


def test_warm_start_starts_from_the_file(tiny_sd1_dir, tmp_path):
    first = invert(
        load_model(tiny_sd1_dir, device="cpu"), _images(), "<t>", "dog", _config(steps=3), tmp_path
    )
    model = load_model(tiny_sd1_dir, device="cpu")
    second = invert(
        model, _images(), "<t>", "dog", _config(steps=1), warm_start=first.files["embedding"]
    )
    assert torch.equal(second.placeholder.init_rows[0], first.vectors[0])
    with pytest.raises(OnewordError, match="--vectors"):
        invert(
            model, _images(), "<u>", "dog", _config(vectors=2), warm_start=first.files["embedding"]
        )


def test_clip_identity_loss(tiny_sd1_dir, tiny_clip_vision_dir):
    rows = {}
    for weight in (0.0, 1.0):
        config = _config(steps=3, clip_weight=weight, clip_model=str(tiny_clip_vision_dir))
        result = invert(load_model(tiny_sd1_dir, device="cpu"), _images(), "<t>", "dog", config)
        rows[weight] = result.vectors[0]
        if weight:
            assert all(0.0 <= v <= 2.0 for v in result.log["clip_loss"])
    assert not torch.equal(rows[0.0], rows[1.0])  # L_clip sends a gradient to the rows
    with pytest.raises(OnewordError, match="--clip-model"):
        invert(
            load_model(tiny_sd1_dir, device="cpu"),
            _images(),
            "<t>",
            "dog",
            _config(clip_weight=1.0),
        )


def test_early_stop_and_class_word_cue(sd1, monkeypatch):
    prompts = []
    real = invert_module.encode_prompts
    monkeypatch.setattr(
        invert_module, "encode_prompts", lambda m, p: prompts.extend(p) or real(m, p)
    )
    config = _config(steps=50, early_stop=True, patience=2, min_delta=10.0, class_word_cue=True)
    result = invert(sd1, _images(), "<t>", "dog", config, class_word="dog")
    assert result.log["early_stop_step"] == 3 == len(result.log["loss"])
    assert all("<t> dog" in p for p in prompts) and len(prompts) == 3 * config.batch
    with pytest.raises(OnewordError, match="class word"):
        invert(sd1, _images(), "<u>", "dog", config)


def test_templates_and_config_file(tmp_path):
    assert load_templates("object")[0] == "a photo of a {}"
    assert fill("a painting in the style of {}", "<s>") == "a painting in the style of <s>"
    good = tmp_path / "t.txt"
    good.write_text("# mine\na {} on a table\n\nthe {} at night\n")
    assert load_templates(str(good)) == ["a {} on a table", "the {} at night"]
    bad = tmp_path / "bad.txt"
    bad.write_text("no slot here\n")
    with pytest.raises(OnewordError, match="bad.txt:1"):
        load_templates(str(bad))

    import argparse

    from oneword.cli.invert import add_invert_parser

    parser = argparse.ArgumentParser()
    add_invert_parser(parser.add_subparsers())
    (tmp_path / "c.json").write_text(json.dumps({"steps": 7, "lr": 0.1}))
    args = parser.parse_args(
        [
            "invert",
            "--images",
            "x",
            "--out",
            "o",
            "--config",
            str(tmp_path / "c.json"),
            "--lr",
            "0.2",
            "--class-word",
            "dog",
        ]
    )
    config = resolve_config(args)
    assert (config.steps, config.lr, config.class_word_cue, config.batch) == (7, 0.2, True, 4)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_bf16_frozen_parts_on_the_cpu(request, family, tmp_path):
    # What a GPU run does (frozen parts bf16, rows fp32), on the CPU, samples included.
    model = load_model(request.getfixturevalue(f"tiny_{family}_dir"), device="cpu")
    for module in [*model.text_encoders, model.unet, model.vae]:
        module.to(torch.bfloat16)
    model.dtype = torch.bfloat16
    config = _config(steps=3, vectors=2, samples=True, sample_steps=2, sample_seeds=2)
    result = invert(model, _images(), "<t>", "dog", config, tmp_path)
    assert all(math.isfinite(v) for v in result.log["loss"])
    assert result.log["dtype"] == "bfloat16"
    assert all(v.dtype == torch.float32 for v in result.vectors)
    assert (tmp_path / "samples.png").is_file()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_bf16_on_the_gpu(request, family, tmp_path):
    folder = request.getfixturevalue(f"tiny_{family}_dir")
    model = load_model(folder, device="cuda", precision="bf16")
    assert model.dtype == torch.bfloat16
    base = [te.get_input_embeddings().weight.clone() for te in model.text_encoders]
    config = _config(steps=4, vectors=2, samples=True, sample_steps=2, sample_seeds=2)
    result = invert(model, _images(), "<t>", "dog", config, tmp_path)
    assert all(math.isfinite(v) for v in result.log["loss"])
    assert result.log["dtype"] == "bfloat16" and result.log["device"].startswith("cuda")
    for learned, init in zip(result.vectors, result.placeholder.init_rows):
        assert learned.dtype == torch.float32 and not torch.equal(learned, init.cpu())
    for before, te in zip(base, model.text_encoders):
        assert torch.equal(
            before, te.get_input_embeddings().base.weight
        )  # now a PlaceholderEmbedding
    assert (tmp_path / "samples.png").is_file()


@pytest.mark.slow
def test_benchmark_runs(capsys):
    spec = importlib.util.spec_from_file_location(
        "bench_inversion", REPO / "benchmarks" / "bench_inversion.py"
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--model", "tiny", "--steps", "8", "--warmup", "2", "--device", "cpu"]) == 0
    table = capsys.readouterr().out
    assert "| oneword |" in table and "| reference (diffusers-style) |" in table and "x |" in table
    assert "checkpoints/world" not in table  # --model tiny: the tiny model, not the world
    import re

    bound = re.search(
        r"UNet forward \+ backward alone .*: ([0-9.]+) s = .* can gain: ([0-9.]+)x", table
    )
    assert bound and float(bound.group(1)) > 0 and float(bound.group(2)) > 1
