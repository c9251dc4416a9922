"""The memory-bound helpers against the torch code they replace: KV store by slot mapping, block
gather/scatter for KV transfer, RMSNorm (alone and fused with the residual add), SiLU-and-mul and
rotary embedding. Each row: time, bandwidth, fraction of copy bandwidth, speed-up over torch."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from baton.kernels import cache_ops, fused
from baton.kernels.bench.timing import copies_for, median_ms, relative_error

DTYPE = torch.bfloat16
KV_HEADS, HEAD_DIM, BLOCK = 8, 128, 16


def bench_elementwise(
    tokens: int, hidden: int, intermediate: int, copy_gbs: float, gen: torch.Generator
) -> list[dict[str, Any]]:
    """One row per helper, on `tokens` tokens of a model with the given hidden and intermediate sizes."""
    cases = [
        _store_kv(tokens, gen),
        _gather_blocks(tokens, gen),
        _scatter_blocks(tokens, gen),
        _rms_norm(tokens, hidden, gen),
        _add_rms_norm(tokens, hidden, gen),
        _silu_and_mul(tokens, intermediate, gen),
        _rotary(tokens, gen),
    ]
    rows = []
    for name, make, ours, torch_fn, nbytes in cases:
        inputs = [make() for _ in range(copies_for(nbytes))]
        error = relative_error(_first(ours(*_cloned(inputs[0]))), _first(torch_fn(*_cloned(inputs[0]))))
        ms = median_ms(ours, inputs)
        baseline_ms = median_ms(torch_fn, inputs)
        gbs = nbytes / ms / 1e6
        rows.append(
            {"kernel": name, "tokens": tokens, "ms": ms, "gbs": gbs, "frac_copy": gbs / copy_gbs,
             "baseline_ms": baseline_ms, "speedup": baseline_ms / ms, "rel_err": error}
        )  # fmt: skip
        del inputs
    torch.cuda.empty_cache()
    return rows


Case = tuple[str, Callable[[], tuple[Any, ...]], Callable[..., Any], Callable[..., Any], int]


def _cloned(args: tuple[Any, ...]) -> tuple[Any, ...]:
    """Fresh copies for the correctness check (some helpers write into their arguments)."""
    return tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)


def _first(result: Any) -> torch.Tensor:
    return result[0] if isinstance(result, tuple) else result


def _randn(*shape: int, gen: torch.Generator, dtype: torch.dtype = DTYPE) -> torch.Tensor:
    return torch.randn(shape, device="cuda", dtype=dtype, generator=gen)


def _caches(num_blocks: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return _randn(num_blocks, BLOCK, KV_HEADS, HEAD_DIM, gen=gen), _randn(
        num_blocks, BLOCK, KV_HEADS, HEAD_DIM, gen=gen
    )


def _store_kv(tokens: int, gen: torch.Generator) -> Case:
    """A prefill step's new K/V (tokens of them) into scattered slots of a cache twice their size."""
    num_blocks = 2 * tokens // BLOCK

    def make() -> tuple[Any, ...]:
        k_cache, v_cache = _caches(num_blocks, gen)
        slots = torch.randperm(num_blocks * BLOCK, device="cuda", generator=gen)[:tokens]
        return (
            _randn(tokens, KV_HEADS, HEAD_DIM, gen=gen),
            _randn(tokens, KV_HEADS, HEAD_DIM, gen=gen),
            k_cache,
            v_cache,
            slots,
        )

    nbytes = 2 * 2 * tokens * KV_HEADS * HEAD_DIM * DTYPE.itemsize  # K and V, read and written
    # the baseline is the torch backend's own store (the reference also filters negative slots: a sync)
    ours, reference = _returning(cache_ops.store_kv, 2), _returning(_torch_store_kv, 2)
    return "store_kv", make, ours, reference, nbytes


def _torch_store_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor
) -> None:
    num_kv_heads, head_dim = k_cache.shape[2:]
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slots, k)
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slots, v)


