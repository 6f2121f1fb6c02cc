"""Embedding files: save a learned token so other tools can use it, and load theirs.

One in-memory form, `TokenEmbedding` (a trigger word and, per text encoder, its (K, d)
fp32 vectors), and five layouts on disk (docs/formats.md has the table of which tool reads
which file, each row backed by tests/core/test_embeddings_readers.py):

| layout    | SD 1.x / 2.x                                       | SDXL                     |
|-----------|----------------------------------------------------|--------------------------|
| oneword   | `{token: (K, d)}` + metadata                       | `{clip_l, clip_g}`       |
| diffusers | the same (diffusers' `load_textual_inversion`)     | the same                 |
| a1111     | pickle: the A1111 dict; safetensors: `{token}`     | `{clip_l, clip_g}`       |
| kohya     | `{"emb_params": (K, d)}` + modelspec metadata      | `{clip_l, clip_g}`       |
| comfyui   | `{"clip_l"}` (SD1) / `{"clip_h"}` (SD2)            | `{clip_l, clip_g}`       |

| layout    | SD 3.x                                | FLUX.1                                        |
|-----------|---------------------------------------|-----------------------------------------------|
| oneword   | `{clip_l, clip_g, t5}`                | `{clip_l, t5}`                                |
| diffusers | the same (no SD3 loader in diffusers) | the same (`load_textual_inversion` per encoder) |
| a1111     | `{clip_l, clip_g}` (A1111 reads no T5) | refused (A1111 has no FLUX embeddings)        |
| kohya     | refused (sd-scripts trains neither)   | refused                                       |
| comfyui   | `{clip_l, clip_g, t5xxl}`             | `{clip_l, t5xxl}`                             |

The container follows the output's name, because A1111, ComfyUI and kohya pick their
loader by extension (`output_container`): `.safetensors` is safetensors, `.pt` and `.bin`
are `torch.save` pickles that load under `torch.load(weights_only=True)`; other names are
refused. Metadata (token, steps, base model) survives in safetensors and in the A1111 dict.

SD 3.x and FLUX.1 keys are OneTrainer's and diffusers' FLUX training script's names; a
file's `t5xxl` (ComfyUI's name) is read as `t5`.

Reading detects the layout from the bytes, never from the file extension, and unpickles
only with `torch.load(weights_only=True)`: an embedding file from the internet must not be
able to run code. Writing is atomic: a temporary file in the same folder, fsync, then
`os.replace`, so a crash never leaves half a file under the final name.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import BinaryIO

import torch

from .errors import EmbeddingFileError, TokenError

FORMATS = ("oneword", "diffusers", "a1111", "kohya", "comfyui")
FAMILIES = ("sd1", "sd2", "sdxl", "sd3", "flux")
SDXL_KEYS = ("clip_l", "clip_g")  # CLIP ViT-L (text_encoder), OpenCLIP bigG (text_encoder_2)
SD3_KEYS = ("clip_l", "clip_g", "t5")  # + T5-XXL (text_encoder_3)
FLUX_KEYS = ("clip_l", "t5")  # CLIP ViT-L (text_encoder, pooled), T5-XXL (text_encoder_2)
# Multi-encoder layouts by their keys, in the model's encoder order.
KEY_LAYOUTS = {SDXL_KEYS: "sdxl", SD3_KEYS: "sd3", FLUX_KEYS: "flux"}
ENCODER_FILE_KEYS = ("clip_l", "clip_g", "t5")
KEY_ALIASES = {"t5xxl": "t5"}  # ComfyUI's name for the T5-XXL rows
KOHYA_KEY = "emb_params"
A1111_TOKEN_ID = 265  # A1111 writes this placeholder id for "*"; nothing reads it back
# Token-embedding widths of the real models, for guessing a file's family from its shapes.
WIDTH_FAMILY = {768: "sd1", 1024: "sd2"}
# The modelspec architecture ids kohya's sd-scripts writes (sai_model_spec.py).
KOHYA_ARCHITECTURE = {
    "sd1": "stable-diffusion-v1",
    "sd2": "stable-diffusion-v2-512",
    "sd2-v": "stable-diffusion-v2-768-v",
    "sdxl": "stable-diffusion-xl-v1-base",
}
KOHYA_RESOLUTION = {"sd1": 512, "sd2": 512, "sd2-v": 768, "sdxl": 1024}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit on the JSON header
DIFFUSERS_FOLDER_FILES = ("learned_embeds.safetensors", "learned_embeds.bin")
# The container each output name gets (A1111, ComfyUI and kohya choose their loader by it).
CONTAINERS = {
    ".safetensors": "safetensors",  # every tool; keeps the metadata
    ".pt": "pickle",  # torch.save, A1111's own container
    ".bin": "pickle",  # torch.save, diffusers' learned_embeds.bin
}
# ComfyUI looks a file's tensor up by the key of the text encoder it is loading
# (comfy/sd1_clip.py `load_embed(..., embed_key)`), falling back to the first tensor.
# One key per text encoder, in the model's encoder order. Flow models extend this with
# "sd3": ("clip_l", "clip_g", "t5xxl") and "flux": ("clip_l", "t5xxl").
COMFYUI_KEYS = {
    "sd1": ("clip_l",),  # CLIP ViT-L/14
    "sd2": ("clip_h",),  # OpenCLIP ViT-H/14 (ComfyUI's SD2 reads it via its fallback)
    "sdxl": SDXL_KEYS,
    "sd3": ("clip_l", "clip_g", "t5xxl"),  # ComfyUI's name for T5-XXL (width 4096)
    "flux": ("clip_l", "t5xxl"),
}
# Single-encoder keys the reader accepts as one whole embedding.
SINGLE_ENCODER_KEYS = ("clip_l", "clip_h")


@dataclass
class TokenEmbedding:
    """A learned token as it lives in a file.

    Attributes:
        token: the trigger word, e.g. "<cat>".
        vectors: per text encoder, fp32 (K, d): SD 1.x/2.x `[(K, 768 or 1024)]`,
            SDXL `[clip_l (K, 768), clip_g (K, 1280)]`.
        metadata: string facts (base model, method, steps, ...); empty when the file had none.
        source_format: one of `FORMATS` (what it was read as or built for).
        path: the file it was read from, if any (for error messages).
        keys: per vector block its file key ("clip_l", "clip_g", "t5"); None means SDXL's
            (clip_l, clip_g) for two blocks and the token itself for one.
    """

    token: str
    vectors: list[torch.Tensor]
    metadata: dict[str, str] = field(default_factory=dict)
    source_format: str = "oneword"
    path: Path | None = None
    keys: tuple[str, ...] | None = None

    @property
    def encoder_keys(self) -> tuple[str, ...] | None:
        """The file keys of the vector blocks; None for a single-encoder (SD 1.x/2.x) token."""
        if self.keys is not None and len(self.vectors) > 1:
            return tuple(self.keys)
        return {2: SDXL_KEYS, 3: SD3_KEYS}.get(len(self.vectors))

    @property
    def num_vectors(self) -> int:
        return int(self.vectors[0].shape[0])

    @property
    def widths(self) -> list[int]:
        return [int(v.shape[-1]) for v in self.vectors]

    @property
    def family_guess(self) -> str:
        """The model family: from the keys for several encoders (sdxl, sd3, flux), else from
        the width (768 sd1, 1024 sd2), else the file's own `model_family` metadata (tiny test
        models), else "unknown"."""
        if len(self.vectors) > 1:
            family = KEY_LAYOUTS.get(self.encoder_keys, "unknown")
            # An SD3 token exported for A1111 keeps only clip_l + clip_g.
            return "sd3" if self.metadata.get("model_family") == "sd3" else family
        if self.widths[0] in WIDTH_FAMILY:
            return WIDTH_FAMILY[self.widths[0]]
        family = self.metadata.get("model_family", "")
        return family if family in FAMILIES else "unknown"

    def describe(self) -> str:
        widths = "+".join(str(w) for w in self.widths)
        return f"token {self.token!r}, K={self.num_vectors}, width {widths} ({self.family_guess})"


# ---------------------------------------------------------------------------------------
# Helpers


def _label(emb: TokenEmbedding) -> str:
    return str(emb.path) if emb.path is not None else f"embedding {emb.token!r}"


def _check_format(format: str) -> str:
    if format not in FORMATS:
        raise EmbeddingFileError(
            f"unknown embedding format {format!r}; choose one of {', '.join(FORMATS)}"
        )
    return format


def _as_vectors(value, where: str, what: str) -> torch.Tensor:
    """One stored tensor -> fp32 contiguous (K, d); 1-D (d,) means K = 1."""
    if not isinstance(value, torch.Tensor):
        raise EmbeddingFileError(
            f"{where}: {what} is a {type(value).__name__}, not a tensor; "
            "this is not a textual-inversion embedding file"
        )
    if not value.is_floating_point():
        raise EmbeddingFileError(
            f"{where}: {what} has dtype {str(value.dtype).replace('torch.', '')}; "
            "embedding vectors must be floating point"
        )
    if value.ndim == 1:
        value = value.unsqueeze(0)  # (d,) -> (1, d)
    if value.ndim != 2 or value.shape[0] == 0 or value.shape[1] == 0:
        raise EmbeddingFileError(
            f"{where}: {what} has shape {tuple(value.shape)}; expected (K, d) vectors, "
            "e.g. (1, 768) or (4, 768)"
        )
    value = value.detach().to("cpu", torch.float32).contiguous()
    if not bool(torch.isfinite(value).all()):
        bad = int((~torch.isfinite(value)).sum())
        raise EmbeddingFileError(
            f"{where}: {what} holds {bad} non-finite value(s) (NaN/inf); the token was "
            "probably trained in fp16 and diverged, retrain it"
        )
    return value


def _string_metadata(metadata: dict | None) -> dict[str, str]:
    return {str(k): str(v) for k, v in (metadata or {}).items() if v is not None}


def _check_embedding(emb: TokenEmbedding) -> list[torch.Tensor]:
    """Validate before writing; returns fp32 contiguous vectors."""
    where = _label(emb)
    if not isinstance(emb.token, str) or not emb.token or re.search(r"\s", emb.token):
        raise EmbeddingFileError(
            f"{where}: token {emb.token!r} must be one word without spaces, e.g. '<my-cat>'"
        )
    if len(emb.vectors) not in (1, 2, 3):
        raise EmbeddingFileError(
            f"{where}: has vectors for {len(emb.vectors)} text encoders; expected 1 "
            "(SD 1.x/2.x), 2 (SDXL: clip_l, clip_g; FLUX: clip_l, t5) or 3 (SD3: clip_l, clip_g, t5)"
        )
    if len(emb.vectors) > 1 and emb.encoder_keys not in KEY_LAYOUTS:
        raise EmbeddingFileError(
            f"{where}: keys {list(emb.keys or [])} for {len(emb.vectors)} text encoders are "
            f"no known layout; expected one of {[list(k) for k in KEY_LAYOUTS]}"
        )
    vectors = [
        _as_vectors(v, where, f"the vectors for text encoder {i + 1}")
        for i, v in enumerate(emb.vectors)
    ]
    if len({v.shape[0] for v in vectors}) != 1:
        raise EmbeddingFileError(
            f"{where}: the text encoders have different numbers of vectors "
            f"({', '.join(str(v.shape[0]) for v in vectors)}); each needs the same K"
        )
    return vectors


def _file_metadata(emb: TokenEmbedding, vectors: list[torch.Tensor], format: str) -> dict[str, str]:
    """The metadata we write: the embedding's own facts, then what the vectors say."""
    from . import __version__

    metadata = {
        k: v
        for k, v in _string_metadata(emb.metadata).items()
        if not k.startswith("modelspec.") and k != "oneword_format"
    }
    metadata.update(
        {
            "format": "pt",  # the safetensors convention for torch tensors
            "token": emb.token,
            "model_family": emb.family_guess,
            "d": ",".join(str(v.shape[1]) for v in vectors),
            "K": str(vectors[0].shape[0]),
            "oneword_version": __version__,
            "oneword_format": format,
        }
    )
    return metadata


