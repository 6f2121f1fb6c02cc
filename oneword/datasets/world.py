"""The miniature world: one shape on a plain background, rendered in torch, with captions.

A scene is a shape of some colour and pattern, of some size, at some position, on a
background of another colour. Some values have no word in the captions the world model
is trained on ("unnamed": hexagon, crescent, arrow, hourglass; teal, pink; concentric,
split), so a personalised token must carry what no word can say. Ground truth is known for
every image, so an oracle classifier can score textual inversion and edits exactly.

The renderer is fully vectorised: every pixel of every image is tested against the
object's implicit shape in the object's own (rotated, scaled) frame on a supersampled
grid, then average-pooled for antialiasing. It is bitwise deterministic on the CPU.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import random
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from einops import rearrange

from oneword.errors import OnewordError

# ---------------------------------------------------------------------------------------
# Vocabulary. Tuple order is the label index the oracle predicts.
# ---------------------------------------------------------------------------------------

NAMED_SHAPES: tuple[str, ...] = (
    "circle",
    "square",
    "triangle",
    "star",
    "cross",
    "heart",
    "diamond",
    "ring",
)
UNNAMED_SHAPES: tuple[str, ...] = ("hexagon", "crescent", "arrow", "hourglass")
SHAPES: tuple[str, ...] = NAMED_SHAPES + UNNAMED_SHAPES

# Saturated, pairwise far apart in RGB (closest pairs ~100: yellow/orange, red/orange,
# green/teal), so both the eye and the oracle tell all ten apart at 64 px.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 25, 25),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (250, 225, 25),
    "purple": (140, 40, 190),
    "orange": (250, 125, 0),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "teal": (0, 128, 128),
    "pink": (255, 110, 180),
}
NAMED_COLOURS: tuple[str, ...] = (
    "red",
    "green",
    "blue",
    "yellow",
    "purple",
    "orange",
    "white",
    "black",
)
UNNAMED_COLOURS: tuple[str, ...] = ("teal", "pink")

NAMED_PATTERNS: tuple[str, ...] = ("solid", "striped", "dotted", "checkered")
UNNAMED_PATTERNS: tuple[str, ...] = ("concentric", "split")  # rings; one half in the 2nd tone
PATTERNS: tuple[str, ...] = NAMED_PATTERNS + UNNAMED_PATTERNS

BACKGROUNDS: tuple[str, ...] = NAMED_COLOURS  # the background always has a word
SIZES: tuple[str, ...] = ("small", "big")
POSITIONS: tuple[str, ...] = ("center", "left", "right", "top", "bottom")

UNNAMED: frozenset[str] = frozenset(UNNAMED_SHAPES + UNNAMED_COLOURS + UNNAMED_PATTERNS)

ATTRIBUTES: tuple[str, ...] = ("shape", "colour", "pattern", "background", "size", "position")
VALUES: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "colour": tuple(COLOURS),
    "pattern": PATTERNS,
    "background": BACKGROUNDS,
    "size": SIZES,
    "position": POSITIONS,
}

# Pattern second tone: light colours darkened to 35 %, dark ones lightened 55 % toward
# white, so the pattern is visible and the object still reads as its colour.
_LIGHTENED = frozenset({"blue", "purple", "black", "teal"})
TONES: dict[str, tuple[int, int, int]] = {
    name: (
        tuple(round(c + 0.55 * (255 - c)) for c in rgb)
        if name in _LIGHTENED
        else tuple(round(0.35 * c) for c in rgb)
    )
    for name, rgb in COLOURS.items()
}

# Geometry, in fractions of the image side (independent of the resolution). World v3 made
# objects bigger (v2: radius 0.16 / 0.26, centres 0.29 / 0.71): v2's UNet drew the pattern
# of 58% of small objects and 76% of big ones (240 captions), so the pattern needs more
# latent pixels; the positions moved inward to keep big objects in the frame.
_RADIUS = {"small": 0.19, "big": 0.28}  # object radius: ~12 px / ~18 px at 64 px
_CENTRES = {
    "center": (0.5, 0.5),
    "left": (0.31, 0.5),
    "right": (0.69, 0.5),
    "top": (0.5, 0.31),
    "bottom": (0.5, 0.69),
}
JITTER = 0.03  # max |dx|, |dy| (~2 px at 64 px); never captioned
MAX_ROTATION = 15.0  # degrees, in the object's frame (the pattern turns with it)
# Pattern period: 14 px for big objects, 10.5 px for small ones at 64 px (3.5 / 2.6 latent
# pixels of the 16x16 grid; v2: 11 / 9 px). Not fully proportional to the size, so small
# objects still show a readable pattern.
_PERIOD = {"small": 10.5 / 64, "big": 14.0 / 64}

# Background validity: far enough from the object colour (and from the pattern's second
# tone) that the object never vanishes into the background.
_MIN_OBJECT_DISTANCE = 100.0
_MIN_TONE_DISTANCE = 80.0


def is_named(attr: str, value: str) -> bool:
    """Whether `value` of attribute `attr` has a word in the world's captions."""
    if attr not in VALUES:
        raise OnewordError(f"unknown attribute {attr!r}; expected one of {ATTRIBUTES}")
    if value not in VALUES[attr]:
        raise OnewordError(f"unknown {attr} {value!r}; expected one of {VALUES[attr]}")
    return value not in UNNAMED


