"""The only module that reads environment variables; every one is named BATON_*."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """BATON_CACHE_DIR, else ~/.cache/baton: where the demo model is generated."""
    explicit = os.environ.get("BATON_CACHE_DIR")
    return Path(explicit) if explicit else Path.home() / ".cache" / "baton"


ENV_ONLY_SETTINGS = {
    "BATON_CACHE_DIR": ("~/.cache/baton", "where the demo model is generated (once) and kept"),
}
"""Settings that have no command-line flag: variable -> (default, what it sets)."""


def variable(name: str) -> str:
    """The variable of setting `name` (a flag, such as --lease-ttl-s, or its bare name)."""
    return "BATON_" + name.removeprefix("--").upper().replace("-", "_")


def setting(name: str) -> str | None:
    """BATON_<NAME> (name upper-cased, dashes as underscores), or None when unset or empty."""
    value = os.environ.get(variable(name))
    return value or None
