"""How every kernel benchmark measures: medians of CUDA-event timings after warm-up, the L2 flushed
before each run (triton.testing.do_bench) and inputs rotated across copies, so no run finds its
operands in cache; bandwidth compared with the device copy bandwidth measured in the same run."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any

import torch
import triton.testing

L2_ROTATION_BYTES = 256 * 2**20
"""Inputs are copied until the copies together exceed this (several times any current L2)."""


def copy_bandwidth_gbs() -> float:
    """Device-to-device copy of 1 GiB (bytes read + bytes written per second), in GB/s."""
    src = torch.randn(256 * 2**20, device="cuda", dtype=torch.float32)  # 1 GiB
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    return 2 * 256 * 2**20 * 4 / ms / 1e6


def copies_for(nbytes_one: int) -> int:
    """How many copies of a case's inputs keep the rotation above L2_ROTATION_BYTES (at least 2)."""
    return max(2, -(-L2_ROTATION_BYTES // max(nbytes_one, 1)))


def median_ms(fn: Callable[..., Any], inputs: Sequence[tuple[Any, ...]]) -> float:
    """Median time of fn(*inputs[i]), cycling through the input copies."""
    turn = itertools.cycle(inputs)

    def call() -> None:
        fn(*next(turn))

    return float(triton.testing.do_bench(call, warmup=25, rep=200, return_mode="median"))


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want|| in float64."""
    want64 = want.double()
    return float((got.double() - want64).norm() / want64.norm())
