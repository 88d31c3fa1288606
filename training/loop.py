"""One expert's training, in steps: set up (model, EMA, data, optimiser), resume, train an epoch, validate it,
write the final folder. ``dfx train`` (training/trainer.py) runs it for each expert of a run."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from inference.bundle import ExpertSpec
from inference.experts import arch_defaults, fake_probs
from inference.families import get as family_of
from inference.manifest import write_manifest
from inference.preprocess import Preprocessor

from .checkpoint import save_checkpoint
from .config import ExpertConfig, TrainConfig, expert_augment, expert_name
from .data import EpochSampler, EvalDataset, Row, TrainDataset, collate_eval, collate_views
from .losses import ProjectionHead, combined_loss
from .metrics import metrics_by_source, save_metrics, save_roc_png
from .nets import TrainNet, calibration_inputs, create_backbone, expert_spec, freeze_unreachable, make_stem
from .rows import split_rows

log = logging.getLogger("dfx.train")


@dataclass
class ExpertRun:
    """What one expert's training holds between its steps."""

    e: ExpertConfig
    spec: ExpertSpec  #: the expert as its bundle will describe it (file and hash filled in at export)
    index: int
    name: str
    edir: Path
    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    model_kwargs: dict[str, Any]
    train_rows: list[dict[str, Any]]
    val_rows: list[dict[str, Any]]
    net: Any = None
    backbone: Any = None
    ema: Any = None
    scorer: Any = None
    opt: Any = None
    sched: Any = None
    loader: Any = None
    sampler: Any = None
    val_loader: Any = None
    norms: list[nn.Module] = field(default_factory=list)
    progress: dict[str, Any] = field(default_factory=lambda: {"epoch": 0, "batches_done": 0, "global_step": 0,
                                                               "history": [], "skipped": {}})

    @property
    def ckpt(self) -> Path:
        return self.edir / "checkpoint"


def train_expert(cfg: TrainConfig, e: ExpertConfig, index: int, rows: list[dict[str, Any]], accelerator,
                 run_dir: Path, max_size: int | None, resume: bool) -> None:
    """Train one expert to its final folder (EMA weights, validation predictions, metrics, ROC)."""
    run = _model(cfg, e, index, rows, run_dir)
    _data(cfg, run, max_size)
    if e.fit == "logistic":  # a frozen-feature head fitted in closed form (training/closed_form.py)
        _fit_closed_form(cfg, run, accelerator, resume)
        return
    _optimiser(cfg, run, accelerator)
    if resume and (run.ckpt / "progress.json").is_file():
        _resume(run, accelerator)
    accelerator.print(f"[{run.name}] {e.arch} at {run.size}px ({e.preprocess}); train {len(run.train_rows)} rows, "
                      f"validate {len(run.val_rows)} rows"
                      + (f" (fold {e.val_fold})" if e.val_fold is not None else " (split=val)"))
    for epoch in range(run.progress["epoch"], cfg.train.epochs):
        sums, n_steps = _train_epoch(cfg, run, accelerator, epoch)
        _validate_epoch(cfg, run, accelerator, epoch, sums, n_steps)
        run.progress["epoch"], run.progress["batches_done"] = epoch + 1, 0
        save_checkpoint(accelerator, run.ckpt, run.ema, run.progress)
    _write_final(run, accelerator)


def _fit_closed_form(cfg: TrainConfig, run: ExpertRun, accelerator, resume: bool) -> None:
    """``fit: logistic``: the head fitted on the frozen features of the run's augmented views, validated and written
    like an SGD-trained expert (one history entry)."""
    from .closed_form import fit_logistic

    accelerator.print(f"[{run.name}] {run.e.arch} at {run.size}px ({run.e.preprocess}); fit a logistic head on "
                      f"{len(run.train_rows)} rows, validate {len(run.val_rows)} rows")
    sums = fit_logistic(cfg, run, accelerator, resume, _note_skipped)
    _validate_epoch(cfg, run, accelerator, cfg.train.epochs - 1, sums, 1)
    _write_final(run, accelerator)
    if accelerator.is_main_process:  # the features were the checkpoint: done with, like the SGD checkpoint
        shutil.rmtree(run.edir / "features", ignore_errors=True)


