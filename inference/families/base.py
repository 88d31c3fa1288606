"""The family protocol (:class:`Family`, the defaults every family starts from) and the registry."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable

from ..errors import BundleError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from ..bundle import ExpertSpec


class Family:
    """The defaults every family starts from: a timm model with a 2-class head, no extra fields, no map."""

    name: str = ""
    plain_timm: str = "timm.create_model(arch, num_classes=2, **model_kwargs).load_state_dict(file, strict=True)"
    fields: tuple[str, ...] = ()   #: the extra ``ensemble.json`` / config fields this family takes
    format_since: int = 1          #: the bundle format minor version (``dfx-ensemble/1.N``) that introduced it
    trains_on_masks: bool = False  #: training reads each row's edit mask (patch-level targets)
    #: a tensor that experts of this family on one backbone may store once per bundle (``dfx export`` shares it when
    #: byte for byte equal), and the field in which the others name the file that holds it (:meth:`shared_state`)
    shared_tensor: str | None = None
    shared_field: str | None = None
    calibrates: bool = False       #: a new expert is calibrated on training images first (:meth:`calibrate`)
    #: its features are frozen and its head linear, so ``dfx train`` can fit the head in closed form
    #: (``experts.N.fit: logistic``, training/closed_form.py); the model has ``pooled`` and the probe's buffers
    fits_head: bool = False

    # -- the bundle's fields ---------------------------------------------------------------------------------
    def parse(self, raw: dict[str, Any], where: str) -> dict[str, Any]:
        """The family's own fields of an ``ensemble.json`` expert (or a training config's), validated; raises
        BundleError. The default: no fields of its own."""
        no_extra_fields(raw, where, self)
        return {}

    def format_minor(self, spec: "ExpertSpec") -> int:
        """The oldest format minor version that holds this expert (writers only: may import timm)."""
        return self.format_since

    # -- the model ---------------------------------------------------------------------------------------------
    def create(self, spec: "ExpertSpec", **train_kwargs: Any) -> "nn.Module":
        """A freshly initialised module whose state dict the expert's file holds (seed torch first).
        ``train_kwargs``: timm options used only while training (``drop_path_rate``)."""
        return create_timm(spec, **train_kwargs)

    def load_pretrained(self, model: "nn.Module", spec: "ExpertSpec", pretrained: str) -> "nn.Module":
        """``model`` with its backbone's pretrained weights (``pkg:NAME``, a file or a folder; inference/pretrained.py)
        and a fresh 2-class head; raises PretrainedError."""
        from ..pretrained import load_pretrained, pretrained_state

        state = pretrained_state(pretrained, spec.arch)
        if state is None:  # a hub name: timm fetches it (needs a hub)
            import timm

            hub = timm.create_model(pretrained, pretrained=True, num_classes=2, **spec.model_kwargs)
            model.load_state_dict(hub.state_dict())
        else:
            model = load_pretrained(model, pretrained, spec.arch, state=state)
        # A fresh 2-class head with PyTorch's default (fan-in) init. Some timm families initialise classifiers for
        # training from scratch (EfficientNet: uniform in ±1/sqrt(classes), ±0.7 for two): on pretrained features
        # that starts at logits in the tens and a cross-entropy near 3, whose gradients wreck the backbone.
        model.reset_classifier(2)
        return model

    def shared_state(self, spec: "ExpertSpec", bundle_dir: Any) -> dict[str, "torch.Tensor"]:
        """The :attr:`shared_tensor` this expert reads from the file its :attr:`shared_field` names (another expert's,
        in the same bundle, checked by its SHA-256 with the rest), or nothing when it holds its own."""
        source = spec.options.get(self.shared_field) if self.shared_field else None
        if not source:
            return {}
        from pathlib import Path

        from safetensors import safe_open

        path = Path(bundle_dir) / source
        try:
            with safe_open(str(path), framework="pt") as f:
                return {self.shared_tensor: f.get_tensor(self.shared_tensor)}
        except Exception as exc:  # missing file or key, unreadable file: named
            raise BundleError(f"expert '{spec.name}': cannot read its shared {self.shared_tensor} from {path} "
                              f"({exc})") from exc

    def file_state(self, state: dict[str, "torch.Tensor"], pretrained: str | None) -> dict[str, "torch.Tensor"]:
        """The state dict as the bundle file stores it (the default: as it is)."""
        return state

    def calibrate(self, model: "nn.Module", inputs: "Iterable[torch.Tensor]") -> None:
        """Set what a new expert derives from training images before it trains (``inputs``: batches of them, read
        as inference reads them). Only called when :attr:`calibrates`."""

    def stem(self, spec: "ExpertSpec") -> "nn.Module | None":
        """A fixed, parameter-free module applied to the input before the stored module, or None."""
        return None

    def scorer(self, spec: "ExpertSpec", model: "nn.Module") -> "nn.Module":
        """What scores a preprocessed batch: the stored module, behind the family's stem if it has one."""
        stem = self.stem(spec)
        if stem is None:
            return model
        from .residual_stem import ResidualNet

        return ResidualNet(stem, model)

    def outputs(self, model: "nn.Module", x: "torch.Tensor") -> tuple[Any, Any, Any]:
        """Image logits ``(N, 2)``, the pooled pre-logits feature ``(N, D)`` and patch logits ``(N, 2, h, w)`` (or
        None) of the stored module, in one pass: training's NCE term and the embeddings use the feature."""
        features = model.forward_features(x)
        pooled = model.forward_head(features, pre_logits=True)
        return model.get_classifier()(pooled), pooled, None

    # -- what people see ---------------------------------------------------------------------------------------
    def has_map(self, spec: "ExpertSpec") -> bool:
        """Whether one input gives a map of its own (patches), not one number (tiles give a map in any family)."""
        return False

    def map_probs(self, model: "nn.Module", spec: "ExpertSpec", batch: "torch.Tensor") -> "torch.Tensor":
        """Fake-probability grids ``(N, h, w)`` of a batch of inputs: the default is each input's probability,
        a 1×1 grid (at the expert's temperature, as scores are)."""
        import torch

        logits = model(batch).float()
        return torch.softmax(logits / spec.temperature, dim=1)[:, 1][:, None, None]

    def describe(self, spec: "ExpertSpec") -> str:
        """The architecture as a table shows it."""
        return spec.arch

    def summary(self, spec: "ExpertSpec") -> str:
        """What the expert reads, for people (a reviewer's "why do these two disagree"): used where the bundle
        gives the expert no ``description`` of its own."""
        return f"{reads(spec)}: {spec.arch} trained end to end"

    def finetune_check(self, freeze: int, layer_decay: float | None, where: str) -> str | None:
        """Why ``freeze`` / ``layer_decay`` cannot apply to an expert of this family (before the generic checks),
        or None."""
        return None


