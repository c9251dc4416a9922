"""Python's cyclic garbage collector, for long-running services: how long its collections stop the
process, and freezing the startup heap so that they stay short.

A full (generation 2) collection walks every object the process tracks, and holds the GIL while it
does: in a service that has imported torch, gRPC and FastAPI that is over 200,000 objects and about
100 ms, during which no thread of the process runs (not the event loop, not the engine's step loop).
`freeze_startup_heap` moves what exists once a service is ready into the permanent generation
(`gc.freeze`, as vLLM and SGLang do after start-up), so later collections walk only what was created
since. `GcPauses` measures the collections, for the services' stop-time summary."""

from __future__ import annotations

import gc
import logging
import time
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)


def freeze_startup_heap() -> int:
    """Collect once, then exempt every surviving object from later collections; logs and returns how
    many objects were frozen. Call once the service is ready (imports done, model loaded, servers up)."""
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    logger.info("startup heap frozen: %d objects exempt from garbage collection", frozen)
    return frozen


@dataclass
class _Generation:
    collections: int = 0
    total_s: float = 0.0
    max_s: float = 0.0


@dataclass
class GcPauses:
    """The process's collections per generation while installed: how many, their summed and longest
    pause. Collections run in whichever thread allocates; the callbacks time each from start to stop."""

    generations: list[_Generation] = field(default_factory=lambda: [_Generation() for _ in range(3)])
    _started_at: float | None = None

    def install(self) -> None:
        if self._on_collection not in gc.callbacks:
            gc.callbacks.append(self._on_collection)

    def remove(self) -> None:
        if self._on_collection in gc.callbacks:
            gc.callbacks.remove(self._on_collection)

    def _on_collection(self, phase: str, info: dict[str, Any]) -> None:
        now = time.perf_counter()
        if phase == "start":
            self._started_at = now
            return
        if self._started_at is None:  # installed mid-collection
            return
        pause, self._started_at = now - self._started_at, None
        gen = self.generations[min(int(info.get("generation", 2)), 2)]
        gen.collections += 1
        gen.total_s += pause
        gen.max_s = max(gen.max_s, pause)

    @property
    def max_pause_s(self) -> float:
        return max(g.max_s for g in self.generations)

    def summary(self) -> str:
        parts = [
            f"gen{i} {g.collections}x, {g.total_s * 1e3:.0f} ms in all, max {g.max_s * 1e3:.1f} ms"
            for i, g in enumerate(self.generations)
        ]
        return "; ".join(parts) + f" ({gc.get_freeze_count()} objects frozen)"
