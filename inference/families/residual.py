"""Family ``residual``: a fixed, parameter-free stem (inference/residual.py) before a timm model. The file is
still exactly the timm state dict; ``stem`` in ``ensemble.json`` says which residual to compute first."""

from __future__ import annotations

from typing import Any

from . import register
from .timm_family import create_timm, no_extra_fields

STEMS = ("npr", "srm")  # inference.residual.STEMS (kept here so reading a bundle imports no torch)


class ResidualFamily:
    name = "residual"
    plain_timm = ("timm.create_model(arch, num_classes=2, **model_kwargs).load_state_dict(file, strict=True); "
                  "apply inference.residual.ResidualStem(stem) to the input first")

    def parse(self, raw: dict[str, Any], where: str) -> dict[str, Any]:
        from ..bundle import BundleError

        no_extra_fields(raw, where, self.name, allowed=("stem",))
        stem = raw.get("stem")
        if stem not in STEMS:
            raise BundleError(f"{where}: a residual expert needs stem {' or '.join(STEMS)}, got {stem!r}")
        return {"stem": stem}

    def create(self, spec: Any) -> Any:
        return create_timm(spec)

    def scorer(self, spec: Any, model: Any) -> Any:
        from ..residual import ResidualNet, ResidualStem

        return ResidualNet(ResidualStem(str(spec.stem)), model)


register(ResidualFamily())
