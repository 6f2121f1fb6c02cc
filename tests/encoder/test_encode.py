"""`oneword encode` and the encoder's eval methods on the tiny world (CPU): the three paths,
the quality check, the files (loaded by diffusers), refusals, the CLI and `oneword eval`.

The encoder is trained for 2 steps with train_encoder.py's tiny preset (quality: none):
these tests check the plumbing and the decisions, not the encoder's quality."""

from __future__ import annotations

import importlib
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import small_encoder_config

from oneword.cli import main
from oneword.datasets.world import HELD_OUT
from oneword.encoder.encode import EncodeConfig, encode
from oneword.encoder.model import (
    ConceptEncoder,
    encode_concept,
    load_encoder,
    save_encoder,
)
from oneword.errors import OnewordError
from oneword.models import load_model

ROOT = Path(__file__).resolve().parents[2]
# Small settings for every call; the loss check unless a test says otherwise.
FAST = dict(check="loss", check_draws=4, samples=False, quiet=True)


@pytest.fixture(scope="module")
def concept_images(tmp_path_factory) -> Path:
    """Three images of a held-out world concept (class word "circle") in a folder."""
    from oneword.datasets.suite import write_concept_images

    folder = tmp_path_factory.mktemp("concept") / "images"
    write_concept_images(HELD_OUT[0], folder, count=3)
    return folder


@pytest.fixture
def model(tiny_world_dir):
    return load_model(tiny_world_dir, device="cpu")  # fresh: every test adds its own tokens


def _untrained(world_tower, model, **overrides) -> ConceptEncoder:
    return ConceptEncoder(small_encoder_config(world_tower, model, **overrides))


# ---------------------------------------------------------------------------------------
# The three paths


def test_prediction_only_is_the_encoders_output(model, tiny_encoder, world_tower, concept_images):
    encoder = load_encoder(tiny_encoder)
    result = encode(
        model,
        encoder,
        concept_images,
        "<c>",
        tower=world_tower,
        refine_steps=0,
        fallback=False,
        **FAST,
    )
    assert result.path_taken == "encoder" and result.log["path_taken"] == "encoder"
    # The class word defaults to the one the encoder was trained with for unlabelled data.
    assert result.log["class_word"] == "object"
    expected = encode_concept(encoder, model, concept_images, "<x>", "object", tower=world_tower)
    torch.testing.assert_close(result.vectors[0], expected.vectors[0], rtol=0, atol=0)
    # No learning: the only UNet passes are the check's (4 draws, one batch; the class word
    # and the token), and the score is finite and positive.
    assert result.log["steps_done"] == 0 and result.log["refine"] is None
    assert result.log["unet_forward_passes"] == result.log["check_unet_passes"] == 2
    assert math.isfinite(result.score) and result.score > 0
    assert result.timings["encoder"] < 5 and "refine" not in result.timings


def test_refinement_starts_from_and_is_pulled_toward_the_prediction(
    model, tiny_encoder, world_tower, concept_images
):
    encoder = load_encoder(tiny_encoder)
    prediction = encode_concept(encoder, model, concept_images, "<x>", "circle", tower=world_tower)
    result = encode(
        model,
        encoder,
        concept_images,
        "<c>",
        class_word="circle",
        tower=world_tower,
        refine_steps=3,
        threshold=1e9,  # never falls back
        **FAST,
    )
    assert result.path_taken == "refined" and result.log["fallback"] is None
    # The warm start is the L2 anchor: the placeholder's initial rows are the prediction.
    torch.testing.assert_close(result.placeholder.init_rows[0], prediction.vectors[0])
    assert not torch.equal(result.vectors[0], prediction.vectors[0])  # and it moved
    refine = result.log["refine"]
    assert refine["steps_done"] == 3 and refine["config"]["l2_weight"] == EncodeConfig.l2_weight
    assert result.log["unet_forward_passes"] == 3 + result.log["check_unet_passes"]
    assert result.log["scores"] == {"refined": result.score}
    assert "full inversion" not in result.summary() and "path: refined" in result.summary()


