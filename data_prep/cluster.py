"""``dfx prepare cluster``: FAISS k-means on image embeddings, then cluster-disjoint, balanced folds.

Why: when train and validation images look alike, validation measures memory, not generalisation.
Clustering embeddings without labels and sending whole clusters to folds makes each fold's validation
hold kinds of images its training never saw.

Rules:
- k-means is spherical (features L2-normalised, cosine geometry), trained on a random sample of at most
  ``k × max_points_per_centroid`` rows, then every row is assigned in chunks: 1 M × 768 float32 (3 GB)
  is never copied whole, so it fits in 24 GiB; on a GPU box with faiss-gpu the same code uses the GPU.
- A real image and every fake made from it (``parent``) stay in one fold, always: that content is
  shared, the worst leak. Clusters linked by parent→child pairs are merged into groups (strongest links
  first, up to one fold's share of rows), groups are dealt to folds, and a fake whose cluster went
  elsewhere follows its parent. The report counts those moves and the clusters they split, so the
  compromise is visible (typical cause: one cluster of generated images whose parents lie everywhere).
- Groups are dealt largest first, each to the fold where it leaves sizes and fake ratios most even;
  the report says how even they came out.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from inference.manifest import Manifest, read_manifest, write_manifest

log = logging.getLogger("dfx.prep.cluster")
CHUNK = 65536


class ClusterError(ValueError):
    """Bad input to clustering, detected before any work."""


def load_features(path: str | os.PathLike[str]) -> np.ndarray:
    """Memory-map a ``.npy`` feature matrix (N × D, float)."""
    p = Path(path)
    if not p.is_file():
        raise ClusterError(f"{p}: features file not found")
    try:
        feats = np.load(p, mmap_mode="r")
    except (ValueError, OSError) as exc:
        raise ClusterError(f"{p}: not a .npy array ({exc})") from exc
    if feats.ndim != 2 or feats.shape[0] == 0 or feats.shape[1] == 0:
        raise ClusterError(f"{p}: features must be a 2-D array N × D, got shape {feats.shape}")
    if not np.issubdtype(feats.dtype, np.floating):
        raise ClusterError(f"{p}: features must be floating point, got {feats.dtype}")
    return feats


def bad_rows(feats: np.ndarray) -> np.ndarray:
    """Indices of rows with NaN/inf or all zeros (checked in chunks)."""
    bad = []
    for s in range(0, feats.shape[0], CHUNK):
        block = np.asarray(feats[s:s + CHUNK], dtype=np.float32)
        mask = ~np.isfinite(block).all(1) | (np.abs(block).sum(1) == 0)
        bad.extend((np.nonzero(mask)[0] + s).tolist())
    return np.asarray(bad, dtype=np.int64)


def _normalised(block: np.ndarray) -> np.ndarray:
    block = np.ascontiguousarray(block, dtype=np.float32)
    norms = np.linalg.norm(block, axis=1, keepdims=True)
    return block / np.maximum(norms, 1e-12)


def kmeans_assign(feats: np.ndarray, k: int, *, seed: int = 0, niter: int = 25, nredo: int = 5,
                  max_points_per_centroid: int = 256, use_gpu: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Spherical FAISS k-means; returns (assignment per row, centroids).

    Seeding is k-means++ (scikit-learn's ``kmeans_plusplus`` on the sample): faiss's own random seeding
    puts two initial centroids into one true cluster so often that Lloyd iterations merge one cluster
    and split another. ``nredo`` seedings are tried and the lowest objective kept; it costs little
    because training runs on a sample of at most ``k × max_points_per_centroid`` rows."""
    import faiss
    from sklearn.cluster import kmeans_plusplus

    n, d = feats.shape
    rng = np.random.default_rng(seed)
    sample_n = min(n, k * max_points_per_centroid)
    sample_idx = np.sort(rng.choice(n, size=sample_n, replace=False)) if sample_n < n else np.arange(n)
    sample = _normalised(feats[sample_idx])
    gpu = faiss.get_num_gpus() > 0 if use_gpu is None else use_gpu
    # seeding needs far fewer points than Lloyd's iterations: 64 per centroid, in float64 (scikit-learn's
    # float32 path upcasts chunk by chunk and is several times slower)
    seed_rows = sample[np.sort(rng.choice(sample_n, size=min(sample_n, 64 * k), replace=False))].astype(np.float64)
    best = None
    for r in range(max(1, nredo)):
        init, _ = kmeans_plusplus(seed_rows, k, random_state=seed + r)
        km = faiss.Kmeans(d, k, niter=niter, seed=seed + r, spherical=True, gpu=gpu,
                          max_points_per_centroid=max_points_per_centroid, verbose=False)
        km.train(sample, init_centroids=np.ascontiguousarray(init, dtype=np.float32))
        if best is None or km.obj[-1] < best.obj[-1]:
            best = km
    km = best
    assign = np.empty(n, dtype=np.int64)
    for s in range(0, n, CHUNK):
        _, idx = km.index.search(_normalised(feats[s:s + CHUNK]), 1)
        assign[s:s + CHUNK] = idx[:, 0]
    return assign, km.centroids


