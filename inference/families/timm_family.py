"""Family ``timm``: any timm model with a 2-class head; the file is exactly its state dict."""

from __future__ import annotations

from typing import Any

from ..errors import BundleError
from . import Family, register


def create_timm(spec: Any, **train_kwargs: Any) -> Any:
    """``timm.create_model(arch, num_classes=2, **model_kwargs)`` with random weights, as a BundleError naming the
    expert when timm does not know the architecture or its options."""
    import timm

    if not timm.is_model(spec.arch):
        raise BundleError(f"expert '{spec.name}': unknown timm architecture '{spec.arch}'")
    try:
        return timm.create_model(spec.arch, pretrained=False, num_classes=2, **spec.model_kwargs, **train_kwargs)
    except TypeError as exc:
        raise BundleError(f"expert '{spec.name}': bad model_kwargs {spec.model_kwargs} for '{spec.arch}' ({exc})") from exc


class TimmFamily(Family):
    name = "timm"


register(TimmFamily())
