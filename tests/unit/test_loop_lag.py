"""The event-loop lag monitor: a blocked loop shows up in the maximum and the worst window, an idle
one does not, and the histogram's quantiles bound the samples."""

from __future__ import annotations

import asyncio
import time

from baton.shared.loop_lag import LagStats, LoopLagMonitor


def test_a_blocked_loop_shows_in_the_maximum_and_the_worst_window() -> None:
    async def main() -> LoopLagMonitor:
        monitor = LoopLagMonitor(interval_s=0.005)
        monitor.start()
        await asyncio.sleep(0.05)
        time.sleep(0.3)  # a synchronous call holding the loop
        await asyncio.sleep(0.05)
        monitor.stop()
        return monitor

    stats = asyncio.run(main()).stats
    assert stats.max_ms >= 250
    assert stats.worst_window_lag_s >= 0.25
    assert stats.quantile_ms(1.0) >= 250
    assert "max" in stats.summary() and "behind" in stats.summary()


def test_an_idle_loop_has_little_lag_and_stop_ends_the_ticks() -> None:
    async def main() -> LoopLagMonitor:
        monitor = LoopLagMonitor(interval_s=0.005)
        monitor.start()
        await asyncio.sleep(0.2)
        monitor.stop()
        ticks = monitor.stats.num_ticks
        await asyncio.sleep(0.05)
        assert monitor.stats.num_ticks == ticks  # no tick after stop
        return monitor

    stats = asyncio.run(main()).stats
    assert stats.num_ticks >= 10
    assert stats.max_ms < 200  # a loaded CI machine may delay a tick, never by the blocked call's 300 ms


def test_quantiles_are_the_upper_edges_of_their_buckets() -> None:
    stats = LagStats()
    for lag_ms in [0.2] * 90 + [7.0] * 9 + [1500.0]:
        stats.add(lag_ms / 1000, now=0.0)
    assert stats.quantile_ms(0.5) == 0.5
    assert stats.quantile_ms(0.95) == 10.0
    assert stats.quantile_ms(1.0) == 1500.0  # beyond the last edge: the maximum
    assert stats.worst_window_lag_s == 0  # the window is still open
    stats.summary()
    assert abs(stats.worst_window_lag_s - (0.018 + 0.063 + 1.5)) < 1e-6
    assert LagStats().summary() == "no ticks"
