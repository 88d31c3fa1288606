"""The CLI reference as Markdown, generated from the argparse parsers themselves (one source of truth: ``--help``).

The docs site's "CLI reference" page is this function's output (``mkdocs_hooks.py`` renders it at build time), so a
new option or verb reaches the docs the moment it reaches ``--help``.
"""

from __future__ import annotations

import argparse
import os
from contextlib import contextmanager
from typing import Iterator

WIDTH = 100  #: help text is wrapped at this width, whatever terminal builds the docs


@contextmanager
def _columns(width: int) -> Iterator[None]:
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(width)  # argparse's HelpFormatter reads the terminal width from here
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = old


def verbs(parser: argparse.ArgumentParser, prefix: str = "dfx") -> list[tuple[str, argparse.ArgumentParser, str]]:
    """Every verb under ``parser``, depth first: ``(command, parser, one-line help)``; ``dfx bundle`` and its own
    verbs (``dfx bundle init``, ...) both appear."""
    out = []
    for action in parser._actions:  # argparse keeps sub-parsers only here
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            for name, sub in action.choices.items():
                command = f"{prefix} {name}"
                out.append((command, sub, helps.get(name, "")))
                out.extend(verbs(sub, command))
    return out


def cli_reference(parser: argparse.ArgumentParser | None = None) -> str:
    """Markdown: a table of every verb, then each verb's ``--help`` verbatim under its own heading."""
    if parser is None:
        from . import build_parser

        parser = build_parser()
    with _columns(WIDTH):
        found = verbs(parser)
        lines = ["# CLI reference", "",
                 "Generated from the parsers at build time: each section is exactly what `--help` prints. "
                 "Every option that reads an environment variable names it.", "",
                 "| command | what it does |", "| --- | --- |"]
        lines += [f"| [`{cmd}`](#{_anchor(cmd)}) | {text.replace('|', '/')} |" for cmd, _, text in found]
        lines += ["", "## dfx", "", "```text", parser.format_help().rstrip(), "```", ""]
        for cmd, sub, _ in found:
            lines += [f"## {cmd}", "", "```text", sub.format_help().rstrip(), "```", ""]
    return "\n".join(lines)


def _anchor(command: str) -> str:
    """The id MkDocs gives the heading ``## dfx bundle init`` (the toc extension's slugify)."""
    return command.lower().replace(" ", "-")