def _gather_blocks(tokens: int, gen: torch.Generator) -> Case:
    """One layer of a `tokens`-token prompt's blocks, copied out for a KV push."""
    num_blocks = -(-tokens // BLOCK)

    def make() -> tuple[Any, ...]:
        k_cache, v_cache = _caches(4 * num_blocks, gen)
        ids = torch.randperm(4 * num_blocks, device="cuda", generator=gen)[:num_blocks]
        return k_cache, v_cache, ids

    nbytes = 2 * 2 * num_blocks * BLOCK * KV_HEADS * HEAD_DIM * DTYPE.itemsize
    return "gather_kv_blocks", make, cache_ops.gather_kv_blocks, cache_ops.gather_kv_blocks_reference, nbytes


def _scatter_blocks(tokens: int, gen: torch.Generator) -> Case:
    """One pushed layer written into a decode worker's reserved blocks."""
    num_blocks = -(-tokens // BLOCK)

    def make() -> tuple[Any, ...]:
        k_cache, v_cache = _caches(4 * num_blocks, gen)
        ids = torch.randperm(4 * num_blocks, device="cuda", generator=gen)[:num_blocks]
        return _randn(2, num_blocks, BLOCK, KV_HEADS, HEAD_DIM, gen=gen), k_cache, v_cache, ids

    nbytes = 2 * 2 * num_blocks * BLOCK * KV_HEADS * HEAD_DIM * DTYPE.itemsize
    ours, reference = (
        _returning(cache_ops.scatter_kv_blocks, 1),
        _returning(cache_ops.scatter_kv_blocks_reference, 1),
    )
    return "scatter_kv_blocks", make, ours, reference, nbytes


def _returning(fn: Callable[..., None], index: int) -> Callable[..., torch.Tensor]:
    """For helpers that write into an argument and return nothing: return that argument (the K cache)."""

    def run(*args: Any) -> torch.Tensor:
        fn(*args)
        return args[index]

    return run


def _rms_norm(tokens: int, hidden: int, gen: torch.Generator) -> Case:
    def make() -> tuple[Any, ...]:
        return _randn(tokens, hidden, gen=gen), _randn(hidden, gen=gen), 1e-5

    return "rms_norm", make, fused.rms_norm, fused.rms_norm_reference, 2 * tokens * hidden * DTYPE.itemsize


def _add_rms_norm(tokens: int, hidden: int, gen: torch.Generator) -> Case:
    def make() -> tuple[Any, ...]:
        return _randn(tokens, hidden, gen=gen), _randn(hidden, gen=gen), 1e-5, _randn(tokens, hidden, gen=gen)

    def ours(x: torch.Tensor, w: torch.Tensor, eps: float, residual: torch.Tensor) -> Any:
        return fused.rms_norm(x, w, eps, residual=residual)

    def reference(x: torch.Tensor, w: torch.Tensor, eps: float, residual: torch.Tensor) -> Any:
        return fused.rms_norm_reference(x, w, eps, residual=residual)

    return "add_rms_norm", make, ours, reference, 4 * tokens * hidden * DTYPE.itemsize


def _silu_and_mul(tokens: int, intermediate: int, gen: torch.Generator) -> Case:
    def make() -> tuple[Any, ...]:
        return (_randn(tokens, 2 * intermediate, gen=gen),)

    nbytes = 3 * tokens * intermediate * DTYPE.itemsize
    return "silu_and_mul", make, fused.silu_and_mul, fused.silu_and_mul_reference, nbytes


def _rotary(tokens: int, gen: torch.Generator) -> Case:
    """Llama-3.2-1B-shaped rope: 32 query and 8 KV heads of 128, tables for 8k positions."""
    q_heads, max_positions = 32, 8192
    angles = torch.rand(max_positions, HEAD_DIM // 2, device="cuda", generator=gen) * 6.3
    cos, sin = angles.cos().repeat(1, 2), angles.sin().repeat(1, 2)

    def make() -> tuple[Any, ...]:
        positions = torch.randint(0, max_positions, (tokens,), device="cuda", generator=gen)
        return (
            _randn(tokens, q_heads, HEAD_DIM, gen=gen),
            _randn(tokens, KV_HEADS, HEAD_DIM, gen=gen),
            cos,
            sin,
            positions,
        )

    nbytes = 2 * tokens * (q_heads + KV_HEADS) * HEAD_DIM * DTYPE.itemsize
    return "rotary", make, fused.apply_rotary, fused.apply_rotary_reference, nbytes
