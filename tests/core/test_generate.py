"""`oneword generate` and `generate_with_embeddings` on the tiny random models (CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageFont

from oneword.cli import main
from oneword.embeddings import TokenEmbedding, save_embedding
from oneword.errors import EmbeddingFileError
from oneword.generate import generate_with_embeddings, parse_embedding_arg
from oneword.models import load_model

FAST = ["--steps", "2", "--device", "cpu"]


def _embedding(path, token: str, widths=(32,), vectors: int = 1, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    rows = [torch.randn(vectors, width, generator=generator) for width in widths]
    return save_embedding(path, TokenEmbedding(token, rows))


def _grid_size(columns: int, rows: int, side: int, lines: int = 1) -> tuple[int, int]:
    # save_grid: the label's lines (font height + 2 px each, + 4 px) above each row of cells.
    top, bottom = ImageFont.load_default().getbbox("Ag|")[1::2]
    return columns * side, rows * (side + lines * (int(bottom - top) + 2) + 4)


def test_cli_writes_a_grid_with_one_and_two_embeddings(tiny_sd1_dir, tmp_path, capsys):
    cat = _embedding(tmp_path / "cat.safetensors", "<cat>")
    style = _embedding(tmp_path / "style.safetensors", "<s>", seed=1)
    side = load_model(tiny_sd1_dir, device="cpu").resolution
    one = tmp_path / "one.png"
    code = main(
        ["generate", "--model", str(tiny_sd1_dir), "--embedding", str(cat)]
        + ["--prompt", "a photo of <cat>", "--prompt", "<cat> on the beach", "--num", "3"]
        + ["--out", str(one), *FAST]
    )
    assert code == 0 and "wrote" in capsys.readouterr().out
    assert Image.open(one).size == _grid_size(3, 2, side)

    # Two files, the second renamed with FILE:TOKEN.
    two = tmp_path / "two.png"
    code = main(
        ["generate", "--model", str(tiny_sd1_dir), "--embedding", str(cat)]
        + ["--embedding", f"{style}:<my-style>", "--prompt", "a <cat> in the style of <my-style>"]
        + ["--num", "2", "--out", str(two), *FAST]
    )
    assert code == 0
    # The prompt is wider than the two 32 px cells: its label wraps onto several lines.
    width, height = Image.open(two).size
    assert (width, height) in [_grid_size(2, 1, side, lines) for lines in range(2, 8)]
    assert not list(tmp_path.glob(".*.tmp"))  # atomic: no temporary left behind


def test_the_token_changes_the_image_and_only_its_prompts(tiny_sd1_dir, tmp_path):
    model = load_model(tiny_sd1_dir, device="cpu")
    first = _embedding(tmp_path / "a.safetensors", "<t>", seed=0)
    second = _embedding(tmp_path / "b.safetensors", "<t>", seed=1)
    prompts = ["a photo of <t>", "a photo of a dog"]
    kwargs = {"num_per_prompt": 1, "steps": 2, "seed": 0}
    with pytest.warns(UserWarning, match="uses none of the loaded tokens"):
        before = [
            np.asarray(i, np.int16)
            for i in generate_with_embeddings(model, [first], prompts, **kwargs)
        ]
    # A second call on the same model takes the new rows for the token it already has.
    with pytest.warns(UserWarning):
        after = [
            np.asarray(i, np.int16)
            for i in generate_with_embeddings(model, [second], prompts, **kwargs)
        ]
    assert np.abs(before[0] - after[0]).max() > 0  # the token's rows reach the image
    assert np.array_equal(before[1], after[1])  # a prompt without it is untouched


def test_sdxl_embedding_and_multi_vector_token(tiny_sdxl_dir, tmp_path):
    path = _embedding(tmp_path / "xl.safetensors", "<xl>", widths=(32, 48), vectors=2)
    images = generate_with_embeddings(
        str(tiny_sdxl_dir), [path], ["a photo of <xl>"], num_per_prompt=2, steps=2, device="cpu"
    )
    assert len(images) == 2 and images[0].size[0] == images[0].size[1]


def test_bad_input_is_one_clear_line(tiny_sd1_dir, tmp_path, capsys):
    base = [
        "generate",
        "--model",
        str(tiny_sd1_dir),
        "--prompt",
        "<t>",
        "--out",
        str(tmp_path / "g.png"),
    ]
    assert main([*base, "--embedding", str(tmp_path / "missing.safetensors"), *FAST]) == 2
    err = capsys.readouterr().err
    assert "missing.safetensors does not exist" in err and "Traceback" not in err

    wide = _embedding(tmp_path / "wide.safetensors", "<t>", widths=(48,))
    assert main([*base, "--embedding", str(wide), *FAST]) == 2
    err = capsys.readouterr().err
    assert "48-wide" in err and "32 wide" in err

    one = _embedding(tmp_path / "one.safetensors", "<t>")
    assert main([*base, "--embedding", str(one), "--embedding", str(one), *FAST]) == 2
    assert "two embeddings use the token '<t>'" in capsys.readouterr().err
    assert not (tmp_path / "g.png").exists()


def test_parse_embedding_arg(tmp_path):
    path = _embedding(tmp_path / "e.safetensors", "<e>")
    assert parse_embedding_arg(str(path)) == (path, None)
    assert parse_embedding_arg(f"{path}:<new>") == (path, "<new>")
    with pytest.raises(EmbeddingFileError, match="does not exist"):
        parse_embedding_arg(f"{tmp_path / 'nope.pt'}:<x>")
    with pytest.raises(EmbeddingFileError, match="empty token"):
        parse_embedding_arg(f"{path}:")
