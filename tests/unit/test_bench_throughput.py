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
    steps = baton["engine_steps"]  # the timed run's: each prompt token once, each output token but the last
    computed = steps["prefill"]["tokens"] + steps["decode"]["tokens"]
    assert computed == baton["prompt_tokens"] + baton["output_tokens"] - baton["num_requests"]
    assert steps["decode"]["steps"] >= 1 and steps["decode"]["per_step"]["launch_ms"] > 0
    assert "prefill steps (mean" in capsys.readouterr().out
    if not torch.cuda.is_available():  # refused before any work
        assert main(["bench", "throughput", "--model", str(llama_dir), "--baseline", "hf"]) == 2
        assert "CUDA" in capsys.readouterr().err


def test_poisson_gaps_have_the_rate_and_summary_percentiles() -> None:
    from baton.services.bench.serve import RequestRecord, _arrival_gaps, summarize

    gaps = _arrival_gaps(4001, 50.0, seed=3)
    assert gaps[0] == 0 and sum(gaps) / 4000 == pytest.approx(1 / 50, rel=0.1)
    assert _arrival_gaps(3, float("inf"), seed=3) == [0.0, 0.0, 0.0]
    records = [
        RequestRecord(10, 5, ok=True, ttft_s=0.1 * i, latency_s=0.1 * i + 0.4, output_tokens=5)
        for i in range(1, 11)
    ]
    records.append(RequestRecord(10, 5, error="HTTP 503"))
    summary = summarize(records, elapsed_s=2.0, slo_ttft_ms=500, slo_tpot_ms=None)
    assert summary["completed"] == 10 and summary["failed"] == 1 and summary["errors"] == ["HTTP 503"]
    assert summary["ttft_ms"]["p50"] == pytest.approx(550) and summary["ttft_ms"]["mean"] == pytest.approx(
        550
    )
    assert summary["tpot_ms"]["p99"] == pytest.approx(100)  # (0.4 s after the first token) / 4 tokens
    assert summary["slo"]["met"] == 5 and summary["goodput"] == pytest.approx(2.5)
    assert summary["output_throughput"] == pytest.approx(25)


def test_load_processes_shares_merge_back_in_request_order() -> None:
    from baton.services.bench.client_processes import _merged
    from baton.services.bench.serve import LoadRun, RequestRecord

    def share(first: int, count: int, started: float, elapsed: float, cpu: float) -> LoadRun:
        records = [RequestRecord(prompt_tokens=i, output_len=1) for i in range(first, 7, 3)][:count]
        return LoadRun(records, started, elapsed, cpu)

    run = _merged([share(0, 3, 100.0, 2.0, 0.5), share(1, 2, 100.1, 2.4, 2.2), share(2, 2, 99.9, 1.0, 0.1)])
    assert [r.prompt_tokens for r in run.records] == list(range(7))
    assert run.started_s == 99.9 and abs(run.elapsed_s - 2.6) < 1e-9
    assert abs(run.cpu_s / run.elapsed_s - 2.2 / 2.4) < 1e-9  # the busiest share's fraction
