"""Bundles round-trip, refuse damage with a message naming the file, and load in plain timm."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from inference import BundleError, Detector
from inference.bundle import read_spec
from inference.bundle_init import init_bundle
from inference.experts import expert_forward, load_expert

from .conftest import TINY_SIZE, dfx


@pytest.fixture()
def bundle_copy(tiny_bundle: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(tiny_bundle, dst)
    return dst


def _edit_json(bundle: Path, fn) -> None:
    path = bundle / "ensemble.json"
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def test_init_is_seeded_and_round_trips(tmp_path, odd_images):
    a = init_bundle(["convnext_atto"], tmp_path / "a", input_size=TINY_SIZE, seed=3)
    b = init_bundle(["convnext_atto"], tmp_path / "b", input_size=TINY_SIZE, seed=3)
    c = init_bundle(["convnext_atto"], tmp_path / "c", input_size=TINY_SIZE, seed=4)
    assert a.experts[0].sha256 == b.experts[0].sha256 != c.experts[0].sha256
    images = [odd_images["rgb.jpg"], odd_images["rgba.png"]]
    first = Detector(tmp_path / "a", device="cpu").predict(images)
    again = Detector(tmp_path / "a", device="cpu").predict(images)
    other = Detector(tmp_path / "c", device="cpu").predict(images)
    assert [p.score for p in first] == [p.score for p in again]
    assert [p.score for p in first] != [p.score for p in other]


def test_existing_bundle_is_not_overwritten_by_accident(tmp_path):
    init_bundle(["convnext_atto"], tmp_path / "x", input_size=TINY_SIZE)
    with pytest.raises(BundleError, match="already exists"):
        init_bundle(["convnext_atto"], tmp_path / "x", input_size=TINY_SIZE)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temporary folder left behind"


def test_replacing_a_bundle_keeps_the_files_people_put_beside_it(tmp_path):
    """`dfx export --force` over a published folder: the model card, licence and notes stay; the replaced
    bundle's weight files do not (stale weights beside a new manifest)."""
    old = init_bundle(["convnext_atto"], tmp_path / "x", input_size=TINY_SIZE, seed=3)
    (tmp_path / "x" / "MODEL_CARD.md").write_text("# card\n")
    (tmp_path / "x" / "notes").mkdir()
    (tmp_path / "x" / "notes" / "a.txt").write_text("kept")
    new = init_bundle(["resnet10t"], tmp_path / "x", input_size=TINY_SIZE, seed=4, overwrite=True)
    names = sorted(p.name for p in (tmp_path / "x").iterdir())
    assert old.experts[0].file not in names and new.experts[0].file in names
    assert (tmp_path / "x" / "MODEL_CARD.md").read_text() == "# card\n"
    assert (tmp_path / "x" / "notes" / "a.txt").read_text() == "kept"
    assert Detector(tmp_path / "x", device="cpu").spec.experts[0].arch == "resnet10t"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temporary folder left behind"


def test_tampered_bytes_are_refused(bundle_copy):
    spec = read_spec(bundle_copy)
    path = bundle_copy / spec.experts[0].file
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="checksum mismatch") as info:
        Detector(bundle_copy, device="cpu")
    assert spec.experts[0].file in str(info.value)


def test_wrong_checksum_in_json_is_refused(bundle_copy):
    _edit_json(bundle_copy, lambda d: d["experts"][1].update(sha256="ab" * 32))
    with pytest.raises(BundleError, match="checksum mismatch") as info:
        Detector(bundle_copy, device="cpu")
    assert read_spec(bundle_copy).experts[1].file in str(info.value)


def test_missing_expert_file_is_refused(bundle_copy):
    spec = read_spec(bundle_copy)
    (bundle_copy / spec.experts[1].file).unlink()
    with pytest.raises(BundleError, match="missing expert file") as info:
        Detector(bundle_copy, device="cpu")
    assert spec.experts[1].file in str(info.value)


def test_unknown_format_version_is_refused(bundle_copy):
    _edit_json(bundle_copy, lambda d: d.update(format="dfx-ensemble/2"))
    with pytest.raises(BundleError, match="unsupported bundle format 'dfx-ensemble/2'"):
        Detector(bundle_copy, device="cpu")