def _model(cfg: TrainConfig, e: ExpertConfig, index: int, rows: list[dict[str, Any]], run_dir: Path) -> ExpertRun:
    """The expert as its family builds it (calibrated when the family asks), its stem, the NCE projection, EMA."""
    from accelerate.utils import set_seed
    from timm.utils import ModelEmaV3

    name = expert_name(e)
    edir = run_dir / "experts" / name
    edir.mkdir(parents=True, exist_ok=True)
    d = arch_defaults(e.arch, e.input_size)
    train_rows, val_rows = split_rows(rows, e, index)
    spec = expert_spec(e, d["input_size"], d["mean"], d["std"], d["model_kwargs"])
    run = ExpertRun(e, spec, index, name, edir, d["input_size"], tuple(d["mean"]), tuple(d["std"]),
                    d["model_kwargs"], train_rows, val_rows)
    set_seed(cfg.seed + 1000 * index)
    backbone = create_backbone(e, spec, index)
    family = family_of(e.family)
    # e.g. a new probe: its features standardised on the training images (a closed-form fit standardises its own)
    if family.calibrates and not e.init_from and e.fit != "logistic":
        family.calibrate(backbone.eval(), calibration_inputs(train_rows, spec, cfg.data.max_pixels))
    with torch.no_grad():
        feat_dim = family.outputs(backbone.eval(), torch.zeros(1, 3, run.size, run.size))[1].shape[1]
    stem = make_stem(spec)
    net = TrainNet(backbone, ProjectionHead(feat_dim, cfg.loss.proj_dim) if cfg.loss.nce else None, stem,
                   e.family).train()
    unreachable = freeze_unreachable(net, run.size)
    if unreachable:
        log.info("[%s] %d parameter tensors cannot reach the outputs (e.g. %s): frozen", name,
                 len(unreachable), unreachable[0])
    # Warm-up: the decay ramps up over the first steps ((1+t)/(10+t)), so a short run's EMA is not stuck
    # near the random initialisation.
    run.ema = ModelEmaV3(backbone, decay=cfg.train.ema_decay, use_warmup=True)
    run.net, run.backbone = net, backbone
    run.scorer = nn.Sequential(stem, run.ema.module)  # what validation scores: the stem, then the EMA weights
    return run


def _data(cfg: TrainConfig, run: ExpertRun, max_size: int | None) -> None:
    """The training loader (seeded sampler, two augmented views) and the validation loader (decoded as the
    exported ensemble's Detector will decode)."""
    from inference.detector import default_workers

    tc, e, seed = cfg.train, run.e, cfg.seed + 1000 * run.index
    to_row = lambda r: Row(r["abspath"], r["label"], r.get("source", ""), r.get("maskpath"))  # noqa: E731
    num_samples = len(run.train_rows)
    if tc.max_steps_per_epoch:
        num_samples = min(num_samples, tc.max_steps_per_epoch * tc.batch_size)
    run.sampler = EpochSampler([r["label"] for r in run.train_rows], seed=seed, balanced=cfg.data.balanced_sampler,
                               num_samples=num_samples)
    workers = default_workers() if cfg.data.workers is None else cfg.data.workers
    train_ds = TrainDataset([to_row(r) for r in run.train_rows], size=run.size, mode=e.preprocess, mean=run.mean,
                            std=run.std, aug=expert_augment(cfg, e), seed=seed, max_pixels=cfg.data.max_pixels,
                            masks=family_of(e.family).trains_on_masks)
    run.loader = torch.utils.data.DataLoader(train_ds, batch_size=tc.batch_size, sampler=run.sampler,
                                             num_workers=workers, collate_fn=collate_views,
                                             generator=torch.Generator().manual_seed(seed))
    pre = Preprocessor([run.spec.preprocess_key], max_pixels=cfg.data.max_pixels)
    pre.min_decode_size = max_size  # decode exactly as the exported ensemble's Detector will (None: in full)
    run.val_loader = torch.utils.data.DataLoader(EvalDataset([to_row(r) for r in run.val_rows], pre),
                                                 batch_size=tc.batch_size * 2, num_workers=workers,
                                                 collate_fn=collate_eval)


