"""Atomic, pickle-free checkpoints that make a resumed run bitwise equal to an uninterrupted one.

A checkpoint is a folder `checkpoints/step-000123/` with two files:
`state.safetensors` (every tensor: learned rows, Adam moments, RNG and generator states)
and `state.json` (everything else: step, loss history, Python and NumPy RNG states). It is
written to a temporary folder beside it, fsynced and renamed into place, so a folder named
`step-*` is always complete; older checkpoints are removed only after the new one exists.
No pickle is involved, so loading a checkpoint cannot run code.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import uuid
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..errors import OnewordError

KEEP_LAST = 2  # a crash while writing checkpoint n still leaves n-1 (and n-2) intact
_NAME = re.compile(r"^step-(\d{6,})$")


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def list_checkpoints(folder: str | Path) -> list[Path]:
    """Complete checkpoints in `folder`, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return [path for _, path in sorted(found)]


def _fsync(path: Path) -> None:
    from .. import io

    io.fsync_path(path)  # through oneword.io, where a test can make the disk fill up


def _remove_stale_temporaries(folder: Path) -> None:
    """Remove half-written checkpoints of processes that no longer run (killed mid-write)."""
    for temp in folder.glob(".tmp-step-*"):
        try:
            pid = int(temp.name.split("-")[3])
            os.kill(pid, 0)  # raises if no such process
        except ProcessLookupError:
            shutil.rmtree(temp, ignore_errors=True)
        except (ValueError, IndexError, PermissionError):
            continue


