"""The miniature world: renderer ground truth, captions, concept lists, the stream."""

from __future__ import annotations

import itertools
import random
import re

import pytest
import torch

from oneword.datasets import world
from oneword.datasets.world import (
    ATTRIBUTES,
    COLOURS,
    EDIT_PROMPTS,
    HELD_OUT,
    PATTERNS,
    SHAPES,
    TONES,
    UNNAMED,
    VALUES,
    Identity,
    Scene,
    WorldStream,
    caption,
    caption_batch,
    concept_scenes,
    edit_prompts,
    full_caption,
    is_named,
    labels,
    render,
    sample_scenes,
    training_identities,
    valid_backgrounds,
)
from oneword.errors import OnewordError


def _scene(**overrides) -> Scene:
    values = dict(
        shape="circle",
        colour="red",
        pattern="solid",
        background="blue",
        size="big",
        position="center",
    )
    values.update(overrides)
    return Scene(**values)


def _rgb(name: str) -> torch.Tensor:
    return torch.tensor(COLOURS[name], dtype=torch.uint8).view(3, 1, 1)


def _object_mask(image: torch.Tensor, background: str) -> torch.Tensor:
    """(H, W) bool: pixels that are not exactly the background colour."""
    return (image != _rgb(background)).any(dim=0)


def _mode_colour(image: torch.Tensor, mask: torch.Tensor) -> tuple[int, ...]:
    pixels = image[:, mask].T.tolist()
    counts: dict[tuple[int, ...], int] = {}
    for p in pixels:
        counts[tuple(p)] = counts.get(tuple(p), 0) + 1
    return max(counts, key=counts.get)


# --- vocabulary ---------------------------------------------------------------------------


def test_vocabulary_sizes_and_names():
    assert len(SHAPES) == 12 and len(COLOURS) == 10 and len(PATTERNS) == 6
    assert set(UNNAMED) == {
        "hexagon",
        "crescent",
        "arrow",
        "hourglass",
        "teal",
        "pink",
        "concentric",
        "split",
    }
    assert COLOURS["teal"] == (0, 128, 128) and COLOURS["pink"] == (255, 110, 180)
    assert not set(VALUES["background"]) & UNNAMED
    assert is_named("shape", "star") and not is_named("colour", "teal")
    with pytest.raises(OnewordError, match="unknown shape"):
        is_named("shape", "blob")
    # All ten colours are far apart.
    for a, b in itertools.combinations(COLOURS.values(), 2):
        assert sum((x - y) ** 2 for x, y in zip(a, b)) ** 0.5 > 90


def test_scene_rejects_unknown_values():
    with pytest.raises(OnewordError, match="blob"):
        _scene(shape="blob")
    with pytest.raises(OnewordError, match="background"):
        _scene(background="teal")  # backgrounds are always named


def test_valid_backgrounds_never_hide_the_object():
    for colour, pattern in itertools.product(COLOURS, PATTERNS):
        backgrounds = valid_backgrounds(colour, pattern)
        assert len(backgrounds) >= 5
        assert colour not in backgrounds


# --- renderer -----------------------------------------------------------------------------


def test_render_is_deterministic_and_batch_independent():
    scenes = sample_scenes(64, torch.Generator().manual_seed(0))
    first, second = render(scenes), render(scenes)
    assert first.dtype == torch.uint8 and first.shape == (64, 3, 64, 64)
    assert torch.equal(first, second)
    # An image does not depend on which other scenes share its batch.
    assert torch.equal(render(scenes[5:6])[0], first[5])
    other = render(sample_scenes(64, torch.Generator().manual_seed(1)))
    assert not torch.equal(first, other)


def test_render_resolution_and_empty():
    scene = _scene()
    assert render([scene], 32).shape == (1, 3, 32, 32)
    assert render([], 64).shape == (0, 3, 64, 64)


@pytest.mark.parametrize("colour", list(COLOURS))
def test_solid_object_has_its_colour_and_corners_the_background(colour):
    background = valid_backgrounds(colour, "solid")[0]
    scenes = [
        _scene(shape=shape, colour=colour, background=background, position="left", rotation=7.0)
        for shape in SHAPES
    ]
    images = render(scenes)
    for scene, image in zip(scenes, images):
        mask = _object_mask(image, background)
        assert mask.sum() > 50, scene.shape
        assert _mode_colour(image, mask) == COLOURS[colour], scene.shape
        # The corners away from a left object are pure background.
        assert image[:, 0, -1].tolist() == list(COLOURS[background])
        assert image[:, -1, -1].tolist() == list(COLOURS[background])


