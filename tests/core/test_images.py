"""Tests for oneword.images: formats, modes, orientation, geometry, bad input, grids."""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from oneword.errors import ImageError
from oneword.images import (
    IMAGE_EXTENSIONS,
    ImageSkipWarning,
    find_images,
    fit_image,
    images_to_tensor,
    load_images,
    open_image,
    save_grid,
    tensor_to_images,
)

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)
# No example database: examples are cheap to draw afresh, and runs stay independent.
PROPERTY = settings(
    max_examples=60,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


def noise(size: tuple[int, int], seed: int = 0) -> Image.Image:
    """Random RGB pixels: compresses badly, so truncating the file cuts into pixel data."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def solid(colour: tuple[int, int, int], size: tuple[int, int] = (32, 32)) -> Image.Image:
    return Image.new("RGB", size, colour)


def assert_colour(image: Image.Image, xy: tuple[int, int], colour, tolerance: int = 0) -> None:
    actual = np.array(image.getpixel(xy), dtype=int)
    assert np.abs(actual - np.array(colour)).max() <= tolerance, (xy, tuple(actual), colour)


# ---------------------------------------------------------------------------- formats

LOSSLESS = {"png": "PNG", "bmp": "BMP", "tif": "TIFF", "tiff": "TIFF", "webp": "WEBP"}


@pytest.mark.parametrize("suffix", ["jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff"])
def test_every_listed_format_opens_as_rgb(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"red.{suffix}"
    kwargs = {"lossless": True} if suffix == "webp" else {}
    solid(RED, (40, 24)).save(path, **kwargs)
    image = open_image(path)
    assert image.mode == "RGB"
    assert image.size == (40, 24)
    # JPEG is lossy even on a flat colour; the lossless formats must match exactly.
    assert_colour(image, (20, 12), RED, tolerance=0 if suffix in LOSSLESS or suffix == "gif" else 8)


def test_image_extensions_cover_the_listed_formats() -> None:
    expected = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
    assert set(IMAGE_EXTENSIONS) == expected


def test_animated_gif_gives_first_frame(tmp_path: Path) -> None:
    path = tmp_path / "anim.gif"
    first, second = solid(RED), solid(BLUE)
    first.save(path, save_all=True, append_images=[second], duration=100, loop=0)
    with Image.open(path) as check:
        assert check.n_frames == 2  # the file really is animated
    image = open_image(path)
    assert_colour(image, (16, 16), RED)


def test_content_decides_format_not_suffix(tmp_path: Path) -> None:
    path = tmp_path / "really_a_png.jpg"
    solid(BLUE).save(path, format="PNG")
    assert_colour(open_image(path), (0, 0), BLUE)


# ---------------------------------------------------------------------------- modes


def test_rgba_transparent_pixel_becomes_background(tmp_path: Path) -> None:
    rgba = Image.new("RGBA", (20, 20), (255, 0, 0, 255))
    rgba.putpixel((0, 0), (255, 0, 0, 0))  # fully transparent
    rgba.putpixel((1, 0), (0, 0, 255, 128))  # half transparent blue
    path = tmp_path / "alpha.png"
    rgba.save(path)
    image = open_image(path, background=(0, 255, 0))
    assert_colour(image, (0, 0), (0, 255, 0))
    assert_colour(image, (5, 5), RED)
    assert_colour(image, (1, 0), (0, 127, 128), tolerance=1)


def test_la_composited_on_background(tmp_path: Path) -> None:
    la = Image.new("LA", (20, 20), (50, 255))
    la.putpixel((3, 3), (50, 0))
    path = tmp_path / "la.png"
    la.save(path)
    image = open_image(path, background=(10, 20, 30))
    assert_colour(image, (3, 3), (10, 20, 30))
    assert_colour(image, (0, 0), (50, 50, 50))


def test_palette_with_transparency(tmp_path: Path) -> None:
    palette = Image.new("P", (20, 20), 1)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * (256 * 3 - 6))
    palette.putpixel((2, 2), 0)
    path = tmp_path / "p.png"
    palette.save(path, transparency=0)
    with Image.open(path) as check:
        assert check.mode == "P" and "transparency" in check.info
    image = open_image(path, background=BLUE)
    assert_colour(image, (2, 2), BLUE)
    assert_colour(image, (0, 0), RED)


def test_greyscale_and_bilevel(tmp_path: Path) -> None:
    Image.new("L", (20, 20), 77).save(tmp_path / "l.png")
    Image.new("1", (20, 20), 1).save(tmp_path / "one.png")
    assert_colour(open_image(tmp_path / "l.png"), (5, 5), (77, 77, 77))
    assert_colour(open_image(tmp_path / "one.png"), (5, 5), WHITE)


def test_cmyk_jpeg_and_tiff(tmp_path: Path) -> None:
    cmyk = Image.new("CMYK", (20, 20), (0, 255, 255, 0))  # red in CMYK
    cmyk.save(tmp_path / "c.jpg")
    cmyk.save(tmp_path / "c.tif")
    assert_colour(open_image(tmp_path / "c.jpg"), (10, 10), RED, tolerance=8)
    assert_colour(open_image(tmp_path / "c.tif"), (10, 10), RED)


@pytest.mark.parametrize("suffix", ["png", "tif"])
def test_sixteen_bit_is_scaled_not_clipped(tmp_path: Path, suffix: str) -> None:
    values = np.zeros((20, 20), dtype=np.uint16)
    values[:, 10:] = 65535
    values[:, 5:10] = 32768  # mid-grey; PIL's plain convert would clip it to 255
    path = tmp_path / f"deep.{suffix}"
    Image.fromarray(values).save(path)  # uint16 -> "I;16"
    with Image.open(path) as check:
        assert check.mode == "I;16"
    image = open_image(path)
    assert_colour(image, (15, 0), WHITE)
    assert_colour(image, (7, 0), (128, 128, 128))
    assert_colour(image, (0, 0), (0, 0, 0))


def test_int32_and_float_tiff_scaled(tmp_path: Path) -> None:
    ints = np.full((20, 20), 65535, dtype=np.int32)
    ints[0, 0] = 0
    Image.fromarray(ints, "I").save(tmp_path / "i.tif")
    floats = np.full((20, 20), 0.5, dtype=np.float32)
    floats[0, 0] = np.nan  # must not poison the whole image
    floats[1, 0] = 1.0
    Image.fromarray(floats, "F").save(tmp_path / "f.tif")
    image = open_image(tmp_path / "i.tif")
    assert_colour(image, (5, 5), WHITE)
    assert_colour(image, (0, 0), (0, 0, 0))
    image = open_image(tmp_path / "f.tif")
    assert_colour(image, (5, 5), (128, 128, 128))
    assert_colour(image, (0, 1), WHITE)


def test_exif_orientation_applied(tmp_path: Path) -> None:
    # 40 wide x 20 tall: left half red, right half blue. Orientation 6 means "rotate 90
    # degrees clockwise to display", so the upright image is 20 x 40 with red on top.
    stored = Image.new("RGB", (40, 20), BLUE)
    stored.paste(RED, (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    stored.save(path, exif=exif.tobytes(), quality=95)
    image = open_image(path)
    assert image.size == (20, 40)
    assert_colour(image, (10, 5), RED, tolerance=30)
    assert_colour(image, (10, 35), BLUE, tolerance=30)


# ---------------------------------------------------------------------------- geometry


def test_crop_keeps_centre_square() -> None:
    # 60 x 20: red | blue | red in thirds; the centred 20 x 20 square is all blue.
    image = Image.new("RGB", (60, 20), RED)
    image.paste(BLUE, (20, 0, 40, 20))
    fitted = fit_image(image, 10, mode="crop")
    assert fitted.size == (10, 10) and fitted.mode == "RGB"
    assert_colour(fitted, (0, 0), BLUE, tolerance=2)
    assert_colour(fitted, (9, 9), BLUE, tolerance=2)


def test_pad_adds_background_bars() -> None:
    image = solid(RED, (60, 20))
    fitted = fit_image(image, 30, mode="pad", background=(0, 255, 0))
    assert fitted.size == (30, 30)
    # 60 x 60 square with the image in rows 20..40 -> rows 10..20 after scaling by 1/2.
    assert_colour(fitted, (15, 2), (0, 255, 0))
    assert_colour(fitted, (15, 27), (0, 255, 0))
    assert_colour(fitted, (15, 15), RED)


def test_tall_image_crop_and_pad() -> None:
    image = solid(RED, (20, 50))
    assert fit_image(image, 16).size == (16, 16)
    padded = fit_image(image, 50, mode="pad")
    assert_colour(padded, (2, 25), WHITE)
    assert_colour(padded, (25, 25), RED)


def test_fit_bad_mode_and_resolution() -> None:
    with pytest.raises(ImageError, match="stretch"):
        fit_image(solid(RED), 8, mode="stretch")
    with pytest.raises(ImageError, match="resolution"):
        fit_image(solid(RED), 0)


# ---------------------------------------------------------------------------- finding


def make_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "concept"
    folder.mkdir()
    for name in ["b.png", "a.JPG", "c.webp", ".hidden.png"]:
        solid(RED).save(folder / name, format="PNG")
    (folder / "notes.txt").write_text("not an image")
    (folder / "sub").mkdir()
    solid(RED).save(folder / "sub" / "deep.png")
    return folder


def test_folder_expansion_sorted_non_recursive_case_insensitive(tmp_path: Path) -> None:
    folder = make_folder(tmp_path)
    found = find_images(folder)
    assert [path.name for path in found] == ["a.JPG", "b.png", "c.webp"]


def test_glob_patterns(tmp_path: Path) -> None:
    folder = make_folder(tmp_path)
    assert [p.name for p in find_images(str(folder / "*.png"))] == ["b.png"]
    assert [p.name for p in find_images(str(folder / "?.webp"))] == ["c.webp"]
    assert [p.name for p in find_images(str(folder / "[ab].*"))] == ["a.JPG", "b.png"]
    recursive = [p.name for p in find_images(str(tmp_path / "**" / "*.png"))]
    assert recursive == ["b.png", "deep.png"]


def test_mixed_inputs_deduplicated_and_sorted(tmp_path: Path) -> None:
    folder = make_folder(tmp_path)
    found = find_images([folder / "c.webp", folder, str(folder / "b.png"), f"{folder}/*.png"])
    assert [path.name for path in found] == ["a.JPG", "b.png", "c.webp"]
    # the same file spelled differently is still one file
    respelled = find_images([folder / "sub" / ".." / "b.png", folder])
    assert sorted(path.name for path in respelled) == ["a.JPG", "b.png", "c.webp"]
    # an explicitly named file counts even without an image suffix
    assert find_images(folder / "notes.txt") == [folder / "notes.txt"]


def test_load_images_order_matches_find_images(tmp_path: Path) -> None:
    folder = tmp_path / "ordered"
    folder.mkdir()
    colours = {"1.png": RED, "2.png": (0, 255, 0), "3.png": BLUE}
    for name in ["3.png", "1.png", "2.png"]:
        solid(colours[name]).save(folder / name)
    images = load_images(folder, 8)
    for image, name in zip(images, ["1.png", "2.png", "3.png"], strict=True):
        assert_colour(image, (4, 4), colours[name], tolerance=1)


def test_missing_path_and_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="nowhere.png.*does not exist"):
        find_images(tmp_path / "nowhere.png")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ImageError, match=r"empty.*\.jpg") as info:
        find_images(empty)
    assert ".png" in str(info.value)  # tells which extensions count
    with pytest.raises(ImageError, match=r"no images found"):
        find_images(str(empty / "*.png"))
    with pytest.raises(ImageError, match="no image paths"):
        find_images([])


# ---------------------------------------------------------------------------- bad input


def test_random_bytes_png(tmp_path: Path) -> None:
    path = tmp_path / "garbage.png"
    path.write_bytes(np.random.default_rng(0).bytes(2000))
    with pytest.raises(ImageError, match="garbage.png"):
        open_image(path)


def test_text_file_named_jpg(tmp_path: Path) -> None:
    path = tmp_path / "readme.jpg"
    path.write_text("this is not a picture\n")
    with pytest.raises(ImageError, match="readme.jpg.*not an image"):
        open_image(path)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF"])
def test_truncated_files(tmp_path: Path, fmt: str) -> None:
    buffer = io.BytesIO()
    noise((64, 64)).save(buffer, format=fmt)
    data = buffer.getvalue()
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match=f"cut.{fmt.lower()}"):
        open_image(path)


def test_missing_file_and_folder_given_to_open(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="gone.png"):
        open_image(tmp_path / "gone.png")
    with pytest.raises(ImageError, match="is a folder"):
        open_image(tmp_path)


def test_too_small(tmp_path: Path) -> None:
    path = tmp_path / "icon.png"
    solid(RED, (40, 8)).save(path)
    with pytest.raises(ImageError, match=r"icon.png is 40x8.*minimum side of 16"):
        open_image(path)
    assert open_image(path, min_side=8).size == (40, 8)


def test_too_many_pixels_checked_before_decoding(tmp_path: Path) -> None:
    path = tmp_path / "big.png"
    solid(RED, (100, 100)).save(path)
    with pytest.raises(ImageError, match=r"big.png is 100x100.*max_pixels=9,999"):
        open_image(path, max_pixels=9_999)
    assert open_image(path, max_pixels=10_000).size == (100, 100)


def test_pil_decompression_bomb_error_is_wrapped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # PIL raises its own error at 2x its global limit, before our check can run.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    path = tmp_path / "bomb.png"
    solid(RED, (60, 60)).save(path)
    with pytest.raises(ImageError, match="bomb.png"):
        open_image(path, max_pixels=10**9)
    # between 1x and 2x PIL's limit it only warns; our own max_pixels decides
    solid(RED, (40, 40)).save(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert open_image(path, max_pixels=10**9).size == (40, 40)


def test_bad_background() -> None:
    with pytest.raises(ImageError, match="background"):
        fit_image(solid(RED), 8, background=(0, 0))


# ---------------------------------------------------------------------------- skip_bad


def test_skip_bad_warns_and_keeps_good_images(tmp_path: Path) -> None:
    solid(RED).save(tmp_path / "good1.png")
    solid(BLUE).save(tmp_path / "good2.png")
    (tmp_path / "broken.jpg").write_text("nope")
    solid(RED, (4, 4)).save(tmp_path / "tiny.png")
    with pytest.warns(ImageSkipWarning) as record:
        images = load_images(tmp_path, 12, skip_bad=True)
    assert len(images) == 2 and all(image.size == (12, 12) for image in images)
    messages = [str(item.message) for item in record]
    assert any("broken.jpg" in message for message in messages)
    assert any("tiny.png" in message for message in messages)
    assert messages[-1] == "skipped 2 of 4 images"


def test_without_skip_bad_first_bad_file_raises(tmp_path: Path) -> None:
    solid(RED).save(tmp_path / "good.png")
    (tmp_path / "broken.jpg").write_text("nope")
    with pytest.raises(ImageError, match="broken.jpg"):
        load_images(tmp_path, 12)


def test_skip_bad_all_bad_raises(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (tmp_path / "b.jpg").write_text("nope")
    with pytest.warns(ImageSkipWarning), pytest.raises(ImageError, match="all 2 images"):
        load_images(tmp_path, 12, skip_bad=True)


# ---------------------------------------------------------------------------- properties

MAGIC = [
    b"",
    b"\x89PNG\r\n\x1a\n",
    b"\xff\xd8\xff\xe0",
    b"GIF89a",
    b"BM",
    b"II*\x00",
    b"MM\x00*",
    b"RIFF\x00\x00\x00\x00WEBPVP8 ",
]


def valid_file_bytes(fmt: str) -> bytes:
    buffer = io.BytesIO()
    noise((20, 20), seed=1).save(buffer, format=fmt)
    return buffer.getvalue()


VALID = {fmt: valid_file_bytes(fmt) for fmt in ["PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF"]}


@st.composite
def hostile_bytes(draw: st.DrawFn) -> bytes:
    """Pure noise, noise behind a real format's magic number, or a real file corrupted."""
    kind = draw(st.sampled_from(["noise", "magic", "corrupt"]))
    if kind == "noise":
        return draw(st.binary(max_size=600))
    if kind == "magic":
        return draw(st.sampled_from(MAGIC)) + draw(st.binary(max_size=600))
    data = bytearray(VALID[draw(st.sampled_from(sorted(VALID)))])
    for _ in range(draw(st.integers(0, 8))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data[: draw(st.integers(0, len(data)))])


@pytest.mark.filterwarnings("ignore")  # PIL warns about some corrupt headers; fine here
@PROPERTY
@given(data=hostile_bytes(), suffix=st.sampled_from(IMAGE_EXTENSIONS))
def test_property_any_bytes_give_rgb_or_image_error(tmp_path: Path, data: bytes, suffix: str):
    path = tmp_path / f"fuzz{suffix}"
    path.write_bytes(data)
    try:
        image = open_image(path, max_pixels=1_000_000, min_side=1)
    except ImageError as error:
        assert path.name in str(error)
    else:
        assert image.mode == "RGB" and min(image.size) >= 1


# Formats that store each mode (checked against Pillow: others refuse or convert).
FORMATS_FOR_MODE = {
    "1": ["PNG", "BMP", "TIFF", "GIF", "JPEG"],
    "L": ["PNG", "JPEG", "BMP", "TIFF", "GIF", "WEBP"],
    "P": ["PNG", "GIF", "TIFF", "BMP"],
    "RGB": ["PNG", "JPEG", "WEBP", "BMP", "TIFF", "GIF"],
    "RGBA": ["PNG", "WEBP", "TIFF"],
    "LA": ["PNG", "TIFF"],
    "CMYK": ["JPEG", "TIFF"],
    "I;16": ["PNG", "TIFF"],
    "I": ["TIFF"],
    "F": ["TIFF"],
}
BYTES_PER_PIXEL = {"L": 1, "P": 1, "LA": 2, "RGB": 3, "RGBA": 4, "CMYK": 4, "I;16": 2}


def random_image(mode: str, width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    if mode == "1":
        return Image.frombytes("1", (width, height), rng.bytes((width + 7) // 8 * height))
    if mode == "I":
        # full int32 range, negatives included, to exercise the stretch path
        values = rng.integers(-(2**31), 2**31 - 1, (height, width), dtype=np.int64)
        return Image.fromarray(values.astype(np.int32), "I")
    if mode == "F":
        return Image.fromarray(rng.standard_normal((height, width)).astype(np.float32) * 1e3, "F")
    image = Image.frombytes(
        mode, (width, height), rng.bytes(BYTES_PER_PIXEL[mode] * width * height)
    )
    if mode == "P" and seed % 2:
        image.info["transparency"] = int(seed % 256)
    return image


@PROPERTY
@given(
    mode=st.sampled_from(sorted(FORMATS_FOR_MODE)),
    width=st.integers(1, 80),
    height=st.integers(1, 80),
    seed=st.integers(0, 2**32 - 1),
    format_index=st.integers(0, 6),  # one past the list means "no file: fit_image directly"
    resolution=st.sampled_from([8, 16, 33]),
    fit_mode=st.sampled_from(["crop", "pad"]),
    min_side=st.integers(1, 24),
)
def test_property_any_mode_and_size_gives_square_rgb(
    tmp_path: Path, mode, width, height, seed, format_index, resolution, fit_mode, min_side
):
    image = random_image(mode, width, height, seed)
    formats = FORMATS_FOR_MODE[mode]
    if format_index >= len(formats):
        fitted = fit_image(image, resolution, mode=fit_mode)
        assert fitted.mode == "RGB" and fitted.size == (resolution, resolution)
        return
    fmt = formats[format_index]
    path = tmp_path / f"img_{mode.replace(';', '_')}.{fmt.lower()}"
    save_kwargs = (
        {"transparency": image.info["transparency"]} if "transparency" in image.info else {}
    )
    image.save(path, format=fmt, **save_kwargs)
    if min(width, height) < min_side:
        with pytest.raises(ImageError, match=path.name):
            load_images(path, resolution, mode=fit_mode, min_side=min_side)
        return
    (loaded,) = load_images(path, resolution, mode=fit_mode, min_side=min_side)
    assert loaded.mode == "RGB" and loaded.size == (resolution, resolution)


# ---------------------------------------------------------------------------- tensors


def test_images_to_tensor_shape_range_and_round_trip() -> None:
    images = [noise((12, 10), seed=seed) for seed in range(3)]
    x = images_to_tensor(images)
    assert x.shape == (3, 3, 10, 12) and x.dtype == torch.float32
    assert x.min() >= -1.0 and x.max() <= 1.0
    # channel 0 of pixel (row 2, col 5) of image 1 is its red value
    assert x[1, 0, 2, 5].item() == pytest.approx(images[1].getpixel((5, 2))[0] / 127.5 - 1)
    back = tensor_to_images(x)
    for original, restored in zip(images, back, strict=True):
        assert np.array_equal(np.asarray(original), np.asarray(restored))


def test_tensor_round_trip_within_one_step() -> None:
    x = torch.rand(2, 3, 9, 7, generator=torch.Generator().manual_seed(0)) * 2 - 1
    again = images_to_tensor(tensor_to_images(x))
    torch.testing.assert_close(again, x, atol=1 / 255 + 1e-6, rtol=0)


def test_tensor_to_images_clamps_and_checks_shape() -> None:
    x = torch.tensor([5.0, -5.0, float("nan")]).reshape(1, 3, 1, 1)
    (image,) = tensor_to_images(x)
    assert image.getpixel((0, 0)) == (255, 0, 128)
    with pytest.raises(ImageError, match="n, 3, H, W"):
        tensor_to_images(torch.zeros(3, 4, 4))
    with pytest.raises(ImageError, match="image 1 is 5x5"):
        images_to_tensor([solid(RED, (4, 4)), solid(RED, (5, 5))])


# ---------------------------------------------------------------------------- grids


def test_save_grid_size_labels_and_no_temp_files(tmp_path: Path) -> None:
    images = [solid(RED, (16, 12)) for _ in range(5)]
    path = save_grid(images, tmp_path / "out" / "grid.png", columns=2)
    assert path == tmp_path / "out" / "grid.png"
    with Image.open(path) as grid:
        assert grid.format == "PNG" and grid.size == (32, 36)  # 3 rows of 2
        assert_colour(grid, (8, 30), RED)  # the fifth image, bottom left
        assert_colour(grid, (24, 30), WHITE)  # the empty sixth cell
    labelled = save_grid(images, tmp_path / "labelled.png", columns=2, labels=["a", "b", "c"])
    with Image.open(labelled) as grid:
        assert grid.size[0] == 32 and grid.size[1] > 36
        band = (grid.size[1] - 36) // 3
        top_band = np.asarray(grid.convert("L"))[:band]
        assert top_band.min() < 128  # the label text is drawn in the band
    assert sorted(os.listdir(tmp_path / "out")) == ["grid.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labelled.png", "out"]


def test_save_grid_wraps_labels_wider_than_the_grid(tmp_path: Path) -> None:
    images = [solid(RED, (16, 12)) for _ in range(4)]
    short = save_grid(images, tmp_path / "short.png", columns=2, labels=["a", "b"])
    caption = "a small red striped star on a blue background, top left"
    long = save_grid(images, tmp_path / "long.png", columns=2, labels=[caption, "b"])
    with Image.open(short) as one_line, Image.open(long) as wrapped:
        assert wrapped.size[0] == one_line.size[0] == 32  # the grid does not widen
        band = (wrapped.size[1] - 24) // 2  # every row gets the longest label's height
        line = (one_line.size[1] - 24) // 2
        assert band >= 3 * line - 8  # a 55-character caption needs several 32 px lines
        text = np.asarray(wrapped.convert("L"))[:band]
        assert text[band // 2 :].min() < 128  # text reaches the lower lines


def test_save_grid_label_count_must_match_rows(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="2 labels for 3 rows"):
        save_grid([solid(RED)] * 5, tmp_path / "g.png", columns=2, labels=["a", "b"])
    assert list(tmp_path.iterdir()) == []
