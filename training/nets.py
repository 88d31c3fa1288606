"""What trains: the expert (built by its family, inference/families/), its fixed stem and the NCE projection."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from inference.bundle import ExpertSpec
from inference.families import get as family_of
from inference.preprocess import Preprocessor

from .config import ConfigError, ExpertConfig, expert_name
from .losses import ProjectionHead


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


def make_stem(spec: ExpertSpec) -> nn.Module:
    """The expert's fixed stem (no parameters) as its family defines it, or ``nn.Identity``."""
    return family_of(spec.family).stem(spec) or nn.Identity()


def expert_spec(e: ExpertConfig, size: int, mean: Any, std: Any, model_kwargs: dict[str, Any]) -> ExpertSpec:
    """The bundle spec of a configured expert (the file and its hash are filled in at export)."""
    return ExpertSpec(name=expert_name(e), arch=e.arch, input_size=size, mean=tuple(mean), std=tuple(std),
                      file=f"{expert_name(e)}.safetensors", sha256="0" * 64, family=e.family,
                      preprocess=e.preprocess, weight=e.weight, model_kwargs=dict(model_kwargs),
                      crops=e.crops if e.preprocess == "tiles" else 1, stem=e.stem,
                      stages=tuple(e.stages) if e.stages is not None else None, options=dict(e.options),
                      description=e.description)


def create_backbone(e: ExpertConfig, spec: ExpertSpec, index: int = 0) -> nn.Module:
    """The module the expert's file will hold (:func:`inference.experts.create_expert`): pretrained backbone
    weights if given, or exactly a bundle expert's weights with ``init_from`` (training/init_from.py)."""
    from inference.experts import create_expert
    from inference.pretrained import PretrainedError

    if e.init_from:
        from .init_from import load_parent_weights, resolve_parent

        parent = resolve_parent(e, index)
        assert parent is not None
        # The module the parent's file is the state dict of, built for this run's input size and options.
        build = ExpertSpec(**{**parent.expert.__dict__, "input_size": spec.input_size,
                              "model_kwargs": dict(spec.model_kwargs)})
        return load_parent_weights(create_expert(build), parent)
    train_kwargs = {"drop_path_rate": e.drop_path_rate} if e.drop_path_rate else {}
    try:
        return create_expert(spec, e.pretrained, **train_kwargs)
    except PretrainedError as exc:
        raise ConfigError(f"experts: pretrained '{e.pretrained}': {exc}") from exc


def calibration_inputs(rows: list[dict[str, Any]], spec: ExpertSpec, max_pixels: int, limit: int = 256):
    """Up to ``limit`` training images (evenly spaced), each read as inference reads it: what a family that
    calibrates a new expert (a probe's feature statistics) sees."""
    from inference.images import ImageError

    pre = Preprocessor([spec.preprocess_key], max_pixels=max_pixels)
    step = max(1, len(rows) // limit)
    for r in rows[::step][:limit]:
        try:
            x = next(iter(pre.prepare(r["abspath"]).values()))
        except ImageError:
            continue
        yield x if x.dim() == 4 else x[None]
