"""SD 3.x and FLUX.1: the tiny offline pipelines, loading, `oneword info`."""

from __future__ import annotations

import json

import pytest
import torch

from oneword.errors import ModelLoadError
from oneword.models import load_model
from oneword.tiny import T5_PIECES, T5_ROWS
from oneword.tokenizer import CLIP_VOCAB_SIZE, T5_MAX_LENGTH


@pytest.mark.parametrize(
    ("fixture", "pipeline_class", "widths"),
    [
        ("tiny_sd3_dir", "StableDiffusion3Pipeline", [32, 48, 96]),
        ("tiny_flux_dir", "FluxPipeline", [32, 64]),
    ],
)
def test_diffusers_loads_and_samples_the_tiny_flow_pipelines(
    request, fixture, pipeline_class, widths
):
    import diffusers

    folder = request.getfixturevalue(fixture)
    pipe = getattr(diffusers, pipeline_class).from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.vae.config.latent_channels == 16
    t5 = (
        pipe.text_encoder_3
        if pipeline_class.startswith("StableDiffusion3")
        else pipe.text_encoder_2
    )
    t5_tokenizer = (
        pipe.tokenizer_3 if pipeline_class.startswith("StableDiffusion3") else pipe.tokenizer_2
    )
    assert type(t5).__name__ == "T5EncoderModel"
    assert len(t5_tokenizer) == T5_PIECES and t5.config.vocab_size == T5_ROWS
    assert t5_tokenizer.model_max_length == T5_MAX_LENGTH
    # SentencePiece: words become "▁"-prefixed pieces, and the sequence ends with </s> (id 1).
    ids = t5_tokenizer("a photo of a dog").input_ids
    assert ids[-1] == 1 and all(i < T5_PIECES for i in ids)
    assert t5_tokenizer.convert_ids_to_tokens(ids[0]).startswith("▁")
    assert len(pipe.tokenizer) == CLIP_VOCAB_SIZE
    image = pipe(
        "a cat",
        num_inference_steps=2,
        height=32,
        width=32,
        max_sequence_length=32,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert image.shape == (1, 32, 32, 3) and float(image.std()) > 0


@pytest.mark.parametrize(
    ("fixture", "family", "widths", "keys"),
    [
        ("tiny_sd3_dir", "sd3", [32, 48, 96], ("clip_l", "clip_g", "t5")),
        ("tiny_flux_dir", "flux", [32, 64], ("clip_l", "t5")),
    ],
)
def test_load_model_recognises_flow_families(request, fixture, family, widths, keys):
    model = load_model(request.getfixturevalue(fixture), device="cpu")
    facts = model.describe()
    assert facts["family"] == family and model.is_flow
    assert facts["widths"] == widths and model.encoder_keys == keys
    assert facts["prediction_type"] == "flow_matching"
    assert facts["resolution"] == 32 and facts["latent_channels"] == 16
    assert facts["denoiser"] == (
        "SD3Transformer2DModel" if family == "sd3" else "FluxTransformer2DModel"
    )
    assert facts["text_encoders"][-1].startswith("t5: T5EncoderModel, width")
    assert facts["guidance_embeds"] is (family == "flux")
    assert model.max_sequence_length == (256 if family == "sd3" else 512)
    assert model.shift_factor == pytest.approx(0.0609 if family == "sd3" else 0.1159)
    assert not any(p.requires_grad for p in model.unet.parameters())
    assert not any(p.requires_grad for te in model.text_encoders for p in te.parameters())


def test_oneword_info_reports_flux(tiny_flux_dir, capsys):
    from oneword.cli import main

    assert main(["info", str(tiny_flux_dir), "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["family"] == "flux" and facts["widths"] == [32, 64]
    assert "dynamic" in facts["timestep_shift"]
    assert main(["info", str(tiny_flux_dir)]) == 0
    text = capsys.readouterr().out
    assert "clip_l: CLIPTextModel, width 32, 77 tokens; t5: T5EncoderModel, width 64" in text


def test_flow_folder_problems_are_one_line(tiny_flux_dir, tmp_path, monkeypatch):
    import shutil

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="local diffusers folder"):
        load_model("black-forest-labs/FLUX.1-dev", device="cpu")
    broken = tmp_path / "no-t5"
    shutil.copytree(tiny_flux_dir, broken)
    index = json.loads((broken / "model_index.json").read_text())
    index["text_encoder_2"] = [None, None]
    (broken / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match="no T5 text encoder"):
        load_model(broken, device="cpu")
    index["transformer"] = ["diffusers", "HunyuanDiT2DModel"]
    (broken / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match="unsupported denoiser 'HunyuanDiT2DModel'"):
        load_model(broken, device="cpu")
