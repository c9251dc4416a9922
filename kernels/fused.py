"""Fused elementwise kernels of the decoder layer: RMSNorm (optionally after the residual add), the gated
MLP's silu(gate) * up, and rotate-half rotary embeddings.

Each rounds like the torch module it replaces: math in float32, rounded to the activations' dtype
wherever the module's torch expression produces a tensor of that dtype (an intermediate torch would
store in bf16 is rounded to bf16 here too). Rounding is to nearest even by integer arithmetic for bf16
(`round_to_dtype`), so the interpreter, which truncates a plain bf16 cast, rounds as the GPU does.

    rms_norm:      x, residual, out [num_tokens, hidden]            weight [hidden]
    silu_and_mul:  x [num_tokens, 2 * intermediate] (gate, up)      out [num_tokens, intermediate]
    apply_rotary:  q [num_tokens, num_heads, head_dim]              k [num_tokens, num_kv_heads, head_dim]
                   cos, sin [max_positions, head_dim] float32       positions [num_tokens]
"""

from __future__ import annotations

from typing import NamedTuple, overload

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

MAX_ROW_BLOCK = 8192
"""Widest row rms_norm holds in registers in one pass; wider rows are read twice in chunks of this."""
SILU_BLOCK = 2048
"""Elements of one row's intermediate activations per silu_and_mul program."""
ROTARY_TILE = 2048
"""Elements (heads x head_dim) one apply_rotary program rotates."""
ROTARY_WARPS = 4

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class NormedResidual(NamedTuple):
    """rms_norm with a residual: the normalized sum, and the sum itself (the next residual)."""

    normed: torch.Tensor  # [num_tokens, hidden]
    residual: torch.Tensor  # [num_tokens, hidden]: x + residual, rounded once to the dtype


# --- references: the modules' own expressions -------------------------------------------------------


