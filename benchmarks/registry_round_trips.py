"""Host CPU of the registry's per-request transitions, with calls made while others are on the wire
sharing round trips (the default) and with one round trip per call (as before 2026-11-28).

Each request runs the four transitions of a pushed prompt (reserve, begin_prefill, commit_handoff,
end_request) against a private redis-server, `--concurrency` requests at a time, in one process: its
CPU time per transition is what a worker's event loop spends on them, beside its engine's step loop.
Prints and writes the median of `--repeats` runs per setting.

    python3 benchmarks/registry_round_trips.py [--requests 1000] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

from redis.utils import HIREDIS_AVAILABLE

from baton.shared.registry import Registry
from baton.shared.registry.batcher import ScriptBatcher

UNBATCHED_IN_FLIGHT = 1 << 30  # no call ever queues: one round trip each


async def one_request(registry: Registry, request_id: str) -> None:
    await registry.reserve(request_id, "decode-0", 16)
    await registry.begin_prefill(request_id, "prefill-0")
    await registry.commit_handoff(request_id, "prefill-0", "decode-0")
    await registry.end_request(request_id, "decode-0")


async def measure(url: str, batched: bool, concurrency: int, requests: int, repeats: int) -> dict[str, Any]:
    async with Registry(url, namespace="bench") as registry:
        if not batched:  # one round trip per call, as before
            registry._batcher = ScriptBatcher(registry._redis, UNBATCHED_IN_FLIGHT)
        limit = asyncio.Semaphore(concurrency)

        async def limited(request_id: str) -> None:
            async with limit:
                await one_request(registry, request_id)

        for i in range(200):  # warm-up: connections, scripts loaded
            await one_request(registry, f"warm-{i}")
        cpu_us, wall_us = [], []
        for run in range(repeats):
            scripts_before, trips_before = registry.round_trips
            wall, cpu = time.perf_counter(), time.process_time()
            await asyncio.gather(*(limited(f"run{run}-{i}") for i in range(requests)))
            cpu_us.append((time.process_time() - cpu) / (4 * requests) * 1e6)
            wall_us.append((time.perf_counter() - wall) / requests * 1e6)
        scripts, trips = registry.round_trips
    return {
        "batched": batched,
        "concurrency": concurrency,
        "cpu_us_per_transition": statistics.median(cpu_us),
        "cpu_us_runs": [round(v, 1) for v in cpu_us],
        "wall_us_per_request": statistics.median(wall_us),
        "scripts_per_round_trip": (scripts - scripts_before) / max(1, trips - trips_before),
    }


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--concurrency", default="1,32", help="comma-separated requests in flight")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    try:
        time.sleep(0.5)
        url = f"redis://127.0.0.1:{port}/0"
        runs = []
        for concurrency in (int(c) for c in args.concurrency.split(",")):
            for batched in (False, True):
                result = asyncio.run(measure(url, batched, concurrency, args.requests, args.repeats))
                runs.append(result)
                print(
                    f"concurrency {concurrency:>3}, {'shared' if batched else 'one each':>8} round trips: "
                    f"{result['cpu_us_per_transition']:6.0f} us CPU per transition "
                    f"({result['scripts_per_round_trip']:.1f} per round trip), "
                    f"{result['wall_us_per_request']:6.0f} us per request"
                )
    finally:
        server.terminate()
        server.wait(10)
    if args.out:
        report = {
            "machine": f"{cpu_model()}, {os.cpu_count()} cores (CPU only)",
            "hiredis": HIREDIS_AVAILABLE,
            "requests": args.requests,
            "runs": runs,
        }
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
