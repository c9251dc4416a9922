"""Paged KV cache copies: store new tokens' K and V into their slots, and move whole blocks out of and
into the cache (disaggregated prefill ships a prompt's blocks layer by layer).

    k, v: [num_tokens, num_kv_heads, head_dim]
    slot_mapping: [num_tokens], each block * block_size + offset (negative: skip the token)
    caches: [num_blocks, block_size, num_kv_heads, head_dim]
    kv (gathered blocks): [2, n, block_size, num_kv_heads, head_dim], K then V, in block_ids order

store_kv skips tokens whose slot is negative (padding rows of a CUDA-graph batch); their slots keep what
they held. Block copies treat a block as one contiguous run of block_size * num_kv_heads * head_dim
elements, so they need each block's rows contiguous (a cache slice [layer] of a bigger tensor is fine):

    cache:  | block 0: (offset 0, head 0, dim 0..d) (offset 0, head 1, ...) ... | block 1: ... |
             <-------------------- k_cache.stride(0) apart ------------------->

Slot and block ids are not range-checked on the device (that would synchronize); out-of-range ids are
the caller's bug, and duplicate ids leave which copy wins unspecified.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from baton.kernels.fused import round_to_dtype

STORE_TILE = 2048
"""Elements (heads x head_dim) of K, and as many of V, one store_kv program copies."""
COPY_CHUNK = 4096
"""Elements of a block one gather/scatter program copies."""
NUM_WARPS = 4

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# --- references: the index_copy_ / index_select code the engine runs without kernels ------------------


def store_kv_reference(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """TorchAttentionBackend.store_kv, skipping negative slots."""
    num_kv_heads, head_dim = k_cache.shape[2:]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slots, k[keep].to(k_cache.dtype))
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slots, v[keep].to(v_cache.dtype))


def gather_kv_blocks_reference(
    k_cache: torch.Tensor, v_cache: torch.Tensor, block_ids: torch.Tensor
) -> torch.Tensor:
    """EngineCore._layer_exporter's copy: [2, n, block_size, num_kv_heads, head_dim]."""
    block_ids = block_ids.long()
    return torch.stack((k_cache.index_select(0, block_ids), v_cache.index_select(0, block_ids)))


def scatter_kv_blocks_reference(
    kv: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_ids: torch.Tensor
) -> None:
    """EngineCore.write_reserved_kv's copy."""
    block_ids = block_ids.long()
    k_cache.index_copy_(0, block_ids, kv[0])
    v_cache.index_copy_(0, block_ids, kv[1])


# --- store_kv ---------------------------------------------------------------------------------------