def test_a_failed_check_falls_back_to_full_inversion(
    model, tiny_encoder, world_tower, concept_images
):
    result = encode(
        model,
        tiny_encoder,
        concept_images,
        "<c>",
        class_word="circle",
        tower=world_tower,
        refine_steps=2,
        threshold=0.0,  # no score passes: forces the fallback
        fallback_steps=3,
        **FAST,
    )
    assert result.path_taken == "fallback"
    log = result.log
    assert log["path_taken"] == "fallback" and log["threshold"] == 0.0
    assert set(log["scores"]) == {"refined", "fallback"} and log["checked"] == "refined"
    assert log["score"] == log["scores"]["fallback"] == result.score
    assert log["fallback"]["steps_done"] == 3 and log["steps_done"] == 2 + 3
    assert log["fallback"]["config"]["l2_weight"] == 0  # the full run is classic inversion
    # The final rows are the full run's, in the placeholder named by the user's token.
    from oneword.tokens import get_rows

    torch.testing.assert_close(get_rows(model, result.placeholder)[0], result.vectors[0])
    assert result.placeholder.token == "<c>"
    assert "> threshold 0" in result.summary() and "path: fallback" in result.summary()


def test_the_concept_is_prepared_once_for_refine_check_and_fallback(
    model, world_tower, concept_images, monkeypatch
):
    # Refinement, loss check and fallback all read the images: fitted and VAE-encoded once
    # (3 images and their mirrors: one VAE call), where each stage used to encode its own.
    calls = []
    real_encode = model.vae.encode
    monkeypatch.setattr(model.vae, "encode", lambda x: calls.append(len(x)) or real_encode(x))
    fitted = []
    invert_module = importlib.import_module("oneword.inversion.invert")  # not the function
    real_fit = invert_module.fit_images
    monkeypatch.setattr(
        invert_module, "fit_images", lambda *a, **k: fitted.append(1) or real_fit(*a, **k)
    )
    result = encode(
        model,
        _untrained(world_tower, model),
        concept_images,
        "<c>",
        class_word="circle",
        tower=world_tower,
        refine_steps=1,
        threshold=0.0,  # forces the fallback
        fallback_steps=1,
        **FAST,
    )
    assert result.path_taken == "fallback" and set(result.log["scores"]) == {"refined", "fallback"}
    assert calls == [6] and fitted == [1]


def test_the_encoder_alone_never_runs_the_vae(model, world_tower, concept_images, monkeypatch):
    # The prediction reads only the tower's features; the VAE posterior is for refinement,
    # the loss check and the fallback, so it is encoded on first use, not up front.
    calls = []
    real_encode = model.vae.encode
    monkeypatch.setattr(model.vae, "encode", lambda x: calls.append(len(x)) or real_encode(x))
    options = dict(FAST, check="none")
    encoder = _untrained(world_tower, model)
    alone = encode(
        model,
        encoder,
        concept_images,
        "<a>",
        tower=world_tower,
        refine_steps=0,
        fallback=False,
        **options,
    )
    assert alone.path_taken == "encoder" and calls == []
    refined = encode(
        model,
        encoder,
        concept_images,
        "<b>",
        tower=world_tower,
        refine_steps=1,
        fallback=False,
        **options,
    )
    assert refined.path_taken == "refined" and calls == [6]  # 3 images and their mirrors


def test_an_untrained_encoder_scores_exactly_the_class_word(model, world_tower, concept_images):
    # Zero-initialised outputs predict the class word's rows, so token and class word give
    # the same prompts' features: the relative loss is exactly 1.0, which passes (<= 1.0).
    result = encode(
        model,
        _untrained(world_tower, model),
        concept_images,
        "<c>",
        class_word="circle",
        tower=world_tower,
        refine_steps=0,
        **FAST,
    )
    assert result.score == pytest.approx(1.0, abs=1e-6)
    assert result.path_taken == "encoder" and result.log["fallback"] is None


