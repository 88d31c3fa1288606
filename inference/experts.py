"""Expert models: a timm backbone with a 2-class head (index 1 = fake).

The weight file of a timm expert is exactly the state dict of
``timm.create_model(arch, num_classes=2, **model_kwargs)``, so anyone can load it with plain timm and
``strict=True``. ``model_kwargs`` is empty for most architectures; fixed-size models (ViTs) record
``img_size`` there when they run at another size than their default.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from .bundle import BundleError, ExpertSpec

NUM_CLASSES = 2
FAKE_INDEX = 1


def arch_defaults(arch: str, input_size: int | None = None) -> dict[str, Any]:
    """What a new expert of ``arch`` needs in its spec: input size, mean, std and model kwargs.

    Reads timm's pretrained config (no download: ``pretrained=False``). Raises BundleError for an
    architecture timm does not know.
    """
    if not timm.is_model(arch):
        raise BundleError(f"unknown timm architecture '{arch}' (see timm.list_models())")
    model = timm.create_model(arch, pretrained=False, num_classes=NUM_CLASSES)
    cfg = dict(model.pretrained_cfg or {})
    default_size = int(cfg.get("input_size", (3, 224, 224))[-1])
    size = int(input_size or default_size)
    kwargs: dict[str, Any] = {}
    if cfg.get("fixed_input_size") and size != default_size:
        kwargs["img_size"] = size
    return {
        "input_size": size,
        "mean": tuple(float(v) for v in cfg.get("mean", (0.485, 0.456, 0.406))),
        "std": tuple(float(v) for v in cfg.get("std", (0.229, 0.224, 0.225))),
        "model_kwargs": kwargs,
    }


def create_expert(spec: ExpertSpec) -> nn.Module:
    """A freshly initialised model for ``spec`` (random weights; seed torch before calling)."""
    if spec.family != "timm":
        raise BundleError(f"expert '{spec.name}': unknown family '{spec.family}'")
    if not timm.is_model(spec.arch):
        raise BundleError(f"expert '{spec.name}': unknown timm architecture '{spec.arch}'")
    try:
        return timm.create_model(spec.arch, pretrained=False, num_classes=NUM_CLASSES, **spec.model_kwargs)
    except TypeError as exc:
        raise BundleError(f"expert '{spec.name}': bad model_kwargs {spec.model_kwargs} for "
                          f"'{spec.arch}' ({exc})") from exc


def load_expert(spec: ExpertSpec, bundle_dir: str | os.PathLike[str]) -> nn.Module:
    """Build the expert and load its safetensors file strictly (never a pickle). Eval mode."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(bundle_dir) / spec.file
    model = create_expert(spec)
    try:
        state = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise BundleError(f"{path}: not a readable safetensors file ({exc})") from exc
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise BundleError(f"{path}: weights do not fit '{spec.arch}' "
                          f"({' '.join(first[:3])[:400]})") from exc
    return model.eval()


def expert_forward(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``(N, 2)`` and the pooled pre-logits feature ``(N, D)`` in one pass (training's NCE
    term and the embedding stage use the feature)."""
    features = model.forward_features(x)
    pooled = model.forward_head(features, pre_logits=True)
    return model.get_classifier()(pooled), pooled