def valid_backgrounds(colour: str, pattern: str) -> tuple[str, ...]:
    """Backgrounds an object of this colour and pattern may stand on (label order)."""
    _check_value("colour", colour)
    _check_value("pattern", pattern)
    return _VALID_BACKGROUNDS[colour, pattern]


def _check_value(attr: str, value: Any) -> None:
    if value not in VALUES[attr]:
        raise OnewordError(f"unknown {attr} {value!r}; expected one of {VALUES[attr]}")


def _compute_valid_backgrounds() -> dict[tuple[str, str], tuple[str, ...]]:
    table = {}
    for colour, pattern in itertools.product(COLOURS, PATTERNS):
        table[colour, pattern] = tuple(
            bg
            for bg in BACKGROUNDS
            if bg != colour
            and math.dist(COLOURS[colour], COLOURS[bg]) >= _MIN_OBJECT_DISTANCE
            and (pattern == "solid" or math.dist(TONES[colour], COLOURS[bg]) >= _MIN_TONE_DISTANCE)
        )
    return table


_VALID_BACKGROUNDS = _compute_valid_backgrounds()


# ---------------------------------------------------------------------------------------
# Scenes and identities
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scene:
    """One image of the world. `dx`, `dy`: jitter in fractions of the image side;
    `rotation`: degrees. Jitter and rotation are never captioned."""

    shape: str
    colour: str
    pattern: str
    background: str
    size: str
    position: str
    dx: float = 0.0
    dy: float = 0.0
    rotation: float = 0.0

    def __post_init__(self) -> None:
        for attr in ATTRIBUTES:
            _check_value(attr, getattr(self, attr))

    @property
    def identity(self) -> Identity:
        return Identity(self.shape, self.colour, self.pattern)

    @property
    def centre(self) -> tuple[float, float]:
        """The object's centre (x, y) in fractions of the image side, jitter included."""
        x, y = _CENTRES[self.position]
        return x + self.dx, y + self.dy

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of every field (round-trips through `Scene(**d)`)."""
        return {f: getattr(self, f) for f in self.__dataclass_fields__}


@dataclass(frozen=True)
class Identity:
    """What a personalised token should capture: the object, not where or how big it is."""

    shape: str
    colour: str
    pattern: str

    def __post_init__(self) -> None:
        for attr in ("shape", "colour", "pattern"):
            _check_value(attr, getattr(self, attr))

    @property
    def name(self) -> str:
        """Folder-safe name, e.g. "teal-hexagon-striped"."""
        return f"{self.colour}-{self.shape}-{self.pattern}"

    def class_word(self) -> str:
        """The shape word if it has one, else "object" (the initialiser word for a token)."""
        return self.shape if self.shape not in UNNAMED else "object"

    def has_unnamed(self) -> bool:
        return any(v in UNNAMED for v in (self.shape, self.colour, self.pattern))


# Held-out concepts (the test split), never in `training_identities()`: every shape twice,
# every colour and pattern at least twice (black once); 18 carry at least one unnamed value,
# 6 are fully named.
HELD_OUT: tuple[Identity, ...] = tuple(
    Identity(shape, colour, pattern)
    for colour, shape, pattern in (
        ("red", "circle", "concentric"),
        ("pink", "circle", "dotted"),
        ("teal", "square", "split"),
        ("white", "square", "checkered"),
        ("teal", "triangle", "dotted"),
        ("red", "triangle", "striped"),
        ("pink", "star", "solid"),
        ("green", "star", "split"),
        ("pink", "cross", "checkered"),
        ("blue", "cross", "solid"),
        ("purple", "heart", "split"),
        ("yellow", "heart", "solid"),
        ("orange", "diamond", "concentric"),
        ("green", "diamond", "dotted"),
        ("black", "ring", "dotted"),
        ("teal", "ring", "striped"),
        ("teal", "hexagon", "striped"),
        ("orange", "hexagon", "solid"),
        ("yellow", "crescent", "dotted"),
        ("white", "crescent", "split"),
        ("blue", "arrow", "checkered"),
        ("purple", "arrow", "concentric"),
        ("green", "hourglass", "solid"),
        ("pink", "hourglass", "striped"),
    )
)


# Validation concepts: every choice (recipes, loss weights, step counts, thresholds) is made
# on these, so that `HELD_OUT` (the test split) is read only for reported numbers. The same
# make-up as `HELD_OUT`, value for value: they are `HELD_OUT` under a permutation of values
# that maps named to named and unnamed to unnamed values, and only swaps values that occur
# equally often in `HELD_OUT` (shapes among named / among unnamed shapes; red, blue, yellow,
# purple, orange, white among themselves; teal <-> pink; solid <-> dotted). So each value
# occurs as often as in `HELD_OUT`, and as many concepts carry no, one, two unnamed values
# in the same attributes. The permutation is the first draw of `random.Random(2026)` that
# moves every shape and gives 24 concepts none of which is in `HELD_OUT`; it is written
# out here so that it never changes.
VALIDATION: tuple[Identity, ...] = tuple(
    Identity(shape, colour, pattern)
    for colour, shape, pattern in (
        ("blue", "star", "concentric"),
        ("pink", "star", "dotted"),
        ("teal", "triangle", "split"),
        ("red", "triangle", "checkered"),
        ("teal", "square", "dotted"),
        ("blue", "square", "striped"),
        ("pink", "circle", "solid"),
        ("green", "circle", "split"),
        ("pink", "ring", "checkered"),
        ("white", "ring", "solid"),
        ("purple", "diamond", "split"),
        ("yellow", "diamond", "solid"),
        ("orange", "cross", "concentric"),
        ("green", "cross", "dotted"),
        ("black", "heart", "dotted"),
        ("teal", "heart", "striped"),
        ("teal", "crescent", "striped"),
        ("orange", "crescent", "solid"),
        ("yellow", "arrow", "dotted"),
        ("red", "arrow", "split"),
        ("white", "hourglass", "checkered"),
        ("purple", "hourglass", "concentric"),
        ("green", "hexagon", "solid"),
        ("pink", "hexagon", "striped"),
    )
)

SPLITS: tuple[str, ...] = ("train", "validation", "test")


def training_identities() -> list[Identity]:
    """Every shape x colour x pattern identity except the validation and test ones
    (`VALIDATION`, `HELD_OUT`), in label order: what the encoder and its targets train on."""
    excluded = set(HELD_OUT) | set(VALIDATION)
    return [
        identity
        for shape, colour, pattern in itertools.product(SHAPES, COLOURS, PATTERNS)
        if (identity := Identity(shape, colour, pattern)) not in excluded
    ]


def world_splits() -> dict[str, tuple[Identity, ...]]:
    """The three disjoint identity splits of the world (deterministic).

    Returns:
        {"train": 672 identities (`training_identities()`), "validation": `VALIDATION` (24),
        "test": `HELD_OUT` (24, the concepts every reported table is measured on)}.
    """
    return {"train": tuple(training_identities()), "validation": VALIDATION, "test": HELD_OUT}


def split_identities(split: str) -> tuple[Identity, ...]:
    """One split of `world_splits()` by name ("train", "validation" or "test")."""
    if split not in SPLITS:
        raise OnewordError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    return world_splits()[split]


def _uniform(generator: torch.Generator, n: int, low: float, high: float) -> list[float]:
    values = torch.rand(n, generator=generator, dtype=torch.float64) * (high - low) + low
    return [round(v, 4) for v in values.tolist()]  # 4 decimals: exact through JSON


def sample_scenes(
    n: int,
    generator: torch.Generator,
    *,
    identities: Sequence[Identity] | None = None,
    named_only: bool = False,
    pattern_weights: Sequence[float] | None = None,
) -> list[Scene]:
    """Draw `n` random scenes.

    Args:
        n: number of scenes.
        generator: a CPU `torch.Generator`; the same state gives the same scenes.
        identities: if given, each scene's shape/colour/pattern is one of these (uniform).
        named_only: draw only named values for every attribute (for fidelity captions).
        pattern_weights: one non-negative weight per `PATTERNS` value (default: uniform);
            not with `identities` or `named_only`.

    Returns:
        `n` scenes, each with a background valid for its colour and pattern.
    """
    if n < 0:
        raise OnewordError(f"cannot sample a negative number of scenes ({n})")
    if pattern_weights is not None and (identities is not None or named_only):
        raise OnewordError("pattern_weights apply to free draws, not with identities or named_only")
    if identities is not None:
        identities = list(identities)
        if not identities:
            raise OnewordError("identities is empty; give at least one Identity or None")
        if named_only and any(i.has_unnamed() for i in identities):
            bad = [i.name for i in identities if i.has_unnamed()]
            raise OnewordError(f"named_only=True but these identities have unnamed values: {bad}")
        picks = torch.randint(len(identities), (n,), generator=generator).tolist()
        triples = [
            (identities[k].shape, identities[k].colour, identities[k].pattern) for k in picks
        ]
    else:
        shapes = NAMED_SHAPES if named_only else SHAPES
        colours = NAMED_COLOURS if named_only else tuple(COLOURS)
        patterns = NAMED_PATTERNS if named_only else PATTERNS
        s = torch.randint(len(shapes), (n,), generator=generator).tolist()
        c = torch.randint(len(colours), (n,), generator=generator).tolist()
        if pattern_weights is None:
            p = torch.randint(len(patterns), (n,), generator=generator).tolist()
        else:
            p = torch.multinomial(
                check_pattern_weights(pattern_weights), n, replacement=True, generator=generator
            ).tolist()
        triples = [(shapes[i], colours[j], patterns[k]) for i, j, k in zip(s, c, p)]
    sizes = torch.randint(len(SIZES), (n,), generator=generator).tolist()
    positions = torch.randint(len(POSITIONS), (n,), generator=generator).tolist()
    background_draws = torch.rand(n, generator=generator, dtype=torch.float64).tolist()
    dxs = _uniform(generator, n, -JITTER, JITTER)
    dys = _uniform(generator, n, -JITTER, JITTER)
    rotations = _uniform(generator, n, -MAX_ROTATION, MAX_ROTATION)
    scenes = []
    for i, (shape, colour, pattern) in enumerate(triples):
        backgrounds = _VALID_BACKGROUNDS[colour, pattern]
        background = backgrounds[int(background_draws[i] * len(backgrounds))]
        scenes.append(
            Scene(
                shape,
                colour,
                pattern,
                background,
                SIZES[sizes[i]],
                POSITIONS[positions[i]],
                dxs[i],
                dys[i],
                rotations[i],
            )
        )
    return scenes


def check_pattern_weights(weights: Sequence[float]) -> torch.Tensor:
    """`weights` (one per `PATTERNS` value) as a float64 tensor, or a clear error."""
    w = torch.tensor([float(x) for x in weights], dtype=torch.float64)
    if w.shape != (len(PATTERNS),) or not bool(torch.isfinite(w).all()) or (w < 0).any():
        raise OnewordError(
            f"pattern_weights: expected {len(PATTERNS)} finite weights >= 0 (one per pattern: "
            f"{', '.join(PATTERNS)}), got {list(weights)}"
        )
    if w.sum() <= 0:
        raise OnewordError("pattern_weights: at least one weight must be > 0")
    return w


def concept_scenes(identity: Identity, n: int, generator: torch.Generator) -> list[Scene]:
    """`n` varied scenes of one identity: backgrounds, sizes and positions are cycled
    through shuffled orders so that a few images already cover several of each."""
    backgrounds = list(_VALID_BACKGROUNDS[identity.colour, identity.pattern])
    background_order = torch.randperm(len(backgrounds), generator=generator).tolist()
    position_order = torch.randperm(len(POSITIONS), generator=generator).tolist()
    first_size = int(torch.randint(2, (1,), generator=generator))
    dxs = _uniform(generator, n, -JITTER, JITTER)
    dys = _uniform(generator, n, -JITTER, JITTER)
    rotations = _uniform(generator, n, -MAX_ROTATION, MAX_ROTATION)
    return [
        Scene(
            identity.shape,
            identity.colour,
            identity.pattern,
            backgrounds[background_order[i % len(backgrounds)]],
            SIZES[(first_size + i) % 2],
            POSITIONS[position_order[i % len(POSITIONS)]],
            dxs[i],
            dys[i],
            rotations[i],
        )
        for i in range(n)
    ]


def labels(scenes: Sequence[Scene]) -> dict[str, torch.Tensor]:
    """Label indices per attribute: attribute -> int64 (n,), indices into `VALUES[attr]`."""
    index = {attr: {v: i for i, v in enumerate(VALUES[attr])} for attr in ATTRIBUTES}
    return {
        attr: torch.tensor([index[attr][getattr(s, attr)] for s in scenes], dtype=torch.int64)
        for attr in ATTRIBUTES
    }


# ---------------------------------------------------------------------------------------
# Renderer: implicit shapes and patterns in the object frame (u, v in object radii,
# v pointing down), evaluated on a supersampled grid.
# ---------------------------------------------------------------------------------------

_SQRT3 = math.sqrt(3.0)
_STAR_SECTOR = 2 * math.pi / 5
_STAR_OUTER, _STAR_INNER = 1.0, 0.45
_STAR_EDGE = (  # outer vertex at angle 0 -> inner vertex at angle pi/5
    _STAR_INNER * math.cos(math.pi / 5) - _STAR_OUTER,
    _STAR_INNER * math.sin(math.pi / 5),
)


def _circle(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return u * u + v * v <= 0.83**2  # small enough that the hexagon corners stand out


def _square(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.maximum(u.abs(), v.abs()) <= 0.72


def _triangle(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # Equilateral, pointing up, circumradius 1.1, shifted so its box is centred.
    v = v - 0.275
    return (v <= 0.55) & (_SQRT3 * u.abs() - v <= 1.1)


def _star(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # Fold the plane into one point of the star (angle from the nearest outer vertex),
    # then test the side of the outer -> inner vertex edge.
    angle = torch.atan2(u, -v)
    folded = (torch.remainder(angle, _STAR_SECTOR) - _STAR_SECTOR / 2).abs()
    folded = _STAR_SECTOR / 2 - folded
    radius = torch.sqrt(u * u + v * v)
    x, y = radius * torch.cos(folded), radius * torch.sin(folded)
    return (x - _STAR_OUTER) * _STAR_EDGE[1] - y * _STAR_EDGE[0] <= 0


def _cross(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    au, av = u.abs(), v.abs()
    return (torch.minimum(au, av) <= 0.32) & (torch.maximum(au, av) <= 0.92)


def _heart(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # (x^2 + y^2 - 1)^3 - x^2 y^3 <= 0, y up, scaled and centred into the unit disk.
    x, y = u * 1.2, 0.15 - v * 1.2
    a = x * x + y * y - 1
    return a * a * a - x * x * y * y * y <= 0


def _diamond(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return u.abs() / 0.68 + v.abs() <= 1.0


def _ring(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # Half a radius wide (v2: 0.45), so a pattern on a small ring spans more than a dot.
    r2 = u * u + v * v
    return (r2 <= 0.95**2) & (r2 >= 0.45**2)


def _hexagon(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # Regular, flat top and bottom, circumradius 1.
    au, av = u.abs(), v.abs()
    apothem = _SQRT3 / 2
    return (av <= apothem) & (0.5 * av + (_SQRT3 / 2) * au <= apothem)


def _crescent(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # A disk minus a disk shifted right; moved right itself so its mass is centred.
    u = u - 0.4
    return (u * u + v * v <= 0.95**2) & ((u - 0.45) ** 2 + v * v >= 0.78**2)


def _arrow(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    shaft = (v.abs() <= 0.26) & (u >= -0.95) & (u <= 0.1)
    head = (u >= 0.05) & (v.abs() <= 0.75 * (0.95 - u) / 0.9)
    return shaft | head


def _hourglass(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    av = v.abs()
    return (av <= 0.92) & (u.abs() <= 0.1 + 0.68 * av)


_SHAPE_TESTS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "circle": _circle,
    "square": _square,
    "triangle": _triangle,
    "star": _star,
    "cross": _cross,
    "heart": _heart,
    "diamond": _diamond,
    "ring": _ring,
    "hexagon": _hexagon,
    "crescent": _crescent,
    "arrow": _arrow,
    "hourglass": _hourglass,
}


def _fractional(t: torch.Tensor) -> torch.Tensor:
    return t - torch.floor(t)


def _tone_mask(pattern: str, u: torch.Tensor, v: torch.Tensor, period: torch.Tensor):
    """Where the second tone goes (bool, like u), or None for solid. `period`: (g, 1, 1)."""
    if pattern == "solid":
        return None
    if pattern == "striped":  # diagonal stripes, half a period wide
        return _fractional((u + v) * (math.sqrt(0.5) / period)) >= 0.5
    if pattern == "dotted":  # one dot per cell of a square grid, 0.68 of a cell across
        # (v2: cells of 1.15 periods, dots 0.66 across: sparser, and read as solid)
        cu, cv = _fractional(u / period) - 0.5, _fractional(v / period) - 0.5
        return cu * cu + cv * cv <= 0.34**2
    if pattern == "checkered":  # squares half a period wide
        cells = torch.floor(u * (2 / period)) + torch.floor(v * (2 / period))
        return torch.remainder(cells, 2) == 1
    if pattern == "concentric":  # rings around the object centre, 40% of a period wide
        # (outer rings cover more area than the centre: at half a period the second tone
        # would outweigh the object's colour on small objects)
        return _fractional(torch.sqrt(u * u + v * v) / period) >= 0.6
    if pattern == "split":  # the right half (in the object frame)
        return u > 0
    raise AssertionError(pattern)


def _pool(mask: torch.Tensor, supersample: int) -> torch.Tensor:
    """(g, side, side) bool -> (g, side / s, side / s) fraction of samples inside."""
    # Two sums over the split axes: ~2.5x faster on CPU than one strided mean.
    blocks = rearrange(mask.float(), "g (h a) (w b) -> g h a w b", a=supersample, b=supersample)
    return blocks.sum(dim=4).sum(dim=2).mul_(1.0 / supersample**2)


def render(
    scenes: Sequence[Scene],
    resolution: int = 64,
    *,
    supersample: int = 2,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Render scenes to images, vectorised over the batch.

    Args:
        scenes: the scenes to draw.
        resolution: output side in pixels (geometry scales with it).
        supersample: each pixel averages supersample^2 point samples (antialiasing).
        device: where to compute; works on CPU and CUDA.

    Returns:
        uint8 (n, 3, resolution, resolution). Bitwise the same for the same scenes on CPU.
    """
    if resolution < 8 or supersample < 1:
        raise OnewordError(
            f"need resolution >= 8 and supersample >= 1, got {resolution}, {supersample}"
        )
    n = len(scenes)
    if n == 0:
        return torch.zeros(0, 3, resolution, resolution, dtype=torch.uint8, device=device)
    side = resolution * supersample
    # 1. Sort by (shape, pattern) so every group is a contiguous slice (views, no gathers).
    keys = [(s.shape, s.pattern) for s in scenes]
    order = sorted(range(n), key=lambda i: keys[i])
    ordered = [scenes[i] for i in order]

    # 2. Per-image frame: centre, inverse radius, rotation, pattern period (in radii).
    def column(values: list[float]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float32, device=device).view(-1, 1, 1)

    centre_x = column([s.centre[0] for s in ordered])
    centre_y = column([s.centre[1] for s in ordered])
    radius = [_RADIUS[s.size] for s in ordered]
    theta = [math.radians(s.rotation) for s in ordered]
    cos_r = column([math.cos(t) / r for t, r in zip(theta, radius)])
    sin_r = column([math.sin(t) / r for t, r in zip(theta, radius)])
    period = column([_PERIOD[s.size] / _RADIUS[s.size] for s in ordered])
    grid = (torch.arange(side, dtype=torch.float32, device=device) + 0.5) / side  # (side,)
    grid_x, grid_y = grid.view(1, 1, side), grid.view(1, side, 1)

    # 3. Coverage of the object and of its second tone, group by group.
    coverage = torch.empty(n, resolution, resolution, dtype=torch.float32, device=device)
    tone_coverage = torch.zeros_like(coverage)
    start = 0
    for (shape, pattern), group in itertools.groupby(keys[i] for i in order):
        stop = start + sum(1 for _ in group)
        rows = slice(start, stop)
        x = grid_x - centre_x[rows]  # (g, 1, side)
        y = grid_y - centre_y[rows]  # (g, side, 1)
        u = x * cos_r[rows] + y * sin_r[rows]  # (g, side, side)
        v = y * cos_r[rows] - x * sin_r[rows]  # (g, side, side)
        inside = _SHAPE_TESTS[shape](u, v)
        coverage[rows] = _pool(inside, supersample)
        tone = _tone_mask(pattern, u, v, period[rows])
        if tone is not None:
            tone_coverage[rows] = _pool(inside & tone, supersample)
        start = stop

    # 4. Composite at the output resolution (linear, so the same as at the fine grid).
    def palette(table: dict[str, tuple[int, int, int]], attr: str) -> torch.Tensor:
        rgb = [table[getattr(s, attr)] for s in ordered]
        return torch.tensor(rgb, dtype=torch.float32, device=device).view(n, 3, 1, 1)

    background = palette(COLOURS, "background")
    colour = palette(COLOURS, "colour")
    tone_colour = palette(TONES, "colour")
    coverage, tone_coverage = coverage.unsqueeze(1), tone_coverage.unsqueeze(1)  # (n, 1, h, w)
    pixels = (
        background * (1 - coverage)
        + colour * (coverage - tone_coverage)
        + tone_colour * tone_coverage
    )  # (n, 3, h, w)
    pixels = torch.floor(pixels + 0.5).clamp_(0, 255).to(torch.uint8)
    # 5. Back to the caller's order.
    images = torch.empty_like(pixels)
    images[torch.tensor(order, device=device)] = pixels
    return images


