"""SD 3.x / FLUX.1 embedding files: clip_l, clip_g and t5 keys; loaded back by diffusers'
FluxPipeline (one call per encoder) and by oneword's own `generate`; exports."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from oneword.cli import main
from oneword.embeddings import (
    TokenEmbedding,
    export_embedding,
    load_embedding,
    load_into_model,
    load_into_pipeline,
    save_embedding,
)
from oneword.errors import EmbeddingFileError
from oneword.inversion import InversionConfig, invert
from oneword.models import load_model
from oneword.prompts import encode_prompts
from oneword.tokens import expand_prompt, get_rows


def _images(n: int = 2, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray((rng.random((32, 32, 3)) * 255).astype("uint8")) for _ in range(n)]


@pytest.fixture(scope="module")
def flux_token(tiny_flux_dir, tmp_path_factory):
    """A 2-vector token learned on the tiny FLUX model, and the model that learned it."""
    out = tmp_path_factory.mktemp("flux-run")
    model = load_model(tiny_flux_dir, device="cpu")
    config = InversionConfig(
        steps=2, batch=2, vectors=2, quiet=True, sample_steps=2, sample_seeds=1
    )
    result = invert(model, _images(), "<my-cat>", "cat", config, out)
    return model, result, out


def test_flux_file_has_clip_l_and_t5_and_a_sample_grid(flux_token):
    model, result, out = flux_token
    tensors = load_file(out / "learned_embeds.safetensors")
    assert sorted(tensors) == ["clip_l", "t5"]
    assert tensors["clip_l"].shape == (2, 32) and tensors["t5"].shape == (2, 64)
    assert torch.equal(tensors["t5"], result.vectors[1])
    emb = load_embedding(out / "learned_embeds.safetensors")
    assert emb.family_guess == "flux" and emb.encoder_keys == ("clip_l", "t5")
    assert emb.metadata["model_family"] == "flux" and emb.token == "<my-cat>"
    assert Image.open(out / "samples.png").size[0] == 32


def test_diffusers_flux_pipeline_loads_the_file(flux_token, tiny_flux_dir):
    """The README's snippet: one load_textual_inversion per text encoder; the pipeline then
    encodes the prompt exactly as oneword did during training."""
    from diffusers import FluxPipeline

    model, result, out = flux_token
    pipe = FluxPipeline.from_pretrained(tiny_flux_dir, local_files_only=True)
    state = load_file(out / "learned_embeds.safetensors")
    tokens = ["<my-cat>", "<my-cat>_1"]
    pipe.load_textual_inversion(
        state["clip_l"], token=tokens, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer
    )
    pipe.load_textual_inversion(
        state["t5"], token=tokens, text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2
    )
    prompt = "a photo of <my-cat> on the grass"
    with torch.no_grad():
        hidden, pooled, _ = pipe.encode_prompt(prompt, prompt_2=None, max_sequence_length=512)
        ours = encode_prompts(model, [expand_prompt(prompt, [result.placeholder])])
    torch.testing.assert_close(pooled, ours.pooled, atol=1e-5, rtol=0)
    torch.testing.assert_close(hidden, ours.hidden, atol=1e-4, rtol=0)
    # The word matters: without the token the T5 features differ.
    with torch.no_grad():
        plain, _, _ = pipe.encode_prompt("a photo of cat on the grass", prompt_2=None)
    assert (plain - hidden).abs().max() > 1e-3


def test_load_into_pipeline_for_flux_and_refusals(flux_token, tiny_flux_dir, tiny_sd3_dir):
    import diffusers

    _, result, out = flux_token
    pipe = diffusers.FluxPipeline.from_pretrained(tiny_flux_dir, local_files_only=True)
    assert load_into_pipeline(pipe, out / "learned_embeds.safetensors") == "<my-cat>"
    assert pipe.tokenizer_2("<my-cat>_1", add_special_tokens=False).input_ids == [
        len(pipe.tokenizer_2) - 1
    ]
    sd3 = diffusers.StableDiffusion3Pipeline.from_pretrained(tiny_sd3_dir, local_files_only=True)
    with pytest.raises(EmbeddingFileError, match="no load_textual_inversion"):
        load_into_pipeline(sd3, out / "learned_embeds.safetensors")


def test_sd3_round_trip_through_oneword(tiny_sd3_dir, tmp_path):
    model = load_model(tiny_sd3_dir, device="cpu")
    config = InversionConfig(steps=2, batch=2, quiet=True, samples=False)
    result = invert(model, _images(), "<my-cup>", "cup", config, tmp_path / "run")
    path = tmp_path / "run" / "learned_embeds.safetensors"
    assert sorted(load_file(path)) == ["clip_g", "clip_l", "t5"]
    fresh = load_model(tiny_sd3_dir, device="cpu")
    placeholder = load_into_model(fresh, path)
    for learned, loaded in zip(result.vectors, get_rows(fresh, placeholder)):
        assert torch.equal(learned, loaded)
    # oneword generate samples with the token through StableDiffusion3Pipeline.
    grid = tmp_path / "grid.png"
    code = main(
        ["generate", "--model", str(tiny_sd3_dir), "--embedding", str(path)]
        + ["--prompt", "a photo of <my-cup>", "--num", "2", "--steps", "2", "--device", "cpu"]
        + ["--out", str(grid)]
    )
    assert code == 0 and Image.open(grid).size[0] == 64


def test_exports(tmp_path):
    generator = torch.Generator().manual_seed(0)
    sd3 = TokenEmbedding(
        "<t>",
        [torch.randn(1, w, generator=generator) for w in (32, 48, 96)],
        keys=("clip_l", "clip_g", "t5"),
    )
    flux = TokenEmbedding(
        "<f>", [torch.randn(2, w, generator=generator) for w in (32, 64)], keys=("clip_l", "t5")
    )
    save_embedding(tmp_path / "sd3.safetensors", sd3)
    save_embedding(tmp_path / "flux.safetensors", flux)
    # A1111's SD3 path reads clip_l and clip_g only.
    export_embedding(tmp_path / "sd3.safetensors", "a1111", tmp_path / "sd3-a1111.safetensors")
    a1111 = load_file(tmp_path / "sd3-a1111.safetensors")
    assert sorted(a1111) == ["clip_g", "clip_l"]
    assert torch.equal(a1111["clip_g"], sd3.vectors[1])
    assert load_embedding(tmp_path / "sd3-a1111.safetensors").family_guess == "sd3"
    with pytest.raises(EmbeddingFileError, match="AUTOMATIC1111 reads no FLUX embeddings"):
        export_embedding(tmp_path / "flux.safetensors", "a1111", tmp_path / "x.safetensors")
    with pytest.raises(EmbeddingFileError, match="kohya's sd-scripts train and read no sd3"):
        export_embedding(tmp_path / "sd3.safetensors", "kohya", tmp_path / "x.safetensors")
    assert (
        main(
            ["export", str(tmp_path / "flux.safetensors"), "--to", "a1111", str(tmp_path / "y.pt")]
        )
        == 2
    )


def test_bad_keys_and_widths_are_one_line(tiny_flux_dir, tiny_sd3_dir, tmp_path):
    generator = torch.Generator().manual_seed(0)
    # ComfyUI's key for T5 is t5xxl: read as t5.
    save_file(
        {"clip_l": torch.randn(1, 32), "t5xxl": torch.randn(1, 64)}, tmp_path / "comfy.safetensors"
    )
    assert load_embedding(tmp_path / "comfy.safetensors").family_guess == "flux"
    # t5 without clip_l; a stray key beside the SD3 keys.
    save_file(
        {"clip_g": torch.randn(1, 48), "t5": torch.randn(1, 96)}, tmp_path / "half.safetensors"
    )
    with pytest.raises(
        EmbeddingFileError, match="SD3 embedding with keys .* lacks 'clip_l'; SDXL needs exactly"
    ):
        load_embedding(tmp_path / "half.safetensors")
    save_file(
        {k: torch.randn(1, 8) for k in ("clip_l", "clip_g", "t5", "x")},
        tmp_path / "four.safetensors",
    )
    with pytest.raises(EmbeddingFileError, match="4 unrelated keys"):
        load_embedding(tmp_path / "four.safetensors")
    save_file({"clip_l": torch.randn(1, 32), "t5": torch.randn(2, 64)}, tmp_path / "k.safetensors")
    with pytest.raises(EmbeddingFileError, match="clip_l has 1, t5 has 2 vectors"):
        load_embedding(tmp_path / "k.safetensors")
    # Widths: a FLUX file with T5 rows of the wrong width, and a FLUX file into SD3.
    wide = TokenEmbedding(
        "<w>",
        [torch.randn(1, 32, generator=generator), torch.randn(1, 4096)],
        keys=("clip_l", "t5"),
    )
    save_embedding(tmp_path / "wide.safetensors", wide)
    with pytest.raises(
        EmbeddingFileError, match="holds 4096-wide vectors but text encoder 2 of .* is 64 wide"
    ):
        load_into_model(load_model(tiny_flux_dir, device="cpu"), tmp_path / "wide.safetensors")
    save_file({"clip_l": torch.randn(1, 32), "t5": torch.randn(1, 64)}, tmp_path / "f.safetensors")
    with pytest.raises(
        EmbeddingFileError, match=r"vectors for 2 text encoder\(s\) .* \(sd3\) has 3"
    ):
        load_into_model(load_model(tiny_sd3_dir, device="cpu"), tmp_path / "f.safetensors")
    with pytest.raises(EmbeddingFileError, match="no known layout"):
        save_embedding(
            tmp_path / "z.safetensors",
            TokenEmbedding("<z>", [torch.randn(1, 8)] * 2, keys=("t5", "clip_l")),
        )


@pytest.mark.parametrize(
    ("family", "keys", "widths"),
    [("sd3", ("clip_l", "clip_g", "t5"), (32, 48, 96)), ("flux", ("clip_l", "t5"), (32, 64))],
)
def test_comfyui_export_uses_t5xxl(family, keys, widths, tmp_path):
    """ComfyUI looks up clip_l, clip_g and t5xxl: each encoder gets its own rows back."""
    from tests.core.test_embeddings_readers import comfyui_load_embed

    generator = torch.Generator().manual_seed(0)
    emb = TokenEmbedding("<c>", [torch.randn(2, w, generator=generator) for w in widths], keys=keys)
    save_embedding(tmp_path / "src.safetensors", emb)
    out = tmp_path / "comfy"
    out.mkdir()
    assert main(["export", str(tmp_path / "src.safetensors"), "--to", "comfyui", str(out)]) == 0
    written = load_file(out / "c.safetensors")
    comfy_keys = [k.replace("t5", "t5xxl") for k in keys]
    assert sorted(written) == sorted(comfy_keys)
    for key, width, vectors in zip(comfy_keys, widths, emb.vectors):
        assert torch.equal(comfyui_load_embed("c", out, width, key), vectors)
    back = load_embedding(out / "c.safetensors")  # and oneword reads t5xxl as t5
    assert back.encoder_keys == keys and back.family_guess == family
