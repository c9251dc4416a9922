"""How fast the gateway and the Router take a burst in, alone: the real gateway (HTTP, its own
process) in front of the real Router servicer over gRPC (its own process), whose backend answers each
request with one token at once: no placement, no workers, no GPU. The burst is the anchor workload's
(256 prompts of U[64, 1024] token ids, sent at once by 4 load processes). Reported: the burst's
duration and requests a second, TTFT, and each process's CPU time per request: the process whose CPU
time per request is closest to the burst's time per request is the one that limits the intake.

    python3 benchmarks/intake_study.py [--num-prompts 256] [--client-processes 4] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from bench_model_dir import write_bench_model_dir

from baton.services.bench.client_processes import run_load_in_processes
from baton.services.bench.datasets import random_requests
from baton.services.bench.serve import LoadConfig, summarize
from baton.services.router.service import RouterService
from baton.shared.engine.outputs import EngineOutput
from baton.shared.engine.sampling_params import SamplingParams
from baton.shared.grpc_server import ServiceBinding, start_server
from baton.shared.models.model_config import ModelConfig
from baton.shared.rpc import router_pb2, router_pb2_grpc

HERE = Path(__file__).resolve().parent
_TICK = os.sysconf("SC_CLK_TCK")


class EchoBackend:
    """Answers every request with one token at once (the intake alone: nothing is placed)."""

    async def generate(
        self, request_id: str, prompt: list[int], params: SamplingParams
    ) -> AsyncIterator[EngineOutput]:
        await asyncio.sleep(0)
        yield EngineOutput(request_id, [prompt[-1]], finish_reason="length", num_prompt_tokens=len(prompt))

    async def cluster_stats(self) -> router_pb2.ClusterStats:
        return router_pb2.ClusterStats(num_decode_workers=1)  # the gateway's readiness asks for one

    async def reset_prefix_cache(self) -> router_pb2.ResetClusterPrefixCacheResponse:
        return router_pb2.ResetClusterPrefixCacheResponse()

    async def close(self) -> None:
        pass


def serve_echo_router(model_dir: str, port: int) -> None:
    """The Router servicer over gRPC on `port`, with the echo backend (a child process's target)."""

    async def main() -> None:
        service = RouterService(Path(model_dir), EchoBackend())
        binding = ServiceBinding(router_pb2_grpc.add_RouterServicer_to_server, service, "baton.v1.Router")
        server = await start_server([binding], "127.0.0.1", port)  # kept: a collected server stops
        await asyncio.Event().wait()
        del server

    asyncio.run(main())


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_ready(url: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"{url}/ready", timeout=1) as reply:
                if reply.status == 200:
                    return
        except OSError:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.2)


def burst(url: str, model: Path, args: argparse.Namespace, seed: int, pids: dict[str, int]) -> dict[str, Any]:
    vocab = ModelConfig.from_dir(model).vocab_size
    requests = random_requests(args.num_prompts, (64, 1024), (1, 1), vocab, seed)
    before = {name: cpu_s(pid) for name, pid in pids.items()}
    config = LoadConfig(url=url, seed=seed, progress=False)
    run = run_load_in_processes(config, requests, args.client_processes)
    used = {name: cpu_s(pid) - before[name] for name, pid in pids.items()}
    summary = summarize(run.records, run.elapsed_s, None, None)
    return {
        "duration_s": round(run.elapsed_s, 3),
        "requests_per_s": round(len(requests) / run.elapsed_s, 1),
        "failed": summary["failed"],
        "ttft_ms": {k: round(summary["ttft_ms"][k], 1) for k in ("p50", "p90", "p99")},
        "cpu_ms_per_request": {name: round(1000 * s / len(requests), 2) for name, s in used.items()},
        "client_cpu_busy": round(run.cpu_s / run.elapsed_s, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-prompts", type=int, default=256)
    parser.add_argument("--client-processes", type=int, default=4)
    parser.add_argument("--bursts", type=int, default=3, help="measured bursts, after one warm-up burst")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    model = write_bench_model_dir(HERE / "models" / "llama-3.2-1b-shape", Path(tempfile.mkdtemp()) / "anchor")
    router_port, http_port = free_port(), free_port()
    router = multiprocessing.get_context("spawn").Process(
        target=serve_echo_router, args=(str(model), router_port), daemon=True
    )
    router.start()
    gateway = subprocess.Popen(
        [sys.executable, "-m", "baton.services.cli", "gateway", "--model", str(model),
         "--router", f"127.0.0.1:{router_port}", "--port", str(http_port), "--log-level", "WARNING"],
    )  # fmt: skip
    url = f"http://127.0.0.1:{http_port}"
    try:
        wait_ready(url)
        assert router.pid is not None
        pids = {"gateway": gateway.pid, "router": router.pid}
        burst(url, model, args, 1, pids)  # warm-up
        results = [burst(url, model, args, seed, pids) for seed in range(2, 2 + args.bursts)]
    finally:
        gateway.terminate()
        gateway.wait(30)
        router.terminate()
    report = {"num_prompts": args.num_prompts, "client_processes": args.client_processes, "bursts": results}
    print(json.dumps(report, indent=1))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