# ---------------------------------------------------------------------------------------
# Captions
# ---------------------------------------------------------------------------------------

_UNNAMED_NOUNS = ("object", "thing", "shape")
_POSITION_PHRASES = {
    "center": ("in the center", "in the middle"),
    "left": ("on the left",),
    "right": ("on the right",),
    "top": ("at the top",),
    "bottom": ("at the bottom",),
}
_PATTERN_WITH = {  # "a red star {with stripes}"
    "striped": "with stripes",
    "dotted": "with dots",
    "checkered": "with a checkered pattern",
    "concentric": "with a concentric pattern",
    "split": "with a split pattern",
}
_OMIT_PROB = 0.15  # each optional attribute is left out this often
OMIT_SOLID_PROB = 0.6  # "solid" is the default reading, so it is mostly left out


def _opt(template: str, value: str | None) -> str:
    return "" if value is None else template.format(value)


def _listing(*values: str | None) -> str | None:
    present = [v for v in values if v]
    if len(present) < 2:
        return present[0] if present else None
    return ", ".join(present[:-1]) + " and " + present[-1]  # "small, red and striped"


def _clean(text: str) -> str:
    text = re.sub(r"\s+", " ", text)
    text = re.sub(r"\s+([,;])", r"\1", text)
    text = re.sub(r"([,;])(\s*[,;])+", r"\1", text)
    text = re.sub(r"^[\s,;]+|[\s,;]+$", "", text)
    return re.sub(r"\b([Aa]) (?=[aeiou])", r"\1n ", text)  # a orange -> an orange


