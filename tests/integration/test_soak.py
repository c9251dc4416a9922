"""`baton soak`, short: a real cluster (its own Redis, UCX over TCP, gRPC, the HTTP gateway) under
mixed load with client cancellations while a decode worker is killed and restarted. Nothing may be
lost, no block may be left held, the registry audit must be clean."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from baton.services.soak.run import SoakConfig, run_soak
from baton.services.soak.workload import WorkloadConfig

pytestmark = pytest.mark.integration


def test_a_short_soak_loses_no_request_and_leaks_no_block(llama_dir: Path, tmp_path: Path) -> None:
    config = SoakConfig(
        model=str(llama_dir),
        num_prefill=1,
        num_decode=2,
        duration_s=16,
        concurrency=4,
        kill=("decode",),
        workload=WorkloadConfig(cancel_fraction=0.3, max_tokens=48, max_prompt_words=150),
        lease_ttl_s=2.0,
        settle_timeout_s=30,
        progress_interval_s=4,
        cluster_log=tmp_path / "cluster.log",
    )
    report = run_soak(config)
    shown = json.dumps({k: v for k, v in report.items() if k != "config"}, indent=1)
    assert report["lost"] == 0, shown
    assert report["leaked_blocks"] == 0 and report["registry_audit"]["clean"], shown
    assert [r["worker"] for r in report["worker_restarts"]] == ["decode-0"], shown
    assert report["worker_restarts"][0]["serving_after_s"] is not None, shown
    assert report["unexpected_exits"] == {}, shown
    assert report["cancelled"] > 0 and report["completed"] > 0, shown
    assert (
        report["sent"]
        == report["completed"] + report["cancelled"] + report["failed_with_clear_error"]["total"]
    ), shown
    assert report["ok"], shown
    memory = report["memory_rss_mib"]  # every process sampled, each line from its first to its last
    assert {"gateway", "router", "prefill-0", "decode-0", "decode-1"} <= set(memory), shown
    assert all(0 < m["first"] <= m["peak"] and m["last"] <= m["peak"] for m in memory.values()), shown