class _UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, a: int) -> int:
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def parent_links(man: Manifest) -> list[tuple[int, int]]:
    """(child row, parent row) pairs; a parent is matched by its manifest path or its normalised absolute
    path (string operations only: a million ``Path.resolve`` syscalls would cost seconds)."""
    if not any(r.get("parent") for r in man.rows):
        return []
    root = str(man.root)

    def key(p: str) -> str:
        return os.path.normpath(p if os.path.isabs(p) else os.path.join(root, p))

    by_key: dict[str, int] = {}
    for i, r in enumerate(man.rows):
        by_key.setdefault(r["path"], i)
        by_key.setdefault(key(r["path"]), i)
    links = []
    for i, r in enumerate(man.rows):
        p = r.get("parent", "")
        if p:
            j = by_key.get(p, by_key.get(key(p)))
            if j is not None and j != i:
                links.append((i, j))
    return links


@dataclass
class FoldResult:
    fold_of_cluster: dict[int, int]
    groups: list[list[int]]
    links_dropped: int


def assign_folds(assign: np.ndarray, labels: np.ndarray, links: list[tuple[int, int]], k: int, folds: int,
                 seed: int = 0) -> FoldResult:
    """Deal groups of clusters to folds, balancing size and fake ratio.

    Clusters joined by parent links are merged strongest link first, but a merge that would make a group
    larger than one fold's share (n / folds) is refused: otherwise one cluster of generated images whose
    parents lie everywhere would glue every cluster into a single group. Children across a refused link
    are moved to their parent's fold afterwards (see ``cluster_manifest``)."""
    size = np.bincount(assign, minlength=k).astype(float)
    fakes = np.bincount(assign, weights=labels, minlength=k)
    weight: dict[tuple[int, int], int] = {}
    for child, parent in links:
        a, b = sorted((int(assign[child]), int(assign[parent])))
        if a != b:
            weight[(a, b)] = weight.get((a, b), 0) + 1
    uf = _UnionFind(k)
    group_size = size.copy()
    cap = len(assign) / folds
    dropped = 0
    for (a, b), w in sorted(weight.items(), key=lambda kv: (-kv[1], kv[0])):
        ra, rb = uf.find(a), uf.find(b)
        if ra == rb:
            continue
        if group_size[ra] + group_size[rb] > cap:
            dropped += w
            continue
        uf.union(ra, rb)
        group_size[uf.find(ra)] = group_size[ra] + group_size[rb]
    # A child across a refused link will follow its parent: count it in its root parent's cluster, so the
    # dealing below balances the folds as they will really be.
    parent_of = {c: p for c, p in links}
    effective = assign.copy()
    for child in parent_of:
        r, seen = child, set()
        while r in parent_of and r not in seen:
            seen.add(r)
            r = parent_of[r]
        if uf.find(int(assign[child])) != uf.find(int(assign[r])):
            effective[child] = assign[r]
    size = np.bincount(effective, minlength=k).astype(float)
    fakes = np.bincount(effective, weights=labels, minlength=k)
    members: dict[int, list[int]] = {}
    for c in range(k):
        members.setdefault(uf.find(c), []).append(c)
    groups = [g for g in members.values() if size[g].sum() > 0]
    rng = np.random.default_rng(seed)
    order = sorted(range(len(groups)), key=lambda i: (-size[groups[i]].sum(), rng.random()))
    n, total_fake = float(len(assign)), float(labels.sum())
    target_ratio = total_fake / n if n else 0.0
    f_size = np.zeros(folds)
    f_fake = np.zeros(folds)
    fold_of_cluster: dict[int, int] = {}
    for gi in order:
        g = groups[gi]
        gs, gf = float(size[g].sum()), float(fakes[g].sum())
        best, best_cost = 0, float("inf")
        for f in range(folds):
            s2, f2 = f_size.copy(), f_fake.copy()
            s2[f] += gs
            f2[f] += gf
            ratio = np.divide(f2, s2, out=np.full(folds, target_ratio), where=s2 > 0)
            cost = float(np.sum((s2 / (n / folds) - 1) ** 2) + np.sum((ratio - target_ratio) ** 2 * (s2 > 0)))
            if cost < best_cost - 1e-12:
                best, best_cost = f, cost
        f_size[best] += gs
        f_fake[best] += gf
        for c in g:
            fold_of_cluster[c] = best
    return FoldResult(fold_of_cluster, [groups[i] for i in order], dropped)