# Each family: parts -> caption. Parts: size, colour, pattern, pattern_with, shape,
# background, position (phrase), position_word; any but shape may be None (left out).
def _family_full(p: dict, rng: random.Random) -> str:
    return (
        f"a {_opt('{}', p['size'])} {_opt('{}', p['colour'])} {_opt('{}', p['pattern'])} "
        f"{p['shape']} {_opt('on a {} background,', p['background'])} {_opt('{}', p['position'])}"
    )


def _family_background_first(p: dict, rng: random.Random) -> str:
    return (
        f"{_opt('{} background with', p['background'])} a {_opt('{}', p['size'])} "
        f"{_opt('{}', p['colour'])} {_opt('{}', p['pattern'])} {p['shape']} "
        f"{_opt('{}', p['position'])}"
    )


def _family_list(p: dict, rng: random.Random) -> str:
    items = [p["colour"], p["pattern"], p["size"], p["position_word"]]
    items.append(_opt("{} background", p["background"]) or None)
    rng.shuffle(items)
    return ", ".join([f"a {p['shape']}"] + [i for i in items if i])


def _family_picture(p: dict, rng: random.Random) -> str:
    return (
        f"a picture of a {_opt('{}', p['size'])} {_opt('{}', p['colour'])} "
        f"{_opt('{}', p['pattern'])} {p['shape']} {_opt('{}', p['position'])} "
        f"{_opt('on a {} background', p['background'])}"
    )


