"""``dfx select``: which images of an unlabelled pool are worth labelling next (active learning).

Labelling is the expensive part of keeping a detector current. Given a bundle and a pool, a strategy ranks
the pool and the top ``budget`` rows are written out for labelling:

- ``entropy``: closest to the bundle's decision threshold, ``|p − threshold|`` (for a calibrated bundle
  with threshold 0.5 this is the maximum-entropy order); lowest first.
- ``margin``: the same boundary measured in evidence, ``|logit(p) − logit(threshold)|``: when the threshold
  is not 0.5 it ranks the two sides fairly (0.01 against 0.001 counts as much as 0.5 against 0.9).
- ``disagreement``: the spread (standard deviation) of the experts' probabilities; highest first. Needs a
  bundle of two or more experts.
- ``coreset``: k-center greedy (Sener & Savarese, 2018) on L2-normalised embeddings: each pick is the image
  farthest from everything picked or already labelled (``--exclude``), so the batch covers the pool;
  distances from FAISS. Criterion: that distance, highest first.
- ``hybrid``: uncertainty within diversity: the ``5 × budget`` most uncertain images (``entropy``), then
  k-center greedy among them.
- ``random``: a seeded random sample, the baseline every strategy must beat.

Scoring goes through resumable shards (``OUT.parts/``, as ``dfx predict``) and embeddings through
``dfx prepare embed``'s resumable writer (``OUT.work/``), so a killed run over a large pool continues with
``--resume``. The selection functions work on arrays, so ``bench/active_learning.py`` runs the very same code.
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path
from typing import Any, Sequence

import numpy as np

STRATEGIES = ("entropy", "margin", "disagreement", "coreset", "hybrid", "random")
HYBRID_FACTOR = 5


class SelectError(ValueError):
    """A selection that cannot be made; the message says why."""


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=float), 1e-7, 1 - 1e-7)
    return np.log(p) - np.log1p(-p)


def uncertainty(scores: np.ndarray, threshold: float) -> np.ndarray:
    """``|p − threshold|``: lower is more uncertain."""
    return np.abs(np.asarray(scores, dtype=float) - threshold)


def k_center_greedy(emb: np.ndarray, budget: int, labelled: np.ndarray | None = None,
                    candidates: np.ndarray | None = None) -> tuple[list[int], list[float]]:
    """Pick ``budget`` rows of ``emb`` (indices into it, restricted to ``candidates`` when given), each the one
    farthest from its nearest centre; centres start as ``labelled`` (embeddings of already labelled images),
    or, with none, the row farthest from the pool's mean. Returns (picks, the distance of each at its pick)."""
    import faiss

    x = np.ascontiguousarray(emb, dtype=np.float32)
    cand = np.arange(len(x)) if candidates is None else np.asarray(candidates)
    xc = np.ascontiguousarray(x[cand])
    if labelled is not None and len(labelled):
        index = faiss.IndexFlatL2(x.shape[1])
        index.add(np.ascontiguousarray(labelled, dtype=np.float32))
        d2, _ = index.search(xc, 1)
        min_d2 = d2[:, 0].astype(np.float64)
    else:
        min_d2 = np.full(len(xc), np.inf)
    picks: list[int] = []
    dists: list[float] = []
    for _ in range(min(budget, len(xc))):
        if np.isinf(min_d2).all():  # no centre yet: start at the point farthest from the mean
            from_mean = ((xc - xc.mean(axis=0)) ** 2).sum(axis=1)
            j = int(np.argmax(from_mean))
            dist = float(math.sqrt(from_mean[j]))  # its distance from the mean
        else:
            j = int(np.argmax(min_d2))
            dist = float(math.sqrt(max(min_d2[j], 0.0)))
        picks.append(int(cand[j]))
        dists.append(dist)
        d2_new = ((xc - xc[j]) ** 2).sum(axis=1, dtype=np.float64)
        min_d2 = np.minimum(min_d2, d2_new)
        min_d2[j] = -1.0  # never again
    return picks, dists


