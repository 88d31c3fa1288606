"""``dfx prepare embed``: one embedding per manifest row, for clustering.

Backbones:
- ``handcrafted``: colour statistics (RGB/HSV moments, colour histograms) plus the radial and angular
  spectrum of a high-pass residual: it groups images by look and by processing history (resampling,
  compression, generator up-sampling leave marks in the residual spectrum). Needs no weights.
- ``timm:ARCH[:WEIGHTS]``: a timm backbone's pooled feature; WEIGHTS is a local file (safetensors/pth) or,
  where a hub is reachable, omitted for the hub's weights.
- ``bundle:DIR[:EXPERT]``: the pooled feature of a trained expert from a bundle.

The output is a ``.npy`` matrix aligned with the manifest's rows, written through a memory map in
chunks: a killed run resumes where it stopped (``<out>.progress.json``), and the file appears under its
final name only when complete. A row that cannot be decoded gets NaN features and is listed in
``<out>.json``; ``dfx prepare cluster`` refuses NaNs unless told to drop those rows.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

from .files import write_atomic
from .images import ImageError, load_image
from .manifest import manifest_sha256, read_manifest

log = logging.getLogger("dfx.prep.embed")
HANDCRAFTED_SIZE = 256


def handcrafted_features(img: Image.Image) -> np.ndarray:
    """88 numbers: RGB+HSV mean/std (12), 8-bin histograms per RGB channel (24), the log power spectrum of
    a high-pass residual in 32 radial and 16 angular bins (48), and residual energy statistics (4)."""
    small = np.asarray(img.resize((HANDCRAFTED_SIZE, HANDCRAFTED_SIZE), Image.Resampling.BILINEAR), dtype=np.float32)
    hsv = np.asarray(img.resize((64, 64), Image.Resampling.BILINEAR).convert("HSV"), dtype=np.float32)
    feats = [small.reshape(-1, 3).mean(0) / 255, small.reshape(-1, 3).std(0) / 255,
             hsv.reshape(-1, 3).mean(0) / 255, hsv.reshape(-1, 3).std(0) / 255]
    for c in range(3):
        h, _ = np.histogram(small[..., c], bins=8, range=(0, 255))
        feats.append(h / h.sum())
    gray = small @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    # high-pass residual: the image minus its 3×3 box blur (a cheap, fixed denoiser)
    pad = np.pad(gray, 1, mode="reflect")
    blur = sum(pad[dy:dy + HANDCRAFTED_SIZE, dx:dx + HANDCRAFTED_SIZE] for dy in range(3) for dx in range(3)) / 9
    res = gray - blur
    power = np.abs(np.fft.fftshift(np.fft.fft2(res))) ** 2
    yy, xx = np.indices(power.shape) - HANDCRAFTED_SIZE // 2
    radius = np.sqrt(xx**2 + yy**2)
    angle = np.arctan2(yy, xx) % np.pi
    rbin = np.minimum((radius / (HANDCRAFTED_SIZE / 2) * 32).astype(int), 31)
    abin = np.minimum((angle / np.pi * 16).astype(int), 15)
    logp = np.log1p(power)
    radial = np.bincount(rbin.ravel(), weights=logp.ravel(), minlength=32) / np.maximum(np.bincount(rbin.ravel(), minlength=32), 1)
    angular = np.bincount(abin.ravel(), weights=logp.ravel(), minlength=16) / np.maximum(np.bincount(abin.ravel(), minlength=16), 1)
    feats += [radial / 10, angular / 10,
              np.array([res.std() / 32, np.abs(res).mean() / 32, float(np.mean(np.abs(res) > 8)), gray.std() / 255])]
    return np.concatenate([np.asarray(f, dtype=np.float32).ravel() for f in feats])


class _Rows(torch.utils.data.Dataset):
    def __init__(self, paths: list[Path], fn: Callable[[Path], Any]) -> None:
        self.paths, self.fn = paths, fn

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            return i, self.fn(self.paths[i]), None
        except ImageError as exc:
            return i, None, exc.message
        except Exception as exc:
            return i, None, f"{self.paths[i]}: {exc!r}"


def _keep(items):
    return items


class _HandcraftedFn:
    def __call__(self, path: Path) -> np.ndarray:
        return handcrafted_features(load_image(path, min_size=HANDCRAFTED_SIZE))


class _TensorFn:
    def __init__(self, pre, key) -> None:
        self.pre, self.key = pre, key

    def __call__(self, path: Path) -> torch.Tensor:
        return self.pre.prepare(path)[self.key]


def build_backbone(spec: str, device: torch.device):
    """(per-row function run in workers, model or None, feature dim, description)."""
    from .preprocess import Preprocessor

    if spec == "handcrafted":
        dim = handcrafted_features(Image.new("RGB", (32, 32))).shape[0]
        return _HandcraftedFn(), None, dim, "handcrafted"
    kind, _, rest = spec.partition(":")
    if kind == "timm":
        import timm

        arch, _, weights = rest.partition(":")
        if not timm.is_model(arch):
            raise ValueError(f"--backbone {spec}: unknown timm architecture '{arch}'")
        if weights:
            if not Path(weights).exists():
                raise FileNotFoundError(f"--backbone {spec}: weights file {weights} not found")
            model = timm.create_model(arch, pretrained=True, num_classes=0, pretrained_cfg_overlay={"file": weights})
        else:
            model = timm.create_model(arch, pretrained=os.environ.get("HF_HUB_OFFLINE", "0") in ("", "0"), num_classes=0)
            if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0"):
                log.warning("--backbone %s: no weights file and the hub is offline: RANDOM weights "
                            "(give timm:%s:/path/to/weights.safetensors)", spec, arch)
        cfg = model.pretrained_cfg
        size = int(cfg.get("input_size", (3, 224, 224))[-1])
        key = (size, "crop", tuple(cfg.get("mean", (0.485, 0.456, 0.406))), tuple(cfg.get("std", (0.229, 0.224, 0.225))))
        model = model.eval().to(device)
        with torch.no_grad():
            dim = model(torch.zeros(1, 3, size, size, device=device)).shape[1]
        return _TensorFn(Preprocessor([key]), key), model, dim, spec
    if kind == "bundle":
        from .bundle import check_files, read_spec
        from .experts import expert_forward, load_expert

        bdir, _, expert = rest.partition(":")
        bspec = read_spec(bdir)
        check_files(bdir, bspec)
        e = next((x for x in bspec.experts if x.name == expert), None) if expert else bspec.experts[0]
        if e is None:
            raise ValueError(f"--backbone {spec}: no expert '{expert}' in {bdir}")
        net = load_expert(e, bdir).to(device)

        class _Pooled(torch.nn.Module):
            def __init__(self, m):
                super().__init__()
                self.m = m

            def forward(self, x):
                if x.dim() == 5:  # a tiled expert: the mean of its crops' pooled features
                    n, k = x.shape[:2]
                    return expert_forward(e, self.m, x.flatten(0, 1))[1].reshape(n, k, -1).mean(dim=1)
                return expert_forward(e, self.m, x)[1]

        model = _Pooled(net).eval()
        with torch.no_grad():
            dim = model(torch.zeros(1, 3, e.input_size, e.input_size, device=device)).shape[1]
        return _TensorFn(Preprocessor([e.preprocess_key]), e.preprocess_key), model, dim, f"bundle:{bdir}:{e.name}"
    raise ValueError(f"--backbone {spec}: use handcrafted, timm:ARCH[:WEIGHTS] or bundle:DIR[:EXPERT]")


def embed_manifest(manifest: str | os.PathLike[str], out: str | os.PathLike[str], *, backbone: str = "handcrafted",
                   batch_size: int = 32, workers: int | None = None, device: str = "auto", chunk: int = 512,
                   progress: bool = True) -> dict[str, Any]:
    """Embed every row; resumable. Returns the summary also written to ``<out>.json``."""
    from tqdm import tqdm

    from .detector import default_workers, resolve_device

    man = read_manifest(manifest, require_labels=False)
    paths = [man.abspath(r) for r in man.rows]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    dev = resolve_device(device)
    fn, model, dim, desc = build_backbone(backbone, dev)
    n = len(paths)
    partial = out.with_name(out.name + ".partial")
    prog_file = out.with_name(out.name + ".progress.json")
    ident = {"manifest_sha256": manifest_sha256(manifest), "backbone": desc, "n": n, "dim": dim}
    done, failed = 0, {}
    if partial.exists() and prog_file.exists():
        prog = json.loads(prog_file.read_text())
        if {k: prog.get(k) for k in ident} == ident:
            done, failed = prog["done"], prog.get("failed", {})
            log.info("resuming %s at row %d of %d", out, done, n)
    if done == 0:
        np.lib.format.open_memmap(partial, mode="w+", dtype=np.float32, shape=(n, dim)).flush()
    mm = np.lib.format.open_memmap(partial, mode="r+")
    workers = default_workers() if workers is None else workers
    bar = tqdm(total=n, initial=done, desc=f"embedding ({desc})", unit="img", disable=not progress)
    for start in range(done, n, chunk):
        idx = list(range(start, min(n, start + chunk)))
        loader = torch.utils.data.DataLoader(_Rows([paths[i] for i in idx], fn), batch_size=batch_size,
                                             num_workers=workers, collate_fn=_keep)
        for batch in loader:
            good = [(i, x) for i, x, _ in batch if x is not None]
            for i, _, err in batch:
                if err is not None:
                    failed[str(idx[i])] = err
                    mm[idx[i]] = np.nan
                    log.warning("unreadable, features set to NaN: %s", err)
            if good:
                if model is None:
                    vecs = np.stack([x for _, x in good])
                else:
                    with torch.inference_mode():
                        vecs = model(torch.stack([x for _, x in good]).to(dev)).float().cpu().numpy()
                for (i, _), v in zip(good, vecs):
                    mm[idx[i]] = v
            bar.update(len(batch))
        mm.flush()
        write_atomic(prog_file, json.dumps({**ident, "done": idx[-1] + 1, "failed": failed}))
    bar.close()
    del mm
    os.replace(partial, out)
    prog_file.unlink(missing_ok=True)
    summary = {**ident, "manifest": str(manifest), "failed": [{"row": int(k), "error": v} for k, v in failed.items()]}
    write_atomic(out.with_suffix(".json"), json.dumps(summary, indent=2) + "\n")
    return summary
