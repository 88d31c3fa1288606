"""Family ``probe_onnx``: the ``probe`` recipe with its frozen backbone served by onnxruntime (bundle format 1.8).

Same features, same head as a probe (inference/families/probe.py): each chosen stage pooled (a ViT's class token
after block ``i``; a CNN map's per-channel mean and std), concatenated, standardised, a linear head. What differs is
who runs the backbone: an ONNX graph in onnxruntime, with the stages read exposed as outputs ``stage_<i>`` and
everything after the last one pruned (inference/onnx_graph.py). On this project's 2-core CPU the INT8 CLIP graph
runs about 4x the images/s of the torch fp32 tower, and because heads are fitted on the features this very graph
gives (training/probe.py extracts through the module the bundle will load), its verdicts are the bundle's verdicts:
no precision switch changes them.

The file is the state dict of :class:`inference.families.probe_onnx_net.OnnxProbeNet`: ``graph`` (uint8, the
serialised ``onnx.ModelProto``: protobuf, never a pickle, covered by the file's SHA-256 like every tensor),
``feat_mean``, ``feat_std``, ``head.weight``, ``head.bias``. The graph comes from

- ``pkg:clip_vit_b16``: the source's own INT8 graph (pinned file and SHA-256), its block outputs exposed, the
  weights the source's exact numbers;
- any timm backbone (a file, a folder, another ``pkg:``): ``torch.onnx.export`` of the probe's own backbone, its
  MatMul/Gemm weights quantised to INT8 per channel (``quantize_dynamic``).

Several probes on one backbone (a whole-image probe and a face probe, say) store its graph once (format 1.9): the
others name the file that holds it, ``"graph_from": "<that expert's file>"`` in ``ensemble.json``, and their own files
hold only ``feat_mean``, ``feat_std`` and the head; the named file is another ``probe_onnx`` expert of the same bundle
with the same architecture and stages, checked by its SHA-256 like every file. ``dfx export`` does this whenever two
experts' graphs are byte for byte the same.

On a GPU onnxruntime's CUDA provider runs the graph when ``onnxruntime-gpu`` is installed; otherwise the graph runs
on the CPU provider (for a torch GPU backbone, use the ``probe`` family).
"""

from __future__ import annotations

from typing import Any

from ..errors import BundleError
from .base import no_extra_fields, register, reads
from .probe import ProbeFamily, _span

GRAPH = "graph"  #: the state-dict key of the serialised graph


class ProbeOnnxFamily(ProbeFamily):
    name = "probe_onnx"
    plain_timm = ("no timm module: onnxruntime.InferenceSession(bytes(file['graph'])) gives outputs stage_<i> "
                  "(tokens: take the class token; maps: per-channel mean and std); concatenate, "
                  "(z - feat_mean) / feat_std, then head")
    fields = ("stages", "graph_from")
    format_since = 8
    shared_tensor, shared_field = GRAPH, "graph_from"

    def parse(self, raw: dict[str, Any], where: str) -> dict[str, Any]:
        """``stages`` as a probe's, and ``graph_from``: the file of the expert whose graph this one runs (the bundle
        checks that it is another expert of this family with the same backbone and stages)."""
        no_extra_fields(raw, where, self)
        out = super().parse({k: v for k, v in raw.items() if k != "graph_from"}, where)
        source = raw.get("graph_from")
        if source is not None:
            if not isinstance(source, str):
                raise BundleError(f"{where}.graph_from: must be the file name of another expert of the bundle, "
                                  f"got {str(source)[:60]!r}")
            out["graph_from"] = source
        return out

    def format_minor(self, spec: Any) -> int:
        return 9 if spec.options.get("graph_from") else self.format_since

    def summary(self, spec: Any) -> str:
        what = "CLIP features" if "clip" in spec.arch.lower() else "texture statistics (frozen ImageNet features)"
        where = "blocks" if "vit" in spec.arch.lower() else "stages"
        return (f"{what} ({spec.arch} in onnxruntime, {where} {_span(spec.stages)}) with a linear head; "
                f"{reads(spec)}")

    def describe(self, spec: Any) -> str:
        return f"{spec.arch} (onnx)"

    def create(self, spec: Any, **train_kwargs: Any) -> Any:
        import timm

        from .probe_onnx_net import OnnxProbeNet

        if not timm.is_model(spec.arch):
            raise BundleError(f"expert '{spec.name}': unknown timm architecture '{spec.arch}'")
        try:
            return OnnxProbeNet(spec.arch, tuple(spec.stages), spec.model_kwargs)
        except (TypeError, IndexError, ValueError, RuntimeError) as exc:
            raise BundleError(f"expert '{spec.name}': cannot build an ONNX probe of '{spec.arch}' at stages "
                              f"{list(spec.stages)} ({exc})") from exc

    def load_pretrained(self, model: Any, spec: Any, pretrained: str) -> Any:
        """The backbone graph: the INT8 source's own (CLIP), or the pretrained timm backbone exported and quantised."""
        import onnx

        from ..onnx_graph import clip_stage_graph, export_timm_stages
        from ..pretrained import PretrainedError, load_probe_backbone, pinned_file, source_of
        from .probe_net import ProbeNet

        if pretrained.startswith("pkg:") and source_of(pretrained).converter == "clip_onnx":
            if source_of(pretrained).arch != spec.arch:
                raise PretrainedError(f"'{pretrained}' holds weights for '{source_of(pretrained).arch}', not "
                                      f"'{spec.arch}'")
            graph = clip_stage_graph(onnx.load(str(pinned_file(pretrained))), spec.stages)
        else:
            net = load_probe_backbone(ProbeNet(spec.arch, tuple(spec.stages), spec.model_kwargs), pretrained,
                                      spec.arch)
            graph = export_timm_stages(net.backbone.eval(), spec.stages, spec.input_size, tokens=net.tokens)
        model.set_graph(graph.SerializeToString())
        return model

    def file_state(self, state: dict[str, Any], pretrained: str | None) -> dict[str, Any]:
        return state  # the graph is already the source's INT8 numbers (or quantised at export)


register(ProbeOnnxFamily())