def _kohya_metadata(metadata: dict[str, str]) -> dict[str, str]:
    """`modelspec.*` keys as kohya's sd-scripts writes them for textual inversion."""
    family = metadata.get("model_family", "unknown")
    v_prediction = metadata.get("prediction_type") in ("v_prediction", "v")
    arch_key = "sd2-v" if family == "sd2" and v_prediction else family
    spec = {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.title": metadata["token"],
        "modelspec.trigger_phrase": metadata["token"],
        "modelspec.date": datetime.now(timezone.utc).replace(microsecond=0).isoformat(),
    }
    if arch_key in KOHYA_ARCHITECTURE:
        spec["modelspec.architecture"] = f"{KOHYA_ARCHITECTURE[arch_key]}/textual-inversion"
        side = metadata.get("resolution", "")
        side = int(side) if side.isdigit() else KOHYA_RESOLUTION[arch_key]
        spec["modelspec.resolution"] = f"{side}x{side}"
    if "prediction_type" in metadata:
        spec["modelspec.prediction_type"] = "v" if v_prediction else "epsilon"
    return {**metadata, **spec}


def _atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Write through `oneword.io.atomic_path` (temporary file, fsync, `os.replace`)."""
    from .io import atomic_path

    try:
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as handle:
                write(handle)
    except OSError as exc:
        raise EmbeddingFileError(f"could not write {path}: {exc}") from None


def output_container(path: str | os.PathLike) -> str:
    """The container an embedding written to `path` gets, from its suffix: "safetensors" for
    `.safetensors`, "pickle" (torch.save, zip) for `.pt` and `.bin`.

    Every output (`oneword export`, `invert`, `encode`, the evaluation harness) is named
    through this one rule, because A1111, ComfyUI and kohya choose their loader by extension:
    a pickle under a `.safetensors` name opens in none of them.

    Raises:
        EmbeddingFileError: any other suffix (the message lists the choices).
    """
    path = Path(path)
    if path.suffix not in CONTAINERS:
        given = f"a {path.suffix!r} name" if path.suffix else "a name without a suffix"
        raise EmbeddingFileError(
            f"{path}: cannot write an embedding under {given}; name it .safetensors "
            "(safetensors, read by every tool), .pt (torch pickle, A1111's own) or .bin "
            "(torch pickle, diffusers' own)"
        )
    return CONTAINERS[path.suffix]


def trigger_file_name(token: str) -> str:
    """The file stem for a trigger word: A1111 and ComfyUI call an embedding by its file
    name, so keep what both accept in a name on every OS ("<my-cat>" -> "my-cat")."""
    # A1111's own rule (create_embedding keeps alnum and "._- "), minus the space that
    # would split `embedding:NAME` in a ComfyUI prompt.
    name = "".join(c for c in token if c.isalnum() or c in "._-").strip("._-")
    if not name:
        raise EmbeddingFileError(
            f"token {token!r} has no letters or digits to name a file after; "
            "give OUT as a file name, e.g. my-token.safetensors"
        )
    return name


def comfyui_keys(emb: TokenEmbedding) -> tuple[str, ...]:
    """The ComfyUI key of each text encoder's vectors (`COMFYUI_KEYS`), from the family."""
    if len(emb.vectors) > 1:
        return COMFYUI_KEYS[KEY_LAYOUTS[emb.encoder_keys]]
    return COMFYUI_KEYS["sd2"] if emb.family_guess == "sd2" else COMFYUI_KEYS["sd1"]