def test_malformed_json_is_refused(bundle_copy):
    (bundle_copy / "ensemble.json").write_text('{"format": "dfx-ensemble/1", "name": ')
    with pytest.raises(BundleError, match=r"ensemble.json: malformed JSON at line 1"):
        Detector(bundle_copy, device="cpu")


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["experts"][0].pop("arch"), "missing field 'arch'"),
    (lambda d: d["experts"][0].update(preprocess="stretch"), "unknown preprocess mode 'stretch'"),
    (lambda d: d["experts"][0].update(file="../../etc/passwd"), "must be a plain file name"),
    (lambda d: d.update(uncertain_band=[0.7, 0.9]), "uncertain_band"),
    (lambda d: d.update(experts=[]), "at least one expert"),
    (lambda d: d["experts"][0].update(mean=[0.5, 0.5]), "list of 3 finite numbers"),
    # issue 26, item 5: values that passed and then gave NaN scores, a pinned 0.5 or a KeyError traceback
    (lambda d: d["experts"][0].update(mean=[float("nan"), 0.5, 0.5]), "list of 3 finite numbers"),
    (lambda d: d["experts"][0].update(std=[float("inf"), 0.5, 0.5]), "list of 3 finite numbers"),
    (lambda d: d["experts"][0].update(calibration={"temperature": 1e-300}), "calibration.temperature must be"),
    (lambda d: d["experts"][0].update(calibration={"temperature": float("inf")}), "calibration.temperature must be"),
    (lambda d: d.update(format="dfx-ensemble/1.12"), "unknown bundle format 'dfx-ensemble/1.12'"),
    (lambda d: d.update(name="x" * 5_000_000), "a name must be 1..200 printable characters, got 5000000"),
    (lambda d: d["experts"][0].update(name="a\x1b[31mred"), "printable"),
])
def test_invalid_fields_are_named(bundle_copy, edit, message):
    _edit_json(bundle_copy, edit)
    with pytest.raises(BundleError, match=message.replace("(", r"\(").replace(".", r"\.")):
        read_spec(bundle_copy)


def test_weights_that_do_not_fit_the_arch_are_refused(bundle_copy):
    """A valid safetensors file with a matching checksum but the wrong tensors."""
    from inference.bundle import sha256_file

    spec = read_spec(bundle_copy)
    path = bundle_copy / spec.experts[0].file
    state = load_file(str(path))
    state.pop(next(iter(state)))
    save_file(state, str(path))
    _edit_json(bundle_copy, lambda d: d["experts"][0].update(sha256=sha256_file(path)))
    with pytest.raises(BundleError, match="weights do not fit 'convnext_atto'"):
        Detector(bundle_copy, device="cpu")


def _reference_input(path: Path, size: int, mode: str, mean, std) -> torch.Tensor:
    """An independent implementation of the bundle's preprocessing contract, as a user would write it."""
    img = Image.open(path).convert("RGB")
    if mode == "squash":
        img = img.resize((size, size), Image.Resampling.BICUBIC)
    else:
        w, h = img.size
        s = size / min(w, h)
        img = img.resize((max(size, round(w * s)), max(size, round(h * s))), Image.Resampling.BICUBIC)
        left, top = (img.width - size) // 2, (img.height - size) // 2
        img = img.crop((left, top, left + size, top + size))
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return ((x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)).unsqueeze(0)


def test_plain_timm_loads_each_expert_strictly_and_agrees(tiny_bundle, odd_images):
    spec = read_spec(tiny_bundle)
    det = Detector(tiny_bundle, device="cpu")
    images = [odd_images["rgb.jpg"], odd_images["rgb.bmp"]]
    preds = det.predict(images)
    for e in spec.experts:
        model = timm.create_model(e.arch, pretrained=False, num_classes=2, **e.model_kwargs)
        model.load_state_dict(load_file(str(tiny_bundle / e.file)), strict=True)
        model.eval()
        for path, pred in zip(images, preds):
            x = _reference_input(path, e.input_size, e.preprocess, e.mean, e.std)
            with torch.no_grad():
                p = torch.softmax(model(x) / e.temperature, dim=1)[0, 1].item()
            assert p == pytest.approx(pred.experts[e.name], abs=1e-5)
    weights = np.array([e.weight for e in spec.experts])
    for pred in preds:
        expected = float(np.dot(weights, [pred.experts[e.name] for e in spec.experts]) / weights.sum())
        assert pred.score == pytest.approx(expected, abs=1e-9)


def test_expert_forward_matches_model_logits(tiny_bundle):
    for e in read_spec(tiny_bundle).experts:
        model = load_expert(e, tiny_bundle)
        x = torch.randn(2, 3, e.input_size, e.input_size)
        with torch.no_grad():
            logits, feature = expert_forward(e, model, x)
            assert torch.allclose(logits, model(x), atol=1e-5)
        assert feature.ndim == 2 and feature.shape[0] == 2


