"""Family ``timm``: any timm model with a 2-class head; the file is exactly its state dict."""

from __future__ import annotations

from typing import Any

from . import register


def create_timm(spec: Any) -> Any:
    import timm

    from ..bundle import BundleError

    if not timm.is_model(spec.arch):
        raise BundleError(f"expert '{spec.name}': unknown timm architecture '{spec.arch}'")
    try:
        return timm.create_model(spec.arch, pretrained=False, num_classes=2, **spec.model_kwargs)
    except TypeError as exc:
        raise BundleError(f"expert '{spec.name}': bad model_kwargs {spec.model_kwargs} for '{spec.arch}' ({exc})") from exc


def no_extra_fields(raw: dict[str, Any], where: str, family: str, allowed: tuple[str, ...] = ()) -> None:
    from ..bundle import BundleError

    owners = {"stem": "residual", "stages": "probe or patch"}
    for key, owner in owners.items():
        if key not in allowed and raw.get(key) is not None:
            raise BundleError(f"{where}: {key} {raw[key]!r} is only meaningful for family '{owner}' "
                              f"(this expert is '{family}')")


class TimmFamily:
    name = "timm"
    plain_timm = "timm.create_model(arch, num_classes=2, **model_kwargs).load_state_dict(file, strict=True)"

    def parse(self, raw: dict[str, Any], where: str) -> dict[str, Any]:
        no_extra_fields(raw, where, self.name)
        return {}

    def create(self, spec: Any) -> Any:
        return create_timm(spec)

    def scorer(self, spec: Any, model: Any) -> Any:
        return model


register(TimmFamily())