# ---------------------------------------------------------------------------------------
# Reading


def _sniff(path: Path) -> str:
    """Which reader the bytes call for: "safetensors", "zip" (torch.save) or "pickle"."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            head = handle.read(9)
    except OSError as exc:
        raise EmbeddingFileError(
            f"cannot read embedding file {path}: {exc.strerror or exc}"
        ) from None
    if size == 0:
        raise EmbeddingFileError(f"{path} is empty (0 bytes); it is not an embedding file")
    # safetensors first: its 8-byte header length can itself start with b"\x80" or b"PK".
    if len(head) == 9 and head[8:9] == b"{":
        header_len = int.from_bytes(head[:8], "little")
        if 0 < header_len <= MAX_HEADER_BYTES and 8 + header_len <= size:
            return "safetensors"
        if not head.startswith((b"PK", b"\x80")):
            raise EmbeddingFileError(
                f"{path}: safetensors header claims {header_len} bytes but the file has "
                f"{size}; the file is truncated or corrupt (download it again)"
            )
    if head.startswith(b"PK"):
        return "zip"
    if head.startswith(b"\x80"):
        return "pickle"
    raise EmbeddingFileError(
        f"{path} is not an embedding file: it starts with bytes {head[:8].hex(' ')}, "
        "neither safetensors nor a torch.save file"
    )


def _looks_like_safetensors(path: Path) -> bool:
    """Byte 8 is "{": a safetensors header starts there (its length field may be broken)."""
    with open(path, "rb") as handle:
        return handle.read(9)[8:9] == b"{"


def _broken_safetensors(path: Path) -> EmbeddingFileError:
    with open(path, "rb") as handle:
        header_len = int.from_bytes(handle.read(8), "little")
    size = path.stat().st_size
    return EmbeddingFileError(
        f"{path} is a broken safetensors file: its header claims {header_len:,} bytes but "
        f"the file has {size:,} (the limit is {MAX_HEADER_BYTES:,}); it is truncated or "
        "corrupt: download or export it again"
    )


def _unrelated_keys(path: Path, keys: list[str]) -> EmbeddingFileError:
    keys = sorted(keys)
    shown = ", ".join(repr(k) for k in keys[:6]) + (", ..." if len(keys) > 6 else "")
    hint = " Is it a model checkpoint or LoRA rather than an embedding?" if len(keys) > 2 else ""
    return EmbeddingFileError(
        f"{path} holds {len(keys)} unrelated keys ({shown}); an embedding file holds one "
        f"tensor (the token, or {KOHYA_KEY!r}), clip_l + clip_g (SDXL), clip_l + clip_g + t5 "
        f"(SD3), clip_l + t5 (FLUX), or an A1111 'string_to_param' dict.{hint}"
    )


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    with open(path, "rb") as handle:
        header_len = int.from_bytes(handle.read(8), "little")
        raw_header = handle.read(header_len)
    try:
        header = json.loads(raw_header)
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except ValueError as exc:
        raise EmbeddingFileError(
            f"{path}: corrupt safetensors header ({exc}); download or export the file again"
        ) from None
    keys = [k for k in header if k != "__metadata__"]
    # Refuse big files (a whole checkpoint passed by mistake) before loading any tensor.
    if len(keys) > 3 or (len(keys) == 3 and not set(keys) <= {*ENCODER_FILE_KEYS, *KEY_ALIASES}):
        raise _unrelated_keys(path, keys)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            tensors = {k: handle.get_tensor(k) for k in keys}
            metadata = dict(handle.metadata() or {})
    except Exception as exc:  # SafetensorError, OSError: truncated or corrupt data
        raise EmbeddingFileError(
            f"{path}: corrupt or truncated safetensors file ({exc}); download or export it again"
        ) from None
    return tensors, metadata


def _read_pickle(path: Path):
    import pickle

    try:
        # A file object, not the path: torch.load picks a loader by extension for paths
        # (".safetensors" -> safetensors), and the bytes have already decided.
        with open(path, "rb") as handle, warnings.catch_warnings():
            # torch warns about a pickle protocol it did not write before it fails on
            # garbage; the error below says what is wrong with the file.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(handle, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = _unpickling_reason(str(exc))
        if re.search(r"GLOBAL|global|blocked|Unsupported class", reason):
            raise EmbeddingFileError(
                f"{path} is not a safe tensor file and was refused: unpickling it would import "
                f"or run code ({reason[:200]}). Only plain tensor dicts (diffusers .bin, A1111 "
                ".pt) are read; ask its author for a .safetensors file"
            ) from None
        raise EmbeddingFileError(
            f"{path}: not a readable pickle ({reason[:200] or 'malformed data'}); it is "
            "truncated, corrupt or not a torch.save file"
        ) from None
    except Exception as exc:
        raise EmbeddingFileError(
            f"{path}: unreadable torch file ({type(exc).__name__}: {str(exc)[:200]}); "
            "it is truncated, corrupt or not a torch.save file"
        ) from None


def _unpickling_reason(message: str) -> str:
    """The reason in torch's weights-only error, without the page of advice around it (to
    turn the check off, and a link): "Trying to load unsupported GLOBAL posix.system ...",
    "Unsupported operand 110", ..."""
    text = message.split("Check the documentation of torch.load")[0]
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:")[-1]
    else:  # "... from a trusted source.\n\n\nTrying to load unsupported GLOBAL ..."
        text = text.split("from a trusted source.")[-1]
    text = text.split(" Please use")[0]  # how to allowlist the global
    return re.sub(r"\s+", " ", text).strip()


def _parse(obj, metadata: dict[str, str], path: Path, *, token: str | None) -> TokenEmbedding:
    """A loaded dict (or tensor) -> TokenEmbedding, recognising every layout we read."""
    where = str(path)
    if isinstance(obj, torch.Tensor):  # a bare tensor saved with torch.save
        vectors = [_as_vectors(obj, where, "the tensor")]
        return TokenEmbedding(token or path.stem, vectors, metadata, "diffusers", path)
    if not isinstance(obj, dict):
        raise EmbeddingFileError(
            f"{where} holds a {type(obj).__name__}, not a dict of tensors; "
            "it is not a textual-inversion embedding file"
        )
    if not obj:
        raise EmbeddingFileError(f"{where} holds no tensors; it is not an embedding file")
    if "string_to_param" in obj:  # 1. A1111 / original textual_inversion .pt
        params = obj["string_to_param"]
        if not isinstance(params, dict) or not params:
            raise EmbeddingFileError(
                f"{where}: A1111 'string_to_param' is a {type(params).__name__}, not a dict of tensors"
            )
        value = params["*"] if "*" in params else next(iter(params.values()))
        vectors = [_as_vectors(value, where, "string_to_param['*']")]
        stored = obj.get("oneword_metadata")
        if isinstance(stored, dict):
            metadata = _string_metadata(stored)
        else:
            metadata = _string_metadata(
                {
                    "steps": obj.get("step"),
                    "sd_checkpoint": obj.get("sd_checkpoint"),
                    "sd_checkpoint_name": obj.get("sd_checkpoint_name"),
                }
            )
        name = obj.get("name") if isinstance(obj.get("name"), str) and obj.get("name") else None
        return TokenEmbedding(token or name or path.stem, vectors, metadata, "a1111", path)

    obj = {KEY_ALIASES.get(str(k), str(k)): v for k, v in obj.items()}
    keys = sorted(obj)
    present = [k for k in ENCODER_FILE_KEYS if k in obj]
    written_as = metadata.get("oneword_format")
    kohya_meta = any(k.startswith(("modelspec.", "ss_")) for k in metadata)
    stored_token = metadata.get("token") or None
    if len(keys) == 1 and keys[0] in SINGLE_ENCODER_KEYS:  # 2. ComfyUI, one encoder
        vectors = [_as_vectors(obj[keys[0]], where, repr(keys[0]))]
        source = written_as if written_as in FORMATS else "comfyui"
        return TokenEmbedding(token or stored_token or path.stem, vectors, metadata, source, path)
    layout = next((k for k in KEY_LAYOUTS if sorted(k) == keys), None)
    if present and layout is None:  # 3. SDXL / SD3 / FLUX, which need every encoder
        # Name what is wrong against the closest layout (SDXL first on a tie).
        closest = max(KEY_LAYOUTS, key=lambda layout: len(set(layout) & set(keys)))
        missing = [k for k in closest if k not in obj]
        extra = [k for k in keys if k not in closest]
        problem = f"lacks {missing[0]!r}" if missing else f"also holds {', '.join(extra)}"
        raise EmbeddingFileError(
            f"{where}: {KEY_LAYOUTS[closest].upper()} embedding with keys {keys} {problem}; "
            "SDXL needs exactly clip_l (text_encoder) + clip_g (text_encoder_2), SD3 "
            "clip_l + clip_g + t5, FLUX clip_l + t5 (ComfyUI's t5xxl is read as t5)"
        )
    if present:
        vectors = [_as_vectors(obj[k], where, repr(k)) for k in layout]
        counts = {k: int(v.shape[0]) for k, v in zip(layout, vectors)}
        if len(set(counts.values())) != 1:
            listed = ", ".join(f"{k} has {n}" for k, n in counts.items())
            raise EmbeddingFileError(
                f"{where}: {listed} vectors; every encoder needs the same number K"
            )
        guessed = "kohya" if kohya_meta else "a1111" if layout == SDXL_KEYS else "oneword"
        source = written_as if written_as in FORMATS else guessed
        return TokenEmbedding(
            token or stored_token or path.stem, vectors, metadata, source, path, layout
        )
    if keys == [KOHYA_KEY]:  # 4. kohya sd-scripts
        vectors = [_as_vectors(obj[KOHYA_KEY], where, repr(KOHYA_KEY))]
        return TokenEmbedding(token or stored_token or path.stem, vectors, metadata, "kohya", path)
    if len(keys) == 1:  # 5. diffusers / oneword: {token: (K, d)}
        ((key, value),) = obj.items()
        vectors = [_as_vectors(value, where, f"the tensor {key!r}")]
        source = written_as if written_as in FORMATS else "diffusers"
        return TokenEmbedding(token or str(key), vectors, metadata, source, path)
    raise _unrelated_keys(path, keys)


def load_embedding(path: str | os.PathLike, *, token: str | None = None) -> TokenEmbedding:
    """Read any embedding file we know, detecting its layout from its content.

    Args:
        path: a .safetensors / .pt / .bin file (extension ignored), or a diffusers
            textual-inversion folder holding learned_embeds.safetensors or .bin.
        token: use this trigger word instead of the one stored in the file.

    Returns:
        The `TokenEmbedding`, vectors fp32 (K, d) per text encoder.

    Raises:
        EmbeddingFileError: unreadable, unsafe (code-running pickle), or not an embedding.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        found = [path / name for name in DIFFUSERS_FOLDER_FILES if (path / name).is_file()]
        if not found:
            raise EmbeddingFileError(
                f"{path} is a folder without {' or '.join(DIFFUSERS_FOLDER_FILES)}; "
                "pass the embedding file itself"
            )
        path = found[0]
    if not path.exists():
        raise EmbeddingFileError(f"embedding file {path} does not exist")
    kind = _sniff(path)
    if kind != "safetensors" and _looks_like_safetensors(path):
        try:
            obj = _read_pickle(path)
        except EmbeddingFileError:
            raise _broken_safetensors(path) from None
        return _parse(obj, {}, path, token=token)
    if kind == "safetensors":
        tensors, metadata = _read_safetensors(path)
        return _parse(tensors, metadata, path, token=token)
    return _parse(_read_pickle(path), {}, path, token=token)


