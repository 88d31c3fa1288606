"""Where the weights come from when ``--weights`` is not given."""

from __future__ import annotations

import os
from pathlib import Path

#: The project's default ensemble, relative to the working directory or to a source checkout.
DEFAULT_BUNDLE = Path("weights") / "default"
_CHECKOUT_ROOT = Path(__file__).resolve().parent.parent


class NoWeightsError(FileNotFoundError):
    """No bundle was named and none is found in the default places."""


def resolve_weights(arg: str | os.PathLike[str] | None) -> Path:
    """``--weights`` if given, else ``$DFX_WEIGHTS``, else ``weights/default`` (in the working
    directory, then in the source checkout); else a :class:`NoWeightsError` saying how to get some."""
    if arg:
        return Path(arg)
    env = os.environ.get("DFX_WEIGHTS")
    if env:
        return Path(env)
    for candidate in (Path.cwd() / DEFAULT_BUNDLE, _CHECKOUT_ROOT / DEFAULT_BUNDLE):
        if (candidate / "ensemble.json").is_file():
            return candidate
    raise NoWeightsError(
        "no weights: pass --weights DIR, or set DFX_WEIGHTS=DIR, or put a bundle at weights/default. "
        "Make one with `dfx train` + `dfx export`, or an untrained one for smoke tests with "
        "`dfx bundle init --arch convnext_atto --out DIR`."
    )
