"""The output-folder lock: one owner at a time, and no lock file left behind a finished run."""

from __future__ import annotations

import os

import pytest

from oneword.errors import OnewordError
from oneword.io import prepare_out_dir


def test_a_released_lock_leaves_no_file_and_the_folder_can_be_owned_again(tmp_path):
    out = tmp_path / "run"
    owned = prepare_out_dir(out)
    lock_file = owned.lock_file
    assert lock_file.read_text().strip() == str(os.getpid())
    owned.release()
    assert not lock_file.exists()
    again = prepare_out_dir(out)
    assert again.lock_file.exists()
    again.release()


def test_a_lock_on_a_deleted_file_is_not_taken_for_ownership(tmp_path, monkeypatch):
    # A process that opened the lock file just before its owner deleted it must not believe
    # it owns the folder: it opens the path again (and so meets any new owner there).
    import oneword.io as io

    out = tmp_path / "run"
    first = prepare_out_dir(out)
    lock_file = first.lock_file
    real_stat = os.stat
    calls = {"n": 0}

    def stat_after_a_replacement(path, *args, **kwargs):
        if os.fspath(path) == os.fspath(lock_file) and calls["n"] == 0:
            calls["n"] += 1
            first.release()  # the owner finishes between our open and our check
            return real_stat(tmp_path)  # the path now names another file
        return real_stat(path, *args, **kwargs)

    first.release()
    monkeypatch.setattr(io.os, "stat", stat_after_a_replacement)
    owned = prepare_out_dir(out)
    assert calls["n"] == 1  # the first open was found stale and the path opened again
    assert os.path.samestat(os.fstat(owned._descriptor), real_stat(owned.lock_file))
    owned.release()


def test_a_second_owner_is_refused_while_the_first_holds_it(tmp_path):
    out = tmp_path / "run"
    owned = prepare_out_dir(out)
    # A second process cannot be simulated in-process (flock is per open file, and this
    # process already owns the folder), so open and lock the file as another run would.
    import fcntl

    descriptor = os.open(owned.lock_file, os.O_RDWR)
    with pytest.raises(OSError):
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.close(descriptor)
    owned.release()
    out.write_text("x")
    with pytest.raises(OnewordError, match="is a file"):
        prepare_out_dir(out)


def test_a_nested_hold_leaves_the_outer_owner_holding_the_lock(tmp_path):
    # A command owns --out, then calls a library function that owns it again and releases it
    # on return: the command must still own the folder afterwards.
    import fcntl

    outer = prepare_out_dir(tmp_path / "run")
    with prepare_out_dir(tmp_path / "run") as inner:
        assert inner is outer
    descriptor = os.open(outer.lock_file, os.O_RDWR)
    with pytest.raises(OSError):
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.close(descriptor)
    outer.release()
    assert not outer.lock_file.exists()
