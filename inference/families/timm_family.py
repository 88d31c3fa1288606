"""Family ``timm``: any timm model with a 2-class head; the file is exactly its state dict (the defaults of
:class:`inference.families.base.Family`)."""

from __future__ import annotations

from .base import Family, register


class TimmFamily(Family):
    name = "timm"


register(TimmFamily())
