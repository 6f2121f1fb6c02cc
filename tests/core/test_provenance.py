"""Reports name the code and the checkpoints they ran on."""

from __future__ import annotations

import subprocess

from oneword.provenance import checkpoint_digest, code_version


def _git(folder, *args):
    subprocess.run(["git", *args], cwd=folder, check=True, capture_output=True)


def test_a_changed_tracked_file_marks_the_commit_dirty(tmp_path):
    _git(tmp_path, "init", "-q")
    (tmp_path / "a.py").write_text("x = 1\n")
    _git(tmp_path, "add", "a.py")
    _git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "first")
    clean = code_version(tmp_path)
    assert clean is not None and len(clean) == 40
    (tmp_path / "notes.txt").write_text("untracked files do not change the code that ran")
    assert code_version(tmp_path) == clean
    (tmp_path / "a.py").write_text("x = 2\n")
    assert code_version(tmp_path) == clean + "+dirty"


def test_outside_a_checkout_there_is_no_commit(tmp_path):
    assert code_version(tmp_path) is None


def test_checkpoint_digests_follow_the_bytes_and_names_of_weight_files(tmp_path):
    model = tmp_path / "model"
    (model / "unet").mkdir(parents=True)
    (model / "unet" / "weights.safetensors").write_bytes(b"abc")
    (model / "model_index.json").write_text("{}")  # not a weight file: not hashed
    first = checkpoint_digest(model)
    assert first is not None and len(first) == 64
    (model / "model_index.json").write_text('{"changed": 1}')
    assert checkpoint_digest(model) == first
    (model / "unet" / "weights.safetensors").write_bytes(b"abd")
    assert checkpoint_digest(model) != first
    assert checkpoint_digest(model / "unet" / "weights.safetensors") is not None
    assert checkpoint_digest("org/not-a-local-folder") is None
    assert checkpoint_digest(None) is None


def test_large_weights_are_named_not_hashed(tmp_path, monkeypatch):
    import oneword.provenance as provenance

    (tmp_path / "w.safetensors").write_bytes(b"abc")
    monkeypatch.setattr(provenance, "MAX_HASH_BYTES", 2)
    assert checkpoint_digest(tmp_path) is None
