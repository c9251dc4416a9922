"""What an interprocess CUDA event costs the process that makes it, and a launch-bound thread beside it.

The decode worker makes one interprocess event per reservation (the fence its KV receiver waits for)
and hands it to the receiving process, which opens its handle; the prefill worker makes one per
prefill step that completes prompts. This measures, on one GPU:
- per event: creating and recording one (interprocess and plain), taking its IPC handle, pickling it
  as the worker's link does, and destroying it;
- a "step loop" thread launching small kernels as an engine thread does (host-bound, like a decode
  step), alone and while a second thread makes, pickles and drops interprocess events at a given rate.

    python3 benchmarks/ipc_event_cost.py [--out FILE.json]
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import threading
import time
from multiprocessing.reduction import ForkingPickler
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing  # registers the CUDA event reductions

KERNELS_PER_STEP = 200  # a 16-layer model's decode step launches a few hundred small kernels
STEP_LOOP_S = 3.0


def per_op_us(fn: Any, n: int) -> float:
    """Median over 5 runs of the mean time of `fn()` over n calls, in microseconds."""
    runs = []
    for _ in range(5):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
        runs.append((time.perf_counter() - start) / n * 1e6)
    return statistics.median(runs)


def event_costs(n: int = 500) -> dict[str, float]:
    stream = torch.cuda.current_stream()
    kept: list[torch.cuda.Event] = []

    def plain() -> None:
        torch.cuda.Event().record(stream)

    def interprocess() -> None:
        torch.cuda.Event(interprocess=True).record(stream)

    def interprocess_kept() -> None:
        event = torch.cuda.Event(interprocess=True)
        event.record(stream)
        kept.append(event)

    def pickled() -> None:
        event = torch.cuda.Event(interprocess=True)
        event.record(stream)
        buf = io.BytesIO()
        ForkingPickler(buf).dump(event)

    costs = {
        "plain_create_record_destroy_us": per_op_us(plain, n),
        "interprocess_create_record_destroy_us": per_op_us(interprocess, n),
        "interprocess_create_record_pickle_destroy_us": per_op_us(pickled, n),
    }
    costs["interprocess_create_record_us"] = per_op_us(interprocess_kept, n)
    start = time.perf_counter()
    count = len(kept)
    kept.clear()
    torch.cuda.synchronize()
    costs["interprocess_destroy_us"] = (time.perf_counter() - start) / count * 1e6
    return costs


def step_loop(stop: threading.Event, x: torch.Tensor, steps: list[float]) -> None:
    """Launch KERNELS_PER_STEP small kernels per step; a step ends when its last kernel ran."""
    while not stop.is_set():
        start = time.perf_counter()
        y = x
        for _ in range(KERNELS_PER_STEP):
            y = y.mul(1.0001)
        done = torch.cuda.Event()
        done.record()
        done.synchronize()
        steps.append(time.perf_counter() - start)


def event_maker(stop: threading.Event, rate: float, made: list[int]) -> None:
    """Make, record, pickle and drop interprocess events at `rate` per second (as a worker's loop
    does per reservation)."""
    period = 1.0 / rate
    stream = torch.cuda.Stream()
    next_at = time.perf_counter()
    while not stop.is_set():
        event = torch.cuda.Event(interprocess=True)
        event.record(stream)
        ForkingPickler(io.BytesIO()).dump(event)
        del event
        made[0] += 1
        next_at += period
        time.sleep(max(0.0, next_at - time.perf_counter()))


def step_time_ms(rate: float) -> dict[str, float]:
    x = torch.randn(4096, device="cuda")
    stop, steps, made = threading.Event(), [], [0]
    threads = [threading.Thread(target=step_loop, args=(stop, x, steps))]
    if rate:
        threads.append(threading.Thread(target=event_maker, args=(stop, rate, made)))
    for t in threads:
        t.start()
    time.sleep(STEP_LOOP_S)
    stop.set()
    for t in threads:
        t.join()
    steps = steps[len(steps) // 10 :]  # the first tenth warms up
    return {
        "events_per_s": made[0] / STEP_LOOP_S,
        "step_p50_ms": statistics.median(steps) * 1e3,
        "step_mean_ms": statistics.fmean(steps) * 1e3,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path)
    parser.add_argument("--rates", default="0,64,256,0,64,256", help="events/s beside the step loop, in turn")
    args = parser.parse_args()
    torch.cuda.init()
    torch.ones(1, device="cuda").mul(2)  # context and kernels loaded
    result: dict[str, Any] = {"card": torch.cuda.get_device_name(), "per_event": event_costs()}
    result["step_loop"] = [
        {"rate": float(r), **step_time_ms(float(r))} for r in args.rates.split(",") if r.strip()
    ]
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
