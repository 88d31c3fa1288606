"""Partial fine-tuning of a pretrained backbone: freeze its first layer groups, lower the rate towards the input.

A few hundred images are enough to move a head, not to re-learn ImageNet's early filters: freezing the stem
and first stages (``experts.N.freeze``) keeps the low-level features that carry over between generators and
saves their backward pass; layer-wise learning-rate decay (``experts.N.layer_decay``, as in BEiT and timm's
``param_groups_layer_decay``) lets the deep layers adapt more than the shallow ones.

Layer groups are timm's coarse groups for the architecture (``model.group_matcher(coarse=True)``: the stem,
then one group per stage or block), so a number means the same thing for EfficientNet, ConvNeXt or ViT. A
patch expert's ``features_only`` backbone has the full model's parameter names, so the full model's matcher
(built on the meta device: no memory, no weights) groups it too. Parameters outside the groups (timm's
classifier, a patch expert's 1×1 head, the NCE projection) are the head: they always train at the full rate.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def _meta_model(arch: str) -> Any:
    """The full ``arch`` model on the meta device (no memory, no weights): its layer-group matcher and names."""
    import timm

    with torch.device("meta"):
        return timm.create_model(arch, pretrained=False)


def _coarse_groups(named: list[tuple[str, Any]], full: Any) -> dict[int, list[str]]:
    """timm's coarse layer groups of these (name, value) pairs, by ``full``'s matcher."""
    from timm.models._manipulate import group_with_matcher

    return group_with_matcher(iter(named), full.group_matcher(coarse=True))


def layer_groups(expert: nn.Module, arch: str) -> list[list[tuple[str, nn.Parameter]]]:
    """The expert's backbone parameters in timm's coarse layer groups, from the input to the output (the
    classifier of a plain timm model is left out: it is head)."""
    full = _meta_model(arch)
    body = expert.backbone if isinstance(getattr(expert, "backbone", None), nn.Module) else expert
    prefix = "backbone." if body is not expert else ""
    classifier = full.pretrained_cfg.get("classifier") or ()
    classifier = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    named = [(n, p) for n, p in body.named_parameters()
             if not (body is expert and any(n == c or n.startswith(c + ".") for c in classifier))]
    grouped = _coarse_groups(named, full)
    by_name = dict(named)
    return [[(prefix + n, by_name[n]) for n in grouped[k]] for k in sorted(grouped)]


def check_partial(arch: str, family: str, freeze: int, layer_decay: float | None, where: str) -> str | None:
    """Why ``freeze``/``layer_decay`` cannot apply to this expert, or None. (Used by the config check, before
    any training.)"""
    if not freeze and layer_decay is None:
        return None
    from inference.families import get as family_of

    why = family_of(family).finetune_check(freeze, layer_decay, where)
    if why:
        return why
    if layer_decay is not None and not 0 < layer_decay <= 1:
        return f"{where}.layer_decay: a factor in (0, 1], got {layer_decay}"
    if freeze < 0:
        return f"{where}.freeze: a number of layer groups >= 0, got {freeze}"
    full = _meta_model(arch)
    n = len(_coarse_groups(list(full.named_parameters()), full))
    if freeze >= n:  # the last group holds the classifier or the deepest stage: something must train
        return f"{where}.freeze: {arch} has {n} layer groups (stem first); freeze at most {n - 1}, got {freeze}"
    return None


def partial_param_groups(net: nn.Module, expert: nn.Module, arch: str, *, lr: float, weight_decay: float,
                         freeze: int, layer_decay: float | None) -> list[dict[str, Any]]:
    """Optimiser parameter groups for ``net`` (which holds ``expert`` as ``net.backbone``): the first ``freeze``
    layer groups get ``requires_grad = False`` and are left out; group i of n trains at
    ``lr * layer_decay ** (n - i)``, the head at ``lr``. Like timm's default, 1-D tensors (norms, biases) get no
    weight decay. Each group's ``lr`` is absolute, so any scheduler that scales initial rates keeps the ratios."""
    groups = layer_groups(expert, arch)
    in_groups = {id(p) for g in groups for _, p in g}
    head = [(n, p) for n, p in net.named_parameters() if id(p) not in in_groups]
    out: list[dict[str, Any]] = []

    def add(params: list[tuple[str, nn.Parameter]], rate: float) -> None:
        for decay in (True, False):
            chosen = [p for _, p in params if p.requires_grad and (p.ndim > 1) == decay]
            if chosen:
                out.append({"params": chosen, "lr": rate, "weight_decay": weight_decay if decay else 0.0})

    n = len(groups)
    for i, g in enumerate(groups):
        if i < freeze:
            for _, p in g:
                p.requires_grad_(False)
            continue
        add(g, lr * (layer_decay ** (n - i) if layer_decay is not None else 1.0))
    add(head, lr)
    return out


def frozen_norms(expert: nn.Module) -> list[nn.Module]:
    """Batch-norm layers whose parameters are all frozen: they must also keep their running statistics (put
    back in eval mode after every ``train()``), or a frozen stage would still drift with small batches."""
    norms = [m for m in expert.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine]
    return [m for m in norms if not (m.weight.requires_grad or m.bias.requires_grad)]
