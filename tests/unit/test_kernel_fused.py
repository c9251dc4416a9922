"""Fused RMSNorm (with and without the residual add), silu_and_mul and rotary embeddings (Triton) against
the torch modules' expressions, bit for bit where the rounding is defined to match. Without CUDA the
kernels run under TRITON_INTERPRET=1 (shapes stay small).

Exactness: rotary, the residual sum and the cache-dtype casts match in every dtype. rms_norm matches
exactly when the sum of squares is exact (dyadic inputs, any summation order); on general inputs its
float32 reduction order differs from torch's, so float32 agrees to rounding noise and 16-bit outputs to
one ulp on rare elements. silu's exp is the device's, not torch's: float32 agrees to a few ulp and 16-bit
outputs to one ulp on rare elements."""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from baton.kernels import (  # noqa: E402
    NormedResidual,
    apply_rotary,
    apply_rotary_reference,
    fused,
    rms_norm,
    rms_norm_reference,
    silu_and_mul,
    silu_and_mul_reference,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
EPS = 1e-5


def randn(gen: torch.Generator, *shape: int, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=gen) * scale).to(dtype).to(DEVICE)


def dyadic(gen: torch.Generator, *shape: int, dtype: torch.dtype) -> torch.Tensor:
    """Nonzero multiples of 1/8 in [-2, 2]: their squares sum exactly in float32 in any order."""
    k = torch.randint(1, 17, shape, generator=gen) * (torch.randint(0, 2, shape, generator=gen) * 2 - 1)
    return (k.float() / 8).to(dtype).to(DEVICE)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({4: torch.int32, 2: torch.int16}[t.element_size()]).int()


def assert_bitwise(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    mismatched = (bits(got) != bits(want)).sum().item()
    assert mismatched == 0, f"{mismatched} of {got.numel()} elements differ"


def assert_near(got: torch.Tensor, want: torch.Tensor, fp32_rtol: float) -> None:
    """float32: relative error within fp32_rtol; 16-bit: at most one ulp apart, on at most 1% of elements."""
    assert got.dtype == want.dtype and not torch.isnan(got).any()
    if got.dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=fp32_rtol, atol=1e-30)
        return
    ulps = (bits(got) - bits(want)).abs()
    assert ulps.max().item() <= 1 and (ulps > 0).float().mean().item() <= 0.01, ulps.max().item()


