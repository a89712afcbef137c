"""Deployment formats (installed as `edit2deploy.exporters`). One module per format, found via `FORMATS`."""

from __future__ import annotations

FORMATS: dict[str, str] = {}  # format name -> module path; filled as formats land
