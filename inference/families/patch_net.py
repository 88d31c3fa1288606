"""The module a ``patch`` expert's file holds (see inference/families/patch.py for the recipe and the layout)."""

from __future__ import annotations

from typing import Any

import timm
import torch
from torch import nn


def image_log_probs(patch_logits: torch.Tensor) -> torch.Tensor:
    """``(N, 2, h, w)`` patch logits → ``(N, 2)`` log of the patches' mean softmax (Patch Forensics' "after
    softmax" rule). Returned as log-probabilities so that ``softmax`` of them is exactly that mean, and the rest
    of the pipeline (temperature, ensemble, TTA) treats a patch expert's output like any expert's logits."""
    probs = torch.softmax(patch_logits.float(), dim=1).mean(dim=(2, 3))
    return torch.log(probs.clamp_min(1e-12))


class PatchNet(nn.Module):
    """A timm backbone cut after one stage (``features_only``) and a 1×1 convolution: a real/fake logit per
    receptive-field patch. Index 1 of the class axis is fake, as everywhere."""

    def __init__(self, arch: str, stage: int, model_kwargs: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.backbone = timm.create_model(arch, pretrained=False, features_only=True, out_indices=(int(stage),),
                                          **(model_kwargs or {}))
        self.num_features = int(self.backbone.feature_info.channels()[-1])
        self.stride = int(self.backbone.feature_info.reduction()[-1])  #: input pixels per patch step
        self.head = nn.Conv2d(self.num_features, 2, kernel_size=1)

    def patch_logits(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, 2, h, w)``: one logit pair per patch (h ≈ H / stride)."""
        return self.head(self.forward_features(x))

    def patch_outputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Image logits ``(N, 2)``, pooled feature ``(N, C)`` and patch logits ``(N, 2, h, w)`` from one pass
        (training needs all three: CE per patch, KL per image, NCE on the feature)."""
        features = self.forward_features(x)
        patches = self.head(features)
        return image_log_probs(patches), self.forward_head(features, pre_logits=True), patches

    # The names timm models use, so the trainer and the embedding stage treat a patch expert like any expert.
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)[-1]

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if pre_logits:
            return features.float().mean(dim=(2, 3))
        return image_log_probs(self.head(features))

    def get_classifier(self) -> nn.Module:
        return self.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