# ---------------------------------------------------------------------------------------
# Writing


def _layout_tensors(emb: TokenEmbedding, vectors: list[torch.Tensor], format: str) -> dict:
    """The keys `format` stores the vectors under (the table in the module docstring)."""
    if format == "comfyui":
        return dict(zip(comfyui_keys(emb), vectors))
    if format == "a1111" and emb.family_guess == "sd3":
        # A1111's SD3 path reads clip_l and clip_g and has no T5 (the prompt's T5 half
        # then sees the word as ordinary text).
        return dict(zip(SDXL_KEYS, vectors[:2]))
    if len(vectors) > 1:
        # Every tool reads SDXL as clip_l + clip_g; SD3 adds t5, FLUX is clip_l + t5.
        return dict(zip(emb.encoder_keys, vectors))
    if format == "kohya":
        return {KOHYA_KEY: vectors[0]}
    return {emb.token: vectors[0]}


def _a1111_dict(emb: TokenEmbedding, vectors: list[torch.Tensor], metadata: dict[str, str]):
    """A1111's own pickle (modules/textual_inversion/textual_inversion.py, Embedding.save).
    "oneword_metadata" is ours; A1111, ComfyUI, kohya and diffusers ignore unknown keys."""
    steps = metadata.get("steps", "0")
    return {
        "string_to_token": {"*": A1111_TOKEN_ID},
        "string_to_param": {"*": vectors[0]},
        "name": emb.token,
        "step": int(steps) if steps.isdigit() else 0,
        "sd_checkpoint": metadata.get("sd_checkpoint"),
        "sd_checkpoint_name": metadata.get("sd_checkpoint_name")
        or (Path(metadata["base_model"]).name if metadata.get("base_model") else None),
        "oneword_metadata": metadata,
    }


