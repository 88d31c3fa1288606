"""The deployable core: bundles, image loading, the Detector, the CLI verbs and the JSON API.

It imports torch, timm, safetensors, Pillow, NumPy and Flask, and never training, data_prep, diffusers,
accelerate, faiss or albumentations (a server installs only this package's core dependencies).
The names below load on first use, so ``import inference.manifest`` (or ``dfx --help``) does not pay
for torch.
"""

from importlib import import_module
from typing import Any

_EXPORTS = {
    "BundleError": "bundle", "BundleSpec": "bundle", "ExpertSpec": "bundle", "read_spec": "bundle",
    "Detector": "detector", "ItemResult": "detector", "Prediction": "detector",
    "ImageError": "images", "load_image": "images",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'inference' has no attribute {name!r}")
