"""What unsigned metadata says about an image's origin: IPTC digital source types in XMP, the generation records
that generator tools leave (Stable Diffusion web UIs' ``parameters``, ComfyUI's ``prompt``/``workflow``, InvokeAI,
Fooocus, SwarmUI, NovelAI, Midjourney), and EXIF fields that name a generator, an editor or a camera.

Each finding is a :class:`Fact`: a class (see :data:`CLASSES`), one human-readable sentence and where it was read.
None of this is signed: anyone can write or remove it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

#: what a file can declare about itself, strongest first (inference/provenance/__init__.py combines them)
CLASSES = ("ai_generated", "ai_edited", "edited", "captured", "none")

IPTC_PREFIX = "http://cv.iptc.org/newscodes/digitalsourcetype/"
#: IPTC NewsCodes digital source types (https://cv.iptc.org/newscodes/digitalsourcetype/) → class
SOURCE_TYPES = {
    "trainedAlgorithmicMedia": "ai_generated",        # made by a model trained on samples (generative AI)
    "algorithmicMedia": "ai_generated",               # made purely by an algorithm, not from samples
    "compositeWithTrainedAlgorithmicMedia": "ai_edited",  # a capture with AI-generated parts (inpainting, fill)
    "compositeSynthetic": "ai_edited",                # a composite with synthetic elements
    "algorithmicallyEnhanced": "edited",              # minor corrections by an algorithm (denoise, sharpen)
    "digitalCreation": "edited", "digitalArt": "edited",  # made by people with software
    "compositeCapture": "edited", "composite": "edited", "minorHumanEdits": "edited", "humanEdits": "edited",
    "dataDrivenMedia": "edited", "virtualRecording": "edited",
    "digitalCapture": "captured", "computationalCapture": "captured", "negativeFilm": "captured",
    "positiveFilm": "captured", "print": "captured", "screenCapture": "captured",
}

GENERATORS = re.compile(
    r"\b(midjourney|dall[-·‧ ]?e(?: ?[23])?|adobe firefly|firefly|stable[ -]?diffusion|sdxl|novelai|comfyui|"
    r"automatic1111|invokeai|fooocus|swarmui|imagen|ideogram|leonardo\.ai|bing image creator|"
    r"image creator from microsoft|dreamstudio|nightcafe|craiyon|draw things|diffusionbee|flux\.1|"
    r"gpt-4o|chatgpt|kandinsky|playground ?v[23])\b", re.IGNORECASE)
EDITORS = re.compile(r"\b(photoshop|gimp|lightroom|affinity photo|pixelmator|snapseed|picsart|facetune|"
                     r"paint\.net|capture one|darktable|rawtherapee|luminar|faceapp)\b", re.IGNORECASE)
#: PNG text keys that only generator tools write
GENERATOR_KEYS = {"invokeai_metadata": "InvokeAI", "sd-metadata": "InvokeAI", "dream": "InvokeAI",
                  "fooocus_scheme": "Fooocus", "sui_image_params": "SwarmUI", "generation_data": "a generation "
                  "service (Civitai/Tensor.Art)"}


@dataclass(frozen=True)
class Fact:
    """One thing a file says about its origin."""

    declares: str   #: one of :data:`CLASSES`
    text: str       #: for people: what was found
    source: str     #: where: "C2PA manifest", "XMP", "PNG text 'parameters'", "EXIF Software", ...
    signed: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"declares": self.declares, "fact": self.text, "source": self.source, "signed": self.signed}


def _short(value: str, n: int = 120) -> str:
    value = " ".join(value.split())
    return value if len(value) <= n else value[:n - 1] + "…"


def source_type_class(value: str) -> tuple[str, str] | None:
    """(class, IPTC name) of a digital source type URI or bare name; None when not an IPTC code."""
    name = value.rsplit("/", 1)[-1].strip()
    return (SOURCE_TYPES[name], name) if name in SOURCE_TYPES else None


XMP_SOURCE_TYPE = re.compile(r"DigitalSourceType(?:\s*=\s*[\"']|>\s*)([^\"'<\s]+)", re.IGNORECASE)
XMP_CREATOR_TOOL = re.compile(r"CreatorTool(?:\s*=\s*[\"']|>\s*)([^\"'<]+)", re.IGNORECASE)


def xmp_facts(xmp: str) -> list[Fact]:
    facts = []
    for value in dict.fromkeys(XMP_SOURCE_TYPE.findall(xmp)):
        found = source_type_class(value)
        if found:
            facts.append(Fact(found[0], f"IPTC digital source type: {found[1]}", "XMP (IPTC)"))
    for tool in dict.fromkeys(XMP_CREATOR_TOOL.findall(xmp)):
        facts.extend(_software_facts(tool, "XMP CreatorTool"))
    return facts


def _software_facts(value: str, source: str) -> list[Fact]:
    if (m := GENERATORS.search(value)) is not None:
        return [Fact("ai_generated", f"names a generator: {m.group(0)} ({_short(value, 60)})", source)]
    if (m := EDITORS.search(value)) is not None:
        return [Fact("edited", f"names an editor: {_short(value, 60)}", source)]
    return []


A1111_FIELD = re.compile(r"\b(Steps|Sampler|Model|Size|Seed|CFG scale): ([^,\n]+)")


def _a1111(value: str) -> str | None:
    """A short summary of Stable Diffusion web UI (A1111, Forge, Fooocus) generation settings, or None."""
    fields = dict(A1111_FIELD.findall(value))
    if "Steps" not in fields or not ({"Sampler", "Seed", "CFG scale"} & set(fields)):
        return None
    return ", ".join(f"{k} {_short(v, 40)}" for k, v in fields.items() if k in ("Model", "Sampler", "Steps", "Size"))


def _comfy(value: str) -> bool:
    try:
        data = json.loads(value)
    except ValueError:
        return False
    if isinstance(data, dict) and isinstance(data.get("nodes"), list):
        return True  # a workflow
    return isinstance(data, dict) and any(isinstance(v, dict) and "class_type" in v for v in data.values())


def text_facts(key: str, value: str, where: str | None = None) -> list[Fact]:
    """Facts from one text record (a PNG text chunk, a JPEG comment, an EXIF text field); ``where``: its source as
    people read it (default: the PNG text chunk ``key``)."""
    where = where or (key if key == "JPEG comment" else f"PNG text '{_short(key, 40)}'")
    low = key.lower()
    if low in GENERATOR_KEYS:
        return [Fact("ai_generated", f"generation record of {GENERATOR_KEYS[low]}", where)]
    if low in ("prompt", "workflow") and _comfy(value):
        return [Fact("ai_generated", f"ComfyUI {low} (a generation graph)", where)]
    if (summary := _a1111(value)) is not None:
        return [Fact("ai_generated", f"Stable Diffusion web UI generation settings ({summary})", where)]
    if low == "comment" and value.lstrip().startswith("{"):
        try:
            data = json.loads(value)
        except ValueError:
            data = None
        if isinstance(data, dict) and {"steps", "sampler"} <= set(data):
            return [Fact("ai_generated", "generation settings (NovelAI-style comment)", where)]
    if "Job ID:" in value and re.search(r"midjourney|--v \d|--ar \d", value, re.IGNORECASE):
        return [Fact("ai_generated", "a Midjourney job record", where)]
    if low in ("software", "source", "author", "description", "title", "comment", "jpeg comment", "creator"):
        return _software_facts(value, where)
    return []


def _user_comment(raw: Any) -> str:
    """EXIF UserComment: 8 bytes naming the charset, then the text (A1111 writes its settings here in JPEG)."""
    if isinstance(raw, str):
        return raw
    if not isinstance(raw, (bytes, bytearray)):
        return ""
    head, body = bytes(raw[:8]), bytes(raw[8:8 + (256 << 10)])
    if head.startswith(b"UNICODE"):
        for enc in ("utf-16-be", "utf-16-le"):
            text = body.decode(enc, "replace")
            if "Steps" in text or text.isprintable():
                return text
        return body.decode("utf-16-be", "replace")
    return body.decode("utf-8", "replace")


def exif_facts(raw: bytes) -> list[Fact]:
    """Facts from raw EXIF: Software, ImageDescription, Artist and UserComment naming a generator or carrying
    generation settings; Software naming an editor; Make and Model naming a camera."""
    from PIL import Image

    exif = Image.Exif()
    try:
        exif.load(raw)
        sub = exif.get_ifd(0x8769)
    except Exception:  # noqa: BLE001 - hostile EXIF: nothing read from it
        return [Fact("none", "EXIF present but unreadable", "EXIF")]
    facts: list[Fact] = []
    for tag, name in ((0x0131, "Software"), (0x010E, "ImageDescription"), (0x013B, "Artist")):
        value = exif.get(tag)
        if isinstance(value, str) and value.strip():
            facts.extend(text_facts(name, value, f"EXIF {name}") if tag != 0x0131
                         else _software_facts(value, "EXIF Software"))
    comment = _user_comment(sub.get(0x9286))
    if comment.strip():
        facts.extend(text_facts("comment", comment, "EXIF UserComment"))
    make, model = str(exif.get(0x010F, "") or "").strip(), str(exif.get(0x0110, "") or "").strip()
    if (make or model) and not any(f.declares.startswith("ai") for f in facts):
        camera = _short(" ".join(dict.fromkeys(v for v in (make, model) if v)), 60)
        facts.append(Fact("captured", f"names a camera: {camera}", "EXIF Make/Model"))
    return facts