def save_embedding(
    path: str | os.PathLike, emb: TokenEmbedding, *, format: str = "oneword"
) -> Path:
    """Write `emb` in one of `FORMATS`, atomically, in the container its name asks for.

    Args:
        path: the output file: `.safetensors` (safetensors with metadata), `.pt` or `.bin`
            (torch.save pickle, loadable with `torch.load(weights_only=True)`); see
            `output_container`.
        emb: the token and its per-encoder (K, d) vectors.
        format: "oneword"/"diffusers" (`{token: (K, d)}`), "a1111" (the A1111 dict in a
            pickle; `{token: (K, d)}` in safetensors), "kohya" (`{"emb_params": (K, d)}`,
            modelspec metadata) or "comfyui" (one key per text encoder, `COMFYUI_KEYS`).
            SDXL is `{clip_l, clip_g}` in every layout.

    Returns:
        The path written.

    Raises:
        EmbeddingFileError: an unknown format or suffix, bad vectors, or a failed write.
    """
    import safetensors.torch

    _check_format(format)
    path = Path(path).expanduser()
    container = output_container(path)
    vectors = _check_embedding(emb)
    family = emb.family_guess
    if format == "kohya" and family in ("sd3", "flux"):
        raise EmbeddingFileError(
            f"{_label(emb)}: kohya's sd-scripts train and read no {family} embeddings; "
            "use --to oneword (OneTrainer and diffusers read it)"
        )
    if format == "a1111" and family == "flux":
        raise EmbeddingFileError(
            f"{_label(emb)}: AUTOMATIC1111 reads no FLUX embeddings; use --to oneword "
            "(diffusers, OneTrainer) instead"
        )
    metadata = _file_metadata(emb, vectors, format)
    if format == "kohya":
        metadata = _kohya_metadata(metadata)
    if format == "a1111" and family == "sd3":
        metadata["dropped"] = "t5"

    if container == "pickle":
        if format == "a1111" and len(vectors) == 1:
            payload = _a1111_dict(emb, vectors, metadata)
        else:
            # No metadata: A1111 and diffusers read a pickle only if it holds one tensor.
            payload = _layout_tensors(emb, vectors, format)
        _atomic_write(path, lambda handle: torch.save(payload, handle))
        return path

    data = safetensors.torch.save(_layout_tensors(emb, vectors, format), metadata=metadata)
    _atomic_write(path, lambda handle: handle.write(data))
    return path