def test_auto_check_is_clip_where_the_model_has_a_clip_else_loss(tiny_world_dir, tiny_sd1_dir):
    from types import SimpleNamespace

    from oneword.encoder.encode import THRESHOLDS, resolve_check

    world = SimpleNamespace(extra={"folder": str(tiny_world_dir)})
    plain = SimpleNamespace(extra={"folder": str(tiny_sd1_dir)})
    auto = EncodeConfig()
    assert auto.check == "auto" and auto.threshold is None
    resolved = resolve_check(auto, world)
    assert (resolved.check, resolved.threshold) == ("clip", THRESHOLDS["clip"]) == ("clip", 0.825)
    resolved = resolve_check(auto, plain)
    assert (resolved.check, resolved.threshold) == ("loss", 1.0)
    # --clip makes a CLIP available to any model; an explicit threshold is kept.
    assert resolve_check(EncodeConfig(clip="open_clip:ViT-B-32"), plain).check == "clip"
    assert resolve_check(EncodeConfig(threshold=0.9), world).threshold == 0.9
    assert resolve_check(EncodeConfig(check="none"), world).check == "none"


def test_clip_check_scores_samples_against_the_images(model, world_tower, concept_images):
    encoder = _untrained(world_tower, model)
    settings = dict(FAST, check="clip", sample_steps=2, sample_seeds=2)
    result = encode(
        model,
        encoder,
        concept_images,
        "<c>",
        class_word="circle",
        tower=world_tower,
        refine_steps=0,
        fallback=False,
        **settings,
    )
    # Same rows as the class word and the same seeds: the same samples, so exactly 1.0.
    assert result.log["check"] == "clip"
    assert result.score == pytest.approx(1.0, abs=1e-4)


# ---------------------------------------------------------------------------------------
# Files, refusals, the CLI


def test_files_load_with_diffusers(model, tiny_world_dir, tiny_encoder, concept_images, tmp_path):
    from diffusers import DiffusionPipeline
    from PIL import Image

    from oneword.embeddings import load_embedding, load_into_pipeline

    settings = dict(FAST, samples=True, sample_steps=2, sample_seeds=2)
    result = encode(
        model,
        tiny_encoder,
        concept_images,
        "<c>",
        class_word="circle",
        refine_steps=1,
        threshold=1e9,
        out_dir=tmp_path,
        **settings,
    )
    assert set(result.files) == {"embedding", "samples", "log"}
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "learned_embeds.safetensors",
        "log.json",
        "samples.png",
    ]
    pipe = DiffusionPipeline.from_pretrained(tiny_world_dir, local_files_only=True)
    assert load_into_pipeline(pipe, result.files["embedding"]) == "<c>"
    row = pipe.text_encoder.get_input_embeddings().weight[
        pipe.tokenizer.convert_tokens_to_ids("<c>")
    ]
    torch.testing.assert_close(row.detach(), result.vectors[0][0], rtol=0, atol=0)
    metadata = load_embedding(result.files["embedding"]).metadata
    assert metadata["method"] == "encode" and metadata["path_taken"] == "refined"
    assert metadata["steps"] == "1" and metadata["class_word"] == "circle"
    log = json.loads(result.files["log"].read_text())
    assert log["path_taken"] == "refined" and log["threshold"] == 1e9
    assert log["score"] == pytest.approx(result.score)
    assert log["config"]["refine_steps"] == 1 and log["encoder"]["source"] == str(tiny_encoder)
    for stage in ("load_tower", "encoder", "refine", "check", "samples", "total"):
        assert log["timings"][stage] >= 0, stage
    assert Image.open(result.files["samples"]).size[0] == 2 * model.resolution


