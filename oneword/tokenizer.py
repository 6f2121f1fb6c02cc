"""The real 49,408-token CLIP BPE tokenizer, rebuilt offline.

No model hub is reachable here, but open_clip ships OpenAI's BPE merges
(`bpe_simple_vocab_16e6.txt.gz`). The vocabulary is derived from them exactly as
`open_clip.tokenizer.SimpleTokenizer` does (byte alphabet, the same with `</w>`, one entry
per merge, then the two special tokens), so ids match OpenAI's and open_clip's tokenizers
and every Stable Diffusion text encoder.
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

CLIP_VOCAB_SIZE = 49408
MODEL_MAX_LENGTH = 77
_NUM_MERGES = 49152 - 256 - 2  # as in open_clip's SimpleTokenizer


def _bpe_path() -> Path:
    import open_clip.tokenizer

    return Path(open_clip.tokenizer.default_bpe())


def _bytes_to_unicode() -> dict[int, str]:
    # The reversible byte -> printable-character table of GPT-2/CLIP BPE.
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes)))


def clip_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """The CLIP vocabulary (token -> id, 49,408 entries) and its BPE merges ("a b" lines)."""
    lines = gzip.open(_bpe_path()).read().decode("utf-8").split("\n")
    merges = lines[1 : _NUM_MERGES + 1]
    alphabet = list(_bytes_to_unicode().values())
    vocab = alphabet + [c + "</w>" for c in alphabet]
    vocab += ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == CLIP_VOCAB_SIZE, len(vocab)
    return {token: i for i, token in enumerate(vocab)}, merges


def write_clip_tokenizer(folder: str | os.PathLike, *, pad_token: str = "<|endoftext|>") -> Path:
    """Write a `CLIPTokenizer` folder (vocab.json, merges.txt, configs) with the real vocabulary.

    Args:
        folder: output folder (created).
        pad_token: "<|endoftext|>" as in SD 1.x and SDXL's first tokenizer, "!" as in SD 2.x.

    Returns:
        The folder; load it with `CLIPTokenizer.from_pretrained(folder)`.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_vocab_and_merges()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8"
    )
    specials = {
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": pad_token,
    }
    (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2))
    # model_max_length is stored so that every loader (diffusers pipelines included) pads to
    # 77; without it transformers falls back to ~1e30.
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MODEL_MAX_LENGTH,
        "do_lower_case": True,
        "errors": "replace",
        **specials,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return folder


def load_clip_tokenizer(folder: str | os.PathLike):
    """`CLIPTokenizer` from a folder written by `write_clip_tokenizer` (or any SD tokenizer)."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(folder), model_max_length=MODEL_MAX_LENGTH)


def tokenize(tokenizer, captions: Sequence[str], device) -> torch.Tensor:
    """Captions -> (b, 77) input ids on `device`, exactly as diffusers' SD pipelines make them:
    padded to the tokenizer's max length, truncated, no attention mask."""
    return tokenizer(
        list(captions),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(device)