def store_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """k[i], v[i] (cast to the cache dtype, rounding to nearest even) into slot slot_mapping[i] of the
    caches, for every i whose slot is >= 0. One launch for K and V; strides are honoured (k and v may be
    views into a fused qkv), the last dimension must be contiguous."""
    _check_store(k, v, k_cache, v_cache, slot_mapping)
    num_tokens, num_kv_heads, head_dim = k.shape
    if not num_tokens:
        return
    dim_pad = triton.next_power_of_2(head_dim)
    cap = 1 << (max(1, STORE_TILE // dim_pad).bit_length() - 1)  # heads per program, a power of 2
    heads_block = min(triton.next_power_of_2(num_kv_heads), cap)
    grid = (num_tokens, triton.cdiv(num_kv_heads, heads_block))
    _store_kv_kernel[grid](
        k, v, k_cache, v_cache, slot_mapping, *k.stride()[:2], *v.stride()[:2],
        *k_cache.stride()[:3], *v_cache.stride()[:3],
        BLOCK_SIZE=k_cache.shape[1], NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, DIM_PAD=dim_pad,
        HEADS_BLOCK=heads_block, num_warps=NUM_WARPS,
    )  # fmt: skip


def _check_store(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Shapes, dtypes, devices and strides, before any launch (ValueError names the problem)."""
    if k.dim() != 3 or k.shape != v.shape or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(
            f"expected k, v [tokens, kv_heads, dim] and equal 4-d caches, got {tuple(k.shape)}, "
            f"{tuple(v.shape)}, {tuple(k_cache.shape)}, {tuple(v_cache.shape)}"
        )
    if k.shape[1:] != k_cache.shape[2:]:
        raise ValueError(f"k, v heads and dim {tuple(k.shape[1:])} vs cache {tuple(k_cache.shape[2:])}")
    if slot_mapping.shape != (k.shape[0],) or slot_mapping.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"slot_mapping must be int64 or int32 [{k.shape[0]}], got "
            f"{tuple(slot_mapping.shape)} {slot_mapping.dtype}"
        )
    if k.dtype not in _DTYPES or v.dtype not in _DTYPES or k_cache.dtype not in _DTYPES:
        raise ValueError(
            f"k, v and caches must be float32, float16 or bfloat16, got {k.dtype}, {v.dtype}, {k_cache.dtype}"
        )
    if v_cache.dtype != k_cache.dtype:
        raise ValueError(f"k_cache {k_cache.dtype} and v_cache {v_cache.dtype} must share a dtype")
    _same_device(k, v, k_cache, v_cache, slot_mapping)
    if any(t.stride(-1) != 1 for t in (k, v, k_cache, v_cache)):
        raise ValueError("the last dimension of k, v and the caches must be contiguous")


@triton.jit
def _store_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, k_s0, k_s1, v_s0, v_s1,
    kc_s0, kc_s1, kc_s2, vc_s0, vc_s1, vc_s2,
    BLOCK_SIZE: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr,
    HEADS_BLOCK: tl.constexpr,
):  # fmt: skip
    """One token's block of KV heads, K and V; nothing at all for a negative slot."""
    token = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * HEADS_BLOCK + tl.arange(0, HEADS_BLOCK)
    d = tl.arange(0, DIM_PAD)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    num_heads = tl.where(slot >= 0, NUM_KV_HEADS, 0)  # a skipped token copies no heads
    mask = (heads < num_heads)[:, None] & (d < HEAD_DIM)[None, :]  # [HEADS_BLOCK, DIM_PAD]
    slot = tl.maximum(slot, 0)  # in-range addresses even where masked
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    k = tl.load(k_ptr + token * k_s0 + heads[:, None] * k_s1 + d[None, :], mask=mask)
    v = tl.load(v_ptr + token * v_s0 + heads[:, None] * v_s1 + d[None, :], mask=mask)
    dtype = k_cache_ptr.dtype.element_ty
    kc_ptrs = k_cache_ptr + block * kc_s0 + offset * kc_s1 + heads[:, None] * kc_s2 + d[None, :]
    vc_ptrs = v_cache_ptr + block * vc_s0 + offset * vc_s1 + heads[:, None] * vc_s2 + d[None, :]
    tl.store(kc_ptrs, _cast(k, dtype), mask=mask)
    tl.store(vc_ptrs, _cast(v, dtype), mask=mask)


@triton.jit
def _cast(x, DTYPE: tl.constexpr):
    """torch's .to(DTYPE): a no-op for the same dtype, else through float32 (exact) rounded once."""
    if x.dtype == DTYPE:
        return x
    else:
        return round_to_dtype(x.to(tl.float32), DTYPE)


# --- gather / scatter whole blocks ------------------------------------------------------------------


def gather_kv_blocks(
    k_cache: torch.Tensor, v_cache: torch.Tensor, block_ids: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Copies of blocks block_ids (int64 or int32 [n]) of both caches: out [2, n, block_size, num_kv_heads,
    head_dim], K then V, in block_ids order. One launch; a program per (block, K/V, chunk)."""
    _check_blocks(k_cache, v_cache, block_ids)
    shape = (2, block_ids.shape[0], *k_cache.shape[1:])
    if out is None:
        out = torch.empty(shape, device=k_cache.device, dtype=k_cache.dtype)
    _check_gathered("out", out, shape, k_cache)
    _copy_blocks(k_cache, v_cache, block_ids, out, gather=True)
    return out


def scatter_kv_blocks(
    kv: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_ids: torch.Tensor
) -> None:
    """The inverse of gather_kv_blocks: kv[0][i] into block block_ids[i] of k_cache, kv[1][i] of v_cache.
    kv: [2, n, block_size, num_kv_heads, head_dim] in the caches' dtype, on their device."""
    _check_blocks(k_cache, v_cache, block_ids)
    _check_gathered("kv", kv, (2, block_ids.shape[0], *k_cache.shape[1:]), k_cache)
    _copy_blocks(k_cache, v_cache, block_ids, kv, gather=False)


def _copy_blocks(
    k_cache: torch.Tensor, v_cache: torch.Tensor, block_ids: torch.Tensor, kv: torch.Tensor, gather: bool
) -> None:
    """One launch copying whole blocks between the caches and kv [2, n, *block] (K then V, in
    block_ids order)."""
    n = block_ids.shape[0]
    numel = k_cache[0].numel()
    if not n or not numel:
        return
    chunk = min(triton.next_power_of_2(numel), COPY_CHUNK)
    _copy_blocks_kernel[(n, 2, triton.cdiv(numel, chunk))](
        k_cache, v_cache, block_ids, kv, k_cache.stride(0), v_cache.stride(0), kv.stride(0), kv.stride(1),
        BLOCK_NUMEL=numel, CHUNK=chunk, GATHER=gather, num_warps=NUM_WARPS,
    )  # fmt: skip


def _check_blocks(k_cache: torch.Tensor, v_cache: torch.Tensor, block_ids: torch.Tensor) -> None:
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape or k_cache.dtype != v_cache.dtype:
        raise ValueError(
            f"expected equal 4-d caches of one dtype, got {tuple(k_cache.shape)} {k_cache.dtype}, "
            f"{tuple(v_cache.shape)} {v_cache.dtype}"
        )
    if (
        block_ids.dim() != 1
        or block_ids.dtype not in (torch.int32, torch.int64)
        or not block_ids.is_contiguous()
    ):
        raise ValueError(
            f"block_ids must be contiguous int64 or int32 [n], got {tuple(block_ids.shape)} {block_ids.dtype}"
            f" with stride {block_ids.stride()}"
        )
    _same_device(k_cache, v_cache, block_ids)
    if not _blocks_contiguous(k_cache, 1) or not _blocks_contiguous(v_cache, 1):
        raise ValueError(
            "each cache block must be contiguous (strides of dims 1..3 those of a contiguous block)"
        )


def _check_gathered(name: str, kv: torch.Tensor, shape: tuple[int, ...], k_cache: torch.Tensor) -> None:
    if tuple(kv.shape) != shape or kv.dtype != k_cache.dtype:
        raise ValueError(f"{name} must be {shape} {k_cache.dtype}, got {tuple(kv.shape)} {kv.dtype}")
    _same_device(kv, k_cache)
    if not _blocks_contiguous(kv, 2):
        raise ValueError(
            f"each block of {name} must be contiguous (strides of dims 2..4 those of a contiguous block)"
        )


def _blocks_contiguous(t: torch.Tensor, first: int) -> bool:
    """Whether dims first.. of t are laid out as a contiguous tensor of that shape (size-1 dims aside)."""
    expected = 1
    for size, stride in zip(reversed(t.shape[first:]), reversed(t.stride()[first:]), strict=True):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


def _same_device(*tensors: torch.Tensor) -> None:
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"tensors on several devices: {sorted(str(d) for d in devices)}")


@triton.jit
def _copy_blocks_kernel(
    k_cache_ptr, v_cache_ptr, ids_ptr, kv_ptr, kc_s0, vc_s0, kv_s0, kv_s1,
    BLOCK_NUMEL: tl.constexpr, CHUNK: tl.constexpr, GATHER: tl.constexpr,
):  # fmt: skip
    """Chunk `pid 2` of the i-th listed block of the K (pid 1 == 0) or V cache, cache <-> kv[pid 1, i]."""
    i = tl.program_id(0).to(tl.int64)
    which = tl.program_id(1).to(tl.int64)
    offs = tl.program_id(2) * CHUNK + tl.arange(0, CHUNK)
    mask = offs < BLOCK_NUMEL
    block = tl.load(ids_ptr + i).to(tl.int64)
    if which == 0:  # noqa: SIM108 (a runtime condition: no conditional expression in Triton)
        cache = k_cache_ptr + block * kc_s0 + offs
    else:
        cache = v_cache_ptr + block * vc_s0 + offs
    gathered = kv_ptr + which * kv_s0 + i * kv_s1 + offs
    if GATHER:
        tl.store(gathered, tl.load(cache, mask=mask), mask=mask)
    else:
        tl.store(cache, tl.load(gathered, mask=mask), mask=mask)
