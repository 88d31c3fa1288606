"""The module a ``probe`` expert's file holds (see inference/families/probe.py for the recipe and the layout)."""

from __future__ import annotations

from typing import Any

import timm
import torch
from torch import nn


class ProbeNet(nn.Module):
    """Frozen ``features_only`` backbone → mean+std pooled stages → standardise → linear head (index 1 = fake)."""

    def __init__(self, arch: str, stages: tuple[int, ...], model_kwargs: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.backbone = timm.create_model(arch, pretrained=False, features_only=True, out_indices=tuple(stages),
                                          **(model_kwargs or {}))
        self.num_features = 2 * sum(self.backbone.feature_info.channels())
        self.register_buffer("feat_mean", torch.zeros(self.num_features))
        self.register_buffer("feat_std", torch.ones(self.num_features))
        self.head = nn.Linear(self.num_features, 2)
        self.backbone.requires_grad_(False)
        self.backbone.eval()  # from the start: a frozen backbone's batch-norm statistics never move

    def train(self, mode: bool = True) -> "ProbeNet":
        super().train(mode)
        self.backbone.eval()  # frozen: its batch-norm statistics never move
        return self

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """The raw (unstandardised) feature vector: per stage, per channel mean and std over the map."""
        parts = []
        for f in self.backbone(x):
            f = f.float().flatten(2)
            parts += [f.mean(dim=2), f.std(dim=2, unbiased=False)]
        return torch.cat(parts, dim=1)

    # The names timm models use, so the trainer and the embedding stage treat a probe like any expert.
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return (self.pooled(x) - self.feat_mean) / self.feat_std

    def forward_head(self, z: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return z if pre_logits else self.head(z)

    def get_classifier(self) -> nn.Module:
        return self.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))
