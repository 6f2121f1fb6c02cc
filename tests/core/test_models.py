"""Model loading and the tiny offline pipelines."""

from __future__ import annotations

import pytest
import torch

from oneword.errors import ModelLoadError
from oneword.models import detect_family, load_model
from oneword.tokenizer import CLIP_VOCAB_SIZE, load_clip_tokenizer, write_clip_tokenizer


def test_clip_tokenizer_matches_open_clip(tmp_path):
    import open_clip

    tokenizer = load_clip_tokenizer(write_clip_tokenizer(tmp_path / "tok"))
    assert len(tokenizer) == CLIP_VOCAB_SIZE
    text = "a photo of a teal hexagon, striped! on the left"
    ids = tokenizer(text).input_ids
    reference = open_clip.get_tokenizer("ViT-B-32")(text)[0][: len(ids)].tolist()
    assert ids == reference
    assert tokenizer.model_max_length == 77
    assert len(tokenizer("x", padding="max_length").input_ids) == 77


@pytest.mark.parametrize(
    ("fixture", "family", "widths", "prediction"),
    [
        ("tiny_sd1_dir", "sd1", [32], "epsilon"),
        ("tiny_sd2_dir", "sd2", [40], "v_prediction"),
        ("tiny_sdxl_dir", "sdxl", [32, 48], "epsilon"),
    ],
)
def test_load_model_reports_the_family(request, fixture, family, widths, prediction):
    model = load_model(request.getfixturevalue(fixture), device="cpu")
    facts = model.describe()
    assert facts["family"] == family
    assert facts["widths"] == widths
    assert facts["prediction_type"] == prediction
    assert facts["resolution"] == 32 and facts["vocab_size"] == CLIP_VOCAB_SIZE
    assert model.dtype == torch.float32  # fp32 on the CPU
    assert not any(p.requires_grad for p in model.unet.parameters())


def test_diffusers_loads_the_tiny_pipelines(tiny_sd1_dir, tiny_sdxl_dir):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    for cls, folder in [
        (StableDiffusionPipeline, tiny_sd1_dir),
        (StableDiffusionXLPipeline, tiny_sdxl_dir),
    ]:
        pipe = cls.from_pretrained(folder, local_files_only=True)
        pipe.set_progress_bar_config(disable=True)
        image = pipe(
            "a cat",
            num_inference_steps=2,
            height=32,
            width=32,
            output_type="np",
            generator=torch.Generator().manual_seed(0),
        ).images
        assert image.shape == (1, 32, 32, 3)
        assert pipe.tokenizer.model_max_length == 77


def test_bad_model_sources_are_clear(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="local diffusers folder"):
        load_model("someone/some-model", device="cpu")
    with pytest.raises(ModelLoadError, match="model_index.json"):
        load_model(tmp_path, device="cpu")
    with pytest.raises(ModelLoadError, match="not found"):
        load_model(str(tmp_path / "missing"), device="cpu")


def test_missing_part_is_named(tiny_sd1_dir, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_sd1_dir, broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(ModelLoadError, match="vae"):
        load_model(broken, device="cpu")


def test_detect_family_rules():
    assert detect_family({"text_encoder_2": ["transformers", "X"]}, {"hidden_size": 768}) == "sdxl"
    assert detect_family({}, {"hidden_size": 1024, "hidden_act": "gelu"}) == "sd2"
    assert detect_family({}, {"hidden_size": 768, "hidden_act": "quick_gelu"}) == "sd1"
    assert detect_family({"text_encoder_2": [None, None]}, {"hidden_size": 768}) == "sd1"
