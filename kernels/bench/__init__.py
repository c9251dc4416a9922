"""`baton bench kernels`: every Triton kernel timed against its torch baseline in one run on a GPU.

    baton bench kernels [--only decode,prefill,elementwise] [--out results.json]

The run first measures the device copy bandwidth, then each kernel (see timing.py for the method),
prints a table per kernel family and writes everything, with the card's name, as JSON."""

from __future__ import annotations

from baton.kernels.bench.runner import KernelBenchConfig, run_kernel_benchmarks

__all__ = ["KernelBenchConfig", "run_kernel_benchmarks"]
