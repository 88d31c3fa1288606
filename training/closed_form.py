"""``experts.N.fit: logistic``: a frozen-feature expert's head fitted in closed form inside ``dfx train``.

A probe's backbone never trains, so its head is a linear model on fixed features, and for a faint, local trace on
few images (a self-blended face: real faces against themselves, blended inside a landmark hull) the run's SGD head
stays at chance where an L2 logistic regression on the same features separates them (measured: the default's face
head, cross-entropy 0.66-0.74 after 2-3 epochs of CE + KL + NCE, while the regression on the INT8 graph's features
reached 0.72 AUC on held-out crops, 0.79 leave-one-family-out on face swaps). So such an expert may ask for the
regression instead: the same loader as SGD training (the seeded, class-balanced sampler; both augmented views of
each drawn image, ``epochs`` draws), the frozen features of every view, then ``training.probe.fit_head`` (standardise,
class-balanced L2 logistic regression, ``fit_c``). Its weights go into ``feat_mean``/``feat_std``/``head`` exactly as
``dfx probe`` writes them, so validation, the run's decision and ``dfx export`` treat the expert as any other.

Resumable by epoch: each process writes the features of its share of an epoch's batches to
``<expert>/features/epoch<k>.rank<r>.npz`` (atomically); ``--resume`` keeps the epochs already written.
"""

from __future__ import annotations

import shutil
from typing import Any

import numpy as np
import torch

from inference.files import atomic_path


@torch.inference_mode()
def _epoch_features(run: Any, loader: Any, accelerator: Any, epoch: int,
                    note_skipped: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The frozen features of both views of every image this process draws in ``epoch``, their labels, and the
    row each came from."""
    from tqdm import tqdm

    run.sampler.set_epoch(epoch)
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(epoch)
    backbone = accelerator.unwrap_model(run.net).backbone.eval()
    stem = accelerator.unwrap_model(run.net).stem
    feats, labels, rows = [], [], []
    for batch in tqdm(loader, desc=f"{run.name} features {epoch + 1}", leave=False,
                      disable=not accelerator.is_local_main_process):
        note_skipped(run, batch["errors"], "")
        if batch["weak"] is None:
            continue
        for view in ("weak", "strong"):
            feats.append(backbone.pooled(stem(batch[view])).float().cpu().numpy())
            labels.append(batch["label"].cpu().numpy())
            rows.append(batch["index"].cpu().numpy())
    width = getattr(backbone, "num_features", 0)
    return (np.concatenate(feats) if feats else np.zeros((0, width), np.float32),
            np.concatenate(labels) if labels else np.zeros(0, np.int64),
            np.concatenate(rows) if rows else np.zeros(0, np.int64))


def fit_logistic(cfg: Any, run: Any, accelerator: Any, resume: bool, note_skipped: Any) -> dict[str, float]:
    """Fit the expert's head in closed form on its training views; load it into the model and its EMA copy.
    Returns ``{"ce": ..., "total": ...}``: the fitted head's mean log-loss on the views it was fitted on."""
    from sklearn.metrics import log_loss

    from .probe import fit_head, head_state

    cache = run.edir / "features"
    if not resume and accelerator.is_main_process:
        shutil.rmtree(cache, ignore_errors=True)
    accelerator.wait_for_everyone()
    cache.mkdir(parents=True, exist_ok=True)
    run.net = run.net.to(accelerator.device)  # no optimiser, no gradients: nothing for DDP to wrap
    run.loader = accelerator.prepare(run.loader)  # each process extracts its share of every epoch's batches
    rank, world = accelerator.process_index, accelerator.num_processes
    for epoch in range(cfg.train.epochs):
        mine = cache / f"epoch{epoch}.rank{rank}.npz"
        if not mine.is_file():
            f, y, rows = _epoch_features(run, run.loader, accelerator, epoch, note_skipped)
            with atomic_path(mine, suffix=".npz") as tmp:  # np.savez keeps a name ending .npz as it is
                np.savez(tmp, features=f, labels=y, rows=rows)
        accelerator.wait_for_everyone()
    parts = [np.load(cache / f"epoch{epoch}.rank{r}.npz") for epoch in range(cfg.train.epochs) for r in range(world)]
    x = np.concatenate([p["features"] for p in parts])
    y = np.concatenate([p["labels"] for p in parts])
    rows = np.concatenate([p["rows"] for p in parts])
    good = np.isfinite(x).all(axis=1)
    x, y, rows = x[good], y[good], rows[good]
    if len(set(y.tolist())) < 2:
        raise RuntimeError(f"[{run.name}] fit: logistic needs real and fake training images; its views hold only "
                           f"label {sorted(set(y.tolist()))}")
    # fit_c is per training image: its views are copies of one image, not more evidence, so the regularisation
    # must not weaken as epochs add views (C scales the summed loss: divide it by the views per image)
    images = len(np.unique(rows))
    head = fit_head(x, y, C=run.e.fit_c * images / len(y))
    backbone = accelerator.unwrap_model(run.net).backbone
    state = head_state(backbone, head)
    backbone.load_state_dict(state)
    run.ema.module.load_state_dict(state)
    ce = float(log_loss(y, head.probs(x), labels=[0, 1]))
    accelerator.print(f"[{run.name}] logistic head (C={run.e.fit_c} per image) fitted on {len(y)} views of {images} "
                      f"images over {cfg.train.epochs} epoch(s): {int((y == 1).sum())} fake, {int((y == 0).sum())} "
                      f"real; training log-loss {ce:.4f}")
    return {"ce": ce, "total": ce}
