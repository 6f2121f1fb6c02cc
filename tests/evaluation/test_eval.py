"""`oneword eval`: metric functions on hand-made predictions, the scorers on tiny models, and
the harness end to end on the tiny world (CPU)."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import read_safetensors
from PIL import Image
from safetensors.torch import save_file

from oneword.cli import main
from oneword.datasets.suite import write_world_suite
from oneword.datasets.world import HELD_OUT
from oneword.encoder.encode import THRESHOLDS
from oneword.errors import OnewordError
from oneword.evaluation import METHODS, EvalConfig, LearnedToken, evaluate
from oneword.evaluation.harness import QUALITY_METRICS, fill_prompt, parse_methods
from oneword.evaluation.metrics import (
    fallback_rates,
    load_clip_scorer,
    load_dino_scorer,
    matched_similarity,
    matches,
    oracle_scores,
    pairwise_similarity,
    peak_memory_mib,
    strip_token,
)
from oneword.evaluation.report import format_table, plot_tradeoff

STAR = {"shape": "star", "colour": "pink", "pattern": "solid"}


def _predictions(*samples: dict) -> dict[str, list[str]]:
    """Oracle-style predictions (attribute -> values) from one dict per sample."""
    return {name: [s[name] for s in samples] for name in samples[0]}


def _sample(**changes) -> dict:
    return {**STAR, "background": "white", "size": "big", "position": "center", **changes}


# ---------------------------------------------------------------------------------------
# Oracle metrics on hand-made predictions


def test_identity_counts_samples_with_shape_colour_and_pattern_all_right():
    identity = _predictions(_sample(), _sample(), _sample(background="red"), _sample(colour="teal"))
    scores = oracle_scores(identity, [], [], STAR)
    assert scores["identity"] == 0.75  # 3 of 4; the background does not matter
    assert scores["editability"] is None  # no edit prompts
    assert scores["per_attribute"] == {"shape": 1.0, "colour": 0.75, "pattern": 1.0}


def test_editability_needs_the_edit_and_the_identity():
    identity = _predictions(_sample(), _sample())
    green = _predictions(
        _sample(background="green"),  # edit holds, identity kept: counted
        _sample(background="green", shape="circle"),  # edit holds, identity lost: not counted
        _sample(background="red"),  # identity kept, edit failed: not counted
        _sample(background="green", pattern="dotted"),  # not counted
    )
    small_left = _predictions(
        _sample(size="small", position="left"),  # counted
        _sample(size="small", position="right"),  # half the edit: not counted
        _sample(size="small", position="left"),  # counted
        _sample(size="big", position="left"),  # not counted
    )
    nothing = _predictions(*[_sample(shape="heart")] * 4)  # asks for no edit: ignored
    edits = [{"background": "green"}, {"size": "small", "position": "left"}, {}]
    scores = oracle_scores(identity, [green, small_left, nothing], edits, STAR)
    assert scores["identity"] == 1.0
    assert scores["editability"] == 3 / 8
    assert scores["edit_samples"] == 8
    per = scores["per_attribute"]
    assert per["background"] == 3 / 4
    assert per["size"] == 3 / 4 and per["position"] == 3 / 4
    assert per["shape"] == 9 / 10  # 2 identity + 8 edit samples, one circle
    assert list(per) == ["shape", "colour", "pattern", "background", "size", "position"]


def test_an_edit_of_an_identity_attribute_overrides_it():
    identity = _predictions(_sample())
    red = _predictions(_sample(colour="red"), _sample())
    scores = oracle_scores(identity, [red], [{"colour": "red"}], STAR)
    assert scores["editability"] == 0.5  # the red one counts; the unchanged pink one does not


def test_matches_and_missing_attributes():
    predictions = _predictions(_sample(), _sample(size="small"))
    assert matches(predictions, {"size": "big"}) == [True, False]
    assert matches(predictions, {}) == [True, True]
    with pytest.raises(OnewordError, match="does not predict"):
        matches(predictions, {"texture": "rough"})
    with pytest.raises(OnewordError, match="name none of"):
        oracle_scores(predictions, [], [], {"size": "big"})


# ---------------------------------------------------------------------------------------
# Similarities and scorers


def test_strip_token_as_gal_et_al():
    assert strip_token("a photo of {} on a green background") == "a photo of on a green background"
    assert strip_token("{} on the left") == "on the left"
    assert strip_token("a photo of <t>.", "<t>") == "a photo of."
    assert strip_token("a {} dog in the jungle") == "a dog in the jungle"
    assert fill_prompt("a {} dog in the jungle", "dog", "dog") == "a dog in the jungle"
    assert fill_prompt("a {} dog in the jungle", "<t>", "dog") == "a <t> dog in the jungle"
    assert fill_prompt("a photo of {}", "object", "object") == "a photo of object"


def test_similarities():
    features = torch.nn.functional.normalize(
        torch.randn(3, 8, generator=torch.Generator().manual_seed(0)), dim=-1
    )
    assert matched_similarity(features, features) == pytest.approx(1.0)
    same = features[:1].expand(3, -1)
    assert pairwise_similarity(same, same) == pytest.approx(1.0)
    expected = float((features @ features.T).mean())
    assert pairwise_similarity(features, features) == pytest.approx(expected)


def _shapes() -> list[Image.Image]:
    from oneword.datasets.world import Scene, render
    from oneword.images import tensor_to_images

    scenes = [
        Scene("star", "red", "solid", "white", "big", "center"),
        Scene("ring", "blue", "dotted", "yellow", "small", "left"),
    ]
    return tensor_to_images(render(scenes).float() / 127.5 - 1)


def test_world_clip_scores_identical_images_one(tiny_world_dir):
    scorer = load_clip_scorer(None, tiny_world_dir)  # the world's own CLIP by default
    assert scorer is not None and scorer.name == "world"
    star, ring = _shapes()
    features = scorer.image_features([star, star, ring])
    assert pairwise_similarity(features[:1], features[1:2]) == pytest.approx(1.0, abs=1e-5)
    assert pairwise_similarity(features[:1], features[2:]) < 0.9999
    texts = scorer.text_features(["a red star", "a red star", "a blue ring"])
    assert texts.shape == (3, features.shape[1])
    assert torch.allclose(texts.norm(dim=-1), torch.ones(3))
    assert torch.equal(texts[0], texts[1])
    assert torch.equal(scorer.image_features([star, star, ring]), features)  # deterministic
    # Another batch size changes the float summation order, not the feature.
    torch.testing.assert_close(scorer.image_features([star]), features[:1], atol=1e-5, rtol=0)


def test_no_world_clip_means_no_clip_scores(tiny_sd1_dir):
    assert load_clip_scorer(None, tiny_sd1_dir) is None
    with pytest.raises(OnewordError, match="--clip world needs"):
        load_clip_scorer("world", tiny_sd1_dir)
    with pytest.raises(OnewordError, match="expected world, open_clip"):
        load_clip_scorer("clip:nope", tiny_sd1_dir)


def test_transformers_clip_and_dino_folders(tmp_path):
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        ViTConfig,
        ViTImageProcessor,
        ViTModel,
    )

    from oneword.tokenizer import write_clip_tokenizer

    torch.manual_seed(0)
    text = {
        "vocab_size": 49408,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
    }
    vision = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "image_size": 32,
        "patch_size": 8,
    }
    CLIPModel(
        CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
    ).save_pretrained(tmp_path / "clip")
    write_clip_tokenizer(tmp_path / "clip")
    CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    ).save_pretrained(tmp_path / "clip")
    ViTModel(
        ViTConfig(
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            image_size=32,
            patch_size=8,
        )
    ).save_pretrained(tmp_path / "dino")
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path / "dino")

    star, ring = _shapes()
    clip = load_clip_scorer(f"transformers:{tmp_path / 'clip'}", None)
    features = clip.image_features([star, star, ring])
    assert features.shape == (3, 16)
    assert pairwise_similarity(features[:1], features[1:2]) == pytest.approx(1.0, abs=1e-5)
    assert clip.text_features(["a photo of on the left"]).shape == (1, 16)
    dino = load_dino_scorer(tmp_path / "dino")
    features = dino.image_features([star, star, ring])
    assert features.shape == (3, 32)
    assert pairwise_similarity(features[:1], features[1:2]) == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(OnewordError, match="no config.json"):
        load_dino_scorer(tmp_path)


def test_open_clip_from_a_local_folder(tmp_path):
    import open_clip.model
    from safetensors.torch import save_file

    config = {
        "embed_dim": 16,
        "vision_cfg": {
            "image_size": 32,
            "layers": 1,
            "width": 32,
            "patch_size": 8,
            "head_width": 16,
        },
        "text_cfg": {
            "context_length": 77,
            "vocab_size": 49408,
            "width": 32,
            "heads": 2,
            "layers": 1,
        },
    }
    folder = tmp_path / "oc"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": config}))
    torch.manual_seed(0)
    state = open_clip.model.CLIP(**config).state_dict()
    save_file(
        {k: v.contiguous() for k, v in state.items()}, str(folder / "open_clip_model.safetensors")
    )
    scorer = load_clip_scorer(f"open_clip:tiny:{folder}", None)
    star, ring = _shapes()
    features = scorer.image_features([star, star, ring])
    assert features.shape == (3, 16)
    assert pairwise_similarity(features[:1], features[1:2]) == pytest.approx(1.0, abs=1e-5)
    assert scorer.text_features(["a red star"]).shape == (1, 16)


def test_peak_memory_is_measured():
    assert peak_memory_mib("cpu") > 10  # the interpreter and torch alone take more


# ---------------------------------------------------------------------------------------
# The harness


@pytest.fixture(scope="module")
def world_suite(tmp_path_factory):
    return write_world_suite(
        tmp_path_factory.mktemp("suite") / "suite", images_per_concept=2, identities=HELD_OUT[:2]
    )


QUICK = ["--concepts", "1", "--samples", "1", "--steps", "2", "--device", "cpu", "--quiet"]


def _metrics(results: dict) -> dict:
    keep = (*QUALITY_METRICS, "per_attribute")
    return {
        label: [{k: row[k] for k in keep} for row in method["per_concept"]]
        + [{k: method[k] for k in keep}]
        for label, method in results["methods"].items()
    }


@pytest.mark.slow
def test_eval_on_the_tiny_world_writes_the_report_and_is_deterministic(
    tiny_world_dir, world_suite, tmp_path, capsys
):
    args = ["eval", "--model", str(tiny_world_dir), "--suite", str(world_suite)]
    args += ["--methods", "classword,classic:2", "--grid-concepts", "1", *QUICK]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert "| classic:2 |" in capsys.readouterr().out
    results = json.loads((tmp_path / "a" / "results.json").read_text())

    # 1. The fields, for both methods.
    for key in ("model", "suite", "seed", "device", "samples", "commit", "date"):
        assert key in results
    assert results["device"] == "cpu" and results["samples"] == 1 and results["oracle"] is True
    assert results["clip"] == "world" and results["dino"] is None
    assert len(results["checkpoints"]["model"]) == 64  # the weights it ran on, SHA-256
    assert results["checkpoints"]["encoder"] is None  # no encoder method ran
    assert "- checkpoints (SHA-256" in (tmp_path / "a" / "results.md").read_text()
    assert list(results["methods"]) == ["classword", "classic:2"]
    for label, method in results["methods"].items():
        for key in (
            *QUALITY_METRICS,
            "seconds_per_concept",
            "unet_passes_per_concept",
            "peak_memory_mib",
            "per_concept",
        ):
            assert key in method, (label, key)
        assert 0 <= method["identity"] <= 1 and 0 <= method["editability"] <= 1
        assert -1 <= method["clip_i"] <= 1 and -1 <= method["clip_t"] <= 1
        assert method["dino"] is None
        assert method["peak_memory_mib"] > 0
        assert len(method["per_concept"]) == 1
        assert (tmp_path / "a" / method["grid"]).is_file()
    assert results["methods"]["classword"]["unet_passes_per_concept"] == 0
    assert results["methods"]["classic:2"]["unet_passes_per_concept"] == 2
    assert results["methods"]["classic:2"]["steps"] == 2
    row = results["methods"]["classic:2"]["per_concept"][0]
    assert row["concept"] == HELD_OUT[0].name and row["word"].startswith("<m1c")
    # identity is over the one "a photo of S*" sample; editability over one sample per edit
    assert row["identity_samples"] == 1 and row["edit_samples"] >= 8
    assert (
        tmp_path / "a" / "embeddings" / "classic-2" / f"{HELD_OUT[0].name}.safetensors"
    ).is_file()
    assert (tmp_path / "a" / "grids" / "classword.png").is_file()
    assert Image.open(tmp_path / "a" / "tradeoff.png").size[0] > 300
    table = (tmp_path / "a" / "results.md").read_text()
    assert "| classword |" in table and "| classic:2 |" in table and "position" in table
    # The fallback check scores learned tokens only: the class word has no placeholder.
    assert row["check_score"] > 0 and math.isfinite(row["check_score"])
    assert results["methods"]["classword"]["per_concept"][0]["check_score"] is None
    assert results["methods"]["classword"]["fallback"] is None
    rates = results["methods"]["classic:2"]["fallback"]
    assert rates["right"] + rates["wrong"] == 1
    # --check auto: the world has its own CLIP, so the CLIP check at encode's threshold.
    assert results["config"]["check"] == "clip" and rates["threshold"] == THRESHOLDS["clip"]
    assert "Fallback check" in table and Image.open(tmp_path / "a" / "check.png").size[0] > 300

    # 2. The same seed on the CPU gives the same numbers.
    assert main([*args, "--out", str(tmp_path / "b")]) == 0
    again = json.loads((tmp_path / "b" / "results.json").read_text())
    assert _metrics(again) == _metrics(results)


@pytest.mark.slow
def test_dreambooth_layout_and_a_registered_method(tiny_world_dir, tmp_path, monkeypatch):
    from oneword.tokens import add_placeholder

    # DreamBooth's published layout: subject folders beside prompts_and_classes.txt.
    (tmp_path / "db" / "shape").mkdir(parents=True)
    for i, image in enumerate(_shapes()):
        image.save(tmp_path / "db" / "shape" / f"{i:02d}.jpg")
    (tmp_path / "db" / "prompts_and_classes.txt").write_text(
        "Classes\n\nsubject_name,class\nshape,star\n\nObject Prompts\n\n"
        "'a {0} {1} on a green background'.format(unique_token, class_token),\n"
    )
    calls = []

    def probe(model, concept, run):  # a method that learns nothing but adds a real token
        calls.append((concept.name, run.token, len(run.images), run.arg))
        placeholder = add_placeholder(model, run.token, concept.class_word)
        return LearnedToken(run.token, [placeholder], {"unet_forward_passes": 7})

    monkeypatch.setitem(METHODS, "probe", probe)
    config = EvalConfig(
        methods=("classword", "probe:x"), samples=2, steps=1, device="cpu", quiet=True
    )
    results = evaluate(str(tiny_world_dir), tmp_path / "db", config, tmp_path / "out")
    assert calls == [("shape", "<m1c0000>", 2, "x")]
    for method in results["methods"].values():
        assert method["identity"] is None and method["editability"] is None  # no ground truth
        assert method["per_attribute"] is None
        assert method["clip_i"] is not None and method["clip_t"] is not None
    assert results["oracle"] is False
    assert results["methods"]["probe:x"]["unet_passes_per_concept"] == 7
    # The probe token starts at the class word's embedding, so its samples match classword's.
    assert results["methods"]["probe:x"]["clip_i"] == pytest.approx(
        results["methods"]["classword"]["clip_i"], abs=1e-4
    )
    assert (tmp_path / "out" / "results.md").is_file() and (
        tmp_path / "out" / "tradeoff.png"
    ).is_file()


def test_unknown_method_and_missing_suite_fail_before_any_work(
    tiny_world_dir, world_suite, tmp_path, capsys
):
    with pytest.raises(
        OnewordError,
        match=r"unknown method 'nope'.*known: classic, classword, encoder, encoder\+refine",
    ):
        parse_methods("classword,nope")
    with pytest.raises(OnewordError, match="positive step count"):
        parse_methods("classword,classic:4OO")  # before any work, not after classword ran
    with pytest.raises(OnewordError, match="takes no argument"):
        parse_methods("classword:3")
    with pytest.raises(OnewordError, match="listed twice"):
        parse_methods("classic:5,classic:5")
    assert parse_methods("classword, classic:50")[1][0] == "classic:50"

    base = ["eval", "--model", "/nonexistent/model", "--out", str(tmp_path / "out")]
    assert main([*base, "--suite", str(world_suite), "--methods", "classword,nope"]) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err
    assert main([*base, "--suite", str(tmp_path / "no-suite")]) == 2
    err = capsys.readouterr().err
    assert "no-suite does not exist" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_fallback_rates_split_concepts_by_identity_and_flag_scores_above_the_threshold():
    rows = [
        {"concept": "a", "identity": 0.9, "check_score": 0.95},  # right, kept
        {"concept": "b", "identity": 0.6, "check_score": 1.2},  # right, sent back
        {"concept": "c", "identity": 0.1, "check_score": 1.01},  # wrong, caught
        {"concept": "d", "identity": 0.0, "check_score": 0.9},  # wrong, missed
        {"concept": "e", "identity": 0.0, "check_score": float("nan")},  # NaN: caught
        {"concept": "f", "identity": None, "check_score": 2.0},  # no oracle: not counted
    ]
    rates = fallback_rates(rows, threshold=1.0, right_identity=0.5)
    assert (rates["right"], rates["right_flagged"]) == (2, 1)
    assert (rates["wrong"], rates["wrong_flagged"]) == (3, 2)
    assert rates["flagged_wrong"] == ["c", "e"] and rates["flagged_right"] == ["b"]
    assert fallback_rates(rows, threshold=1.3, right_identity=0.5)["wrong_flagged"] == 1
    assert fallback_rates([{"concept": "x", "identity": 1.0, "check_score": None}], 1, 0.5) is None


def test_report_without_any_quality_metric():
    results = {
        "suite": "s", "model": "m", "device": "cpu", "samples": 1, "seed": 0,
        "methods": {"classword": {"method": "classword", "identity": None, "editability": None, "clip_i": None, "clip_t": None, "dino": None, "seconds_per_concept": 0.0, "unet_passes_per_concept": 0, "peak_memory_mib": None}},
    }  # fmt: skip
    table = format_table(results)
    assert "| classword | – | – | – | – | – | 0.00 | 0 | – |" in table
    assert plot_tradeoff(results, "/nonexistent/never-written.png") is None


def test_clip_t_scores_each_sample_against_its_prompt_without_the_token():
    from oneword.datasets.suite import SuiteConcept
    from oneword.evaluation.harness import _Reference, _score, _Scorers
    from oneword.evaluation.metrics import ImageTextScorer

    seen = []

    def encode_texts(texts):
        seen.extend(texts)
        return torch.ones(len(texts), 4)

    scorer = ImageTextScorer("fake", lambda images: torch.ones(len(images), 4), encode_texts)
    concept = SuiteConcept(
        "c", [], "star", ["a photo of {} on a green background", "{} on the left"]
    )
    samples = [Image.new("RGB", (8, 8))] * 6  # 2 per prompt: identity, then the two prompts
    reference = _Reference([], scorer.image_features(samples[:1]), None)
    row = _score(concept, samples, reference, _Scorers(None, scorer, None), per_prompt=2)
    assert seen == ["a photo of on a green background"] * 2 + ["on the left"] * 2
    assert row["clip_t"] == pytest.approx(1.0) and row["clip_i"] == pytest.approx(1.0)
    assert row["identity"] is None and row["dino"] is None


@pytest.mark.slow
def test_a_concept_scores_the_same_alone_or_after_others(tiny_world_dir, world_suite, tmp_path):
    # One model serves every concept (each with its own token): the tokens learned before
    # a concept must not change what it learns or how its samples score.
    from safetensors.torch import load_file

    alone = write_world_suite(tmp_path / "alone", images_per_concept=2, identities=HELD_OUT[1:2])
    config = EvalConfig(methods=("classic:2",), samples=1, steps=2, device="cpu", quiet=True)
    both = evaluate(str(tiny_world_dir), world_suite, config, tmp_path / "both")
    one = evaluate(str(tiny_world_dir), alone, config, tmp_path / "one")
    keep = (*QUALITY_METRICS, "per_attribute")
    second = both["methods"]["classic:2"]["per_concept"][1]
    only = one["methods"]["classic:2"]["per_concept"][0]
    assert second["concept"] == only["concept"] == HELD_OUT[1].name
    assert {k: second[k] for k in keep} == {k: only[k] for k in keep}
    name = f"{HELD_OUT[1].name}.safetensors"
    rows_both = next(
        iter(load_file(tmp_path / "both" / "embeddings" / "classic-2" / name).values())
    )
    rows_one = next(iter(load_file(tmp_path / "one" / "embeddings" / "classic-2" / name).values()))
    torch.testing.assert_close(rows_both, rows_one, atol=0, rtol=0)


@pytest.mark.slow
def test_identity_samples_continue_the_identity_prompts_seeds(
    tiny_world_dir, world_suite, tmp_path
):
    # --samples 1 --identity-samples 3: identity and CLIP-I read the identity prompt's
    # samples of seeds 0-2, exactly as --samples 3 does; the edit prompts keep one sample.
    def run(name: str, **kwargs) -> dict:
        config = EvalConfig(methods=("classword",), concepts=1, steps=2, device="cpu",
                            quiet=True, check="none", **kwargs)  # fmt: skip
        results = evaluate(str(tiny_world_dir), world_suite, config, tmp_path / name)
        return results["methods"]["classword"]["per_concept"][0] | {"_all": results}

    one, three = run("one", samples=1), run("three", samples=3)
    extra = run("extra", samples=1, identity_samples=3)
    assert extra["identity_samples"] == 3 and one["identity_samples"] == 1
    assert extra["_all"]["identity_samples"] == 3 and one["_all"]["identity_samples"] is None
    assert (
        "1 samples per prompt (3 of the identity prompt)"
        in (tmp_path / "extra" / "results.md").read_text()
    )
    assert three["clip_i"] != pytest.approx(one["clip_i"], abs=1e-6)  # the extra ones count
    for key in ("identity", "clip_i"):
        assert extra[key] == pytest.approx(three[key], abs=1e-6)
    for key in ("editability", "clip_t", "edit_samples"):
        assert extra[key] == pytest.approx(one[key], abs=1e-6)
    with pytest.raises(OnewordError, match="--identity-samples must be an integer >= --samples"):
        EvalConfig(samples=2, identity_samples=1).check_values()


@pytest.mark.slow
def test_classic_step_counts_share_one_run_and_equal_separate_runs(
    tiny_world_dir, world_suite, tmp_path
):
    # classic:1 and classic:3 in one evaluation: one 3-step run per concept, with a
    # snapshot at step 1 that must be the rows of a 1-step run (constant lr, one seed).
    from safetensors.torch import load_file

    def run(methods, out):
        config = EvalConfig(
            methods=methods, samples=1, steps=2, concepts=1, device="cpu", quiet=True
        )
        return evaluate(str(tiny_world_dir), world_suite, config, tmp_path / out)

    shared = run(("classic:1", "classic:3"), "shared")
    alone = run(("classic:1",), "alone")
    name = f"{HELD_OUT[0].name}.safetensors"

    def rows(out, label):
        state = load_file(str(tmp_path / out / "embeddings" / label / name))
        return torch.cat([value.flatten() for value in state.values()])

    assert torch.equal(rows("shared", "classic-1"), rows("alone", "classic-1"))
    assert not torch.equal(rows("shared", "classic-1"), rows("shared", "classic-3"))
    one, three = (shared["methods"][m]["per_concept"][0] for m in ("classic:1", "classic:3"))
    assert (one["unet_forward_passes"], three["unet_forward_passes"]) == (1, 3)
    assert one["cost"]["shared_run_steps"] == 3 and 0 < one["seconds"] < three["seconds"]
    assert shared["methods"]["classic:1"]["identity"] == alone["methods"]["classic:1"]["identity"]


class _Stop(Exception):
    pass


def _counting_invert(monkeypatch, stop_at: int | None = None) -> list:
    """Count the classic runs `oneword eval` starts; raise `_Stop` on the call `stop_at`."""
    import oneword.inversion

    real, calls = oneword.inversion.invert, []

    def invert(*args, **kwargs):
        calls.append(args[3])  # the concept's class word
        if stop_at is not None and len(calls) == stop_at:
            raise _Stop
        return real(*args, **kwargs)

    monkeypatch.setattr(oneword.inversion, "invert", invert)
    return calls


@pytest.mark.slow
def test_a_stopped_eval_resumes_where_it_stopped_with_the_same_results(
    tiny_world_dir, world_suite, tmp_path, monkeypatch
):
    from safetensors.torch import load_file

    config = EvalConfig(
        methods=("classword", "classic:1", "classic:2"),
        samples=1,
        steps=2,
        grid_concepts=2,
        device="cpu",
        quiet=True,
    )
    whole = evaluate(str(tiny_world_dir), world_suite, config, tmp_path / "whole")

    # 1. Stopped while learning the second concept: classword and the first concept's
    #    classic run are finished; results.json has only classword.
    out = tmp_path / "stopped"
    calls = _counting_invert(monkeypatch, stop_at=2)
    with pytest.raises(_Stop):
        evaluate(str(tiny_world_dir), world_suite, config, out)
    assert len(calls) == 2
    assert list(json.loads((out / "results.json").read_text())["methods"]) == ["classword"]

    # 2. Resumed: one classic run (the second concept), the same scores and rows as a
    #    run that was never stopped, and the grids of every method.
    calls = _counting_invert(monkeypatch)
    resumed = evaluate(str(tiny_world_dir), world_suite, config, out, resume=True)
    assert len(calls) == 1
    assert resumed["resumed_rows"] == 3  # classword x 2, classic:1 x 1
    assert _metrics(resumed) == _metrics(whole)
    for label in ("classic-1", "classic-2"):
        for concept in HELD_OUT[:2]:
            name = f"{concept.name}.safetensors"
            a = load_file(tmp_path / "whole" / "embeddings" / label / name)
            b = load_file(out / "embeddings" / label / name)
            assert a.keys() == b.keys()
            for key in a:
                torch.testing.assert_close(a[key], b[key], atol=0, rtol=0)
    for label in ("classword", "classic-1", "classic-2"):
        with (
            Image.open(out / "grids" / f"{label}.png") as grid,
            Image.open(tmp_path / "whole" / "grids" / f"{label}.png") as reference,
        ):
            assert grid.size == reference.size

    # 3. Resumed again when everything is finished: nothing is learned.
    calls = _counting_invert(monkeypatch)
    again = evaluate(str(tiny_world_dir), world_suite, config, out, resume=True)
    assert calls == [] and again["resumed_rows"] == 6
    assert _metrics(again) == _metrics(whole)

    # 4. Without resume the kept rows are dropped and everything is learned again.
    calls = _counting_invert(monkeypatch)
    evaluate(str(tiny_world_dir), world_suite, config, out)
    assert len(calls) == 2


def test_resume_refuses_a_run_with_other_settings(tiny_world_dir, world_suite, tmp_path):
    config = EvalConfig(
        methods=("classword",), samples=1, steps=2, concepts=1, device="cpu", quiet=True
    )
    evaluate(str(tiny_world_dir), world_suite, config, tmp_path / "e")
    kept = (tmp_path / "e" / "progress" / "run.json").read_text()
    other = replace(config, samples=2)
    with pytest.raises(OnewordError, match=r"--resume: .*samples: 1 there, 2 now"):
        evaluate(str(tiny_world_dir), world_suite, other, tmp_path / "e", resume=True)
    assert (tmp_path / "e" / "progress" / "run.json").read_text() == kept  # nothing lost


def test_resume_refuses_rows_of_an_encoder_since_replaced(
    tiny_world_dir, world_suite, tiny_encoder, tmp_path
):
    # A retrained encoder written to the same path: its rows must not mix with the old one's.
    encoder = tmp_path / "encoder.safetensors"
    shutil.copy(tiny_encoder, encoder)
    config = EvalConfig(
        methods=("encoder",), samples=1, steps=2, concepts=1, device="cpu", quiet=True,
        encoder=str(encoder),
    )  # fmt: skip
    evaluate(str(tiny_world_dir), world_suite, config, tmp_path / "e")
    again = evaluate(str(tiny_world_dir), world_suite, config, tmp_path / "e", resume=True)
    assert again["resumed_rows"] == 1  # the same file: its row is kept
    tensors, metadata = read_safetensors(encoder)
    tensors = {k: v + 0.01 if v.is_floating_point() else v for k, v in tensors.items()}
    save_file(tensors, str(encoder), metadata=metadata)
    with pytest.raises(OnewordError, match=r"--resume: .*checkpoints: "):
        evaluate(str(tiny_world_dir), world_suite, config, tmp_path / "e", resume=True)
    # A resume without encoder methods makes no encoder rows: it goes on, and the digest of
    # the encoder the kept rows came from stays on record, so its rows stay guarded.
    classword = replace(config, methods=("classword",))
    evaluate(str(tiny_world_dir), world_suite, classword, tmp_path / "e", resume=True)
    with pytest.raises(OnewordError, match=r"--resume: .*checkpoints: "):
        evaluate(str(tiny_world_dir), world_suite, config, tmp_path / "e", resume=True)
    # A run stored by a oneword that did not record the digests resumes as before.
    run_file = tmp_path / "e" / "progress" / "run.json"
    stored = json.loads(run_file.read_text())
    del stored["checkpoints"]
    run_file.write_text(json.dumps(stored))
    older = evaluate(str(tiny_world_dir), world_suite, config, tmp_path / "e", resume=True)
    assert older["resumed_rows"] == 2  # the encoder's row and the class word's


@pytest.mark.slow
def test_clip_check_scores_are_oneword_encodes(tiny_world_dir, world_suite, tmp_path):
    # --check clip: each token's score is what `oneword encode --check clip` computes for the
    # same rows and images (samples of "a photo of a S*" against the class word's).
    from oneword.embeddings import load_into_model
    from oneword.encoder.encode import ClipCheck, EncodeConfig
    from oneword.images import load_images
    from oneword.models import load_model

    config = EvalConfig(
        methods=("classic:2",),
        samples=1,
        steps=2,
        concepts=1,
        check="clip",
        quiet=True,
        device="cpu",
    )
    results = evaluate(str(tiny_world_dir), world_suite, config, tmp_path / "e")
    row = results["methods"]["classic:2"]["per_concept"][0]
    assert results["config"]["check"] == "clip"
    assert "`oneword encode --check clip`" in (tmp_path / "e" / "results.md").read_text()

    model = load_model(str(tiny_world_dir), device="cpu")
    placeholder = load_into_model(
        model,
        tmp_path / "e" / "embeddings" / "classic-2" / f"{HELD_OUT[0].name}.safetensors",
        token="<again>",
    )
    images = load_images(world_suite / HELD_OUT[0].name, model.resolution)
    class_word = json.loads((world_suite / HELD_OUT[0].name / "concept.json").read_text())[
        "class_word"
    ]
    check = ClipCheck(model, images, class_word, EncodeConfig(check="clip"))
    assert row["check_score"] == pytest.approx(check.score(placeholder), rel=1e-4)
    assert row["check_score"] != pytest.approx(1.0, abs=1e-6)  # not the class word's own


def test_concepts_selects_the_first_n_or_a_range_and_refuses_empty_ones():
    from oneword.evaluation.harness import concept_slice

    names = list("abcdef")
    assert names[concept_slice(None)] == names
    assert names[concept_slice(2)] == ["a", "b"] and names[concept_slice("2")] == ["a", "b"]
    assert names[concept_slice("2:4")] == ["c", "d"] and names[concept_slice("4:")] == ["e", "f"]
    for bad in (0, "0", "3:3", "4:2", "-1:2", "x", "1:2:3"):
        with pytest.raises(OnewordError, match="--concepts must be"):
            EvalConfig(concepts=bad).check_values()


def test_eval_refuses_an_unknown_check():
    with pytest.raises(OnewordError, match="--check must be one of auto, loss, clip, none"):
        EvalConfig(check="oracle").check_values()


def _merge_module(name: str = "merge_eval"):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_merge_eval_replaces_methods_run_by_run_and_refuses_other_settings(tmp_path):
    merge = _merge_module().merge

    def run(name: str, check: str, methods: dict, seed: int = 0, concepts=("a", "b")):
        base = {"suite": "s", "seed": seed, "samples": 4, "steps": 30, "guidance": 5.0}
        base["concepts"] = list(concepts)
        results = base | {"model": "m", "commit": name, "date": "d", "config": {"check": check},
                          "checkpoints": {"model": "m0", "encoder": f"sha-{name}"}}  # fmt: skip
        results["methods"] = {
            label: {"identity": value, "check_score": 0.9, "fallback": {"right": 1},
                    "per_concept": [{"check_score": 0.9}]}
            for label, value in methods.items()
        }  # fmt: skip
        folder = tmp_path / name
        folder.mkdir()
        (folder / "results.json").write_text(json.dumps(results))
        return folder

    old = run("old", "loss", {"classic:50": 0.3, "encoder": 0.2})
    new = run("new", "clip", {"encoder": 0.29})
    merged, _ = merge([old, new])
    assert list(merged["methods"]) == ["classic:50", "encoder"]
    assert merged["methods"]["encoder"]["identity"] == 0.29  # the later run wins
    assert merged["methods"]["encoder"]["source"]["run"] == str(new)
    # The header names the last run's files; each row keeps the files it was scored with.
    assert merged["checkpoints"]["encoder"] == "sha-new"
    assert merged["methods"]["classic:50"]["source"]["checkpoints"]["encoder"] == "sha-old"
    # Merged again, the rows keep their first sources.
    (tmp_path / "merged").mkdir()
    (tmp_path / "merged" / "results.json").write_text(json.dumps(merged))
    again, _ = merge([tmp_path / "merged", run("newer", "clip", {"classword": 0.0})])
    assert again["methods"]["encoder"]["source"]["run"] == str(new)
    assert again["methods"]["classword"]["source"]["run"] == str(tmp_path / "newer")
    # The table shows one check: the last run's; the other run's scores are dropped.
    assert merged["methods"]["encoder"]["fallback"] == {"right": 1}
    assert merged["methods"]["classic:50"]["fallback"] is None
    assert merged["methods"]["classic:50"]["per_concept"][0]["check_score"] is None
    with pytest.raises(OnewordError, match="seed is 1"):
        merge([old, run("other", "clip", {"encoder": 0.1}, seed=1)])
    with pytest.raises(OnewordError, match="concepts is"):  # other concepts: other averages
        merge([old, run("later", "clip", {"encoder": 0.1}, concepts=("c", "d"))])
    # Tagged runs keep their rows apart: two encoders' arms in one table.
    tagged, _ = merge([old, new], {old: "a", new: "b"})
    assert list(tagged["methods"]) == ["a/classic:50", "a/encoder", "b/encoder"]
    assert tagged["methods"]["a/encoder"]["identity"] == 0.2
    assert _merge_module()._short("a" * 40 + "+dirty + " + "b" * 40) == "aaaaaaa+dirty + bbbbbbb"


def test_merge_eval_drops_the_methods_it_is_told_to(tmp_path, capsys):
    main = _merge_module().main
    report = Path(__file__).resolve().parents[2] / "benchmarks/results/world-v3.1/eval/test-seed0"
    assert main([str(tmp_path / "out"), str(report), "--drop", "encoder+refine:50"]) == 0
    merged = json.loads((tmp_path / "out" / "results.json").read_text())
    assert "encoder+refine:50" not in merged["methods"] and "encoder+refine:25" in merged["methods"]
    assert not (tmp_path / "out" / "grids" / "encoder+refine-50.png").exists()
    assert "| encoder+refine:50 |" not in (tmp_path / "out" / "results.md").read_text()
    with pytest.raises(SystemExit):
        main([str(tmp_path / "other"), str(report), "--drop", "encoder+refine:7"])
    assert "no method encoder+refine:7" in capsys.readouterr().err


def test_merge_eval_rates_every_method_at_the_last_runs_threshold(tmp_path):
    merge = _merge_module().merge

    def run(name: str, threshold: float, label: str):
        rows = [{"concept": c, "identity": i, "check_score": s}
                for c, i, s in (("a", 0.0, 0.9), ("b", 1.0, 0.7), ("c", 1.0, 0.85))]  # fmt: skip
        results = {"suite": "s", "seed": 0, "samples": 4, "steps": 30, "guidance": 5.0,
                   "model": "m", "commit": name, "date": "d", "concepts": ["a", "b", "c"],
                   "config": {"check": "clip", "check_threshold": threshold, "right_identity": 0.5},
                   "methods": {label: {"per_concept": rows, "fallback": {"threshold": threshold}}}}  # fmt: skip
        folder = tmp_path / name
        folder.mkdir()
        (folder / "results.json").write_text(json.dumps(results))
        return folder

    merged, _ = merge([run("old", 0.8, "classic:50"), run("new", 0.875, "encoder")])
    for label in ("classic:50", "encoder"):  # at 0.875: the wrong one sent, no right one
        rates = merged["methods"][label]["fallback"]
        assert rates["threshold"] == 0.875
        assert (rates["wrong_flagged"], rates["right_flagged"]) == (1, 0)


def test_merge_eval_pools_disjoint_concept_sets_and_recomputes_the_means(tmp_path):
    pool = _merge_module().pool

    def run(name: str, concepts: list[str], methods: dict[str, list[float]]):
        results = {"suite": "s", "seed": 0, "samples": 4, "steps": 30, "guidance": 5.0,
                   "model": "m", "commit": name, "date": "d", "concepts": concepts,
                   "config": {"check": "clip", "check_threshold": 0.8, "right_identity": 0.5}}  # fmt: skip
        results["methods"] = {}
        for label, identities in methods.items():
            rows = [
                {"concept": c, "word": "w", "identity": i, "editability": i, "clip_i": i,
                 "clip_t": i, "dino": None, "per_attribute": {"shape": i}, "seconds": 1.0,
                 "unet_forward_passes": 2, "unet_samples": 2, "peak_memory_mib": 5.0,
                 "sampling_seconds": 1.0, "cost": {"steps": 2}, "check_score": 0.9 - i}
                for c, i in zip(concepts, identities)
            ]  # fmt: skip
            results["methods"][label] = {"identity": sum(identities) / len(identities),
                                         "per_concept": rows, "fallback": {}}  # fmt: skip
        folder = tmp_path / name
        folder.mkdir()
        (folder / "results.json").write_text(json.dumps(results))
        return folder

    first = run("first", ["a", "b"], {"classic": [1.0, 0.0], "encoder": [0.0, 0.0]})
    second = run("second", ["c", "d"], {"classic": [1.0, 1.0]})
    pooled, _, left_out = pool([first, second])
    assert list(pooled["methods"]) == ["classic"] and left_out == ["encoder"]
    classic = pooled["methods"]["classic"]
    assert classic["identity"] == pytest.approx(0.75) and classic["concepts"] == 4
    assert pooled["concepts"] == ["a", "b", "c", "d"]
    # The fallback rates are recomputed over all four concepts (score 0.9 - identity).
    assert classic["fallback"]["right"] == 3 and classic["fallback"]["wrong_flagged"] == 1
    with pytest.raises(OnewordError, match="disjoint"):
        pool([first, run("overlap", ["b", "e"], {"classic": [1.0, 0.0]})])


def test_compare_arms_pairs_each_arm_with_the_baseline_over_shared_concepts(tmp_path, capsys):
    compare_arms = _merge_module("compare_arms")

    def run(name: str, rows: dict[str, dict[str, float]], seed: int = 0):
        results = {"suite": "s", "seed": seed, "samples": 2, "steps": 30, "guidance": 5.0,
                   "model": "m", "methods": {"encoder": {"per_concept": [
                       {"concept": c, "identity": i, "editability": i / 2} for c, i in rows.items()
                   ]}, "encoder+refine:10": {"per_concept": [
                       {"concept": c, "identity": i / 2, "editability": i / 4} for c, i in rows.items()
                   ]}}}  # fmt: skip
        folder = tmp_path / name
        folder.mkdir()
        (folder / "results.json").write_text(json.dumps(results))
        return folder

    base = run("base", {"a": 0.0, "b": 0.5, "c": 0.5})
    # The arm in two halves: "c" has no arm row and "d" no baseline row.
    half_a, half_b = run("arm-a", {"a": 0.5, "b": 1.0}), run("arm-b", {"d": 1.0})
    out = tmp_path / "arms.md"
    args = ["--baseline", f"base={base}", f"arm={half_a},{half_b}", "--out", str(out)]
    assert compare_arms.main(args) == 0
    table = out.read_text()
    assert table == capsys.readouterr().out
    # Paired over a and b: differences +0.5 and +0.5 (no spread); editability half of it.
    assert "| arm | encoder | 2 | 75.0% | 37.5% | +50.0 ± 0.0 | +25.0 ± 0.0 |" in table
    assert "| base | encoder | 3 | 33.3% | 16.7% | – | – |" in table
    # Every method against one of the baseline's: the arm alone against its refined rows
    # (a: 0.5 - 0, b: 1.0 - 0.25).
    by_one = [*args[:3], "--baseline-method", "encoder+refine:10"]
    assert compare_arms.main(by_one) == 0
    assert "| arm | encoder | 2 | 75.0% | 37.5% | +62.5 ± 12.5 | +31.2 ± 6.2 |" in (
        capsys.readouterr().out
    )
    assert compare_arms.main([*args[:3], "--baseline-method", "classic:10"]) == 2
    assert "base has no classic:10 rows" in capsys.readouterr().err
    # Overlapping halves and other settings are refused with the file named.
    assert compare_arms.main(["--baseline", f"base={base}", f"arm={half_a},{half_a}"]) == 2
    assert "scored a again" in capsys.readouterr().err
    other = run("other", {"a": 1.0}, seed=1)
    assert compare_arms.main(["--baseline", f"base={base}", f"arm={other}"]) == 2
    assert "seed is 1" in capsys.readouterr().err


def test_tradeoff_labels_of_coincident_points_do_not_overlap():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from oneword.evaluation.report import _place_labels

    figure = Figure(figsize=(4, 3))
    FigureCanvasAgg(figure)
    ax = figure.subplots()
    points = [(0.3 + 0.001 * i, 0.3, f"classic:{50 * (i + 1)}", "C0") for i in range(6)]
    points.append((0.45, 0.26, "encoder", "C1"))
    ax.plot([0, 1], [0, 1], ".")
    figure.draw_without_rendering()
    _place_labels(ax, points)
    figure.draw_without_rendering()
    renderer = figure.canvas.get_renderer()
    from matplotlib.text import Text

    # The text's own box (an Annotation's extent would include its leader line).
    boxes = [Text.get_window_extent(text, renderer) for text in ax.texts]
    assert len(boxes) == 7
    for i, a in enumerate(boxes):
        for b in boxes[i + 1 :]:
            assert not a.overlaps(b), (a, b)
    # No label runs through another point's marker (the lone point sits where a label
    # shifted below the pile would otherwise go).
    for x, y, text, _ in points:
        px, py = ax.transData.transform((x, y))
        for label, box in zip(ax.texts, boxes):
            if label.get_text() != text:
                assert not box.contains(px, py), (text, label.get_text())


def test_tradeoff_curves_join_step_counts_of_one_method_and_setting():
    from oneword.evaluation.report import curves

    def method(name, arg, steps, x):
        return {"method": name, "arg": arg, "steps": steps, "identity": x, "editability": 0.5}

    methods = {
        "encoder+refine:50": method("encoder+refine", "50", 50, 0.3),
        "encoder+refine:10": method("encoder+refine", "10", 10, 0.2),
        "encoder+refine:50:l2=0": method("encoder+refine", "50:l2=0", 50, 0.4),
        "classic:500": method("classic", "500", 500, 0.6),
        "classword": {"method": "classword", "arg": None, "identity": None},
    }
    found = curves(methods, "identity", "editability")
    assert [p[3] for p in found["encoder+refine"]] == ["encoder+refine:10", "encoder+refine:50"]
    assert [p[3] for p in found["encoder+refine l2=0"]] == ["encoder+refine:50:l2=0"]
    assert list(found) == ["encoder+refine", "encoder+refine l2=0", "classic"]
