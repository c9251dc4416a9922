"""Host CPU per request in each worker of a 1P+1D cluster, by thread: what the decode and prefill
workers' event loops (their main threads) spend per arrival beside the engine thread.

Starts a cluster (its own Redis, free ports) on the generated tiny Llama, or on MODEL_DIR, warms it
up, then sends `--requests` prompts of `--prompt-len` tokens with 1 output token each (the arrival
side of a request only: reserve, push, commit, the first token, the end) at `--rate` a second through
the gateway, and reads every worker thread's CPU time from /proc before and after. Repeats `--repeats`
times on the same cluster and reports the medians.

    python3 benchmarks/arrival_cost.py [MODEL_DIR] [--requests 200] [--rate 10] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import statistics
import tempfile
from pathlib import Path
from typing import Any

from baton.services.bench.datasets import random_requests
from baton.services.bench.serve import LoadConfig, run_load
from baton.services.launcher import ClusterSpec, LocalCluster
from baton.shared.demo.tiny_model import write_tiny_model

_TICK = os.sysconf("SC_CLK_TCK")
WORKERS = ("decode-0", "prefill-0")


def thread_cpu_s(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) of each of the process's threads, by thread id."""
    cpu = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the thread ended
        cpu[int(task.name)] = (int(fields[11]) + int(fields[12])) / _TICK
    return cpu


def per_request_ms(before: dict[int, float], after: dict[int, float], pid: int, n: int) -> dict[str, float]:
    """The main thread's (the event loop's) CPU per request, the busiest other thread's (the engine
    thread, in a worker) and all the others'."""
    deltas = {tid: cpu - before.get(tid, 0.0) for tid, cpu in after.items()}
    main = deltas.pop(pid, 0.0)
    busiest = max(deltas.values(), default=0.0)
    return {
        "main_thread": 1e3 * main / n,
        "busiest_other_thread": 1e3 * busiest / n,
        "all_other_threads": 1e3 * sum(deltas.values()) / n,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", nargs="?", type=Path, help="model directory (default: the tiny Llama)")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--rate", type=float, default=10.0, help="Poisson arrivals a second")
    parser.add_argument("--prompt-len", default="200,300", help="LOW,HIGH tokens (pushed: above 0)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--engine-args", default="", help='worker flags, e.g. "--load-format dummy --dtype bfloat16"'
    )
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    low, high = (int(n) for n in args.prompt_len.split(","))
    model = args.model or write_tiny_model(Path(tempfile.mkdtemp()) / "llama", "llama", seed=0)
    spec = ClusterSpec(
        model=str(model),
        num_prefill=1,
        num_decode=1,
        router_port=0,
        http_port=0,
        threads=1,
        router_args=["--local-prefill-max-tokens", "0"],  # every prompt is pushed
        log_level="WARNING",
        engine_args=shlex.split(args.engine_args),
    )
    with open(os.devnull, "w") as quiet:
        cluster = LocalCluster(spec, log=quiet)
        cluster.start(timeout_s=300)
        try:
            config = LoadConfig(url=cluster.gateway_url, request_rate=args.rate, seed=1, progress=False)
            vocab = json.loads((model / "config.json").read_text())["vocab_size"]
            asyncio.run(run_load(config, random_requests(20, (low, high), (1, 1), vocab, seed=3)))
            pids = {name: cluster.processes[name].pid for name in WORKERS}
            runs: list[dict[str, Any]] = []
            for repeat in range(args.repeats):
                requests = random_requests(args.requests, (low, high), (1, 1), vocab, seed=10 + repeat)
                before = {name: thread_cpu_s(pid) for name, pid in pids.items()}
                load = asyncio.run(run_load(config, requests))
                after = {name: thread_cpu_s(pid) for name, pid in pids.items()}
                failed = sum(not r.ok for r in load.records)
                if failed:
                    raise SystemExit(f"{failed} requests failed")
                run = {
                    name: per_request_ms(before[name], after[name], pid, args.requests)
                    for name, pid in pids.items()
                }
                runs.append(run)
                print(
                    ", ".join(f"{name} main thread {run[name]['main_thread']:.2f} ms" for name in WORKERS)
                    + " per request",
                    flush=True,
                )
        finally:
            cluster.stop()
    medians = {
        name: {key: statistics.median(run[name][key] for run in runs) for key in runs[0][name]}
        for name in WORKERS
    }
    for name, figures in medians.items():
        print(
            f"{name}: "
            + ", ".join(f"{key} {value:.2f} ms" for key, value in figures.items())
            + " per request"
        )
    if args.out:
        report = {"args": {k: str(v) for k, v in vars(args).items()}, "runs": runs, "medians": medians}
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