def follow_parents(fold: np.ndarray, links: list[tuple[int, int]]) -> int:
    """Move every child to its root parent's fold (in place); returns how many rows moved."""
    parent_of = {c: p for c, p in links}

    def root(i: int) -> int:
        seen = set()
        while i in parent_of and i not in seen:
            seen.add(i)
            i = parent_of[i]
        return i

    moved = 0
    for child in parent_of:
        r = root(child)
        if fold[child] != fold[r]:
            fold[child] = fold[r]
            moved += 1
    return moved


def balance_report(fold: np.ndarray, labels: np.ndarray, folds: int) -> dict[str, Any]:
    n = len(fold)
    overall = float(labels.mean()) if n else 0.0
    sizes = np.bincount(fold, minlength=folds)
    fake = np.bincount(fold, weights=labels, minlength=folds)
    ratios = np.divide(fake, sizes, out=np.zeros(folds), where=sizes > 0)
    return {
        "sizes": sizes.tolist(),
        "fake_ratio": [round(float(r), 4) for r in ratios],
        "overall_fake_ratio": round(overall, 4),
        "max_size_deviation": round(float(np.max(np.abs(sizes / (n / folds) - 1))), 4),
        "max_fake_ratio_deviation": round(float(np.max(np.abs(ratios - overall))), 4),
    }


