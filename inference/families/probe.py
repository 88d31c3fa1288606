"""Family ``probe``: a frozen pretrained backbone read at chosen intermediate stages, and a small trained head.

The UniversalFakeDetect / RINE recipe with backbones we can have offline: generation traces live in the
low- and mid-level features of an ImageNet network (edges, textures, up-sampling patterns) more than in its
last, most semantic stage. Each chosen stage's feature map is pooled per channel into its mean and its
standard deviation (the std keeps how a texture varies, which the mean averages away), the vectors are
concatenated, standardised with the training set's statistics (``feat_mean``/``feat_std`` buffers) and
classified by a linear layer.

The file is the state dict of :class:`ProbeNet`: ``backbone.*`` is exactly
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

from . import register
from .timm_family import no_extra_fields

MAX_STAGE = 5            #: a CNN's timm feature indices (the patch family cuts there too)
MAX_PROBE_STAGE = 64     #: a probe on a ViT reads blocks (ViT-B: 0..11, 12 = the embedding); checked at build


def probe_net(arch: str, stages: tuple[int, ...], model_kwargs: dict[str, Any] | None = None) -> Any:
    """A :class:`inference.probe_net.ProbeNet` with random weights (torch is imported only here, so reading a
    bundle stays torch-free)."""
    from ..probe_net import ProbeNet

    return ProbeNet(arch, stages, model_kwargs)


def build_features_net(spec: Any, build: Any, what: str) -> Any:
    """``build()`` a module around a timm ``features_only`` backbone (probe and patch families), as a BundleError
    naming the expert and ``what`` when the architecture is unknown or cannot be cut at those stages."""
    import timm

    from ..bundle import BundleError

    if not timm.is_model(spec.arch):
        raise BundleError(f"expert '{spec.name}': unknown timm architecture '{spec.arch}'")
    try:
        return build()
    except (TypeError, IndexError, ValueError, RuntimeError) as exc:
        raise BundleError(f"expert '{spec.name}': cannot build {what} ({exc})") from exc


class ProbeFamily:
    name = "probe"
    plain_timm = ("timm.create_model(arch, features_only=True, out_indices=stages) loads the 'backbone.' tensors "
                  "(strict); mean+std pool each stage, concatenate, (z - feat_mean) / feat_std, then head")

    def parse(self, raw: dict[str, Any], where: str) -> dict[str, Any]:
        from ..bundle import BundleError

        no_extra_fields(raw, where, self.name, allowed=("stages",))
        stages = raw.get("stages")
        if not isinstance(stages, list) or not stages or not all(
                isinstance(s, int) and not isinstance(s, bool) and 0 <= s <= MAX_PROBE_STAGE for s in stages) \
                or sorted(set(stages)) != stages:
            raise BundleError(f"{where}: a probe expert needs stages, increasing feature indices (CNN: 0..{MAX_STAGE}; "
                              f"ViT: blocks, up to {MAX_PROBE_STAGE}), "
                              f"got {stages!r}")
        return {"stages": tuple(stages)}

    def create(self, spec: Any) -> Any:
        return build_features_net(spec, lambda: probe_net(spec.arch, tuple(spec.stages), spec.model_kwargs),
                                  f"a probe of '{spec.arch}' at stages {list(spec.stages)}")

    def scorer(self, spec: Any, model: Any) -> Any:
        return model


register(ProbeFamily())
