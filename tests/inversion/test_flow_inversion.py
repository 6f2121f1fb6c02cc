"""Textual inversion on SD 3.x and FLUX.1: placeholder tokens in CLIP and T5, the
rectified-flow objective, and the same resume and safety guarantees as SD 1.x/2.x/XL."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import noise_images as _images
from conftest import quick_inversion_config as _config
from safetensors.torch import load_file

from oneword.errors import OnewordError
from oneword.inversion import invert
from oneword.inversion.objective import (
    denoising_loss,
    draw_timesteps,
    encode_prompts,
    pack_latents,
    scale_latents,
    tokenize,
    unpack_latents,
)
from oneword.models import load_model
from oneword.tokens import add_placeholder, get_rows, placeholder_embedding, trainable_rows

FLOW = ("sd3", "flux")


def _model(request, family):
    return load_model(request.getfixturevalue(f"tiny_{family}_dir"), device="cpu")


# --- placeholders in CLIP and T5 -----------------------------------------------------------


@pytest.mark.parametrize("family", FLOW)
def test_placeholder_is_one_new_id_in_every_encoder(request, family):
    model = _model(request, family)
    t5_tokenizer = model.tokenizers[-1]
    pieces = len(t5_tokenizer)
    # Without the added token, SentencePiece splits the word into several pieces.
    assert len(t5_tokenizer("<my-cat>", add_special_tokens=False).input_ids) > 1
    placeholder = add_placeholder(model, "<my-cat>", "cat", 2)
    assert placeholder.ids[-1] == [pieces, pieces + 1]  # from len(tokenizer), as diffusers
    for tokenizer, ids in zip(model.tokenizers, placeholder.ids):
        encoded = tokenizer("a photo of <my-cat> <my-cat>_1 cat").input_ids
        assert [i for i in encoded if i in ids] == ids
    # The T5 matrix has padding rows past its vocabulary; none of them is ever read.
    t5_table = placeholder_embedding(model.text_encoders[-1])
    assert t5_table.base_vocab == pieces < t5_table.base.num_embeddings
    assert model.text_encoders[-1].encoder.embed_tokens is t5_table
    assert t5_table.weight.shape[0] == pieces + 2
    # The only trainable parameters are the new rows, one (K, d) block per encoder.
    rows = trainable_rows(model)
    assert [tuple(r.shape) for r in rows] == [(2, w) for w in model.widths]
    trainable = [p for te in model.text_encoders for p in te.parameters() if p.requires_grad]
    assert len(trainable) == len(rows) and all(any(p is r for r in rows) for p in trainable)


def test_t5_context_is_capped_at_512(request):
    model = _model(request, "flux")
    long_prompt = " ".join(["red"] * 700)
    ids = tokenize(model.tokenizers[-1], [long_prompt], model.device, model.max_sequence_length)
    assert ids.shape == (1, 512) and model.max_sequence_length == 512
    embeds = encode_prompts(model, ["a <x> cat", long_prompt])
    assert embeds.hidden.shape == (2, 512, 64) and embeds.pooled.shape == (2, 32)


def test_sd3_prompt_layout(request):
    model = _model(request, "sd3")
    embeds = encode_prompts(model, ["a cat"])
    # CLIP-L + CLIP-G (32 + 48, zero-padded to T5's 96) then 256 T5 tokens; pooled 32 + 48.
    assert embeds.hidden.shape == (1, 77 + 256, 96) and embeds.pooled.shape == (1, 80)
    assert torch.count_nonzero(embeds.hidden[:, :77, 80:]) == 0


# --- the objective -------------------------------------------------------------------------


def test_flux_packing_round_trips():
    latents = torch.randn(2, 16, 8, 8)
    packed = pack_latents(latents)
    assert packed.shape == (2, 16, 64)
    assert torch.equal(unpack_latents(packed, 8), latents)
    from diffusers import FluxPipeline

    assert torch.equal(packed, FluxPipeline._pack_latents(latents, 2, 16, 8, 8))


@pytest.mark.parametrize("family", FLOW)
def test_timesteps_follow_the_models_shift(request, family):
    model = _model(request, family)
    sigmas = draw_timesteps(model, 4096, torch.Generator().manual_seed(0))
    assert sigmas.dtype == torch.float32 and 0 < sigmas.min() and sigmas.max() < 1
    if family == "sd3":  # static shift 3 moves the logit-normal median 0.5 to 0.75
        assert float(sigmas.median()) == pytest.approx(0.75, abs=0.02)
    else:  # 64 latent tokens: mu = 0.5 + (64 - 256) * 0.65 / 3840 = 0.4675
        assert float(sigmas.median()) == pytest.approx(
            np.exp(0.4675) / (np.exp(0.4675) + 1), abs=0.02
        )


@pytest.mark.parametrize(
    "family",
    ["sd3", pytest.param("flux", marks=pytest.mark.slow)],  # flux: ~11 s (512 T5 tokens)
)
def test_loss_falls_on_a_fixed_batch(request, family):
    model = _model(request, family)
    placeholder = add_placeholder(model, "<t>", "dog")
    generator = torch.Generator().manual_seed(0)
    latents = scale_latents(model, torch.randn(2, 16, 16, 16, generator=generator))
    noise = torch.randn(2, 16, 16, 16, generator=generator)
    sigmas = draw_timesteps(model, 2, generator)
    prompts = ["a photo of <t>", "a rendering of <t>"]
    optimizer = torch.optim.Adam(trainable_rows(model), lr=0.05)
    losses = []
    for _ in range(8):
        optimizer.zero_grad()
        loss = denoising_loss(model, latents, encode_prompts(model, prompts), noise, sigmas)
        loss.loss.mean().backward()
        optimizer.step()
        losses.append(loss.loss.mean().item())
    assert losses[-1] < losses[0] - 0.01 and losses[-1] == min(losses), losses
    assert all(torch.isfinite(r).all() for r in get_rows(model, placeholder))


# --- invert: only the new rows, every encoder; resume; the encoder choice -------------------


@pytest.mark.parametrize("family", FLOW)
def test_invert_changes_only_the_new_rows(request, family):
    model = _model(request, family)
    other = add_placeholder(model, "<other>", "cat", 2)  # installs the placeholder tables
    other_rows = get_rows(model, other)
    modules = [*model.text_encoders, model.unet, model.vae]
    frozen = {
        f"{i}.{name}": t.clone()
        for i, module in enumerate(modules)
        for name, t in module.state_dict().items()
        if not name.endswith(".new.weight")
    }
    result = invert(model, _images(), "<t>", "dog", _config(steps=3))
    for before, now in zip(other_rows, get_rows(model, other)):
        assert torch.equal(before, now)
    after = {
        f"{i}.{name}": t
        for i, module in enumerate(modules)
        for name, t in module.state_dict().items()
        if not name.endswith(".new.weight")  # the placeholder rows
    }
    assert frozen.keys() == after.keys()
    assert [n for n in after if not torch.equal(frozen[n], after[n])] == []
    assert len(result.vectors) == len(model.text_encoders)
    for init, learned in zip(result.placeholder.init_rows, result.vectors):
        assert not torch.equal(init, learned)  # every encoder learned
    assert result.log["model"]["family"] == family


@pytest.mark.parametrize(("family", "encoders"), [("flux", "clip"), ("sd3", "t5")])
def test_encoders_flag_freezes_the_others(request, family, encoders):
    model = _model(request, family)
    result = invert(model, _images(), "<t>", "dog", _config(steps=3, encoders=encoders))
    for key, init, learned in zip(model.encoder_keys, result.placeholder.init_rows, result.vectors):
        assert torch.equal(init, learned) != key.startswith(encoders), key
    assert all(rows.requires_grad for rows in trainable_rows(model))  # restored afterwards


def test_encoders_flag_needs_such_an_encoder(tiny_sdxl_dir):
    model = load_model(tiny_sdxl_dir, device="cpu")
    with pytest.raises(OnewordError, match="--encoders t5: .* has no such text encoder"):
        invert(model, _images(), "<t>", "dog", _config(steps=1, encoders="t5"))
    with pytest.raises(OnewordError, match="--encoders must be one of"):
        _config(encoders="clip_g").check()


@pytest.mark.parametrize("family", FLOW)
def test_flow_resume_is_bitwise_exact(request, family, tmp_path):
    folder = request.getfixturevalue(f"tiny_{family}_dir")
    config = _config(steps=4, checkpoint_every=2)
    full = invert(load_model(folder, device="cpu"), _images(), "<t>", "dog", config, tmp_path / "a")
    first = _config(steps=2, checkpoint_every=2)
    invert(load_model(folder, device="cpu"), _images(), "<t>", "dog", first, tmp_path / "b")
    resumed = invert(
        load_model(folder, device="cpu"),
        _images(),
        "<t>",
        "dog",
        config,
        tmp_path / "b",
        resume=True,
    )
    assert resumed.log["resumed_from_step"] == 2
    assert resumed.log["loss"] == full.log["loss"]
    for a, b in zip(full.vectors, resumed.vectors):
        assert torch.equal(a, b)
    a = load_file(tmp_path / "a" / "checkpoints" / "step-000004" / "state.safetensors")
    b = load_file(tmp_path / "b" / "checkpoints" / "step-000004" / "state.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_with_other_encoders_is_an_error(request, tmp_path):
    folder = request.getfixturevalue("tiny_flux_dir")
    invert(load_model(folder, device="cpu"), _images(), "<t>", "dog", _config(steps=1), tmp_path)
    with pytest.raises(OnewordError, match="encoders: 'all' -> 'clip'"):
        invert(
            load_model(folder, device="cpu"),
            _images(),
            "<t>",
            "dog",
            _config(steps=2, encoders="clip"),
            tmp_path,
            resume=True,
        )


def test_batched_concepts_match_single_runs_on_flux(request, tmp_path):
    from oneword.inversion import invert_many
    from oneword.inversion.invert import ConceptSpec

    folder = request.getfixturevalue("tiny_flux_dir")
    config = _config(steps=3)
    specs = [
        ConceptSpec("a", _images(seed=1), class_word="dog"),
        ConceptSpec("b", _images(seed=2), class_word="cup"),
    ]
    many = invert_many(load_model(folder, device="cpu"), specs, config, tmp_path, chunk=2)
    for spec in specs:
        alone = invert(
            load_model(folder, device="cpu"), spec.images, f"<{spec.name}>", spec.class_word, config
        )
        batched = load_file(tmp_path / spec.name / "learned_embeds.safetensors")
        assert many[spec.name]["steps_done"] == 3
        for key, vectors in zip(("clip_l", "t5"), alone.vectors):
            torch.testing.assert_close(batched[key], vectors, atol=1e-4, rtol=0)


def test_t5_ids_start_at_the_tokenizer_even_if_the_table_came_first(request):
    model = _model(request, "flux")
    trainable_rows(model)  # installs the tables before any tokenizer is consulted
    placeholder = add_placeholder(model, "<late>", "cat")
    assert placeholder.ids[-1] == [len(model.tokenizers[-1]) - 1]
    assert placeholder_embedding(model.text_encoders[-1]).base_vocab == placeholder.ids[-1][0]


def test_cli_invert_on_flux_with_the_encoders_flag(request, tmp_path, capsys):
    from oneword.cli import main

    folder = request.getfixturevalue("tiny_flux_dir")
    images = tmp_path / "images"
    images.mkdir()
    for index, image in enumerate(_images()):
        image.save(images / f"{index}.png")
    out = tmp_path / "run"
    args = ["invert", "--model", str(folder), "--images", str(images), "--token", "<t>"]
    args += ["--init", "dog", "--out", str(out), "--steps", "2", "--batch", "2", "--device", "cpu"]
    assert main([*args, "--encoders", "t5", "--no-samples", "--quiet"]) == 0
    tensors = load_file(out / "learned_embeds.safetensors")
    assert sorted(tensors) == ["clip_l", "t5"]
    log = json.loads((out / "log.json").read_text())
    assert log["config"]["encoders"] == "t5" and log["model"]["family"] == "flux"
    capsys.readouterr()
    bad = ["invert", "--model", str(folder), "--images", str(images), "--token", "<u>"]
    bad += ["--init", "dog", "--out", str(tmp_path / "bad"), "--encoders", "clip_g"]
    with pytest.raises(SystemExit):  # argparse refuses an unknown choice
        main(bad)
