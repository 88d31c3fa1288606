"""The module a ``probe`` expert's file holds (see inference/families/probe.py for the recipe and the layout)."""

from __future__ import annotations

import threading
from typing import Any

import timm
import torch
from torch import nn


def _meta_model(arch: str) -> nn.Module:
    """``arch`` built on the meta device: its class and pretrained config, no memory, no initialisation."""
    with torch.device("meta"):
        return timm.create_model(arch, pretrained=False)


def is_token_model(arch: str, model: nn.Module | None = None) -> bool:
    """Whether ``arch`` is a timm Vision Transformer (a probe then reads class tokens, not feature maps)."""
    from timm.models.vision_transformer import VisionTransformer

    return isinstance(model if model is not None else _meta_model(arch), VisionTransformer)


class ProbeNet(nn.Module):
    """Frozen backbone → pooled stages → standardise → linear head (index 1 = fake).

    Two kinds of backbone:

    - a CNN (``timm.create_model(arch, features_only=True, out_indices=stages)``): each stage's feature map is
      pooled into its per-channel mean and std;
    - a Vision Transformer (``timm.create_model(arch, num_classes=<its pretrained head>)``, blocks after the last
      one read pruned away): stage ``i < depth`` is the class token after block ``i`` (the RINE recipe), stage
      ``depth`` the model's own image embedding (final norm, head: CLIP's projection), L2-normalised (the
      UniversalFakeDetect recipe).

    Several probes of one backbone can share it (:func:`share_backbones`): the backbone then runs once per batch
    of images for all of them.
    """

    def __init__(self, arch: str, stages: tuple[int, ...], model_kwargs: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.stages = tuple(stages)
        meta = _meta_model(arch)
        self.tokens = is_token_model(arch, meta)
        if self.tokens:
            cfg_classes = meta.pretrained_cfg.get("num_classes")
            self.backbone = timm.create_model(arch, pretrained=False, num_classes=int(cfg_classes or 0),
                                              **(model_kwargs or {}))
            depth = len(self.backbone.blocks)
            if not all(0 <= s <= depth for s in self.stages):
                raise ValueError(f"stages {list(self.stages)} out of range for {arch} (blocks 0..{depth - 1}, "
                                 f"{depth} = the image embedding)")
            self.depth = depth
            if depth not in self.stages:  # the embedding is not read: drop what comes after the last block read
                self.backbone.prune_intermediate_layers([max(self.stages)], prune_norm=True, prune_head=True)
            widths = [self.backbone.embed_dim if s < depth else self.backbone.num_classes or self.backbone.embed_dim
                      for s in self.stages]
            self.num_features = sum(widths)
        else:
            self.backbone = timm.create_model(arch, pretrained=False, features_only=True, out_indices=self.stages,
                                              **(model_kwargs or {}))
            self.num_features = 2 * sum(self.backbone.feature_info.channels())
        self.register_buffer("feat_mean", torch.zeros(self.num_features))
        self.register_buffer("feat_std", torch.ones(self.num_features))
        self.head = nn.Linear(self.num_features, 2)
        self.backbone.requires_grad_(False)
        self.backbone.eval()  # from the start: a frozen backbone's batch-norm statistics never move
        self._shared: SharedBackbone | None = None

    def train(self, mode: bool = True) -> "ProbeNet":
        super().train(mode)
        self.backbone.eval()  # frozen: its batch-norm statistics never move
        return self

    def stage_vectors(self, x: torch.Tensor, stages: tuple[int, ...] | None = None) -> dict[int, torch.Tensor]:
        """One pooled vector per stage, ``{stage: (N, D_stage)}``, from a single backbone pass."""
        stages = self.stages if stages is None else tuple(stages)
        if not self.tokens:
            maps = self.backbone(x)
            out = {}
            for s, f in zip(self.stages, maps):
                if s in stages:
                    f = f.float().flatten(2)
                    out[s] = torch.cat([f.mean(dim=2), f.std(dim=2, unbiased=False)], dim=1)
            return out
        blocks = [s for s in stages if s < self.depth]
        out: dict[int, torch.Tensor] = {}
        if self.depth in stages:  # the whole tower: blocks read on the way, then the normalised final tokens
            if blocks:
                final, inter = self.backbone.forward_intermediates(x, indices=blocks, return_prefix_tokens=True,
                                                                   norm=False, output_fmt="NLC")
            else:
                final, inter = self.backbone.forward_features(x), []
            z = self.backbone.forward_head(final)  # class token → head (CLIP: the projection)
            out[self.depth] = nn.functional.normalize(z.float(), dim=1)
        else:
            inter = self.backbone.forward_intermediates(x, indices=blocks, return_prefix_tokens=True, norm=False,
                                                        output_fmt="NLC", intermediates_only=True)
        for s, (_, prefix) in zip(blocks, inter):
            out[s] = prefix[:, 0].float()
        return out

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """The raw (unstandardised) feature vector: the stages' pooled vectors, concatenated in order."""
        vectors = self._shared(x) if self._shared is not None else self.stage_vectors(x)
        return torch.cat([vectors[s] for s in self.stages], dim=1)

    # The names timm models use, so the trainer and the embedding stage treat a probe like any expert.
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return (self.pooled(x) - self.feat_mean) / self.feat_std

    def forward_head(self, z: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return z if pre_logits else self.head(z)

    def get_classifier(self) -> nn.Module:
        return self.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


class SharedBackbone:
    """One frozen backbone read by several probes: the first probe to see a batch runs it for the union of all
    their stages; the others get the same vectors for an equal input (compared by value, so a tiled or
    test-time-augmented batch rebuilt per expert still hits). One entry per thread: a server's threads never
    read each other's batches. ``forwards`` counts backbone passes (tests and benchmarks read it)."""

    def __init__(self, owner: ProbeNet, stages: tuple[int, ...]) -> None:
        self.owner, self.stages, self.forwards = owner, tuple(sorted(set(stages))), 0
        self._local = threading.local()

    def __call__(self, x: torch.Tensor) -> dict[int, torch.Tensor]:
        last = getattr(self._local, "last", None)
        if last is not None and last[0].shape == x.shape and last[0].dtype == x.dtype \
                and last[0].device == x.device and torch.equal(last[0], x):
            return last[1]
        vectors = self.owner.stage_vectors(x, self.stages)
        self.forwards += 1
        self._local.last = (x.clone(), vectors)  # a copy: a caller may refill the same buffer with the next batch
        return vectors

    def clear(self) -> None:
        self._local.last = None


def share_backbones(nets: list[nn.Module]) -> list[SharedBackbone]:
    """Let probes whose backbones are the same (architecture and equal tensors; a ViT pruned after fewer blocks
    counts as the same when its tensors are a subset) run one backbone: the later ones drop theirs (memory: a CLIP
    ViT-B is 350 MB in fp32) and read the vectors of the one that holds the most. Returns the shared runners (one
    per distinct backbone read by two or more probes)."""
    probes = sorted((n for n in nets if isinstance(n, ProbeNet)), key=lambda n: -len(n.backbone.state_dict()))
    groups: list[list[ProbeNet]] = []
    for net in probes:
        for group in groups:
            if _covers(group[0], net):
                group.append(net)
                break
        else:
            groups.append([net])
    runners = []
    for group in groups:
        if len(group) < 2:
            continue
        owner = group[0]
        runner = SharedBackbone(owner, tuple(s for net in group for s in net.stages))
        for net in group:
            if net is not owner:
                net.backbone = owner.backbone
            net._shared = runner
        runners.append(runner)
    return runners


def _covers(owner: ProbeNet, net: ProbeNet) -> bool:
    """Whether ``owner``'s backbone can compute every stage ``net`` reads, with the very same weights."""
    if owner.tokens != net.tokens or type(owner.backbone) is not type(net.backbone):
        return False
    if not owner.tokens and owner.stages != net.stages:  # a features_only CNN returns only the stages it was built for
        return False
    if owner.tokens and (owner.depth != net.depth or
                         (net.depth in net.stages and owner.depth not in owner.stages)):
        return False
    so, sn = owner.backbone.state_dict(), net.backbone.state_dict()
    return all(k in so and so[k].shape == v.shape and so[k].dtype == v.dtype and torch.equal(so[k], v)
               for k, v in sn.items())


#: Linear layers left in fp32 by :func:`quantize_frozen`: a ViT's MLP output layer reads QuickGELU/GELU activations
#: with outliers hundreds of times the typical value, which 8-bit per-tensor activation quantisation destroys
#: (measured on CLIP ViT-B/16: class-token cosine 0.65 after block 11 with it quantised, 0.94 without).
FP32_LINEARS = ("mlp.fc2",)


def quantize_frozen(nets: list[nn.Module]) -> int:
    """CPU only: dynamic INT8 for the linear layers of every frozen ViT probe backbone (weights per output channel,
    activations per batch), except :data:`FP32_LINEARS`. About 1.8x the images/s of fp32 for CLIP ViT-B/16 on an
    AVX2 CPU; scores move a little (bench/int8_check.py measures how much). Shared backbones are quantised once.
    Returns the number of backbones quantised."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    done: dict[int, nn.Module] = {}
    for net in nets:
        if not isinstance(net, ProbeNet) or not net.tokens:
            continue
        key = id(net.backbone)
        if key not in done:
            qconfig = {name: per_channel_dynamic_qconfig for name, m in net.backbone.named_modules()
                       if isinstance(m, nn.Linear) and not name.endswith(FP32_LINEARS)}
            import warnings

            with warnings.catch_warnings():  # torch.ao's eager quantisation announces its move to torchao
                warnings.simplefilter("ignore", category=UserWarning)
                warnings.simplefilter("ignore", category=DeprecationWarning)
                done[key] = quantize_dynamic(net.backbone, qconfig, dtype=torch.qint8)
        net.backbone = done[key]
    return len(done)


def robust_std(std: Any) -> Any:
    """Per-feature scales with a floor (5 % of the median scale): a channel that is nearly constant on the
    training images must not be blown up a millionfold on an image where it moves. NumPy arrays or tensors."""
    if isinstance(std, torch.Tensor):
        return torch.clamp_min(std, 0.05 * float(std.median()) + 1e-6)
    import numpy as np

    return np.maximum(std, 0.05 * float(np.median(std)) + 1e-6)
