"""Families are plug-ins: shared code never branches on one, and a new one is one class plus its registration."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

from inference.errors import BundleError
from inference.families import REGISTRY, Family, register

from .test_train import write_config

ROOT = Path(__file__).resolve().parent.parent
#: A branch on a family: ``e.family == "patch"``, ``family != ...``, ``family in ("probe", "patch")``, or the
#: duck-typed equivalent (asking a model whether it has a family's own method).
BRANCH = re.compile(r"""family\s*(==|!=)\s*["']|["']\s*(==|!=)\s*[\w.]*family\b|family\s+(not\s+)?in\s*[(\[{]"""
                    r"""|hasattr\([^)]*["'](patch_outputs|patch_logits|feat_mean|pooled)["']""")


def test_no_shared_module_branches_on_a_family():
    """What differs between families is asked of the family (inference/families/), never decided by its name.
    Family names as data (a recipe choosing ``family: probe``, the probe-fitting tool) are fine; a comparison is
    not."""
    found = []
    for package in ("inference", "training", "data_prep", "webui", "serving"):
        for path in sorted((ROOT / package).rglob("*.py")):
            if "families" in path.relative_to(ROOT).parts:
                continue
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if BRANCH.search(line):
                    found.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not found, "\n".join(found)


class ColourNet(nn.Module):
    """A family's network in a few lines: each channel's mean (and, with ``moments=2``, its standard deviation),
    then a linear head."""

    def __init__(self, moments: int = 2) -> None:
        super().__init__()
        self.moments = moments
        self.head = nn.Linear(3 * moments, 2)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        stats = [x.mean(dim=(2, 3)), x.std(dim=(2, 3))][:self.moments]
        return torch.cat(stats, dim=1)

    def forward_head(self, z: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return z if pre_logits else self.head(z)

    def get_classifier(self) -> nn.Module:
        return self.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


class ColourFamily(Family):
    name = "colour-test"
    plain_timm = "not a timm model: per-channel mean (and std with moments 2), then 'head' (Linear(3 * moments, 2))"
    fields = ("moments",)  # a field of its own, in ensemble.json and in training configs (experts.N.options)

    def parse(self, raw, where):
        moments = raw.get("moments", 2)
        if moments not in (1, 2):
            raise BundleError(f"{where}.moments: 1 (mean) or 2 (mean and std), got {moments!r}")
        return {"moments": moments}

    def create(self, spec, **train_kwargs):
        return ColourNet(spec.options["moments"])

    def describe(self, spec) -> str:
        return "colour statistics"


@pytest.fixture()
def colour_family():
    register(ColourFamily())
    yield REGISTRY["colour-test"]
    REGISTRY.pop("colour-test")


def test_a_new_family_trains_exports_loads_and_scores(colour_family, tiny_dataset, tmp_path, odd_images, capsys):
    """Defined here, in the test: no shared module knows it, yet ``dfx train``'s code trains it (CE + KL + NCE,
    EMA, checkpoints), ``dfx export``'s writes it as a bundle, the Detector loads and scores it, explain says it
    has no map, and ``dfx bundle info`` describes it as the family says."""
    from inference import Detector
    from inference.bundle import read_spec
    import argparse

    from inference.cli.bundle import _info
    from training.config import ConfigError, load_config
    from training.export import export_run
    from training.trainer import train

    expert = {"arch": "convnext_atto", "family": "colour-test", "input_size": 64, "val_fold": 0}
    for options, message in (({"moments": 5}, "experts.0.moments: 1 (mean) or 2"),
                             ({"bins": 3}, "family 'colour-test' takes no field bins")):
        bad = write_config(tmp_path / "bad.yaml", tiny_dataset, tmp_path / "bad", experts=[{**expert, "options": options}])
        with pytest.raises(ConfigError, match=re.escape(message)):
            train(load_config(bad))
    cfg_path = write_config(tmp_path / "cfg.yaml", tiny_dataset, tmp_path / "run",
                            experts=[{**expert, "options": {"moments": 1}}], train__epochs=2)
    run = train(load_config(cfg_path))
    bundle = tmp_path / "bundle"
    export_run(run, bundle)
    spec = read_spec(bundle)
    assert [(e.family, e.options) for e in spec.experts] == [("colour-test", {"moments": 1})]
    assert json.loads((bundle / "ensemble.json").read_text())["experts"][0]["moments"] == 1
    det = Detector(bundle, device="cpu")
    assert isinstance(det.models[spec.experts[0].name], ColourNet)
    images = [odd_images["rgb.jpg"], odd_images["rgb.bmp"]]
    preds = det.predict(images)
    assert all(0 <= p.score <= 1 and p.label in ("real", "fake", "uncertain") for p in preds)
    # the same numbers as the family's module read by hand from the file
    from safetensors.torch import load_file

    net = ColourNet(moments=1)
    net.load_state_dict(load_file(str(bundle / spec.experts[0].file)))
    x = det.preprocessor.prepare(images[0])[spec.experts[0].preprocess_key][None]
    with torch.no_grad():
        p = torch.softmax(net(x) / spec.experts[0].temperature, dim=1)[0, 1].item()
    assert p == pytest.approx(preds[0].score, abs=1e-6)
    assert det.explain([Image.open(images[0])])[0].unavailable
    capsys.readouterr()
    assert _info(argparse.Namespace(bundle=str(bundle), json=False)) == 0
    assert "colour statistics" in capsys.readouterr().out
