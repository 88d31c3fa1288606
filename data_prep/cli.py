"""``dfx prepare VERB``: manifests, embeddings, clustering into folds (and, with their issue, new fakes)."""

from __future__ import annotations

import argparse
import json
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prepare", help="build manifests, embed and cluster images into folds",
                       description="Data preparation: manifests from folders, embeddings, FAISS clustering into "
                                   "cluster-disjoint folds.")
    verbs = p.add_subparsers(dest="prepare_verb", metavar="STEP", required=True)

    ix = verbs.add_parser("index", help="a manifest from folders of images",
                          description="Write a manifest with one row per image file under the folders (recursive).")
    ix.add_argument("folders", nargs="+", metavar="DIR")
    ix.add_argument("--label", choices=("real", "fake"), default=None, help="label of every image found")
    ix.add_argument("--from-competition", metavar="LABEL_FILE", default=None,
                    help="take labels from a competition label file (img_name,target); unlisted files are left out")
    ix.add_argument("--source", default=None, help="source name (default: the folder's name)")
    ix.add_argument("--kind", default=None, help="kind (default: real or fake)")
    ix.add_argument("-o", "--output", required=True, help="manifest CSV to write")
    ix.set_defaults(func=_index)

    mg = verbs.add_parser("merge", help="concatenate manifests", description="Concatenate manifests; paths are "
                          "re-rooted to the output's folder and extra columns kept.")
    mg.add_argument("inputs", nargs="+", metavar="MANIFEST")
    mg.add_argument("-o", "--output", required=True)
    mg.set_defaults(func=_merge)

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


def _index(args: argparse.Namespace) -> int:
    from .manifests import index_folders

    label = None if args.label is None else int(args.label == "fake")
    n = index_folders(args.folders, args.output, label=label, source=args.source, kind=args.kind,
                      from_competition=args.from_competition)
    print(f"wrote {args.output}: {n} images", file=sys.stderr)
    return 0


def _merge(args: argparse.Namespace) -> int:
    from .manifests import merge_manifests

    n = merge_manifests(args.inputs, args.output)
    print(f"wrote {args.output}: {n} rows", file=sys.stderr)
    return 0


def _embed(args: argparse.Namespace) -> int:
    from .embed import embed_manifest

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