def _family_photo_with(p: dict, rng: random.Random) -> str:
    return (
        f"a photo of a {_opt('{}', p['colour'])} {p['shape']}, {_opt('{},', p['pattern_with'])} "
        f"{_opt('{},', p['size'])} {_opt('on {}', p['background'])}"
    )


def _family_position_first(p: dict, rng: random.Random) -> str:
    return (
        f"{_opt('{},', p['position'])} a {_opt('{}', p['size'])} {_opt('{}', p['colour'])} "
        f"{_opt('{}', p['pattern'])} {p['shape']} {_opt('against a {} background', p['background'])}"
    )


def _family_sentence(p: dict, rng: random.Random) -> str:
    looks = _listing(p["size"], p["colour"], p["pattern"])
    return (
        f"the {p['shape']} {_opt('is {}', looks)}, {_opt('{}', p['position'])}; "
        f"{_opt('the background is {}', p['background'])}"
    )


def _family_in_colour(p: dict, rng: random.Random) -> str:
    return (
        f"a {_opt('{}', p['size'])} {p['shape']} {_opt('in {}', p['colour'])} "
        f"{_opt('{}', p['pattern_with'])} {_opt('on a {} background', p['background'])} "
        f"{_opt('{}', p['position'])}"
    )


def _family_tags(p: dict, rng: random.Random) -> str:
    return (
        f"{_opt('{}', p['colour'])} {_opt('{}', p['pattern'])} {p['shape']}, "
        f"{_opt('{},', p['size'])} {_opt('{} background,', p['background'])} "
        f"{_opt('{}', p['position_word'])}"
    )


