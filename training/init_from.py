"""Fine-tuning from a bundle: an expert of a new run starts from an expert of an existing bundle.

New generators appear every month; the cheapest way to keep a detector current is to start from the
deployed bundle and train on the new month's labelled images (with a replay of the old data against
forgetting, ``data.replay``). ``experts.N.init_from: BUNDLE[:EXPERT]`` (or ``dfx train --init-from BUNDLE``
for every expert, matched by name) loads that expert's weights exactly: checksums are verified, the family
and architecture must match (refused naming both), and the parent's identity goes into the new bundle's
provenance.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from inference.bundle import BundleError, BundleSpec, ExpertSpec, bundle_digest, check_files, read_spec

from .config import ConfigError, ExpertConfig, expert_name


@dataclass(frozen=True)
class Parent:
    """The bundle expert a training expert starts from."""

    bundle_dir: Path
    spec: BundleSpec
    expert: ExpertSpec

    @property
    def model_id(self) -> str:
        return f"{self.spec.name}@{bundle_digest(self.spec)}"

    def provenance(self) -> dict[str, Any]:
        return {"bundle": str(self.bundle_dir), "model": self.model_id, "expert": self.expert.name,
                "sha256": self.expert.sha256}


def split_ref(ref: str) -> tuple[str, str | None]:
    """``BUNDLE[:EXPERT]`` → (bundle folder, expert name or None). A path that exists as written is a bundle,
    so folders with a colon in their name still work."""
    if Path(ref).exists() or ":" not in ref:
        return ref, None
    folder, _, expert = ref.rpartition(":")
    return folder, expert or None


def resolve_parent(e: ExpertConfig, index: int) -> Parent | None:
    """The parent of expert ``index`` (None without ``init_from``). Raises ConfigError when the bundle is
    unreadable, has no such expert, or holds an expert of another family or architecture."""
    if not e.init_from:
        return None
    folder, wanted = split_ref(e.init_from)
    where = f"experts.{index}.init_from"
    try:
        spec = read_spec(folder)
        check_files(folder, spec)
    except BundleError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    name = wanted or expert_name(e)
    parent = next((x for x in spec.experts if x.name == name), None)
    if parent is None:
        raise ConfigError(f"{where}: bundle {folder} has no expert '{name}' (it has: "
                          f"{', '.join(x.name for x in spec.experts)}); name one with init_from: {folder}:EXPERT")
    mine = f"{e.family} expert '{expert_name(e)}' ({e.arch}{', stem ' + e.stem if e.stem else ''}"\
           f"{', stages ' + str(list(e.stages)) if e.stages else ''})"
    theirs = f"{parent.family} expert '{parent.name}' ({parent.arch}{', stem ' + parent.stem if parent.stem else ''}"\
             f"{', stages ' + str(list(parent.stages)) if parent.stages else ''})"
    same = (parent.family == e.family and parent.arch == e.arch and (parent.stem or None) == (e.stem or None)
            and (tuple(parent.stages) if parent.stages else None) == (tuple(e.stages) if e.stages else None))
    if not same:
        raise ConfigError(f"{where}: cannot start the {mine} from the {theirs} of {folder}: family and architecture "
                          "must match")
    return Parent(Path(folder), spec, parent)


def load_parent_weights(model: torch.nn.Module, parent: Parent) -> torch.nn.Module:
    """Load the parent's weights into ``model`` (the module its weight file is the state dict of), strictly."""
    from safetensors.torch import load_file

    from inference.families import get as family_of

    path = parent.bundle_dir / parent.expert.file
    # plus what another file of the bundle holds for it (a shared probe_onnx graph)
    state = {**load_file(str(path), device="cpu"), **family_of(parent.expert.family).shared_state(parent.expert,
                                                                                                  parent.bundle_dir)}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = " ".join(str(exc).strip().splitlines()[:3])[:400]
        raise ConfigError(f"init_from {parent.bundle_dir}:{parent.expert.name}: its weights do not fit this expert "
                          f"(input size or model options differ?): {first}") from None
    return model