def test_an_encoder_for_another_family_or_width_is_refused(
    model, world_tower, concept_images, tmp_path, capsys
):
    sdxl = _untrained(world_tower, model, family="sdxl", widths=(32, 48))
    with pytest.raises(OnewordError, match=r"sdxl.*\[32, 48\].*sd1.*\[32\]"):
        encode(model, sdxl, concept_images, "<c>", **FAST)
    assert "<c>" not in model.tokenizers[0].get_vocab()  # refused before any token was added
    path = save_encoder(tmp_path / "sdxl.safetensors", sdxl)
    args = ["encode", "--model", str(model.source), "--encoder", str(path), "--token", "<c>"]
    args += ["--images", str(concept_images), "--device", "cpu", "--out", str(tmp_path / "o")]
    assert main(args) == 2
    err = capsys.readouterr().err
    # One error line (after transformers' loading progress bars), no traceback.
    last = err.strip().splitlines()[-1]
    assert last.startswith("oneword encode: error:") and "train an encoder for this model" in last
    assert "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_bad_settings_fail_before_any_work(model, tiny_encoder, concept_images, tmp_path, capsys):
    with pytest.raises(OnewordError, match=r"--refine-steps must be an integer in 0\.\.200"):
        encode(model, tiny_encoder, concept_images, "<c>", refine_steps=500)
    with pytest.raises(OnewordError, match="unknown encode settings"):
        encode(model, tiny_encoder, concept_images, "<c>", refine_step=5)
    with pytest.raises(OnewordError, match="--check must be one of"):
        encode(model, tiny_encoder, concept_images, "<c>", check="oracle")
    base = ["encode", "--images", str(concept_images), "--token", "<c>"]
    base += ["--out", str(tmp_path / "o"), "--device", "cpu"]
    assert main([*base, "--encoder", str(tmp_path / "none.safetensors")]) == 2
    assert "no encoder at" in capsys.readouterr().err
    assert main([*base, "--encoder", str(tiny_encoder), "--refine-steps", "-1"]) == 2
    assert "--refine-steps" in capsys.readouterr().err