def _family_image(p: dict, rng: random.Random) -> str:
    return (
        f"an image of a {_opt('{}', p['size'])} {_opt('{}', p['pattern'])} "
        f"{_opt('{}', p['colour'])} {p['shape']}, {_opt('{},', p['position'])} "
        f"{_opt('{} background', p['background'])}"
    )


def _family_and(p: dict, rng: random.Random) -> str:
    return (
        f"{_opt('a {} background and', p['background'])} a {_opt('{}', p['size'])} "
        f"{_opt('{}', p['colour'])} {_opt('{}', p['pattern'])} {p['shape']} "
        f"{_opt('{}', p['position'])}"
    )


def _family_terse(p: dict, rng: random.Random) -> str:
    return (
        f"{_opt('{}', p['size'])} {_opt('{}', p['colour'])} {p['shape']} "
        f"{_opt('{}', p['pattern_with'])} {_opt('{}', p['position'])} {_opt('on {}', p['background'])}"
    )


_FAMILIES = (
    _family_full,
    _family_background_first,
    _family_list,
    _family_picture,
    _family_photo_with,
    _family_position_first,
    _family_sentence,
    _family_in_colour,
    _family_tags,
    _family_image,
    _family_and,
    _family_terse,
)


def _shape_word(scene: Scene, rng: random.Random | None, name_all: bool) -> str:
    if name_all or scene.shape not in UNNAMED:
        return scene.shape
    return "object" if rng is None else rng.choice(_UNNAMED_NOUNS)


