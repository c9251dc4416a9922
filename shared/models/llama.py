"""The Llama family (Llama 2/3.x, Mistral, Qwen2/2.5) in native torch, on flattened varlen batches.

One implementation: the architectures differ only in config (qkv bias for Qwen2, sliding windows for
Mistral, rope scaling for Llama 3.1+, tied embeddings), which ModelConfig already resolved.
q/k/v and gate/up projections are fused into one matmul each; the weight loader fills their slices.
"""

from __future__ import annotations

from types import ModuleType
from typing import overload

import torch
import torch.nn.functional as F
from torch import nn

from baton.shared.engine.attention import AttentionBackend, AttentionLayerSpec, AttentionMetadata
from baton.shared.models.model_config import ModelConfig
from baton.shared.models.rope import RotaryEmbedding

KVCache = tuple[torch.Tensor, torch.Tensor]
"""One layer's (k_cache, v_cache), each [num_blocks, block_size, num_kv_heads, head_dim]."""


class RMSNorm(nn.Module):
    """RMSNorm, optionally fused with the residual add before it: `norm(x, residual)` returns
    (norm(x + residual), x + residual). `fused` runs Baton's Triton kernel (same rounding)."""

    def __init__(self, hidden_size: int, eps: float, fused: ModuleType | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps
        self.fused = fused

    @overload
    def forward(self, x: torch.Tensor) -> torch.Tensor: ...
    @overload
    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...
    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if self.fused is not None:
            return self.fused.rms_norm(x, self.weight, self.eps, residual=residual)  # type: ignore[no-any-return]
        if residual is None:
            return self._norm(x)
        x = x + residual
        return self._norm(x), x

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        # Normalize in float32, scale in the activations' dtype, as the reference implementation does.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class GatedMLP(nn.Module):
    def __init__(self, cfg: ModelConfig, fused: ModuleType | None = None) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)
        self.fused = fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)  # [n, 2 * intermediate]: gate, then up
        if self.fused is not None:
            return self.down_proj(self.fused.silu_and_mul(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, backend: AttentionBackend) -> None:
        super().__init__()
        self.spec = AttentionLayerSpec(
            num_heads=cfg.num_heads,
            num_kv_heads=cfg.num_kv_heads,
            head_dim=cfg.head_dim,
            scale=cfg.head_dim**-0.5,
            sliding_window=cfg.sliding_windows[layer_idx] if cfg.sliding_windows else None,
        )
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=cfg.o_bias)
        self.backend = backend

    def forward(
        self,
        positions: torch.Tensor,  # [num_tokens]
        x: torch.Tensor,  # [num_tokens, hidden]
        rope: RotaryEmbedding,
        kv_cache: KVCache,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(n, self.spec.num_heads, self.spec.head_dim)
        k = k.view(n, self.spec.num_kv_heads, self.spec.head_dim)
        v = v.view(n, self.spec.num_kv_heads, self.spec.head_dim)
        q, k = rope(positions, q, k)
        out = self.backend.forward(self.spec, q, k, v, kv_cache[0], kv_cache[1], meta)
        return self.o_proj(out.reshape(n, self.q_size))


class DecoderLayer(nn.Module):
    """Carries the residual stream separately, so each residual add fuses into the norm after it:
    the output is (mlp_out, residual) and the next layer's norm adds them."""

    def __init__(
        self, cfg: ModelConfig, layer_idx: int, backend: AttentionBackend, fused: ModuleType | None
    ) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, fused)
        self.self_attn = Attention(cfg, layer_idx, backend)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, fused)
        self.mlp = GatedMLP(cfg, fused)

    def forward(
        self,
        positions: torch.Tensor,
        x: torch.Tensor,
        residual: torch.Tensor | None,  # None before the first layer: x is the embedding
        rope: RotaryEmbedding,
        kv_cache: KVCache,
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            h, residual = self.input_layernorm(x), x
        else:
            h, residual = self.input_layernorm(x, residual)
        h = self.self_attn(positions, h, rope, kv_cache, meta)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig, backend: AttentionBackend, fused: ModuleType | None) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, backend, fused) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, fused)


class LlamaForCausalLM(nn.Module):
    """Parameter names follow the Hugging Face checkpoints (`model.layers.0.self_attn...`), except the
    fused `qkv_proj` and `gate_up_proj`."""

    def __init__(self, cfg: ModelConfig, backend: AttentionBackend) -> None:
        super().__init__()
        self.config = cfg
        self.fused = _fused_kernels() if backend.fused_layers else None
        self.model = LlamaModel(cfg, backend, self.fused)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.rope: RotaryEmbedding | None = None

    def init_rope(self, max_positions: int, device: torch.device) -> None:
        """Build the cos/sin tables on `device` (after the weights are materialized there)."""
        cfg = self.config
        self.rope = RotaryEmbedding(
            cfg.head_dim, max_positions, cfg.rope_theta, cfg.rope_scaling, device, self.fused
        )

    def forward(
        self,
        input_ids: torch.Tensor,  # [num_tokens]
        positions: torch.Tensor,  # [num_tokens]
        kv_caches: list[KVCache],
        meta: AttentionMetadata,
    ) -> torch.Tensor:  # [num_tokens, hidden]
        if self.rope is None:
            raise RuntimeError("init_rope() must run before forward()")
        x = self.model.embed_tokens(input_ids)
        residual = None
        for layer, kv_cache in zip(self.model.layers, kv_caches, strict=True):
            x, residual = layer(positions, x, residual, self.rope, kv_cache, meta)
        if residual is None:  # no layers
            return self.model.norm(x)
        return self.model.norm(x, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [n, hidden] -> [n, vocab] float32
        return self.lm_head(hidden).float()

    @staticmethod
    def stacked_params() -> list[tuple[str, str, int]]:
        """(fused parameter, checkpoint projection, shard index) for fused projections."""
        return [
            ("qkv_proj", "q_proj", 0),
            ("qkv_proj", "k_proj", 1),
            ("qkv_proj", "v_proj", 2),
            ("gate_up_proj", "gate_proj", 0),
            ("gate_up_proj", "up_proj", 1),
        ]

    def shard_sizes(self, fused: str) -> list[int]:
        cfg = self.config
        if fused == "qkv_proj":
            kv = cfg.num_kv_heads * cfg.head_dim
            return [cfg.num_heads * cfg.head_dim, kv, kv]
        return [cfg.intermediate_size, cfg.intermediate_size]


def _fused_kernels() -> ModuleType:
    """Baton's Triton norm, rope and activation kernels (imported only when a model uses them)."""
    from baton.kernels import fused

    return fused
