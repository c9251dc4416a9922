"""Fixtures of the integration tier: the offline engine the clusters are compared with."""

from __future__ import annotations

from pathlib import Path

import pytest

from baton import LLM


@pytest.fixture(scope="session")
def offline(llama_dir: Path) -> LLM:
    """The offline LLM on the generated llama model, with the clusters' context length."""
    return LLM(str(llama_dir), max_model_len=1024)