def caption(
    scene: Scene,
    rng: random.Random,
    *,
    name_all: bool = False,
    mentioned: set[str] | None = None,
    omit_solid: float = OMIT_SOLID_PROB,
) -> str:
    """One random caption of a scene.

    Twelve template families; each attribute but the shape noun may be left out, and
    unnamed values are never written unless `name_all` (an unnamed shape becomes
    "object"/"thing"/"shape", an unnamed colour or pattern is left out).
    `name_all=True` names everything, for training the world's CLIP. If `mentioned` is
    given, the attributes whose value the caption names are added to it (the labels of the
    CLIP text tower's attribute heads). `omit_solid`: how often "solid" is left out (it is
    the default reading; every other attribute is left out 15% of the time).
    """

    def keep(attr: str, prob: float = _OMIT_PROB) -> str | None:
        value = getattr(scene, attr)
        if value in UNNAMED and not name_all:
            return None
        return None if rng.random() < prob else value

    pattern = keep("pattern", omit_solid if scene.pattern == "solid" else _OMIT_PROB)
    position = keep("position")
    parts = {
        "shape": _shape_word(scene, rng, name_all),
        "size": keep("size"),
        "colour": keep("colour"),
        "pattern": pattern,
        "pattern_with": _PATTERN_WITH.get(pattern) if pattern else None,
        "background": keep("background"),
        "position": rng.choice(_POSITION_PHRASES[position]) if position else None,
        "position_word": position,
    }
    text = _clean(rng.choice(_FAMILIES)(parts, rng))
    if mentioned is not None:
        mentioned.update(_mentioned(scene, text))
    return text


def _mentioned(scene: Scene, text: str) -> set[str]:
    """The attributes whose value a caption of `scene` names (families drop some parts, so
    this reads the text). The object and background colours never coincide."""
    words = set(re.findall(r"[a-z]+", text))
    found = {a for a in ("shape", "colour", "size", "background") if getattr(scene, a) in words}
    if scene.pattern in words or _PATTERN_WITH.get(scene.pattern, "\0") in text:
        found.add("pattern")
    if scene.position in words or any(p in text for p in _POSITION_PHRASES[scene.position]):
        found.add("position")
    return found


def full_caption(scene: Scene, *, name_all: bool = False) -> str:
    """The canonical caption naming every named attribute (for fidelity measurement):
    "a {size} {colour} {pattern} {shape} on a {background} background, {position}"."""

    def word(attr: str) -> str | None:
        value = getattr(scene, attr)
        return value if name_all or value not in UNNAMED else None

    return _clean(
        f"a {scene.size} {_opt('{}', word('colour'))} {_opt('{}', word('pattern'))} "
        f"{_shape_word(scene, None, name_all)} on a {scene.background} background, "
        f"{_POSITION_PHRASES[scene.position][0]}"
    )


