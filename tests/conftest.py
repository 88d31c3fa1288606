"""Shared fixtures: a tiny untrained bundle, odd images of every kind, and a way to run ``dfx``."""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# Never touch a model hub from tests (timm would retry for ~50 s).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

ROOT = Path(__file__).resolve().parent.parent
SHARED_DEV = ROOT.parent / "shared" / "data" / "dev"
TINY_SIZE = 64


def dfx(*args: str, env: dict[str, str] | None = None, cwd: str | Path | None = None,
        timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run the installed ``dfx`` console script (the real entry point) and capture its output."""
    exe = Path(sys.executable).with_name("dfx")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "inference.cli"]
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([*cmd, *args], capture_output=True, text=True, env=full_env, cwd=cwd,
                          timeout=timeout)


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two experts of different architectures (a ConvNet and a ViT) at 64 px, seeded random weights.
    The ViT uses the ``crop`` mode and the ConvNet ``squash``, so both preprocessing paths run."""
    from inference.bundle import BundleSpec, ExpertSpec, read_spec, write_bundle
    from inference.bundle_init import init_bundle

    out = tmp_path_factory.mktemp("bundles") / "tiny"
    init_bundle(["convnext_atto", "vit_tiny_patch16_224"], out, input_size=TINY_SIZE, seed=7)
    # Give the experts different modes and unequal weights, as a trained bundle would have.
    spec = read_spec(out)
    from safetensors.torch import load_file

    states = {e.name: load_file(str(out / e.file)) for e in spec.experts}
    vit = spec.experts[1]
    experts = (spec.experts[0].__class__(**{**spec.experts[0].__dict__, "weight": 2.0}),
               ExpertSpec(**{**vit.__dict__, "preprocess": "crop", "calibration": {"temperature": 1.5}}))
    write_bundle(out, BundleSpec(**{**spec.__dict__, "experts": experts}), states, overwrite=True)
    return out


def _rng_image(w: int, h: int, seed: int) -> np.ndarray:
    """Smooth colour gradients plus noise: photo-like enough for decoders, unlike a flat image."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / max(w - 1, 1), yy * 255 / max(h - 1, 1), (xx + yy) * 127 / max(w + h, 1)], -1)
    return np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)


def png_bomb_header(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width``×``height`` pixels (a decompression bomb's shape)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + chunk(b"IEND", b""))


@pytest.fixture(scope="session")
def odd_images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Good images of every kind the loader must accept, by name."""
    d = tmp_path_factory.mktemp("odd_images")
    rgb = Image.fromarray(_rng_image(96, 72, 1))
    out: dict[str, Path] = {}

    def save(name: str, img: Image.Image, fmt: str, **kw) -> None:
        out[name] = d / name
        img.save(out[name], fmt, **kw)

    save("rgb.jpg", rgb, "JPEG", quality=90)
    save("gray_L.png", rgb.convert("L"), "PNG")
    la = rgb.convert("LA")
    save("gray_alpha_LA.png", la, "PNG")
    save("palette_P.png", rgb.convert("P", palette=Image.Palette.ADAPTIVE), "PNG")
    rgba = rgb.convert("RGBA")
    rgba.putalpha(Image.fromarray(np.tile(np.linspace(0, 255, 96, dtype=np.uint8), (72, 1))))
    save("rgba.png", rgba, "PNG")
    save("cmyk.jpg", rgb.convert("CMYK"), "JPEG", quality=90)
    sixteen = Image.fromarray((np.asarray(rgb.convert("L"), dtype=np.uint16) * 257).astype(np.uint16))
    save("gray16_I16.png", sixteen, "PNG")
    save("rgb.webp", rgb, "WEBP", quality=90)
    save("rgb.bmp", rgb, "BMP")
    save("rgb.tiff", rgb, "TIFF")
    frames = [Image.fromarray(_rng_image(64, 48, s)).convert("P") for s in (2, 3, 4)]
    out["animated.gif"] = d / "animated.gif"
    frames[0].save(out["animated.gif"], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    # EXIF orientation 6 (rotate 90° clockwise to display): stored 96×72, shown 72×96.
    exif = Image.Exif()
    exif[0x0112] = 6
    save("exif_rotated.jpg", rgb, "JPEG", quality=90, exif=exif.tobytes())
    # A PNG with a .jpg name: content decides.
    out["png_named.jpg"] = d / "png_named.jpg"
    buf = io.BytesIO()
    rgb.save(buf, "PNG")
    out["png_named.jpg"].write_bytes(buf.getvalue())
    return out


@pytest.fixture(scope="session")
def bad_images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, str]]:
    """Files that must each fail with one clear error: name → (path, expected error code)."""
    d = tmp_path_factory.mktemp("bad_images")
    good = io.BytesIO()
    Image.fromarray(_rng_image(200, 150, 5)).save(good, "JPEG", quality=90)
    files = {
        "truncated.jpg": (good.getvalue()[: len(good.getvalue()) // 2], "corrupt"),
        "text.jpg": (b"this is not an image at all, just some text\n" * 20, "not_image"),
        "empty.png": (b"", "empty"),
        "bomb.png": (png_bomb_header(100_000, 100_000), "too_large"),
    }
    out = {}
    for name, (data, code) in files.items():
        (d / name).write_bytes(data)
        out[name] = (d / name, code)
    return out


def make_tiny_dataset(root: Path, n_per_class: int = 24, size: int = 72, corrupt: bool = True) -> Path:
    """Real photographs (crops of scikit-image's bundled photos) and 'fakes' made from other crops by a
    generator-like up-sampling fingerprint (2x down, nearest-neighbour up, slight colour shift): a task a
    tiny model learns in a few steps. Two folds, and optionally one corrupt file. Returns the manifest."""
    from skimage import data as skdata

    from inference.manifest import write_manifest

    photos = [skdata.astronaut(), skdata.coffee(), skdata.chelsea(), skdata.rocket(), skdata.immunohistochemistry()]
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for label in (0, 1):
        for i in range(n_per_class):
            photo = photos[(i + label) % len(photos)]
            y = rng.integers(0, photo.shape[0] - size)
            x = rng.integers(0, photo.shape[1] - size)
            crop = Image.fromarray(photo[y:y + size, x:x + size, :3])
            if label:
                crop = crop.resize((size // 2, size // 2), Image.Resampling.BILINEAR).resize((size, size),
                                                                                          Image.Resampling.NEAREST)
                arr = np.asarray(crop).astype(np.int16) + np.array([6, -4, 3], dtype=np.int16)
                crop = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
            name = f"{'fake' if label else 'real'}_{i:03d}.png"
            crop.save(root / name)
            rows.append({"path": name, "label": label, "source": "tinygen" if label else "skimage",
                         "kind": "simulated" if label else "real", "fold": i % 2})
    if corrupt:
        (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
        rows.append({"path": "broken.png", "label": 0, "source": "skimage", "kind": "real", "fold": 0})
    return write_manifest(root / "manifest.csv", rows)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_dataset(tmp_path_factory.mktemp("tiny_dataset"))
