"""Atomic file writes: a reader sees the old file or the complete new one, never a torn one."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

from .errors import OnewordError


class WriteError(OnewordError, OSError):
    """A file that could not be written (disk full, permission, ...); the old file is kept.

    Both an `OnewordError` (the CLI prints its one line, exit 2) and an `OSError` (callers
    that handle those keep working).
    """

    def __str__(self) -> str:
        return self.strerror or super().__str__()


def fsync_path(path: str | os.PathLike) -> None:
    """fsync a file or folder by path (one place, so tests can make the disk fill up here)."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_failed(path: str | os.PathLike, error: OSError) -> WriteError:
    """One line for a failed write of `path`: what failed, and that the old file is kept."""
    reason = error.strerror or str(error) or type(error).__name__
    kept = "the previous version is kept" if Path(path).exists() else "nothing was written"
    hint = "; free some space and run again" if error.errno == errno.ENOSPC else ""
    return WriteError(error.errno, f"cannot write {path}: {reason} ({kept}){hint}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in the same folder; on success it is fsynced and renamed to `path`.

    On an exception the temporary file is removed and `path` is untouched; an `OSError`
    (disk full, ...) becomes a `WriteError` with one line that names `path`.
    """
    path = Path(path)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # os.open with 0o666 (not mkstemp's 0o600), so the final file gets the mode the umask asks.
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, path)
    except WriteError:
        raise
    except OSError as error:
        raise write_failed(path, error) from None
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces `path` (old one removed after)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    except OSError as error:
        raise write_failed(path, error) from None
    try:
        yield tmp
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except WriteError:
        raise
    except OSError as error:
        raise write_failed(path, error) from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# --- output folders ------------------------------------------------------------------------

LOCK_SUFFIX = ".oneword.lock"


class OutDirLock:
    """An exclusive `fcntl.flock` on an output folder, held until `release()` or garbage
    collection (so a run function that keeps it in a local variable holds it for its life).

    The lock file lives beside the folder (`PARENT/.NAME.oneword.lock`), not inside it, so
    commands that publish a whole new folder by renaming a staging folder onto it (world
    suite, world shards) keep working; when the parent is not writable it lives inside.
    The file holds the owner's pid. It is deleted on release while still locked; a process
    that opened it just before and then gets the lock sees that the path no longer names
    the file it locked and starts over (`prepare_out_dir`), so deleting cannot let two runs
    own one folder. A run killed outright leaves its file, unlocked and harmless.
    """

    def __init__(self, folder: Path, lock_file: Path, descriptor: int, key: str = ""):
        self.folder, self.lock_file = folder, lock_file
        self._descriptor, self._key = descriptor, key
        self._depth = 1  # a command that calls another takes the same lock again

    def release(self, *, force: bool = False) -> None:
        """Release one hold; the lock goes when the last hold is released (or `force`)."""
        self._depth = 0 if force else self._depth - 1
        if self._depth <= 0 and self._descriptor is not None:
            import fcntl

            with contextlib.suppress(OSError):
                self.lock_file.unlink()  # while locked: see the class docstring
            with contextlib.suppress(OSError):
                fcntl.flock(self._descriptor, fcntl.LOCK_UN)
            os.close(self._descriptor)
            self._descriptor = None
            _HELD.pop(self._key, None)

    def __enter__(self) -> OutDirLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # at interpreter exit the modules may be gone
            self.release(force=True)  # nobody refers to it any more


_HELD: dict = {}  # folder -> weakref to this process's OutDirLock (re-entrant within a process)


def _first_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_out_dir(path: str | os.PathLike, *, what: str = "--out") -> Path:
    """Check that `path` is, or can be created as, a writable folder (it is not created: a
    command refused later for another reason leaves no empty folder behind).

    Refuses, with one line naming `what` and the path: a path that is a file, a path under
    a file, a folder that cannot be created or written. Called before any model loads.

    Returns:
        The folder, absolute.
    """
    # realpath: two spellings of one folder (a symlink, "..") share one lock.
    folder = Path(os.path.realpath(os.path.expanduser(os.fspath(path))))
    if folder.exists() and not folder.is_dir():
        raise OnewordError(f"{what} {path}: is a file, not a folder; choose a folder path")
    existing = _first_existing(folder)
    if not existing.is_dir():
        raise OnewordError(
            f"{what} {path}: {existing} is a file, so no folder can be made under it; "
            "choose another path"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OnewordError(
            f"{what} {path}: {existing} is not writable (permission denied); choose another path"
        )
    return folder


def prepare_out_dir(
    path: str | os.PathLike, *, what: str = "--out", lock: bool = True, rank: int = 0
) -> OutDirLock | None:
    """Check an output folder (the run creates it), then own it: the one entry point every command
    that writes a folder calls first, before any model loads.

    Args:
        path: the output folder.
        what: how the user named it ("--out"), for the messages.
        lock: take an exclusive lock for the caller's life (a second run on the same folder
            is refused with one line naming the folder and the other run's pid).
        rank: the process index of a multi-process run (`accelerate launch`, torchrun):
            each rank locks its own file, so the ranks of one run share the folder while a
            second run is still refused.

    Returns:
        The `OutDirLock` (keep a reference for the run's life), or None when `lock` is False.

    Raises:
        OnewordError: not a folder, under a file, not creatable or writable, or owned by
            another running process.
    """
    import fcntl
    import weakref

    folder = check_out_dir(path, what=what)
    if not lock:
        return None
    key = f"{folder}#{rank}"
    held = _HELD.get(key)
    owner = held() if held is not None else None
    if owner is not None and owner._descriptor is not None:
        owner._depth += 1  # this process owns it already (a command calling another)
        return owner
    name = (
        f".{folder.name}{LOCK_SUFFIX}" if rank == 0 else f".{folder.name}.rank{rank}{LOCK_SUFFIX}"
    )
    lock_file = folder.parent / name
    if folder.is_dir() and not os.access(folder.parent, os.W_OK):
        lock_file = folder / name  # a writable folder in a read-only parent
    while True:
        try:
            lock_file.parent.mkdir(parents=True, exist_ok=True)
            descriptor = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as error:
            raise OnewordError(
                f"{what} {path}: cannot create the lock file {lock_file} ({error.strerror or error})"
            ) from None
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            try:
                owner = os.pread(descriptor, 32, 0).decode("ascii", "replace").strip()
            except OSError:
                owner = ""
            os.close(descriptor)
            by = f"another run (pid {owner})" if owner.isdigit() else "another run"
            raise OnewordError(
                f"{what} {path} is in use by {by}; wait for it to finish or choose another {what}"
            ) from None
        # The owner before us deletes the file on release: if the path no longer names the
        # file we locked, our lock guards nothing; open the path again.
        try:
            same = os.path.samestat(os.fstat(descriptor), os.stat(lock_file))
        except OSError:
            same = False
        if same:
            break
        os.close(descriptor)
    os.ftruncate(descriptor, 0)
    os.pwrite(descriptor, f"{os.getpid()}\n".encode(), 0)
    owned = OutDirLock(folder, lock_file, descriptor, key)
    _HELD[key] = weakref.ref(owned)
    return owned
