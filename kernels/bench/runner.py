"""Runs the kernel benchmark families in one process and reports them (table and JSON)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import triton

FAMILIES = ("decode", "prefill", "elementwise")
DECODE_TITLE = "paged decode attention (32 q / 8 kv heads, d128, bf16, block 16) vs gather + SDPA"
DECODE_COLUMNS = ["batch", "ctx", "ms", "gbs", "frac_copy", "baseline_frac_copy", "speedup", "rel_err"]
PREFILL_TITLE = "paged prefill attention (causal, 32 q / 8 kv heads, d128, bf16) vs SDPA flash"
PREFILL_COLUMNS = ["batch", "len", "cached_prefix", "ms", "tflops", "baseline_ms", "speedup", "rel_err"]
ELEMENTWISE_COLUMNS = ["kernel", "tokens", "ms", "gbs", "frac_copy", "baseline_ms", "speedup", "rel_err"]


@dataclass(frozen=True)
class KernelBenchConfig:
    families: tuple[str, ...] = FAMILIES
    decode_batches: tuple[int, ...] = (32, 64, 128)
    decode_contexts: tuple[int, ...] = (1024, 2048, 4096, 8192)
    prefill_shapes: tuple[tuple[int, int], ...] = ((16, 512), (8, 1024), (4, 2048), (2, 4096), (1, 8192))
    """(sequences, tokens each)."""
    elementwise_tokens: tuple[int, ...] = (256, 8192)
    hidden: int = 2048
    intermediate: int = 8192
    out: Path | None = None
    seed: int = 0
    tuning: dict[str, int] = field(default_factory=dict)
    """Kernel module constants to override for probing: {"decode.NUM_STAGES": 3, "prefill.BLOCK_N": 128}."""


def run_kernel_benchmarks(config: KernelBenchConfig) -> dict[str, Any]:
    """Measure, print and (with config.out) save. Needs CUDA."""
    if not torch.cuda.is_available():
        raise ValueError("kernel benchmarks need a CUDA device; none is visible")
    from baton.kernels.bench.timing import copy_bandwidth_gbs

    _apply_tuning(config.tuning)
    gen = torch.Generator(device="cuda").manual_seed(config.seed)
    copy_gbs = copy_bandwidth_gbs()
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "copy_gbs": copy_gbs,
        "tuning": config.tuning,
    }
    versions = f"torch {torch.__version__}, triton {triton.__version__}"
    print(f"{result['device']}: device copy {copy_gbs:.0f} GB/s ({versions})")
    runners = {"decode": _run_decode, "prefill": _run_prefill, "elementwise": _run_elementwise}
    for family in config.families:
        result[family] = runners[family](config, copy_gbs, gen)
    if config.out is not None:
        config.out.parent.mkdir(parents=True, exist_ok=True)
        config.out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {config.out}")
    return result


def _run_decode(config: KernelBenchConfig, copy_gbs: float, gen: torch.Generator) -> list[dict[str, Any]]:
    from baton.kernels.bench.decode import DecodeShape, bench_decode

    shape = DecodeShape()
    bench_decode(config.decode_batches[0], config.decode_contexts[0], copy_gbs, shape, gen)  # warm, discarded
    rows = [
        bench_decode(b, c, copy_gbs, shape, gen)
        for b in config.decode_batches
        for c in config.decode_contexts
    ]
    _print_table(DECODE_TITLE, rows, DECODE_COLUMNS)
    return rows


def _run_prefill(config: KernelBenchConfig, copy_gbs: float, gen: torch.Generator) -> list[dict[str, Any]]:
    from baton.kernels.bench.decode import DecodeShape
    from baton.kernels.bench.prefill import bench_prefill

    rows = [row for b, n in config.prefill_shapes for row in bench_prefill(b, n, DecodeShape(), gen)]
    _print_table(PREFILL_TITLE, rows, PREFILL_COLUMNS)
    return rows


def _run_elementwise(
    config: KernelBenchConfig, copy_gbs: float, gen: torch.Generator
) -> list[dict[str, Any]]:
    from baton.kernels.bench.elementwise import bench_elementwise

    hidden, intermediate = config.hidden, config.intermediate
    rows = [
        row
        for n in config.elementwise_tokens
        for row in bench_elementwise(n, hidden, intermediate, copy_gbs, gen)
    ]
    _print_table(
        f"cache ops and fused helpers (hidden {hidden}, intermediate {intermediate}, bf16)",
        rows,
        ELEMENTWISE_COLUMNS,
    )
    return rows


def _apply_tuning(tuning: dict[str, int]) -> None:
    """`decode.NUM_STAGES=3` sets paged_decode.NUM_STAGES; `prefill.BLOCK_N=128` prefill_attention's."""
    from baton.kernels import paged_decode, prefill_attention

    modules = {"decode": paged_decode, "prefill": prefill_attention}
    for key, value in tuning.items():
        family, _, name = key.partition(".")
        module = modules.get(family)
        if module is None or not name.isupper() or not hasattr(module, name):
            raise ValueError(f"unknown kernel constant {key!r}: expected decode.NAME or prefill.NAME")
        setattr(module, name, value)


def _print_table(title: str, rows: list[dict[str, Any]], columns: list[str]) -> None:
    print(f"\n{title}")
    print("  ".join(f"{c:>12}" for c in columns))
    for row in rows:
        print("  ".join(f"{_cell(row.get(c)):>12}" for c in columns))


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if abs(value) < 1e-2 and value != 0:
            return f"{value:.1e}"
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.0f}"
    return str(value)
