"""The world's identity splits: train, validation and test are disjoint, validation looks like
test, and encoder training never draws a validation or test identity."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest

from oneword.datasets.world import (
    COLOURS,
    HELD_OUT,
    PATTERNS,
    SHAPES,
    UNNAMED,
    VALIDATION,
    Identity,
    edit_prompts,
    split_identities,
    training_identities,
    world_splits,
)
from oneword.errors import OnewordError


def test_the_three_splits_are_disjoint_and_cover_the_world():
    splits = world_splits()
    sets = {name: set(identities) for name, identities in splits.items()}
    assert [len(splits[n]) for n in ("train", "validation", "test")] == [672, 24, 24]
    assert all(len(set(s)) == len(s) for s in splits.values())  # no duplicates
    for a, b in itertools.combinations(sets, 2):
        assert not sets[a] & sets[b], (a, b)
    every = {Identity(s, c, p) for s, c, p in itertools.product(SHAPES, COLOURS, PATTERNS)}
    assert set().union(*sets.values()) == every
    assert splits["test"] == HELD_OUT  # today's held-out concepts, unchanged
    assert world_splits() == splits  # deterministic
    assert split_identities("validation") == VALIDATION
    assert list(split_identities("train")) == training_identities()
    with pytest.raises(OnewordError, match="unknown split 'dev'"):
        split_identities("dev")


def _unnamed_profile(identity: Identity) -> tuple[bool, bool, bool]:
    return tuple(v in UNNAMED for v in (identity.shape, identity.colour, identity.pattern))


def test_validation_has_the_make_up_of_test():
    for attribute in ("shape", "colour", "pattern"):
        assert Counter(getattr(i, attribute) for i in VALIDATION) == Counter(
            getattr(i, attribute) for i in HELD_OUT
        ), attribute
    # The same number of concepts with no, one, two unnamed values, in the same attributes.
    assert Counter(map(_unnamed_profile, VALIDATION)) == Counter(map(_unnamed_profile, HELD_OUT))
    assert sum(i.has_unnamed() for i in VALIDATION) == 18
    # Every validation concept gets as many edit prompts as the test concepts get at least.
    assert min(len(edit_prompts(i)) for i in VALIDATION) >= min(
        len(edit_prompts(i)) for i in HELD_OUT
    )


def test_encoder_training_never_draws_a_validation_or_test_identity():
    from oneword.encoder.data import NEVER_TRAIN_NAMES, WorldConceptSets

    assert NEVER_TRAIN_NAMES == {i.name for i in HELD_OUT + VALIDATION}
    source = WorldConceptSets(batch_size=64, references=1, targets=1, resolution=8, seed=3)
    drawn = Counter(name for index in range(60) for name in source.batch(index)["names"])
    assert sum(drawn.values()) == 3840
    assert not set(drawn) & NEVER_TRAIN_NAMES
    assert len(drawn) > 600  # the draws do cover the training split (672 identities)
    with pytest.raises(OnewordError, match="validation or test split"):
        WorldConceptSets(
            identities=[VALIDATION[0]], batch_size=1, references=1, targets=1, resolution=8
        )


def test_folder_source_skips_validation_and_test_folders(tmp_path):
    from oneword.datasets.suite import write_world_suite
    from oneword.encoder.data import FolderConceptSets

    identities = [training_identities()[0], VALIDATION[0], HELD_OUT[0]]
    suite = write_world_suite(tmp_path / "s", images_per_concept=2, identities=identities)
    source = FolderConceptSets(suite, batch_size=4, references=1, targets=1, resolution=8)
    assert [c[0] for c in source.concepts] == [identities[0].name]
