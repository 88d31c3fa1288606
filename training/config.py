"""Training configuration: a YAML file plus ``dotted.key=value`` overrides, checked before any work.

Every section is a dataclass with defaults; unknown keys are errors (a typo must not silently train
with a default). ``training.checks.check_config`` verifies what can be verified before training starts: manifests
exist, architectures are known to timm, loss weights make sense, pretrained files exist.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration that cannot train; the message names the key."""


@dataclass
class DataConfig:
    manifest: list[str] = field(default_factory=list)   #: one or several manifest CSVs
    balanced_sampler: bool = True                         #: draw real and fake equally often
    workers: int | None = None                            #: DataLoader decoding processes (None: cores-1, ≤4)
    max_pixels: int = 64_000_000
    #: ``OLD_MANIFEST[:FRACTION]``: also train on a seeded random FRACTION (default 0.25) of an older manifest's
    #: rows, against forgetting when fine-tuning (they are never validated on)
    replay: str | None = None


@dataclass
class ExpertConfig:
    arch: str = "convnext_atto"
    name: str | None = None              #: default: arch, or arch-f<fold>
    family: str = "timm"                 #: timm | residual (fixed residual stem) | probe (frozen stages + head) | probe_onnx (the same, backbone in onnxruntime) | patch
    stem: str | None = None              #: residual family: npr | srm (see inference.families.residual_stem)
    options: dict[str, Any] = field(default_factory=dict)  #: any other fields the family declares (Family.fields)
    input_size: int | None = None        #: default: the arch's own
    preprocess: str = "squash"           #: squash | crop | tiles (native-resolution crops; see inference.preprocess)
    crops: int = 9                       #: tiles: crops scored per image at validation and inference (square)
    skip_kinds: list[str] = field(default_factory=list)  #: manifest kinds this expert never trains on
    val_fold: int | None = None          #: validate on this fold, train on the others; None: use `split`
    pretrained: str | None = None        #: pkg:NAME (`dfx backbones`), a local file/folder, a hub name, or None
    weight: float = 1.0                  #: weight in the ensemble average
    drop_path_rate: float = 0.0
    stages: list[int] | None = None      #: probe: the frozen backbone's feature indices it pools; patch: [cut]
    lr: float | None = None              #: this expert's learning rate (default optim.lr); a probe's head wants more
    init_from: str | None = None         #: BUNDLE[:EXPERT]: start from that bundle expert's weights (fine-tuning)
    #: partial fine-tuning (training/finetune.py): freeze the first N of timm's coarse layer groups (stem = 1)
    freeze: int = 0
    layer_decay: float | None = None     #: layer-wise lr decay: group i of n trains at lr * layer_decay ** (n - i)
    #: for people: what this expert reads, shown beside its score (default: its family's summary)
    description: str | None = None
    #: ``image`` (the whole image) or ``faces``: the expert scores each face crop at inference (MTCNN, as
    #: ``dfx prepare faces`` cuts them), combined with the whole-image experts by ``decision.face_rule``
    reads: str = "image"
    #: this expert's own manifest(s) instead of ``data.manifest`` (e.g. face crops from ``dfx prepare faces`` for an
    #: expert that reads faces); relative paths as ``data.manifest``'s
    manifest: list[str] | None = None
    #: this expert's own augmentation: any ``augment`` fields, over the run's (a linear head on frozen features of
    #: face crops loses the faint traces a self-blend leaves to JPEG 40 and blur: give it gentler views)
    augment: dict[str, Any] = field(default_factory=dict)
    #: how the head learns: ``sgd`` (the run's CE + KL + NCE; every family) or ``logistic`` (a frozen-feature family,
    #: probe or probe_onnx: an L2 logistic regression fitted in closed form on the features of the augmented views
    #: the run's sampler draws over ``train.epochs``; training/closed_form.py says when SGD's head fails and this not)
    fit: str = "sgd"
    #: fit: logistic: the inverse L2 strength (scikit-learn's C) per training image (an image's views count as one)
    fit_c: float = 0.05


@dataclass
class LossConfig:
    ce: float = 1.0
    kl: float = 0.5
    nce: float = 0.1
    label_smoothing: float = 0.0
    kl_temperature: float = 1.0
    nce_temperature: float = 0.1
    proj_dim: int = 128


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 0
    schedule: str = "cosine"             #: cosine | constant
    grad_clip: float | None = 1.0


