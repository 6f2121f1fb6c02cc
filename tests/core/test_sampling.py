"""Sampling from a LoadedModel with learned placeholder tokens (tiny models, CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from oneword.models import load_model
from oneword.sampling import generate, make_pipeline
from oneword.tokens import add_placeholder, set_rows


def _arrays(images):
    return [np.asarray(image, dtype=np.int16) for image in images]


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_pipeline_shares_the_model_and_generation_is_deterministic(request, family):
    model = load_model(request.getfixturevalue(f"tiny_{family}_dir"), device="cpu")
    pipe = make_pipeline(model)
    assert pipe.unet is model.unet and pipe.vae is model.vae
    assert pipe.text_encoder is model.text_encoders[0]
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"

    kwargs = {"num_per_prompt": 2, "steps": 2, "pipeline": pipe}
    first = generate(model, ["a photo of a cat", "a dog"], seed=3, **kwargs)
    again = generate(model, ["a photo of a cat", "a dog"], seed=3, **kwargs)
    other = generate(model, ["a photo of a cat"], seed=4, **kwargs)
    assert len(first) == 4 and first[0].size == (model.resolution, model.resolution)
    for a, b in zip(_arrays(first), _arrays(again)):
        assert np.array_equal(a, b)
    # Image j uses seed + j whatever the batch: image 1 of seed 3 is image 0 of seed 4.
    assert np.abs(_arrays(first)[1] - _arrays(other)[0]).max() <= 1
    assert not np.array_equal(_arrays(first)[0], _arrays(other)[0])


def test_placeholder_rows_reach_the_images(tiny_sd1_dir):
    model = load_model(tiny_sd1_dir, device="cpu")
    placeholder = add_placeholder(model, "<t>", "dog", 3)
    prompt = ["a photo of <t>"]
    kwargs = {"placeholders": [placeholder], "num_per_prompt": 1, "steps": 2, "seed": 0}
    before = _arrays(generate(model, prompt, **kwargs))[0]
    # The token means its rows: put other rows in and the image changes ...
    set_rows(model, placeholder, [torch.randn(3, 32, generator=torch.Generator().manual_seed(0))])
    after = _arrays(generate(model, prompt, **kwargs))[0]
    assert not np.array_equal(before, after)
    # ... and all K vectors are used (the prompt is expanded to "<t> <t>_1 <t>_2").
    rows = [torch.randn(3, 32, generator=torch.Generator().manual_seed(0))]
    rows[0][2] = 0
    set_rows(model, placeholder, rows)
    last_changed = _arrays(generate(model, prompt, **kwargs))[0]
    assert not np.array_equal(after, last_changed)


def test_negative_prompt_and_guidance(tiny_sdxl_dir):
    model = load_model(tiny_sdxl_dir, device="cpu")
    kwargs = {"num_per_prompt": 1, "steps": 2, "seed": 0}
    plain = _arrays(generate(model, ["a cat"], **kwargs))[0]
    negative = _arrays(generate(model, ["a cat"], negative_prompt="blurry", **kwargs))[0]
    unguided = _arrays(generate(model, ["a cat"], guidance=1.0, **kwargs))[0]
    assert not np.array_equal(plain, negative)
    assert not np.array_equal(plain, unguided)


def test_progress_bar_counts_every_prompts_steps_and_is_quiet_by_default(tiny_sd1_dir, capsys):
    model = load_model(tiny_sd1_dir, device="cpu")
    kwargs = {"num_per_prompt": 1, "steps": 3}
    quiet = generate(model, ["a cat", "a dog"], **kwargs)
    assert "sampling" not in capsys.readouterr().err
    shown = generate(model, ["a cat", "a dog"], progress=True, **kwargs)
    err = capsys.readouterr().err
    assert "sampling" in err and "0/6 [" in err  # one bar: 2 prompts x 3 steps
    for a, b in zip(_arrays(quiet), _arrays(shown)):  # the bar changes nothing else
        assert np.array_equal(a, b)