# --- rms_norm ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("num_tokens", "hidden"), [(3, 128), (5, 96), (2, 200), (1, 1)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_is_bitwise_exact_when_the_sum_of_squares_is(
    dtype: torch.dtype, num_tokens: int, hidden: int, with_residual: bool
) -> None:
    gen = torch.Generator().manual_seed(hidden * 3 + num_tokens)
    x = dyadic(gen, num_tokens, hidden, dtype=dtype)
    weight = randn(gen, hidden, dtype=dtype)
    residual = dyadic(gen, num_tokens, hidden, dtype=dtype) if with_residual else None
    x_before = x.clone()
    out = torch.full_like(x, float("nan"))  # poisoned: every element must be written
    if residual is None:
        got = rms_norm(x, weight, EPS, out=out)
        assert got is out
        assert_bitwise(got, rms_norm_reference(x, weight, EPS))
    else:
        pair = rms_norm(x, weight, EPS, residual, out=out)
        want = rms_norm_reference(x, weight, EPS, residual)
        assert isinstance(pair, NormedResidual) and pair.normed is out
        assert_bitwise(pair.normed, want.normed)
        assert_bitwise(pair.residual, want.residual)
    assert_bitwise(x, x_before)  # inputs are never written


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_wide_rows_in_chunks(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows wider than MAX_ROW_BLOCK take the two-pass loop (here 200 = 3 chunks of 64 and a partial)."""
    monkeypatch.setattr(fused, "MAX_ROW_BLOCK", 64)
    gen = torch.Generator().manual_seed(7)
    x, residual = dyadic(gen, 3, 200, dtype=dtype), dyadic(gen, 3, 200, dtype=dtype)
    weight = randn(gen, 200, dtype=dtype)
    assert_bitwise(rms_norm(x, weight, EPS), rms_norm_reference(x, weight, EPS))
    got, want = rms_norm(x, weight, EPS, residual), rms_norm_reference(x, weight, EPS, residual)
    assert_bitwise(got.normed, want.normed)
    assert_bitwise(got.residual, want.residual)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [256, 80])
def test_rms_norm_on_gaussian_rows(dtype: torch.dtype, hidden: int) -> None:
    """General inputs: the residual sum stays exact, the norm within reduction-order noise."""
    gen = torch.Generator().manual_seed(hidden)
    x = randn(gen, 6, hidden, dtype=dtype, scale=3.0)
    residual = randn(gen, 6, hidden + 16, dtype=dtype)[:, 16:]  # a row stride wider than the row
    weight = randn(gen, hidden, dtype=dtype)
    got, want = rms_norm(x, weight, EPS, residual), rms_norm_reference(x, weight, EPS, residual)
    assert_bitwise(got.residual, want.residual)
    assert_near(got.normed, want.normed, fp32_rtol=2e-6)
    assert_near(rms_norm(residual, weight, EPS), rms_norm_reference(residual, weight, EPS), fp32_rtol=2e-6)


def test_rms_norm_refuses_bad_inputs() -> None:
    gen = torch.Generator().manual_seed(0)
    x, weight = randn(gen, 2, 8, dtype=torch.float16), randn(gen, 8, dtype=torch.float16)
    with pytest.raises(ValueError, match="weight"):
        rms_norm(x, weight[:4], EPS)
    with pytest.raises(ValueError, match="dtype"):
        rms_norm(x, weight.float(), EPS)
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        rms_norm(x.double(), weight.double(), EPS)
    with pytest.raises(ValueError, match="residual"):
        rms_norm(x, weight, EPS, x[:1])
    with pytest.raises(ValueError, match="out"):
        rms_norm(x, weight, EPS, out=torch.empty_like(x, dtype=torch.float32))
    with pytest.raises(ValueError, match="contiguous"):
        rms_norm(randn(gen, 8, 2, dtype=torch.float16).t(), weight, EPS)


# --- silu_and_mul -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("num_tokens", "inter"), [(4, 64), (3, 100), (1, 7)])
def test_silu_and_mul_matches_the_module(dtype: torch.dtype, num_tokens: int, inter: int) -> None:
    gen = torch.Generator().manual_seed(inter + num_tokens)
    x = randn(gen, num_tokens, 2 * inter, dtype=dtype, scale=4.0)
    out = torch.full((num_tokens, inter), float("nan"), dtype=dtype, device=DEVICE)
    got = silu_and_mul(x, out=out)
    assert got is out
    assert_near(got, silu_and_mul_reference(x), fp32_rtol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul_chunks_and_strided_rows(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """Several programs per row (SILU_BLOCK 32 over 100 columns), rows of a wider buffer."""
    monkeypatch.setattr(fused, "SILU_BLOCK", 32)
    gen = torch.Generator().manual_seed(3)
    x = randn(gen, 5, 2 * 100 + 24, dtype=dtype, scale=4.0)[:, 24:]
    assert_near(silu_and_mul(x), silu_and_mul_reference(x), fp32_rtol=1e-6)


def test_silu_and_mul_refuses_bad_inputs() -> None:
    x = torch.randn(3, 10, device=DEVICE)
    with pytest.raises(ValueError, match="2 \\* intermediate"):
        silu_and_mul(x[:, :9])
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        silu_and_mul(x.double())
    with pytest.raises(ValueError, match="out"):
        silu_and_mul(x, out=torch.empty(3, 4, device=DEVICE))
    with pytest.raises(ValueError, match="contiguous"):
        silu_and_mul(torch.randn(10, 3, device=DEVICE).t())


# --- apply_rotary -----------------------------------------------------------------------------------


def rope_tables(head_dim: int, max_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """RotaryEmbedding's float32 tables (llama-style inverse frequencies, theta 10000)."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    freqs = torch.arange(max_positions).float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(DEVICE), emb.sin().to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("num_tokens", "num_heads", "num_kv_heads", "head_dim", "tile"),
    [
        (5, 4, 2, 64, None),
        (3, 6, 2, 80, None),  # head_dim not a power of two (halves of 40)
        (4, 8, 8, 32, 64),  # MHA, 2 heads per program: several head blocks for q and for k
        (2, 5, 1, 16, 48),  # MQA, ragged head blocks
    ],
)
def test_apply_rotary_is_bitwise_exact_in_place(
    dtype: torch.dtype, num_tokens: int, num_heads: int, num_kv_heads: int, head_dim: int, tile: int | None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    if tile is not None:
        monkeypatch.setattr(fused, "ROTARY_TILE", tile)
    gen = torch.Generator().manual_seed(num_heads * head_dim)
    cos, sin = rope_tables(head_dim, 4096)
    positions = torch.randint(0, 4096, (num_tokens,), generator=gen).to(DEVICE)
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    qkv = randn(gen, num_tokens, q_size + 2 * kv_size, dtype=dtype, scale=2.0)  # fused projection output
    q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
    q = q.view(num_tokens, num_heads, head_dim)
    k = k.view(num_tokens, num_kv_heads, head_dim)
    want_q, want_k = apply_rotary_reference(q, k, cos, sin, positions)
    v_before = v.clone()
    got_q, got_k = apply_rotary(q, k, cos, sin, positions.int() if num_kv_heads == 1 else positions)
    assert got_q is q and got_k is k
    assert_bitwise(got_q, want_q)
    assert_bitwise(got_k, want_k)
    assert_bitwise(v, v_before)  # the rest of the fused buffer is untouched


def test_apply_rotary_refuses_bad_inputs() -> None:
    cos, sin = rope_tables(16, 32)
    q, k = torch.randn(3, 4, 16, device=DEVICE), torch.randn(3, 2, 16, device=DEVICE)
    positions = torch.arange(3, device=DEVICE)
    with pytest.raises(ValueError, match="even"):
        apply_rotary(q[..., :15], k[..., :15], cos[:, :15], sin[:, :15], positions)
    with pytest.raises(ValueError, match="positions"):
        apply_rotary(q, k, cos, sin, positions.float())
    with pytest.raises(ValueError, match="float32"):
        apply_rotary(q, k, cos.half(), sin.half(), positions)
    with pytest.raises(ValueError, match="share a float dtype"):
        apply_rotary(q, k.half(), cos, sin, positions)
    with pytest.raises(ValueError, match="tokens"):
        apply_rotary(q, k[:2], cos, sin, positions)
