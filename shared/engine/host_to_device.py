"""Small host values onto the device without stalling the thread that queues the work."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def host_to_device(values: Sequence[float], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host list as a tensor on `device`. On a GPU the copy goes through pinned memory and
    does not wait: a plain `torch.tensor(..., device=cuda)` copies synchronously, which stalls the
    calling thread until the device finished the work still queued ahead of it."""
    tensor = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return tensor
    return tensor.pin_memory().to(device, non_blocking=True)