def save_model_token(
    path: str | os.PathLike,
    model,
    placeholder,
    *,
    method: str,
    steps: int,
    format: str = "oneword",
    extra_metadata: dict | None = None,
) -> Path:
    """Save a placeholder's current rows from a `LoadedModel`.

    Args:
        path: output file.
        model: the `LoadedModel` the token was learned in.
        placeholder: the `oneword.tokens.Placeholder` to save.
        method: how it was learned ("inversion", "encoder", ...).
        steps: optimisation steps taken.
        format: one of `FORMATS`.
        extra_metadata: more facts to store (values become strings).

    Returns:
        The path written.
    """
    from .tokens import get_rows

    keys = tuple(getattr(model, "encoder_keys", ())) or None
    metadata = {
        "base_model": str(model.source),
        "model_family": model.family,
        "method": method,
        "steps": str(int(steps)),
        "init_text": placeholder.init_text,
        "prediction_type": getattr(model, "prediction_type", None),
        "resolution": getattr(model, "resolution", None),
        **(extra_metadata or {}),
    }
    emb = TokenEmbedding(
        token=placeholder.token,
        vectors=get_rows(model, placeholder),
        metadata=_string_metadata(metadata),
        source_format=format,
        keys=keys if keys and len(keys) > 1 else None,
    )
    return save_embedding(path, emb, format=format)