def normalised(emb: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (cosine geometry), NaN rows (unreadable images) to zero."""
    e = np.nan_to_num(np.asarray(emb, dtype=np.float32))
    return e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)


def rank(strategy: str, budget: int, *, scores: np.ndarray | None = None, experts: np.ndarray | None = None,
         threshold: float = 0.5, emb: np.ndarray | None = None, labelled_emb: np.ndarray | None = None,
         seed: int = 0, n: int | None = None) -> tuple[list[int], list[float]]:
    """The ``budget`` rows a strategy picks, in order, with each one's criterion value. ``scores`` (N,) are
    the ensemble's probabilities, ``experts`` (N, E) each expert's, ``emb`` (N, D) embeddings; ``n`` the pool
    size when no array is needed (random)."""
    if strategy not in STRATEGIES:
        raise SelectError(f"unknown strategy '{strategy}' (valid: {', '.join(STRATEGIES)})")
    if n is None:
        n = len(scores) if scores is not None else len(emb) if emb is not None else 0
    if n == 0:
        raise SelectError("the pool is empty (nothing left to select)")
    if not 1 <= budget <= n:
        raise SelectError(f"budget {budget} must be between 1 and the pool's {n} unlabelled images")
    if strategy == "random":
        rng = np.random.default_rng(seed)
        order = rng.permutation(n)[:budget]
        return [int(i) for i in order], [float(i) for i in rng.random(budget)]
    if strategy in ("entropy", "margin"):
        assert scores is not None
        crit = uncertainty(scores, threshold) if strategy == "entropy" else np.abs(_logit(scores) - _logit(threshold))
        order = np.argsort(crit, kind="stable")[:budget]
        return [int(i) for i in order], [float(crit[i]) for i in order]
    if strategy == "disagreement":
        if experts is None or experts.shape[1] < 2:
            raise SelectError("disagreement needs a bundle of two or more experts (this one has "
                              f"{0 if experts is None else experts.shape[1]})")
        crit = np.nan_to_num(np.nanstd(experts, axis=1), nan=0.0)
        order = np.argsort(-crit, kind="stable")[:budget]
        return [int(i) for i in order], [float(crit[i]) for i in order]
    assert emb is not None
    e = normalised(emb)
    lab = normalised(labelled_emb) if labelled_emb is not None and len(labelled_emb) else None
    if strategy == "coreset":
        return k_center_greedy(e, budget, lab)
    assert scores is not None
    pool = np.argsort(uncertainty(scores, threshold), kind="stable")[:min(n, HYBRID_FACTOR * budget)]
    return k_center_greedy(e, budget, lab, candidates=pool)


def select(pool: str | os.PathLike[str], weights: str | os.PathLike[str], output: str | os.PathLike[str], *,
           budget: int, strategy: str = "entropy", exclude: Sequence[str | os.PathLike[str]] = (),
           embed: str | None = None, seed: int = 0, device: str = "auto", batch_size: int = 32,
           workers: int | None = None, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Rank ``pool`` (a manifest; labels not needed) and write its ``budget`` best rows to ``output`` with
    ``score``, ``criterion``, ``rank`` and ``strategy`` columns. ``embed``: the embedding for coreset/hybrid
    (``dfx prepare embed --backbone`` syntax; default ``bundle:WEIGHTS``, the bundle's first expert)."""
    from inference.detector import Detector
    from inference.manifest import read_manifest, write_manifest
    from inference.sharded import World, remove_parts, score_to_parts

    if strategy not in STRATEGIES:
        raise SelectError(f"unknown strategy '{strategy}' (valid: {', '.join(STRATEGIES)})")
    man = read_manifest(pool, require_labels=False)
    done: set[Path] = set()
    for f in exclude:
        ex = read_manifest(f, require_labels=False)
        done |= {ex.image_key(r) for r in ex.rows}
    rows, seen, duplicates = [], set(), 0
    for r in man.rows:  # a labelling budget is spent on distinct images: a repeated row is dropped
        key = man.image_key(r)
        if key in done:
            continue
        if key in seen:
            duplicates += 1
            continue
        seen.add(key)
        rows.append(r)
    excluded = len(man.rows) - len(rows) - duplicates
    if duplicates:
        import logging

        logging.getLogger("dfx.select").warning("%s: %d rows repeat an image an earlier row names; each image is "
                                                "considered once", pool, duplicates)
    if not rows:
        raise SelectError(f"{pool}: no unlabelled rows left ({len(man.rows)} rows, {excluded} excluded)")
    if not 1 <= budget <= len(rows):
        raise SelectError(f"budget {budget} must be between 1 and the pool's {len(rows)} unlabelled images "
                          f"({excluded} excluded)")
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = [man.abspath(r) for r in rows]
    det = Detector(weights, device=device, batch_size=batch_size)
    keep = np.arange(len(rows))  # the rows a strategy may pick: readable ones (random reads nothing)
    scores = experts = None
    if strategy != "random":
        results = score_to_parts(det, paths, out, world=World(), resume=resume, workers=workers,
                                 progress=progress, desc="scoring pool")
        assert results is not None
        keep = np.array([i for i, r in enumerate(results) if r.prediction is not None], dtype=int)
        if len(keep) < budget:  # an unreadable image is never worth labelling
            raise SelectError(f"budget {budget} is more than the pool's {len(keep)} readable unlabelled images "
                              f"({len(results) - len(keep)} unreadable, {excluded} excluded)")
        scores = np.array([r.prediction.score if r.prediction else np.nan for r in results])
        # an expert that reads faces has no score for an image without a face: NaN, left out of the spread
        experts = np.array([[r.prediction.experts.get(e.name, np.nan) if r.prediction else np.nan
                             for e in det.spec.experts] for r in results])
    emb = labelled_emb = None
    work = out.with_name(out.name + ".work")
    if strategy in ("coreset", "hybrid"):
        from inference.embed import embed_manifest

        spec = embed or f"bundle:{weights}"
        work.mkdir(exist_ok=True)
        write_manifest(work / "pool.csv", [{**rows[i], "path": str(paths[i])} for i in keep])
        embed_manifest(work / "pool.csv", work / "pool.npy", backbone=spec, batch_size=batch_size, workers=workers,
                       device=device, progress=progress)
        emb = np.load(work / "pool.npy")
        labelled_paths = sorted(str(p) for p in done if p.is_file())
        if labelled_paths:  # k-center greedy starts from what is labelled already
            write_manifest(work / "labelled.csv", [{"path": p} for p in labelled_paths])
            embed_manifest(work / "labelled.csv", work / "labelled.npy", backbone=spec, batch_size=batch_size,
                           workers=workers, device=device, progress=progress)
            labelled_emb = np.load(work / "labelled.npy")
            labelled_emb = labelled_emb[~np.isnan(labelled_emb).any(axis=1)]
    picks, crit = rank(strategy, budget, scores=None if scores is None else scores[keep],
                       experts=None if experts is None else experts[keep], threshold=det.spec.threshold,
                       emb=emb, labelled_emb=labelled_emb, seed=seed, n=len(keep))
    chosen = []
    for k, (j, c) in enumerate(zip(picks, crit), start=1):
        i = int(keep[j])
        chosen.append({**rows[i], "path": str(paths[i]),
                       "score": "" if scores is None else float(scores[i]),
                       "criterion": c, "rank": k, "strategy": strategy})
    write_manifest(out, chosen)
    remove_parts(out)
    shutil.rmtree(work, ignore_errors=True)
    return {"pool": len(man.rows), "excluded": excluded, "duplicates": duplicates, "selected": len(chosen),
            "strategy": strategy,
            "model": det.model_id, "output": str(out)}
