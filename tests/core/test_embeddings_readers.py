"""Every file `oneword export` writes opens in the tool it is named for.

The readers here are written from each tool's own loading code, not from oneword's reader:

- ComfyUI, comfy/sd1_clip.py: `load_embed` (file lookup, container by extension, then
  `string_to_param`, the encoder's key, the first tensor) and the width check in
  `SDClipModel.process_tokens` ("shape mismatch ... embedding will be ignored").
- AUTOMATIC1111, modules/textual_inversion/textual_inversion.py: `load_from_file`
  (container by extension, the file name is the trigger word) and
  `create_embedding_from_data`, then the `expected_shape` check that skips other widths.
- kohya sd-scripts: `load_weights` of train_textual_inversion.py (SD 1.x/2.x) and
  sdxl_train_textual_inversion.py (SDXL).
- diffusers: the real `load_textual_inversion` on the tiny pipelines of tests/conftest.py.

docs/formats.md shows the resulting table; each of its rows names the test below that backs it.
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch

from oneword.cli import main as oneword_main
from oneword.errors import EmbeddingFileError

LAYOUTS = ("oneword", "diffusers", "a1111", "kohya", "comfyui")
FAMILIES = ("sd1", "sd2", "sdxl")
CONTAINERS = (".safetensors", ".pt", ".bin")
TOOLS = ("comfyui", "a1111", "kohya", "diffusers")
TOKEN = "<tok>"
NUM_VECTORS = 2
DOCS = Path(__file__).resolve().parents[2] / "docs" / "formats.md"


class Refused(Exception):
    """The tool's own rules do not load this file (it logs, skips or raises)."""


# ---------------------------------------------------------------------------------------
# The tools' readers


def comfyui_load_embed(name: str, directory: Path, embedding_size: int, embed_key: str):
    """ComfyUI `load_embed(embedding_name, embedding_directory, embedding_size, embed_key)`
    plus its width check; returns (K, d) rows."""
    # 1. The file: the name itself, else the name plus .safetensors, .pt or .bin.
    path = directory / name
    if not path.is_file():
        found = [directory / (name + ext) for ext in (".safetensors", ".pt", ".bin")]
        found = [p for p in found if p.is_file()]
        if not found:
            raise Refused(f"embedding:{name} does not exist")
        path = found[0]
    # 2. The container, by extension.
    try:
        if str(path).lower().endswith(".safetensors"):
            embed = safetensors.torch.load_file(path, device="cpu")
        else:
            embed = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:
        raise Refused(f"error loading embedding, skipping loading: {exc}") from None
    # 3. The tensor: string_to_param, else the encoder's key, else the first tensor.
    if "string_to_param" in embed:
        rows = next(iter(embed["string_to_param"].values()))
    elif embed_key in embed:
        rows = embed[embed_key]
    else:
        rows = next(iter(embed.values()))
    # 4. SDClipModel drops rows whose width is not the encoder's.
    if rows.shape[-1] != embedding_size:
        raise Refused(f"shape mismatch, {rows.shape[-1]} != {embedding_size}, ignored")
    return rows.reshape(-1, embedding_size)


# ComfyUI's tokenizers: (embedding_key, which width) per text encoder. SD2's tokenizer keeps
# SDTokenizer's default key "clip_l" (comfy/sd2_clip.py); SDXL's are clip_l and clip_g.
COMFYUI_ENCODERS = {"sd1": ["clip_l"], "sd2": ["clip_l"], "sdxl": ["clip_l", "clip_g"]}


def comfyui_read(path: Path, family: str, widths: list[int]) -> list[torch.Tensor]:
    """What ComfyUI gives each text encoder for `embedding:<stem>` in a prompt."""
    keys = COMFYUI_ENCODERS[family]
    return [comfyui_load_embed(path.stem, path.parent, w, k) for k, w in zip(keys, widths)]