def test_cli_end_to_end_reports_the_path_score_and_threshold(
    tiny_world_dir, tiny_encoder, concept_images, tmp_path, capsys
):
    out = tmp_path / "out"
    args = ["encode", "--model", str(tiny_world_dir), "--encoder", str(tiny_encoder)]
    args += ["--images", str(concept_images), "--token", "<my-circle>", "--class-word", "circle"]
    args += ["--refine-steps", "2", "--threshold", "0", "--fallback-steps", "2"]
    args += ["--check-draws", "4", "--sample-steps", "2", "--device", "cpu", "--quiet"]
    assert main([*args, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "path: fallback" in printed and "threshold 0" in printed and "score" in printed
    assert "learned_embeds.safetensors" in printed
    log = json.loads((out / "log.json").read_text())
    assert log["path_taken"] == "fallback" and log["threshold"] == 0.0
    assert log["steps_done"] == 4 and log["token"] == "<my-circle>"
    assert (out / "samples.png").is_file() and (out / "learned_embeds.safetensors").is_file()


# ---------------------------------------------------------------------------------------
# oneword eval


@pytest.mark.slow
def test_eval_runs_the_encoder_methods(tiny_world_dir, tiny_encoder, tmp_path, capsys):
    from oneword.datasets.suite import write_world_suite
    from oneword.evaluation.harness import parse_methods

    suite = write_world_suite(tmp_path / "suite", images_per_concept=2, identities=HELD_OUT[:1])
    args = ["eval", "--model", str(tiny_world_dir), "--suite", str(suite)]
    args += ["--methods", "encoder,encoder+refine:2"]
    args += ["--concepts", "1", "--samples", "1", "--steps", "2", "--device", "cpu", "--quiet"]
    assert main([*args, "--encoder", str(tiny_encoder), "--out", str(tmp_path / "eval")]) == 0
    assert "| encoder+refine:2 |" in capsys.readouterr().out
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert results["config"]["encoder"] == str(tiny_encoder)
    encoder, refined = results["methods"]["encoder"], results["methods"]["encoder+refine:2"]
    assert encoder["unet_passes_per_concept"] == 0 and encoder["steps"] == 0
    assert refined["unet_passes_per_concept"] == 2 and refined["steps"] == 2
    for method in (encoder, refined):
        assert 0 <= method["identity"] <= 1 and method["seconds_per_concept"] > 0
        assert method["per_concept"][0]["cost"]["encoder_seconds"] > 0
    for label in ("encoder", "encoder+refine-2"):
        assert (
            tmp_path / "eval" / "embeddings" / label / f"{HELD_OUT[0].name}.safetensors"
        ).is_file()
    with pytest.raises(OnewordError, match="step count in 1..200"):
        parse_methods("encoder+refine:0")
    with pytest.raises(OnewordError, match="takes no argument"):
        parse_methods("encoder:3")
    missing = ["--encoder", str(tmp_path / "none.safetensors"), "--out", str(tmp_path / "e2")]
    assert main([*args, *missing]) == 2
    assert "need an encoder file" in capsys.readouterr().err


def test_refine_settings_in_the_method_argument_reach_encode(monkeypatch):
    import oneword.encoder.encode
    from oneword.evaluation import methods
    from oneword.evaluation.harness import MethodRun, parse_methods

    assert methods.refine_settings("50:lr=1e-2:l2=0") == {
        "refine_steps": 50,
        "refine_lr": 0.01,
        "l2_weight": 0.0,
    }
    assert methods.refine_settings("7") == {"refine_steps": 7}
    assert methods.refine_settings(None) == {}
    for bad, message in [
        ("50:lr=x", "lr='x' is not a number"),
        ("50:momentum=1", "unknown setting 'momentum=1'"),
        ("50:l2=1:l2=2", "l2 is given twice"),
        ("50:l2=-1", "l2-weight must be >= 0"),
        ("lr=1e-2", "starts with a step count"),
    ]:
        with pytest.raises(OnewordError, match=message):
            parse_methods(f"encoder+refine:{bad}")

    seen = {}

    def fake_encode(model, encoder, images, token, **settings):
        seen.update(settings)
        raise RuntimeError("stop here")

    monkeypatch.setattr(methods, "_encoder_and_tower", lambda run, model: (None, None))
    monkeypatch.setattr(oneword.encoder.encode, "encode", fake_encode)
    concept = type("Concept", (), {"class_word": "circle"})()
    with pytest.raises(RuntimeError, match="stop here"):
        methods.encoder_refine_method(None, concept, MethodRun("20:l2=0.5", "<t>", [], 0))
    assert seen["refine_steps"] == 20 and seen["l2_weight"] == 0.5 and "refine_lr" not in seen


# ---------------------------------------------------------------------------------------
# oneword demo: encoder path, classic path, and a missing encoder


@pytest.mark.slow
def test_demo_uses_the_encoder_when_given(tiny_world_dir, tiny_encoder, tmp_path, capsys):
    out = tmp_path / "demo"
    argv = ["demo", "--model", str(tiny_world_dir), "--encoder", str(tiny_encoder)]
    assert main([*argv, "--refine-steps", "1", "--steps", "3", "--quiet", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "path:" in printed and "classic inversion" not in printed
    facts = json.loads((out / "token" / "log.json").read_text())
    assert facts["config"]["fallback_steps"] == 3  # the demo's budget, not 3,000 steps
    assert facts["path_taken"] in ("refined", "fallback") and facts["refine"]["steps_done"] == 1
    assert (out / "demo.png").is_file() and (out / "token" / "learned_embeds.safetensors").is_file()


@pytest.mark.slow
def test_demo_classic_and_missing_encoder(tiny_world_dir, tiny_encoder, tmp_path, capsys):
    out = tmp_path / "classic"
    argv = ["demo", "--model", str(tiny_world_dir), "--steps", "2", "--quiet"]
    assert main([*argv, "--classic", "--encoder", str(tiny_encoder), "--out", str(out)]) == 0
    assert "classic inversion, 2 steps" in capsys.readouterr().out
    assert json.loads((out / "token" / "log.json").read_text())["steps_done"] == 2
    # An explicitly named encoder that does not exist is an error, not a silent switch.
    missing = tmp_path / "nope.safetensors"
    assert main([*argv, "--encoder", str(missing), "--out", str(tmp_path / "x")]) == 2
    assert str(missing) in capsys.readouterr().err
