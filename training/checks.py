"""Everything a training config can fail on, checked before training starts, with the key in the message. An
expert's family checks its own fields (the validator bundles use too, inference/families/)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from .config import ConfigError, ExpertConfig, TrainConfig, expert_name, replay_spec


def check_family_fields(e: ExpertConfig, where: str) -> None:
    """The expert's family and its own fields, checked by the family itself (the validator bundles use too)."""
    from inference.bundle import BundleError, FAMILIES, family_of

    if e.family not in FAMILIES:
        raise ConfigError(f"{where}.family: must be one of {', '.join(FAMILIES)}")
    if not isinstance(e.options, dict):
        raise ConfigError(f"{where}.options: must be a mapping of the family's own fields, got {e.options!r}")
    family = family_of(e.family)
    unknown = sorted(set(e.options) - set(family.fields))
    if unknown:
        raise ConfigError(f"{where}.options: family '{e.family}' takes no field {', '.join(unknown)} "
                          f"(its fields: {', '.join(family.fields) or 'none'})")
    owned = {k: getattr(e, k, None) for f in FAMILIES.values() for k in f.fields if hasattr(e, k)}
    raw = {k: list(v) if isinstance(v, tuple) else v for k, v in {**owned, **e.options}.items()}
    try:
        family.parse(raw, where)
    except BundleError as exc:
        raise ConfigError(str(exc)) from None


def check_fit(e: ExpertConfig, where: str) -> None:
    """``fit``: ``sgd`` for any expert, ``logistic`` only where the family's features are frozen."""
    from inference.bundle import family_of

    if e.fit not in ("sgd", "logistic"):
        raise ConfigError(f"{where}.fit: sgd (CE + KL + NCE) or logistic (a frozen-feature head in closed form), "
                          f"got {e.fit!r}")
    if e.fit == "logistic" and not family_of(e.family).fits_head:
        raise ConfigError(f"{where}.fit: logistic fits a head on frozen features; family '{e.family}' trains its "
                          f"backbone (use a probe or probe_onnx expert, or fit: sgd)")
    if isinstance(e.fit_c, bool) or not isinstance(e.fit_c, (int, float)) or not e.fit_c > 0:
        raise ConfigError(f"{where}.fit_c: must be a number > 0, got {e.fit_c!r}")


def expert_face_finder(e: ExpertConfig) -> dict[str, Any] | None:
    """How the face crops an expert that reads faces trains on were found and cut (data_prep/faces.py
    ``finder.json`` beside its manifests), or None when they do not say (MTCNN's defaults). Raises ConfigError when
    its manifests disagree."""
    from inference.faces import finder_of

    found = {json.dumps(finder_of(m), sort_keys=True) for m in e.manifest or []}
    if len(found) > 1:
        raise ConfigError(f"experts ({expert_name(e)}).manifest: crops cut by different finders or searches "
                          f"({' / '.join(sorted(found))})")
    return json.loads(found.pop()) if found else None


