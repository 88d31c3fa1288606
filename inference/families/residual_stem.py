"""Residual experts: a timm backbone that sees fixed high-pass residuals instead of the image itself.

Why: a detector trained from scratch on a small collection learns its content, format and size
shortcuts (see weights/default/MODEL_CARD.md). Generators leave their clearest traces in how
neighbouring pixels relate — every decoder up-samples, and up-sampling correlates each pixel with its
neighbours in a fixed pattern. A fixed, parameter-free stem that removes the content and keeps those
relations lets the backbone learn the traces rather than the subjects:

- ``npr``: the Neighbouring Pixel Relationship residual of NPR (Tan et al., CVPR 2024),
  ``x − up(down(x))`` with nearest-neighbour down- and up-sampling by 2: each pixel minus the top-left
  pixel of its 2×2 cell. An image that was up-sampled ×2 by nearest neighbour (aligned with the cell
  grid) has a residual of exactly zero; a camera image does not.
- ``srm``: three fixed SRM high-pass filters (the rich-model kernels of Fridrich & Kodovský, as used by
  Zhou et al. 2018 and the competition's 3rd-place team) on each colour channel, truncated to ±3/255·scale.

The stem has no parameters, so an expert of family ``residual`` stores exactly the state dict of
``timm.create_model(arch, num_classes=2, **model_kwargs)`` (plain timm loads it with ``strict=True``);
``stem`` in ``ensemble.json`` says which residual to compute before it. Residuals are computed on the
normalised tensor, after preprocessing — which for residual experts should be ``tiles`` (native-
resolution crops), because any resize re-creates or wipes out exactly the pixel relations they read.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

STEMS = ("npr", "srm")


def npr_residual(x: torch.Tensor) -> torch.Tensor:
    """``x − up(down(x))``: each pixel minus the top-left pixel of its 2×2 cell (N, C, H, W; H, W even
    or not — an odd last row/column is compared with its own cell's anchor too)."""
    anchor = x[..., ::2, ::2]
    up = anchor.repeat_interleave(2, dim=-2).repeat_interleave(2, dim=-1)
    return x - up[..., : x.shape[-2], : x.shape[-1]]


def _srm_kernels() -> torch.Tensor:
    """The three classic 5×5 SRM kernels (second order, KV, and a first-order edge), each normalised."""
    k1 = torch.tensor([[0, 0, 0, 0, 0], [0, -1, 2, -1, 0], [0, 2, -4, 2, 0], [0, -1, 2, -1, 0], [0, 0, 0, 0, 0]],
                      dtype=torch.float32) / 4.0
    k2 = torch.tensor([[-1, 2, -2, 2, -1], [2, -6, 8, -6, 2], [-2, 8, -12, 8, -2], [2, -6, 8, -6, 2],
                       [-1, 2, -2, 2, -1]], dtype=torch.float32) / 12.0
    k3 = torch.tensor([[0, 0, 0, 0, 0], [0, 0, 0, 0, 0], [0, 1, -2, 1, 0], [0, 0, 0, 0, 0], [0, 0, 0, 0, 0]],
                      dtype=torch.float32) / 2.0
    return torch.stack([k1, k2, k3])


class ResidualStem(nn.Module):
    """A fixed residual transform (no parameters; its buffers are not saved in state dicts).

    ``npr`` keeps 3 channels. ``srm`` applies each of its 3 kernels to the per-pixel mean of the colour
    channels, giving 3 channels, so every timm backbone keeps ``in_chans=3``. ``gain`` scales the
    residual up to roughly unit variance for the backbone's first layer.
    """

    def __init__(self, kind: str, gain: float = 4.0) -> None:
        super().__init__()
        if kind not in STEMS:
            raise ValueError(f"unknown residual stem '{kind}' (known: {', '.join(STEMS)})")
        self.kind = kind
        self.gain = float(gain)
        if kind == "srm":
            self.register_buffer("kernels", _srm_kernels()[:, None], persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "npr":
            return npr_residual(x) * self.gain
        grey = x.mean(dim=1, keepdim=True)
        r = F.conv2d(grey, self.kernels.to(grey.dtype), padding=2)
        return torch.clamp(r * self.gain, -3.0, 3.0)

    def extra_repr(self) -> str:
        return f"kind={self.kind}, gain={self.gain}"


class ResidualNet(nn.Module):
    """A stem in front of a timm model, exposing the timm calls the project uses (``forward``,
    ``forward_features``, ``forward_head``, ``get_classifier``). Load weights into ``.model``."""

    def __init__(self, stem: ResidualStem, model: nn.Module) -> None:
        super().__init__()
        self.stem, self.model = stem, model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.stem(x))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(self.stem(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> Any:
        return self.model.forward_head(x, pre_logits=pre_logits)

    def get_classifier(self) -> nn.Module:
        return self.model.get_classifier()