def _optimiser(cfg: TrainConfig, run: ExpertRun, accelerator) -> None:
    """Optimiser (per-group rates and frozen groups for partial fine-tuning), schedule, all through Accelerate."""
    from timm.optim import create_optimizer_v2

    e, lr = run.e, run.e.lr or cfg.optim.lr
    if e.freeze or e.layer_decay is not None:  # partial fine-tuning: per-group rates, frozen early groups
        from .finetune import frozen_norms, partial_param_groups

        groups = partial_param_groups(run.net, run.backbone, e.arch, lr=lr, weight_decay=cfg.optim.weight_decay,
                                      freeze=e.freeze, layer_decay=e.layer_decay)
        opt = create_optimizer_v2(groups, opt=cfg.optim.name, lr=lr, weight_decay=cfg.optim.weight_decay)
        run.norms = frozen_norms(run.backbone)
    else:
        opt = create_optimizer_v2(run.net, opt=cfg.optim.name, lr=lr, weight_decay=cfg.optim.weight_decay)
    run.net, run.opt, run.loader = accelerator.prepare(run.net, opt, run.loader)  # the stem moves with net
    total = math.ceil(len(run.loader) / cfg.train.grad_accum) * cfg.train.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(run.opt, lr_lambda(cfg.optim.warmup_steps, total, cfg.optim.schedule,
                                                                 per_step=accelerator.num_processes))
    run.sched = accelerator.prepare(sched)
    run.ema.module.to(accelerator.device)


def _resume(run: ExpertRun, accelerator) -> None:
    from safetensors.torch import load_file

    accelerator.load_state(str(run.ckpt))
    run.ema.module.load_state_dict(load_file(str(run.ckpt / "ema.safetensors"), device=str(accelerator.device)))
    run.progress = json.loads((run.ckpt / "progress.json").read_text())
    p = run.progress
    accelerator.print(f"[{run.name}] resuming at epoch {p['epoch'] + 1}, batch {p['batches_done']}, "
                      f"step {p['global_step']}")


def _train_epoch(cfg: TrainConfig, run: ExpertRun, accelerator, epoch: int) -> tuple[dict[str, float], int]:
    """One epoch (from where a resumed run stopped): CE + KL + NCE on two views, EMA after each optimiser step,
    a checkpoint every ``checkpoint_every_steps``. Returns the summed losses and the number of steps."""
    from accelerate import skip_first_batches
    from tqdm import tqdm

    tc, progress = cfg.train, run.progress
    run.net.train()
    for m in run.norms:  # frozen stages keep their running statistics too
        m.eval()
    skip = progress["batches_done"]
    it = skip_first_batches(run.loader, skip) if skip else run.loader
    # Accelerate's loader calls sampler.set_epoch(its own iteration count) when iteration starts, and a
    # fresh loader (after --resume) counts from 0: set the epoch on the loader itself so both agree.
    run.sampler.set_epoch(epoch)
    if hasattr(it, "set_epoch"):
        it.set_epoch(epoch)
    sums: dict[str, float] = defaultdict(float)
    n_steps = 0
    bar = tqdm(it, total=len(run.loader) - skip, desc=f"{run.name} epoch {epoch + 1}/{tc.epochs}", leave=False,
               disable=not accelerator.is_local_main_process)
    for batch in bar:
        progress["batches_done"] += 1
        _note_skipped(run, batch["errors"], "")
        if batch["weak"] is None or batch["weak"].shape[0] < 2:
            continue
        values = _step(cfg, run, accelerator, batch)
        for k, v in values.items():
            sums[k] += v
        n_steps += 1
        if accelerator.sync_gradients:
            progress["global_step"] += 1
            run.ema.update(accelerator.unwrap_model(run.net).backbone, step=progress["global_step"])
            accelerator.log({f"{run.name}/{k}": v for k, v in values.items()}
                            | {f"{run.name}/lr": run.sched.get_last_lr()[0]}, step=progress["global_step"])
            bar.set_postfix(loss=f"{values['total']:.3f}")
            every = tc.checkpoint_every_steps
            if every and progress["global_step"] % every == 0 and progress["batches_done"] < len(run.loader):
                save_checkpoint(accelerator, run.ckpt, run.ema, progress)
    bar.close()
    return sums, n_steps


