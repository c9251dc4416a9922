"""Small host values onto the device without stalling the thread that queues the work."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def host_to_device(values: Sequence[float], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host list as a tensor on `device`. On a GPU the copy goes through pinned memory and
    does not wait: a plain `torch.tensor(..., device=cuda)` copies synchronously, which stalls the
    calling thread until the device finished the work still queued ahead of it."""
    tensor = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return tensor
    return tensor.pin_memory().to(device, non_blocking=True)


def arrays_to_device(
    arrays: list[np.ndarray], dtype: type[np.generic], device: torch.device
) -> list[torch.Tensor]:
    """The arrays as `dtype` tensors on `device`, with their shapes, moved in one copy that does not
    wait (as host_to_device). Each starts 64-byte aligned, as a tensor of its own would (Triton
    specializes on alignment)."""
    padded = [-(-a.size // 16) * 16 for a in arrays]
    offsets = np.cumsum([0, *padded])
    packed = np.zeros(int(offsets[-1]), dtype=dtype)
    for array, offset in zip(arrays, offsets, strict=False):
        packed[offset : offset + array.size] = array.reshape(-1)
    tensor = torch.from_numpy(packed)
    if device.type == "cuda":
        tensor = tensor.pin_memory().to(device, non_blocking=True)
    return [
        tensor[offset : offset + a.size].view(a.shape) for a, offset in zip(arrays, offsets, strict=False)
    ]
