"""See ../shared/ARCHITECTURE.md; this package is built by its own issue."""