def caption_batch(
    scenes: Sequence[Scene],
    rng: random.Random,
    *,
    name_all: bool = False,
    drop_prob: float = 0.0,
    omit_solid: float = OMIT_SOLID_PROB,
) -> list[str]:
    """`caption` for each scene; with probability `drop_prob` a caption is "" (for
    classifier-free guidance)."""
    if not 0.0 <= drop_prob <= 1.0:
        raise OnewordError(f"drop_prob must be in [0, 1], got {drop_prob}")
    if not 0.0 <= omit_solid <= 1.0:
        raise OnewordError(f"omit_solid must be in [0, 1], got {omit_solid}")
    return [
        ""
        if drop_prob > 0 and rng.random() < drop_prob
        else caption(s, rng, name_all=name_all, omit_solid=omit_solid)
        for s in scenes
    ]


# ---------------------------------------------------------------------------------------
# Edit prompts for personalised tokens ("{}" is the token)
# ---------------------------------------------------------------------------------------

# Each asks for attribute changes an oracle can check. Every background appears once, so
# at most a few prompts are dropped for a concept whose colour clashes with it.
EDIT_PROMPTS: tuple[tuple[str, dict[str, str]], ...] = (
    ("a photo of {} on a green background", {"background": "green"}),
    ("a small {}", {"size": "small"}),
    ("a big {} at the top", {"size": "big", "position": "top"}),
    ("{} on the left", {"position": "left"}),
    (
        "a small {} on a white background at the bottom",
        {"size": "small", "background": "white", "position": "bottom"},
    ),
    ("a {} on a blue background", {"background": "blue"}),
    ("a big {} on the right", {"size": "big", "position": "right"}),
    ("a {} in the center on a yellow background", {"position": "center", "background": "yellow"}),
    ("a picture of {} on a black background", {"background": "black"}),
    (
        "a small {} at the top on a red background",
        {"size": "small", "position": "top", "background": "red"},
    ),
    ("{} on a purple background, at the bottom", {"background": "purple", "position": "bottom"}),
    ("a big {} on an orange background", {"size": "big", "background": "orange"}),
)


def edit_prompts(identity: Identity) -> list[tuple[str, dict[str, str]]]:
    """The `EDIT_PROMPTS` whose background edit (if any) is valid for this identity."""
    allowed = _VALID_BACKGROUNDS[identity.colour, identity.pattern]
    return [(t, e) for t, e in EDIT_PROMPTS if e.get("background", allowed[0]) in allowed]


# ---------------------------------------------------------------------------------------
# An infinite stream of rendered batches
# ---------------------------------------------------------------------------------------


def _batch_seed(seed: int, batch_index: int) -> int:
    digest = hashlib.blake2b(f"oneword-world:{seed}:{batch_index}".encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "little") & (2**63 - 1)


class WorldStream(torch.utils.data.IterableDataset):
    """Rendered batches forever, without disk: use with `DataLoader(stream, batch_size=None)`.

    Batch `i` depends only on (`seed`, `i`), so the stream is the same whatever the number
    of DataLoader workers: worker `w` of `W` renders batches `w, w + W, ...` and the
    DataLoader interleaves them back in order. Each yielded dict carries its
    `batch_index`; to resume, `load_state_dict({"next_batch": last_index + 1})` (with
    workers the trainer must keep that count: workers' copies do not update this object).

    Yields dicts: "pixels" uint8 (b, 3, H, W), "captions" list[str], "labels"
    dict[str, int64 (b,)], "scenes" list[Scene], "batch_index" int.
    """

    def __init__(
        self,
        batch_size: int,
        seed: int,
        resolution: int = 64,
        identities: Sequence[Identity] | None = None,
        name_all: bool = False,
        drop_prob: float = 0.0,
        named_only: bool = False,
    ):
        super().__init__()
        if batch_size < 1:
            raise OnewordError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.seed = seed
        self.resolution = resolution
        self.identities = list(identities) if identities is not None else None
        self.name_all = name_all
        self.drop_prob = drop_prob
        self.named_only = named_only
        self.next_batch = 0

    def batch(self, batch_index: int) -> dict[str, Any]:
        """Batch number `batch_index` of this stream (deterministic)."""
        seed = _batch_seed(self.seed, batch_index)
        generator = torch.Generator().manual_seed(seed)
        scenes = sample_scenes(
            self.batch_size, generator, identities=self.identities, named_only=self.named_only
        )
        rng = random.Random(seed)
        return {
            "pixels": render(scenes, self.resolution),
            "captions": caption_batch(
                scenes, rng, name_all=self.name_all, drop_prob=self.drop_prob
            ),
            "labels": labels(scenes),
            "scenes": scenes,
            "batch_index": batch_index,
        }

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        for batch_index in itertools.count(self.next_batch + worker, workers):
            item = self.batch(batch_index)
            self.next_batch = batch_index + 1
            yield item

    def state_dict(self) -> dict[str, int]:
        return {"next_batch": self.next_batch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if "next_batch" not in state or int(state["next_batch"]) < 0:
            raise OnewordError(f"WorldStream state needs a non-negative 'next_batch', got {state}")
        self.next_batch = int(state["next_batch"])