@dataclass
class TrainLoopConfig:
    epochs: int = 3
    batch_size: int = 16
    grad_accum: int = 1
    ema_decay: float = 0.995
    mixed_precision: str = "auto"        #: auto (bf16 on a GPU that has it, else no) | no | bf16 | fp16
    checkpoint_every_steps: int = 0      #: 0: only at epoch ends
    max_steps_per_epoch: int | None = None


@dataclass
class AugmentConfig:
    """Two views per image. Weak: flip, sometimes JPEG. Strong: JPEG at random quality, random
    rescaling, blur, noise, colour jitter. Both views see JPEG and resizing so that file format and
    size are not usable cues."""

    hflip_p: float = 0.5
    weak_jpeg_p: float = 0.5
    jpeg_quality: tuple[int, int] = (40, 100)
    rescale: tuple[float, float] = (0.5, 1.5)
    strong_rescale_p: float = 0.5
    blur_p: float = 0.3
    noise_p: float = 0.2
    color_p: float = 0.3


@dataclass
class DecisionConfig:
    """How the bundle's threshold and uncertain band are chosen on out-of-fold predictions:
    ``youden`` maximises TPR − FPR; ``fpr`` takes the lowest threshold whose FPR ≤ target_fpr.
    The band (``band``) is the narrowest outside which at most ``band_error`` of the verdicts on each side are
    wrong, or (``quantile``) runs from the score below which at most ``band_error`` of fakes fall to the score
    above which at most ``band_error`` of reals fall; either is widened to contain the threshold."""

    rule: str = "youden"
    target_fpr: float = 0.05
    band_error: float = 0.05
    #: ``verdict_error``: the narrowest band outside which at most ``band_error`` of the verdicts are wrong on each
    #: side; ``quantile``: between the band_error-quantile of fakes and the (1 - band_error)-quantile of reals
    band: str = "verdict_error"
    #: with experts that read faces: how an image's score is made from the whole-image experts' and its most
    #: suspicious face's (inference/bundle.py ``FACE_RULES``: max | noisy_or)
    face_rule: str = "max"
    #: with experts that read faces: a face counts only from the score above which at most this share of the real
    #: images' faces fall out of fold (the bundle's ``face_gate``), so faces add few false alarms; None: every face
    face_gate_fpr: float | None = None


