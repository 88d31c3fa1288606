"""A run's rows: the manifests read (masks checked), replayed old rows, and each expert's train/validation split."""

from __future__ import annotations

import os
from typing import Any

from inference.families import get as family_of
from inference.manifest import read_manifest

from .config import ConfigError, ExpertConfig, TrainConfig, replay_spec


def read_rows(cfg: TrainConfig) -> list[dict[str, Any]]:
    """Every row of ``data.manifest`` (paths made absolute, labels as ints), plus ``data.replay``'s sample."""
    rows = manifest_rows(cfg.data.manifest)
    if cfg.data.replay:
        rows += replay_rows(cfg.data.replay, seed=cfg.seed, exclude={r["abspath"] for r in rows})
    if any(family_of(e.family).trains_on_masks for e in cfg.experts if not e.manifest):
        check_masks(rows)
    return rows


def manifest_rows(manifests: list[str]) -> list[dict[str, Any]]:
    """The rows of ``manifests``: ``abspath``, ``maskpath`` and ``parentpath`` (the real a fake or a face crop was
    made from) absolute, labels as ints."""
    rows = []
    for m in manifests:
        man = read_manifest(m)
        for r in man.rows:
            rows.append({**r, "abspath": str(man.abspath(r)), "label": int(r["label"]),
                         "maskpath": str(man.abspath({"path": r["mask"]})) if r.get("mask") else None,
                         "parentpath": str(man.abspath({"path": r["parent"]})) if r.get("parent") else None})
    return rows


def check_masks(rows: list[dict[str, Any]]) -> None:
    """Refuse rows whose masks are missing (else every edit would be skipped as unreadable, one warning at a time)."""
    missing = [r["maskpath"] for r in rows if r["maskpath"] and not os.path.isfile(r["maskpath"])]
    if missing:
        raise ConfigError(f"{len(missing)} of the masks the manifest names are missing (first: {missing[0]}); "
                          "a manifest moved or merged by hand keeps its masks' old relative paths: "
                          "rebuild it with dfx prepare merge")


def expert_rows(cfg: TrainConfig, e: ExpertConfig, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows expert ``e`` trains and validates on: its own ``manifest`` (plus the replay sample), else the run's."""
    if not e.manifest:
        return rows
    own = manifest_rows(e.manifest)
    if family_of(e.family).trains_on_masks:
        check_masks(own)
    return own + [r for r in rows if r.get("replay")]


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