def test_bundle_verbs(tmp_path):
    out = tmp_path / "cli_bundle"
    r = dfx("bundle", "init", "--arch", "convnext_atto", "--arch", "convnext_atto",
            "--input-size", str(TINY_SIZE), "--seed", "1", "--out", str(out))
    assert r.returncode == 0, r.stderr
    spec = read_spec(out)
    assert [e.name for e in spec.experts] == ["convnext_atto-0", "convnext_atto-1"]
    assert spec.experts[0].sha256 != spec.experts[1].sha256, "experts of one arch get different seeds"
    info = dfx("bundle", "info", str(out))
    assert info.returncode == 0 and "convnext_atto-1" in info.stdout and "uncertain if" in info.stdout
    ok = dfx("bundle", "verify", str(out))
    assert ok.returncode == 0 and ok.stdout.startswith("OK"), ok.stdout + ok.stderr
    path = out / spec.experts[1].file
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    bad = dfx("bundle", "verify", str(out))
    assert bad.returncode == 1 and "checksum mismatch" in bad.stdout and spec.experts[1].file in bad.stdout


def test_the_default_bundle_scores_as_the_code_that_wrote_it():
    """A shipped bundle must keep scoring as it did when it shipped, whatever is restructured around it (issue 25
    moved how experts are built; issue 34 moved the default onto onnxruntime). ``tests/data/default_scores_onnx.json``
    holds what the code that exported ``weights/default`` answered for four scikit-image photos, scored in one call
    (the astronaut's face by the face expert too; the INT8 graph runs one image at a time, so the call's batch does
    not matter); onnxruntime picks its kernels by CPU instruction set, so another machine may differ in the last
    float bits, hence 1e-4."""
    import io

    from skimage import data as skdata

    root = Path(__file__).resolve().parent
    golden = json.loads((root / "data" / "default_scores_onnx.json").read_text())
    images = []
    for name in golden["scores"]:
        buf = io.BytesIO()
        Image.fromarray(getattr(skdata, name)()).save(buf, "PNG")
        images.append(buf.getvalue())
    det = Detector(root.parent / "weights" / "default", device="cpu")
    assert det.model_id == golden["bundle"]
    for (name, want), got in zip(golden["scores"].items(), det.predict(images)):
        assert got.label == want["label"], name
        assert got.score == pytest.approx(want["score"], abs=1e-4), name
        assert got.experts == pytest.approx(want["experts"], abs=1e-4), name


def test_save_pretrained_writes_what_from_pretrained_reads(tiny_bundle, tmp_path, odd_images):
    """Load and save are symmetric (as diffusers' from_pretrained / save_pretrained): the default bundle (a CLIP probe
    stored as packed INT8) is written back byte for byte, and a bundle saved with test-time views in effect scores
    as the Detector that saved it."""
    root = Path(__file__).resolve().parent.parent / "weights" / "default"
    det = Detector.from_pretrained(root, device="cpu")
    again = det.save_pretrained(tmp_path / "default")
    assert [e.sha256 for e in again.experts] == [e.sha256 for e in read_spec(root).experts]
    assert again.to_json() == read_spec(root).to_json()

    views = Detector(tiny_bundle, device="cpu", tta=["hflip"])
    views.save_pretrained(tmp_path / "tta")
    assert read_spec(tmp_path / "tta").tta == ("hflip",)
    images = [odd_images["rgb.jpg"], odd_images["rgb.bmp"]]
    assert [p.score for p in Detector(tmp_path / "tta", device="cpu").predict(images)] == \
        [p.score for p in views.predict(images)]
    with pytest.raises(BundleError, match="already exists"):
        views.save_pretrained(tmp_path / "tta")


def test_expert_descriptions_are_the_bundles_own_or_their_familys(tiny_bundle, tmp_path):
    """What each expert reads, for people (issue 28): a bundle may say it; otherwise its family does. It changes
    nothing a score depends on (the model id stays), and it is checked like every other field."""
    det = Detector(tiny_bundle, device="cpu")
    described = {e["name"]: e["description"] for e in det.describe()["experts"]}
    assert described["convnext_atto"] == "the whole image (resized to 64 px): convnext_atto trained end to end"
    assert described["vit_tiny_patch16_224"].startswith("the whole image (centre crop at 64 px)")
    copy = tmp_path / "described"
    shutil.copytree(tiny_bundle, copy)
    manifest = json.loads((copy / "ensemble.json").read_text())
    manifest["experts"][0]["description"] = "texture of the whole picture"
    (copy / "ensemble.json").write_text(json.dumps(manifest))
    other = Detector(copy, device="cpu")
    assert other.describe()["experts"][0]["description"] == "texture of the whole picture"
    assert other.model_id == det.model_id
    for bad in ("", "two\nlines", "x" * 201, 7):
        manifest["experts"][0]["description"] = bad
        (copy / "ensemble.json").write_text(json.dumps(manifest))
        with pytest.raises(BundleError, match="description"):
            read_spec(copy)
