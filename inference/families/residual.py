"""Family ``residual``: a fixed, parameter-free stem (inference/families/residual_stem.py) before a timm model.
The file is still exactly the timm state dict; ``stem`` in ``ensemble.json`` says which residual to compute first."""

from __future__ import annotations

from typing import Any

from ..errors import BundleError
from .base import Family, no_extra_fields, reads, register

STEMS = ("npr", "srm")  # residual_stem.STEMS (kept here so reading a bundle imports no torch)


class ResidualFamily(Family):
    name = "residual"
    plain_timm = ("timm.create_model(arch, num_classes=2, **model_kwargs).load_state_dict(file, strict=True); "
                  "apply inference.families.residual_stem.ResidualStem(stem) to the input first")
    fields = ("stem",)

    def parse(self, raw: dict[str, Any], where: str) -> dict[str, Any]:
        no_extra_fields(raw, where, self)
        stem = raw.get("stem")
        if stem not in STEMS:
            raise BundleError(f"{where}.stem: a residual expert needs stem {' or '.join(STEMS)}, got {stem!r}")
        return {"stem": stem}

    def stem(self, spec: Any) -> Any:
        from .residual_stem import ResidualStem

        return ResidualStem(str(spec.stem))

    def describe(self, spec: Any) -> str:
        return f"{spec.stem}+{spec.arch}"

    def summary(self, spec: Any) -> str:
        what = {"npr": "up-sampling traces (NPR residual)", "srm": "noise residuals (SRM high-pass filters)"}
        return f"{what.get(spec.stem, spec.stem)} of {reads(spec)}: {spec.arch}"


register(ResidualFamily())
