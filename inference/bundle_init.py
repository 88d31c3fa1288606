"""Create an untrained bundle (seeded random weights): for smoke tests and as training's start."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import torch

from .bundle import BundleSpec, ExpertSpec, write_bundle
from .experts import arch_defaults, create_expert


def unique_names(archs: Sequence[str]) -> list[str]:
    """``convnext_atto``, or ``convnext_atto-0``, ``convnext_atto-1`` when an arch repeats."""
    counts = {a: archs.count(a) for a in archs}
    seen: dict[str, int] = {}
    names = []
    for a in archs:
        if counts[a] == 1:
            names.append(a)
        else:
            names.append(f"{a}-{seen.get(a, 0)}")
            seen[a] = seen.get(a, 0) + 1
    return names


def init_bundle(
    archs: Sequence[str],
    out: str | os.PathLike[str],
    *,
    input_size: int | None = None,
    preprocess: str = "squash",
    crops: int = 1,
    stem: str | None = None,
    seed: int = 0,
    name: str | None = None,
    overwrite: bool = False,
    provenance: dict[str, Any] | None = None,
    pretrained: str | None = None,
    patch: int | None = None,
) -> BundleSpec:
    """Write a bundle of randomly initialised experts (expert ``i`` seeded with ``seed + i``).
    ``patch``: every expert a patch expert (inference/families/patch.py), its backbone cut after that stage.
    ``stem`` makes every expert a residual one; ``crops`` is the crop count of ``tiles`` preprocessing;
    ``pretrained`` (inference.pretrained: ``pkg:NAME``, a file or a folder) gives every expert its ImageNet
    backbone, the 2-class head staying random."""
    if not archs:
        raise ValueError("give at least one architecture")
    experts, states = [], {}
    for i, (arch, ename) in enumerate(zip(archs, unique_names(list(archs)))):
        d = arch_defaults(arch, input_size)
        spec = ExpertSpec(name=ename, arch=arch, input_size=d["input_size"], mean=d["mean"],
                          std=d["std"], file=f"{ename}.safetensors", sha256="0" * 64,
                          preprocess=preprocess, model_kwargs=d["model_kwargs"],
                          family="patch" if patch is not None else "residual" if stem else "timm", stem=stem,
                          crops=crops if preprocess == "tiles" else 1,
                          stages=(int(patch),) if patch is not None else None)
        torch.manual_seed(seed + i)
        states[ename] = create_expert(spec, pretrained).state_dict()
        experts.append(spec)
    bundle = BundleSpec(
        name=name or Path(out).name,
        experts=tuple(experts),
        threshold=0.5,
        uncertain_band=(0.4, 0.6),
        threshold_rule="untrained bundle: fixed 0.5 with a ±0.1 uncertain band, not chosen on data",
        provenance=provenance or {"kind": "untrained", "seed": seed, "pretrained": pretrained,
                                  "note": "random weights from `dfx bundle init`; scores mean nothing"},
    )
    return write_bundle(out, bundle, states, overwrite=overwrite)