def reads(spec: "ExpertSpec") -> str:
    """How an expert's input is cut from the image, in words."""
    if getattr(spec, "reads", "image") == "faces":
        return f"each face (MTCNN's upright crop, resized to {spec.input_size} px)"
    if spec.preprocess == "tiles":
        return f"{spec.crops} native-resolution crops of {spec.input_size} px"
    if spec.preprocess == "crop":
        return f"the whole image (centre crop at {spec.input_size} px)"
    return f"the whole image (resized to {spec.input_size} px)"


def create_timm(spec: Any, **train_kwargs: Any) -> Any:
    """``timm.create_model(arch, num_classes=2, **model_kwargs)`` with random weights, as a BundleError naming the
    expert when timm does not know the architecture or its options."""
    import timm

    if not timm.is_model(spec.arch):
        raise BundleError(f"expert '{spec.name}': unknown timm architecture '{spec.arch}'")
    try:
        return timm.create_model(spec.arch, pretrained=False, num_classes=2, **spec.model_kwargs, **train_kwargs)
    except TypeError as exc:
        raise BundleError(f"expert '{spec.name}': bad model_kwargs {spec.model_kwargs} for '{spec.arch}' ({exc})") from exc


REGISTRY: dict[str, Family] = {}


def register(family: Family) -> Family:
    """Make ``family`` known by its name to bundles, configs, training and scoring."""
    if not family.name:
        raise ValueError("a family needs a name")
    REGISTRY[family.name] = family
    return family


def get(name: str) -> Family:
    if name not in REGISTRY:
        raise BundleError(f"unknown expert family '{name}' (this version knows {', '.join(REGISTRY)})")
    return REGISTRY[name]


def no_extra_fields(raw: dict[str, Any], where: str, family: Family) -> None:
    """Refuse another family's field (``stem`` on a probe): it would be silently ignored otherwise."""
    for other in REGISTRY.values():
        for key in other.fields:
            if key not in family.fields and raw.get(key) is not None:
                owners = " or ".join(f.name for f in REGISTRY.values() if key in f.fields)
                raise BundleError(f"{where}.{key}: {key} {raw[key]!r} is only meaningful for family '{owners}' "
                                  f"(this expert is '{family.name}'; only a {owners} expert takes one)")

