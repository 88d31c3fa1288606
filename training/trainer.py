"""``dfx train``: experts trained one after another with CE + KL + NCE through Hugging Face Accelerate.

The same code runs on a CPU, one GPU, or many (``accelerate launch -m inference.cli train ...``).
A run folder holds, per expert, a rolling checkpoint (Accelerate state: model, optimiser, scheduler, RNG;
plus EMA weights and progress) written atomically every N steps and at every epoch end, and when the
expert is done a ``final/`` folder (EMA weights, validation predictions, metrics, ROC). ``--resume``
skips finished experts and continues the unfinished one from its checkpoint: the data order and every
augmentation are functions of (seed, epoch, position), so the resumed run reaches the same weights.

After all experts: the ensemble's out-of-fold predictions, metrics and ROC, and the decision threshold
and uncertain band chosen on them (``run.json``); ``dfx export`` turns the run into a bundle.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from inference.experts import arch_defaults
from inference.faces import combine_face_score
from inference.files import write_atomic
from inference.manifest import manifest_sha256, read_manifest, write_manifest

from .checkpoint import CSVTracker
from .checks import check_config
from .config import ConfigError, TrainConfig, expert_name, replay_spec
from .loop import train_expert
from .metrics import choose_decision, metrics_by_source, per_source_markdown, save_metrics, save_roc_png
from .rows import expert_rows, read_rows, split_rows

log = logging.getLogger("dfx.train")
RUN_FORMAT = "dfx-run/1"


def _mixed_precision(mode: str) -> str:
    if mode != "auto":
        return mode
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"  # bf16 autocast is 5-15x slower on CPUs without AMX/AVX512-BF16


def _weighted(rows: dict[str, dict[str, Any]], key: str, weight: float, r: Any, name: str) -> None:
    row = rows.setdefault(r[key], {"path": r[key], "label": int(r["label"]), "source": r["source"], "fold": r["fold"],
                                   "num": 0.0, "den": 0.0})
    row["num"] += weight * float(r["prob"])
    row["den"] += weight
    row[f"prob_{name}"] = float(r["prob"])


def face_gate(per_path: dict[str, dict[str, Any]], faces: dict[str, float], fpr: float | None) -> tuple[float, int]:
    """The bundle's ``face_gate``: the score above which at most ``fpr`` of the out-of-fold real images' most
    suspicious faces fall (0 when ``fpr`` is None or no real image shows a face), and how many real images it was
    read from."""
    real = sorted(faces[p] for p, r in per_path.items() if r["label"] == 0 and p in faces)
    if fpr is None or not real:
        if fpr is not None:
            log.warning("decision.face_gate_fpr: no out-of-fold real image shows a face; every face counts")
        return 0.0, len(real)
    import numpy as np

    return float(np.quantile(real, 1.0 - fpr, method="higher")), len(real)


def finalize_run(cfg: TrainConfig, run_dir: Path, processes: int = 1) -> dict[str, Any]:
    """Ensemble out-of-fold predictions, metrics, ROC, and the decision rule, into ``run.json``.

    Experts that read faces validated on face crops: a crop's score is the face experts' weighted mean, an
    image's face score the maximum over its crops (found through each crop's ``parent``), combined with the
    whole-image experts' score by ``decision.face_rule``, exactly as the bundle will score that image."""
    experts = [expert_name(e) for e in cfg.experts]
    weights = {expert_name(e): e.weight for e in cfg.experts}
    reads = {expert_name(e): e.reads for e in cfg.experts}
    per_path: dict[str, dict[str, Any]] = {}
    per_crop: dict[str, dict[str, Any]] = {}
    curves = {}
    infos = {}
    for name in experts:
        final = run_dir / "experts" / name / "final"
        infos[name] = json.loads((final / "expert.json").read_text())
        vp = read_manifest(final / "val_predictions.csv")
        curves[name] = ([int(r["label"]) for r in vp.rows], [float(r["prob"]) for r in vp.rows])
        for r in vp.rows:
            if reads[name] == "faces":
                _weighted(per_crop, "path", weights[name], {**r}, name)
                per_crop[r["path"]]["parent"] = r.get("parent") or ""
            else:
                _weighted(per_path, "path", weights[name], r, name)
    faces: dict[str, float] = {}
    for crop in per_crop.values():
        p = crop["num"] / crop["den"] if crop["den"] else 0.5
        if crop["parent"]:
            faces[crop["parent"]] = max(p, faces.get(crop["parent"], 0.0))
    gate, real_faces = face_gate(per_path, faces, cfg.decision.face_gate_fpr)
    oof = []
    for r in per_path.values():
        whole = r["num"] / r["den"] if r["den"] else 0.5
        row = {k: v for k, v in r.items() if k not in ("num", "den")}
        if per_crop:
            row.update(whole_prob=whole, face_prob=faces.get(r["path"], ""))
        oof.append({**row, "prob": combine_face_score(whole, faces.get(r["path"]), cfg.decision.face_rule, gate)})
    write_manifest(run_dir / "oof.csv", oof)
    y = [r["label"] for r in oof]
    s = [r["prob"] for r in oof]
    dc = cfg.decision
    decision = choose_decision(y, s, dc.rule, dc.target_fpr, dc.band_error, dc.band)
    if per_crop:
        decision["face_rule"] = dc.face_rule
        decision["face_gate"] = gate
        decision["face_gate_fpr"] = dc.face_gate_fpr
        decision["real_images_with_faces"] = real_faces
        decision["faces_matched"] = sum(1 for r in oof if r.get("face_prob") != "")
    metrics = metrics_by_source(y, s, [r["source"] for r in oof], threshold=decision["threshold"])
    metrics["experts"] = {n: {"val_auc": infos[n]["val_auc"], "val_fold": infos[n]["val_fold"],
                              "steps": infos[n]["steps"]} for n in experts}
    save_metrics(run_dir / "metrics.json", metrics)
    write_atomic(run_dir / "per_source.md", per_source_markdown(metrics))
    if oof:
        save_roc_png(run_dir / "roc.png", {"ensemble (out-of-fold)": (y, s), **curves}, title="Out-of-fold ROC")
    run = {"format": RUN_FORMAT, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "config": cfg.to_dict(),
           "manifests": [{"path": m, "sha256": manifest_sha256(m)} for m in cfg.data.manifest],
           **({"replay": {"spec": cfg.data.replay, "sha256": manifest_sha256(replay_spec(cfg.data.replay)[0])}}
              if cfg.data.replay else {}),
           "experts": experts, "decision": decision, "processes": processes,
           "oof": {"n": len(oof), "auc": metrics["overall"]["auc"],
                   "tpr_at_fpr_5pct": metrics["overall"]["tpr_at_fpr_5pct"]}}
    write_atomic(run_dir / "run.json", json.dumps(run, indent=2) + "\n")
    return run


