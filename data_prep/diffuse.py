"""``dfx prepare diffuse``: more fakes from Stable Diffusion (diffusers), as a manifest.

Modes: ``txt2img`` (prompts from a file, from the reals' ``caption`` column, or templates),
``img2img`` and ``inpaint`` (starting from the real images; inpainting masks are random blobs saved
next to each output). Pipelines load through ``AutoPipelineFor{Text2Image,Image2Image,Inpainting}``
from a local folder (or a hub id where a hub is reachable). Items are batched (one pipeline call per
batch, a generator per item, so an item's pixels do not depend on its batch), resumable (finished items
are skipped), and split across processes under ``accelerate launch`` with
``PartialState().split_between_processes``. On a GPU: fp16 and attention slicing.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from inference.images import ImageError, load_image
from inference.manifest import read_manifest
from inference.preprocess import resize_for

from .items import ItemStore, item_id, item_seed

log = logging.getLogger("dfx.prep.diffuse")
MODES = ("txt2img", "img2img", "inpaint")
TEMPLATES = ("a photograph", "a high quality photo of everyday life", "a photo taken with a phone camera",
             "a close-up photo of an object", "a photo of a pet", "a landscape photograph", "a photo of a room",
             "a street photo")


def random_blob_mask(size: int, rng: np.random.Generator, coverage: tuple[float, float] = (0.1, 0.4)) -> np.ndarray:
    """A random ellipse-and-rectangle blob covering roughly ``coverage`` of the image (bool array)."""
    yy, xx = np.mgrid[0:size, 0:size]
    mask = np.zeros((size, size), dtype=bool)
    target = rng.uniform(*coverage)
    while mask.mean() < target:
        cy, cx = rng.uniform(0.2, 0.8, 2) * size
        ry, rx = rng.uniform(0.08, 0.3, 2) * size
        if rng.random() < 0.6:
            mask |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        else:
            mask |= (np.abs(yy - cy) <= ry) & (np.abs(xx - cx) <= rx)
    return mask


def load_prompts(path: str | None) -> list[str]:
    if not path:
        return list(TEMPLATES)
    lines = [ln.strip() for ln in Path(path).read_text(encoding="utf-8").splitlines()]
    prompts = [ln for ln in lines if ln and not ln.startswith("#")]
    if not prompts:
        raise ValueError(f"{path}: no prompts (one per line)")
    return prompts


def _pipeline(model: str, mode: str, device: str):
    import torch
    from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting, AutoPipelineForText2Image

    cls = {"txt2img": AutoPipelineForText2Image, "img2img": AutoPipelineForImage2Image,
           "inpaint": AutoPipelineForInpainting}[mode]
    if not Path(model).exists() and os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0"):
        raise FileNotFoundError(f"--model {model}: not a local folder, and the model hub is offline (HF_HUB_OFFLINE)")
    gpu = device.startswith("cuda")
    kwargs: dict[str, Any] = {"dtype": torch.float16 if gpu else torch.float32}
    try:
        pipe = cls.from_pretrained(model, safety_checker=None, requires_safety_checker=False, **kwargs)
    except TypeError:  # pipelines without a safety checker (SDXL, FLUX, ...)
        pipe = cls.from_pretrained(model, **kwargs)
    pipe = pipe.to(device)
    if gpu:
        pipe.enable_attention_slicing()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def plan_items(mode: str, reals: Any, *, per_image: int, count: int | None, prompts: list[str], seed: int,
               size: int, model_name: str) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """The work list, and the reals skipped (with the reason)."""
    items, skipped = [], []
    if reals is None:
        if mode != "txt2img" or not count:
            raise ValueError("--reals is needed for img2img and inpaint; txt2img without --reals needs --count N")
        for k in range(count):
            ident = item_id(f"txt2img", f"count:{model_name}", k)
            items.append({"id": ident, "parent": "", "prompt": prompts[k % len(prompts)], "seed": item_seed(seed, ident),
                          "source_row": None})
        return items, skipped
    for r in reals.rows:
        path = reals.abspath(r)
        try:
            img = load_image(path, min_size=size)
        except ImageError as exc:
            skipped.append({"path": str(path), "reason": exc.message})
            continue
        if min(img.size) < min(64, size):
            skipped.append({"path": str(path), "reason": f"too small ({img.size[0]}x{img.size[1]}; needs >= 64 px)"})
            continue
        caption = r.get("caption", "").strip()
        for k in range(per_image):
            ident = item_id(mode, str(path), k)
            prompt = caption or prompts[item_seed(seed, ident) % len(prompts)]
            items.append({"id": ident, "parent": str(path), "prompt": prompt, "seed": item_seed(seed, ident),
                          "source_row": r})
    return items, skipped


def diffuse(model: str, mode: str, out_dir: str | os.PathLike[str], *, reals_manifest: str | None = None,
            steps: int = 30, guidance: float = 7.5, strength: float = 0.6, size: int = 512,
            prompts_file: str | None = None, per_image: int = 1, count: int | None = None, seed: int = 0,
            batch_size: int = 4, device: str = "auto", progress: bool = True) -> dict[str, Any]:
    """Generate every missing item and write ``<out_dir>/manifest.csv``; returns a summary."""
    import torch
    from accelerate import PartialState
    from tqdm import tqdm

    if mode not in MODES:
        raise ValueError(f"--mode must be one of {', '.join(MODES)}")
    if size % 8:
        raise ValueError(f"--size {size}: must be a multiple of 8 (the VAE works on 8x8 blocks)")
    state = PartialState()
    dev = str(state.device) if device == "auto" else device
    reals = read_manifest(reals_manifest, require_labels=False) if reals_manifest else None
    model_name = Path(model).name if Path(model).exists() else model
    items, skipped = plan_items(mode, reals, per_image=per_image, count=count, prompts=load_prompts(prompts_file),
                                seed=seed, size=size, model_name=model_name)
    for s in skipped:
        log.warning("skipped %s: %s", s["path"], s["reason"])
    store = ItemStore(out_dir)
    pending = [it for it in items if not store.done(it["id"])]
    made = 0
    if pending:
        pipe = _pipeline(model, mode, dev)
        with state.split_between_processes(pending) as mine:
            bar = tqdm(total=len(mine), desc=f"diffuse {mode}", unit="img", disable=not (progress and state.is_local_main_process))
            for start in range(0, len(mine), batch_size):
                batch = mine[start:start + batch_size]
                gens = [torch.Generator(device="cpu").manual_seed(it["seed"]) for it in batch]
                common: dict[str, Any] = {"prompt": [it["prompt"] for it in batch], "num_inference_steps": steps,
                                          "guidance_scale": guidance, "generator": gens}
                masks = []
                if mode == "txt2img":
                    out = pipe(height=size, width=size, **common).images
                else:
                    inits = [resize_for(load_image(it["parent"], min_size=size), size, "crop") for it in batch]
                    if mode == "img2img":
                        out = pipe(image=inits, strength=strength, **common).images
                    else:
                        from PIL import Image

                        masks = [random_blob_mask(size, np.random.default_rng(it["seed"])) for it in batch]
                        out = pipe(image=inits, mask_image=[Image.fromarray(m.astype(np.uint8) * 255) for m in masks],
                                   strength=strength, height=size, width=size, **common).images
                for i, (it, img) in enumerate(zip(batch, out)):
                    params = {"steps": steps, "guidance": guidance, "size": size, "prompt": it["prompt"], "seed": it["seed"]}
                    if mode != "txt2img":
                        params["strength"] = strength
                    row = {"label": 1, "source": f"{model_name}:{mode}", "kind": "diffusion", "parent": it["parent"],
                           "generator": model_name, "mode": mode, "seed": it["seed"], "params": json.dumps(params)}
                    store.save(it["id"], img.convert("RGB"), row, mask=masks[i] if masks else None)
                    made += 1
                bar.update(len(batch))
            bar.close()
    state.wait_for_everyone()
    manifest = store.assemble() if state.is_main_process else store.root / "manifest.csv"
    summary = {"planned": len(items), "made": made, "already_done": len(items) - len(pending), "skipped": skipped,
               "manifest": str(manifest)}
    if state.is_main_process:
        from inference.files import write_atomic

        write_atomic(store.root / "skipped.json", json.dumps(skipped, indent=2))
    return summary
