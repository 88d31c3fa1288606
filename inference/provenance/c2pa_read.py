"""C2PA content credentials, read and validated offline with ``c2pa-python`` (the Content Authenticity
Initiative's bindings): who signed, whether the signature and the hashes hold, whether the signer chains to an
anchor the operator trusts, what the actions declare, and what the ingredients were.

Never a network call: remote manifests and OCSP are off. Trust anchors are only what the operator gives
(a PEM file in the C2PA trust list format); with none, no signer is trusted.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass, field
from typing import Any

from .records import Fact, source_type_class

#: validation codes that are about trust, not integrity: reported, never called a failure
TRUST_CODES = {"signingCredential.untrusted"}
#: C2PA actions that change content (an ``edited`` file when nothing declares more)
EDIT_ACTIONS = {"c2pa.edited", "c2pa.color_adjustments", "c2pa.cropped", "c2pa.filtered", "c2pa.resized",
                "c2pa.drawing", "c2pa.orientation", "c2pa.placed", "c2pa.removed", "c2pa.transcoded",
                "c2pa.converted", "c2pa.repackaged", "c2pa.edited.metadata"}


@dataclass
class C2paSummary:
    """What an embedded C2PA manifest store says, for people and for the label rule."""

    state: str                      #: Trusted, Valid or Invalid (c2pa-rs's validation state)
    claim_generator: str
    signer: str                     #: certificate common name and issuer
    signed_at: str | None
    failures: list[str]             #: validation codes that are failures (integrity), with their explanation
    actions: list[dict[str, Any]]
    ingredients: list[dict[str, Any]]
    facts: list[Fact] = field(default_factory=list)

    @property
    def valid(self) -> bool:
        return self.state in ("Valid", "Trusted")

    @property
    def trusted(self) -> bool:
        return self.state == "Trusted"

    def to_json(self) -> dict[str, Any]:
        return {"validation_state": self.state, "claim_generator": self.claim_generator, "signer": self.signer,
                "signed_at": self.signed_at, "failures": self.failures, "actions": self.actions,
                "ingredients": self.ingredients}


class C2paUnavailable(RuntimeError):
    """c2pa-python is not installed."""


_LOCAL = threading.local()


def _context(anchors: str | None) -> Any:
    """One c2pa Context per thread, process and trust configuration (a Context made before a fork is not the
    child's)."""
    import c2pa

    key = (os.getpid(), anchors)
    cache = getattr(_LOCAL, "contexts", None)
    if cache is None:
        cache = _LOCAL.contexts = {}
    if key not in cache:
        settings: dict[str, Any] = {"verify": {"remote_manifest_fetch": False, "ocsp_fetch": False,
                                               "verify_trust": True}}
        if anchors:
            settings["trust"] = {"trust_anchors": anchors}
        cache[key] = c2pa.Context(c2pa.Settings.from_dict(settings))
    return cache[key]


MIME = {"jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp"}


def read_c2pa(data: bytes, fmt: str | None, anchors: str | None) -> C2paSummary | None:
    """The manifest store embedded in ``data``, or None when there is none. Raises ``c2pa.C2paError`` (or
    ValueError) when one is there but cannot be read."""
    try:
        import c2pa
    except ImportError as exc:  # pragma: no cover - a core dependency; kept for a stripped-down install
        raise C2paUnavailable("c2pa-python is not installed") from exc
    import io

    try:
        reader = c2pa.Reader(MIME.get(fmt or "", None), io.BytesIO(data), context=_context(anchors))
    except c2pa.C2paError as exc:
        if type(exc).__name__.endswith("ManifestNotFound") or "ManifestNotFound" in str(exc):
            return None
        raise
    with reader:
        store = json.loads(reader.json())
    return summarise(store)


def _agent(value: Any) -> str:
    if isinstance(value, dict):
        return str(value.get("name", ""))
    return str(value or "")


def _actions(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for assertion in manifest.get("assertions", []):
        if str(assertion.get("label", "")).startswith("c2pa.actions"):
            for a in (assertion.get("data") or {}).get("actions", []) or []:
                if isinstance(a, dict):
                    out.append({"action": str(a.get("action", "")),
                                "digital_source_type": str(a.get("digitalSourceType", "")) or None,
                                "software_agent": _agent(a.get("softwareAgent")) or None})
    return out


def _declares(actions: list[dict[str, Any]]) -> tuple[str, str] | None:
    """The strongest class the actions declare: a digital source type first; else an edit action."""
    from .records import CLASSES

    found = [c for a in actions if a["digital_source_type"] and (c := source_type_class(a["digital_source_type"]))]
    if found:
        cls, name = min(found, key=lambda c: CLASSES.index(c[0]))
        return cls, f"digital source type {name}"
    edits = [a["action"] for a in actions if a["action"] in EDIT_ACTIONS]
    if edits:
        return "edited", "actions " + ", ".join(dict.fromkeys(edits))
    return None


def summarise(store: dict[str, Any]) -> C2paSummary:
    """A :class:`C2paSummary` of c2pa-python's JSON (``Reader.json()``)."""
    manifests = store.get("manifests") or {}
    active = manifests.get(store.get("active_manifest") or "", {})
    sig = active.get("signature_info") or {}
    signer = " / ".join(v for v in (str(sig.get("common_name", "")), str(sig.get("issuer", ""))) if v) or "unknown"
    generator = active.get("claim_generator") or ", ".join(
        f"{g.get('name', '')} {g.get('version', '')}".strip() for g in active.get("claim_generator_info", [])
        if isinstance(g, dict)) or "unknown"
    status = store.get("validation_status") or []
    failures = [f"{s.get('code')}: {s.get('explanation', '')}".strip() for s in status
                if isinstance(s, dict) and s.get("code") not in TRUST_CODES]
    state = str(store.get("validation_state") or ("Invalid" if failures else "Valid"))
    actions = _actions(active)
    ingredients = []
    for ing in active.get("ingredients", []) or []:
        child = manifests.get(ing.get("active_manifest") or "", {})
        child_decl = _declares(_actions(child)) if child else None
        ingredients.append({"title": str(ing.get("title", "")), "relationship": str(ing.get("relationship", "")),
                            "declares": child_decl[0] if child_decl else None})
    summary = C2paSummary(state, str(generator), signer, sig.get("time"), failures, actions, ingredients)
    trust = ("trusted signer" if summary.trusted else "signer not on the operator's trust list" if summary.valid
             else "trust not established")
    validity = "valid" if summary.valid else "INVALID (" + "; ".join(f.split(":")[0] for f in failures[:3]) + ")"
    head = f"signed by {signer} ({trust}), {validity}, made with {summary.claim_generator}"
    decl = _declares(actions)
    ai_parent = any((i["declares"] or "").startswith("ai_") for i in ingredients)
    if decl is None and ai_parent:
        decl = ("ai_edited", "an ingredient declared as AI-generated")
    elif decl is not None and decl[0] in ("edited", "captured") and ai_parent:
        decl = ("ai_edited", f"{decl[1]} of an ingredient declared as AI-generated")
    summary.facts.append(Fact(decl[0] if decl else "none",
                              f"C2PA manifest {head}" + (f": {decl[1]}" if decl else ""),
                              "C2PA manifest", signed=True))
    return summary