@pytest.mark.parametrize("pattern", [p for p in PATTERNS if p != "solid"])
@pytest.mark.parametrize("size", ["small", "big"])
def test_patterns_show_both_tones(pattern, size):
    for colour in ("red", "black", "teal", "white"):
        background = valid_backgrounds(colour, pattern)[0]
        scene = _scene(
            shape="square", colour=colour, pattern=pattern, background=background, size=size
        )
        image = render([scene])[0]
        mask = _object_mask(image, background)
        pixels = image[:, mask].T
        base = (pixels == torch.tensor(COLOURS[colour])).all(dim=1).float().mean()
        tone = (pixels == torch.tensor(TONES[colour])).all(dim=1).float().mean()
        # Both tones cover a clear share of the object; the object colour still dominates
        # or ties (split: half and half).
        assert 0.1 < tone < 0.6, (colour, pattern, size, tone)
        assert base > 0.25, (colour, pattern, size, base)


def _centre_of_mass(mask: torch.Tensor) -> tuple[float, float]:
    ys, xs = torch.nonzero(mask, as_tuple=True)
    side = mask.shape[0]
    return xs.float().mean().item() / side, ys.float().mean().item() / side


def test_positions_and_sizes():
    for shape in SHAPES:
        scenes = [_scene(shape=shape, position=p, dx=0.02, dy=-0.02) for p in world.POSITIONS]
        masks = [_object_mask(image, "blue") for image in render(scenes)]
        centres = dict(zip(world.POSITIONS, (_centre_of_mass(m) for m in masks)))
        assert centres["left"][0] < 0.42 and centres["right"][0] > 0.58, shape
        assert centres["top"][1] < 0.42 and centres["bottom"][1] > 0.58, shape
        assert abs(centres["center"][0] - 0.5) < 0.08 and abs(centres["center"][1] - 0.5) < 0.08
        small, big = render([_scene(shape=shape, size="small"), _scene(shape=shape, size="big")])
        assert _object_mask(big, "blue").sum() > 1.8 * _object_mask(small, "blue").sum(), shape


def test_every_shape_is_a_distinct_nonempty_mask():
    masks = [_object_mask(image, "blue") for image in render([_scene(shape=s) for s in SHAPES])]
    for shape, mask in zip(SHAPES, masks):
        assert 150 < mask.sum() < 64 * 64 // 2, shape
    for (a, mask_a), (b, mask_b) in itertools.combinations(zip(SHAPES, masks), 2):
        union = (mask_a | mask_b).sum().item()
        iou = (mask_a & mask_b).sum().item() / union
        assert iou < 0.88, (a, b, iou)


def test_rotation_turns_the_object():
    upright, turned = render([_scene(shape="square"), _scene(shape="square", rotation=15.0)])
    assert not torch.equal(upright, turned)


# --- sampling and labels ------------------------------------------------------------------


def test_sample_scenes_valid_and_restricted():
    scenes = sample_scenes(500, torch.Generator().manual_seed(3))
    assert all(s.background in valid_backgrounds(s.colour, s.pattern) for s in scenes)
    assert {s.shape for s in scenes} == set(SHAPES)
    assert all(abs(s.dx) <= world.JITTER and abs(s.rotation) <= world.MAX_ROTATION for s in scenes)
    named = sample_scenes(300, torch.Generator().manual_seed(3), named_only=True)
    assert not {v for s in named for v in (s.shape, s.colour, s.pattern)} & UNNAMED
    chosen = [HELD_OUT[0], HELD_OUT[1]]
    restricted = sample_scenes(50, torch.Generator().manual_seed(3), identities=chosen)
    assert {s.identity for s in restricted} == set(chosen)
    with pytest.raises(OnewordError, match="unnamed"):
        sample_scenes(5, torch.Generator(), identities=[HELD_OUT[0]], named_only=True)
    again = sample_scenes(500, torch.Generator().manual_seed(3))
    assert again == scenes


def test_pattern_weights_set_each_patterns_share_and_bad_weights_are_refused():
    from oneword.datasets.world import PATTERNS, UNNAMED_PATTERNS

    only_unnamed = [1.0 if p in UNNAMED_PATTERNS else 0.0 for p in PATTERNS]
    scenes = sample_scenes(300, torch.Generator().manual_seed(3), pattern_weights=only_unnamed)
    assert {s.pattern for s in scenes} == set(UNNAMED_PATTERNS)
    assert all(s.background in valid_backgrounds(s.colour, s.pattern) for s in scenes)
    quarter = [0.25 if p in UNNAMED_PATTERNS else 1.0 for p in PATTERNS]
    drawn = sample_scenes(6000, torch.Generator().manual_seed(4), pattern_weights=quarter)
    share = sum(s.pattern in UNNAMED_PATTERNS for s in drawn) / len(drawn)
    assert abs(share - 0.5 / 4.5) < 0.015  # 11%, not the uniform draw's 33%
    again = sample_scenes(6000, torch.Generator().manual_seed(4), pattern_weights=quarter)
    assert again == drawn
    for bad, match in (([1.0] * 5, "expected 6 finite weights"), ([1, 1, 1, 1, 1, -1], ">= 0"),
                       ([0.0] * 6, "must be > 0"), ([1, 1, 1, 1, 1, float("nan")], "finite")):  # fmt: skip
        with pytest.raises(OnewordError, match=match):
            sample_scenes(5, torch.Generator(), pattern_weights=bad)
    with pytest.raises(OnewordError, match="not with identities"):
        sample_scenes(5, torch.Generator(), identities=[HELD_OUT[0]], pattern_weights=quarter)