def remove_half_written(folder: str | Path) -> list[str]:
    """Remove the hidden `.step-*` folders a killed run left while writing a checkpoint with
    `io.atomic_dir`; call it only while owning `folder` (its run's out-folder lock), since
    such a folder may be another live writer's. Returns the names removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = [p for p in folder.glob(".step-*") if p.is_dir()]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return [p.name for p in removed]


def save_checkpoint(
    folder: str | Path, step: int, tensors: dict[str, torch.Tensor], state: dict
) -> Path:
    """Write checkpoint `step` atomically into `folder`, then keep only the last `KEEP_LAST`.

    Args:
        folder: the checkpoints folder (created if needed).
        step: optimizer steps done.
        tensors: name -> tensor (saved contiguous, on the CPU).
        state: JSON-serialisable dict.

    Returns:
        The new checkpoint folder.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(folder)
    final = folder / checkpoint_name(step)
    temp = folder / f".tmp-{checkpoint_name(step)}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        temp.mkdir()
        save_file(
            {name: t.detach().cpu().contiguous() for name, t in tensors.items()},
            str(temp / "state.safetensors"),
        )
        (temp / "state.json").write_text(json.dumps(state))
        for file in temp.iterdir():
            _fsync(file)
        if final.exists():  # the same step written twice (e.g. a resumed run that ends at once)
            shutil.rmtree(final)
        os.replace(temp, final)
        _fsync(folder)
    except OSError as error:
        before = [p.name for p in list_checkpoints(folder)]
        kept = (
            f"the earlier checkpoints are kept ({', '.join(before)})"
            if before
            else "no checkpoint was written"
        )
        raise OnewordError(
            f"cannot write checkpoint {final}: {error.strerror or error}; {kept}"
        ) from None
    finally:
        if temp.exists():
            shutil.rmtree(temp, ignore_errors=True)
    for old in list_checkpoints(folder)[:-KEEP_LAST]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a checkpoint folder; a clear `OnewordError` if it is missing or unreadable."""
    path = Path(path)
    try:
        tensors = load_file(str(path / "state.safetensors"))
        state = json.loads((path / "state.json").read_text())
    except Exception as error:
        raise OnewordError(
            f"checkpoint {path} is unreadable ({type(error).__name__}: {error}); "
            "delete that folder to resume from the one before it, or start a new run without --resume"
        ) from None
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise OnewordError(
                f"checkpoint {path} is broken: {_describe_tensor(name, state)} holds {bad} NaN/inf "
                "value(s); delete that folder to resume from the one before it"
            )
    return tensors, state


def _describe_tensor(name: str, state: dict) -> str:
    """ "concept.0.rows.1" -> "the rows of '<t>' (text encoder 2)"; other names as they are."""
    match = re.match(r"^concept\.(\d+)\.(rows|init)\.(\d+)$", name)
    concepts = state.get("concepts") if isinstance(state, dict) else None
    if match and isinstance(concepts, list) and int(match.group(1)) < len(concepts):
        token = concepts[int(match.group(1))].get("token", "?")
        what = "rows" if match.group(2) == "rows" else "initial rows"
        return f"the {what} of {token!r} (text encoder {int(match.group(3)) + 1})"
    return f"tensor {name!r}"


def check_same_run(path: str | Path, saved: dict, current: dict) -> None:
    """Refuse to resume a run from a checkpoint of a different run, naming what differs.

    Args:
        path: the checkpoint (for the message).
        saved: the facts stored in the checkpoint (keys the run chose: images, token, model,
            templates, vectors, or any settings).
        current: the same facts for this run; keys missing from `saved` (older
            checkpoints) are not compared.
    """
    differs = []
    for key, now in current.items():
        if key not in saved or _jsonable(saved[key]) == _jsonable(now):
            continue
        before = saved[key]
        if isinstance(now, list) and isinstance(before, list) and key in ("images", "templates"):
            changed = sum(a != b for a, b in zip(before, now)) + abs(len(before) - len(now))
            differs.append(f"{key}: {changed} of {max(len(before), len(now))} differ")
        else:
            differs.append(f"{key}: {before!r} -> {now!r}")
    if differs:
        raise OnewordError(
            f"--resume from {path}: this is not the run that wrote it ({'; '.join(differs)}); "
            "resume with the same images, token, model and settings, or choose a new --out"
        )


def _jsonable(value):
    return json.loads(json.dumps(value))


def latest_checkpoint(folder: str | Path) -> Path:
    """The newest checkpoint in `folder`; `OnewordError` when there is none (never a fresh start)."""
    found = list_checkpoints(folder)
    if not found:
        raise OnewordError(
            f"--resume: no checkpoint in {folder} (expected {folder}/step-XXXXXX/); "
            "run without --resume to start from scratch"
        )
    return found[-1]


def rng_states(generators: dict[str, torch.Generator]) -> tuple[dict[str, torch.Tensor], dict]:
    """Every RNG a run touches: torch (CPU, CUDA), Python, NumPy and the run's own generators."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for index, cuda_state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{index}"] = cuda_state
    for name, generator in generators.items():
        tensors[f"rng.generator.{name}"] = generator.get_state()
    version, internal, gauss = random.getstate()
    kind, keys, position, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), int(position), int(has_gauss), float(cached)],
    }
    return tensors, state


def restore_rng_states(
    tensors: dict[str, torch.Tensor], state: dict, generators: dict[str, torch.Generator]
) -> None:
    """Inverse of `rng_states`."""
    torch.set_rng_state(tensors["rng.torch"])
    if torch.cuda.is_available():
        cuda_states = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
    for name, generator in generators.items():
        key = f"rng.generator.{name}"
        if key not in tensors:
            raise OnewordError(f"checkpoint has no generator state for {name!r}")
        generator.set_state(tensors[key])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), position, has_gauss, cached))


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split `optimizer.state_dict()` into tensors and JSON (param_groups, scalar state)."""
    full = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, entry in full["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{index}.{key}"] = value
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": full["param_groups"], "scalars": scalars}


def restore_optimizer(
    optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], state: dict
) -> None:
    """Inverse of `optimizer_tensors`."""
    entries: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            _, index, key = name.split(".", 2)
            entries.setdefault(int(index), {})[key] = value
    for name, value in state["scalars"].items():
        index, key = name.split(".", 1)
        entries.setdefault(int(index), {})[key] = value
    try:
        optimizer.load_state_dict({"state": entries, "param_groups": state["param_groups"]})
    except (ValueError, KeyError) as error:
        raise OnewordError(f"checkpoint optimizer state does not fit this run: {error}") from None
