"""Detection metrics, overall and per source (scikit-learn underneath), as JSON and a ROC PNG.

AUC is the competition metric. TPR at a low FPR says how many fakes are caught when almost no real
image may be flagged, which is what a trust-and-safety team runs at. ECE says whether a 0.9 means 90 %.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from inference.files import save_figure  # noqa: F401  (training.metrics.save_figure, as before)


def _finite(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def tpr_at_fpr(labels: np.ndarray, scores: np.ndarray, fpr_target: float) -> float:
    """Highest TPR over thresholds whose FPR is at most ``fpr_target``."""
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(labels, scores)
    ok = fpr <= fpr_target + 1e-12
    return float(tpr[ok].max()) if ok.any() else 0.0


def eer(labels: np.ndarray, scores: np.ndarray) -> float:
    """Equal error rate: where the false-positive and false-negative rates meet (interpolated)."""
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(labels, scores)
    fnr = 1 - tpr
    i = int(np.argmin(np.abs(fnr - fpr)))
    if i + 1 < len(fpr) and (fnr[i] - fpr[i]) * (fnr[i + 1] - fpr[i + 1]) < 0:
        a, b = fnr[i] - fpr[i], fnr[i + 1] - fpr[i + 1]
        t = a / (a - b)
        return float(fpr[i] + t * (fpr[i + 1] - fpr[i]))
    return float((fpr[i] + fnr[i]) / 2)


def expected_calibration_error(labels: np.ndarray, scores: np.ndarray, bins: int = 10) -> float:
    """ECE with equal-width bins over the fake-probability: sum_b |B|/n · |acc_b − conf_b| where the
    'accuracy' is the fraction of fakes in the bin and the confidence the mean score."""
    edges = np.linspace(0, 1, bins + 1)
    idx = np.clip(np.digitize(scores, edges[1:-1], right=True), 0, bins - 1)
    total = 0.0
    for b in range(bins):
        m = idx == b
        if m.any():
            total += m.mean() * abs(labels[m].mean() - scores[m].mean())
    return float(total)


def binary_metrics(labels: Sequence[int], scores: Sequence[float], threshold: float = 0.5) -> dict[str, Any]:
    """All metrics for one set; ranking metrics are None when only one class is present."""
    from sklearn.metrics import accuracy_score, average_precision_score, roc_auc_score

    y = np.asarray(labels, dtype=int)
    s = np.asarray(scores, dtype=float)
    out: dict[str, Any] = {"n": int(len(y)), "n_fake": int(y.sum()), "n_real": int(len(y) - y.sum()),
                           "threshold": float(threshold)}
    out["accuracy"] = _finite(accuracy_score(y, s >= threshold)) if len(y) else None
    out["ece"] = _finite(expected_calibration_error(y, s)) if len(y) else None
    both = 0 < y.sum() < len(y)
    out["auc"] = _finite(roc_auc_score(y, s)) if both else None
    out["ap"] = _finite(average_precision_score(y, s)) if both else None
    out["eer"] = _finite(eer(y, s)) if both else None
    for name, target in (("tpr_at_fpr_5pct", 0.05), ("tpr_at_fpr_1pct", 0.01), ("tpr_at_fpr_0.1pct", 0.001)):
        out[name] = _finite(tpr_at_fpr(y, s, target)) if both else None
    if not both and len(y):
        # one class only (e.g. one generator's fakes): the share classified correctly still says something
        out["recall"] = _finite(float(((s >= threshold) == (y == 1)).mean()))
    return out


def metrics_by_source(labels: Sequence[int], scores: Sequence[float], sources: Sequence[str],
                      threshold: float = 0.5) -> dict[str, Any]:
    """``{"overall": {...}, "per_source": {source: {...}}}``. A source that is all fakes (one generator)
    is also scored against all reals, which is the AUC that says whether that generator is caught."""
    y = np.asarray(labels, dtype=int)
    s = np.asarray(scores, dtype=float)
    src = np.asarray([str(x) for x in sources])
    out = {"overall": binary_metrics(y, s, threshold), "per_source": {}}
    reals = y == 0
    for name in sorted(set(src.tolist())):
        m = src == name
        entry = binary_metrics(y[m], s[m], threshold)
        if y[m].min() == 1 and reals.any():  # a fake source: AUC against every real image
            mm = m | reals
            entry["auc_vs_all_reals"] = binary_metrics(y[mm], s[mm], threshold)["auc"]
        out["per_source"][name] = entry
    return out


def save_metrics(path: str | Path, metrics: dict[str, Any]) -> None:
    from inference.files import write_atomic

    write_atomic(path, json.dumps(metrics, indent=2) + "\n")


def per_source_markdown(metrics: dict[str, Any]) -> str:
    """The per-source table as Markdown (for model cards and reports)."""
    lines = ["| source | n | fake | AUC | AUC vs all reals | accuracy | TPR@5%FPR |", "| --- | --- | --- | --- | --- | --- | --- |"]

    def f(x: Any) -> str:
        return "–" if x is None else f"{x:.3f}"

    o = metrics["overall"]
    lines.append(f"| **all** | {o['n']} | {o['n_fake']} | {f(o['auc'])} | | {f(o['accuracy'])} | {f(o['tpr_at_fpr_5pct'])} |")
    for name, m in metrics["per_source"].items():
        lines.append(f"| {name} | {m['n']} | {m['n_fake']} | {f(m['auc'])} | {f(m.get('auc_vs_all_reals'))} | "
                     f"{f(m['accuracy'])} | {f(m['tpr_at_fpr_5pct'])} |")
    return "\n".join(lines) + "\n"


def save_roc_png(path: str | Path, curves: dict[str, tuple[Sequence[int], Sequence[float]]], title: str = "ROC") -> None:
    """One ROC curve per named (labels, scores) pair, with AUC in the legend, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_auc_score, roc_curve

    fig, ax = plt.subplots(figsize=(5, 5), dpi=110)
    for name, (y, s) in curves.items():
        y, s = np.asarray(y), np.asarray(s)
        if 0 < y.sum() < len(y):
            fpr, tpr, _ = roc_curve(y, s)
            ax.plot(fpr, tpr, label=f"{name} (AUC {roc_auc_score(y, s):.3f})")
    ax.plot([0, 1], [0, 1], "k:", lw=1)
    ax.set(xlabel="false-positive rate (reals flagged)", ylabel="true-positive rate (fakes caught)", title=title,
           xlim=(0, 1), ylim=(0, 1))
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def verdict_error_band(labels: np.ndarray, scores: np.ndarray, error: float) -> tuple[float, float]:
    """The narrowest uncertain band outside which at most ``error`` of the verdicts are wrong on each side: ``hi`` is
    the lowest score at and above which at most ``error`` of the images are real, ``lo`` the highest score at and
    below which at most ``error`` are fakes (on the given predictions, so at their mix of reals and fakes)."""
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], labels[order]
    # at each distinct score, the images at or above it (descending) and at or below it (ascending)
    last = np.r_[s[1:] != s[:-1], True]            # the last index of each run of equal scores
    reals_above = np.cumsum(y == 0)[last] / (np.nonzero(last)[0] + 1)
    values = s[last]
    ok = np.nonzero(reals_above <= error)[0]
    hi = float(values[ok.max()]) if ok.size else 1.0
    s_up, y_up = s[::-1], y[::-1]
    last_up = np.r_[s_up[1:] != s_up[:-1], True]
    fakes_below = np.cumsum(y_up == 1)[last_up] / (np.nonzero(last_up)[0] + 1)
    ok = np.nonzero(fakes_below <= error)[0]
    lo = float(s_up[last_up][ok.max()]) if ok.size else 0.0
    return lo, hi