def test_labels_index_values():
    scenes = sample_scenes(40, torch.Generator().manual_seed(4))
    table = labels(scenes)
    assert set(table) == set(ATTRIBUTES)
    for attr in ATTRIBUTES:
        assert table[attr].dtype == torch.int64 and table[attr].shape == (40,)
        assert [VALUES[attr][i] for i in table[attr].tolist()] == [getattr(s, attr) for s in scenes]


# --- captions -----------------------------------------------------------------------------


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text))


def test_captions_never_name_unnamed_values():
    scenes = sample_scenes(3000, torch.Generator().manual_seed(5))
    rng = random.Random(0)
    texts = caption_batch(scenes, rng)
    assert len(set(texts)) > 1000  # varied
    for scene, text in zip(scenes, texts):
        assert not _words(text) & UNNAMED, text
        noun = scene.shape if scene.shape not in UNNAMED else None
        assert (noun in _words(text)) if noun else _words(text) & {"object", "thing", "shape"}
        assert not _words(full_caption(scene)) & UNNAMED


def test_name_all_captions_name_everything():
    scenes = [
        s for s in sample_scenes(2000, torch.Generator().manual_seed(6)) if s.colour == "teal"
    ]
    rng = random.Random(1)
    texts = [caption(s, rng, name_all=True) for s in scenes]
    assert sum("teal" in t for t in texts) > 0.6 * len(texts)
    scene = _scene(shape="hexagon", colour="pink", pattern="split", background="green")
    assert all("hexagon" in caption(scene, rng, name_all=True) for _ in range(50))
    assert _words(full_caption(scene, name_all=True)) >= {
        "hexagon",
        "pink",
        "split",
        "green",
        "big",
    }
    assert full_caption(scene) == "a big object on a green background, in the center"
    assert (
        full_caption(_scene(position="top", pattern="striped"))
        == "a big red striped circle on a blue background, at the top"
    )


def test_caption_dropout():
    scenes = sample_scenes(200, torch.Generator().manual_seed(7))
    assert caption_batch(scenes, random.Random(0), drop_prob=1.0) == [""] * 200
    some = caption_batch(scenes, random.Random(0), drop_prob=0.3)
    assert 20 < some.count("") < 110
    with pytest.raises(OnewordError):
        caption_batch(scenes, random.Random(0), drop_prob=1.5)


def test_omit_solid_sets_how_often_solid_is_written():
    solid = [
        s for s in sample_scenes(3000, torch.Generator().manual_seed(8)) if s.pattern == "solid"
    ]

    def named(omit: float) -> float:
        texts = caption_batch(solid, random.Random(0), omit_solid=omit)
        return sum("solid" in _words(t) for t in texts) / len(texts)

    # 3 of the 12 templates ("with stripes", ...) have no place for it: at most 75%.
    assert named(1.0) == 0.0
    assert 0.24 < named(world.OMIT_SOLID_PROB) < 0.36 < 0.68 < named(0.0) < 0.82
    other = [
        s for s in sample_scenes(300, torch.Generator().manual_seed(8)) if s.pattern != "solid"
    ]
    rng_a, rng_b = random.Random(1), random.Random(1)  # other patterns are untouched
    assert caption_batch(other, rng_a, omit_solid=0.0) == caption_batch(other, rng_b)
    with pytest.raises(OnewordError, match="omit_solid must be in"):
        caption_batch(solid, random.Random(0), omit_solid=-0.1)


# --- concepts -----------------------------------------------------------------------------


def test_held_out_concepts():
    assert len(HELD_OUT) >= 24 and len(set(HELD_OUT)) == len(HELD_OUT)
    with_unnamed = [i for i in HELD_OUT if i.has_unnamed()]
    assert len(with_unnamed) > len(HELD_OUT) / 2 and len(with_unnamed) < len(HELD_OUT)
    assert {i.shape for i in HELD_OUT} == set(SHAPES)
    assert {i.colour for i in HELD_OUT} == set(COLOURS)
    assert {i.pattern for i in HELD_OUT} == set(PATTERNS)
    train = training_identities()
    assert not set(train) & set(HELD_OUT)
    assert len(train) == 12 * 10 * 6 - len(HELD_OUT)
    identity = Identity("hexagon", "teal", "striped")
    assert identity.name == "teal-hexagon-striped"
    assert (
        identity.class_word() == "object"
        and Identity("star", "red", "solid").class_word() == "star"
    )


