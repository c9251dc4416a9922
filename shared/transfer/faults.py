"""Fault injection for KV transfers: drop, delay or corrupt layer messages on the sending side.

The knob serves reliability tests and chaos runs. A spec string such as
`"drop=0.1,delay_ms=50,corrupt=0.05,seed=3"` becomes a `FaultConfig`; each sender owns one
`FaultInjector` that draws from a private `random.Random(seed)`, so a seeded run fails the same
layers every time (given the same order of sends).
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass
from typing import Any

import torch

# spec key -> (field name, scale applied to the parsed value)
_SPEC_KEYS: dict[str, tuple[str, float]] = {
    "drop": ("drop", 1.0),
    "corrupt": ("corrupt", 1.0),
    "delay_s": ("delay_s", 1.0),
    "delay_ms": ("delay_s", 1e-3),
}


@dataclass(frozen=True)
class FaultConfig:
    """Faults a sender injects into its own layer messages. All zero (the default) means none."""

    drop: float = 0.0  # probability a layer message (header and payload) is silently not sent
    delay_s: float = 0.0  # sleep added before each layer send
    corrupt: float = 0.0  # probability one payload byte is flipped after the checksum was computed
    seed: int | None = None  # seed of the injector's RNG; None draws a fresh seed

    def __post_init__(self) -> None:
        for name in ("drop", "corrupt"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"fault {name}={value} is not a probability in [0, 1]")
        if self.delay_s < 0.0:
            raise ValueError(f"fault delay_s={self.delay_s} must be >= 0")

    @property
    def enabled(self) -> bool:
        """Whether any fault can fire."""
        return self.drop > 0.0 or self.corrupt > 0.0 or self.delay_s > 0.0

    @classmethod
    def parse(cls, spec: str) -> FaultConfig:
        """Parse `"drop=0.1,delay_ms=50,corrupt=0.05,seed=3"`; `""` means no faults.

        Keys: `drop`, `corrupt` (probabilities), `delay_ms` or `delay_s`, `seed` (int). Unknown or
        repeated keys and unparsable or out-of-range values raise ValueError naming them.
        """
        values: dict[str, Any] = {}
        for part in (p.strip() for p in spec.split(",")):
            if not part:
                continue
            key, sep, raw = (s.strip() for s in part.partition("="))
            if not sep:
                raise ValueError(f"fault spec item {part!r} is not key=value")
            if key == "seed":
                field, value = "seed", _parse_number(key, raw, int)
            elif key in _SPEC_KEYS:
                field, scale = _SPEC_KEYS[key]
                value = _parse_number(key, raw, float) * scale
            else:
                raise ValueError(f"unknown fault key {key!r}: use drop, corrupt, delay_ms, delay_s, seed")
            if field in values:
                raise ValueError(f"fault key {key!r} given twice (delay_ms and delay_s set the same field)")
            values[field] = value
        return cls(**values)


def _parse_number(key: str, raw: str, kind: type[int] | type[float]) -> int | float:
    try:
        return kind(raw)
    except ValueError:
        raise ValueError(f"fault key {key!r} has bad value {raw!r} (expected {kind.__name__})") from None


class FaultInjector:
    """Draws the faults of one sender; deterministic for a given seed and sequence of calls."""

    def __init__(self, config: FaultConfig | None) -> None:
        self.config = config if config is not None else FaultConfig()
        self._rng = random.Random(self.config.seed)

    async def delay(self) -> None:
        if self.config.delay_s > 0.0:
            await asyncio.sleep(self.config.delay_s)

    def should_drop(self) -> bool:
        return self.config.drop > 0.0 and self._rng.random() < self.config.drop

    def maybe_corrupt(self, payload: torch.Tensor) -> torch.Tensor:
        """The payload itself, or (with probability `corrupt`) a copy with one byte inverted.

        payload: [nbytes] uint8. The caller's tensor is never modified.
        """
        if not (self.config.corrupt > 0.0 and self._rng.random() < self.config.corrupt):
            return payload
        corrupted = payload.clone()
        index = self._rng.randrange(corrupted.numel())
        corrupted[index] = corrupted[index] ^ 0xFF
        if corrupted.is_cuda:
            torch.cuda.current_stream(corrupted.device).synchronize()  # the transport reads it next
        return corrupted
