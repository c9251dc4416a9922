"""KV-cache transfer: the layout both sides agree on, errors, the sender/receiver interfaces, checksum.

A prefill worker (P) pushes a prompt's KV cache, layer by layer, into blocks a decode worker (D)
reserved:

    P: sender.open(D.address, request_id, block_ids, num_layers) -> session     (begin, no round trip)
       session.send_layers(first, kv) for runs of layers, in order               (header + payload)
       ack = session.finish(trailer)                                             (D verified all)
    D: handler.begin(...); handler.write_layers(...) per message; handler.complete(...) -> ack
       or handler.fail(request_id, reason) when anything breaks

Implementations: `ucx.py` (real, UCX over TCP/RDMA/NVLink) and `loopback.py` (in-process twin);
both speak the wire protocol in `protocol.py`, which also holds the shared receiver validation.
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import Any, Protocol

import numpy as np
import torch

from baton.shared.errors import UnavailableError


@dataclass(frozen=True)
class KVLayout:
    """What sender and receiver must agree on; compared at connection handshake.

    One layer's KV travels as a single tensor, K and V stacked:

        kv: [2, num_blocks, block_size, num_kv_heads, head_dim]   (kv[0] = K, kv[1] = V)
    """

    model_id: str  # fingerprint of the model weights/config (opaque string)
    num_layers: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: str  # torch dtype name without "torch.", e.g. "bfloat16"

    def __post_init__(self) -> None:
        if not isinstance(self.model_id, str):
            raise ValueError(f"model_id must be a str, got {self.model_id!r}")
        for name in ("num_layers", "block_size", "num_kv_heads", "head_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if not isinstance(getattr(torch, str(self.dtype), None), torch.dtype):
            raise ValueError(f"dtype {self.dtype!r} is not a torch dtype name (e.g. 'bfloat16')")

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)  # type: ignore[no-any-return]

    def layer_shape(self, num_blocks: int) -> tuple[int, ...]:
        """Shape of one layer's KV for `num_blocks` blocks: (2, num_blocks, block_size, heads, head_dim)."""
        return (2, num_blocks, self.block_size, self.num_kv_heads, self.head_dim)

    def layer_nbytes(self, num_blocks: int) -> int:
        """Bytes of one layer's KV for `num_blocks` blocks."""
        numel = 2 * num_blocks * self.block_size * self.num_kv_heads * self.head_dim
        return numel * self.torch_dtype.itemsize

    def mismatch(self, other: KVLayout) -> str | None:
        """Every differing field as `"name: mine vs theirs"` (joined by "; "), None if the layouts agree."""
        diffs = [
            f"{f.name}: {getattr(self, f.name)!r} vs {getattr(other, f.name)!r}"
            for f in fields(self)
            if getattr(self, f.name) != getattr(other, f.name)
        ]
        return "; ".join(diffs) if diffs else None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> KVLayout:
        """Inverse of `to_dict`; missing or unknown keys and bad values raise ValueError."""
        if not isinstance(d, dict):
            raise ValueError(f"a KV layout must be a dict, got {type(d).__name__}")
        names = {f.name for f in fields(cls)}
        if set(d) != names:
            missing, unknown = sorted(names - set(d)), sorted(set(d) - names)
            raise ValueError(f"bad KV layout keys: missing {missing}, unknown {unknown}")
        return cls(**d)


class TransferError(UnavailableError):
    """This request's transfer failed (per-request, recoverable: the caller may retry elsewhere)."""


class TransferRefused(TransferError):
    """The receiver refused the connection at handshake (authentication, protocol version, layout or
    model mismatch); the message names the cause."""


