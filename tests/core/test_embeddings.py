"""Embedding files: round trips, content-based detection, refusal of unsafe or broken files,
and loading through the real client (diffusers' `load_textual_inversion`)."""

from __future__ import annotations

import argparse
import os
import pickle

import numpy as np
import pytest
import safetensors.torch
import torch

from oneword.embeddings import (
    FORMATS,
    TokenEmbedding,
    export_embedding,
    load_embedding,
    load_into_model,
    load_into_pipeline,
    save_embedding,
    save_model_token,
)
from oneword.errors import EmbeddingFileError

WIDTHS = {"sd1": [768], "sdxl": [768, 1280]}
TINY_WIDTHS = {"sd1": [32], "sd2": [40], "sdxl": [32, 48]}


def make_embedding(widths, num_vectors, token="<tok>", seed=0, metadata=None) -> TokenEmbedding:
    generator = torch.Generator().manual_seed(seed)
    vectors = [torch.randn(num_vectors, d, generator=generator) for d in widths]
    return TokenEmbedding(token, vectors, metadata or {"method": "test", "steps": "7"}, "oneword")


def suffix(format: str, num_encoders: int) -> str:
    return ".pt" if format == "a1111" and num_encoders == 1 else ".safetensors"


def assert_same_vectors(loaded: TokenEmbedding, expected: TokenEmbedding) -> None:
    assert len(loaded.vectors) == len(expected.vectors)
    for got, want in zip(loaded.vectors, expected.vectors):
        assert got.dtype == torch.float32
        assert torch.equal(got, want)  # bitwise


def pickle_header(path) -> bytes:
    return path.read_bytes()[:2]


# ---------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
@pytest.mark.parametrize("num_vectors", [1, 3])
@pytest.mark.parametrize("format", FORMATS)
def test_save_load_round_trip(tmp_path, format, num_vectors, family):
    emb = make_embedding(WIDTHS[family], num_vectors, token="<my-cat>")
    path = save_embedding(tmp_path / f"cat{suffix(format, len(emb.vectors))}", emb, format=format)

    loaded = load_embedding(path)
    assert_same_vectors(loaded, emb)
    assert loaded.token == "<my-cat>"
    assert loaded.source_format == format
    assert loaded.family_guess == family
    assert loaded.metadata["method"] == "test" and loaded.metadata["steps"] == "7"
    assert loaded.metadata["K"] == str(num_vectors)
    assert loaded.metadata["d"] == ",".join(map(str, WIDTHS[family]))
    assert loaded.metadata["model_family"] == family
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in loaded.metadata.items())
    assert not [p for p in tmp_path.iterdir() if p != path]  # no temporary files left


def test_file_layouts_are_what_other_tools_read(tmp_path):
    sd1, sdxl = make_embedding([768], 2), make_embedding([768, 1280], 2)
    for format in ("oneword", "diffusers"):
        tensors = safetensors.torch.load_file(save_embedding(tmp_path / "a", sd1, format=format))
        assert list(tensors) == ["<tok>"] and tensors["<tok>"].shape == (2, 768)
    kohya = tmp_path / "k.safetensors"
    save_embedding(kohya, sd1, format="kohya")
    assert list(safetensors.torch.load_file(kohya)) == ["emb_params"]
    with safetensors.safe_open(str(kohya), "pt") as handle:
        metadata = handle.metadata()
    assert metadata["modelspec.title"] == "<tok>"
    assert metadata["modelspec.architecture"] == "stable-diffusion-v1/textual-inversion"

    a1111 = torch.load(save_embedding(tmp_path / "a.pt", sd1, format="a1111"), weights_only=True)
    assert a1111["string_to_token"] == {"*": 265}
    assert torch.equal(a1111["string_to_param"]["*"], sd1.vectors[0])
    assert a1111["name"] == "<tok>" and a1111["step"] == 7
    assert set(a1111) >= {"sd_checkpoint", "sd_checkpoint_name"}

    for format in FORMATS:  # SDXL is clip_l + clip_g safetensors in every layout
        path = save_embedding(tmp_path / f"xl-{format}.safetensors", sdxl, format=format)
        tensors = safetensors.torch.load_file(path)
        assert set(tensors) == {"clip_l", "clip_g"}
        assert tensors["clip_l"].shape == (2, 768) and tensors["clip_g"].shape == (2, 1280)


