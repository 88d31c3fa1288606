"""Expert models: a timm backbone with a 2-class head (index 1 = fake).

The weight file of a timm expert is exactly the state dict of
``timm.create_model(arch, num_classes=2, **model_kwargs)``, so anyone can load it with plain timm and
``strict=True``. ``model_kwargs`` is empty for most architectures; fixed-size models (ViTs) record
``img_size`` there when they run at another size than their default.

Other families (inference/families/) store other modules; :func:`create_expert` is the one way any part of the
project turns a spec into a model, :func:`expert_forward` the one way it reads logits and pooled features.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from .bundle import ExpertSpec
from .errors import BundleError
from .families import get as family_of

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


def create_expert(spec: ExpertSpec, pretrained: str | None = None, **train_kwargs: Any) -> nn.Module:
    """The module whose state dict the expert's file holds, as its family (inference/families/) defines it: random
    weights (seed torch first), or with ``pretrained`` backbone weights (``pkg:NAME``, a file or a folder;
    inference/pretrained.py) and a fresh head. ``train_kwargs``: timm options used only while training
    (``drop_path_rate``). Wrap it with :func:`with_stem` to score images. Training, probe fitting, embedding,
    ``dfx bundle init`` and loading all build experts here."""
    family = family_of(spec.family)
    model = family.create(spec, **train_kwargs)
    return family.load_pretrained(model, spec, pretrained) if pretrained else model


@dataclass
class StoredFile:
    """What an expert's file held, beyond the values now in its module: each tensor's dtype (a ``--half`` file is
    float16), and the packed INT8 tensors of a file that had them. Enough to write the same file again."""

    dtypes: dict[str, torch.dtype]
    packed: dict[str, torch.Tensor] | None = None


def read_expert(spec: ExpertSpec, bundle_dir: str | os.PathLike[str]) -> tuple[nn.Module, StoredFile]:
    """Build the module the expert's file holds (:func:`create_expert`) and load the safetensors file into it
    strictly (never a pickle); a frozen backbone stored packed as INT8 is unpacked. Eval mode."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .clip_onnx import is_packed, unpack

    path = Path(bundle_dir) / spec.file
    model = create_expert(spec)
    try:
        raw = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise BundleError(f"{path}: not a readable safetensors file ({exc})") from exc
    shared = family_of(spec.family).shared_state(spec, bundle_dir)  # e.g. a graph another expert's file holds
    state = raw
    if is_packed(raw):  # a frozen backbone from an INT8 source, stored as its exact INT8 numbers
        try:
            state = unpack(raw)
        except ValueError as exc:
            raise BundleError(f"{path}: {exc}") from exc
    own = state
    if shared:
        if set(shared) & set(state):
            raise BundleError(f"{path}: holds {', '.join(sorted(set(shared) & set(state)))}, which expert "
                              f"'{spec.name}' reads from another file of the bundle")
        state = {**state, **shared}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise BundleError(f"{path}: weights do not fit '{spec.arch}' "
                          f"({' '.join(first[:3])[:400]})") from exc
    # what the file itself holds (not the shared tensors), so that it is written back as it was
    return model.eval(), StoredFile({k: v.dtype for k, v in own.items()}, raw if own is not raw else None)


def stored_state(model: nn.Module, stored: StoredFile) -> dict[str, torch.Tensor]:
    """The file :func:`read_expert` read, from the module's current values: the same tensors, dtypes and packing
    (a frozen backbone whose values are unchanged is packed again, bit for bit)."""
    from .clip_onnx import pack

    own = model.state_dict()
    state = {k: own[k].detach().to("cpu", dtype) for k, dtype in stored.dtypes.items()}
    return pack(state, stored.packed) if stored.packed is not None else state


def load_expert(spec: ExpertSpec, bundle_dir: str | os.PathLike[str]) -> nn.Module:
    """What scores images for ``spec`` (:func:`with_stem` of :func:`read_expert`), loaded from its file. Eval mode."""
    return with_stem(spec, read_expert(spec, bundle_dir)[0]).eval()


def with_stem(spec: ExpertSpec, model: nn.Module) -> nn.Module:
    """What scores images for ``spec``: ``model`` itself, or behind its family's fixed stem (residual)."""
    return family_of(spec.family).scorer(spec, model)


def fake_probs(model: nn.Module, x: torch.Tensor, temperature: float = 1.0,
               views: tuple[str, ...] = ()) -> torch.Tensor:
    """Fake-probabilities ``(N,)`` of a batch: ``x`` is ``(N, 3, S, S)``, or ``(N, K, 3, S, S)`` for tiled
    input, whose K crops are scored as one batch and averaged per image (the mean of probabilities, the
    same rule the ensemble uses across experts). ``views`` (inference/tta.py) adds test-time views of the
    input, scored in the same forward and averaged with the image itself."""
    if views:
        from .tta import with_views

        n, stacked = x.shape[0], with_views(x, views)
        if stacked.dim() == 4:
            stacked = stacked.contiguous(memory_format=torch.channels_last)
        return fake_probs(model, stacked, temperature).reshape(len(views) + 1, n).mean(dim=0)
    if x.dim() == 5:
        n, k = x.shape[:2]
        flat = x.reshape(n * k, *x.shape[2:]).contiguous(memory_format=torch.channels_last)
        return fake_probs(model, flat, temperature).reshape(n, k).mean(dim=1)
    logits = model(x).float()
    return torch.softmax(logits / temperature, dim=1)[:, FAKE_INDEX]


def expert_forward(spec: ExpertSpec, model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``(N, 2)`` and the pooled pre-logits feature ``(N, D)`` in one pass (training's NCE term and the
    embedding stage use the feature), as the expert's family reads them."""
    logits, pooled, _ = family_of(spec.family).outputs(model, x)
    return logits, pooled