"""``dfx prepare simulate``: fakes that carry a decoder's up-sampling fingerprint and nothing else.

Why: every image generator ends in a decoder that up-samples (transposed convolutions, nearest or
bilinear up-sampling followed by convolutions, pixel-shuffle), and up-sampling leaves periodic
correlations between neighbouring pixels. Passing *real* photographs through small auto-encoders
with such decoders gives fakes whose content, size and format are the parent's — only the
fingerprint differs — so a detector trained on them cannot lean on content shortcuts (the idea of
AutoGAN, "Detecting and Simulating Artifacts in GAN Fake Images", Zhang et al. 2019).

Each decoder kind is a small fully convolutional auto-encoder (down-samples ×4, up-samples ×4 with its
kind), trained briefly on random crops of the reals to reconstruct them (L1), so its outputs look like
their parents; ``KIND:random`` keeps the seeded random initialisation instead. Trained decoders are
saved under ``<out>/decoders/`` (safetensors) and reused on a rerun, which, with per-item seeds and the
item store, makes the job resumable: finished items are skipped. Each output keeps its parent's format
(JPEG q95 for a JPEG parent, else PNG), so the file format says nothing about the label.

Rows are marked ``split=train``: simulated fakes are training material. Training keeps them out of
every validation and out-of-fold score (they follow their parent's fold, so they never train where the
parent is validated), so thresholds and reported numbers stay about real generators.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from inference.images import ImageError, load_image
from inference.manifest import read_manifest

from .items import ItemStore, item_id, item_seed

log = logging.getLogger("dfx.prep.simulate")
KINDS = ("transconv", "nearest", "bilinear", "pixelshuffle")
MIN_SIDE = 32


def _up(kind: str, cin: int, cout: int) -> nn.Module:
    """One ×2 up-sampling block of the given kind (the part whose fingerprint we want)."""
    if kind == "transconv":
        return nn.ConvTranspose2d(cin, cout, kernel_size=4, stride=2, padding=1)
    if kind in ("nearest", "bilinear"):
        return nn.Sequential(nn.Upsample(scale_factor=2, mode=kind), nn.Conv2d(cin, cout, 3, padding=1))
    if kind == "pixelshuffle":
        return nn.Sequential(nn.Conv2d(cin, cout * 4, 3, padding=1), nn.PixelShuffle(2))
    raise ValueError(f"unknown decoder kind '{kind}' (known: {', '.join(KINDS)})")


class SimAutoencoder(nn.Module):
    """Encoder ×4 down (strided convs), decoder ×4 up with ``kind``; input and output in [-1, 1]."""

    def __init__(self, kind: str, width: int = 32) -> None:
        super().__init__()
        self.kind = kind
        act = nn.LeakyReLU(0.2)
        self.encoder = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), act,
            nn.Conv2d(width, width, 4, stride=2, padding=1), act,
            nn.Conv2d(width, 2 * width, 4, stride=2, padding=1), act,
        )
        self.decoder = nn.Sequential(
            _up(kind, 2 * width, width), act,
            _up(kind, width, width), act,
            nn.Conv2d(width, 3, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        ph, pw = (-h) % 4, (-w) % 4
        if ph or pw:
            x = nn.functional.pad(x, (0, pw, 0, ph), mode="reflect")
        return self.decoder(self.encoder(x))[..., :h, :w]


def parse_decoders(text: str) -> list[tuple[str, bool]]:
    """``transconv,nearest:random`` → ``[("transconv", True), ("nearest", False)]`` (kind, trained)."""
    out = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        kind, _, mode = part.partition(":")
        if kind not in KINDS or mode not in ("", "random", "trained"):
            raise ValueError(f"--decoders: '{part}' is not KIND or KIND:random (kinds: {', '.join(KINDS)})")
        out.append((kind, mode != "random"))
    if not out:
        raise ValueError("--decoders: give at least one decoder kind")
    return out


def _to_tensor(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))).float().div(127.5).sub(1.0)


def _to_image(t: torch.Tensor) -> Image.Image:
    arr = t.clamp(-1, 1).add(1).mul(127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr)


def train_decoder(kind: str, crops_from: list[np.ndarray], *, steps: int, minutes: float | None, seed: int,
                  crop: int = 64, batch: int = 8, width: int = 32) -> tuple[SimAutoencoder, dict[str, Any]]:
    """A seeded auto-encoder of ``kind``, trained ``steps`` steps (or until ``minutes`` pass) to
    reconstruct random crops of ``crops_from``. Returns the model (eval mode) and what happened."""
    torch.manual_seed(seed)
    model = SimAutoencoder(kind, width)
    rng = np.random.default_rng(seed)
    usable = [a for a in crops_from if min(a.shape[:2]) >= crop]
    info: dict[str, Any] = {"kind": kind, "width": width, "steps": 0, "l1": None}
    if steps <= 0 or not usable:
        return model.eval(), info
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    start = time.monotonic()
    loss = torch.tensor(float("nan"))
    for step in range(steps):
        if minutes is not None and time.monotonic() - start > minutes * 60:
            break
        xs = []
        for _ in range(batch):
            a = usable[int(rng.integers(len(usable)))]
            y, x = int(rng.integers(0, a.shape[0] - crop + 1)), int(rng.integers(0, a.shape[1] - crop + 1))
            xs.append(_to_tensor(a[y:y + crop, x:x + crop]))
        xb = torch.stack(xs)
        loss = (model(xb) - xb).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        info["steps"] = step + 1
    info["l1"] = round(loss.item(), 5)
    return model.eval(), info


@torch.inference_mode()
def simulate_image(model: SimAutoencoder, arr: np.ndarray) -> Image.Image:
    """Pass one RGB array through the auto-encoder at its native resolution."""
    return _to_image(model(_to_tensor(arr)[None])[0])


def _load_or_train(root: Path, kind: str, trained: bool, sample: list[np.ndarray], *, steps: int,
                   minutes: float | None, seed: int) -> tuple[SimAutoencoder, dict[str, Any]]:
    """The decoder saved by an earlier run (so a resumed job uses the very same one), else a new one."""
    from safetensors.torch import load_file, save_file

    from inference.files import write_atomic

    name = kind if trained else f"{kind}-random"
    wfile, ifile = root / f"{name}.safetensors", root / f"{name}.json"
    if wfile.is_file() and ifile.is_file():
        info = json.loads(ifile.read_text())
        model = SimAutoencoder(kind, int(info["width"]))
        model.load_state_dict(load_file(str(wfile)), strict=True)
        return model.eval(), info
    model, info = train_decoder(kind, sample if trained else [], steps=steps if trained else 0, minutes=minutes,
                                seed=item_seed(seed, f"decoder:{name}"))
    info["name"] = name
    root.mkdir(parents=True, exist_ok=True)
    tmp = wfile.with_name(f".{wfile.name}.tmp")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, wfile)
    write_atomic(ifile, json.dumps(info, indent=2))
    return model, info


def simulate(reals_manifest: str, out_dir: str | os.PathLike[str], *, decoders: str = ",".join(KINDS),
             per_image: int = 1, train_steps: int = 300, train_minutes: float | None = None, seed: int = 0,
             max_side: int | None = 1024, progress: bool = True) -> dict[str, Any]:
    """Make ``per_image`` simulated fakes per real (decoders taken in turn); resumable; writes
    ``<out_dir>/manifest.csv`` with ``kind=simulated``, ``source=simulated:<decoder>``, ``parent``."""
    from tqdm import tqdm

    from inference.files import write_atomic

    kinds = parse_decoders(decoders)
    reals = read_manifest(reals_manifest, require_labels=False)
    paths = [reals.abspath(r) for r in reals.rows]
    out = Path(out_dir)
    store = ItemStore(out, image_format="png", jpeg_quality=95)
    skipped: list[dict[str, str]] = []

    def get(p: Path, report: bool = True) -> np.ndarray | None:
        """The real as an RGB array, or None (recorded in ``skipped`` when ``report``)."""
        try:
            img = load_image(p)
            if max_side and max(img.size) > max_side:
                img.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
            if min(img.size) < MIN_SIDE:
                raise ImageError("too_small", f"{p}: too small ({img.size[0]}x{img.size[1]}; needs >= {MIN_SIDE} px)")
            return np.asarray(img)
        except ImageError as exc:
            if report:
                skipped.append({"path": str(p), "reason": exc.message})
                log.warning("skipped %s", exc.message)
            return None

    plan = []
    for i, p in enumerate(paths):
        for k in range(per_image):
            kind, trained = kinds[(i + k) % len(kinds)]
            name = kind if trained else f"{kind}-random"
            fmt = "jpg" if p.suffix.lower() in (".jpg", ".jpeg") else "png"
            plan.append((p, k, kind, trained, name, fmt, item_id(f"sim-{name}", str(p), k)))
    todo = [t for t in plan if not store.done(t[6])]
    made = 0
    models: dict[str, tuple[SimAutoencoder, dict[str, Any]]] = {}
    if todo:
        # Decoders train on crops of (at most) 32 reals spread over the manifest, the same ones on every run.
        pick = np.random.default_rng(seed).permutation(len(paths))[:32]
        sample = [a for a in (get(paths[int(j)], report=False) for j in sorted(pick)) if a is not None]
        for _, _, kind, trained, name, _, _ in todo:
            if name not in models:
                log.info("decoder %s: %s", name, "training" if trained else "random weights")
                models[name] = _load_or_train(out / "decoders", kind, trained, sample, steps=train_steps,
                                              minutes=train_minutes, seed=seed)
    for p, k, kind, trained, name, fmt, ident in tqdm(todo, desc="simulate", unit="img", disable=not progress):
        arr = get(p)
        if arr is None:
            continue
        model, info = models[name]
        fake = simulate_image(model, arr)
        diff = np.asarray(fake, dtype=np.float32) - arr.astype(np.float32)
        psnr = float(10 * np.log10(255.0 ** 2 / max(1e-6, float((diff ** 2).mean()))))
        row = {"label": 1, "source": f"simulated:{name}", "kind": "simulated", "parent": str(p), "split": "train",
               "seed": item_seed(seed, ident),
               "params": json.dumps({"decoder": kind, "trained_steps": info.get("steps", 0), "width": info["width"],
                                     "psnr_to_parent": round(psnr, 2)})}
        store.save(ident, fake, row, image_format=fmt)
        made += 1
    manifest = store.assemble()
    write_atomic(out / "skipped.json", json.dumps(skipped, indent=2))
    return {"planned": len(plan), "made": made, "already_done": len(plan) - len(todo), "skipped": skipped,
            "manifest": str(manifest), "decoders": {n: m[1] for n, m in models.items()}}
