"""How late an asyncio event loop runs what is ready: a timer callback asks to run every `interval_s`
and records how much later than asked it ran. A loop whose lag often reaches tens of milliseconds is
saturated (or blocked by a synchronous call, or starved of the GIL), and every request crossing it
waits that long. Services log the summary at stop, beside the engine's step stats, so a benchmark's
logs say which process's loop was the bottleneck without a profiler. The garbage collector's pauses
(`gc_pauses.py`), which stop every thread of the process, are reported beside it."""

from __future__ import annotations

import asyncio
import bisect
import time
from dataclasses import dataclass, field

from baton.shared.gc_pauses import GcPauses

# upper edges of the lag histogram's buckets, ms (the last bucket holds everything later)
LAG_EDGES_MS = (0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0)


@dataclass
class LagStats:
    """Lag samples of one loop: a histogram (bounded memory), the maximum, and the worst window."""

    window_s: float = 1.0
    counts: list[int] = field(default_factory=lambda: [0] * (len(LAG_EDGES_MS) + 1))
    max_ms: float = 0.0
    worst_window_lag_s: float = 0.0
    """The largest sum of lag in one window: how long the loop was behind within its worst window."""
    worst_window_at: float = 0.0
    """Wall-clock start of that window (epoch seconds)."""
    _window_start: float | None = None
    _window_lag_s: float = 0.0

    def add(self, lag_s: float, now: float) -> None:
        """Record one tick that ran `lag_s` late, at monotonic time `now`."""
        lag_ms = lag_s * 1000.0
        self.counts[bisect.bisect_left(LAG_EDGES_MS, lag_ms)] += 1
        self.max_ms = max(self.max_ms, lag_ms)
        if self._window_start is None or now - self._window_start >= self.window_s:
            self._close_window()
            self._window_start = now
        self._window_lag_s += lag_s

    def _close_window(self) -> None:
        if self._window_start is not None and self._window_lag_s > self.worst_window_lag_s:
            self.worst_window_lag_s = self._window_lag_s
            self.worst_window_at = time.time() - (time.monotonic() - self._window_start)
        self._window_lag_s = 0.0

    @property
    def num_ticks(self) -> int:
        return sum(self.counts)

    def quantile_ms(self, q: float) -> float:
        """Upper edge of the bucket holding the q-quantile (an upper bound; the maximum beyond the edges)."""
        if not self.num_ticks:
            return 0.0
        rank, seen = q * self.num_ticks, 0
        for index, count in enumerate(self.counts):
            seen += count
            if seen >= rank and count:
                return LAG_EDGES_MS[index] if index < len(LAG_EDGES_MS) else self.max_ms
        return self.max_ms

    def summary(self) -> str:
        self._close_window()
        if not self.num_ticks:
            return "no ticks"
        worst = self.worst_window_lag_s / self.window_s
        at = time.strftime("%H:%M:%S", time.localtime(self.worst_window_at))
        return (
            f"{self.num_ticks} ticks, lag p50 <= {self.quantile_ms(0.5):g} ms, "
            f"p99 <= {self.quantile_ms(0.99):g} ms, max {self.max_ms:.1f} ms; "
            f"worst {self.window_s:g} s window: behind {worst:.0%} of it (from {at})"
        )


class LoopLagMonitor:
    """Samples the running loop's lag every `interval_s` (a chain of `call_at` timers, no task), and
    times the process's garbage collections meanwhile."""

    def __init__(self, interval_s: float = 0.01) -> None:
        self.interval_s = interval_s
        self.stats = LagStats()
        self.gc = GcPauses()
        self._handle: asyncio.TimerHandle | None = None

    def start(self) -> None:
        """Start sampling the running loop (call from a coroutine on it)."""
        loop = asyncio.get_running_loop()
        self.gc.install()
        self._schedule(loop, loop.time() + self.interval_s)

    def stop(self) -> str:
        """Stop sampling; returns the summary line (the loop's lag, then the collections' pauses)."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self.gc.remove()
        return f"{self.stats.summary()}; gc pauses: {self.gc.summary()}"

    def _schedule(self, loop: asyncio.AbstractEventLoop, due: float) -> None:
        self._handle = loop.call_at(due, self._tick, loop, due)

    def _tick(self, loop: asyncio.AbstractEventLoop, due: float) -> None:
        now = loop.time()
        self.stats.add(max(0.0, now - due), time.monotonic())
        self._schedule(loop, now + self.interval_s)