def check_config(cfg: TrainConfig) -> None:
    """Everything that can fail before training, failing now with the key in the message."""
    import timm

    from inference.bundle import FACE_RULES, MAX_CROPS, PREPROCESS_MODES, READS

    if not cfg.data.manifest:
        raise ConfigError("data.manifest: no manifest given (data.manifest=PATH)")
    if cfg.data.replay:
        replay_spec(cfg.data.replay)
    for m in cfg.data.manifest:
        if not Path(m).is_file():
            raise ConfigError(f"data.manifest: {m} not found")
    names = set()
    for i, e in enumerate(cfg.experts):
        if not timm.is_model(e.arch):
            raise ConfigError(f"experts.{i}.arch: unknown timm architecture '{e.arch}'")
        if e.preprocess not in PREPROCESS_MODES:
            raise ConfigError(f"experts.{i}.preprocess: must be one of {', '.join(PREPROCESS_MODES)}")
        if e.preprocess == "tiles" and not (1 <= e.crops <= MAX_CROPS and math.isqrt(e.crops) ** 2 == e.crops):
            raise ConfigError(f"experts.{i}.crops: a square number of crops (1, 4, 9, ...) up to {MAX_CROPS}, "
                              f"got {e.crops}")
        check_family_fields(e, f"experts.{i}")
        if e.input_size is not None and not 16 <= e.input_size <= 2048:
            raise ConfigError(f"experts.{i}.input_size: {e.input_size} is out of range 16..2048")
        if e.weight < 0:
            raise ConfigError(f"experts.{i}.weight: must be >= 0")
        if e.lr is not None and not e.lr > 0:
            raise ConfigError(f"experts.{i}.lr: must be a number > 0, got {e.lr}")
        check_fit(e, f"experts.{i}")
        from .finetune import check_partial

        why = check_partial(e.arch, e.family, e.freeze, e.layer_decay, f"experts.{i}")
        if why:
            raise ConfigError(why)
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0")
        if e.pretrained and e.pretrained.startswith("pkg:"):
            from inference.pretrained import SOURCES, package_file

            source = SOURCES.get(e.pretrained[4:])
            if source is None:
                raise ConfigError(f"experts.{i}.pretrained: unknown weight package {e.pretrained} (see `dfx backbones`)")
            if source.arch != e.arch:
                raise ConfigError(f"experts.{i}.pretrained: {e.pretrained} holds weights for {source.arch}, "
                                  f"not {e.arch}")
            if package_file(source) is None:
                raise ConfigError(f"experts.{i}.pretrained: {e.pretrained} is not installed: {source.pip}")
        elif e.pretrained and not Path(e.pretrained).exists() and offline:
            raise ConfigError(f"experts.{i}.pretrained: {e.pretrained} is not a local file or folder, and the "
                              "model hub is offline (HF_HUB_OFFLINE)")
        if e.init_from:
            from .init_from import resolve_parent

            resolve_parent(e, i)
        if e.reads not in READS:
            raise ConfigError(f"experts.{i}.reads: must be one of {', '.join(READS)}, got '{e.reads}'")
        for m in e.manifest or []:
            if not Path(m).is_file():
                raise ConfigError(f"experts.{i}.manifest: {m} not found")
        name = expert_name(e)
        if name in names:
            raise ConfigError(f"experts.{i}: two experts are named '{name}'; set experts.{i}.name")
        names.add(name)
    if any(e.reads == "faces" for e in cfg.experts) and not any(e.reads == "image" and e.weight > 0
                                                                  for e in cfg.experts):
        raise ConfigError("experts: experts that read faces need at least one that reads the whole image (an image "
                          "without a face must still get a score)")
    cut_by = {json.dumps(expert_face_finder(e), sort_keys=True) for e in cfg.experts if e.reads == "faces"}
    if len(cut_by) > 1:
        raise ConfigError("experts: the experts that read faces were given crops cut by different finders or searches "
                          f"({' / '.join(sorted(cut_by))}: finder.json beside each manifest); a bundle finds faces one "
                          "way: cut them all with the same `dfx prepare faces` options")
    gate = cfg.decision.face_gate_fpr
    if gate is not None and (isinstance(gate, bool) or not isinstance(gate, (int, float)) or not 0 < gate < 1):
        raise ConfigError(f"decision.face_gate_fpr: a share in (0, 1) (e.g. 0.05), or null, got {gate!r}")
    if cfg.decision.face_rule not in FACE_RULES:
        raise ConfigError(f"decision.face_rule: one of {', '.join(FACE_RULES)}, got '{cfg.decision.face_rule}'")
    lw = cfg.loss
    for k in ("ce", "kl", "nce"):
        v = getattr(lw, k)
        if not (v >= 0) or v != v:
            raise ConfigError(f"loss.{k}: must be a number >= 0, got {v}")
    if lw.ce + lw.kl + lw.nce <= 0 or lw.ce == 0 and lw.nce == 0:
        raise ConfigError("loss: at least one of loss.ce or loss.nce must be > 0 (KL alone learns nothing)")
    if not 0 <= lw.label_smoothing < 1:
        raise ConfigError("loss.label_smoothing: must be in [0, 1)")
    if lw.kl_temperature <= 0 or lw.nce_temperature <= 0:
        raise ConfigError("loss.kl_temperature and loss.nce_temperature: must be > 0")
    t = cfg.train
    if t.epochs < 1 or t.batch_size < 2 or t.grad_accum < 1:
        raise ConfigError("train: epochs >= 1, batch_size >= 2 and grad_accum >= 1 are required")
    if not 0 <= t.ema_decay < 1:
        raise ConfigError("train.ema_decay: must be in [0, 1)")
    if t.mixed_precision not in ("auto", "no", "bf16", "fp16"):
        raise ConfigError("train.mixed_precision: auto, no, bf16 or fp16")
    if cfg.optim.name not in ("adamw", "sgd", "adam", "lamb"):
        raise ConfigError(f"optim.name: unknown optimiser '{cfg.optim.name}' (adamw, adam, sgd, lamb)")
    if cfg.optim.lr <= 0:
        raise ConfigError("optim.lr: must be > 0")
    if cfg.optim.schedule not in ("cosine", "constant"):
        raise ConfigError("optim.schedule: cosine or constant")
    if cfg.decision.rule not in ("youden", "fpr"):
        raise ConfigError("decision.rule: youden or fpr")
    if cfg.decision.band not in ("verdict_error", "quantile"):
        raise ConfigError("decision.band: verdict_error or quantile")
    a = cfg.augment
    if not 1 <= a.jpeg_quality[0] <= a.jpeg_quality[1] <= 100:
        raise ConfigError("augment.jpeg_quality: [low, high] within 1..100")
    if not 0 < a.rescale[0] <= a.rescale[1]:
        raise ConfigError("augment.rescale: [low, high] with 0 < low <= high")