def output_path(out: str | os.PathLike, token: str) -> Path:
    """Where an export to `out` goes: `out` itself, or `out/<trigger>.safetensors` when `out`
    is a folder (an existing one, or a name ending in a slash), as A1111 and ComfyUI users
    drop files into their embeddings folder and call them by file name."""
    text = os.fspath(out)
    path = Path(text).expanduser()
    if path.is_dir() or text.endswith(("/", os.sep)):
        return path / f"{trigger_file_name(token)}.safetensors"
    return path


def export_embedding(
    src: str | os.PathLike, to: str, out: str | os.PathLike, *, token: str | None = None
) -> Path:
    """Convert any file `load_embedding` reads into one of `FORMATS`.

    Args:
        src: input file (format detected from content).
        to: output layout.
        out: output file (.safetensors, .pt or .bin), or a folder for
            `<trigger>.safetensors` inside it.
        token: rename the trigger word.

    Returns:
        The path written.
    """
    _check_format(to)
    emb = load_embedding(src, token=token)
    path = output_path(out, emb.token)
    output_container(path)  # refuse a bad name before anything is written
    return save_embedding(path, emb, format=to)


def usage_hint(path: Path, emb: TokenEmbedding, format: str) -> str:
    """One line: how the tool that layout `format` is named for calls the file at `path`."""
    name = path.stem
    if format == "comfyui":
        return f"ComfyUI: put it in ComfyUI/models/embeddings/ and write embedding:{name}"
    if format == "a1111":
        return f"AUTOMATIC1111: put it in the webui's embeddings/ folder; trigger word: {name}"
    if format == "kohya":
        return (
            f"kohya sd-scripts: --weights {path}; A1111 calls it {name}, ComfyUI embedding:{name}"
        )
    family = emb.family_guess
    if family == "sd3":
        return f"oneword generate --embedding {path} (diffusers' SD3 pipelines load no tokens)"
    if family == "flux":
        return (
            f"diffusers: load clip_l into text_encoder and t5 into text_encoder_2 "
            f"(oneword.embeddings.load_into_pipeline), then write {emb.token}"
        )
    if len(emb.vectors) == 2:
        return (
            f"diffusers: load clip_l into text_encoder and clip_g into text_encoder_2 "
            f"(oneword.embeddings.load_into_pipeline), then write {emb.token}"
        )
    return f"diffusers: pipe.load_textual_inversion({str(path)!r}), then write {emb.token}"


# ---------------------------------------------------------------------------------------
# Loading into models


def _resolve(emb_or_path, token: str | None) -> TokenEmbedding:
    if isinstance(emb_or_path, TokenEmbedding):
        if token:
            return TokenEmbedding(
                token,
                emb_or_path.vectors,
                emb_or_path.metadata,
                emb_or_path.source_format,
                emb_or_path.path,
                emb_or_path.keys,
            )
        return emb_or_path
    return load_embedding(emb_or_path, token=token)