def band_report(labels: np.ndarray, scores: np.ndarray, threshold: float, lo: float, hi: float) -> dict[str, float]:
    """What a band means on the predictions it was chosen on: the share of images inside it (per class too), and the
    share of wrong verdicts among those outside it, as the Detector labels them."""
    inside = (scores > lo) & (scores < hi)
    called_fake = ~inside & (scores >= threshold)
    outside = ~inside
    wrong = (called_fake & (labels == 0)) | (~inside & ~called_fake & (labels == 1))
    return {"inside": float(inside.mean()), "inside_reals": float(inside[labels == 0].mean()),
            "inside_fakes": float(inside[labels == 1].mean()),
            "error_outside": float(wrong[outside].mean()) if outside.any() else 0.0, "n": int(len(labels))}


def choose_decision(labels: Sequence[int], scores: Sequence[float], rule: str = "youden",
                    target_fpr: float = 0.05, band_error: float = 0.05, band: str = "verdict_error") -> dict[str, Any]:
    """Threshold and uncertain band from (out-of-fold) predictions; the rule is returned in words, and what the band
    means on those predictions (``band_report``: share inside, error outside).

    ``band``: ``quantile`` (from the ``band_error``-quantile of fakes' scores to the ``1 - band_error``-quantile of
    reals': each class rarely lands on the wrong side, but the band is wide) or ``verdict_error`` (the narrowest band
    outside which at most ``band_error`` of the verdicts, fake and real alike, are wrong)."""
    from sklearn.metrics import roc_curve

    y = np.asarray(labels, dtype=int)
    s = np.asarray(scores, dtype=float)
    if not 0 < y.sum() < len(y):
        return {"threshold": 0.5, "uncertain_band": [0.5, 0.5],
                "rule": "default 0.5: the predictions hold only one class"}
    if band not in ("quantile", "verdict_error"):
        raise ValueError(f"band must be quantile or verdict_error, got '{band}'")
    fpr, tpr, thr = roc_curve(y, s)
    thr = np.clip(thr, 0.0, 1.0)
    if rule == "fpr":
        i = int(np.nonzero(fpr <= target_fpr)[0].max())
        t, how = float(thr[i]), f"lowest threshold with out-of-fold FPR <= {target_fpr:g}"
    else:
        i = int(np.argmax(tpr - fpr))
        t, how = float(thr[i]), "maximum of Youden's J (TPR - FPR) on out-of-fold predictions"
    if band == "quantile":
        lo = float(np.quantile(s[y == 1], band_error))    # below: at most band_error of fakes
        hi = float(np.quantile(s[y == 0], 1 - band_error))  # above: at most band_error of reals
        words = (f"between the {band_error:g}-quantile of fakes' scores and the {1 - band_error:g}-quantile of "
                 "reals' scores")
    else:
        lo, hi = verdict_error_band(y, s, band_error)
        words = (f"the narrowest band outside which at most {band_error:.0%} of the verdicts on each side (fake "
                 "above it, real below it) are wrong")
    lo, hi = min(lo, t), max(hi, t)
    report = band_report(y, s, t, lo, hi)
    return {"threshold": t, "uncertain_band": [lo, hi], "band": report,
            "rule": f"{how}; uncertain band: {words} (widened to contain the threshold); on these predictions "
                    f"{report['inside']:.0%} of images fall inside it and {report['error_outside']:.1%} of the "
                    "verdicts outside it are wrong"}
