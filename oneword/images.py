"""Image input for the whole library: find files, open them safely as RGB, fit them to a square.

Every bad input (missing file, not an image, truncated, too large, too small) raises
`ImageError` with a message that names the file; no PIL or OS traceback reaches the user.
"""

from __future__ import annotations

import glob
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from einops import rearrange
from PIL import Image, ImageDraw, ImageFont, ImageOps

from oneword.errors import ImageError

__all__ = [
    "IMAGE_EXTENSIONS",
    "MAX_PIXELS",
    "MIN_SIDE",
    "ImageLimits",
    "ImageSkipWarning",
    "find_images",
    "fit_image",
    "images_to_tensor",
    "load_images",
    "open_image",
    "save_grid",
    "set_limits",
    "tensor_to_images",
]

# Suffixes (lower case) that a folder or glob expansion picks up; explicitly named files
# are opened whatever their suffix, since PIL identifies the format from the content.
IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".jpg",
    ".jpeg",
    ".png",
    ".webp",
    ".bmp",
    ".gif",
    ".tif",
    ".tiff",
)
# Decompression-bomb cap in pixels (width * height): 64 MP is ~8000 x 8000, far above any
# training image, and its RGB decode (~192 MB) still fits comfortably in memory.
MAX_PIXELS: int = 64_000_000
# Default minimum side in pixels: smaller files are almost always icons or thumbnails.
MIN_SIDE: int = 16

FIT_MODES: tuple[str, ...] = ("crop", "pad")

_GLOB_CHARS = ("*", "?", "[")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_HIGH_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


@dataclass(frozen=True)
class ImageLimits:
    """The limits every image a command reads must meet (`set_limits`); the commands that read
    images get one flag per field (--max-pixels, --min-side)."""

    # largest image accepted, width x height in pixels (checked before the pixels are decoded)
    max_pixels: int = MAX_PIXELS
    # smallest image side accepted, in pixels
    min_side: int = MIN_SIDE


# The limits `open_image` uses when none is passed; commands set them from --max-pixels and
# --min-side (`set_limits`), so every image a command reads obeys the same flags.
_limits: dict[str, int] = {"max_pixels": MAX_PIXELS, "min_side": MIN_SIDE}


def set_limits(max_pixels: int | None = None, min_side: int | None = None) -> None:
    """Set the limits every later `open_image` call uses by default (None: the built-in
    `MAX_PIXELS` / `MIN_SIDE`). Called by commands with their --max-pixels / --min-side."""
    for name, value, default in (
        ("max_pixels", max_pixels, MAX_PIXELS),
        ("min_side", min_side, MIN_SIDE),
    ):
        if value is not None and (not isinstance(value, int) or value < 1):
            flag = "--" + name.replace("_", "-")
            raise ImageError(f"{flag} must be a positive integer, got {value!r}")
        _limits[name] = default if value is None else value


class ImageSkipWarning(UserWarning):
    """An unreadable image was skipped by `load_images(..., skip_bad=True)`."""


# ---------------------------------------------------------------------------- helpers


def _check_background(background: Sequence[int]) -> tuple[int, int, int]:
    """Return `background` as an RGB tuple, or raise ImageError."""
    try:
        rgb = tuple(int(channel) for channel in background)
    except (TypeError, ValueError):
        rgb = ()
    if len(rgb) != 3 or not all(0 <= channel <= 255 for channel in rgb):
        raise ImageError(
            f"background must be three integers in 0..255 (R, G, B), got {background!r}"
        )
    return rgb  # type: ignore[return-value]


def _check_fit_args(resolution: int, mode: str) -> None:
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1:
        raise ImageError(f"resolution must be a positive integer (pixels), got {resolution!r}")
    if mode not in FIT_MODES:
        raise ImageError(f"unknown fit mode {mode!r}; use one of {', '.join(FIT_MODES)}")


