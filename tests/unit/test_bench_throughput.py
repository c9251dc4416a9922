"""`baton bench throughput` on the CPU with a generated model: the request sets, the flags, the JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from baton.services.bench.datasets import parse_range, random_requests, sharegpt_requests
from baton.services.cli import main
from baton.shared.tokenizer import Tokenizer


def test_random_requests_follow_the_ranges_and_the_seed() -> None:
    a = random_requests(50, (3, 9), (2, 5), vocab_size=5000, seed=1)
    assert a == random_requests(50, (3, 9), (2, 5), vocab_size=5000, seed=1)
    assert a != random_requests(50, (3, 9), (2, 5), vocab_size=5000, seed=2)
    assert all(3 <= len(r.prompt_token_ids) <= 9 and 2 <= r.output_len <= 5 for r in a)
    assert all(0 <= t < 5000 for r in a for t in r.prompt_token_ids)


@pytest.mark.parametrize("text", ["0,5", "9,3", "a,b", "1,2,3"])
def test_bad_ranges_are_named(text: str) -> None:
    with pytest.raises(ValueError, match="--input-len"):
        parse_range(text, "--input-len")


def test_sharegpt_pairs_are_read_and_filtered(tmp_path: Path, llama_dir: Path) -> None:
    tokenizer = Tokenizer.from_dir(llama_dir)
    assert tokenizer is not None
    turns = [
        {"from": "human", "value": "Tell me a story about a dragon."},
        {"from": "gpt", "value": "Once upon a time " * 5},
    ]
    data = [{"conversations": turns}] * 3 + [{"conversations": turns[:1]}, {"id": "no turns"}]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(data))
    requests = sharegpt_requests(path, 3, tokenizer, seed=0, max_len=4096)
    assert len(requests) == 3 and all(r.output_len >= 4 for r in requests)
    with pytest.raises(ValueError, match="only 3 usable"):
        sharegpt_requests(path, 4, tokenizer, seed=0, max_len=4096)


def test_cli_writes_the_report(tmp_path: Path, llama_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "result.json"
    argv = ["bench", "throughput", "--model", str(llama_dir), "--num-prompts", "6", "--input-len", "4,20"]
    assert main([*argv, "--output-len", "3,6", "--device", "cpu", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    (baton,) = report["results"]
    assert baton["system"] == "baton" and baton["num_requests"] == 6 and baton["output_tokens_per_s"] > 0
    assert report["workload"]["input_len"] == [4, 20]
    if not torch.cuda.is_available():  # refused before any work
        assert main(["bench", "throughput", "--model", str(llama_dir), "--baseline", "hf"]) == 2
        assert "CUDA" in capsys.readouterr().err