def test_reads_old_diffusers_bin_bare_tensor_and_folder(tmp_path):
    row = torch.randn(768)
    folder = tmp_path / "concept"
    folder.mkdir()
    torch.save({"<cat-toy>": row}, folder / "learned_embeds.bin")  # diffusers' old layout, (d,)
    loaded = load_embedding(folder)
    assert loaded.token == "<cat-toy>" and loaded.source_format == "diffusers"
    assert torch.equal(loaded.vectors[0], row[None])

    torch.save(torch.randn(2, 768), tmp_path / "bare.pt")
    assert load_embedding(tmp_path / "bare.pt").token == "bare"
    assert load_embedding(tmp_path / "bare.pt", token="<x>").token == "<x>"

    half = {"emb_params": torch.randn(2, 1024, dtype=torch.float16)}
    safetensors.torch.save_file(half, tmp_path / "sd2.safetensors")
    loaded = load_embedding(tmp_path / "sd2.safetensors")
    assert loaded.vectors[0].dtype == torch.float32 and loaded.family_guess == "sd2"
    assert loaded.token == "sd2" and loaded.source_format == "kohya"


# ---------------------------------------------------------------------------------------
# Content, not extension


def test_format_detected_by_content_not_extension(tmp_path):
    sd1 = make_embedding([768], 3)
    with pytest.warns(UserWarning, match="name it .pt"):
        pickled = save_embedding(tmp_path / "a1111.safetensors", sd1, format="a1111")
    assert pickle_header(pickled) == b"PK"
    with pytest.warns(UserWarning, match="name it .safetensors"):
        safe = save_embedding(tmp_path / "diffusers.pt", sd1, format="diffusers")

    for path, format in [(pickled, "a1111"), (safe, "diffusers")]:
        loaded = load_embedding(path)
        assert loaded.source_format == format and loaded.token == "<tok>"
        assert_same_vectors(loaded, sd1)

    # The same bytes renamed to a nonsense extension still load.
    os.rename(safe, tmp_path / "weights.txt")
    assert_same_vectors(load_embedding(tmp_path / "weights.txt"), sd1)


