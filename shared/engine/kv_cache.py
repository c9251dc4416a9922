"""The paged KV cache tensors: per layer, K and V, each [num_blocks, block_size, num_kv_heads, head_dim]."""

from __future__ import annotations

from dataclasses import dataclass
from multiprocessing.reduction import ForkingPickler
from typing import TYPE_CHECKING, Any

import torch
import torch.multiprocessing  # registers the reductions of CUDA tensors and events

from baton.shared.models.model_config import ModelConfig

if TYPE_CHECKING:
    from baton.shared.engine.attention.backend import AttentionBackend

KVCaches = list[tuple[torch.Tensor, torch.Tensor]]


def block_nbytes(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    """Bytes one block takes across all layers, K and V."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * cfg.num_layers * block_size * cfg.num_kv_heads * cfg.head_dim * itemsize


def allocate_kv_caches(
    cfg: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device
) -> KVCaches:
    shape = (num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
    return [
        (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
        for _ in range(cfg.num_layers)
    ]


@dataclass(frozen=True)
class SharedKVCaches:
    """A KV cache as the process that allocated it exports it (CUDA IPC handles, or shared-memory
    descriptors on a CPU), in bytes that another process opens once. A process that imported CUDA
    memory cannot export it again, so an engine core in a process of its own hands its cache to the
    worker's KV receiver this way: the worker passes the bytes on unopened."""

    blob: bytes
    is_cuda: bool

    @classmethod
    def export(cls, kv_caches: KVCaches) -> SharedKVCaches:
        return cls(bytes(ForkingPickler.dumps(kv_caches)), kv_caches[0][0].is_cuda)

    def open(self) -> KVCaches:
        """The cache, mapped into this process (once: a CPU cache's descriptors are handed out once)."""
        kv_caches: KVCaches = ForkingPickler.loads(self.blob)
        return kv_caches


@dataclass(frozen=True)
class FenceHandle:
    """An interprocess CUDA event as bytes, opened by the process that waits for it: the fence of a
    reservation made by an engine core in another process travels through the worker this way."""

    device_index: int
    handle: bytes

    @classmethod
    def of(cls, event: Any, device: torch.device) -> FenceHandle:
        index = device.index if device.index is not None else torch.cuda.current_device()
        return cls(index, bytes(event.ipc_handle()))

    def open(self) -> torch.cuda.Event:
        return torch.cuda.Event.from_ipc_handle(self.device_index, self.handle)


def check_kv_run(kv_caches: KVCaches, first_layer: int, kv: torch.Tensor, num_blocks: int) -> None:
    """ValueError unless `kv` is a run of whole layers for `num_blocks` blocks that fits the cache.

    kv: [count, 2, num_blocks, block_size, num_kv_heads, head_dim], layers first_layer.. in order."""
    count = kv.shape[0] if kv.dim() else 0
    if not 0 <= first_layer <= first_layer + count <= len(kv_caches) or count < 1:
        raise ValueError(f"layers {first_layer}.. (count {count}) out of range")
    k_cache = kv_caches[first_layer][0]
    expected = (count, 2, num_blocks, *k_cache.shape[1:])
    if tuple(kv.shape) != expected or kv.dtype != k_cache.dtype:
        raise ValueError(
            f"layers from {first_layer}: KV has shape {tuple(kv.shape)} {kv.dtype}, "
            f"expected {expected} {k_cache.dtype}"
        )


def scatter_kv_run(
    attention: AttentionBackend, kv_caches: KVCaches, first_layer: int, kv: torch.Tensor, index: torch.Tensor
) -> None:
    """Copy a checked run of layers (see `check_kv_run`) into the blocks `index` names, on the current
    stream. index: [num_blocks] long, on the cache's device, in the order of kv's blocks."""
    kv = kv.to(index.device)
    for i in range(kv.shape[0]):
        attention.scatter_blocks(kv[i], *kv_caches[first_layer + i], index)


def gather_prompt_kv(attention: AttentionBackend, kv_caches: KVCaches, index: torch.Tensor) -> torch.Tensor:
    """Every layer's K and V of the blocks `index` names ([num_blocks] long, on the cache's device),
    copied out on the current stream, as a prefill worker ships a prompt's KV (the inverse of
    `scatter_kv_run` over all layers).

    Returns [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim], contiguous."""
    k_cache = kv_caches[0][0]
    out = torch.empty(
        (len(kv_caches), 2, index.numel(), *k_cache.shape[1:]), dtype=k_cache.dtype, device=k_cache.device
    )
    for layer, (k, v) in enumerate(kv_caches):
        attention.gather_blocks(k, v, index, out=out[layer])
    return out


def layer_runs(num_layers: int, layer_nbytes: int, run_nbytes: int) -> list[tuple[int, int]]:
    """(first layer, count) of consecutive runs of whole layers of about `run_nbytes` each (at least
    one layer), covering every layer once: a short prompt's KV travels as one message, a long one in
    several."""
    per_run = max(1, run_nbytes // max(layer_nbytes, 1))
    return [(first, min(per_run, num_layers - first)) for first in range(0, num_layers, per_run)]
