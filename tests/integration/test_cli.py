"""The `baton` console script as a user runs it, in real subprocesses."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

BATON = str(Path(sys.executable).parent / "baton")


def baton(*args: str, cache: Path, timeout_s: float = 180) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "BATON_CACHE_DIR": str(cache)}
    return subprocess.run(
        [BATON, *args], capture_output=True, text=True, env=env, timeout=timeout_s, check=False
    )


@pytest.mark.integration
def test_generate_on_the_demo_model(tmp_path: Path) -> None:
    first = baton("generate", "Once upon a time", "--max-tokens", "6", cache=tmp_path)
    assert first.returncode == 0, first.stderr
    assert "generating the demo model" in first.stderr
    assert "prompt: 'Once upon a time'" in first.stdout and "(6 tokens, length)" in first.stdout
    second = baton("generate", "Once upon a time", "--max-tokens", "6", cache=tmp_path)
    assert second.returncode == 0 and "generating" not in second.stderr  # generated once, reused
    assert second.stdout == first.stdout  # greedy by default: the same text


@pytest.mark.integration
def test_tiny_model_then_generate_with_it(tmp_path: Path) -> None:
    out_dir = tmp_path / "qwen"
    made = baton(
        "tiny-model", str(out_dir), "--arch", "qwen2", "--seed", "3", "--shards", "2", cache=tmp_path
    )
    assert made.returncode == 0, made.stderr
    assert (out_dir / "model.safetensors.index.json").is_file()
    gen = baton(
        "generate",
        "--model",
        str(out_dir),
        "--chat",
        "Hello",
        "--max-tokens",
        "4",
        "--temperature",
        "0.8",
        "--seed",
        "1",
        cache=tmp_path,
    )
    assert gen.returncode == 0, gen.stderr
    assert "(4 tokens" in gen.stdout or "tokens, stop)" in gen.stdout


@pytest.mark.integration
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["generate", "--model", "/nonexistent/model"], "config.json not found"),
        (["generate", "hi", "--max-tokens", "0"], "max_tokens must be >= 1"),
        (["generate", "hi", "--top-p", "2"], "top_p must be in (0, 1]"),
        (["tiny-model", "{tmp}"], "already exists and is not an empty directory"),
    ],
)
def test_bad_input_gets_a_clear_message(tmp_path: Path, args: list[str], message: str) -> None:
    (tmp_path / "occupied").write_text("x")
    result = baton(*[a.replace("{tmp}", str(tmp_path)) for a in args], cache=tmp_path)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