def a1111_read(path: Path, family: str, widths: list[int]) -> list[torch.Tensor]:
    """AUTOMATIC1111's `load_from_file` + `create_embedding_from_data` + shape check."""
    name, ext = os.path.splitext(path.name)
    ext = ext.upper()
    try:
        if ext in (".BIN", ".PT"):
            data = torch.load(path, map_location="cpu", weights_only=True)
        elif ext == ".SAFETENSORS":
            data = safetensors.torch.load_file(path, device="cpu")
        else:
            raise Refused(f"{ext} files are not embeddings to A1111")
    except Refused:
        raise
    except Exception as exc:  # load_from_dir prints "Error loading embedding" and goes on
        raise Refused(f"Error loading embedding {path.name}: {exc}") from None
    if "string_to_param" in data:  # textual inversion embeddings
        params = data["string_to_param"]
        if len(params) != 1:
            raise Refused("embedding file has multiple terms in it")
        vectors = [next(iter(params.values())).float()]
        shape = vectors[0].shape[-1]
    elif type(data) is dict and "clip_g" in data and "clip_l" in data:  # SDXL embedding
        vectors = [data["clip_l"].float(), data["clip_g"].float()]
        shape = data["clip_g"].shape[-1] + data["clip_l"].shape[-1]
    elif type(data) is dict and type(next(iter(data.values()))) is torch.Tensor:  # diffusers
        if len(data) != 1:
            raise Refused("embedding file has multiple terms in it")
        emb = next(iter(data.values()))
        vectors = [(emb.unsqueeze(0) if emb.ndim == 1 else emb).float()]
        shape = vectors[0].shape[-1]
    else:
        raise Refused(f"Couldn't identify {path.name} as textual inversion or diffuser concept")
    # expected_shape: the width of the model's token embedding (SDXL: clip_l + clip_g).
    if shape != sum(widths):
        raise Refused(f"skipped: shape {shape} but the model expects {sum(widths)}")
    return vectors  # registered under `name`, the file name: the trigger word


def kohya_read(path: Path, family: str, widths: list[int]) -> list[torch.Tensor]:
    """kohya sd-scripts `load_weights` (train_textual_inversion.py, sdxl_...py)."""
    try:
        if os.path.splitext(path)[1] == ".safetensors":
            data = safetensors.torch.load_file(path)
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise Refused(f"cannot load {path.name}: {exc}") from None
    if family == "sdxl":
        embs = [data.get("clip_l", None), data.get("clip_g", None)]
        if any(e is None for e in embs):
            raise Refused("weight file does not contain weights for text encoder 1 and 2")
    else:
        if type(data) is not dict:
            raise Refused("weight file is not dict")
        if "string_to_param" in data:  # "compatible to Web UI's file format"
            data = data["string_to_param"]
        emb = next(iter(data.values()))
        if type(emb) is not torch.Tensor:
            raise Refused("weight file does not contains Tensor")
        embs = [emb.unsqueeze(0) if emb.ndim == 1 else emb]
    # The rows are copied into the text encoder's token embedding table, which must fit.
    for emb, width in zip(embs, widths):
        if emb.shape[-1] != width:
            raise Refused(f"{emb.shape[-1]}-wide rows do not fit a {width}-wide table")
    return embs


# Layouts whose SD 1.x/2.x key is not the token: diffusers needs token= for them.
DIFFUSERS_NEEDS_TOKEN = ("kohya", "comfyui")