@overload
def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor: ...
@overload
def rms_norm_reference(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor
) -> NormedResidual: ...
def rms_norm_reference(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | NormedResidual:
    """RMSNorm.forward, after `x = x + residual` when a residual is given."""
    if residual is not None:
        x = x + residual
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    normed = weight * xf.to(x.dtype)
    return normed if residual is None else NormedResidual(normed, x)


def silu_and_mul_reference(x: torch.Tensor) -> torch.Tensor:
    """GatedMLP's activation: silu(gate) * up of the fused gate_up projection."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def apply_rotary_reference(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """RotaryEmbedding.__call__ with the given tables (new tensors; the inputs are left alone)."""
    cos = cos[positions].to(q.dtype)[:, None, :]  # [num_tokens, 1, head_dim]
    sin = sin[positions].to(q.dtype)[:, None, :]
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


# --- rms_norm ---------------------------------------------------------------------------------------


@overload
def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: None = None, out: torch.Tensor | None = None
) -> torch.Tensor: ...
@overload
def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor, out: torch.Tensor | None = None
) -> NormedResidual: ...
def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor | NormedResidual:
    """weight * (x * rsqrt(mean(x^2) + eps)) with RMSNorm's rounding; one program per row.

    With `residual`, normalizes s = x + residual (rounded once, as torch's add) and returns
    NormedResidual(normed, s), s in a new tensor; the inputs are never written. `out` receives the
    normalized rows. weight must share x's dtype."""
    _check_rms_norm(x, weight, residual, out)
    num_tokens, hidden = x.shape
    if out is None:
        out = torch.empty_like(x)
    summed = torch.empty_like(x) if residual is not None else None
    if num_tokens:
        block = min(triton.next_power_of_2(hidden), MAX_ROW_BLOCK)
        res = residual if residual is not None else x  # never read without HAS_RESIDUAL
        sums = summed if summed is not None else out  # never written without HAS_RESIDUAL
        _rms_norm_kernel[(num_tokens,)](
            x, res, weight, out, sums, eps, x.stride(0), res.stride(0), out.stride(0), sums.stride(0),
            HIDDEN=hidden, BLOCK=block, HAS_RESIDUAL=residual is not None,
            num_warps=max(1, min(16, block // 256)), enable_fp_fusion=False,
        )  # fmt: skip
    return out if summed is None else NormedResidual(out, summed)


def _check_rms_norm(
    x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None, out: torch.Tensor | None
) -> None:
    if x.dim() != 2 or x.shape[1] == 0 or weight.shape != (x.shape[1],):
        raise ValueError(
            f"expected x [tokens, hidden] and weight [hidden], got {tuple(x.shape)}, {tuple(weight.shape)}"
        )
    if x.dtype not in _DTYPES or weight.dtype != x.dtype:
        raise ValueError(
            f"x must be float32, float16 or bfloat16 and weight the same dtype, got {x.dtype}, {weight.dtype}"
        )
    for name, t in (("residual", residual), ("out", out)):
        if t is not None and (t.shape != x.shape or t.dtype != x.dtype or t.device != x.device):
            raise ValueError(
                f"{name} must match x {tuple(x.shape)} {x.dtype}, got {tuple(t.shape)} {t.dtype}"
            )
    if weight.device != x.device:
        raise ValueError(f"weight on {weight.device}, x on {x.device}")
    if any(t is not None and t.stride(-1) != 1 for t in (x, weight, residual, out)):
        raise ValueError("the last dimension of x, weight, residual and out must be contiguous")


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, sum_ptr, eps, x_s0, res_s0, out_s0, sum_s0,
    HIDDEN: tl.constexpr, BLOCK: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
):  # fmt: skip
    """One row. A row within BLOCK stays in registers; a wider one is read twice (sum of squares, then
    normalize), the residual sum recomputed rather than read back."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    x_row = x_ptr + row * x_s0
    res_row = res_ptr + row * res_s0
    sum_row = sum_ptr + row * sum_s0
    out_row = out_ptr + row * out_s0
    if BLOCK >= HIDDEN:
        mask = cols < HIDDEN
        s = _input_chunk(x_row, res_row, sum_row, cols, mask, HAS_RESIDUAL, True)
        inv_rms = _inv_rms(tl.sum(s * s, axis=0), eps, HIDDEN)
        _normalize_chunk(s, inv_rms, w_ptr, out_row, cols, mask)
    else:
        squares = tl.zeros([BLOCK], tl.float32)
        for start in range(0, HIDDEN, BLOCK):
            mask = start + cols < HIDDEN
            s = _input_chunk(x_row + start, res_row + start, sum_row + start, cols, mask, HAS_RESIDUAL, True)
            squares += s * s
        inv_rms = _inv_rms(tl.sum(squares, axis=0), eps, HIDDEN)
        for start in range(0, HIDDEN, BLOCK):
            mask = start + cols < HIDDEN
            s = _input_chunk(x_row + start, res_row + start, sum_row + start, cols, mask, HAS_RESIDUAL, False)
            _normalize_chunk(s, inv_rms, w_ptr + start, out_row + start, cols, mask)


@triton.jit
def _input_chunk(x_ptr, res_ptr, sum_ptr, cols, mask, HAS_RESIDUAL: tl.constexpr, STORE_SUM: tl.constexpr):
    """The row's values to normalize, in float32: x, or x + residual rounded to the dtype (stored)."""
    x = tl.load(x_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        residual = tl.load(res_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        s = round_to_dtype(x + residual, sum_ptr.dtype.element_ty)
        if STORE_SUM:
            tl.store(sum_ptr + cols, s, mask=mask)
        x = s.to(tl.float32)
    return x


@triton.jit
def _inv_rms(sum_squares, eps, HIDDEN: tl.constexpr):
    """rsqrt(mean + eps) as torch's CPU kernel rounds it: correctly rounded sqrt, then division."""
    mean = tl.div_rn(sum_squares, tl.full([], HIDDEN, tl.float32))
    return tl.div_rn(1.0, tl.sqrt_rn(mean + eps))


@triton.jit
def _normalize_chunk(s, inv_rms, w_ptr, out_ptr, cols, mask):
    """weight * (s * inv_rms).to(dtype), the product rounded once more."""
    dtype = out_ptr.dtype.element_ty
    normed = round_to_dtype(s * inv_rms, dtype).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + cols, round_to_dtype(w * normed, dtype), mask=mask)


# --- silu_and_mul -----------------------------------------------------------------------------------


def silu_and_mul(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """silu(gate) * up for x = [gate | up]: silu in float32 rounded to x's dtype, the product rounded."""
    if x.dim() != 2 or x.shape[1] % 2:
        raise ValueError(f"expected x [tokens, 2 * intermediate], got {tuple(x.shape)}")
    if x.dtype not in _DTYPES:
        raise ValueError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    num_tokens, inter = x.shape[0], x.shape[1] // 2
    if out is None:
        out = torch.empty((num_tokens, inter), device=x.device, dtype=x.dtype)
    if out.shape != (num_tokens, inter) or out.dtype != x.dtype or out.device != x.device:
        raise ValueError(f"out must be [{num_tokens}, {inter}] {x.dtype}, got {tuple(out.shape)} {out.dtype}")
    if x.stride(-1) != 1 or out.stride(-1) != 1:
        raise ValueError("the last dimension of x and out must be contiguous")
    if num_tokens and inter:
        block = min(triton.next_power_of_2(inter), SILU_BLOCK)
        _silu_and_mul_kernel[(num_tokens, triton.cdiv(inter, block))](
            x, out, x.stride(0), out.stride(0), INTER=inter, BLOCK=block,
            num_warps=max(1, min(8, block // 256)),
        )  # fmt: skip
    return out


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, x_s0, out_s0, INTER: tl.constexpr, BLOCK: tl.constexpr):
    """One chunk of one row."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < INTER
    dtype = out_ptr.dtype.element_ty
    gate = tl.load(x_ptr + row * x_s0 + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * x_s0 + INTER + cols, mask=mask, other=0.0).to(tl.float32)
    silu = tl.div_rn(gate, 1.0 + tl.exp(-gate))  # torch's x / (1 + e^-x), then rounded to the dtype
    silu = round_to_dtype(silu, dtype).to(tl.float32)
    tl.store(out_ptr + row * out_s0 + cols, round_to_dtype(silu * up, dtype), mask=mask)


# --- apply_rotary -----------------------------------------------------------------------------------


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate-half rope, IN PLACE: q and k (views into a fused qkv are fine) are overwritten with their
    rotated values and returned as (q, k). Rounds as RotaryEmbedding.__call__: the float32 tables are
    rounded to q's dtype, each product and the sum rounded to it. One launch for q and k; positions
    must index rows of the tables (not checked on the device)."""
    _check_rotary(q, k, cos, sin, positions)
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    half_pad = triton.next_power_of_2(head_dim // 2)
    cap = 1 << (max(1, ROTARY_TILE // (2 * half_pad)).bit_length() - 1)  # heads per program, a power of 2
    q_heads_block = min(triton.next_power_of_2(num_heads), cap)
    k_heads_block = min(triton.next_power_of_2(num_kv_heads), cap)
    num_blocks = triton.cdiv(num_heads, q_heads_block) + triton.cdiv(num_kv_heads, k_heads_block)
    if num_tokens:
        _rotary_kernel[(num_tokens, num_blocks)](
            q, k, cos, sin, positions, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
            cos.stride(0), sin.stride(0),
            NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, HALF_PAD=half_pad,
            Q_HEADS_BLOCK=q_heads_block, K_HEADS_BLOCK=k_heads_block,
            num_warps=ROTARY_WARPS, enable_fp_fusion=False,  # no fma: each product rounds, as in torch
        )  # fmt: skip
    return q, k


def _check_rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor
) -> None:
    if q.dim() != 3 or k.dim() != 3 or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(
            f"expected q [tokens, heads, dim] and k [tokens, kv_heads, dim], got "
            f"{tuple(q.shape)}, {tuple(k.shape)}"
        )
    head_dim = q.shape[2]
    if head_dim % 2 or cos.dim() != 2 or cos.shape[1] != head_dim or sin.shape != cos.shape:
        raise ValueError(
            f"head_dim {head_dim} must be even and cos, sin [positions, {head_dim}], got "
            f"{tuple(cos.shape)}, {tuple(sin.shape)}"
        )
    if positions.shape != (q.shape[0],) or positions.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"positions must be int32 or int64 [{q.shape[0]}], got {tuple(positions.shape)} {positions.dtype}"
        )
    if (
        q.dtype not in _DTYPES
        or k.dtype != q.dtype
        or cos.dtype != torch.float32
        or sin.dtype != torch.float32
    ):
        raise ValueError(
            f"q and k must share a float dtype and cos, sin be float32, got {q.dtype}, {k.dtype}, "
            f"{cos.dtype}, {sin.dtype}"
        )
    if len({t.device for t in (q, k, cos, sin, positions)}) != 1:
        raise ValueError("q, k, cos, sin and positions must be on one device")
    if q.stride(-1) != 1 or k.stride(-1) != 1 or cos.stride(-1) != 1 or sin.stride(-1) != 1:
        raise ValueError("the last dimension of q, k, cos and sin must be contiguous")


@triton.jit
def _rotary_kernel(
    q_ptr, k_ptr, cos_ptr, sin_ptr, pos_ptr, q_s0, q_s1, k_s0, k_s1, cos_s0, sin_s0,
    NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, HALF_PAD: tl.constexpr,
    Q_HEADS_BLOCK: tl.constexpr, K_HEADS_BLOCK: tl.constexpr,
):  # fmt: skip
    """One token's block of query heads, or of key heads (the blocks of k follow those of q)."""
    token = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    half: tl.constexpr = HEAD_DIM // 2
    dtype = q_ptr.dtype.element_ty
    d = tl.arange(0, HALF_PAD)
    d_ok = d < half
    pos = tl.load(pos_ptr + token).to(tl.int64)
    cos1 = _table_row(cos_ptr + pos * cos_s0, d, d_ok, dtype)  # [HALF_PAD] each
    cos2 = _table_row(cos_ptr + pos * cos_s0 + half, d, d_ok, dtype)
    sin1 = _table_row(sin_ptr + pos * sin_s0, d, d_ok, dtype)
    sin2 = _table_row(sin_ptr + pos * sin_s0 + half, d, d_ok, dtype)
    num_q_blocks: tl.constexpr = (NUM_HEADS + Q_HEADS_BLOCK - 1) // Q_HEADS_BLOCK
    if blk < num_q_blocks:
        heads = blk * Q_HEADS_BLOCK + tl.arange(0, Q_HEADS_BLOCK)
        _rotate_heads(q_ptr + token * q_s0, q_s1, heads, NUM_HEADS, d, d_ok, cos1, cos2, sin1, sin2, half)
    else:
        # a name of its own: a variable may not change shape between the branches
        heads_k = (blk - num_q_blocks) * K_HEADS_BLOCK + tl.arange(0, K_HEADS_BLOCK)
        k_row = k_ptr + token * k_s0
        _rotate_heads(k_row, k_s1, heads_k, NUM_KV_HEADS, d, d_ok, cos1, cos2, sin1, sin2, half)


@triton.jit
def _table_row(ptr, d, d_ok, dtype: tl.constexpr):
    """Half a row of a float32 table, rounded to the activations' dtype as RotaryEmbedding casts it."""
    return round_to_dtype(tl.load(ptr + d, mask=d_ok, other=0.0), dtype).to(tl.float32)


@triton.jit
def _rotate_heads(ptr, head_stride, heads, num_heads, d, d_ok, cos1, cos2, sin1, sin2, half):
    """x * cos + rotate_half(x) * sin for rows `heads` of one token; rotate_half(x) = [-x2, x1]."""
    dtype = ptr.dtype.element_ty
    mask = (heads < num_heads)[:, None] & d_ok[None, :]
    ptrs = ptr + heads[:, None] * head_stride + d[None, :]  # [heads, HALF_PAD], the first halves
    x1 = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(ptrs + half, mask=mask, other=0.0).to(tl.float32)
    a1 = round_to_dtype(x1 * cos1[None, :], dtype).to(tl.float32)
    b1 = round_to_dtype(x2 * sin1[None, :], dtype).to(tl.float32)
    a2 = round_to_dtype(x2 * cos2[None, :], dtype).to(tl.float32)
    b2 = round_to_dtype(x1 * sin2[None, :], dtype).to(tl.float32)
    tl.store(ptrs, round_to_dtype(a1 - b1, dtype), mask=mask)
    tl.store(ptrs + half, round_to_dtype(a2 + b2, dtype), mask=mask)


# --- rounding -----------------------------------------------------------------------------------------


@triton.jit
def round_to_dtype(x, DTYPE: tl.constexpr):
    """float32 `x` rounded to nearest even in DTYPE (float32, float16 or bfloat16), as torch's .to().

    bf16 by integer arithmetic: the interpreter truncates a bf16 cast, so this keeps CPU tests exact
    (on the GPU it costs a few integer ops in memory-bound kernels). NaN stays NaN (quiet NaNs)."""
    if DTYPE.is_bf16():
        bits = x.to(tl.uint32, bitcast=True)
        bits += 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DTYPE)
