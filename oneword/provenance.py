"""What a report ran on: the code (commit, marked when the tree is dirty) and the checkpoints
(SHA-256 of their weight files), so a number can be traced to what produced it."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".ckpt", ".pth")
MAX_HASH_BYTES = 2 * 2**30  # a real SD folder (2-20 GB) is named by path and size instead


def _git(folder: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args],
            cwd=folder,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def code_version(folder: str | os.PathLike | None = None) -> str | None:
    """The commit of the code that runs (of `folder`'s checkout if given), `SHA+dirty` when
    tracked files differ from it, or None outside a git checkout (an installed wheel)."""
    folder = Path(folder) if folder is not None else Path(__file__).resolve().parent
    commit = _git(folder, "rev-parse", "HEAD")
    if not commit:
        return None
    changes = _git(folder, "status", "--porcelain", "--untracked-files=no")
    return f"{commit}+dirty" if changes else commit


def checkpoint_digest(path: str | os.PathLike | None) -> str | None:
    """SHA-256 of a weight file, or of a model folder's weight files (their relative paths and
    bytes, in sorted order); None for a hub id, a missing path, or more than 2 GiB of weights
    (then the report names the path only)."""
    if path is None:
        return None
    root = Path(path)
    if root.is_file():
        files = [root]
    elif root.is_dir():
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    else:
        return None
    if not files or sum(p.stat().st_size for p in files) > MAX_HASH_BYTES:
        return None
    digest = hashlib.sha256()
    for file in files:
        if root.is_dir():
            digest.update(file.relative_to(root).as_posix().encode() + b"\0")
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(2**20), b""):
                digest.update(block)
    return digest.hexdigest()
