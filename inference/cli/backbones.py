"""``dfx backbones``: the pretrained weights usable offline on this machine (as ``timm.list_pretrained()``
lists hub weights)."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("backbones", help="list pretrained backbones usable offline",
                       description="List the pretrained weights that installable packages carry (pkg:NAME: ImageNet CNNs, "
                                   "CLIP ViT-B/16), with their timm architecture, licence, provenance and whether "
                                   "they are installed here. Use one as "
                                   "experts.N.pretrained in a training config or `dfx bundle init --pretrained`.")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_list)


def _list(args: argparse.Namespace) -> int:
    from ..pretrained import list_backbones

    rows = list_backbones()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'name':<22} {'timm arch':<36} {'size':>8}  where")
    for r in rows:
        size = f"{r['size_mb']} MB" if r["installed"] else "-"
        where = r["file"] if r["installed"] else f"not installed: {r['install']}"
        print(f"{r['name']:<22} {r['arch']:<36} {size:>8}  {where}")
        pins = f"; pinned {r['version']}, sha256 {r['sha256'][:16]}…" if r.get("sha256") else ""
        print(f"{'':<22} licence: {r['licence']}; {r['provenance']}{pins}")
    return 0