def _step(cfg: TrainConfig, run: ExpertRun, accelerator, batch: dict[str, Any]) -> dict[str, float]:
    """One forward and backward over a batch's two views; the loss parts as numbers."""
    lw = cfg.loss
    with accelerator.accumulate(run.net):
        labels = batch["label"]
        n = labels.shape[0]
        logits, proj, patches = run.net(torch.cat([batch["weak"], batch["strong"]]))
        # A patch expert's CE is per patch: each patch carries the image's label, or its mask's share.
        targets = torch.cat([batch["mask_weak"], batch["mask_strong"]]) if patches is not None else None
        parts = combined_loss(logits[:n], logits[n:], proj[:n].float(), proj[n:].float(), labels,
                              w_ce=lw.ce, w_kl=lw.kl, w_nce=lw.nce, label_smoothing=lw.label_smoothing,
                              kl_temperature=lw.kl_temperature, nce_temperature=lw.nce_temperature,
                              patch_logits=patches, patch_masks=targets)
        accelerator.backward(parts.total)
        if accelerator.sync_gradients and cfg.optim.grad_clip:
            accelerator.clip_grad_norm_(run.net.parameters(), cfg.optim.grad_clip)
        run.opt.step()
        run.sched.step()
        run.opt.zero_grad()
    return {k: getattr(parts, k).detach().item() for k in ("total", "ce", "kl", "nce")}


def _note_skipped(run: ExpertRun, errors: list[tuple[int, str]], prefix: str) -> None:
    for idx, msg in errors:
        if f"{prefix}{idx}" not in run.progress["skipped"]:
            run.progress["skipped"][f"{prefix}{idx}"] = msg
            log.warning("[%s] skipped unreadable %simage: %s", run.name, "validation " if prefix else "", msg)


@torch.inference_mode()
def predict_rows(model: nn.Module, loader, device, accelerator) -> tuple[dict[int, float], list[tuple[int, str]]]:
    model.eval()
    probs: dict[int, float] = {}
    errors: list[tuple[int, str]] = []
    for batch in loader:
        errors.extend(batch["errors"])
        if batch["x"] is None:
            continue
        with accelerator.autocast():
            p = fake_probs(model, batch["x"].to(device)).cpu().numpy()
        probs.update(zip(batch["index"].tolist(), p.tolist()))
    return probs, errors


def _validate_epoch(cfg: TrainConfig, run: ExpertRun, accelerator, epoch: int, sums: dict[str, float],
                    n_steps: int) -> None:
    """The EMA weights' validation AUC after an epoch, logged and kept in the expert's history."""
    probs, errors = predict_rows(run.scorer, run.val_loader, accelerator.device, accelerator)
    _note_skipped(run, errors, "val:")
    vr = run.val_rows
    m = metrics_by_source([vr[i]["label"] for i in probs], list(probs.values()),
                          [vr[i].get("source", "") for i in probs])["overall"] if probs else {}
    entry = {"epoch": epoch + 1, "step": run.progress["global_step"],
             **{f"train_{k}": v / max(1, n_steps) for k, v in sums.items()},
             "val_auc": m.get("auc"), "val_accuracy": m.get("accuracy"), "val_n": len(probs)}
    run.progress["history"].append(entry)
    accelerator.log({f"{run.name}/val_auc": entry["val_auc"] or float("nan"),
                     f"{run.name}/train_loss": entry.get("train_total", float("nan"))}, step=run.progress["global_step"])
    auc = "n/a" if entry["val_auc"] is None else f"{entry['val_auc']:.4f}"
    accelerator.print(f"[{run.name}] epoch {epoch + 1}/{cfg.train.epochs}: step {entry['step']}, loss "
                      f"{entry.get('train_total', float('nan')):.4f} (ce {entry.get('train_ce', 0):.4f}, "
                      f"kl {entry.get('train_kl', 0):.4f}, nce {entry.get('train_nce', 0):.4f}), "
                      f"val AUC (EMA) {auc} on {len(probs)} images")