def _check_widths(emb: TokenEmbedding, model_widths: list[int], source: str, family: str) -> None:
    where = _label(emb)
    if len(emb.vectors) != len(model_widths):
        raise EmbeddingFileError(
            f"{where} holds vectors for {len(emb.vectors)} text encoder(s) "
            f"({'+'.join(map(str, emb.widths))} wide, {emb.family_guess}) but {source} ({family}) "
            f"has {len(model_widths)} ({'+'.join(map(str, model_widths))} wide); "
            "use an embedding made for this model family"
        )
    for index, (have, want) in enumerate(zip(emb.widths, model_widths)):
        if have != want:
            raise EmbeddingFileError(
                f"{where} holds {have}-wide vectors but text encoder {index + 1} of {source} "
                f"({family}) is {want} wide; use an embedding made for this model family"
            )


def load_into_model(model, emb_or_path, *, token: str | None = None):
    """Add a saved token to a `LoadedModel` (through `oneword.tokens.add_placeholder`).

    Args:
        model: a `LoadedModel`.
        emb_or_path: a `TokenEmbedding` or a file path.
        token: use this trigger word instead of the stored one.

    Returns:
        The `Placeholder`, whose rows are the file's vectors.
    """
    from .tokens import add_placeholder

    emb = _resolve(emb_or_path, token)
    _check_widths(emb, model.widths, model.source, model.family)
    want = tuple(getattr(model, "encoder_keys", ()))
    if len(emb.vectors) > 1 and want and emb.encoder_keys != want:
        raise EmbeddingFileError(
            f"{_label(emb)} holds {'+'.join(emb.encoder_keys)} vectors but {model.source} "
            f"({model.family}) needs {'+'.join(want)}; use an embedding made for this model family"
        )
    return add_placeholder(
        model,
        emb.token,
        emb.metadata.get("init_text", ""),
        emb.num_vectors,
        init_rows=[v.float() for v in emb.vectors],
        source=_label(emb),
    )


def load_into_pipeline(pipe, emb_or_path, *, token: str | None = None) -> str:
    """Load a token into a diffusers pipeline with the pipeline's own `load_textual_inversion`.

    SD 1.x/2.x: one call. SDXL: one call per encoder (clip_l -> text_encoder/tokenizer,
    clip_g -> text_encoder_2/tokenizer_2), passing the K sub-token names as a list, as
    diffusers documents; multi-vector prompts then expand through `maybe_convert_prompt`.
    FLUX.1: the same, clip_l -> text_encoder/tokenizer, t5 -> text_encoder_2/tokenizer_2.
    SD3's pipelines have no `load_textual_inversion`; use oneword's `generate` for them.

    Args:
        pipe: a `StableDiffusionPipeline`, `StableDiffusionXLPipeline` or similar.
        emb_or_path: a `TokenEmbedding` or a file path.
        token: use this trigger word instead of the stored one.

    Returns:
        The trigger word to put in prompts.
    """
    from .models import detect_family
    from .tokens import sub_token_names

    emb = _resolve(emb_or_path, token)
    if not hasattr(pipe, "load_textual_inversion"):
        raise EmbeddingFileError(
            f"{type(pipe).__name__} cannot load textual-inversion tokens (diffusers gives its "
            "SD3 pipelines no load_textual_inversion); sample with `oneword generate` instead"
        )
    pairs = [
        (getattr(pipe, tokenizer, None), getattr(pipe, text_encoder, None))
        for tokenizer, text_encoder in (
            ("tokenizer", "text_encoder"),
            ("tokenizer_2", "text_encoder_2"),
        )
    ]
    pairs = [
        (tokenizer, text_encoder) for tokenizer, text_encoder in pairs if text_encoder is not None
    ]
    if not pairs:
        raise EmbeddingFileError(f"{type(pipe).__name__} has no text encoder to load a token into")
    widths = [text_encoder.get_input_embeddings().embedding_dim for _, text_encoder in pairs]
    is_flux = "Flux" in type(pipe).__name__
    if len(pairs) == 2:
        family = "flux" if is_flux else "sdxl"
    else:
        family = detect_family({}, pairs[0][1].config.to_dict())
    source = getattr(getattr(pipe, "config", None), "_name_or_path", None) or type(pipe).__name__
    _check_widths(emb, widths, source, family)
    if len(pairs) == 2 and emb.encoder_keys != (FLUX_KEYS if is_flux else SDXL_KEYS):
        raise EmbeddingFileError(
            f"{_label(emb)} holds {'+'.join(emb.encoder_keys)} vectors but {source} ({family}) "
            f"needs {'+'.join(FLUX_KEYS if is_flux else SDXL_KEYS)}"
        )

    names = sub_token_names(emb.token, emb.num_vectors)
    for tokenizer, _ in pairs:
        taken = [n for n in names if n in tokenizer.get_vocab()]
        if taken:
            raise TokenError(
                f"token {taken[0]!r} is already in the pipeline's tokenizer; load {_label(emb)} "
                "under another name (token=...)"
            )
    for vectors, (tokenizer, text_encoder) in zip(emb.vectors, pairs):
        try:
            pipe.load_textual_inversion(
                vectors.to(text_encoder.device),  # (K, d); one row per name
                token=list(names),
                tokenizer=tokenizer,
                text_encoder=text_encoder,
            )
        except ValueError as exc:
            raise EmbeddingFileError(f"diffusers refused {_label(emb)}: {str(exc)[:300]}") from None
    return emb.token
