"""`baton bench serve --client-processes N`: the load spread over N processes.

One Python process reading tens of thousands of streamed events a second is itself the slowest part
of a served benchmark: a saturated client reads tokens late, and its latencies and duration measure
the client. The requests are dealt round-robin to N spawned processes that keep the one arrival
schedule (each request leaves at its offset from a common start, after every process connected),
and their records are merged back in request order."""

from __future__ import annotations

import asyncio
import contextlib
import math
import multiprocessing
import queue
import threading
from dataclasses import replace
from multiprocessing.sharedctypes import Synchronized
from multiprocessing.synchronize import Barrier

from baton.services.bench.datasets import BenchRequest
from baton.services.bench.serve import LoadConfig, LoadRun, Progress, RequestRecord, run_load, send_times

READY_TIMEOUT_S = 120.0


def run_load_in_processes(
    config: LoadConfig,
    requests: list[BenchRequest],
    processes: int,
    flowing: threading.Event | None = None,
) -> LoadRun:
    """The run over `processes` load processes (1: this one). `max_concurrency` is divided among
    them. The merged run spans the earliest start to the latest end; its CPU time is the busiest
    process's. `flowing`, if given, is set once a first request has ended: the load is under way (the
    processes take seconds to start)."""
    if processes < 1:
        raise ValueError(f"--client-processes must be >= 1, got {processes}")
    processes = min(processes, len(requests))
    if processes == 1:
        progress = _FirstEnded(Progress(len(requests), config.progress), flowing)
        return asyncio.run(run_load(config, requests, progress=progress))
    ctx = multiprocessing.get_context("spawn")
    send_at_s = send_times(len(requests), config.request_rate, config.seed)
    share_config = replace(
        config,
        progress=False,
        max_concurrency=math.ceil(config.max_concurrency / processes) if config.max_concurrency else None,
    )
    barrier = ctx.Barrier(processes)
    done = ctx.Value("i", 0)
    results: multiprocessing.Queue[tuple[int, LoadRun | str]] = ctx.Queue()
    workers = [
        ctx.Process(
            target=_run_share,
            args=(share_config, requests[i::processes], send_at_s[i::processes], i, barrier, done, results),
            daemon=True,
        )
        for i in range(processes)
    ]
    for worker in workers:
        worker.start()
    progress = Progress(len(requests), config.progress)
    stop_drawing = threading.Event()
    drawer = threading.Thread(
        target=_draw, args=(_FirstEnded(progress, flowing), done, stop_drawing), daemon=True
    )
    drawer.start()
    try:
        runs: dict[int, LoadRun] = {}
        while len(runs) < processes:
            try:
                index, run = results.get(timeout=1.0)
            except queue.Empty:
                dead = [w.exitcode for w in workers if w.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(f"a load process died (exit code {dead[0]})") from None
                continue
            if isinstance(run, str):
                raise RuntimeError(f"load process {index} failed: {run}")
            runs[index] = run
    finally:
        stop_drawing.set()
        drawer.join()
        for worker in workers:
            worker.join(timeout=5)
            if worker.is_alive():
                worker.kill()
    progress.close()
    return _merged([runs[i] for i in range(processes)])


def _merged(runs: list[LoadRun]) -> LoadRun:
    """One run from the processes' shares (share i holds requests i, i + n, i + 2n, ...)."""
    n = len(runs)
    records: list[RequestRecord | None] = [None] * sum(len(run.records) for run in runs)
    for i, run in enumerate(runs):
        records[i::n] = run.records
    started = min(run.started_s for run in runs)
    ended = max(run.started_s + run.elapsed_s for run in runs)
    busiest = max(runs, key=lambda run: run.cpu_s / run.elapsed_s)
    elapsed = ended - started
    return LoadRun(
        [r for r in records if r is not None], started, elapsed, busiest.cpu_s * elapsed / busiest.elapsed_s
    )


def _run_share(
    config: LoadConfig,
    requests: list[BenchRequest],
    send_at_s: list[float],
    index: int,
    barrier: Barrier,
    done: Synchronized[int],
    results: multiprocessing.Queue[tuple[int, LoadRun | str]],
) -> None:
    try:
        run = asyncio.run(
            run_load(
                config,
                requests,
                send_at_s,
                ready=lambda: barrier.wait(READY_TIMEOUT_S),
                progress=_SharedCount(done),
            )
        )
        results.put((index, run))
    except BaseException as exc:
        barrier.abort()  # the others stop waiting for this one
        results.put((index, f"{type(exc).__name__}: {exc}"))


class _SharedCount:
    """A load process's progress: a count the parent draws."""

    def __init__(self, done: Synchronized[int]) -> None:
        self._done = done

    def advance(self, count: int = 1) -> None:
        with self._done.get_lock():
            self._done.value += count

    def close(self) -> None:
        pass


class _FirstEnded:
    """A progress sink that also sets `flowing` (if any) when the first request ends."""

    def __init__(self, progress: Progress, flowing: threading.Event | None) -> None:
        self.progress, self._flowing = progress, flowing

    @property
    def done(self) -> int:
        return self.progress.done

    def advance(self, count: int = 1) -> None:
        self.progress.advance(count)
        if self._flowing is not None:
            self._flowing.set()

    def close(self) -> None:
        self.progress.close()


def _draw(progress: _FirstEnded, done: Synchronized[int], stop: threading.Event) -> None:
    while not stop.wait(0.1):
        with contextlib.suppress(Exception):
            if (new := done.value - progress.done) > 0:
                progress.advance(new)
    if (new := done.value - progress.done) > 0:
        progress.advance(new)