def save_cluster_map(path: Path, feats: np.ndarray, assign: np.ndarray, fold: np.ndarray, labels: np.ndarray,
                     seed: int = 0, max_points: int = 20000) -> None:
    """A 2-D PCA projection of (a sample of) the normalised features, coloured by cluster, fold and label."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.decomposition import PCA

    n = feats.shape[0]
    idx = np.sort(np.random.default_rng(seed).choice(n, size=min(n, max_points), replace=False))
    x = _normalised(feats[idx])
    xy = PCA(n_components=2, random_state=seed).fit_transform(x) if x.shape[1] >= 2 else np.c_[x, np.zeros(len(x))]
    fig, axes = plt.subplots(1, 3, figsize=(15, 5), dpi=100)
    for ax, values, title, cmap in ((axes[0], assign[idx], f"cluster (k={int(assign.max()) + 1})", "tab20"),
                                    (axes[1], fold[idx], "fold", "tab10"),
                                    (axes[2], labels[idx], "label (0 real, 1 fake)", "coolwarm")):
        sc = ax.scatter(xy[:, 0], xy[:, 1], c=values, cmap=cmap, s=6, alpha=0.8, linewidths=0)
        ax.set_title(title)
        ax.set_xticks([])
        ax.set_yticks([])
        if title.startswith("fold") or title.startswith("label"):
            ax.legend(*sc.legend_elements(), loc="best", fontsize=7)
    fig.suptitle(f"{n} images, PCA of L2-normalised embeddings" + (f" (sample of {len(idx)})" if len(idx) < n else ""))
    fig.tight_layout()
    from inference.files import save_figure

    save_figure(fig, path)


def cluster_manifest(manifest: str | os.PathLike[str], features: str | os.PathLike[str], out: str | os.PathLike[str],
                     *, k: int = 50, folds: int = 5, seed: int = 0, drop_invalid: bool = False,
                     use_gpu: bool | None = None, make_map: bool = True) -> dict[str, Any]:
    """Cluster, assign folds, and write ``out`` (manifest), ``<out>.report.json`` and ``<out>.map.png``."""
    man = read_manifest(manifest)
    feats = load_features(features)
    n = len(man)
    if feats.shape[0] != n:
        raise ClusterError(f"{features} has {feats.shape[0]} rows but {manifest} has {n}: they must match row for row "
                           "(embed this manifest again)")
    if folds < 2:
        raise ClusterError(f"--folds {folds}: need at least 2 folds")
    if k < folds:
        raise ClusterError(f"--k {k} is fewer clusters than --folds {folds}: every fold needs at least one cluster")
    bad = bad_rows(feats)
    if len(bad) and not drop_invalid:
        shown = ", ".join(str(int(i)) for i in bad[:10]) + (" ..." if len(bad) > 10 else "")
        raise ClusterError(f"{features}: {len(bad)} row(s) have NaN/inf or all-zero features (rows {shown}; usually "
                           "unreadable images). Fix them, or pass --drop-invalid to leave them out of every fold")
    keep = np.setdiff1d(np.arange(n), bad)
    if k > len(keep):
        raise ClusterError(f"--k {k} is larger than the number of usable images ({len(keep)})")
    labels_all = np.asarray([int(r["label"]) if r.get("label", "") in ("0", "1") else 0 for r in man.rows])
    sub = feats if len(keep) == n else feats[keep]
    assign_keep, _ = kmeans_assign(sub, k, seed=seed, use_gpu=use_gpu)
    assign = np.full(n, -1, dtype=np.int64)
    assign[keep] = assign_keep
    # parent links among usable rows, re-indexed into `keep`
    pos = {int(r): i for i, r in enumerate(keep)}
    links = [(pos[c], pos[p]) for c, p in parent_links(man) if c in pos and p in pos]
    labels = labels_all[keep]
    res = assign_folds(assign_keep, labels.astype(float), links, k, folds, seed)
    lookup = np.asarray([res.fold_of_cluster.get(c, -1) for c in range(k)])
    fold_keep = lookup[assign_keep]
    moved = follow_parents(fold_keep, links)
    if len(np.unique(fold_keep)) < folds:
        raise ClusterError(f"only {len(np.unique(fold_keep))} of {folds} folds received images (too few clusters or "
                           "groups); use fewer folds or more clusters (--k)")
    rows = []
    for i, r in enumerate(man.rows):
        j = pos.get(i)
        rows.append({**r, "cluster": "" if j is None else int(assign[i]), "fold": "" if j is None else int(fold_keep[j])})
    out = Path(out)
    write_manifest(out, rows, man.columns, root=man.root)
    sizes = np.bincount(assign_keep, minlength=k)
    fakes = np.bincount(assign_keep, weights=labels, minlength=k)
    report = {
        "manifest": str(manifest), "features": str(features), "n": n, "n_used": int(len(keep)),
        "dropped_rows": [int(i) for i in bad], "k": k, "folds": folds, "seed": seed, "dim": int(feats.shape[1]),
        "parent_links": len(links), "cluster_groups": len(res.groups),
        "links_across_groups": res.links_dropped, "children_moved_to_parent_fold": moved,
        "clusters_split_across_folds": int(sum(len(np.unique(fold_keep[assign_keep == c])) > 1 for c in range(k))),
        "clusters": [{"cluster": c, "size": int(sizes[c]), "fake": int(fakes[c]), "fold": res.fold_of_cluster.get(c)}
                     for c in range(k)],
        "balance": balance_report(fold_keep, labels.astype(float), folds),
    }
    from inference.files import write_atomic

    write_atomic(out.with_suffix(".report.json"), json.dumps(report, indent=2) + "\n")
    if make_map:
        save_cluster_map(out.with_suffix(".map.png"), sub, assign_keep, fold_keep, labels, seed)
    return report