def diffusers_read(pipe, path: Path, family: str, layout: str) -> list[torch.Tensor]:
    """diffusers' own `load_textual_inversion` into fresh copies of the pipeline's encoders:
    SD 1.x/2.x one call on the file; SDXL two calls, clip_l into text_encoder and clip_g
    into text_encoder_2 (the loading recipe diffusers documents for SDXL)."""
    pairs = [(copy.deepcopy(pipe.tokenizer), copy.deepcopy(pipe.text_encoder))]
    if family == "sdxl":
        pairs.append((copy.deepcopy(pipe.tokenizer_2), copy.deepcopy(pipe.text_encoder_2)))
    names = [TOKEN] + [f"{TOKEN}_{i}" for i in range(1, NUM_VECTORS)]
    try:
        if family == "sdxl":
            # diffusers reads the file the way its own loader does: by extension.
            if path.suffix == ".safetensors":
                state_dict = safetensors.torch.load_file(path)
            else:
                state_dict = torch.load(path, map_location="cpu", weights_only=True)
            for key, (tokenizer, text_encoder) in zip(("clip_l", "clip_g"), pairs):
                pipe.load_textual_inversion(
                    state_dict[key], token=names, tokenizer=tokenizer, text_encoder=text_encoder
                )
        else:
            tokenizer, text_encoder = pairs[0]
            pipe.load_textual_inversion(
                str(path),
                token=TOKEN if layout in DIFFUSERS_NEEDS_TOKEN else None,
                tokenizer=tokenizer,
                text_encoder=text_encoder,
                local_files_only=True,
            )
    except Exception as exc:
        raise Refused(f"load_textual_inversion: {exc}") from None
    rows = []
    for tokenizer, text_encoder in pairs:
        ids = tokenizer.convert_tokens_to_ids(names)
        if tokenizer.unk_token_id in ids:
            raise Refused(f"the tokenizer did not get {names}")
        rows.append(text_encoder.get_input_embeddings().weight[ids].detach().clone())
    return rows


# ---------------------------------------------------------------------------------------
# The files oneword writes


