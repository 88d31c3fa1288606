"""Linear probes on frozen pretrained features: extract once, fit a logistic regression, export a bundle.

The fast way to a ``probe`` expert (inference/families/probe.py): the backbone is frozen, so its pooled
stage features are computed once per image (per crop, for tiled preprocessing) and a regularised logistic
regression is fitted on them with scikit-learn. The fitted standardisation and weights are written into
the :class:`ProbeNet` buffers and head, so the exported bundle scores an image with exactly the function
that was evaluated here (tiles: the mean of the crops' probabilities, as the Detector does).
``dfx train`` can train the same family with the full CE + KL + NCE objective and augmentation instead.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image

from inference.bundle import BundleSpec, ExpertSpec, write_bundle
from inference.experts import arch_defaults, create_expert
from inference.families import get as family_of
from inference.families.probe_net import robust_std
from inference.images import ImageError, load_image
from inference.preprocess import Preprocessor, parse_mode

log = logging.getLogger("dfx.probe")


@dataclass
class ProbeSpec:
    """What a probe expert reads: backbone, stages, input size and preprocessing."""

    arch: str = "tf_efficientnet_lite0"
    pretrained: str = "pkg:efficientnet_lite0"
    stages: tuple[int, ...] = (1, 2, 3, 4)
    input_size: int = 224
    preprocess: str = "tiles"
    crops: int = 4
    name: str = "probe"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    #: ``probe`` (the backbone in torch) or ``probe_onnx`` (in onnxruntime: features are extracted through the very
    #: graph the bundle serves, so the fitted head's scores are the bundle's)
    family: str = "probe"

    def expert(self) -> ExpertSpec:
        d = arch_defaults(self.arch, self.input_size)
        return ExpertSpec(name=self.name, arch=self.arch, input_size=d["input_size"], mean=d["mean"], std=d["std"],
                          file=f"{self.name}.safetensors", sha256="0" * 64, family=self.family,
                          preprocess=self.preprocess, crops=self.crops if self.preprocess == "tiles" else 1,
                          stages=tuple(self.stages), model_kwargs=d["model_kwargs"])


def build_probe(spec: ProbeSpec) -> torch.nn.Module:
    """A ProbeNet whose backbone holds the pretrained weights (the head is fitted later)."""
    return create_expert(spec.expert(), spec.pretrained).eval()


class _Images(torch.utils.data.Dataset):
    """One image per item → its preprocessed crops ``(K, 3, S, S)``; errors become ``None`` items."""

    def __init__(self, paths: Sequence[str], pre: Preprocessor, transform: Callable[[Image.Image], Image.Image] | None):
        self.paths, self.pre, self.transform = list(paths), pre, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str | None]:
        try:
            img = load_image(self.paths[i], max_pixels=self.pre.max_pixels, min_size=self.pre.min_decode_size)
            if self.transform is not None:
                img = self.transform(img)
            x = next(iter(self.pre.transform(img).values()))
            return i, x if x.dim() == 4 else x[None], None
        except ImageError as exc:
            return i, None, exc.message


def _collate(items: list) -> list:
    return items


@torch.inference_mode()
def extract(net: torch.nn.Module, expert: ExpertSpec, paths: Sequence[str], *, batch_size: int = 32,
            workers: int | None = None, transform: Callable[[Image.Image], Image.Image] | None = None,
            progress: bool = True, desc: str = "features") -> tuple[np.ndarray, np.ndarray, list[str | None]]:
    """Raw pooled features of every crop: ``(features (M, D), image index of each crop (M,), errors)``.
    An unreadable image contributes no crop and its error message."""
    from tqdm import tqdm

    from inference.detector import default_workers

    pre = Preprocessor([expert.preprocess_key])
    if parse_mode(expert.preprocess_key[1])[0] != "tiles":
        pre.min_decode_size = expert.input_size
    workers = default_workers() if workers is None else workers
    loader = torch.utils.data.DataLoader(_Images(paths, pre, transform), batch_size=max(1, batch_size // max(1, expert.crops)),
                                         num_workers=workers, collate_fn=_collate)
    feats, owners, errors = [], [], [None] * len(paths)
    with tqdm(total=len(paths), desc=desc, unit="img", disable=not progress, leave=False) as bar:
        for batch in loader:
            good = [(i, x) for i, x, _ in batch if x is not None]
            for i, _, err in batch:
                errors[i] = err
            if good:
                x = torch.cat([x for _, x in good]).contiguous(memory_format=torch.channels_last)
                feats.append(net.pooled(x).numpy())
                owners += [i for i, x in good for _ in range(x.shape[0])]
            bar.update(len(batch))
    dim = getattr(net, "num_features", 0)
    return (np.concatenate(feats) if feats else np.zeros((0, dim), np.float32)), np.asarray(owners, dtype=np.int64), errors


@dataclass
class FittedHead:
    mean: np.ndarray
    std: np.ndarray
    coef: np.ndarray
    intercept: float

    def probs(self, feats: np.ndarray) -> np.ndarray:
        """Each row's fake-probability (the regression's sigmoid on standardised features)."""
        z = (feats - self.mean) / self.std
        return 1.0 / (1.0 + np.exp(-(z @ self.coef + self.intercept)))

    def image_probs(self, feats: np.ndarray, owners: np.ndarray, n_images: int) -> np.ndarray:
        """Per-image fake-probability: the mean of its crops' probabilities (NaN for images with no crop)."""
        p = self.probs(feats)
        out = np.full(n_images, np.nan)
        sums = np.bincount(owners, weights=p, minlength=n_images)
        counts = np.bincount(owners, minlength=n_images)
        np.divide(sums, counts, out=out, where=counts > 0)
        return out


