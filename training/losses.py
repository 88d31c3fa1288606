"""The objective: ``L = w_ce·CE + w_kl·KL + w_nce·NCE`` (see ../shared/ARCHITECTURE.md).

Each term is a small function of plain tensors, unit-tested against values computed by hand.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def ce_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy on real(0)/fake(1) labels, optionally label-smoothed."""
    return F.cross_entropy(logits, labels, label_smoothing=label_smoothing)


def kl_consistency(logits_weak: torch.Tensor, logits_strong: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``KL(p_weak ‖ p_strong)``, batch mean, the weak view's distribution a fixed target (no gradient).

    The strong view carries compression, resizing, blur and noise; pulling its prediction towards the
    weak view's teaches the expert that post-processing does not change a verdict. Scaled by T² so
    that its gradient does not shrink with the temperature (as in distillation).
    """
    target = F.softmax(logits_weak.detach() / temperature, dim=1)
    log_pred = F.log_softmax(logits_strong / temperature, dim=1)
    return F.kl_div(log_pred, target, reduction="batchmean") * temperature**2


def supcon_nce(features: torch.Tensor, labels: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Supervised InfoNCE (SupCon, Khosla et al. 2020) on L2-normalised features.

    For each anchor i, positives are the other samples with the same label; the loss is
    ``-mean_{p in P(i)} log( exp(s_ip/τ) / sum_{a≠i} exp(s_ia/τ) )``, averaged over anchors that
    have at least one positive. Same-label images attract, different labels repel.
    """
    z = F.normalize(features, dim=1)
    sim = z @ z.T / temperature
    n = z.shape[0]
    eye = torch.eye(n, dtype=torch.bool, device=z.device)
    sim = sim.masked_fill(eye, float("-inf"))
    log_prob = sim - torch.logsumexp(sim, dim=1, keepdim=True)
    positives = (labels[:, None] == labels[None, :]) & ~eye
    count = positives.sum(1)
    valid = count > 0
    if not valid.any():
        return features.new_zeros(())
    per_anchor = -(log_prob.masked_fill(~positives, 0.0).sum(1)[valid] / count[valid])
    return per_anchor.mean()


class ProjectionHead(nn.Module):
    """The small MLP that maps an expert's pooled feature to the space where NCE is computed.
    It is used only in training; a bundle holds the timm model alone."""

    def __init__(self, in_dim: int, out_dim: int = 128) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, in_dim), nn.ReLU(inplace=True), nn.Linear(in_dim, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@dataclass
class LossParts:
    total: torch.Tensor
    ce: torch.Tensor
    kl: torch.Tensor
    nce: torch.Tensor


def patch_ce(patch_logits: torch.Tensor, masks: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy per patch (Patch Forensics): ``patch_logits`` ``(N, 2, h, w)``; ``masks`` ``(N, H, W)``, the
    fake share of every input pixel (an image's label everywhere, or its edit mask). Each patch's target is the
    mask's mean over the pixels it covers, so a patch straddling a splice edge is trained towards its share."""
    h, w = patch_logits.shape[2:]
    target = F.adaptive_avg_pool2d(masks[:, None].float(), (h, w))[:, 0]
    if label_smoothing:
        target = target * (1 - label_smoothing) + 0.5 * label_smoothing
    log_p = F.log_softmax(patch_logits.float(), dim=1)
    return -(target * log_p[:, 1] + (1 - target) * log_p[:, 0]).mean()


def combined_loss(logits_w: torch.Tensor, logits_s: torch.Tensor, proj_w: torch.Tensor, proj_s: torch.Tensor,
                  labels: torch.Tensor, *, w_ce: float, w_kl: float, w_nce: float, label_smoothing: float = 0.0,
                  kl_temperature: float = 1.0, nce_temperature: float = 0.1,
                  patch_logits: torch.Tensor | None = None, patch_masks: torch.Tensor | None = None) -> LossParts:
    """CE on both views, KL from the weak to the strong view, NCE over both views' projections. With
    ``patch_logits`` (both views, weak first) and ``patch_masks``, the CE term is :func:`patch_ce` instead."""
    zero = logits_w.new_zeros(())
    if w_ce and patch_logits is not None and patch_masks is not None:
        ce = patch_ce(patch_logits, patch_masks, label_smoothing)
    elif w_ce:
        ce = 0.5 * (ce_loss(logits_w, labels, label_smoothing) + ce_loss(logits_s, labels, label_smoothing))
    else:
        ce = zero
    kl = kl_consistency(logits_w, logits_s, kl_temperature) if w_kl else zero
    nce = supcon_nce(torch.cat([proj_w, proj_s]), torch.cat([labels, labels]), nce_temperature) if w_nce else zero
    return LossParts(total=w_ce * ce + w_kl * kl + w_nce * nce, ce=ce, kl=kl, nce=nce)
