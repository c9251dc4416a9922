"""The only module that reads environment variables; every one is named BATON_*."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """BATON_CACHE_DIR, else ~/.cache/baton: where the demo model is generated."""
    explicit = os.environ.get("BATON_CACHE_DIR")
    return Path(explicit) if explicit else Path.home() / ".cache" / "baton"