def test_edit_prompts_are_valid_for_every_held_out_concept():
    assert len(EDIT_PROMPTS) >= 8
    for template, edits in EDIT_PROMPTS:
        assert template.count("{}") == 1 and edits
        assert all(value in VALUES[attr] for attr, value in edits.items())
    for identity in HELD_OUT:
        prompts = edit_prompts(identity)
        assert len(prompts) >= 8, identity.name
        for _, edits in prompts:
            if "background" in edits:
                assert edits["background"] in valid_backgrounds(identity.colour, identity.pattern)


def test_concept_scenes_vary():
    identity = HELD_OUT[0]
    scenes = concept_scenes(identity, 5, torch.Generator().manual_seed(0))
    assert {s.identity for s in scenes} == {identity}
    assert len({s.background for s in scenes}) == 5
    assert len({s.position for s in scenes}) == 5
    assert {s.size for s in scenes} == {"small", "big"}


# --- stream -------------------------------------------------------------------------------


def test_world_stream_is_deterministic_and_resumable():
    stream = WorldStream(batch_size=8, seed=11, drop_prob=0.2)
    batches = list(itertools.islice(iter(stream), 3))
    assert batches[0]["pixels"].shape == (8, 3, 64, 64) and len(batches[0]["captions"]) == 8
    assert [b["batch_index"] for b in batches] == [0, 1, 2]
    assert stream.state_dict() == {"next_batch": 3}
    assert torch.equal(batches[0]["labels"]["shape"], labels(batches[0]["scenes"])["shape"])
    again = WorldStream(batch_size=8, seed=11, drop_prob=0.2)
    assert torch.equal(next(iter(again))["pixels"], batches[0]["pixels"])
    resumed = WorldStream(batch_size=8, seed=11, drop_prob=0.2)
    resumed.load_state_dict({"next_batch": 2})
    batch = next(iter(resumed))
    assert torch.equal(batch["pixels"], batches[2]["pixels"])
    assert batch["captions"] == batches[2]["captions"]
    other = next(iter(WorldStream(batch_size=8, seed=12)))
    assert not torch.equal(other["pixels"], batches[0]["pixels"])


def test_world_stream_same_with_dataloader_workers():
    stream = WorldStream(batch_size=4, seed=3)
    expected = [stream.batch(i)["pixels"] for i in range(4)]
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2)
    got = list(itertools.islice(iter(loader), 4))
    assert [b["batch_index"] for b in got] == [0, 1, 2, 3]
    for batch, pixels in zip(got, expected):
        assert torch.equal(batch["pixels"], pixels)
        assert isinstance(batch["scenes"][0], Scene)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_render_on_cuda_matches_cpu():
    scenes = sample_scenes(256, torch.Generator().manual_seed(0))
    on_cpu = render(scenes).int()
    on_gpu = render(scenes, device="cuda").cpu().int()
    # Boundary samples may flip with different float rounding: allow a few pixels.
    assert (on_cpu - on_gpu).abs().gt(2).float().mean() < 1e-3


@pytest.mark.parametrize("name_all", [False, True])
def test_caption_reports_exactly_the_attributes_it_names(name_all):
    """The text tower's attribute heads learn from these labels: a wrong one teaches a lie."""
    from oneword.datasets.world import _PATTERN_WITH, _POSITION_PHRASES

    rng = random.Random(3)
    seen: set[str] = set()
    for scene in sample_scenes(400, torch.Generator().manual_seed(8)):
        mentioned: set[str] = set()
        text = caption(scene, rng, name_all=name_all, mentioned=mentioned)
        seen |= mentioned
        words = _words(text)
        for attr in ("shape", "colour", "size"):
            value = getattr(scene, attr)
            assert (attr in mentioned) == (value in words), (attr, value, text)
        with_phrase = _PATTERN_WITH.get(scene.pattern, "\0")
        named_pattern = scene.pattern in words or with_phrase in text
        assert ("pattern" in mentioned) == named_pattern, text
        # The background colour word appears iff it is mentioned (it never equals the colour).
        assert ("background" in mentioned) == (scene.background in words), text
        phrases = _POSITION_PHRASES[scene.position]
        named_position = scene.position in words or any(p in text for p in phrases)
        assert ("position" in mentioned) == named_position, text
    assert seen == set(world_attributes())


def world_attributes():
    from oneword.datasets.world import ATTRIBUTES

    return ATTRIBUTES
