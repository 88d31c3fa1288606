"""``dfx``: one command, a verb per job. Each package registers its verbs.

A verb module exposes ``register(subparsers)``, adding its sub-parsers with ``set_defaults(func=...)``;
``func(args)`` returns the exit code. Verb modules are listed under the ``dfx.verbs`` entry-point group
in pyproject.toml, so the core never imports training or data_prep. A verb module must import its
heavy dependencies inside its handlers: ``dfx --help`` stays fast, and a core-only install still lists
verbs from extras (running one says which extra to install).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from importlib.metadata import entry_points
from typing import Sequence

from ..bundle import BundleError
from ..images import ImageError

#: Verb modules of the core, used even when the package is not installed (a bare source checkout).
CORE_VERB_MODULES = ("inference.cli.bundle", "inference.cli.predict", "inference.cli.explain", "inference.cli.serve")


def _verb_modules() -> list[str]:
    modules = list(CORE_VERB_MODULES)
    for ep in sorted(entry_points(group="dfx.verbs"), key=lambda e: e.name):
        if ep.value not in modules:
            modules.append(ep.value)
    return modules


def version_text() -> str:
    """``deepfake-experts X.Y.Z`` and the default bundle's ``name@digest`` (what ``dfx predict`` uses without
    ``--weights``: ``$DFX_WEIGHTS`` or ``weights/default``), or why there is none."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        own = version("deepfake-experts")
    except PackageNotFoundError:
        own = "(not installed: a source checkout)"
    try:
        from ..bundle import bundle_digest, read_spec
        from ..weights import resolve_weights

        path = resolve_weights(None)
        spec = read_spec(path)
        default = f"{spec.name}@{bundle_digest(spec)} ({spec.format}, {path})"
    except (BundleError, FileNotFoundError) as exc:
        default = f"none ({str(exc).splitlines()[0][:200]})"
    return f"deepfake-experts {own}\ndefault bundle: {default}"


class _Version(argparse.Action):
    """``--version``: printed and exit, before a verb is required (reading the bundle only then, never for --help)."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, **kwargs: object) -> None:
        super().__init__(option_strings, dest=dest, nargs=0, default=argparse.SUPPRESS,
                         help="print the package version and the default bundle's digest, then exit")

    def __call__(self, parser: argparse.ArgumentParser, *args: object, **kwargs: object) -> None:
        print(version_text())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dfx",
        description="deepfake-experts: tell real images from generated or manipulated ones.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    parser.add_argument("--version", action=_Version)
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    for name in _verb_modules():
        try:
            module = importlib.import_module(name)
        except ImportError as exc:  # an extra that is not installed (the verb module imports it at top level)
            missing = getattr(exc, "name", None) or str(exc)
            logging.getLogger("dfx").debug("verbs of %s unavailable: %s", name, missing)
            continue
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except (BundleError, ImageError, FileNotFoundError, ValueError, RuntimeError) as exc:
        if args.verbose >= 2:
            raise
        print(f"dfx {args.verb}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"dfx {args.verb}: interrupted", file=sys.stderr)
        return 130