def _write_final(run: ExpertRun, accelerator) -> None:
    """EMA weights, validation predictions, metrics, ROC and ``expert.json``, written as one folder (a temporary
    sibling renamed into place); the checkpoint goes."""
    from safetensors.torch import save_file

    probs, _ = predict_rows(run.scorer, run.val_loader, accelerator.device, accelerator)
    if accelerator.is_main_process:
        final, tmp = run.edir / "final", run.edir / "final.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_file({k: v.detach().cpu().contiguous() for k, v in run.ema.module.state_dict().items()},
                  str(tmp / "ema.safetensors"), metadata={"format": "pt"})
        vr = run.val_rows
        vrows = [{"path": vr[i]["abspath"], "label": vr[i]["label"], "source": vr[i].get("source", ""),
                  "fold": vr[i].get("fold", ""), "prob": p, "parent": vr[i].get("parentpath") or ""}
                 for i, p in probs.items()]
        write_manifest(tmp / "val_predictions.csv", vrows)
        metrics = metrics_by_source([r["label"] for r in vrows], [r["prob"] for r in vrows],
                                    [r["source"] for r in vrows]) if vrows else {}
        save_metrics(tmp / "metrics.json", metrics)
        if vrows:
            save_roc_png(tmp / "roc.png", {run.name: ([r["label"] for r in vrows], [r["prob"] for r in vrows])},
                         title=f"{run.name}: validation ROC (EMA)")
        (tmp / "expert.json").write_text(json.dumps(_expert_info(run, metrics), indent=2))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        shutil.rmtree(run.ckpt, ignore_errors=True)
    accelerator.wait_for_everyone()


def _expert_info(run: ExpertRun, metrics: dict[str, Any]) -> dict[str, Any]:
    """``expert.json``: what ``dfx export`` turns into the bundle's expert, and the training's record."""
    from .checks import expert_face_finder
    from .init_from import resolve_parent

    e, p = run.e, run.progress
    parent = resolve_parent(e, run.index)
    return {"name": run.name, "arch": e.arch, "family": e.family, "stem": e.stem, "stages": e.stages, "fit": e.fit,
            "options": e.options, "description": e.description, "reads": e.reads,
            **({"face_finder": expert_face_finder(e)} if e.reads == "faces" else {}),
            "crops": e.crops, "input_size": run.size, "preprocess": e.preprocess, "mean": list(run.mean),
            "std": list(run.std), "model_kwargs": run.model_kwargs, "weight": e.weight, "val_fold": e.val_fold,
            "pretrained": e.pretrained, "n_train": len(run.train_rows), "n_val": len(run.val_rows),
            "n_replay": sum(1 for r in run.train_rows if r.get("replay")),
            "init_from": parent.provenance() if parent else None,
            "steps": p["global_step"], "history": p["history"], "skipped": p["skipped"],
            "val_auc": metrics.get("overall", {}).get("auc") if metrics else None}


def lr_lambda(warmup: int, total: int, schedule: str, per_step: int = 1):
    """The learning-rate factor in optimiser steps. Accelerate's scheduler wrapper steps the scheduler once per
    process per optimiser step (``per_step`` = the number of processes), so its count is divided back: the
    schedule is then the same, step for step, on one process or many."""
    def f(scheduler_step: int) -> float:
        step = scheduler_step // per_step
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        t = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1 + math.cos(math.pi * t))
    return f