@pytest.fixture(scope="module")
def tiny(tiny_sd1_dir, tiny_sd2_dir, tiny_sdxl_dir):
    """Per family: the tiny diffusers pipeline and its text encoders' widths."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    out = {}
    for family, folder in (("sd1", tiny_sd1_dir), ("sd2", tiny_sd2_dir), ("sdxl", tiny_sdxl_dir)):
        cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
        pipe = cls.from_pretrained(folder, local_files_only=True)
        encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if family == "sdxl" else [])
        widths = [e.get_input_embeddings().embedding_dim for e in encoders]
        out[family] = {"dir": folder, "pipe": pipe, "widths": widths}
    return out


@pytest.fixture(scope="module")
def sources(tiny, tmp_path_factory):
    """Per family: a token learned in the tiny model, saved the way `oneword invert` saves
    it (`save_model_token`), and its rows, per text encoder (K, d)."""
    from oneword.embeddings import save_model_token
    from oneword.models import load_model
    from oneword.tokens import add_placeholder, set_rows

    root = tmp_path_factory.mktemp("sources")
    out = {}
    for index, family in enumerate(FAMILIES):
        model = load_model(tiny[family]["dir"], device="cpu")
        placeholder = add_placeholder(model, TOKEN, "cat", NUM_VECTORS)
        generator = torch.Generator().manual_seed(index)
        rows = [torch.randn(NUM_VECTORS, d, generator=generator) for d in tiny[family]["widths"]]
        set_rows(model, placeholder, rows)
        path = save_model_token(
            root / family / "learned_embeds.safetensors", model, placeholder, method="test", steps=3
        )
        out[family] = {"path": path, "rows": rows}
    return out


def export(src: Path, layout: str, out: Path, *extra: str) -> int:
    return oneword_main(["export", str(src), "--to", layout, str(out), *extra])


@pytest.fixture(scope="module")
def exported(sources, tmp_path_factory):
    """Every layout x family x container, written by the `oneword export` command."""
    root = tmp_path_factory.mktemp("exported")
    files = {}
    for family in FAMILIES:
        for layout in LAYOUTS:
            for container in CONTAINERS:
                path = root / f"{family}-{layout}{container}"
                assert export(sources[family]["path"], layout, path) == 0
                files[layout, family, container] = path
    return files


CASES = [
    pytest.param(layout, container, family, id=f"{layout}{container}-{family}")
    for layout in LAYOUTS
    for container in CONTAINERS
    for family in FAMILIES
]


@pytest.mark.parametrize(("layout", "container", "family"), CASES)
def test_every_tool_reads(layout, container, family, exported, sources, tiny):
    path = exported[layout, family, container]
    want = sources[family]["rows"]
    widths = tiny[family]["widths"]
    is_safetensors = path.read_bytes()[8:9] == b"{"
    assert is_safetensors == (container == ".safetensors"), "the container follows the name"
    readers = {
        "comfyui": lambda: comfyui_read(path, family, widths),
        "a1111": lambda: a1111_read(path, family, widths),
        "kohya": lambda: kohya_read(path, family, widths),
        "diffusers": lambda: diffusers_read(tiny[family]["pipe"], path, family, layout),
    }
    failures = {}
    for tool, read in readers.items():
        try:
            got = read()
        except Refused as exc:
            failures[tool] = str(exc)
            continue
        assert len(got) == len(want), tool
        for got_rows, want_rows in zip(got, want):
            torch.testing.assert_close(got_rows, want_rows, rtol=0, atol=0, msg=tool)
    assert not failures, failures


# ---------------------------------------------------------------------------------------
# The readers can fail: what the tools themselves refuse


def test_readers_refuse_what_the_tools_refuse(sources, tiny, tmp_path):
    sd1 = sources["sd1"]["path"]
    # The old `--to a1111 concept.safetensors`: a torch pickle under a .safetensors name.
    mislabelled = tmp_path / "concept.safetensors"
    torch.save({"string_to_param": {"*": sources["sd1"]["rows"][0]}, "name": TOKEN}, mislabelled)
    widths = tiny["sd1"]["widths"]
    for read in (comfyui_read, a1111_read, kohya_read):
        with pytest.raises(Refused):
            read(mislabelled, "sd1", widths)
    with pytest.raises(Refused, match="load_textual_inversion"):
        diffusers_read(tiny["sd1"]["pipe"], mislabelled, "sd1", "a1111")
    # Rows of the wrong width are dropped by every tool.
    for family in ("sd2", "sdxl"):
        for read in (comfyui_read, a1111_read, kohya_read):
            with pytest.raises(Refused):
                read(sd1, family, tiny[family]["widths"])
    with pytest.raises(Refused):
        diffusers_read(tiny["sd2"]["pipe"], sd1, "sd2", "oneword")
    # A1111 looks only at .pt, .bin and .safetensors files.
    renamed = tmp_path / "concept.ckpt"
    renamed.write_bytes(sd1.read_bytes())
    with pytest.raises(Refused, match="not embeddings"):
        a1111_read(renamed, "sd1", widths)


# ---------------------------------------------------------------------------------------
# Names: .safetensors is always safetensors; other suffixes are refused


# The tensors a .safetensors export holds, per layout and family.
SAFETENSORS_KEYS = {
    ("oneword", "sd1"): [TOKEN],
    ("diffusers", "sd1"): [TOKEN],
    ("a1111", "sd1"): [TOKEN],
    ("kohya", "sd1"): ["emb_params"],
    ("comfyui", "sd1"): ["clip_l"],
    ("comfyui", "sd2"): ["clip_h"],
}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_safetensors_name_gets_a_safetensors_file(layout, family, sources, tmp_path):
    out = tmp_path / "concept.safetensors"
    assert export(sources[family]["path"], layout, out) == 0
    with safetensors.safe_open(str(out), framework="pt") as handle:
        keys = sorted(handle.keys())
        metadata = handle.metadata()
        tensors = [handle.get_tensor(k) for k in keys]
    if family == "sdxl":
        expected = ["clip_g", "clip_l"]
    else:
        expected = SAFETENSORS_KEYS.get((layout, family), SAFETENSORS_KEYS[layout, "sd1"])
    assert keys == sorted(expected)
    assert all(t.dtype == torch.float32 and t.shape[0] == NUM_VECTORS for t in tensors)
    assert metadata["token"] == TOKEN and metadata["oneword_format"] == layout
    assert metadata["model_family"] == family


@pytest.mark.parametrize("name", ["concept.ckpt", "concept", "concept.SAFETENSORS", "c.pth"])
def test_an_unknown_suffix_exits_2_and_lists_the_choices(name, sources, tmp_path, capsys):
    out = tmp_path / name
    assert export(sources["sd1"]["path"], "a1111", out) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert str(out) in err and all(s in err for s in (".safetensors", ".pt", ".bin"))
    assert not out.exists() and not list(tmp_path.iterdir())


def test_invert_and_encode_outputs_follow_the_same_rule(tiny, tmp_path):
    """`oneword invert`/`encode` write through `save_model_token`, which names files by the
    same rule as `oneword export`."""
    from oneword.embeddings import save_model_token
    from oneword.models import load_model
    from oneword.tokens import add_placeholder

    model = load_model(tiny["sd1"]["dir"], device="cpu")
    placeholder = add_placeholder(model, TOKEN, "cat", 1)
    with pytest.raises(EmbeddingFileError, match=r"\.safetensors .*\.pt .*\.bin"):
        save_model_token(tmp_path / "tok.ckpt", model, placeholder, method="test", steps=1)
    for format in ("oneword", "a1111"):
        path = tmp_path / f"{format}.pt"
        save_model_token(path, model, placeholder, method="test", steps=1, format=format)
        data = torch.load(path, weights_only=True)
        rows = data["string_to_param"]["*"] if format == "a1111" else data[TOKEN]
        assert rows.shape == (1, 32)
        torch.testing.assert_close(a1111_read(path, "sd1", [32])[0], rows, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------
# A folder OUT: <trigger>.safetensors, called by its name


@pytest.mark.parametrize("family", FAMILIES)
def test_comfyui_folder_output_is_called_by_its_trigger_word(
    family, sources, tiny, tmp_path, capsys
):
    folder = tmp_path / "ComfyUI" / "models" / "embeddings"
    folder.mkdir(parents=True)
    assert export(sources[family]["path"], "comfyui", folder) == 0
    out = capsys.readouterr().out
    assert sorted(p.name for p in folder.iterdir()) == ["tok.safetensors"]
    assert "embedding:tok" in out
    # The prompt syntax ComfyUI parses: the word after "embedding:" names the file.
    prompt = re.search(r"embedding:\S+", out).group(0)
    name = prompt[len("embedding:") :]
    keys = COMFYUI_ENCODERS[family]
    got = [
        comfyui_load_embed(name, folder, width, key)
        for key, width in zip(keys, tiny[family]["widths"])
    ]
    for got_rows, want_rows in zip(got, sources[family]["rows"], strict=True):
        torch.testing.assert_close(got_rows, want_rows, rtol=0, atol=0)


def test_a1111_folder_output_and_a_trailing_slash(sources, tmp_path, capsys):
    webui = tmp_path / "stable-diffusion-webui" / "embeddings"
    src = sources["sd1"]["path"]
    assert export(src, "a1111", f"{webui}/", "--token", "<my-cat>") == 0  # created
    assert (webui / "my-cat.safetensors").is_file()
    assert "trigger word: my-cat" in capsys.readouterr().out
    assert export(src, "a1111", webui, "--token", "<:>") == 2
    assert "no letters or digits" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------
# docs/formats.md: one row per layout x container, each naming the test that backs it


def test_the_docs_table_rows_are_backed_by_these_tests():
    text = DOCS.read_text(encoding="utf-8")
    rows = [r for r in text.splitlines() if r.startswith("|") and "test_every_tool_reads[" in r]
    named = sorted(re.search(r"test_every_tool_reads\[([^\]]+)-\*\]", r).group(1) for r in rows)
    assert named == sorted(f"{layout}{container}" for layout in LAYOUTS for container in CONTAINERS)
    for row in rows:  # every row says every tool reads it, as test_every_tool_reads checks
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        assert sum(c.startswith("yes") for c in cells) == len(TOOLS), row
