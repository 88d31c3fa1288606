"""The deployable core: bundles, image loading, the Detector, the CLI verbs and the JSON API.

It imports torch, timm, safetensors, Pillow, NumPy and Flask, and never training, data_prep, diffusers,
accelerate, faiss or albumentations (a server installs only this package's core dependencies).
"""

from .bundle import BundleError, BundleSpec, ExpertSpec, read_spec
from .detector import Detector, ItemResult, Prediction
from .images import ImageError, load_image

__all__ = ["BundleError", "BundleSpec", "Detector", "ExpertSpec", "ImageError", "ItemResult",
           "Prediction", "load_image", "read_spec"]
