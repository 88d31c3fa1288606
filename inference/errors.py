"""The errors shared across the core, in one module that imports nothing of ours (so no import circle runs
through an exception class)."""

from __future__ import annotations


class BundleError(Exception):
    """A bundle that cannot be used; the message names the file and says why."""
