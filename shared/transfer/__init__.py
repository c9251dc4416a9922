"""KV-cache transfer from prefill to decode workers: interface, UCX implementation, loopback twin.

    sender = make_sender(layout)                       # or UcxKVSender / LoopbackKVSender
    session = await sender.open(address, request_id, block_ids, num_layers)
    for layer in range(num_layers):                    # or runs of layers: send_layers(first, kv[a:b])
        await session.send_layer(layer, kv)            # kv: [2, n_blocks, block_size, kv_heads, head_dim]
    ack = await session.finish(trailer)                # TransferError on nack / timeout / disconnect

`ucxx` is imported only when a UCX receiver or sender is first used. A `TransferSecret` given to both
ends authenticates every connection (`auth.py`).
"""

from __future__ import annotations

from typing import Any

from baton.shared.transfer.auth import TransferSecret
from baton.shared.transfer.base import (
    KVLayout,
    KVPushSession,
    KVReceiveHandler,
    KVReceiver,
    KVSender,
    PendingChecksum,
    TransferError,
    TransferRefused,
    kv_checksum,
)
from baton.shared.transfer.faults import FaultConfig
from baton.shared.transfer.loopback import LoopbackKVReceiver, LoopbackKVSender
from baton.shared.transfer.ucx import UcxKVReceiver, UcxKVSender, stop_ucx

__all__ = [
    "FaultConfig",
    "KVLayout",
    "KVPushSession",
    "KVReceiveHandler",
    "KVReceiver",
    "KVSender",
    "LoopbackKVReceiver",
    "LoopbackKVSender",
    "PendingChecksum",
    "TransferError",
    "TransferRefused",
    "TransferSecret",
    "UcxKVReceiver",
    "UcxKVSender",
    "kv_checksum",
    "make_sender",
    "stop_ucx",
]


class _SchemeSender(KVSender):
    """Routes each `open()` by address scheme to a UCX or loopback sender, created on first use."""

    def __init__(
        self,
        layout: KVLayout,
        faults: FaultConfig | None,
        secret: TransferSecret | None,
        options: dict[str, Any],
    ) -> None:
        self._layout = layout
        self._faults = faults
        self._secret = secret
        self._options = options
        self._senders: dict[str, KVSender] = {}

    async def open(
        self, address: str, request_id: str, block_ids: list[int], num_layers: int
    ) -> KVPushSession:
        return await self._sender_for(address).open(address, request_id, block_ids, num_layers)

    async def close(self) -> None:
        senders, self._senders = list(self._senders.values()), {}
        for sender in senders:
            await sender.close()

    def _sender_for(self, address: str) -> KVSender:
        scheme = address.partition("://")[0]
        if scheme not in self._senders:
            if scheme == "ucx":
                self._senders[scheme] = UcxKVSender(
                    self._layout, self._faults, secret=self._secret, **self._options
                )
            elif scheme == "loopback":
                self._senders[scheme] = LoopbackKVSender(self._layout, self._faults, secret=self._secret)
            else:
                raise ValueError(f"unknown KV transfer address scheme in {address!r} (ucx:// or loopback://)")
        return self._senders[scheme]


def make_sender(
    layout: KVLayout,
    faults: FaultConfig | None = None,
    secret: TransferSecret | None = None,
    **ucx_options: Any,
) -> KVSender:
    """A sender for any address: "ucx://HOST:PORT" goes over UCX, "loopback://NAME" stays in-process.

    The per-scheme senders are created on first use (so UCX starts only if a ucx:// address is
    opened) and share the fault config and the secret; `ucx_options` go to `UcxKVSender` (e.g.
    connect_timeout_s).
    """
    return _SchemeSender(layout, faults, secret, ucx_options)
