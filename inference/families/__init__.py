"""Expert families as plug-ins: one module per family, one registry (as timm keeps one file per model family).

A family says, for an expert of its kind: which extra ``ensemble.json`` fields it takes and how they are
checked (:meth:`Family.parse`, torch-free, so reading a bundle imports no torch), which module's state dict
its weight file holds (:meth:`Family.create`), what scores images (:meth:`Family.scorer`: the stored module,
or a fixed stem in front of it), and how to load the file with plain timm (:attr:`Family.plain_timm`). A new
family is one new module here plus its tests; nothing else branches on a family's name.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from torch import nn

    from ..bundle import ExpertSpec


class Family(Protocol):
    name: str
    plain_timm: str  #: one line: how plain timm loads this family's weight file

    def parse(self, raw: dict[str, Any], where: str) -> dict[str, Any]:
        """The family's own fields of an ``ensemble.json`` expert (validated); raises BundleError."""

    def create(self, spec: "ExpertSpec") -> "nn.Module":
        """A freshly initialised module whose state dict the expert's file holds (seed torch first)."""

    def scorer(self, spec: "ExpertSpec", model: "nn.Module") -> "nn.Module":
        """What scores a preprocessed batch: ``model`` itself, or ``model`` behind a fixed stem."""


REGISTRY: dict[str, Family] = {}


def register(family: Family) -> Family:
    REGISTRY[family.name] = family
    return family


def get(name: str) -> Family:
    from ..bundle import BundleError

    if name not in REGISTRY:
        raise BundleError(f"unknown expert family '{name}' (this version knows {', '.join(REGISTRY)})")
    return REGISTRY[name]


from . import patch, probe, residual, timm_family  # noqa: E402,F401  (each registers itself)