def _high_bit_depth_to_l(image: Image.Image) -> Image.Image:
    """Scale a 16-bit, 32-bit integer or float image to 8-bit greyscale ("L")."""
    values = np.asarray(image).astype(np.float32)  # (h, w)
    values = np.where(np.isfinite(values), values, 0.0)
    low = float(values.min()) if values.size else 0.0
    high = float(values.max()) if values.size else 0.0
    # The nominal range is not stored in the file, so infer it from the mode and the
    # values: I;16 is 0..65535; I holds 8- or 16-bit data; F is usually 0..1.
    if image.mode.startswith("I;16"):
        low, high = 0.0, 65535.0
    elif low >= 0.0 and image.mode == "F" and high <= 1.0:
        low, high = 0.0, 1.0
    elif low >= 0.0 and high <= 255.0:
        low, high = 0.0, 255.0
    elif low >= 0.0 and high <= 65535.0:
        low, high = 0.0, 65535.0
    # Anything else (negative or huge values) is stretched over its own range.
    scale = 255.0 / (high - low) if high > low else 0.0
    grey = np.clip(np.rint((values - low) * scale), 0, 255).astype(np.uint8)
    return Image.fromarray(grey)


def _to_rgb(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Convert any PIL mode to RGB, compositing transparency onto `background`."""
    if image.mode in _HIGH_BIT_MODES:
        # PIL's own convert clips 16/32-bit values at 255, which turns most pixels white.
        return _high_bit_depth_to_l(image).convert("RGB")
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        if image.mode == "La":  # premultiplied; PIL converts it only via LA
            image = image.convert("LA")
        rgba = image.convert("RGBA")
        rgb = Image.new("RGB", rgba.size, background)
        rgb.paste(rgba, mask=rgba.getchannel("A"))
        return rgb
    return image.convert("RGB")


def _expand_one(raw: str | Path) -> list[Path]:
    """The image files one argument of `find_images` stands for."""
    text = os.path.expanduser(os.fspath(raw))
    path = Path(text)
    if path.is_file():
        return [path]
    if path.is_dir():
        # Non-recursive on purpose: a concept folder is flat, and recursing would pick up
        # previews or outputs saved next to it. Dot-files (macOS "._x.jpg") are not images.
        return sorted(
            child
            for child in path.iterdir()
            if child.is_file()
            and not child.name.startswith(".")
            and child.suffix.lower() in IMAGE_EXTENSIONS
        )
    if any(char in text for char in _GLOB_CHARS):
        return [
            Path(match)
            for match in glob.glob(text, recursive=True)
            if Path(match).is_file() and Path(match).suffix.lower() in IMAGE_EXTENSIONS
        ]
    if path.exists():
        raise ImageError(f"{path} is neither a file nor a folder; pass image files or folders")
    raise ImageError(f"{path} does not exist; check the path (relative to {Path.cwd()})")


# ---------------------------------------------------------------------------- the API


def find_images(paths: str | Path | Sequence[str | Path]) -> list[Path]:
    """Expand files, folders and glob patterns into a sorted list of image files.

    Folders are read non-recursively and keep only files with an `IMAGE_EXTENSIONS` suffix
    (case-insensitive, dot-files skipped); glob patterns (`*`, `?`, `[`, `**`) keep the
    same; files named explicitly are kept whatever their suffix.

    Args:
        paths: one path or pattern, or a sequence of them.

    Returns:
        The files, sorted and de-duplicated (the same file reached twice appears once).

    Raises:
        ImageError: a path does not exist, or nothing was found.
    """
    queries = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if not queries:
        raise ImageError("no image paths given; pass image files, folders or glob patterns")
    found: dict[Path, Path] = {}  # resolved -> as given, so each file appears once
    for query in queries:
        for path in _expand_one(query):
            found.setdefault(path.resolve(), path)
    if not found:
        searched = ", ".join(str(query) for query in queries)
        raise ImageError(
            f"no images found in {searched}; image files end in {' '.join(IMAGE_EXTENSIONS)}"
            " (any case)"
        )
    return sorted(found.values())


def open_image(
    path: str | Path,
    *,
    background: Sequence[int] = (255, 255, 255),
    max_pixels: int | None = None,
    min_side: int | None = None,
) -> Image.Image:
    """Open one image file as RGB, fully decoded and upright.

    EXIF orientation is applied; animated files give their first frame; transparency is
    composited onto `background`; 16-bit, 32-bit and float images are scaled to 0..255.

    Args:
        path: the image file.
        background: RGB (0..255) placed behind transparent pixels.
        max_pixels: largest width * height accepted, checked before decoding pixels
            (None: the command's --max-pixels, default `MAX_PIXELS`).
        min_side: smallest width or height accepted, in pixels (None: --min-side, `MIN_SIDE`).

    Returns:
        An RGB image, independent of the file (which is closed).

    Raises:
        ImageError: missing, unreadable, not an image, corrupt or truncated, too many
            pixels, or a side below `min_side`.
    """
    background_rgb = _check_background(background)
    max_pixels = _limits["max_pixels"] if max_pixels is None else max_pixels
    min_side = _limits["min_side"] if min_side is None else min_side
    path = Path(os.path.expanduser(os.fspath(path)))
    if not path.exists():
        raise ImageError(f"{path} does not exist")
    if path.is_dir():
        raise ImageError(f"{path} is a folder, not an image; pass it to find_images instead")
    try:
        with warnings.catch_warnings():
            # PIL warns at its own global limit; `max_pixels` below is the limit that counts.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height = image.size
                if width * height > max_pixels:
                    raise ImageError(
                        f"{path} is {width}x{height} = {width * height:,} pixels, more than "
                        f"max_pixels={max_pixels:,}; downscale it first (or, if you trust the "
                        "file, raise the limit: --max-pixels, or max_pixels= in Python)"
                    )
                if min(width, height) < min_side:
                    raise ImageError(
                        f"{path} is {width}x{height} pixels, below the minimum side of "
                        f"{min_side}; use a larger image (or lower the limit: --min-side, or "
                        "min_side= in Python)"
                    )
                # Decode every pixel now, so a truncated file fails here and not later
                # inside a training step.
                image.load()
                try:
                    upright = ImageOps.exif_transpose(image)
                except Exception:
                    # Broken EXIF in an otherwise good image: keep the stored orientation
                    # rather than reject the picture.
                    upright = image
                return _to_rgb(upright, background_rgb)
    except ImageError:
        raise
    except Image.DecompressionBombError as error:
        raise ImageError(
            f"{path} is too large for PIL's decompression-bomb guard ({error}); downscale it"
        ) from None
    except PermissionError:
        raise ImageError(f"{path} cannot be read (permission denied)") from None
    except Image.UnidentifiedImageError:
        raise ImageError(
            f"{path} is not an image PIL can read; expected one of "
            f"{' '.join(IMAGE_EXTENSIONS)} — remove it or re-save it as PNG or JPEG"
        ) from None
    except Exception as error:
        # PIL's decoders raise a wide, undocumented set of types for corrupt data
        # (OSError, SyntaxError, ValueError, struct.error, EOFError, IndexError, ...).
        raise ImageError(
            f"{path} is corrupt or truncated ({type(error).__name__}: {error}); "
            "re-save or remove it"
        ) from None


def fit_image(
    image: Image.Image,
    resolution: int,
    *,
    mode: str = "crop",
    background: Sequence[int] = (255, 255, 255),
) -> Image.Image:
    """Make a square RGB image of `resolution` x `resolution` pixels.

    Args:
        image: any PIL image (non-RGB modes are converted as in `open_image`).
        resolution: output side in pixels.
        mode: "crop" keeps the centred square of the short side; "pad" places the image
            centred on a `background` square of the long side (nothing is cut off).
        background: RGB (0..255) used for padding and transparency.

    Returns:
        An RGB image of size (resolution, resolution), resized with Lanczos.
    """
    _check_fit_args(resolution, mode)
    background_rgb = _check_background(background)
    width, height = image.size
    if width < 1 or height < 1:
        raise ImageError(f"cannot fit an empty {width}x{height} image")
    if image.mode != "RGB":
        image = _to_rgb(image, background_rgb)
    if mode == "crop":
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        # crop first: resize(box=...) lets the Lanczos kernel read pixels outside the box,
        # which bleeds the cropped-away border into the edge of the square
        square = image.crop((left, top, left + side, top + side))
        return square.resize((resolution, resolution), Image.Resampling.LANCZOS)
    side = max(width, height)
    square = Image.new("RGB", (side, side), background_rgb)
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    return square.resize((resolution, resolution), Image.Resampling.LANCZOS)


def load_images(
    paths: str | Path | Sequence[str | Path],
    resolution: int,
    *,
    mode: str = "crop",
    skip_bad: bool = False,
    background: Sequence[int] = (255, 255, 255),
    max_pixels: int | None = None,
    min_side: int | None = None,
) -> list[Image.Image]:
    """Find, open and fit images: `find_images` + `open_image` + `fit_image`.

    Args:
        paths: files, folders or glob patterns.
        resolution: output side in pixels.
        mode: "crop" or "pad" (see `fit_image`).
        skip_bad: skip unreadable files with an `ImageSkipWarning` for each and a final
            "skipped N of M images" warning, instead of raising on the first.
        background, max_pixels, min_side: as in `open_image`.

    Returns:
        RGB images of size (resolution, resolution), in the order of `find_images`.

    Raises:
        ImageError: nothing found, a bad file (unless `skip_bad`), or every file bad.
    """
    # Check the arguments first, so a typo is not reported as N skipped images.
    _check_fit_args(resolution, mode)
    _check_background(background)
    files = find_images(paths)
    images: list[Image.Image] = []
    skipped: list[str] = []
    for file in files:
        try:
            opened = open_image(
                file, background=background, max_pixels=max_pixels, min_side=min_side
            )
        except ImageError as error:
            if not skip_bad:
                raise
            skipped.append(str(error))
            warnings.warn(f"skipping {error}", ImageSkipWarning, stacklevel=2)
            continue
        images.append(fit_image(opened, resolution, mode=mode, background=background))
    if skipped:
        if not images:
            raise ImageError(f"all {len(files)} images were unreadable; first: {skipped[0]}")
        warnings.warn(
            f"skipped {len(skipped)} of {len(files)} images", ImageSkipWarning, stacklevel=2
        )
    return images


def fit_images(images, resolution: int, *, mode: str = "crop") -> list[Image.Image]:
    """PIL images (one or a list) fitted to `resolution`, or paths/folders/globs loaded with
    `load_images`: the one entry point for "images" arguments of the Python API."""
    if isinstance(images, Image.Image):
        images = [images]
    if (
        isinstance(images, (list, tuple))
        and images
        and all(isinstance(image, Image.Image) for image in images)
    ):
        return [fit_image(image.convert("RGB"), resolution, mode=mode) for image in images]
    return load_images(images, resolution, mode=mode)


def images_to_tensor(images: Sequence[Image.Image]) -> torch.Tensor:
    """Stack equally sized images into the VAE's input range.

    Args:
        images: n images of the same size (non-RGB modes are converted to RGB).

    Returns:
        (n, 3, H, W) float32 in [-1, 1].
    """
    if len(images) == 0:
        raise ImageError("no images to convert to a tensor")
    size = images[0].size
    arrays = []
    for index, image in enumerate(images):
        if image.size != size:
            raise ImageError(
                f"image {index} is {image.size[0]}x{image.size[1]} but image 0 is "
                f"{size[0]}x{size[1]}; fit all images to one resolution first"
            )
        rgb = image if image.mode == "RGB" else _to_rgb(image, (255, 255, 255))
        arrays.append(np.asarray(rgb, dtype=np.uint8))
    pixels = torch.from_numpy(np.stack(arrays))  # (n, h, w, 3) uint8
    pixels = rearrange(pixels, "n h w c -> n c h w").float()
    return (pixels / 127.5 - 1.0).contiguous()


def tensor_to_images(x: torch.Tensor) -> list[Image.Image]:
    """Inverse of `images_to_tensor`.

    Args:
        x: (n, 3, H, W) in [-1, 1]; values outside are clamped, NaN becomes 0 (mid-grey).

    Returns:
        n RGB images of size (W, H).
    """
    if x.ndim != 4 or x.shape[1] != 3:
        raise ImageError(f"expected a (n, 3, H, W) tensor of images, got shape {tuple(x.shape)}")
    values = torch.nan_to_num(x.detach().float().cpu(), nan=0.0).clamp(-1.0, 1.0)
    pixels = ((values + 1.0) * 127.5).round().to(torch.uint8)  # (n, 3, h, w)
    pixels = rearrange(pixels, "n c h w -> n h w c").contiguous().numpy()
    return [Image.fromarray(array) for array in pixels]


def _wrap(text: str, font, width: float) -> list[str]:
    """Greedy word wrap of `text` to lines at most `width` pixels wide (a longer word
    stays whole on its own line)."""
    lines: list[str] = []
    for word in text.split(" "):
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines or [""]


def save_grid(
    images: Sequence[Image.Image],
    path: str | Path,
    *,
    columns: int,
    labels: Sequence[str] | None = None,
) -> Path:
    """Write images as a PNG grid, optionally with a text label above each row.

    Cells are the size of the largest image; smaller images are centred in their cell.
    The file is written atomically (temporary file in the same folder, then rename).

    Args:
        images: the images, filled row by row.
        path: the PNG to write (its folder is created if needed).
        columns: images per row.
        labels: one short label per row (len == number of rows), or None.

    Returns:
        `path` as a Path.
    """
    path = Path(path)
    if len(images) == 0:
        raise ImageError(f"no images to write to the grid {path}")
    if isinstance(columns, bool) or not isinstance(columns, int) or columns < 1:
        raise ImageError(f"columns must be a positive integer, got {columns!r}")
    rows = math.ceil(len(images) / columns)
    if labels is not None and len(labels) != rows:
        raise ImageError(
            f"{len(labels)} labels for {rows} rows in grid {path}; "
            "give one label per row (labels label rows, not images)"
        )
    cell_width = max(image.size[0] for image in images)
    cell_height = max(image.size[1] for image in images)
    font = ImageFont.load_default()
    label_height, line_height, lines = 0, 0, []
    if labels is not None:
        # Labels wider than the grid wrap at spaces, so long captions stay whole; every row
        # gets the height of the longest label. Line height is measured on a string with
        # ascenders and descenders.
        top, bottom = font.getbbox("Ag|")[1::2]
        line_height = int(bottom - top) + 2
        lines = [_wrap(str(label), font, columns * cell_width - 6) for label in labels]
        label_height = max(len(wrapped) for wrapped in lines) * line_height + 4

    white = (255, 255, 255)
    grid = Image.new("RGB", (columns * cell_width, rows * (label_height + cell_height)), white)
    draw = ImageDraw.Draw(grid)
    for index, image in enumerate(images):
        row, column = divmod(index, columns)
        rgb = image if image.mode == "RGB" else _to_rgb(image, white)
        left = column * cell_width + (cell_width - rgb.size[0]) // 2
        top = row * (label_height + cell_height) + label_height + (cell_height - rgb.size[1]) // 2
        grid.paste(rgb, (left, top))
    for row, wrapped in enumerate(lines):
        for line_index, line in enumerate(wrapped):
            y = row * (label_height + cell_height) + 2 + line_index * line_height
            draw.text((3, y), line, fill=(0, 0, 0), font=font)

    # Temporary file beside the target, fsync, rename: never a half-written grid.
    from .io import atomic_path

    try:
        with atomic_path(path) as temp:
            grid.save(temp, format="PNG")
    except OSError as error:
        raise ImageError(f"cannot write grid {path}: {error}") from None
    return path


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random resized crop (60-100% of the area), flip and mild colour jitter, per image.

    Args:
        images: (n, 3, H, W) float in [0, 1].
        generator: CPU generator; 7 uniforms per image, drawn in one call (so a checkpointed
            generator state reproduces the same views).

    Returns:
        (n, 3, H, W) float32 in [0, 1].
    """
    import torch.nn.functional as F

    n, _, height, width = images.shape
    params = torch.rand(n, 7, generator=generator).tolist()
    luma = torch.tensor([0.299, 0.587, 0.114], device=images.device).view(3, 1, 1)
    out = []
    for image, (scale, left, top, flip, bright, contrast, saturation) in zip(
        images.float(), params
    ):
        side_h = max(1, round(height * math.sqrt(0.6 + 0.4 * scale)))
        side_w = max(1, round(width * math.sqrt(0.6 + 0.4 * scale)))
        y, x = int(top * (height - side_h + 1)), int(left * (width - side_w + 1))
        crop = image[None, :, y : y + side_h, x : x + side_w]
        image = F.interpolate(crop, size=(height, width), mode="bilinear", antialias=True)[0]
        if flip < 0.5:
            image = image.flip(-1)
        image = image * (0.9 + 0.2 * bright)
        mean = image.mean()
        image = mean + (image - mean) * (0.9 + 0.2 * contrast)
        gray = (image * luma).sum(0)
        image = gray + (image - gray) * (0.9 + 0.2 * saturation)
        out.append(image.clamp(0, 1))
    return torch.stack(out)  # (n, 3, H, W)
