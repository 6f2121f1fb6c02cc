"""The oracle: an attribute classifier trained on rendered ground truth.

It reads a 64x64 image and names the value of every world attribute (shape, colour,
pattern, background, size, position), named and unnamed values alike. Identity and
editability of learned tokens, and the world model's prompt fidelity, are measured with it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ..errors import OnewordError


@dataclass
class OracleConfig:
    resolution: int = 64
    width: int = 32  # channels of the first stage; doubled at each downsampling
    attributes: dict[str, list[str]] = field(
        default_factory=dict
    )  # attribute -> values (label order)


def _block(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.GroupNorm(8, cout), nn.SiLU()
    )


class Oracle(nn.Module):
    """A small CNN with one linear head per attribute.

    The last feature map is flattened rather than average-pooled, so position stays readable.
    """

    def __init__(self, config: OracleConfig):
        super().__init__()
        self.config = config
        w = config.width
        # A strided stem: full-resolution 3x3 convolutions made a CPU step several times
        # dearer, and a stride-2 3x3 kernel still sees 5-px stripes and dots.
        self.features = nn.Sequential(
            _block(3, w, 2),
            _block(w, 2 * w, 1),
            _block(2 * w, 2 * w, 2),
            _block(2 * w, 4 * w, 1),
            _block(4 * w, 4 * w, 2),
            nn.Conv2d(4 * w, 32, 1),
        )
        side = config.resolution // 8
        self.trunk = nn.Sequential(nn.Linear(32 * side * side, 512), nn.SiLU())
        self.heads = nn.ModuleDict(
            {name: nn.Linear(512, len(values)) for name, values in config.attributes.items()}
        )

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """images: (b, 3, H, W) uint8 or float in [-1, 1] -> {attribute: logits (b, n_values)}."""
        if images.dtype == torch.uint8:
            images = images.float() / 127.5 - 1.0
        features = rearrange(self.features(images), "b c h w -> b (c h w)")
        hidden = self.trunk(features)
        return {name: head(hidden) for name, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 256) -> dict[str, list[str]]:
        """Attribute values (strings) of each image."""
        out: dict[str, list[str]] = {name: [] for name in self.config.attributes}
        for start in range(0, images.shape[0], batch_size):
            logits = self(images[start : start + batch_size].to(next(self.parameters()).device))
            for name, values in self.config.attributes.items():
                out[name] += [values[i] for i in logits[name].argmax(-1).tolist()]
        return out

    def loss(self, images: torch.Tensor, labels: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = self(images)
        return sum(
            F.cross_entropy(logits[name], labels[name].to(logits[name].device)) for name in logits
        )

    def save(self, folder: str | Path) -> Path:
        from safetensors.torch import save_file

        from ..io import atomic_path

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(folder / "config.json") as tmp:
            tmp.write_text(json.dumps(asdict(self.config), indent=2))
        # fp16 on disk halves the size; loading casts back to fp32.
        state = {k: v.detach().half().contiguous().cpu() for k, v in self.state_dict().items()}
        with atomic_path(folder / "model.safetensors") as tmp:
            save_file(state, str(tmp), metadata={"format": "pt", "kind": "oneword-oracle"})
        return folder

    @classmethod
    def load(cls, folder: str | Path, device: str | torch.device = "cpu") -> Oracle:
        from safetensors.torch import load_file

        folder = Path(folder)
        try:
            config = OracleConfig(**json.loads((folder / "config.json").read_text()))
            state = load_file(str(folder / "model.safetensors"))
        except (OSError, ValueError, TypeError) as exc:
            raise OnewordError(f"cannot load the oracle from {folder}: {exc}") from None
        oracle = cls(config)
        oracle.load_state_dict({k: v.float() for k, v in state.items()})
        return oracle.to(device).eval().requires_grad_(False)


@torch.no_grad()
def oracle_accuracy(
    oracle: Oracle, images: torch.Tensor, labels: dict[str, torch.Tensor]
) -> dict[str, float]:
    """Per-attribute accuracy of the oracle on labelled images."""
    correct: dict[str, int] = {name: 0 for name in oracle.config.attributes}
    device = next(oracle.parameters()).device
    for start in range(0, images.shape[0], 256):
        logits = oracle(images[start : start + 256].to(device))
        for name in correct:
            correct[name] += int(
                (logits[name].argmax(-1).cpu() == labels[name][start : start + 256].cpu()).sum()
            )
    return {name: c / images.shape[0] for name, c in correct.items()}
