"""Embedding files: save a learned token so other tools can use it, and load theirs.

One in-memory form, `TokenEmbedding` (a trigger word and, per text encoder, its (K, d)
fp32 vectors), and four layouts on disk (see docs "Embedding files other tools read"):

| format    | SD 1.x / 2.x                                    | SDXL                                |
|-----------|-------------------------------------------------|-------------------------------------|
| oneword   | safetensors `{token: (K, d)}` + metadata        | safetensors `{clip_l, clip_g}`      |
| diffusers | the same (diffusers' `load_textual_inversion`)  | the same                            |
| a1111     | `torch.save` of the A1111 dict (`.pt`)          | the same safetensors (A1111's only) |
| kohya     | safetensors `{"emb_params": (K, d)}` + modelspec | `{clip_l, clip_g}` + modelspec     |

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

FORMATS = ("oneword", "diffusers", "a1111", "kohya")
FAMILIES = ("sd1", "sd2", "sdxl")
SDXL_KEYS = ("clip_l", "clip_g")  # CLIP ViT-L (text_encoder), OpenCLIP bigG (text_encoder_2)
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


@dataclass
class TokenEmbedding:
    """A learned token as it lives in a file.

    Attributes:
        token: the trigger word, e.g. "<cat>".
        vectors: per text encoder, fp32 (K, d): SD 1.x/2.x `[(K, 768 or 1024)]`,
            SDXL `[clip_l (K, 768), clip_g (K, 1280)]`.
        metadata: string facts (base model, method, steps, ...); empty when the file had none.
        source_format: "oneword", "diffusers", "a1111" or "kohya" (what it was read as or built for).
        path: the file it was read from, if any (for error messages).
    """

    token: str
    vectors: list[torch.Tensor]
    metadata: dict[str, str] = field(default_factory=dict)
    source_format: str = "oneword"
    path: Path | None = None

    @property
    def num_vectors(self) -> int:
        return int(self.vectors[0].shape[0])

    @property
    def widths(self) -> list[int]:
        return [int(v.shape[-1]) for v in self.vectors]

    @property
    def family_guess(self) -> str:
        """The model family: sdxl for two encoders, else from the width (768 sd1,
        1024 sd2), else the file's own `model_family` metadata (tiny test models), else
        "unknown"."""
        if len(self.vectors) == 2:
            return "sdxl"
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
    if len(emb.vectors) not in (1, 2):
        raise EmbeddingFileError(
            f"{where}: has vectors for {len(emb.vectors)} text encoders; expected 1 "
            "(SD 1.x/2.x) or 2 (SDXL: clip_l, clip_g)"
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


def _warn_extension(path: Path, pickled: bool) -> None:
    # A1111 and ComfyUI choose their loader by extension, so say so when it misleads them.
    suffix = path.suffix.lower()
    if pickled and suffix == ".safetensors":
        warnings.warn(
            f"{path}: writing an A1111 .pt pickle under a .safetensors name; "
            "A1111 and ComfyUI choose their loader by extension, name it .pt",
            stacklevel=3,
        )
    elif not pickled and suffix in (".pt", ".bin", ".pth", ".ckpt"):
        warnings.warn(
            f"{path}: writing safetensors under a {suffix} name; A1111 and ComfyUI "
            "choose their loader by extension, name it .safetensors",
            stacklevel=3,
        )


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


def _unrelated_keys(path: Path, keys: list[str]) -> EmbeddingFileError:
    keys = sorted(keys)
    shown = ", ".join(repr(k) for k in keys[:6]) + (", ..." if len(keys) > 6 else "")
    hint = " Is it a model checkpoint or LoRA rather than an embedding?" if len(keys) > 2 else ""
    return EmbeddingFileError(
        f"{path} holds {len(keys)} unrelated keys ({shown}); an embedding file holds one "
        f"tensor (the token, or {KOHYA_KEY!r}), {SDXL_KEYS[0]!r} + {SDXL_KEYS[1]!r}, "
        f"or an A1111 'string_to_param' dict.{hint}"
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
    if len(keys) > 2:
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

    keys = sorted(str(k) for k in obj)
    present = [k for k in SDXL_KEYS if k in obj]
    written_as = metadata.get("oneword_format")
    kohya_meta = any(k.startswith(("modelspec.", "ss_")) for k in metadata)
    stored_token = metadata.get("token") or None
    if present and keys != sorted(SDXL_KEYS):  # 2. SDXL, which needs both encoders
        missing = [k for k in SDXL_KEYS if k not in obj]
        extra = [k for k in keys if k not in SDXL_KEYS]
        problem = f"lacks {missing[0]!r}" if missing else f"also holds {', '.join(extra)}"
        raise EmbeddingFileError(
            f"{where}: SDXL embedding with keys {keys} {problem}; an SDXL file needs "
            f"exactly {SDXL_KEYS[0]!r} (text_encoder, 768 wide) and {SDXL_KEYS[1]!r} (text_encoder_2, 1280 wide)"
        )
    if present:
        vectors = [_as_vectors(obj[k], where, repr(k)) for k in SDXL_KEYS]
        if vectors[0].shape[0] != vectors[1].shape[0]:
            raise EmbeddingFileError(
                f"{where}: clip_l has {vectors[0].shape[0]} vectors but clip_g has "
                f"{vectors[1].shape[0]}; both encoders need the same number K"
            )
        guessed = "kohya" if kohya_meta else "a1111"
        source = written_as if written_as in FORMATS else guessed
        return TokenEmbedding(token or stored_token or path.stem, vectors, metadata, source, path)
    if keys == [KOHYA_KEY]:  # 3. kohya sd-scripts
        vectors = [_as_vectors(obj[KOHYA_KEY], where, repr(KOHYA_KEY))]
        return TokenEmbedding(token or stored_token or path.stem, vectors, metadata, "kohya", path)
    if len(keys) == 1:  # 4. diffusers / oneword: {token: (K, d)}
        ((key, value),) = obj.items()
        vectors = [_as_vectors(value, where, f"the tensor {key!r}")]
        source = written_as if written_as in ("oneword", "diffusers") else "diffusers"
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
    if kind == "safetensors":
        tensors, metadata = _read_safetensors(path)
        return _parse(tensors, metadata, path, token=token)
    return _parse(_read_pickle(path), {}, path, token=token)


# ---------------------------------------------------------------------------------------
# Writing


def save_embedding(
    path: str | os.PathLike, emb: TokenEmbedding, *, format: str = "oneword"
) -> Path:
    """Write `emb` in one of `FORMATS`, atomically.

    Args:
        path: the output file; use .safetensors, or .pt for "a1111" with SD 1.x/2.x.
        emb: the token and its per-encoder (K, d) vectors.
        format: "oneword"/"diffusers" (safetensors `{token: (K, d)}`, SDXL `{clip_l, clip_g}`),
            "a1111" (torch.save'd A1111 dict; SDXL: the clip_l/clip_g safetensors) or
            "kohya" (safetensors `{"emb_params": (K, d)}` / `{clip_l, clip_g}`, modelspec metadata).

    Returns:
        The path written.
    """
    import safetensors.torch

    _check_format(format)
    path = Path(path).expanduser()
    vectors = _check_embedding(emb)
    metadata = _file_metadata(emb, vectors, format)
    if format == "kohya":
        metadata = _kohya_metadata(metadata)

    if len(vectors) == 2:
        tensors = dict(zip(SDXL_KEYS, vectors))  # every tool reads SDXL as clip_l + clip_g
    elif format == "kohya":
        tensors = {KOHYA_KEY: vectors[0]}
    else:
        tensors = {emb.token: vectors[0]}

    if format == "a1111" and len(vectors) == 1:
        # A1111's own layout (modules/textual_inversion/textual_inversion.py, Embedding.save).
        # "oneword_metadata" is ours; A1111, ComfyUI and diffusers ignore unknown keys.
        steps = metadata.get("steps", "0")
        payload = {
            "string_to_token": {"*": A1111_TOKEN_ID},
            "string_to_param": {"*": vectors[0]},
            "name": emb.token,
            "step": int(steps) if steps.isdigit() else 0,
            "sd_checkpoint": metadata.get("sd_checkpoint"),
            "sd_checkpoint_name": metadata.get("sd_checkpoint_name")
            or (Path(metadata["base_model"]).name if metadata.get("base_model") else None),
            "oneword_metadata": metadata,
        }
        _warn_extension(path, pickled=True)
        _atomic_write(path, lambda handle: torch.save(payload, handle))
        return path

    data = safetensors.torch.save(tensors, metadata=metadata)
    _warn_extension(path, pickled=False)
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
    )
    return save_embedding(path, emb, format=format)


def export_embedding(
    src: str | os.PathLike, to: str, out: str | os.PathLike, *, token: str | None = None
) -> Path:
    """Convert any file `load_embedding` reads into one of `FORMATS`.

    Args:
        src: input file (format detected from content).
        to: output format.
        out: output file.
        token: rename the trigger word.

    Returns:
        The path written.
    """
    _check_format(to)
    emb = load_embedding(src, token=token)
    return save_embedding(out, emb, format=to)


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
    return add_placeholder(
        model,
        emb.token,
        emb.metadata.get("init_text", ""),
        emb.num_vectors,
        init_rows=[v.float() for v in emb.vectors],
    )


def load_into_pipeline(pipe, emb_or_path, *, token: str | None = None) -> str:
    """Load a token into a diffusers pipeline with the pipeline's own `load_textual_inversion`.

    SD 1.x/2.x: one call. SDXL: one call per encoder (clip_l -> text_encoder/tokenizer,
    clip_g -> text_encoder_2/tokenizer_2), passing the K sub-token names as a list, as
    diffusers documents; multi-vector prompts then expand through `maybe_convert_prompt`.

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
    family = "sdxl" if len(pairs) == 2 else detect_family({}, pairs[0][1].config.to_dict())
    source = getattr(getattr(pipe, "config", None), "_name_or_path", None) or type(pipe).__name__
    _check_widths(emb, widths, source, family)

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
