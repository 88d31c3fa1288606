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

import csv
import json
import logging
import math
import os
import shutil
import time
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from accelerate.tracking import GeneralTracker, on_main_process
from torch import nn

from inference.bundle import ExpertSpec
from inference.experts import arch_defaults, fake_probs
from inference.families import get as family_of
from inference.manifest import manifest_sha256, read_manifest, write_manifest
from inference.files import write_atomic
from inference.preprocess import Preprocessor

from .config import ConfigError, ExpertConfig, TrainConfig, check_config, expert_name, replay_spec
from .data import EpochSampler, EvalDataset, Row, TrainDataset, collate_eval, collate_views
from .losses import ProjectionHead, combined_loss
from .metrics import choose_decision, metrics_by_source, per_source_markdown, save_metrics, save_roc_png

log = logging.getLogger("dfx.train")
RUN_FORMAT = "dfx-run/1"


class TrainNet(nn.Module):
    """The expert plus the projection head used by the NCE term (not exported), behind the expert's fixed stem
    when its family has one (``nn.Identity`` otherwise)."""

    def __init__(self, backbone: nn.Module, proj: ProjectionHead | None, stem: nn.Module | None = None,
                 family: str = "timm") -> None:
        super().__init__()
        self.backbone, self.proj = backbone, proj
        self.stem = stem if stem is not None else nn.Identity()
        self.family = family

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Image logits, the NCE projection, and patch logits ``(N, 2, h, w)`` when the family has them (from the
        same pass: a patch expert's image logits are their mean softmax), else ``None``."""
        logits, pooled, patches = family_of(self.family).outputs(self.backbone, self.stem(x))
        # No projection head when the NCE weight is 0: a parameter outside the loss's graph makes DDP fail
        # ("parameters that were not used in producing loss") on every multi-GPU run.
        return logits, self.proj(pooled) if self.proj is not None else pooled, patches


def freeze_unreachable(net: nn.Module, size: int) -> list[str]:
    """Freeze (``requires_grad = False``) the parameters the outputs do not depend on, and return their names.

    A ``features_only`` EfficientNet keeps every block, also those after a patch expert's cut: they get no
    gradient, which one process ignores but DDP refuses ("parameters that were not used in producing loss"),
    so every multi-process run of such an expert failed. Found with one dry pass in eval mode (running
    statistics untouched); the file still holds them, unchanged, as the bundle format says."""
    params = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
    was_training = net.training
    net.eval()
    with torch.enable_grad():
        outs = [o for o in net(torch.zeros(1, 3, size, size)) if o is not None]
        grads = torch.autograd.grad(sum(o.float().sum() for o in outs), [p for _, p in params], allow_unused=True)
    net.train(was_training)
    frozen = []
    for (n, p), g in zip(params, grads):
        if g is None:
            p.requires_grad_(False)
            frozen.append(n)
    return frozen


def make_stem(e: ExpertConfig) -> nn.Module:
    """The expert's fixed stem (no parameters) as its family defines it, or ``nn.Identity``."""
    return family_of(e.family).stem(expert_spec(e, 0, (0.0,) * 3, (1.0,) * 3, {})) or nn.Identity()


def expert_spec(e: ExpertConfig, size: int, mean: Any, std: Any, model_kwargs: dict[str, Any]) -> ExpertSpec:
    """The bundle spec of a configured expert (the file and its hash are filled in at export)."""
    return ExpertSpec(name=expert_name(e), arch=e.arch, input_size=size, mean=tuple(mean), std=tuple(std),
                      file=f"{expert_name(e)}.safetensors", sha256="0" * 64, family=e.family,
                      preprocess=e.preprocess, weight=e.weight, model_kwargs=dict(model_kwargs),
                      crops=e.crops if e.preprocess == "tiles" else 1, stem=e.stem,
                      stages=tuple(e.stages) if e.stages is not None else None)


def mode_key(e: ExpertConfig) -> str:
    """The preprocessing key's mode part for this expert (``tiles:<crops>`` for tiled experts)."""
    from inference.preprocess import mode_key as key

    return key(e.preprocess, e.crops)


class CSVTracker(GeneralTracker):
    """An Accelerate tracker writing ``time,step,key,value`` rows to ``<run>/logs/metrics.csv``."""

    name = "csv"
    requires_logging_directory = False
    main_process_only = True

    def __init__(self, run_dir: str) -> None:
        # Nothing is written here: every process builds the tracker, and only the main one may touch the run
        # folder (it decides first whether the folder is free; see train()).
        super().__init__()
        self.path = Path(run_dir) / "logs" / "metrics.csv"

    def _ensure(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists():
            self.path.write_text("time,step,key,value\n")

    @property
    def tracker(self) -> Path:
        return self.path

    @on_main_process
    def store_init_configuration(self, values: dict) -> None:
        self._ensure()
        (self.path.parent / "config.json").write_text(json.dumps(values, indent=2, default=str))

    @on_main_process
    def log(self, values: dict, step: int | None = None, **kwargs: Any) -> None:
        self._ensure()
        with open(self.path, "a", newline="") as f:
            w = csv.writer(f)
            now = f"{time.time():.3f}"
            for k, v in values.items():
                w.writerow([now, "" if step is None else step, k, v])


def _rows(cfg: TrainConfig) -> list[dict[str, Any]]:
    rows = []
    for m in cfg.data.manifest:
        man = read_manifest(m)
        for r in man.rows:
            rows.append({**r, "abspath": str(man.abspath(r)), "label": int(r["label"]),
                         "maskpath": str(man.abspath({"path": r["mask"]})) if r.get("mask") else None})
    if cfg.data.replay:
        rows += replay_rows(cfg.data.replay, seed=cfg.seed, exclude={r["abspath"] for r in rows})
    if any(family_of(e.family).trains_on_masks for e in cfg.experts):
        missing = [r["maskpath"] for r in rows if r["maskpath"] and not os.path.isfile(r["maskpath"])]
        if missing:  # else every edit would be skipped as unreadable, one warning at a time
            raise ConfigError(f"{len(missing)} of the masks the manifest names are missing (first: {missing[0]}); "
                              "a manifest moved or merged by hand keeps its masks' old relative paths: "
                              "rebuild it with dfx prepare merge")
    return rows


def replay_rows(spec: str, *, seed: int, exclude: set[str]) -> list[dict[str, Any]]:
    """A seeded, class-stratified sample of an older manifest's rows (``data.replay``), marked ``replay``: they
    are trained on by every expert and never validated on. Rows already in the new data are left out."""
    import random


    path, fraction = replay_spec(spec)
    man = read_manifest(path)
    rows = [{**r, "abspath": str(man.abspath(r)), "label": int(r["label"]), "replay": "1"} for r in man.rows
            if r.get("split", "") != "test"]
    rows = [r for r in rows if r["abspath"] not in exclude]
    rng = random.Random(seed)
    out = []
    for label in (0, 1):  # stratified, so the replay keeps the old class balance
        group = [r for r in rows if r["label"] == label]
        out += rng.sample(group, max(1, round(fraction * len(group)))) if group else []
    return out


def split_rows(rows: list[dict[str, Any]], e: ExpertConfig, index: int) -> tuple[list[dict], list[dict]]:
    """Train and validation rows of one expert: folds ≠ k / = k, or the ``split`` column. With folds, a row
    marked ``split=train`` is trained on in other folds but never validated on (e.g. simulated fakes that
    follow their parent's fold but must not count in the out-of-fold score)."""
    replay = [r for r in rows if r.get("replay")]
    usable = [r for r in rows if r.get("split", "") != "test" and not r.get("replay")]
    if e.val_fold is not None:
        if not any(r.get("fold", "") != "" for r in usable):
            raise ConfigError(f"experts.{index}.val_fold={e.val_fold}: the manifest has no 'fold' column values "
                              "(run `dfx prepare cluster` first, or validate on split=val)")
        k = str(e.val_fold)
        train = [r for r in usable if r.get("fold", "") not in ("", k)]
        val = [r for r in usable if r.get("fold", "") == k and r.get("split", "") != "train"]
        if not val:
            folds = sorted({r.get("fold", "") for r in usable} - {""})
            raise ConfigError(f"experts.{index}.val_fold={e.val_fold}: no rows in that fold "
                              f"(the manifest's folds: {', '.join(folds)})")
    else:
        val = [r for r in usable if r.get("split", "") == "val"]
        train = [r for r in usable if r.get("split", "") in ("", "train")]
        if not val:
            raise ConfigError(f"experts.{index}: no validation rows: set experts.{index}.val_fold (folds from "
                              "`dfx prepare cluster`) or mark rows split=val in the manifest")
    train = train + replay  # old data against forgetting: trained on, never validated on
    if e.skip_kinds:  # e.g. simulated fakes for an expert that squashes away their fingerprint
        train = [r for r in train if r.get("kind", "") not in e.skip_kinds]
    if not train or len({r["label"] for r in train}) < 2:
        raise ConfigError(f"experts.{index}: the training rows need both real and fake images "
                          f"(got {len(train)} rows)")
    return train, val


def _mixed_precision(mode: str) -> str:
    if mode != "auto":
        return mode
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"  # bf16 autocast is 5-15x slower on CPUs without AMX/AVX512-BF16


def create_backbone(e: ExpertConfig, size: int, model_kwargs: dict[str, Any], index: int = 0) -> nn.Module:
    """The module the expert's file will hold (:func:`inference.experts.create_expert`): pretrained backbone
    weights if given, or exactly a bundle expert's weights with ``init_from`` (training/init_from.py)."""
    from inference.experts import create_expert
    from inference.pretrained import PretrainedError

    if e.init_from:
        from .init_from import load_parent_weights, resolve_parent

        parent = resolve_parent(e, index)
        assert parent is not None
        # The module the parent's file is the state dict of, built for this run's input size and options.
        spec = ExpertSpec(**{**parent.expert.__dict__, "input_size": size, "model_kwargs": dict(model_kwargs)})
        return load_parent_weights(create_expert(spec), parent)
    spec = expert_spec(e, size, (0.0,) * 3, (1.0,) * 3, model_kwargs)
    train_kwargs = {"drop_path_rate": e.drop_path_rate} if e.drop_path_rate else {}
    try:
        return create_expert(spec, e.pretrained, **train_kwargs)
    except PretrainedError as exc:
        raise ConfigError(f"experts: pretrained '{e.pretrained}': {exc}") from exc


def _calibration_inputs(rows: list[dict[str, Any]], size: int, e: ExpertConfig, mean, std, max_pixels: int,
                        limit: int = 256):
    """Up to ``limit`` training images (evenly spaced), each read as inference reads it: what a family that
    calibrates a new expert (a probe's feature statistics) sees."""
    from inference.images import ImageError

    pre = Preprocessor([(size, mode_key(e), tuple(mean), tuple(std))], max_pixels=max_pixels)
    step = max(1, len(rows) // limit)
    for r in rows[::step][:limit]:
        try:
            x = next(iter(pre.prepare(r["abspath"]).values()))
        except ImageError:
            continue
        yield x if x.dim() == 4 else x[None]


def _lr_lambda(warmup: int, total: int, schedule: str, per_step: int = 1):
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


def _save_checkpoint(accelerator, ckpt: Path, ema, progress: dict[str, Any]) -> None:
    """Accelerate state + EMA + progress into ``ckpt.tmp``, then swapped in by renames."""
    from safetensors.torch import save_file

    tmp = ckpt.with_name(ckpt.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    if accelerator.is_main_process:
        save_file({k: v.detach().cpu().contiguous() for k, v in ema.module.state_dict().items()},
                  str(tmp / "ema.safetensors"), metadata={"format": "pt"})
        (tmp / "progress.json").write_text(json.dumps(progress))
        old = ckpt.with_name(ckpt.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        if ckpt.exists():
            os.replace(ckpt, old)
        os.replace(tmp, ckpt)
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


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


def train_expert(cfg: TrainConfig, e: ExpertConfig, index: int, rows: list[dict[str, Any]], accelerator,
                 run_dir: Path, max_size: int | None, resume: bool) -> None:
    from accelerate import skip_first_batches
    from accelerate.utils import set_seed
    from safetensors.torch import load_file, save_file
    from timm.optim import create_optimizer_v2
    from timm.utils import ModelEmaV3
    from tqdm import tqdm

    name = expert_name(e)
    edir = run_dir / "experts" / name
    ckpt = edir / "checkpoint"
    edir.mkdir(parents=True, exist_ok=True)
    d = arch_defaults(e.arch, e.input_size)
    size, mean, std, model_kwargs = d["input_size"], d["mean"], d["std"], d["model_kwargs"]
    train_rows, val_rows = split_rows(rows, e, index)
    expert_seed = cfg.seed + 1000 * index
    set_seed(expert_seed)

    backbone = create_backbone(e, size, model_kwargs, index)
    family = family_of(e.family)
    if family.calibrates and not e.init_from:  # e.g. a new probe: its features standardised on the training images
        family.calibrate(backbone.eval(), _calibration_inputs(train_rows, size, e, mean, std, cfg.data.max_pixels))
    with torch.no_grad():
        feat_dim = family.outputs(backbone.eval(), torch.zeros(1, 3, size, size))[1].shape[1]
    stem = make_stem(e)
    net = TrainNet(backbone, ProjectionHead(feat_dim, cfg.loss.proj_dim) if cfg.loss.nce else None, stem,
                   e.family).train()
    unreachable = freeze_unreachable(net, size)
    if unreachable:
        log.info("[%s] %d parameter tensors cannot reach the outputs (e.g. %s): frozen", expert_name(e),
                 len(unreachable), unreachable[0])
    # Warm-up: the decay ramps up over the first steps ((1+t)/(10+t)), so a short run's EMA is not stuck
    # near the random initialisation.
    ema = ModelEmaV3(backbone, decay=cfg.train.ema_decay, use_warmup=True)

    tc = cfg.train
    to_row = lambda r: Row(r["abspath"], r["label"], r.get("source", ""), r.get("maskpath"))  # noqa: E731
    num_samples = len(train_rows)
    if tc.max_steps_per_epoch:
        num_samples = min(num_samples, tc.max_steps_per_epoch * tc.batch_size)
    sampler = EpochSampler([r["label"] for r in train_rows], seed=expert_seed, balanced=cfg.data.balanced_sampler,
                           num_samples=num_samples)
    from inference.detector import default_workers

    workers = default_workers() if cfg.data.workers is None else cfg.data.workers
    train_ds = TrainDataset([to_row(r) for r in train_rows], size=size, mode=e.preprocess, mean=mean, std=std,
                            aug=cfg.augment, seed=expert_seed, max_pixels=cfg.data.max_pixels,
                            masks=family_of(e.family).trains_on_masks)
    loader = torch.utils.data.DataLoader(train_ds, batch_size=tc.batch_size, sampler=sampler, num_workers=workers,
                                         collate_fn=collate_views, generator=torch.Generator().manual_seed(expert_seed))
    pre = Preprocessor([(size, mode_key(e), tuple(mean), tuple(std))], max_pixels=cfg.data.max_pixels)
    pre.min_decode_size = max_size  # decode exactly as the exported ensemble's Detector will (None: in full)
    val_loader = torch.utils.data.DataLoader(EvalDataset([to_row(r) for r in val_rows], pre),
                                             batch_size=tc.batch_size * 2, num_workers=workers, collate_fn=collate_eval)

    lr = e.lr or cfg.optim.lr
    norms: list[nn.Module] = []
    if e.freeze or e.layer_decay is not None:  # partial fine-tuning: per-group rates, frozen early groups
        from .finetune import frozen_norms, partial_param_groups

        groups = partial_param_groups(net, backbone, e.arch, lr=lr, weight_decay=cfg.optim.weight_decay,
                                      freeze=e.freeze, layer_decay=e.layer_decay)
        opt = create_optimizer_v2(groups, opt=cfg.optim.name, lr=lr, weight_decay=cfg.optim.weight_decay)
        norms = frozen_norms(backbone)
    else:
        opt = create_optimizer_v2(net, opt=cfg.optim.name, lr=lr, weight_decay=cfg.optim.weight_decay)
    net, opt, loader = accelerator.prepare(net, opt, loader)  # moves the stem too: it is part of net
    scorer = nn.Sequential(stem, ema.module)  # what validation scores: the stem, then the EMA weights
    steps_per_epoch = math.ceil(len(loader) / tc.grad_accum)
    total = steps_per_epoch * tc.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg.optim.warmup_steps, total, cfg.optim.schedule,
                                                              per_step=accelerator.num_processes))
    sched = accelerator.prepare(sched)
    ema.module.to(accelerator.device)

    progress: dict[str, Any] = {"epoch": 0, "batches_done": 0, "global_step": 0, "history": [], "skipped": {}}
    if resume and (ckpt / "progress.json").is_file():
        accelerator.load_state(str(ckpt))
        ema.module.load_state_dict(load_file(str(ckpt / "ema.safetensors"), device=str(accelerator.device)))
        progress = json.loads((ckpt / "progress.json").read_text())
        accelerator.print(f"[{name}] resuming at epoch {progress['epoch'] + 1}, batch {progress['batches_done']}, "
                          f"step {progress['global_step']}")
    accelerator.print(f"[{name}] {e.arch} at {size}px ({e.preprocess}); train {len(train_rows)} rows, "
                      f"validate {len(val_rows)} rows"
                      + (f" (fold {e.val_fold})" if e.val_fold is not None else " (split=val)"))
    lw = cfg.loss
    for epoch in range(progress["epoch"], tc.epochs):
        net.train()
        for m in norms:  # frozen stages keep their running statistics too
            m.eval()
        skip = progress["batches_done"]
        it = skip_first_batches(loader, skip) if skip else loader
        # Accelerate's loader calls sampler.set_epoch(its own iteration count) when iteration starts, and a
        # fresh loader (after --resume) counts from 0: set the epoch on the loader itself so both agree.
        sampler.set_epoch(epoch)
        if hasattr(it, "set_epoch"):
            it.set_epoch(epoch)
        sums: dict[str, float] = defaultdict(float)
        n_steps = 0
        bar = tqdm(it, total=len(loader) - skip, desc=f"{name} epoch {epoch + 1}/{tc.epochs}", leave=False,
                   disable=not accelerator.is_local_main_process)
        for batch in bar:
            progress["batches_done"] += 1
            for idx, msg in batch["errors"]:
                if str(idx) not in progress["skipped"]:
                    progress["skipped"][str(idx)] = msg
                    log.warning("[%s] skipped unreadable image: %s", name, msg)
            if batch["weak"] is None or batch["weak"].shape[0] < 2:
                continue
            with accelerator.accumulate(net):
                labels = batch["label"]
                n = labels.shape[0]
                logits, proj, patches = net(torch.cat([batch["weak"], batch["strong"]]))
                # A patch expert's CE is per patch: each patch carries the image's label, or its mask's share.
                targets = torch.cat([batch["mask_weak"], batch["mask_strong"]]) if patches is not None else None
                parts = combined_loss(logits[:n], logits[n:], proj[:n].float(), proj[n:].float(), labels,
                                      w_ce=lw.ce, w_kl=lw.kl, w_nce=lw.nce, label_smoothing=lw.label_smoothing,
                                      kl_temperature=lw.kl_temperature, nce_temperature=lw.nce_temperature,
                                      patch_logits=patches, patch_masks=targets)
                accelerator.backward(parts.total)
                if accelerator.sync_gradients and cfg.optim.grad_clip:
                    accelerator.clip_grad_norm_(net.parameters(), cfg.optim.grad_clip)
                opt.step()
                sched.step()
                opt.zero_grad()
            values = {k: getattr(parts, k).detach().item() for k in ("total", "ce", "kl", "nce")}
            for k, v in values.items():
                sums[k] += v
            n_steps += 1
            if accelerator.sync_gradients:
                progress["global_step"] += 1
                ema.update(accelerator.unwrap_model(net).backbone, step=progress["global_step"])
                accelerator.log({f"{name}/{k}": v for k, v in values.items()} | {f"{name}/lr": sched.get_last_lr()[0]},
                                step=progress["global_step"])
                bar.set_postfix(loss=f"{values['total']:.3f}")
                every = tc.checkpoint_every_steps
                if every and progress["global_step"] % every == 0 and progress["batches_done"] < len(loader):
                    _save_checkpoint(accelerator, ckpt, ema, progress)
        bar.close()
        probs, errors = predict_rows(scorer, val_loader, accelerator.device, accelerator)
        for idx, msg in errors:
            if f"val:{idx}" not in progress["skipped"]:
                progress["skipped"][f"val:{idx}"] = msg
                log.warning("[%s] skipped unreadable validation image: %s", name, msg)
        y = [val_rows[i]["label"] for i in probs]
        m = metrics_by_source(y, list(probs.values()), [val_rows[i].get("source", "") for i in probs])["overall"] \
            if probs else {}
        entry = {"epoch": epoch + 1, "step": progress["global_step"],
                 **{f"train_{k}": v / max(1, n_steps) for k, v in sums.items()},
                 "val_auc": m.get("auc"), "val_accuracy": m.get("accuracy"), "val_n": len(probs)}
        progress["history"].append(entry)
        accelerator.log({f"{name}/val_auc": entry["val_auc"] or float("nan"),
                         f"{name}/train_loss": entry.get("train_total", float("nan"))}, step=progress["global_step"])
        auc = "n/a" if entry["val_auc"] is None else f"{entry['val_auc']:.4f}"
        accelerator.print(f"[{name}] epoch {epoch + 1}/{tc.epochs}: step {entry['step']}, loss "
                          f"{entry.get('train_total', float('nan')):.4f} (ce {entry.get('train_ce', 0):.4f}, "
                          f"kl {entry.get('train_kl', 0):.4f}, nce {entry.get('train_nce', 0):.4f}), "
                          f"val AUC (EMA) {auc} on {len(probs)} images")
        progress["epoch"], progress["batches_done"] = epoch + 1, 0
        _save_checkpoint(accelerator, ckpt, ema, progress)

    # -- final: EMA weights and validation predictions, written as one folder -----------------------
    probs, _ = predict_rows(scorer, val_loader, accelerator.device, accelerator)
    if accelerator.is_main_process:
        final = edir / "final"
        tmp = edir / "final.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_file({k: v.detach().cpu().contiguous() for k, v in ema.module.state_dict().items()},
                  str(tmp / "ema.safetensors"), metadata={"format": "pt"})
        vrows = [{"path": val_rows[i]["abspath"], "label": val_rows[i]["label"], "source": val_rows[i].get("source", ""),
                  "fold": val_rows[i].get("fold", ""), "prob": p} for i, p in probs.items()]
        write_manifest(tmp / "val_predictions.csv", vrows)
        metrics = metrics_by_source([r["label"] for r in vrows], [r["prob"] for r in vrows],
                                    [r["source"] for r in vrows]) if vrows else {}
        save_metrics(tmp / "metrics.json", metrics)
        if vrows:
            save_roc_png(tmp / "roc.png", {name: ([r["label"] for r in vrows], [r["prob"] for r in vrows])},
                         title=f"{name}: validation ROC (EMA)")
        info = {"name": name, "arch": e.arch, "family": e.family, "stem": e.stem, "stages": e.stages, "crops": e.crops,
                "input_size": size, "preprocess": e.preprocess, "mean": list(mean),
                "std": list(std), "model_kwargs": model_kwargs, "weight": e.weight, "val_fold": e.val_fold,
                "pretrained": e.pretrained, "n_train": len(train_rows), "n_val": len(val_rows),
                "n_replay": sum(1 for r in train_rows if r.get("replay")),
                "init_from": _parent_provenance(e, index),
                "steps": progress["global_step"], "history": progress["history"], "skipped": progress["skipped"],
                "val_auc": metrics.get("overall", {}).get("auc") if metrics else None}
        (tmp / "expert.json").write_text(json.dumps(info, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        shutil.rmtree(ckpt, ignore_errors=True)
    accelerator.wait_for_everyone()


def _parent_provenance(e: ExpertConfig, index: int) -> dict[str, Any] | None:
    from .init_from import resolve_parent

    parent = resolve_parent(e, index)
    return parent.provenance() if parent else None


def finalize_run(cfg: TrainConfig, run_dir: Path, processes: int = 1) -> dict[str, Any]:
    """Ensemble out-of-fold predictions, metrics, ROC, and the decision rule, into ``run.json``."""
    experts = [expert_name(e) for e in cfg.experts]
    weights = {expert_name(e): e.weight for e in cfg.experts}
    per_path: dict[str, dict[str, Any]] = {}
    curves = {}
    infos = {}
    for name in experts:
        final = run_dir / "experts" / name / "final"
        infos[name] = json.loads((final / "expert.json").read_text())
        vp = read_manifest(final / "val_predictions.csv")
        curves[name] = ([int(r["label"]) for r in vp.rows], [float(r["prob"]) for r in vp.rows])
        for r in vp.rows:
            row = per_path.setdefault(r["path"], {"path": r["path"], "label": int(r["label"]), "source": r["source"],
                                                  "fold": r["fold"], "num": 0.0, "den": 0.0})
            row["num"] += weights[name] * float(r["prob"])
            row["den"] += weights[name]
            row[f"prob_{name}"] = float(r["prob"])
    oof = [{**{k: v for k, v in r.items() if k not in ("num", "den")},
            "prob": r["num"] / r["den"] if r["den"] else 0.5} for r in per_path.values()]
    write_manifest(run_dir / "oof.csv", oof)
    y = [r["label"] for r in oof]
    s = [r["prob"] for r in oof]
    dc = cfg.decision
    decision = choose_decision(y, s, dc.rule, dc.target_fpr, dc.band_error)
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
    rows = _rows(cfg)
    for i, e in enumerate(cfg.experts):  # fail on data problems before any expert trains
        split_rows(rows, e, i)
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
            train_expert(cfg, e, i, rows, accelerator, run_dir, max_size, resume)
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
