"""Shared fixtures: generated model directories (real Hugging Face format, random weights)."""

from __future__ import annotations

from pathlib import Path

import pytest

from baton.shared.demo.tiny_model import ARCHITECTURES, write_tiny_model


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One generated model per architecture (seed 0, float32)."""
    root = tmp_path_factory.mktemp("models")
    return {arch: write_tiny_model(root / arch, arch, seed=0) for arch in ARCHITECTURES}


@pytest.fixture(scope="session")
def llama_dir(model_dirs: dict[str, Path]) -> Path:
    return model_dirs["llama"]
