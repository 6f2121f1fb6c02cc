"""Placeholder tokens: naming, initialisation, refusal, and that only new rows can change."""

from __future__ import annotations

import pytest
import torch

from oneword.errors import TokenError
from oneword.models import load_model
from oneword.tokens import (
    PlaceholderEmbedding,
    add_placeholder,
    expand_prompt,
    get_rows,
    set_rows,
    trainable_rows,
)


@pytest.fixture
def sdxl(tiny_sdxl_dir):
    return load_model(tiny_sdxl_dir, device="cpu")


def test_multi_vector_token_in_every_encoder(sdxl):
    placeholder = add_placeholder(sdxl, "<cup>", "cup", 3)
    assert placeholder.names == ["<cup>", "<cup>_1", "<cup>_2"]
    assert placeholder.ids == [[49408, 49409, 49410]] * 2
    assert [tuple(r.shape) for r in placeholder.init_rows] == [(3, 32), (3, 48)]
    assert (
        expand_prompt("a photo of <cup> on a table", [placeholder])
        == "a photo of <cup> <cup>_1 <cup>_2 on a table"
    )
    for tokenizer in sdxl.tokenizers:
        ids = tokenizer(expand_prompt("a <cup>", [placeholder]), add_special_tokens=False).input_ids
        assert ids == [320, 49408, 49409, 49410]


def test_initializer_words_are_averaged_not_truncated(sdxl):
    table = sdxl.text_encoders[0].get_input_embeddings()
    ids = sdxl.tokenizers[0]("red star", add_special_tokens=False).input_ids
    assert len(ids) == 2
    one = add_placeholder(sdxl, "<a>", "red star", 1)
    torch.testing.assert_close(one.init_rows[0][0], table.weight[ids].mean(0), rtol=0, atol=1e-6)
    # K equal to the number of sub-tokens: one word per vector.
    two = add_placeholder(sdxl, "<b>", "red star", 2)
    torch.testing.assert_close(two.init_rows[0], table.weight[ids], rtol=0, atol=0)


@pytest.mark.parametrize("bad", ["cat", "Cat", "two words", "", "<x>_1"])
def test_refuses_existing_or_unsplittable_tokens(sdxl, bad):
    if bad == "<x>_1":
        add_placeholder(sdxl, "<x>", "dog", 2)
    with pytest.raises(TokenError, match="token|word"):
        add_placeholder(sdxl, bad, "dog")


def test_refuses_the_same_placeholder_twice(sdxl):
    add_placeholder(sdxl, "<dog>", "dog")
    with pytest.raises(TokenError, match="already exists"):
        add_placeholder(sdxl, "<dog>", "dog")


def test_empty_initializer_is_refused(sdxl):
    with pytest.raises(TokenError, match="initializer"):
        add_placeholder(sdxl, "<e>", "   ")


def test_only_new_rows_change_under_training(sdxl):
    before = [te.get_input_embeddings().weight.clone() for te in sdxl.text_encoders]
    unet_before = [p.clone() for p in sdxl.unet.parameters()]
    placeholder = add_placeholder(sdxl, "<cup>", "cup", 2)
    params = trainable_rows(sdxl)
    optimizer = torch.optim.AdamW(params, lr=1e-1, weight_decay=0.1)
    tokenizer = sdxl.tokenizers[0]
    ids = tokenizer(
        [expand_prompt("a photo of <cup>", [placeholder]), "a dog"],
        padding="max_length",
        return_tensors="pt",
    ).input_ids
    for _ in range(3):
        loss = sum(te(ids)[0].pow(2).mean() for te in sdxl.text_encoders)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for old, te in zip(before, sdxl.text_encoders):
        table = te.get_input_embeddings()
        assert isinstance(table, PlaceholderEmbedding)
        assert torch.equal(table.base.weight, old)  # bitwise: the 49,408 original rows
        assert table.base.weight.grad is None
    assert all(torch.equal(a, b) for a, b in zip(unet_before, sdxl.unet.parameters()))
    assert not torch.equal(get_rows(sdxl, placeholder)[0], placeholder.init_rows[0])


def test_rows_reach_the_text_encoder_output(sdxl):
    placeholder = add_placeholder(sdxl, "<cup>", "cup")
    tokenizer, text_encoder = sdxl.tokenizers[0], sdxl.text_encoders[0]
    ids = tokenizer("a <cup>", return_tensors="pt").input_ids
    first = text_encoder(ids)[0]
    set_rows(sdxl, placeholder, [r + 1.0 for r in get_rows(sdxl, placeholder)])
    assert not torch.allclose(first, text_encoder(ids)[0])


def test_warm_start_rows_and_shape_check(sdxl):
    rows = [torch.ones(2, 32), torch.full((2, 48), 2.0)]
    placeholder = add_placeholder(sdxl, "<w>", "dog", 2, init_rows=rows)
    assert [torch.equal(a, b) for a, b in zip(get_rows(sdxl, placeholder), rows)] == [True, True]
    with pytest.raises(TokenError, match=r"\(2, 48\)"):
        add_placeholder(sdxl, "<v>", "dog", 2, init_rows=[torch.ones(2, 32), torch.ones(2, 40)])


def test_text_encoder_dtype_stays_the_frozen_one(tiny_sd1_dir):
    # diffusers casts prompt embeddings to text_encoder.dtype: it must not become the rows' fp32.
    model = load_model(tiny_sd1_dir, device="cpu")
    model.text_encoders[0].to(torch.bfloat16)
    add_placeholder(model, "<b>", "dog")
    assert model.text_encoders[0].dtype == torch.bfloat16
    assert trainable_rows(model)[0].dtype == torch.float32
