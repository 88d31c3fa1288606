"""The robustness table: how a bundle's ranking and verdicts move under each perturbation.

Per perturbation, on the images scored both clean and perturbed: AUC, AP, TPR at 5 % FPR, accuracy at the
bundle's threshold, and the **flip rate**, the share of images whose decision (score ≥ threshold: fake,
else real) differs from the clean run's. AUC can hold while verdicts flip (every score shifts together),
and verdicts can hold while AUC falls; a deployment needs both. Written as ``robustness.json``,
``robustness.md`` (overall, then per source) and ``robustness.png`` (AUC and flip rate per perturbation).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from inference.detector import Detector, ItemResult
from inference.manifest import write_manifest

from .metrics import metrics_by_source, save_figure, save_metrics


def flip_rate(clean: Sequence[float], perturbed: Sequence[float], threshold: float) -> float | None:
    """Share of images whose decision at ``threshold`` differs between the two runs (None for no images)."""
    a, b = np.asarray(clean, dtype=float), np.asarray(perturbed, dtype=float)
    if not len(a):
        return None
    return float(((a >= threshold) != (b >= threshold)).mean())


def robustness_table(labels: Sequence[int], sources: Sequence[str], clean: Sequence[ItemResult],
                     perturbed: dict[str, Sequence[ItemResult]], threshold: float) -> dict[str, Any]:
    """``{"clean": metrics, "perturbations": {spec: {"overall", "per_source", "errors"}}}``; metrics as in
    training/metrics.py plus ``flip_rate``, ``auc_drop`` (clean AUC on the same images minus perturbed AUC)
    and ``mean_score_shift``."""
    y_all, src_all = np.asarray(labels, dtype=int), np.asarray([str(s) for s in sources])
    ok_clean = np.array([r.prediction is not None for r in clean])
    s_clean = np.array([r.prediction.score if r.prediction else np.nan for r in clean])
    result: dict[str, Any] = {
        "clean": metrics_by_source(y_all[ok_clean], s_clean[ok_clean], src_all[ok_clean], threshold),
        "perturbations": {}}
    for spec, res in perturbed.items():
        ok_p = np.array([r.prediction is not None for r in res])
        s_p = np.array([r.prediction.score if r.prediction else np.nan for r in res])
        both = ok_clean & ok_p
        y, src, a, b = y_all[both], src_all[both], s_clean[both], s_p[both]
        m = metrics_by_source(y, b, src, threshold)
        base = metrics_by_source(y, a, src, threshold)
        for part, ref, mask in [(m["overall"], base["overall"], np.ones(len(y), bool))] + [
                (m["per_source"][k], base["per_source"][k], src == k) for k in m["per_source"]]:
            part["flip_rate"] = flip_rate(a[mask], b[mask], threshold)
            part["auc_drop"] = None if part["auc"] is None or ref["auc"] is None else ref["auc"] - part["auc"]
            part["mean_score_shift"] = float((b[mask] - a[mask]).mean()) if mask.any() else None
            if "auc_vs_all_reals" in part and ref.get("auc_vs_all_reals") is not None \
                    and part["auc_vs_all_reals"] is not None:
                part["auc_vs_all_reals_drop"] = ref["auc_vs_all_reals"] - part["auc_vs_all_reals"]
        m["errors"] = int((ok_clean & ~ok_p).sum())
        result["perturbations"][spec] = m
    return result


def _f(x: Any, pct: bool = False, signed: bool = False) -> str:
    if x is None:
        return "–"
    if pct:
        return f"{100 * x:.1f} %"
    return f"{x:+.3f}" if signed else f"{x:.3f}"


def robustness_markdown(table: dict[str, Any], model: str, threshold: float) -> str:
    """Overall table, then one table per source (AUC, or AUC against all reals for a one-class source, and
    flip rate)."""
    c = table["clean"]["overall"]
    lines = [f"Robustness of `{model}` (decision threshold {threshold:.4f}; flip = the decision changes "
             "against the clean run)", "",
             "| perturbation | n | AUC | AUC drop | AP | TPR@5%FPR | accuracy | flip rate | mean score shift | errors |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
             f"| clean | {c['n']} | {_f(c['auc'])} | | {_f(c['ap'])} | {_f(c['tpr_at_fpr_5pct'])} | "
             f"{_f(c['accuracy'])} | | | |"]
    for spec, m in table["perturbations"].items():
        o = m["overall"]
        lines.append(f"| {spec} | {o['n']} | {_f(o['auc'])} | {_f(o['auc_drop'], signed=True)} | {_f(o['ap'])} | "
                     f"{_f(o['tpr_at_fpr_5pct'])} | {_f(o['accuracy'])} | {_f(o['flip_rate'], pct=True)} | "
                     f"{_f(o['mean_score_shift'], signed=True)} | {m['errors']} |")
    specs = list(table["perturbations"])
    sources = list(table["clean"]["per_source"])
    if sources:
        lines += ["", "Per source: AUC (a source of one class: AUC against all reals) / flip rate", "",
                  "| source | n | clean | " + " | ".join(specs) + " |",
                  "| --- | --- | --- | " + " | ".join("---" for _ in specs) + " |"]

        def auc_of(entry: dict[str, Any] | None) -> Any:
            if entry is None:
                return None
            return entry["auc"] if entry.get("auc") is not None else entry.get("auc_vs_all_reals")

        for s in sources:
            cells = []
            for spec in specs:
                e = table["perturbations"][spec]["per_source"].get(s)
                cells.append("–" if e is None else f"{_f(auc_of(e))} / {_f(e['flip_rate'], pct=True)}")
            lines.append(f"| {s} | {table['clean']['per_source'][s]['n']} | "
                         f"{_f(auc_of(table['clean']['per_source'][s]))} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def save_robustness_png(path: Path, table: dict[str, Any], title: str) -> None:
    """Two panels: AUC per perturbation (clean as a line) and flip rate per perturbation; atomic."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    specs = list(table["perturbations"])
    aucs = [table["perturbations"][s]["overall"]["auc"] or 0.0 for s in specs]
    flips = [100 * (table["perturbations"][s]["overall"]["flip_rate"] or 0.0) for s in specs]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 0.45 * len(specs) + 1.8), dpi=110, sharey=True)
    ypos = np.arange(len(specs))
    ax1.barh(ypos, aucs, color="#4c72b0")
    clean_auc = table["clean"]["overall"]["auc"]
    if clean_auc is not None:
        ax1.axvline(clean_auc, color="k", ls="--", lw=1, label=f"clean {clean_auc:.3f}")
        ax1.legend(loc="lower right", fontsize=8)
    ax1.axvline(0.5, color="grey", ls=":", lw=1)
    ax1.set(xlim=(0.0, 1.0), xlabel="AUC", yticks=ypos, yticklabels=specs)
    ax1.invert_yaxis()
    ax2.barh(ypos, flips, color="#dd8452")
    ax2.set(xlabel="flip rate (% of images whose verdict changes)", xlim=(0, max(10.0, max(flips, default=0) * 1.15)))
    for yy, v in zip(ypos, flips):
        ax2.text(v, yy, f" {v:.1f}", va="center", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


def write_robustness(out: Path, det: Detector, labels: Sequence[int], sources: Sequence[str],
                     clean: Sequence[ItemResult], perturbed: dict[str, Sequence[ItemResult]],
                     *, seed: int) -> dict[str, Any]:
    """Write ``perturbed/<spec>.csv`` (each image's clean and perturbed score), ``robustness.json``, ``.md``
    and ``.png`` to ``out``; return the table."""
    t = det.spec.threshold
    for spec, res in perturbed.items():
        rows = []
        for lab, src, c, p in zip(labels, sources, clean, res):
            rows.append({"path": str(c.path), "label": lab, "source": src,
                         "clean_score": c.prediction.score if c.prediction else "",
                         "score": p.prediction.score if p.prediction else "",
                         "flipped": int((c.prediction.score >= t) != (p.prediction.score >= t))
                         if c.prediction and p.prediction else "",
                         "error": p.error or ""})
        write_manifest(out / "perturbed" / f"{spec.replace(':', '_')}.csv", rows)
    table = robustness_table(labels, sources, clean, perturbed, t)
    table.update({"model": det.model_id, "threshold": t, "seed": seed, "tta": list(det.spec.tta)})
    save_metrics(out / "robustness.json", table)
    (out / "robustness.md").write_text(robustness_markdown(table, det.model_id, t), encoding="utf-8")
    save_robustness_png(out / "robustness.png", table, f"Robustness: {det.model_id}")
    return table
