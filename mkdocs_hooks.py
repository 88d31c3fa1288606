"""MkDocs hooks: the pages that are generated, never copied by hand (``mkdocs.yml`` ``hooks:``).

- ``reference/cli.md``: every verb's ``--help`` (inference/cli/reference.py), from the parsers themselves;
- ``reference/api.md``: the OpenAPI document the API serves (inference/api/reference.py over
  ``inference.api.openapi.openapi_spec``, the function behind ``GET /openapi.json``);
- ``model-card.md``: ``weights/default/MODEL_CARD.md``, the card the bundle ships with.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent


def generated_pages() -> dict[str, str]:
    """``{path under docs/: Markdown}`` of every generated page."""
    from inference.api.config import ApiConfig
    from inference.api.openapi import openapi_spec
    from inference.api.reference import api_reference
    from inference.cli.reference import cli_reference

    card = (ROOT / "weights" / "default" / "MODEL_CARD.md").read_text()
    if card.startswith("---\n"):  # the Hugging Face style YAML header is metadata, not prose
        card = card.split("\n---\n", 1)[1]
    card = card.replace("](../../docs/", "](")  # the card's links into docs/, from where the site puts it
    return {"reference/cli.md": cli_reference(), "reference/api.md": api_reference(openapi_spec(ApiConfig())),
            "model-card.md": card}


def on_files(files, config):  # noqa: ANN001  (MkDocs' hook signature)
    from mkdocs.structure.files import File

    for path, text in generated_pages().items():
        files.append(File.generated(config, path, content=text))
    return files
