"""Test-time augmentation: score each expert's input under extra views and average the probabilities.

A bundle's ``tta`` (``ensemble.json``) lists the views added to the image as it is, e.g. ``["hflip"]`` or
the six views of the competition's 3rd-place team ``["hflip", "vflip", "rot90", "rot180", "rot270"]``.
Views act on each expert's preprocessed input (the squashed or cropped image, or every crop of a tiled
expert), so they cost no extra decoding or resizing: one forward of (views + 1) × the batch. Flips and
right-angle rotations move no pixel values, so the traces a generator leaves survive them; what TTA buys
is measured, not assumed (``dfx evaluate --tta``, the model card).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Iterable

if TYPE_CHECKING:  # torch-free at import: bundle parsing reads VIEWS
    import torch

#: view name → what it does to a ``(..., H, W)`` tensor (inputs are square, so rotations keep the shape).
VIEWS: dict[str, Callable[[Any], Any]] = {
    "hflip": lambda x: x.flip(-1),
    "vflip": lambda x: x.flip(-2),
    "rot90": lambda x: x.rot90(1, (-2, -1)),
    "rot180": lambda x: x.rot90(2, (-2, -1)),
    "rot270": lambda x: x.rot90(3, (-2, -1)),
}
#: What ``all`` means on the command line: every view above (6 views with the image itself).
ALL_VIEWS: tuple[str, ...] = tuple(VIEWS)


def parse_views(text: str | Iterable[str] | None) -> tuple[str, ...]:
    """``"hflip,vflip"`` / a list → validated, de-duplicated views in the given order; ``none`` or an empty
    value → no TTA; ``all`` → every view. Raises ValueError naming the valid views."""
    if text is None:
        return ()
    items = [t.strip() for t in (text.split(",") if isinstance(text, str) else text)]
    items = [t for t in items if t]
    if items in ([], ["none"]):
        return ()
    if items == ["all"]:
        return ALL_VIEWS
    bad = [t for t in items if t not in VIEWS]
    if bad:
        raise ValueError(f"unknown TTA view '{bad[0]}' (valid: {', '.join(VIEWS)}, or all / none)")
    return tuple(dict.fromkeys(items))


def with_views(x: torch.Tensor, views: Iterable[str]) -> torch.Tensor:
    """``x`` followed by each view of it, concatenated on the batch axis: ``(V+1)·N`` items."""
    import torch

    return torch.cat([x] + [VIEWS[v](x) for v in views])