class _Payload:
    """Unpickling this calls open(marker, "w"): a stand-in for any code a pickle can run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    # The payload is live: an unsafe load really creates its marker.
    live_marker = tmp_path / "live-marker"
    torch.save({"x": _Payload(live_marker)}, tmp_path / "live.pt")
    torch.load(tmp_path / "live.pt", weights_only=False).get("x").close()
    assert live_marker.exists()

    marker = tmp_path / "marker"
    zipped = tmp_path / "evil.pt"
    torch.save({"string_to_param": {"*": _Payload(marker)}, "name": "evil"}, zipped)
    legacy = tmp_path / "evil-legacy.pt"
    legacy.write_bytes(pickle.dumps({"<evil>": _Payload(marker)}, protocol=2))
    disguised = tmp_path / "evil.safetensors"  # a pickle wearing a safetensors name
    disguised.write_bytes(zipped.read_bytes())

    for path in (zipped, legacy, disguised):
        with pytest.raises(
            EmbeddingFileError, match="not a safe tensor file and was refused"
        ) as info:
            load_embedding(path)
        assert str(path) in str(info.value)
        assert "GLOBAL" in str(info.value)  # the reason names what would have been imported
        assert not marker.exists()


def test_broken_files_are_errors_naming_the_file(tmp_path):
    good = save_embedding(tmp_path / "good.safetensors", make_embedding([768], 2))
    data = good.read_bytes()
    cases = {
        "empty.safetensors": b"",
        "random.pt": os.urandom(4096),
        "truncated-data.safetensors": data[:-100],
        "truncated-header.safetensors": data[:40],
        "bad-zip.pt": b"PK\x03\x04" + os.urandom(200),
        "bad-header.safetensors": (20).to_bytes(8, "little") + b"{not json at all!!!}",
    }
    for name, content in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(EmbeddingFileError) as info:
            load_embedding(path)
        assert str(path) in str(info.value), name
    with pytest.raises(EmbeddingFileError, match="does not exist"):
        load_embedding(tmp_path / "missing.safetensors")


def test_a_garbage_pickle_is_called_corrupt_not_unsafe_and_torch_stays_quiet(tmp_path):
    import warnings

    path = tmp_path / "garbage.pt"
    path.write_bytes(b"\x80\x04not really a pickle")  # a protocol-4 header, then junk
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's "Detected pickle protocol 4" would raise here
        with pytest.raises(EmbeddingFileError, match="not a readable pickle") as info:
            load_embedding(path)
    message = str(info.value)
    assert str(path) in message and "corrupt" in message and "run code" not in message
    assert "Please file an issue" not in message and "weights_only" not in message


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (
            {"a": torch.zeros(1, 768), "b": torch.zeros(1, 768), "c": torch.zeros(1, 8)},
            "3 unrelated keys",
        ),
        ({"a": torch.zeros(1, 768), "b": torch.zeros(1, 768)}, "2 unrelated keys"),
        ({"<t>": torch.zeros(2, 3, 768)}, r"shape \(2, 3, 768\)"),
        ({"<t>": torch.tensor([[1.0, float("nan")]])}, "non-finite"),
        ({"<t>": torch.zeros(1, 768, dtype=torch.int64)}, "floating point"),
        ({"clip_l": torch.zeros(1, 768)}, "lacks 'clip_g'"),
        ({"clip_g": torch.zeros(1, 1280), "emb_params": torch.zeros(1, 768)}, "lacks 'clip_l'"),
        ({"clip_l": torch.zeros(2, 768), "clip_g": torch.zeros(1, 1280)}, "same number K"),
        ({}, "no tensors"),
    ],
)
def test_bad_contents_are_explained(tmp_path, content, expected):
    path = tmp_path / "bad.bin"
    torch.save(content, path)
    with pytest.raises(EmbeddingFileError, match=expected) as info:
        load_embedding(path)
    assert str(path) in str(info.value)
    if content and all(v.is_floating_point() for v in content.values()):
        safe = tmp_path / "bad.safetensors"
        safetensors.torch.save_file(content, safe)
        with pytest.raises(EmbeddingFileError, match=expected):
            load_embedding(safe)


def test_non_tensor_values_are_errors(tmp_path):
    path = tmp_path / "list.pt"
    torch.save({"<t>": [0.1, 0.2]}, path)
    with pytest.raises(EmbeddingFileError, match="is a list, not a tensor"):
        load_embedding(path)
    torch.save({"string_to_param": {"*": "text"}, "name": "x"}, path)
    with pytest.raises(EmbeddingFileError, match="is a str, not a tensor"):
        load_embedding(path)


# ---------------------------------------------------------------------------------------
# Atomic writes


@pytest.mark.filterwarnings("ignore:.*choose their loader by extension")
def test_failed_replace_keeps_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "cat.safetensors"
    save_embedding(path, make_embedding([768], 1, seed=1))
    before = path.read_bytes()
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600

    def refuse(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", refuse)
    for format in FORMATS:
        with pytest.raises(EmbeddingFileError, match="could not write"):
            save_embedding(path, make_embedding([768], 3, seed=2), format=format)
        assert path.read_bytes() == before
        assert sorted(p.name for p in tmp_path.iterdir()) == ["cat.safetensors"]
    monkeypatch.undo()
    assert load_embedding(path).num_vectors == 1


# ---------------------------------------------------------------------------------------
# Into models


@pytest.fixture(scope="module")
def tiny_dirs(tiny_sd1_dir, tiny_sd2_dir, tiny_sdxl_dir):
    return {"sd1": tiny_sd1_dir, "sd2": tiny_sd2_dir, "sdxl": tiny_sdxl_dir}


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_load_into_model_and_width_mismatch(tmp_path, tiny_dirs, family):
    from oneword.models import load_model
    from oneword.tokens import get_rows

    model = load_model(tiny_dirs[family], device="cpu")
    emb = make_embedding(TINY_WIDTHS[family], 2)
    placeholder = load_into_model(model, save_embedding(tmp_path / "tok.safetensors", emb))
    assert placeholder.token == "<tok>" and placeholder.names == ["<tok>", "<tok>_1"]
    for got, want in zip(get_rows(model, placeholder), emb.vectors):
        assert torch.equal(got, want)

    wrong = [768] if family != "sdxl" else [768, 1280]
    path = save_embedding(tmp_path / "real.safetensors", make_embedding(wrong, 1, token="<w>"))
    with pytest.raises(EmbeddingFileError) as info:
        load_into_model(model, path)
    message = str(info.value)
    assert str(path) in message and family in message
    assert "768-wide" in message and f"{TINY_WIDTHS[family][0]} wide" in message

    other = [32, 48] if family != "sdxl" else [32]
    path = save_embedding(tmp_path / "other.safetensors", make_embedding(other, 1, token="<o>"))
    with pytest.raises(EmbeddingFileError, match="text encoder"):
        load_into_model(model, path)


@pytest.mark.parametrize("format", FORMATS)
def test_save_model_token_round_trip(tmp_path, tiny_sdxl_dir, format):
    from oneword.models import load_model
    from oneword.tokens import add_placeholder, get_rows, set_rows

    model = load_model(tiny_sdxl_dir, device="cpu")
    placeholder = add_placeholder(model, "<xl-cat>", "cat", 2)
    trained = [torch.randn(2, d, generator=torch.Generator().manual_seed(d)) for d in (32, 48)]
    set_rows(model, placeholder, trained)
    path = save_model_token(
        tmp_path / "xl.safetensors", model, placeholder, method="inversion", steps=12, format=format
    )
    loaded = load_embedding(path)
    assert loaded.token == "<xl-cat>"
    for got, want in zip(loaded.vectors, get_rows(model, placeholder)):
        assert torch.equal(got, want)
    assert loaded.metadata["method"] == "inversion" and loaded.metadata["steps"] == "12"
    assert loaded.metadata["base_model"] == str(tiny_sdxl_dir)
    assert loaded.metadata["model_family"] == "sdxl" and loaded.metadata["d"] == "32,48"
    assert loaded.metadata["init_text"] == "cat"


# ---------------------------------------------------------------------------------------
# Through the real client: diffusers' load_textual_inversion


def _pipeline(family, folder):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    pipe = cls.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generate(pipe, prompt) -> np.ndarray:
    return pipe(
        prompt,
        num_inference_steps=2,
        height=32,
        width=32,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images


_BASELINES: dict[str, np.ndarray] = {}


def _baseline(pipe) -> np.ndarray:
    """The image without the token; the same for every pipeline built from one folder."""
    key = str(pipe.config._name_or_path)
    if key not in _BASELINES:
        _BASELINES[key] = _generate(pipe, "a photo of")
    return _BASELINES[key]


def _check_loaded(pipe, emb: TokenEmbedding, token: str) -> None:
    names = [token] + [f"{token}_{i}" for i in range(1, emb.num_vectors)]
    pairs = [(pipe.tokenizer, pipe.text_encoder)]
    if getattr(pipe, "text_encoder_2", None) is not None:
        pairs.append((pipe.tokenizer_2, pipe.text_encoder_2))
    for vectors, (tokenizer, text_encoder) in zip(emb.vectors, pairs, strict=True):
        ids = tokenizer.convert_tokens_to_ids(names)
        rows = text_encoder.get_input_embeddings().weight[ids].detach()
        torch.testing.assert_close(rows, vectors, rtol=0, atol=0)
    with_token = _generate(pipe, f"a photo of {token}")
    without = _baseline(pipe)
    assert np.isfinite(with_token).all()
    assert np.abs(with_token - without).max() > 1e-3  # the token changes the image


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
@pytest.mark.parametrize("format", FORMATS)
def test_load_into_pipeline_every_format(tmp_path, tiny_dirs, family, format):
    num_vectors = 2 if format in ("oneword", "a1111") else 1
    emb = make_embedding(TINY_WIDTHS[family], num_vectors, token="<tok>", seed=3)
    path = save_embedding(tmp_path / f"tok{suffix(format, len(emb.vectors))}", emb, format=format)
    pipe = _pipeline(family, tiny_dirs[family])
    assert load_into_pipeline(pipe, path) == "<tok>"
    _check_loaded(pipe, emb, "<tok>")

    wrong = [768] if family == "sd1" else [768, 1280]
    bad = save_embedding(tmp_path / "wide.safetensors", make_embedding(wrong, 1, token="<w>"))
    with pytest.raises(EmbeddingFileError, match="768-wide"):
        load_into_pipeline(pipe, bad)


@pytest.mark.parametrize("format", FORMATS)
def test_diffusers_reads_our_sd1_files_directly(tmp_path, tiny_sd1_dir, format):
    """Not through our reader: diffusers opens the file itself."""
    emb = make_embedding([32], 2, token="<direct>", seed=5)
    path = save_embedding(tmp_path / f"d{suffix(format, 1)}", emb, format=format)
    pipe = _pipeline("sd1", tiny_sd1_dir)
    # kohya's emb_params key is not a token: diffusers needs token= for it, as for A1111 files.
    token = "<direct>" if format == "kohya" else None
    pipe.load_textual_inversion(str(path), token=token, local_files_only=True)
    _check_loaded(pipe, emb, "<direct>")


def test_sdxl_file_loads_with_the_documented_two_calls(tmp_path, tiny_sdxl_dir):
    emb = make_embedding([32, 48], 2, token="<xl>", seed=6)
    path = save_embedding(tmp_path / "xl.safetensors", emb, format="kohya")
    state_dict = safetensors.torch.load_file(path)
    pipe = _pipeline("sdxl", tiny_sdxl_dir)
    for key, tokenizer, text_encoder in [
        ("clip_l", pipe.tokenizer, pipe.text_encoder),
        ("clip_g", pipe.tokenizer_2, pipe.text_encoder_2),
    ]:
        pipe.load_textual_inversion(
            state_dict[key],
            token=["<xl>", "<xl>_1"],
            tokenizer=tokenizer,
            text_encoder=text_encoder,
        )
    _check_loaded(pipe, emb, "<xl>")


# ---------------------------------------------------------------------------------------
# oneword export


def _export_cli(argv) -> int:
    from oneword.cli.export import add_export_parser

    parser = argparse.ArgumentParser(prog="oneword")
    add_export_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_export_cli_round_trip(tmp_path, capsys):
    emb = make_embedding([768], 3, token="<cli>")
    a1111 = save_embedding(tmp_path / "cli.pt", emb, format="a1111")
    kohya, diffusers = tmp_path / "cli-kohya.safetensors", tmp_path / "cli-diffusers.safetensors"

    assert _export_cli(["export", str(a1111), "--to", "kohya", str(kohya)]) == 0
    assert "wrote" in capsys.readouterr().out
    assert list(safetensors.torch.load_file(kohya)) == ["emb_params"]
    assert _export_cli(["export", str(kohya), "--to", "diffusers", str(diffusers)]) == 0
    assert list(safetensors.torch.load_file(diffusers)) == ["<cli>"]

    loaded = load_embedding(diffusers)
    assert loaded.token == "<cli>" and loaded.source_format == "diffusers"
    assert_same_vectors(loaded, emb)
    assert loaded.metadata["method"] == "test"
    assert not any(k.startswith("modelspec.") for k in loaded.metadata)

    renamed = tmp_path / "renamed.safetensors"
    args = argparse.Namespace(input=diffusers, to="oneword", output=renamed, token="<new>")
    from oneword.cli.export import run_export

    assert run_export(args) == 0
    assert list(safetensors.torch.load_file(renamed)) == ["<new>"]


def test_export_sdxl_to_a1111_is_safetensors(tmp_path):
    emb = make_embedding([768, 1280], 2, token="<xl>")
    src = save_embedding(tmp_path / "xl.safetensors", emb, format="oneword")
    out = tmp_path / "xl-a1111.safetensors"
    assert _export_cli(["export", str(src), "--to", "a1111", str(out), "--token", "<xl2>"]) == 0
    assert out.read_bytes()[8:9] == b"{"  # safetensors, not a pickle
    tensors = safetensors.torch.load_file(out)
    assert set(tensors) == {"clip_l", "clip_g"}
    assert torch.equal(tensors["clip_l"], emb.vectors[0])
    assert torch.equal(tensors["clip_g"], emb.vectors[1])
    assert load_embedding(out).token == "<xl2>"


def test_export_rejects_unknown_format(tmp_path):
    src = save_embedding(tmp_path / "a.safetensors", make_embedding([768], 1))
    with pytest.raises(EmbeddingFileError, match="unknown embedding format"):
        export_embedding(src, "ckpt", tmp_path / "b.safetensors")
    with pytest.raises(SystemExit):
        _export_cli(["export", str(src), "--to", "ckpt", str(tmp_path / "b")])