def train(cfg: TrainConfig, *, resume: bool = False) -> Path:
    """Train every expert of ``cfg`` (skipping finished ones on resume) and finalise the run."""
    from accelerate import Accelerator

    check_config(cfg)
    run_dir = Path(cfg.output)
    rows = read_rows(cfg)
    own_rows = [expert_rows(cfg, e, rows) for e in cfg.experts]
    for i, e in enumerate(cfg.experts):  # fail on data problems before any expert trains
        split_rows(own_rows[i], e, i)
    accelerator = Accelerator(mixed_precision=_mixed_precision(cfg.train.mixed_precision),
                              gradient_accumulation_steps=cfg.train.grad_accum, log_with=[CSVTracker(str(run_dir))],
                              project_dir=str(run_dir))
    # One process decides whether the output folder is free and creates it; the others learn its answer.
    # (Every rank checking on its own raced: the first to create the folder made the others refuse it.)
    verdict: list[str | None] = [None]
    if accelerator.is_main_process:
        if run_dir.exists() and any(run_dir.iterdir()) and not resume:
            verdict[0] = (f"output {run_dir} already holds a run: pass --resume to continue it, or choose another "
                          "output=DIR")
        else:
            run_dir.mkdir(parents=True, exist_ok=True)
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(verdict)
    accelerator.wait_for_everyone()
    if verdict[0]:
        accelerator.end_training()
        raise ConfigError(verdict[0])
    handler: logging.Handler = logging.NullHandler()
    if accelerator.is_main_process:  # one train.log, written by one process
        handler = logging.FileHandler(run_dir / "train.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("dfx").addHandler(handler)
    logging.getLogger("dfx").setLevel(logging.INFO)
    try:
        accelerator.init_trackers("dfx-train", config={"output": cfg.output, "seed": cfg.seed})
        accelerator.print(f"training on {accelerator.num_processes} process(es), {accelerator.distributed_type}, "
                          f"device {accelerator.device}")
        if accelerator.is_main_process:
            import yaml

            write_atomic(run_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        max_size = max(arch_defaults(e.arch, e.input_size)["input_size"] for e in cfg.experts)
        if any(e.preprocess == "tiles" for e in cfg.experts):
            max_size = None  # a tiled expert makes the Detector decode every image in full
        for i, e in enumerate(cfg.experts):
            if (run_dir / "experts" / expert_name(e) / "final" / "expert.json").is_file():
                accelerator.print(f"[{expert_name(e)}] already trained; skipping")
                continue
            train_expert(cfg, e, i, own_rows[i], accelerator, run_dir, max_size, resume)
            accelerator.free_memory()
        if accelerator.is_main_process:
            run = finalize_run(cfg, run_dir, processes=accelerator.num_processes)
            auc = run["oof"]["auc"]
            accelerator.print(f"run finished: ensemble out-of-fold AUC {'n/a' if auc is None else f'{auc:.4f}'} "
                              f"on {run['oof']['n']} images; threshold {run['decision']['threshold']:.4f}, "
                              f"uncertain band {[round(b, 4) for b in run['decision']['uncertain_band']]}")
            accelerator.print(f"export it: dfx export {run_dir} --out weights/NAME")
        accelerator.wait_for_everyone()
    finally:
        accelerator.end_training()
        logging.getLogger("dfx").removeHandler(handler)
        handler.close()
    return run_dir
