"""Family ``probe``: a frozen pretrained backbone read at chosen intermediate stages, and a small trained head.

The UniversalFakeDetect / RINE recipe with backbones we can have offline: generation traces live in the
low- and mid-level features of an ImageNet network (edges, textures, up-sampling patterns) more than in its
last, most semantic stage. Each chosen stage's feature map is pooled per channel into its mean and its
standard deviation (the std keeps how a texture varies, which the mean averages away), the vectors are
concatenated, standardised with the training set's statistics (``feat_mean``/``feat_std`` buffers) and
classified by a linear layer.

The file is the state dict of :class:`inference.families.probe_net.ProbeNet`: ``backbone.*`` is exactly
``timm.create_model(arch, features_only=True, out_indices=stages)``'s state dict, then ``feat_mean``,
``feat_std``, ``head.weight`` and ``head.bias``. ``stages`` lists timm feature indices (0 = stride 2 ...
4 = stride 32 for EfficientNet/MobileNet).

On a Vision Transformer (CLIP ViT-B/16 from ``pkg:clip_vit_b16``; format 1.5) a stage is a block: stage ``i`` reads
the class token after block ``i`` (RINE), stage ``depth`` (12 for ViT-B) the model's image embedding (final norm and
projection, L2-normalised: UniversalFakeDetect). ``backbone.*`` is then ``timm.create_model(arch,
num_classes=<pretrained head>)``'s state dict, the blocks after the last one read pruned away when the embedding is
not read; the backbone's linear weights may be stored packed (``<key>.int8`` + ``<key>.scale``, the INT8 source's
exact numbers: inference/clip_onnx.py), 4x smaller.
"""

from __future__ import annotations

from typing import Any

from ..errors import BundleError
from .base import Family, no_extra_fields, reads, register

MAX_STAGE = 5            #: a CNN's timm feature indices (the patch family cuts there too)
MAX_PROBE_STAGE = 64     #: a probe on a ViT reads blocks (ViT-B: 0..11, 12 = the embedding); checked at build


def probe_net(arch: str, stages: tuple[int, ...], model_kwargs: dict[str, Any] | None = None) -> Any:
    """A :class:`inference.families.probe_net.ProbeNet` with random weights (torch is imported only here, so reading
    a bundle stays torch-free)."""
    from .probe_net import ProbeNet

    return ProbeNet(arch, stages, model_kwargs)


def build_features_net(spec: Any, build: Any, what: str) -> Any:
    """``build()`` a module around a timm ``features_only`` backbone (probe and patch families), as a BundleError
    naming the expert and ``what`` when the architecture is unknown or cannot be cut at those stages."""
    import timm

    if not timm.is_model(spec.arch):
        raise BundleError(f"expert '{spec.name}': unknown timm architecture '{spec.arch}'")
    try:
        return build()
    except (TypeError, IndexError, ValueError, RuntimeError) as exc:
        raise BundleError(f"expert '{spec.name}': cannot build {what} ({exc})") from exc


def load_features_backbone(model: Any, spec: Any, pretrained: str) -> Any:
    """Pretrained weights into a ``features_only`` backbone (probe and patch): every tensor it has must be there."""
    from ..pretrained import load_probe_backbone

    return load_probe_backbone(model, pretrained, spec.arch)


def _span(stages: Any) -> str:
    stages = list(stages or [])
    if len(stages) > 2 and stages == list(range(stages[0], stages[-1] + 1)):
        return f"{stages[0]}-{stages[-1]}"
    return ", ".join(str(v) for v in stages)


class ProbeFamily(Family):
    name = "probe"
    plain_timm = ("timm.create_model(arch, features_only=True, out_indices=stages) loads the 'backbone.' tensors "
                  "(strict); mean+std pool each stage, concatenate, (z - feat_mean) / feat_std, then head")
    fields = ("stages",)
    format_since = 2
    calibrates = True  # standardise the frozen features with the training images' statistics
    fits_head = True  # frozen features, a linear head: experts.N.fit: logistic

    def calibrate(self, model: Any, inputs: Any) -> None:
        """``feat_mean``/``feat_std`` from the training images' pooled features, so the head starts on
        standardised features."""
        import torch

        from .probe_net import robust_std

        with torch.no_grad():
            feats = [model.pooled(x) for x in inputs]
            if feats:
                f = torch.cat(feats)
                model.feat_mean.copy_(f.mean(dim=0))
                model.feat_std.copy_(robust_std(f.std(dim=0, unbiased=False)))

    def parse(self, raw: dict[str, Any], where: str) -> dict[str, Any]:
        no_extra_fields(raw, where, self)
        stages = raw.get("stages")
        if not isinstance(stages, list) or not stages or not all(
                isinstance(s, int) and not isinstance(s, bool) and 0 <= s <= MAX_PROBE_STAGE for s in stages) \
                or sorted(set(stages)) != stages:
            raise BundleError(f"{where}.stages: a probe expert needs stages, increasing feature indices (CNN: 0..{MAX_STAGE}; "
                              f"ViT: blocks, up to {MAX_PROBE_STAGE}), "
                              f"got {stages!r}")
        return {"stages": tuple(stages)}

    def format_minor(self, spec: Any) -> int:
        """1.5 for a probe on a Vision Transformer's tokens (CLIP), else 1.2."""
        try:
            from .probe_net import is_token_model

            return 5 if is_token_model(spec.arch) else self.format_since
        except Exception:  # an unknown architecture: the writer's own checks say so
            return self.format_since

    def summary(self, spec: Any) -> str:
        if "clip" in spec.arch.lower():
            return f"CLIP features (frozen {spec.arch}, blocks {_span(spec.stages)}) with a linear head; {reads(spec)}"
        return (f"texture statistics (frozen ImageNet {spec.arch} features, stages "
                f"{_span(spec.stages)}) with a linear head; {reads(spec)}")

    def create(self, spec: Any, **train_kwargs: Any) -> Any:
        return build_features_net(spec, lambda: probe_net(spec.arch, tuple(spec.stages), spec.model_kwargs),
                                  f"a probe of '{spec.arch}' at stages {list(spec.stages)}")

    def load_pretrained(self, model: Any, spec: Any, pretrained: str) -> Any:
        return load_features_backbone(model, spec, pretrained)

    def file_state(self, state: dict[str, Any], pretrained: str | None) -> dict[str, Any]:
        """A backbone frozen from an INT8 source (CLIP) is stored as the source's exact INT8 numbers, 4x smaller."""
        from ..pretrained import packed_reference

        reference = packed_reference(pretrained)
        if reference is None:
            return state
        from ..clip_onnx import pack

        return pack(state, reference, prefix="backbone.")

    def finetune_check(self, freeze: int, layer_decay: float | None, where: str) -> str | None:
        return f"{where}: a probe's backbone is always frozen; freeze and layer_decay are for fine-tuned experts"


register(ProbeFamily())
