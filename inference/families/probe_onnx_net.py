"""The module a ``probe_onnx`` expert's file holds (see inference/families/probe_onnx.py for the layout)."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import torch
from torch import nn


def stage_widths(arch: str, stages: tuple[int, ...], model_kwargs: dict[str, Any] | None = None) -> tuple[int, bool]:
    """The pooled feature width a probe of ``arch`` at ``stages`` has, and whether ``arch`` is a Vision Transformer
    (built on the meta device: no weights, no memory)."""
    from .probe_net import ProbeNet

    with torch.device("meta"):
        net = ProbeNet(arch, stages, model_kwargs)
    if net.tokens and net.depth in stages:
        raise ValueError(f"stage {net.depth} (the image embedding) is not served by onnxruntime here; read blocks "
                         f"0..{net.depth - 1} (the probe family reads the embedding)")
    return net.num_features, net.tokens


class _Sessions:
    """The onnxruntime sessions of one graph, one per (device, threads); never copied (a deep copy of the module,
    e.g. training's EMA, makes its own when it first runs)."""

    def __init__(self) -> None:
        self.lock, self.by_key = threading.Lock(), {}

    def __deepcopy__(self, memo: dict) -> "_Sessions":
        return _Sessions()

    def clear(self) -> None:
        with self.lock:
            self.by_key.clear()


class OnnxProbeNet(nn.Module):
    """An ONNX graph of a frozen backbone (run by onnxruntime) → pooled stages → standardise → linear head.

    The same interface as :class:`inference.families.probe_net.ProbeNet` (``pooled``, ``forward_features``,
    ``forward_head``, ``get_classifier``), so training, probe fitting, embedding and scoring treat it alike. The
    graph is the ``graph`` buffer (the serialised ``onnx.ModelProto``, uint8): it lives in the expert's safetensors
    file, so the file's SHA-256 covers it. Its outputs ``stage_<i>`` are pooled as ProbeNet pools them: tokens
    ``(N, L, D)`` → the class token, vectors ``(N, D)`` as they are, maps ``(N, C, H, W)`` → per-channel mean and std.
    """

    def __init__(self, arch: str, stages: tuple[int, ...], model_kwargs: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.arch, self.stages = arch, tuple(stages)
        self.num_features, self.tokens = stage_widths(arch, self.stages, model_kwargs)
        self.register_buffer("graph", torch.zeros(0, dtype=torch.uint8))
        self.register_buffer("feat_mean", torch.zeros(self.num_features))
        self.register_buffer("feat_std", torch.ones(self.num_features))
        self.head = nn.Linear(self.num_features, 2)
        self.where = f"ONNX graph of {arch}"
        self._sessions = _Sessions()

    def set_graph(self, graph: bytes) -> None:
        """Replace the backbone graph (serialised ModelProto)."""
        self.graph = torch.frombuffer(bytearray(graph), dtype=torch.uint8).clone()
        self._sessions.clear()

    def graph_bytes(self) -> bytes:
        return self.graph.cpu().numpy().tobytes()

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        # the graph's length is the file's, not the freshly built module's (empty): take its size before loading
        incoming = state_dict.get(prefix + "graph")
        if isinstance(incoming, torch.Tensor) and incoming.dtype == torch.uint8 and incoming.dim() == 1:
            self.graph = torch.zeros_like(incoming, device=self.graph.device)
            self._sessions.clear()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if isinstance(incoming, torch.Tensor) and incoming.numel():
            self.check()

    def check(self) -> None:
        """Refuse, by name, a graph onnxruntime cannot read, one with operators it does not implement, or one
        without the ``stage_<i>`` outputs the head reads: at load, not at the first image."""
        import onnx

        from ..errors import BundleError
        from ..onnx_graph import check_ops, stage_name

        try:
            model = onnx.load_from_string(self.graph_bytes())
        except Exception as exc:  # protobuf's DecodeError and friends
            raise BundleError(f"{self.where}: not a readable ONNX graph ({exc})") from exc
        check_ops(model, self.where)
        have = {o.name for o in model.graph.output}
        missing = [stage_name(s) for s in self.stages if stage_name(s) not in have]
        if missing:
            raise BundleError(f"{self.where}: the graph has no output {', '.join(missing)} (it has "
                              f"{', '.join(sorted(have)) or 'none'})")

    def session(self, device: str = "cpu") -> Any:
        """The onnxruntime session for ``device`` with ``torch.get_num_threads()`` threads (made on first use)."""
        from ..onnx_graph import session

        if self.graph.numel() == 0:
            raise RuntimeError(f"{self.where}: no graph (load the expert's file or its pretrained backbone first)")
        key = (device, torch.get_num_threads())
        with self._sessions.lock:
            if key not in self._sessions.by_key:
                self._sessions.by_key[key] = session(self.graph_bytes(), self.where, threads=key[1], device=device)
            return self._sessions.by_key[key]

    def stage_outputs(self, x: torch.Tensor) -> dict[int, np.ndarray]:
        """The graph's raw ``stage_<i>`` outputs for a batch (float32 NumPy arrays), the graph run one image at a time.

        Why one at a time: a dynamically quantised graph quantises each product's input with one scale taken from
        the whole tensor's range (``DynamicQuantizeLinear``), so run on a batch, an image's features depend on the
        other images in it (measured: scores moved by up to 0.2 between an image scored alone and in a batch of 16).
        One image per run makes a score the image's own, whoever else is scored with it (the API's micro-batches,
        training's batches); on 2 CPU cores it is also no slower (8 images: 0.68 s one by one, 0.77 s batched)."""
        from ..onnx_graph import stage_name

        sess = self.session("cuda" if x.is_cuda else "cpu")
        pixels = np.ascontiguousarray(x.detach().float().cpu().numpy())
        names = [stage_name(s) for s in self.stages]
        feed = sess.get_inputs()[0].name
        if not len(pixels):
            return dict(zip(self.stages, sess.run(names, {feed: pixels})))
        runs = [sess.run(names, {feed: pixels[i:i + 1]}) for i in range(len(pixels))]
        return {s: np.concatenate([r[k] for r in runs]) for k, s in enumerate(self.stages)}

    def stage_vectors(self, x: torch.Tensor) -> dict[int, torch.Tensor]:
        """One pooled vector per stage, ``{stage: (N, D_stage)}``, from a single pass of the graph."""
        out = {}
        for s, raw in self.stage_outputs(x).items():
            f = torch.from_numpy(np.asarray(raw, dtype=np.float32))
            if f.dim() == 3:
                f = f[:, 0]  # the class token (RINE)
            elif f.dim() == 4:
                f = f.flatten(2)
                f = torch.cat([f.mean(dim=2), f.std(dim=2, unbiased=False)], dim=1)
            elif f.dim() != 2:
                raise RuntimeError(f"{self.where}: stage {s} has shape {tuple(f.shape)}")
            out[s] = f
        return out

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """The raw (unstandardised) feature vector: the stages' pooled vectors, concatenated in order."""
        vectors = self.stage_vectors(x)
        z = torch.cat([vectors[s] for s in self.stages], dim=1)
        if z.shape[1] != self.num_features:
            raise RuntimeError(f"{self.where}: the graph's stages give {z.shape[1]} features, the head reads "
                               f"{self.num_features}")
        return z.to(self.feat_mean.device)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return (self.pooled(x) - self.feat_mean) / self.feat_std

    def forward_head(self, z: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return z if pre_logits else self.head(z)

    def get_classifier(self) -> nn.Module:
        return self.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))
