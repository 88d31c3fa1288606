"""``dfx evaluate``: score a manifest with a bundle through the inference core; metrics, tables, ROC,
and with ``--perturb`` how the verdicts hold up under everyday processing (training/perturb.py)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from inference.detector import Detector, ItemResult
from inference.manifest import read_manifest, write_manifest

from .metrics import metrics_by_source, per_source_markdown, save_metrics, save_roc_png
from .perturb import Perturbation


def evaluate(weights: str | os.PathLike[str], manifest: str | os.PathLike[str], out_dir: str | os.PathLike[str],
             *, device: str = "auto", batch_size: int = 32, workers: int | None = None,
             progress: bool = True, resume: bool = False, perturb: Sequence[Perturbation] = (),
             tta: Sequence[str] | None = None) -> dict[str, Any] | None:
    """Write ``predictions.csv``, ``metrics.json``, ``per_source.md`` and ``roc.png`` to ``out_dir``; with
    ``perturb``, also ``perturbed/<spec>.csv`` and ``robustness.{json,md,png}`` (training/robustness.py).

    Scores go through resumable shards (``*.csv.parts/``, inference.sharded), kept until the whole evaluation
    is done: ``resume`` skips every image a killed run already scored, clean or perturbed, and under
    ``torchrun`` / ``accelerate launch`` the images are split across the processes. ``tta`` replaces the
    bundle's test-time views (``()`` = none). Returns the metrics on the main process, None on the others
    (with ``perturb``, the robustness results are under the key ``robustness``)."""
    from inference.sharded import finish, remove_parts, score_to_parts, start, world_from_env

    man = read_manifest(manifest)
    world = world_from_env()
    det = Detector(weights, device=start(world, device), batch_size=batch_size, tta=tta)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [man.abspath(r) for r in man.rows]
    if workers is None and world.size > 1:
        workers = max(0, min(4, (os.cpu_count() or 1) // world.size - 1))
    runs: dict[str, list[ItemResult] | None] = {}
    outputs = {"clean": out / "predictions.csv"} | {p.spec: out / "perturbed" / f"{p.slug}.csv" for p in perturb}
    for p in perturb:
        outputs[p.spec].parent.mkdir(exist_ok=True)
    for spec, target in outputs.items():
        prepare = None if spec == "clean" else next(p for p in perturb if p.spec == spec).prepare
        runs[spec] = score_to_parts(det, paths, target, world=world, resume=resume, workers=workers,
                                    progress=progress, desc="evaluating" if spec == "clean" else spec, prepare=prepare)
    if not world.is_main:
        finish(world)
        return None
    labels = [int(r["label"]) for r in man.rows]
    sources = [r.get("source", "") for r in man.rows]
    clean = runs["clean"]
    assert clean is not None
    rows, errors = [], []
    for r, res in zip(man.rows, clean):
        if res.prediction is None:
            errors.append(res.error)
            continue
        rows.append({"path": str(res.path), "label": int(r["label"]), "source": r.get("source", ""),
                     "kind": r.get("kind", ""), "score": res.prediction.score, "verdict": res.prediction.label,
                     # an expert that reads faces scores only images with a face: blank elsewhere
                     **{f"expert_{e.name}": res.prediction.experts.get(e.name, "") for e in det.spec.experts}})
    write_manifest(out / "predictions.csv", rows)
    y = [r["label"] for r in rows]
    metrics = metrics_by_source(y, [r["score"] for r in rows], [r["source"] for r in rows],
                                threshold=det.spec.threshold)
    scored = {e.name: [r for r in rows if r[f"expert_{e.name}"] != ""] for e in det.spec.experts}
    metrics["experts"] = {name: metrics_by_source([r["label"] for r in mine], [r[f"expert_{name}"] for r in mine],
                                                  [r["source"] for r in mine])["overall"]
                          for name, mine in scored.items() if mine}
    metrics["model"] = det.model_id
    metrics["tta"] = list(det.spec.tta)
    metrics["errors"] = errors
    dup = man.duplicates()
    metrics["duplicate_rows"] = dup
    if dup:  # every row counts in the metrics, as listed; n then overstates the evidence
        import logging

        logging.getLogger("dfx.evaluate").warning(
            "%s: %d of %d rows name an image an earlier row already names (%d distinct images): n and every metric "
            "count them again", manifest, dup, len(man.rows), len(man.rows) - dup)
    save_metrics(out / "metrics.json", metrics)
    (out / "per_source.md").write_text(per_source_markdown(metrics))
    save_roc_png(out / "roc.png", {"ensemble": (y, [r["score"] for r in rows]),
                                   **{name: ([r["label"] for r in mine], [r[f"expert_{name}"] for r in mine])
                                      for name, mine in scored.items() if mine}},
                 title=f"ROC: {det.model_id}")
    if perturb:
        from .robustness import write_robustness

        perturbed = {p.spec: runs[p.spec] for p in perturb}
        metrics["robustness"] = write_robustness(out, det, labels, sources, clean, perturbed,  # type: ignore[arg-type]
                                                 seed=perturb[0].seed)
    for target in outputs.values():
        remove_parts(target)
    finish(world)
    return metrics
