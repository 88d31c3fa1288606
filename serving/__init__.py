"""Serving plumbing shared by the API (``dfx serve``) and the web page (``dfx webui``): gunicorn's asyncio
worker in front of a WSGI app, requests buffered before the app sees them, JSON errors throughout.
It imports nothing else of the project (ARCHITECTURE.md: webui imports nothing of inference)."""
