"""What a file says about its own origin, read beside the pixels and never fed to the experts.

:func:`read_provenance` reads an image file's C2PA content credentials (``c2pa_read``), IPTC digital source types
in XMP and the records generator tools and editors leave (``records``), found by walking the container without
decoding pixels (``containers``), and sums them up as a :class:`Provenance`: the strongest class the file
declares (``ai_generated``, ``ai_edited``, ``edited``, ``captured`` or ``none``), the evidence for it, and whether a
C2PA manifest is there, valid, and signed by a signer the operator trusts.

The label stays the model's (metadata is trivially stripped or forged) unless the operator's rule says otherwise:
:data:`RULES` and :func:`decides_label`. Reading never fails a request: a bound reached or a library error is a
note in ``unreadable``, and no network call is ever made.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .containers import read_blocks
from .records import CLASSES, Fact, exif_facts, text_facts, xmp_facts

log = logging.getLogger(__name__)

MAX_FILE_BYTES = 64 << 20   #: files up to this size are read whole (C2PA hashes the whole file); larger: the head
HEAD_BYTES = 4 << 20        #: what is read of a larger file (its metadata comes before the pixels)
RULES = ("none", "trusted_c2pa")  #: provenance rules: the label is the model's / a trusted C2PA AI claim decides it


@dataclass
class Provenance:
    """One file's evidence about itself."""

    declared: str = "none"                       #: the strongest class any evidence declares (records.CLASSES)
    declared_by: str | None = None               #: the source of that declaration ("C2PA manifest", "XMP (IPTC)"…)
    evidence: list[Fact] = field(default_factory=list)
    signed: bool = False                         #: a C2PA manifest is embedded
    valid: bool | None = None                    #: its signature and hashes hold (None: no manifest)
    trusted: bool = False                        #: its signer chains to an anchor the operator trusts
    c2pa: dict[str, Any] | None = None           #: the manifest's summary (c2pa_read.C2paSummary.to_json)
    unreadable: list[str] = field(default_factory=list)  #: what could not be read, and why

    def to_json(self) -> dict[str, Any]:
        return {"declared": self.declared, "declared_by": self.declared_by,
                "evidence": [f.to_json() for f in self.evidence], "signed": self.signed, "valid": self.valid,
                "trusted": self.trusted, "c2pa": self.c2pa, "unreadable": self.unreadable}

    def summary(self) -> str:
        """The evidence as one line (a CSV cell): each fact and where it was read."""
        return summary_of(self.to_json())


def summary_of(prov: dict[str, Any]) -> str:
    """:meth:`Provenance.summary` of its JSON form (what a prediction carries)."""
    parts = [f"{f['fact']} [{f['source']}]" for f in prov.get("evidence", [])]
    return "; ".join(parts + [f"unreadable: {u}" for u in prov.get("unreadable", [])])


def decides_label(rule: str, prov: "Provenance | None") -> bool:
    """Whether ``rule`` lets this evidence decide the label (fake): only ``trusted_c2pa``, and only a valid C2PA
    manifest whose signer the operator trusts declaring AI generation or an AI edit."""
    return (rule == "trusted_c2pa" and prov is not None and prov.declared_by == "C2PA manifest"
            and bool(prov.valid) and prov.trusted and prov.declared in ("ai_generated", "ai_edited"))


def load_anchors(path: str | os.PathLike[str] | None) -> str | None:
    """The operator's trust anchors: a PEM file of certificates (the C2PA trust list format). Raises
    ValueError when the file holds no certificate."""
    if not path:
        return None
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    if "-----BEGIN CERTIFICATE-----" not in text:
        raise ValueError(f"{path}: no PEM certificate found (trust anchors are a PEM file of CA certificates)")
    return text


class ProvenanceReader:
    """Reads files' evidence with one trust configuration (picklable: DataLoader workers get their own)."""

    def __init__(self, anchors: str | None = None) -> None:
        self.anchors = anchors

    def read(self, src: bytes | str | os.PathLike[str]) -> Provenance:
        """The evidence of a file (its bytes or its path). Never raises for what the file holds."""
        try:
            data, truncated = ((bytes(src), False) if isinstance(src, (bytes, bytearray, memoryview))
                               else _read_file(Path(src)))
        except OSError as exc:
            return Provenance(unreadable=[f"the file could not be read ({exc.strerror or exc})"])
        try:
            return read_provenance(data, anchors=self.anchors, truncated=truncated)
        except Exception as exc:  # noqa: BLE001 - evidence is never worth a failed request
            log.exception("reading provenance failed")
            return Provenance(unreadable=[f"the evidence could not be read ({type(exc).__name__})"])


def _read_file(path: Path) -> tuple[bytes, bool]:
    """The file (whole up to :data:`MAX_FILE_BYTES`, else its first :data:`HEAD_BYTES`), and whether it was cut."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size <= MAX_FILE_BYTES:
            return f.read(MAX_FILE_BYTES), False
        return f.read(HEAD_BYTES), True


def read_provenance(data: bytes, *, anchors: str | None = None, truncated: bool = False) -> Provenance:
    """Everything ``data`` (a whole image file) says about its origin. ``anchors``: PEM trust anchors;
    ``truncated``: ``data`` is only the head of a larger file (C2PA is then not validated)."""
    from .c2pa_read import read_c2pa

    blocks = read_blocks(data)
    prov = Provenance(unreadable=list(blocks.skipped))
    facts: list[Fact] = []
    if blocks.c2pa or (blocks.format is None and b"c2pa" in data):
        if truncated:
            prov.unreadable.append(f"a C2PA manifest is there but the file is over {MAX_FILE_BYTES >> 20} MB: "
                                   "not validated")
        else:
            try:
                summary = read_c2pa(data, blocks.format, anchors)
            except Exception as exc:  # noqa: BLE001 - c2pa's errors: a manifest that cannot be read
                prov.signed = True
                prov.valid = False
                prov.unreadable.append(f"a C2PA manifest is there but could not be read ({_c2pa_error(exc)})")
            else:
                if summary is not None:
                    prov.signed, prov.valid, prov.trusted = True, summary.valid, summary.trusted
                    prov.c2pa = summary.to_json()
                    facts.extend(summary.facts)
                elif blocks.c2pa:  # a C2PA block the library finds no manifest in: damaged, or a decoy
                    prov.signed, prov.valid = True, False
                    prov.unreadable.append("a C2PA block is there but holds no manifest that can be read")
    for xmp in blocks.xmp:
        facts.extend(xmp_facts(xmp))
    for raw in blocks.exif:
        facts.extend(exif_facts(raw))
    for key, value in blocks.text:
        facts.extend(text_facts(key, value))
    facts = list(dict.fromkeys(facts))
    prov.evidence = facts
    ranked = [f for f in facts if f.declares != "none"]
    if ranked:
        # the strongest class; between equals, signed evidence first
        best = min(ranked, key=lambda f: (CLASSES.index(f.declares), not f.signed))
        prov.declared, prov.declared_by = best.declares, best.source
    return prov


def _c2pa_error(exc: Exception) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:160]
