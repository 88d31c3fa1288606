"""What a bundle may show the world: its provenance with every path cut to its last part (``GET /model``)."""

from __future__ import annotations

from pathlib import Path, PureWindowsPath
from typing import Any


def _looks_like_path(text: str) -> bool:
    """One token holding a folder separator (``runs/m.csv``, ``../shared/data/dev``, ``C:\\data``): a path. Text
    with spaces (a sentence naming a script) and URLs are not."""
    return ("/" in text or "\\" in text) and "://" not in text and not any(c.isspace() for c in text)


def _strip_paths(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip_paths(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_strip_paths(v) for v in value]
    if isinstance(value, str) and _looks_like_path(value):
        return PureWindowsPath(value).name if "\\" in value else Path(value).name
    return value


def public_provenance(provenance: dict[str, Any]) -> dict[str, Any]:
    """A bundle's provenance as the API publishes it: where it was trained (``run_dir``, the run's output
    folder) is dropped and every value that is a path (manifests, data folders, replay and init-from
    bundles, pretrained weights), absolute or relative, is cut to its last part, so the exporter's file
    system is not shown to the world. Hashes, metrics and ``pkg:`` names stay."""
    out = dict(provenance)
    out.pop("run_dir", None)
    config = out.get("config")
    if isinstance(config, dict):
        out["config"] = {k: v for k, v in config.items() if k != "output"}
    return _strip_paths(out)
