import pytest
import torch

from oneword.encoder.losses import text_space_regression, unet_space_regression


@pytest.mark.parametrize("space", ["text", "unet"])
def test_regression_loss_is_one_at_the_class_word_and_zero_at_the_target(tiny_world_dir, space):
    from oneword.encoder.model import class_word_rows
    from oneword.inversion.templates import load_templates
    from oneword.models import load_model
    from oneword.tokens import add_placeholder

    model = load_model(tiny_world_dir, device="cpu")
    width = model.widths[0]
    slots = [
        add_placeholder(model, f"<slot-{i}>", "object", 1, init_rows=[torch.zeros(1, width)])
        for i in range(2)
    ]
    c = torch.stack([class_word_rows(model, "object", 1)[0]] * 2)  # (2, 1, d)
    target = c + 3 * torch.randn(c.shape, generator=torch.Generator().manual_seed(0))
    predicted = c.clone().requires_grad_(True)
    templates = load_templates("object")
    side = model.resolution // 8
    latents = torch.randn(2 * 3, 4, side, side, generator=torch.Generator().manual_seed(2))

    def loss(rows):
        generator = torch.Generator().manual_seed(1)  # the same draws for every rows
        if space == "text":
            return text_space_regression(model, slots, [rows], [target], [c], templates, generator)
        return unet_space_regression(
            model, slots, [rows], [target], [c], latents, templates, generator
        )

    at_class_word = loss(predicted)
    assert at_class_word.item() == pytest.approx(1.0, abs=1e-5)
    at_class_word.backward()
    assert predicted.grad is not None and predicted.grad.abs().sum() > 0  # it trains the head
    assert loss(target).item() == pytest.approx(0.0, abs=1e-6)
    halfway = loss(0.5 * (c + target)).item()
    assert 0 < halfway < 1
