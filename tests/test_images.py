"""The image loader accepts what the real world sends and refuses the rest with one clear error."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from inference.images import ImageError, collect_images, load_image


@pytest.mark.parametrize("name", [
    "rgb.jpg", "gray_L.png", "gray_alpha_LA.png", "palette_P.png", "rgba.png", "cmyk.jpg",
    "gray16_I16.png", "rgb.webp", "rgb.bmp", "rgb.tiff", "animated.gif", "exif_rotated.jpg", "png_named.jpg",
])
def test_every_kind_becomes_8bit_rgb(odd_images, name):
    img = load_image(odd_images[name])
    assert img.mode == "RGB"
    arr = np.asarray(img)
    assert arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == 3
    assert arr.std() > 5, "decoded to a flat image: pixel data was lost"


def test_exif_orientation_is_applied(odd_images):
    assert load_image(odd_images["rgb.jpg"]).size == (96, 72)
    assert load_image(odd_images["exif_rotated.jpg"]).size == (72, 96)


def test_sixteen_bit_keeps_its_range(odd_images):
    """A naive convert('RGB') clips I;16 to white; the loader scales 0..65535 to 0..255."""
    src = np.asarray(Image.open(odd_images["gray16_I16.png"]), dtype=np.float64) / 257.0
    got = np.asarray(load_image(odd_images["gray16_I16.png"]))[..., 0].astype(np.float64)
    assert np.abs(got - src).max() <= 1.0


def test_transparency_is_composited_on_white(odd_images):
    got = np.asarray(load_image(odd_images["rgba.png"]))
    assert (got[:, 0] >= 254).all(), "fully transparent column must be white"
    original = np.asarray(Image.open(odd_images["rgba.png"]).convert("RGB"))
    assert np.abs(got[:, -1].astype(int) - original[:, -1]).max() <= 1, "opaque column must keep its colour"


def test_animated_takes_first_frame(odd_images):
    first = Image.open(odd_images["animated.gif"])
    first.seek(0)
    assert np.array_equal(np.asarray(load_image(odd_images["animated.gif"])), np.asarray(first.convert("RGB")))


def test_bytes_and_streams_equal_paths(odd_images):
    path = odd_images["rgb.webp"]
    a = np.asarray(load_image(path))
    assert np.array_equal(a, np.asarray(load_image(path.read_bytes())))
    assert np.array_equal(a, np.asarray(load_image(io.BytesIO(path.read_bytes()))))


@pytest.mark.parametrize("name", ["truncated.jpg", "text.jpg", "empty.png", "bomb.png"])
def test_bad_files_raise_one_clear_error(bad_images, name):
    path, code = bad_images[name]
    with pytest.raises(ImageError) as info:
        load_image(path)
    assert info.value.code == code
    assert str(path) in str(info.value), "the message must name the image"


def test_pixel_limit_is_configurable(odd_images):
    with pytest.raises(ImageError, match="over the limit") as info:
        load_image(odd_images["rgb.jpg"], max_pixels=96 * 72 - 1)
    assert info.value.code == "too_large"
    assert load_image(odd_images["rgb.jpg"], max_pixels=96 * 72).size == (96, 72)


def test_unsupported_format_by_content_is_refused(tmp_path):
    """Formats outside the allowed list (here ICO, EPS would run Ghostscript) are not opened."""
    p = tmp_path / "icon.png"
    Image.new("RGB", (32, 32), (10, 200, 30)).save(p, "ICO")
    with pytest.raises(ImageError) as info:
        load_image(p)
    assert info.value.code == "not_image"


def test_large_jpeg_is_drafted_but_not_below_the_needed_size(tmp_path):
    rng = np.random.default_rng(0)
    p = tmp_path / "big.jpg"
    Image.fromarray(rng.integers(0, 255, (1536, 2048, 3), dtype=np.uint8)).save(p, quality=85)
    full = load_image(p)
    small = load_image(p, min_size=224)
    assert full.size == (2048, 1536)
    assert min(small.size) >= 224 and small.size[0] < 2048
    assert abs(small.size[0] / small.size[1] - 2048 / 1536) < 0.01


def test_collect_images_walks_folders(tmp_path, odd_images):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / ".hidden").mkdir()
    for rel in ("a/one.jpg", "a/b/two.PNG", "a/.hidden/three.jpg", "a/.four.jpg", "a/notes.txt"):
        (tmp_path / rel).write_bytes(odd_images["rgb.jpg"].read_bytes())
    explicit = tmp_path / "a" / "notes.txt"
    found = collect_images([tmp_path / "a", explicit, tmp_path / "a" / "one.jpg"])
    names = [p.name for p in found]
    assert names == ["two.PNG", "one.jpg", "notes.txt"]  # sorted by path: a/b/… before a/one.jpg
    assert [p.name for p in collect_images([tmp_path / "a"], recursive=False)] == ["one.jpg"]
    with pytest.raises(FileNotFoundError):
        collect_images([tmp_path / "missing"])
