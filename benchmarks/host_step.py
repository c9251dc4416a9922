"""The engine's host work per decode step, without a model: schedule, prepare the inputs, take the
sampled tokens back, update, build the outputs, for a batch of running requests on the CPU.

On the GPU these run between (or beside) the device's steps, so their sum bounds how fast a decode
step can go. Prints the median time of each part in microseconds.

    python benchmarks/host_step.py [--batch 256] [--steps 200]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from baton.shared.engine.block_pool import BlockPool
from baton.shared.engine.engine_core import EngineCore
from baton.shared.engine.kv_cache_manager import KVCacheManager
from baton.shared.engine.model_runner import ModelRunner
from baton.shared.engine.request import Request
from baton.shared.engine.sampler import Sampler
from baton.shared.engine.sampling_params import SamplingParams
from baton.shared.engine.scheduler import SampledToken, Scheduler, SchedulerConfig


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--block-size", type=int, default=16)
    args = parser.parse_args()
    rng = random.Random(0)
    bs = args.block_size
    max_len = 2048
    kv = KVCacheManager(BlockPool(args.batch * max_len // bs + 16, True), bs)
    scheduler = Scheduler(SchedulerConfig(8192, args.batch, max_len), kv)
    runner = ModelRunner(None, [], kv, Sampler(torch.device("cpu")), torch.device("cpu"))  # type: ignore[arg-type]
    params = SamplingParams(max_tokens=max_len, temperature=0, ignore_eos=True)
    for i in range(args.batch):
        prompt = [rng.randrange(128_000) for _ in range(rng.randint(64, 1024))]
        scheduler.add(Request(f"r{i}", prompt, params, frozenset({0}), bs))
    # prefill everything (no model: the computed counts just advance)
    while any(r.num_computed_tokens < r.num_prompt_tokens for r in scheduler.running) or scheduler.waiting:
        sched = scheduler.schedule()
        scheduler.update(sched, {c.request.request_id: SampledToken(1) for c in sched.chunks if c.samples})
    names = ("schedule", "prepare_inputs", "sampled", "update", "outputs")
    parts: dict[str, list[float]] = {name: [] for name in names}
    output = EngineCore._output
    for _ in range(args.steps):
        t0 = time.perf_counter()
        sched = scheduler.schedule()
        t1 = time.perf_counter()
        inputs = runner.prepare_inputs(sched.chunks)
        t2 = time.perf_counter()
        token_ids = [7] * len(inputs.sampling_chunks)
        sampled = {
            c.request.request_id: SampledToken(t)
            for c, t in zip(inputs.sampling_chunks, token_ids, strict=True)
        }
        t3 = time.perf_counter()
        changed = scheduler.update(sched, sampled)
        t4 = time.perf_counter()
        [output(None, r, sampled[r.request_id]) for r in changed]  # type: ignore[arg-type]
        t5 = time.perf_counter()
        for name, a, b in zip(names, (t0, t1, t2, t3, t4), (t1, t2, t3, t4, t5), strict=True):
            parts[name].append((b - a) * 1e6)
    total = 0.0
    for name, times in parts.items():
        median = statistics.median(times)
        total += median
        print(f"{name:>15}: {median:8.0f} us")
    print(f"{'total':>15}: {total:8.0f} us for {args.batch} decodes ({total / args.batch:.2f} us each)")


if __name__ == "__main__":
    main()
