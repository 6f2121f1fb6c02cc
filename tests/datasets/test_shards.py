"""WebDataset shards: world round trip, img2dataset layout, no pickle, corrupt samples."""

from __future__ import annotations

import io
import json
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from oneword.datasets.shards import (
    ShardErrorCounter,
    read_shards,
    resolve_shard_urls,
    write_world_shards,
)
from oneword.datasets.world import Scene, WorldStream, labels
from oneword.errors import OnewordError


def _image_bytes(colour: tuple[int, int, int], fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 12), colour).save(buffer, format=fmt)
    return buffer.getvalue()


def _write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_world_shards_round_trip(tmp_path):
    out = tmp_path / "world"
    shards = write_world_shards(out, 30, seed=5, maxcount=10)
    assert [p.name for p in shards] == [f"shard-{i:06d}.tar" for i in range(3)]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left
    samples = list(read_shards(out))
    assert [s["__key__"] for s in samples] == [f"{i:09d}" for i in range(30)]
    expected = WorldStream(256, 5).batch(0)
    assert [s["txt"] for s in samples] == expected["captions"][:30]
    pixels = torch.stack([torch.from_numpy(np.array(s["image"])).permute(2, 0, 1) for s in samples])
    assert torch.equal(pixels, expected["pixels"][:30])  # PNG is lossless
    fields = Scene.__dataclass_fields__
    scenes = [Scene(**{k: v for k, v in s["json"].items() if k in fields}) for s in samples]
    assert scenes == expected["scenes"][:30]
    for attr, values in labels(scenes).items():
        assert torch.equal(values, expected["labels"][attr][:30])
    assert samples[0]["json"]["identity"] == scenes[0].identity.name
    # Refuses to mix a second set into the same folder.
    with pytest.raises(OnewordError, match="already holds shards"):
        write_world_shards(out, 5, seed=0)


def test_url_forms(tmp_path):
    write_world_shards(tmp_path / "w", 12, seed=0, maxcount=4)
    folder = tmp_path / "w"
    files = [str(folder / f"shard-{i:06d}.tar") for i in range(3)]
    assert resolve_shard_urls(folder) == files
    assert resolve_shard_urls(str(folder / "shard-*.tar")) == files
    assert resolve_shard_urls(str(folder / "shard-{000000..000002}.tar")) == files
    assert resolve_shard_urls(files[:2]) == files[:2]
    assert len(list(read_shards(str(folder / "shard-{000000..000001}.tar")))) == 8
    with pytest.raises(OnewordError, match="not found"):
        resolve_shard_urls(str(folder / "shard-{000000..000005}.tar"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(OnewordError, match="no .tar shards"):
        read_shards(empty)
    with pytest.raises(OnewordError, match="not found"):
        read_shards(tmp_path / "missing.tar")


def test_reads_img2dataset_layout(tmp_path):
    members = []
    for i, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        key = f"{i:09d}"
        members.append((f"{key}.jpg", _image_bytes(colour, "JPEG")))
        if i != 1:  # one sample without a caption
            members.append((f"{key}.txt", f"caption {i}".encode()))
        meta = {
            "url": f"http://x/{i}.jpg",
            "key": key,
            "status": "success",
            "caption": f"caption {i}",
        }
        members.append((f"{key}.json", json.dumps(meta).encode()))
    shard = _write_tar(tmp_path / "00000.tar", members)
    samples = list(read_shards(str(shard)))
    assert [s["txt"] for s in samples] == ["caption 0", "", "caption 2"]
    assert all(s["image"].mode == "RGB" and s["image"].size == (16, 12) for s in samples)
    assert samples[2]["image"].getpixel((8, 6))[2] > 200  # blue survived JPEG
    assert samples[0]["json"]["status"] == "success"


class _Payload:
    """Unpickling this runs code: it writes the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def test_pickle_members_are_never_unpickled(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Payload(marker))
    # The payload is live: unpickling it does run code.
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_Payload(probe)))
    assert probe.exists()
    members = [
        ("000000000.png", _image_bytes((10, 20, 30), "PNG")),
        ("000000000.txt", b"hello"),
        ("000000000.pyd", payload),
        ("000000000.pkl", payload),
        ("000000001.png", _image_bytes((1, 2, 3), "PNG")),
        ("000000001.pickle", payload),
    ]
    shard = _write_tar(tmp_path / "evil.tar", members)
    samples = list(read_shards(shard))
    assert not marker.exists()
    assert len(samples) == 2 and samples[0]["txt"] == "hello"
    assert set(samples[0]) == {"image", "txt", "json", "__key__", "__url__"}


def test_corrupt_samples_are_counted_and_skipped(tmp_path):
    members = []
    for i in range(26):
        data = b"not an image at all" if i == 7 else _image_bytes((i, i, i), "PNG")
        members += [(f"{i:09d}.png", data), (f"{i:09d}.txt", f"t{i}".encode())]
    members.append(("000000099.txt", b"a caption without an image"))
    shard = _write_tar(tmp_path / "bad.tar", members)
    counter = ShardErrorCounter(max_error_rate=0.2)
    dataset = read_shards(shard, handler=counter)
    samples = list(dataset)
    assert dataset.errors is counter
    assert len(samples) == 25 and "t7" not in [s["txt"] for s in samples]
    assert counter.count == 2 and counter.seen == 27


def test_too_many_corrupt_samples_stop_with_a_clear_error(tmp_path):
    members = []
    for i in range(40):
        data = b"garbage" if i % 2 else _image_bytes((i, i, i), "PNG")
        members.append((f"{i:09d}.png", data))
    shard = _write_tar(tmp_path / "bad.tar", members)
    with pytest.raises(OnewordError, match="could not be read"):
        list(read_shards(shard))


def test_shuffle_is_seeded(tmp_path):
    write_world_shards(tmp_path / "w", 40, seed=1, maxcount=10)
    keys = lambda seed: [s["__key__"] for s in read_shards(tmp_path / "w", shuffle=16, seed=seed)]  # noqa: E731
    first = keys(0)
    assert sorted(first) == [f"{i:09d}" for i in range(40)]
    assert first != sorted(first) and first == keys(0)
