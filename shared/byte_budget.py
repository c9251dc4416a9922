"""A bound on the bytes a process holds for work in flight, granted first come, first served."""

from __future__ import annotations

import asyncio
from collections import deque


class ByteBudget:
    """At most `capacity` bytes granted at once. A request waits until its bytes fit and every earlier
    request was served (so large ones are not starved by small ones); one larger than the whole
    capacity is charged the capacity, so it still runs, alone."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"a byte budget needs a positive capacity, got {capacity}")
        self.capacity = capacity
        self.held = 0
        self._waiting: deque[tuple[int, asyncio.Future[None]]] = deque()

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    async def acquire(self, nbytes: int) -> int:
        """Wait for `nbytes` (at most the capacity); returns the charge to `release` later. A waiter
        that is cancelled gives back what it may have been granted meanwhile."""
        charge = min(max(nbytes, 0), self.capacity)
        if not self._waiting and self.held + charge <= self.capacity:
            self.held += charge
            return charge
        granted = asyncio.get_running_loop().create_future()
        entry = (charge, granted)
        self._waiting.append(entry)
        try:
            await granted
        except asyncio.CancelledError:
            if granted.done() and not granted.cancelled():
                self.release(charge)  # granted just as it was cancelled
            else:
                self._waiting.remove(entry)
                self._grant()  # it may have been what blocked the next ones
            raise
        return charge

    def release(self, charge: int) -> None:
        self.held -= charge
        self._grant()

    def _grant(self) -> None:
        while self._waiting and self.held + self._waiting[0][0] <= self.capacity:
            charge, granted = self._waiting.popleft()
            self.held += charge
            granted.set_result(None)