# -- checksum ------------------------------------------------------------------------------------
_CHUNK_WORDS = 1 << 20  # 64-bit words per partial sum (the cached weights are 8 MiB per device)
_MASK64 = (1 << 64) - 1


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finalizer on uint64 (wrapping arithmetic): well-mixed, reproducible weights."""
    with np.errstate(over="ignore"):
        x = x * np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))  # type: ignore[no-any-return]


@functools.lru_cache(maxsize=8)
def _word_weights(device: torch.device) -> torch.Tensor:
    """weights: [_CHUNK_WORDS] int64, every one odd; identical bits on every device."""
    weights = _splitmix64(np.arange(1, _CHUNK_WORDS + 1, dtype=np.uint64)) | np.uint64(1)
    return torch.from_numpy(weights.view(np.int64)).to(device)


@functools.lru_cache(maxsize=4096)
def _chunk_multiplier(chunk: int) -> int:
    return int(_splitmix64(np.array([chunk + (1 << 40)], dtype=np.uint64))[0]) | 1


def kv_checksum(t: torch.Tensor) -> int:
    """A 64-bit checksum of a contiguous tensor's bytes; the same value on CPU and CUDA.

    The bytes are read as little-endian 64-bit words x (zero-padded to a multiple of 8, nbytes
    mixed in) and reduced as  sum_c m_c * sum_j w_j * x[c, j]  (mod 2^64), where chunk c holds
    2^20 words and w_j, m_c are fixed odd pseudo-random constants. Integer arithmetic mod 2^64 does
    not depend on reduction order, so every device gets the same bits. Because each word's weight
    m_c * w_j is odd, changing any one word (a flipped byte, bit or run of bytes inside 8 bytes)
    always changes the sum; position-dependent weights make swapped or shifted blocks change it
    with overwhelming probability. Cost: one pass over the bytes (an int64 dot product per 8 MiB
    chunk; ~50 ms per 64 MiB on a small CPU) and one device sync. Not a cryptographic hash.
    """
    return PendingChecksum.start(t).value()


class PendingChecksum:
    """`kv_checksum` split in two: `start` launches the reduction (on a GPU, asynchronously, on the
    current stream, with the partial sums copied into pinned host memory behind it), `values()`
    reads them. A transfer checksums every message as it goes; by the time it finishes the sums
    have usually landed, so reading them waits for nothing."""

    def __init__(self, nbytes: int, partials: torch.Tensor, landed: torch.cuda.Event | None = None) -> None:
        self._nbytes = nbytes
        self._partials = partials  # partials: [num_chunks] int64, on the CPU (pinned, for a GPU's)
        self._landed = landed  # a GPU's: recorded after the copy of the partial sums to the host

    @classmethod
    def start(cls, t: torch.Tensor) -> PendingChecksum:
        if not t.is_contiguous():
            raise ValueError("kv_checksum needs a contiguous tensor")
        data = t.reshape(-1).view(torch.uint8)  # data: [nbytes]
        nbytes = data.numel()
        if data.device.type == "cuda":
            data.record_stream(torch.cuda.current_stream(data.device))  # read after the caller lets go
        if nbytes % 8 != 0 or data.storage_offset() % 8 != 0:
            padded = torch.zeros(-(-nbytes // 8) * 8, dtype=torch.uint8, device=data.device)
            padded[:nbytes] = data
            data = padded
        words = data.view(torch.int64)  # words: [ceil(nbytes / 8)]
        weights = _word_weights(words.device)
        partials = []
        for start in range(0, words.numel(), _CHUNK_WORDS):
            chunk = words[start : start + _CHUNK_WORDS]
            w = weights[: chunk.numel()]
            # torch.dot is fast for int64 on CPU; other devices reduce the product (both wrap mod 2^64)
            partials.append(torch.dot(chunk, w) if chunk.device.type == "cpu" else (chunk * w).sum())
        sums = torch.stack(partials) if partials else torch.zeros(0, dtype=torch.int64, device=data.device)
        if sums.device.type != "cuda":
            return cls(nbytes, sums)
        host = torch.empty(sums.shape, dtype=torch.int64, pin_memory=True)
        host.copy_(sums, non_blocking=True)
        landed = torch.cuda.Event()
        landed.record()
        return cls(nbytes, host, landed)

    @property
    def landed(self) -> bool:
        """Whether `values()` can read this checksum without waiting for the device."""
        return self._landed is None or self._landed.query()

    def wait(self) -> None:
        if self._landed is not None:
            self._landed.synchronize()

    def value(self) -> int:
        return PendingChecksum.values([self])[0]

    @staticmethod
    def wait_all(pending: list[PendingChecksum]) -> None:
        for p in pending:
            p.wait()

    @staticmethod
    def values(pending: list[PendingChecksum]) -> list[int]:
        """Every checksum, waiting for the device where a sum has not landed yet."""
        PendingChecksum.wait_all(pending)
        return [p._finish(p._partials.tolist()) for p in pending]

    def _finish(self, sums: list[int]) -> int:
        total = self._nbytes * 0x9E3779B97F4A7C15
        for index, partial in enumerate(sums):
            total += _chunk_multiplier(index) * partial
        return total & _MASK64


# -- interfaces ----------------------------------------------------------------------------------
class KVReceiveHandler(Protocol):
    """Implemented by the decode worker; receivers call it. Each begun request ends in exactly one of
    `complete()` returning or `fail()` (also called after `complete()` raised)."""

    async def begin(self, request_id: str, block_ids: list[int], num_layers: int) -> None:
        """A sender starts pushing this request; raise TransferError to refuse it (unknown request,
        wrong block count...). The sender's session then fails with the message at its next call.
        The connection's next message waits for it: return soon."""

    def write_layers(self, request_id: str, first_layer: int, kv: torch.Tensor) -> None:
        """A message's layers, first_layer.. in order, already size-checked; copy them out (the buffer
        is reused after return). Raising TransferError fails the request.
        kv: [count, 2, num_blocks, block_size, kv_heads, head_dim]."""

    async def complete(self, request_id: str, trailer: dict[str, Any]) -> dict[str, Any]:
        """Every layer arrived and was verified; return the JSON-able ack payload sent back to the
        sender. Raise TransferError to nack (its message is sent back; `fail()` follows)."""

    def fail(self, request_id: str, reason: str) -> None:
        """This request's transfer broke (bad checksum, missing layer, sender gone, timeout); release
        what `begin()` set up. Called at most once per request, never after `complete()` succeeded."""