@dataclass
class TrainConfig:
    output: str = "runs/train"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    experts: list[ExpertConfig] = field(default_factory=lambda: [ExpertConfig()])
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    decision: DecisionConfig = field(default_factory=DecisionConfig)
    config_dir: str = "."                #: where relative paths in the file are resolved (set by the loader)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("config_dir")
        return d


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node: Any = tree
    for i, k in enumerate(keys[:-1]):
        if isinstance(node, list):
            if not k.isdigit() or int(k) >= len(node):
                raise ConfigError(f"override '{dotted}': '{'.'.join(keys[:i])}' has no item {k}")
            node = node[int(k)]
        else:
            node = node.setdefault(k, {})
            if not isinstance(node, (dict, list)):
                raise ConfigError(f"override '{dotted}': '{'.'.join(keys[:i + 1])}' is not a section")
    last = keys[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ConfigError(f"override '{dotted}': no item {last}")
        node[int(last)] = value
    else:
        node[last] = value


def _build(cls: type, raw: Any, where: str) -> Any:
    """Dataclass from a dict, rejecting unknown keys and coercing simple types."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'config'}: must be a mapping, got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(f"{where or 'config'}: unknown key(s) {', '.join(unknown)} "
                          f"(known: {', '.join(k for k in fields if k != 'config_dir')})")
    kwargs = {}
    for name, value in raw.items():
        key = f"{where}.{name}" if where else name
        default = cls.__dataclass_fields__[name]
        sub = {"data": DataConfig, "loss": LossConfig, "optim": OptimConfig, "train": TrainLoopConfig,
               "augment": AugmentConfig, "decision": DecisionConfig}.get(name) if cls is TrainConfig else None
        if sub:
            kwargs[name] = _build(sub, value, key)
        elif cls is TrainConfig and name == "experts":
            if not isinstance(value, list) or not value:
                raise ConfigError("experts: must be a non-empty list")
            kwargs[name] = [_build(ExpertConfig, e, f"experts.{i}") for i, e in enumerate(value)]
        elif cls is ExpertConfig and name == "augment":
            checked = _build(AugmentConfig, value, key)  # known fields, right types
            kwargs[name] = {k: getattr(checked, k) for k in value}
        elif (cls is DataConfig or cls is ExpertConfig) and name == "manifest":
            kwargs[name] = [str(v) for v in (value if isinstance(value, list) else [value])]
        else:
            kwargs[name] = _coerce(value, default, key)
    return cls(**kwargs)


def _coerce(value: Any, f: dataclasses.Field, key: str) -> Any:
    t = str(f.type)
    if value is None:
        if "None" in t:
            return None
        raise ConfigError(f"{key}: may not be empty")
    try:
        if t.startswith("tuple"):
            if not isinstance(value, (list, tuple)) or len(value) != 2:
                raise ConfigError(f"{key}: must be a pair [low, high], got {value!r}")
            cast = int if "int" in t else float
            return (cast(value[0]), cast(value[1]))
        if t.startswith("list[int]"):
            items = value if isinstance(value, list) else [value]
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in items):
                raise ConfigError(f"{key}: must be a list of integers, got {value!r}")
            return list(items)
        if t.startswith("list"):
            items = value if isinstance(value, list) else [value]
            if not all(isinstance(v, str) for v in items):
                raise ConfigError(f"{key}: must be a list of names, got {value!r}")
            return list(items)
        if t.startswith("bool"):
            if isinstance(value, bool):
                return value
            raise ConfigError(f"{key}: must be true or false, got {value!r}")
        if t.startswith("int"):
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ConfigError(f"{key}: must be an integer, got {value!r}")
            return int(value)
        if t.startswith("float"):
            if isinstance(value, bool):
                raise ConfigError(f"{key}: must be a number, got {value!r}")
            return float(value)
        if t.startswith("str"):
            return str(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{key}: cannot use {value!r} ({exc})") from exc
    return value


def load_config(path: str | os.PathLike[str] | None, overrides: list[str] | None = None) -> TrainConfig:
    """Read YAML (or start from defaults when ``path`` is None) and apply ``key=value`` overrides."""
    tree: dict[str, Any] = {}
    base = Path.cwd()
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{p}: config file not found")
        try:
            tree = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p}: not valid YAML ({exc})") from exc
        if not isinstance(tree, dict):
            raise ConfigError(f"{p}: the top level must be a mapping")
        base = p.resolve().parent
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key=value (e.g. train.epochs=2)")
        key, _, raw = item.partition("=")
        _set_dotted(tree, key.strip(), yaml.safe_load(raw) if raw.strip() else None)
    cfg = _build(TrainConfig, tree, "")
    cfg.config_dir = str(base)
    # Paths given on the command line are relative to the working directory, paths in the file to it.
    cli_keys = {o.partition("=")[0].strip() for o in overrides or []}
    if "data.manifest" not in cli_keys:
        cfg.data.manifest = [str(base / m) if not Path(m).is_absolute() else m for m in cfg.data.manifest]
    for i, e in enumerate(cfg.experts):
        if e.manifest and f"experts.{i}.manifest" not in cli_keys:
            e.manifest = [str(base / m) if not Path(m).is_absolute() else m for m in e.manifest]
    if "output" not in cli_keys and not Path(cfg.output).is_absolute() and path is not None:
        cfg.output = str(Path.cwd() / cfg.output)
    return cfg


def replay_spec(text: str) -> tuple[str, float]:
    """``OLD_MANIFEST[:FRACTION]`` → (manifest, fraction in (0, 1]); ConfigError naming the key otherwise."""
    path, fraction = text, 0.25
    head, sep, tail = text.rpartition(":")
    if sep and not Path(text).exists():
        try:
            path, fraction = head, float(tail)
        except ValueError:
            raise ConfigError(f"data.replay: '{tail}' is not a fraction (use OLD_MANIFEST:0.25)") from None
    if not 0 < fraction <= 1:
        raise ConfigError(f"data.replay: the fraction must be in (0, 1], got {fraction:g}")
    if not Path(path).is_file():
        raise ConfigError(f"data.replay: {path} not found")
    return path, fraction


def expert_name(e: ExpertConfig) -> str:
    if e.name:
        return e.name
    return e.arch if e.val_fold is None else f"{e.arch}-f{e.val_fold}"


def expert_augment(cfg: TrainConfig, e: ExpertConfig) -> AugmentConfig:
    """The augmentation expert ``e`` trains with: the run's, with the expert's own fields over it."""
    return dataclasses.replace(cfg.augment, **e.augment) if e.augment else cfg.augment