def fit_head(feats: np.ndarray, labels: np.ndarray, *, C: float = 0.05, balanced: bool = True) -> FittedHead:
    """Standardise, then an L2 logistic regression (class-balanced by default)."""
    from sklearn.linear_model import LogisticRegression

    mean = feats.mean(axis=0)
    std = robust_std(feats.std(axis=0))
    lr = LogisticRegression(C=C, max_iter=3000, class_weight="balanced" if balanced else None)
    lr.fit((feats - mean) / std, labels)
    return FittedHead(mean=mean, std=std, coef=lr.coef_[0].astype(np.float64), intercept=float(lr.intercept_[0]))


def head_state(net: torch.nn.Module, head: FittedHead) -> dict[str, torch.Tensor]:
    """The ProbeNet state dict with the fitted head: logits ``(−s/2, s/2)`` for the LR score ``s``, so the
    softmax's fake-probability is exactly the LR's sigmoid."""
    state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    state["feat_mean"] = torch.tensor(head.mean, dtype=torch.float32)
    state["feat_std"] = torch.tensor(head.std, dtype=torch.float32)
    w = torch.tensor(head.coef, dtype=torch.float32)
    state["head.weight"] = torch.stack([-w / 2, w / 2])
    state["head.bias"] = torch.tensor([-head.intercept / 2, head.intercept / 2], dtype=torch.float32)
    return state


def export_probe(out: str | os.PathLike[str], spec: ProbeSpec, net: torch.nn.Module, head: FittedHead, *,
                 threshold: float, band: tuple[float, float], rule: str, provenance: dict[str, Any],
                 name: str | None = None, overwrite: bool = False) -> BundleSpec:
    """Write a one-expert probe bundle."""
    expert = spec.expert()
    bundle = BundleSpec(name=name or Path(out).name, experts=(expert,), threshold=threshold, uncertain_band=band,
                        threshold_rule=rule, provenance=provenance)
    return write_bundle(out, bundle, {expert.name: probe_file_state(head_state(net, head), spec.pretrained,
                                                                                spec.family)},
                        overwrite=overwrite)


def probe_file_state(state: dict[str, torch.Tensor], pretrained: str | None,
                     family: str = "probe") -> dict[str, torch.Tensor]:
    """What a probe's file holds (the family's stored form: for ``probe``, a frozen backbone from an INT8 source,
    e.g. ``pkg:clip_vit_b16``, as that source's exact INT8 rows and scales, 89 MB instead of 344 MB; for
    ``probe_onnx``, its graph as it is)."""
    return family_of(family).file_state(state, pretrained)