class KVReceiver(ABC):
    """Accepts pushes from senders and feeds them to a `KVReceiveHandler`."""

    address: str  # where senders connect: "ucx://HOST:PORT" or "loopback://NAME"

    @abstractmethod
    async def start(self) -> None:
        """Start accepting connections; `address` is valid afterwards."""

    @abstractmethod
    async def close(self) -> None:
        """Stop accepting, drop every connection (in-progress requests get `handler.fail`)."""


class KVPushSession(ABC):
    """One request's push to one receiver. Not safe for concurrent use except `abort()`."""

    finish_timings: dict[str, float]
    """After `finish`: where it spent its time, in ms (for logs; the keys depend on the transport)."""

    @abstractmethod
    async def send_layers(self, first_layer: int, kv: torch.Tensor) -> None:
        """Send consecutive layers as one message. kv: contiguous [count, 2, n_blocks, bs, h, d] on CPU
        or CUDA (the caller guarantees it is ready), layers first_layer.. first_layer+count-1; layers
        go in order 0..num_layers-1. Returns once the transport no longer reads kv. Wrong shapes or
        order raise ValueError; a broken connection raises TransferError. Small layers travel better
        together: each message costs a round of the transport's protocol."""

    async def send_layer(self, layer: int, kv: torch.Tensor) -> None:
        """Send one layer. kv: contiguous [2, n_blocks, bs, h, d]; see `send_layers`."""
        await self.send_layers(layer, kv.unsqueeze(0))

    @abstractmethod
    async def finish(self, trailer: dict[str, Any], timeout_s: float = 30.0) -> dict[str, Any]:
        """Send the trailer and wait for the receiver's verdict; returns the ack payload. Raises
        TransferError on nack (with the receiver's reason), timeout or disconnect."""

    async def finish_with_layers(
        self,
        first_layer: int,
        kv: torch.Tensor,
        trailer: dict[str, Any],
        timeout_s: float = 30.0,
        on_sent: Callable[[], None] | None = None,
    ) -> dict[str, Any]:
        """`send_layers(first_layer, kv)` for the last layers, then `finish(trailer)`; a transport may
        send the two together. `on_sent` is called once the layers are sent, before the verdict, with
        no reference to `kv` held any more (the caller may then reuse its memory)."""
        await self.send_layers(first_layer, kv)
        del kv
        if on_sent is not None:
            on_sent()
        return await self.finish(trailer, timeout_s)

    @abstractmethod
    async def abort(self, reason: str) -> None:
        """Tell the receiver (best effort) so it calls `handler.fail`; idempotent, never raises
        TransferError."""


class KVSender(ABC):
    """Opens push sessions to receivers."""

    @abstractmethod
    async def open(
        self, address: str, request_id: str, block_ids: list[int], num_layers: int
    ) -> KVPushSession:
        """Connect (or reuse a connection) and announce the request without waiting for an answer.
        Raises TransferRefused on a layout mismatch, TransferError if the receiver is unreachable; a
        receiver that refuses the request fails the session's next `send_layers` or `finish`."""

    @abstractmethod
    async def close(self) -> None:
        """Drop every connection; unfinished sessions fail on both sides."""
