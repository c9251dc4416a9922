"""Why a prefill worker's steps launched slower than the offline engine's: the same 8192-token
prefill-only steps timed alone, beside a Python thread that competes for the GIL as a worker's event
loop does, beside another process keeping the GPU busy as a decode worker sharing the card does, and
beside Baton's KV push (UCX, checksums) running in the same process, as it did in the prefill worker
before the push moved to a process of its own. Prints and writes, per scenario, the mean launch time
(wall and the engine thread's CPU), device wait and prompt tokens per second.

    python3 benchmarks/prefill_launch_study.py MODEL_DIR --out FILE.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch


def gpu_hog(decode_batch: int, pace_ms: float) -> None:
    """A decode worker's GPU load: a step of matmuls as wide as the anchor model's layers for
    `decode_batch` rows, then a pause of `pace_ms` (0: back to back), until killed."""
    x = torch.randn(decode_batch, 2048, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(2048, 8192, device="cuda", dtype=torch.bfloat16)
    w2 = torch.randn(8192, 2048, device="cuda", dtype=torch.bfloat16)
    print("hog ready", flush=True)
    while True:
        for _ in range(16):  # layers
            x = torch.nn.functional.silu(x @ w) @ w2
            x = x / x.norm()
        torch.cuda.synchronize()
        if pace_ms:
            time.sleep(pace_ms / 1e3)


@contextmanager
def gil_competitor(busy_fraction: float):
    """A thread that holds the GIL for short stretches, as a worker's event loop does between waits
    (gRPC, the push's checksums and sends)."""
    stop = threading.Event()

    def run() -> None:
        while not stop.is_set():
            until = time.perf_counter() + 0.0002 * busy_fraction / (1 - busy_fraction)
            while time.perf_counter() < until:
                pass
            time.sleep(0.0002)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


@contextmanager
def gpu_competitor(pace_ms: float):
    hog = subprocess.Popen(
        [sys.executable, __file__, "--hog", str(pace_ms)], stdout=subprocess.PIPE, text=True
    )
    assert hog.stdout is not None
    hog.stdout.readline()  # ready
    try:
        yield
    finally:
        hog.kill()
        hog.wait()


@contextmanager
def push_competitor(requests_per_s: float):
    """A worker's push in this process, as a prefill worker does it: Baton's UcxKVSender (checksums,
    UCX's threads) on an event loop of its own thread, pushing 1024-token prompts in runs of 4
    layers to a UcxKVReceiver in another process, `requests_per_s` of them, 8 at a time."""
    import asyncio
    import multiprocessing as mp

    from transfer_bandwidth import _kv_receiver, _layout

    from baton.shared.transfer import UcxKVSender, stop_ucx

    layout, blocks = _layout(16), 64
    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    ctx = mp.get_context("spawn")
    addr_q, stop_q = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=_kv_receiver, args=(device, 16, blocks * 8, addr_q, stop_q))
    proc.start()
    address = addr_q.get(timeout=120)
    stop = threading.Event()

    async def pushes() -> None:
        sender = UcxKVSender(layout)
        # kv[r]: [num_layers, 2, blocks, block_size, 8, 128]
        kv = [
            torch.randn((16, *layout.layer_shape(blocks)), device=device).to(torch.bfloat16) for _ in range(8)
        ]
        _sync()
        serial = 0

        async def push(r: int) -> None:
            session = await sender.open(
                address, f"p{serial}-{r}", list(range(r * blocks, (r + 1) * blocks)), 16
            )
            for first in range(0, 16, 4):
                await session.send_layers(first, kv[r][first : first + 4])
            await session.finish({})

        while not stop.is_set():
            serial += 1
            started = time.perf_counter()
            await asyncio.gather(*(push(r) for r in range(8)))
            await asyncio.sleep(max(0.0, 8 / requests_per_s - (time.perf_counter() - started)))
        await sender.close()
        stop_ucx()

    thread = threading.Thread(target=lambda: asyncio.run(pushes()), daemon=True)
    thread.start()
    time.sleep(2)  # connections up
    try:
        yield
    finally:
        stop.set()
        thread.join()
        stop_q.put(None)
        proc.join(60)


def prefill_rounds(core: Any, rounds: int, round_offset: int) -> dict[str, float]:
    """`rounds` steps of 8 prompts x 1024 tokens, each prompt new (no prefix hits)."""
    from baton import SamplingParams

    vocab = core.model_config.vocab_size
    params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    core.step_stats.reset()
    _sync()
    start = time.perf_counter()
    for r in range(rounds):
        for i in range(8):
            seed = (round_offset + r) * 8 + i
            core.add_request(f"r{seed}", [(seed * 7919 + t) % vocab for t in range(1024)], params, True)
        while core.scheduler.has_unfinished():
            core.step()
    _sync()
    elapsed = time.perf_counter() - start
    per_step = core.step_stats.as_dict()["prefill"]["per_step"]
    return per_step | {"prompt_tokens_per_s": rounds * 8 * 1024 / elapsed}


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--rounds", type=int, default=12)
    args = parser.parse_args()
    from baton.shared.config import EngineConfig
    from baton.shared.engine.engine_core import EngineCore

    core = EngineCore(
        EngineConfig(model=args.model, load_format="dummy", dtype="bfloat16", num_kv_blocks=30000)
    )
    core.prompt_kv_sink = lambda rid, block_ids, ready: core.release_prompt_kv(rid)  # nobody reads it
    prefill_rounds(core, 2, 10_000)  # warm-up
    scenarios = {
        "alone": [],
        "gil 30%": [lambda: gil_competitor(0.3)],
        "gpu paced 15 ms": [lambda: gpu_competitor(15)],
        "push 150 req/s": [lambda: push_competitor(150)],
        "push 150 req/s + gpu paced 15 ms": [lambda: push_competitor(150), lambda: gpu_competitor(15)],
    }
    if not torch.cuda.is_available():  # a smoke run of the harness
        scenarios = {k: v for k, v in scenarios.items() if "gpu" not in k}
    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    results: dict[str, Any] = {"card": card, "rounds": args.rounds, "scenarios": {}}
    for n, (name, competitors) in enumerate(scenarios.items()):
        managers = [make() for make in competitors]
        for m in managers:
            m.__enter__()
        try:
            stats = prefill_rounds(core, args.rounds, n * 1000)
        finally:
            for m in reversed(managers):
                m.__exit__(None, None, None)
        results["scenarios"][name] = stats
        print(
            f"{name:28s} launch {stats['launch_ms']:6.2f} ms ({stats['launch_cpu_ms']:6.2f} CPU), "
            f"wait {stats['wait_ms']:6.2f} ms, {stats['prompt_tokens_per_s']:9.0f} prompt tok/s",
            flush=True,
        )
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--hog"]:
        gpu_hog(128, float(sys.argv[2]))
    else:
        main()
