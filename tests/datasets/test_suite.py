"""Concept suites: the world suite round trip, DreamBooth's layout, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from oneword.datasets.suite import SUITE_FORMAT, read_suite, write_world_suite
from oneword.datasets.world import HELD_OUT, VALUES, Scene, render
from oneword.errors import OnewordError

# The head of DreamBooth's dataset/prompts_and_classes.txt, as published.
DREAMBOOTH_FILE = """Classes

subject_name,class
backpack,backpack
dog,dog
bear_plushie,stuffed animal

Prompts

Object Prompts

prompt_list = [
'a {0} {1} in the jungle'.format(unique_token, class_token),
'a {0} {1} on top of a white rug'.format(unique_token, class_token),
'a cube shaped {0} {1}'.format(unique_token, class_token)
]

Live Subject Prompts

prompt_list = [
'a {0} {1} in the jungle'.format(unique_token, class_token),
'a {0} {1} wearing a red hat'.format(unique_token, class_token),
'a {0} {1} in a purple wizard outfit'.format(unique_token, class_token)
]
"""


def _save_images(folder: Path, count: int, suffix: str = ".jpg") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(folder / f"{i:02d}{suffix}")


def _concept(folder: Path, config: dict | str | None, images: int = 3) -> None:
    _save_images(folder, images, ".png")
    if config is not None:
        text = config if isinstance(config, str) else json.dumps(config)
        (folder / "concept.json").write_text(text)


def test_world_suite_round_trip(tmp_path):
    out = write_world_suite(tmp_path / "suite", images_per_concept=4, seed=3)
    assert out == tmp_path / "suite"
    assert [p.name for p in tmp_path.iterdir()] == ["suite"]  # no staging folder left
    suite = json.loads((out / "suite.json").read_text())
    assert suite["format"] == SUITE_FORMAT
    concepts = read_suite(out)
    assert [c.name for c in concepts] == [i.name for i in HELD_OUT] == suite["concepts"]
    for concept, identity in zip(concepts, HELD_OUT):
        assert len(concept.images) == 4
        assert concept.class_word == identity.class_word()
        assert len(concept.prompts) >= 8 and all("{}" in p for p in concept.prompts)
        assert len(concept.edits) == len(concept.prompts)
        assert all(set(e) <= set(VALUES) for e in concept.edits)
        assert concept.attributes == {
            "shape": identity.shape,
            "colour": identity.colour,
            "pattern": identity.pattern,
        }
    # The images are the renders of the stored scenes, in varied scenes.
    first = concepts[0]
    stored = json.loads((out / first.name / "concept.json").read_text())["scenes"]
    scenes = [Scene(**s) for s in stored]
    assert len({s.background for s in scenes}) >= 3 and len({s.position for s in scenes}) >= 3
    pixels = torch.stack(
        [torch.from_numpy(np.array(Image.open(p))).permute(2, 0, 1) for p in first.images]
    )
    assert torch.equal(pixels, render(scenes))
    # Same seed, same suite; the folder is never overwritten.
    again = write_world_suite(
        tmp_path / "again", images_per_concept=4, seed=3, identities=HELD_OUT[:1]
    )
    assert (again / first.name / "00.png").read_bytes() == first.images[0].read_bytes()
    with pytest.raises(OnewordError, match="not empty"):
        write_world_suite(out)


def test_folder_without_suite_json(tmp_path):
    _concept(tmp_path / "b_mug", {"class_word": "mug", "prompts": ["a {} mug on a table"]})
    _concept(tmp_path / "a_cat", {"class_word": "cat"})  # prompts default
    (tmp_path / ".hidden").mkdir()
    concepts = read_suite(tmp_path)
    assert [c.name for c in concepts] == ["a_cat", "b_mug"]
    assert concepts[0].prompts == ["a photo of {}"] and concepts[0].edits is None
    assert concepts[1].prompts == ["a {} mug on a table"] and len(concepts[1].images) == 3


@pytest.mark.parametrize("where", ["root", "dataset"])
def test_dreambooth_layout(tmp_path, where):
    dataset = tmp_path / "dataset"
    for name in ("backpack", "dog", "bear_plushie"):
        _save_images(dataset / name, 4)
    (dataset / "prompts_and_classes.txt").write_text(DREAMBOOTH_FILE)
    (dataset / "references_and_licenses.txt").write_text("not a subject")
    concepts = read_suite(tmp_path if where == "root" else dataset)
    by_name = {c.name: c for c in concepts}
    assert list(by_name) == ["backpack", "dog", "bear_plushie"]
    assert by_name["dog"].class_word == "dog"
    assert by_name["dog"].prompts == [
        "a {} dog in the jungle",
        "a {} dog wearing a red hat",
        "a {} dog in a purple wizard outfit",
    ]
    assert by_name["bear_plushie"].prompts[2] == "a cube shaped {} stuffed animal"
    assert by_name["backpack"].prompts[1] == "a {} backpack on top of a white rug"
    assert len(by_name["backpack"].images) == 4


def test_bad_suites_fail_clearly(tmp_path):
    with pytest.raises(OnewordError, match="does not exist"):
        read_suite(tmp_path / "nope")

    no_images = tmp_path / "no_images"
    (no_images / "thing").mkdir(parents=True)
    (no_images / "thing" / "concept.json").write_text(json.dumps({"class_word": "thing"}))
    with pytest.raises(OnewordError, match="no images"):
        read_suite(no_images)

    bad_json = tmp_path / "bad_json"
    _concept(bad_json / "thing", "{not json")
    with pytest.raises(OnewordError, match="not valid JSON"):
        read_suite(bad_json)

    no_class = tmp_path / "no_class"
    _concept(no_class / "thing", {"prompts": ["a {}"]})
    with pytest.raises(OnewordError, match="class_word"):
        read_suite(no_class)

    no_token = tmp_path / "no_token"
    _concept(no_token / "thing", {"class_word": "thing", "prompts": ["a photo of a thing"]})
    with pytest.raises(OnewordError, match="a photo of a thing"):
        read_suite(no_token)

    no_config = tmp_path / "no_config"
    _concept(no_config / "thing", None)
    with pytest.raises(OnewordError, match="concept.json"):
        read_suite(no_config)

    bad_edits = tmp_path / "bad_edits"
    _concept(bad_edits / "thing", {"class_word": "t", "prompts": ["a {}", "{} x"], "edits": [{}]})
    with pytest.raises(OnewordError, match="edits"):
        read_suite(bad_edits)

    listed_missing = tmp_path / "listed_missing"
    _concept(listed_missing / "here", {"class_word": "t"})
    (listed_missing / "suite.json").write_text(
        json.dumps({"format": SUITE_FORMAT, "concepts": ["gone"]})
    )
    with pytest.raises(OnewordError, match="gone"):
        read_suite(listed_missing)

    missing_subject = tmp_path / "db"
    _save_images(missing_subject / "dataset" / "dog", 2)
    (missing_subject / "dataset" / "prompts_and_classes.txt").write_text(DREAMBOOTH_FILE)
    with pytest.raises(OnewordError, match="backpack"):
        read_suite(missing_subject)
