"""Family ``patch``: Patch Forensics (Chai et al., ECCV 2020) on a timm backbone.

A backbone cut after one stage sees only a small receptive field at each output position; a 1×1 convolution
turns every position into a real/fake logit, so the expert says *where* as well as *whether*. Its image
probability is the mean of the patches' softmax (the paper's "after softmax" average), and its patch
probabilities are the heatmap (inference/explain.py). Cutting early keeps the decision on local, low-level
traces, which is what carries over between generators, and leaves content (faces, scenes) little room.

The file is the state dict of :class:`inference.families.patch_net.PatchNet`: ``backbone.*`` is exactly
``timm.create_model(arch, features_only=True, out_indices=(stage,))``'s state dict, then ``head.weight``
``(2, C, 1, 1)`` and ``head.bias``. ``ensemble.json`` holds ``stages: [stage]`` (one timm feature index;
0 = stride 2 ... 4 = stride 32 for EfficientNet/ConvNeXt-style models).
"""

from __future__ import annotations

from typing import Any

from ..errors import BundleError
from .base import Family, no_extra_fields, reads, register
from .probe import MAX_STAGE, build_features_net, load_features_backbone


def patch_net(arch: str, stage: int, model_kwargs: dict[str, Any] | None = None) -> Any:
    """A :class:`inference.families.patch_net.PatchNet` with random weights (torch is imported only here)."""
    from .patch_net import PatchNet

    return PatchNet(arch, stage, model_kwargs)


class PatchFamily(Family):
    name = "patch"
    plain_timm = ("timm.create_model(arch, features_only=True, out_indices=stages) loads the 'backbone.' tensors "
                  "(strict); head is a Conv2d(C, 2, 1) on its one feature map: softmax per patch, mean over patches")
    fields = ("stages",)
    format_since = 4
    trains_on_masks = True  # an edit's mask says which patches are fake

    def parse(self, raw: dict[str, Any], where: str) -> dict[str, Any]:
        no_extra_fields(raw, where, self)
        stages = raw.get("stages")
        if not isinstance(stages, list) or len(stages) != 1 or not isinstance(stages[0], int) \
                or isinstance(stages[0], bool) or not 0 <= stages[0] <= MAX_STAGE:
            raise BundleError(f"{where}.stages: a patch expert needs stages, one feature index in 0..{MAX_STAGE} "
                              f"(where the backbone is cut), got {stages!r}")
        return {"stages": tuple(stages)}

    def create(self, spec: Any, **train_kwargs: Any) -> Any:
        return build_features_net(spec, lambda: patch_net(spec.arch, spec.stages[0], spec.model_kwargs),
                                  f"'{spec.arch}' cut after stage {spec.stages[0]}")

    def load_pretrained(self, model: Any, spec: Any, pretrained: str) -> Any:
        return load_features_backbone(model, spec, pretrained)

    def outputs(self, model: Any, x: Any) -> tuple[Any, Any, Any]:
        return model.patch_outputs(x)

    def has_map(self, spec: Any) -> bool:
        return True

    def map_probs(self, model: Any, spec: Any, batch: Any) -> Any:
        """The patches' own softmax (before the bundle's temperature, which calibrates image scores)."""
        import torch

        return torch.softmax(model.patch_logits(batch).float(), dim=1)[:, 1]

    def describe(self, spec: Any) -> str:
        return f"{spec.arch}/patch{spec.stages[0]}"

    def summary(self, spec: Any) -> str:
        return (f"local patches ({spec.arch} stage {spec.stages[0]} features, trained on edit masks): scores each "
                f"region and draws where; {reads(spec)}")


register(PatchFamily())
