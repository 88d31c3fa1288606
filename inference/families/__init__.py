"""Expert families as plug-ins: one module per family, one registry (as timm keeps one file per model family).

A family owns everything about an expert of its kind, so shared code never branches on a family's name:

- its ``ensemble.json`` fields (:attr:`Family.fields`, checked by :meth:`Family.parse`, torch-free, so reading a
  bundle imports no torch) and the oldest bundle format that holds such an expert (:meth:`Family.format_minor`);
- the module its weight file holds (:meth:`Family.create`), with pretrained weights (:meth:`Family.load_pretrained`)
  and the form the file stores them in (:meth:`Family.file_state`);
- what scores images (:meth:`Family.stem` in front of the stored module, if any) and what training reads
  (:attr:`Family.trains_on_masks`, :meth:`Family.outputs`: logits, pooled feature and patch logits in one pass);
- whether and how it draws a map (:meth:`Family.map_probs`), how it is named in tables (:meth:`Family.describe`),
  and what fine-tuning it allows (:meth:`Family.finetune_check`);
- how plain timm loads its file (:attr:`Family.plain_timm`).

A new family is one new module that subclasses :class:`Family` and calls :func:`register`; nothing else changes
(``tests/test_families.py`` adds one in a test and trains, exports, loads and scores it).
"""

from __future__ import annotations

from . import patch, probe, probe_onnx, residual, timm_family  # noqa: F401  (each registers itself)
from .base import REGISTRY, Family, get, no_extra_fields, register

__all__ = ["REGISTRY", "Family", "get", "no_extra_fields", "register"]
