"""A sender's connections, pooled per receiver: what every transport's `KVSender` shares.

Each receiver address gets up to `connections_per_address` handshaken connections, made on demand
and kept; a push goes on the one carrying the fewest. At most `max_pushes_per_address` pushes to one
receiver are in flight at once (each holds its copied-out KV until sent); more wait for a slot. A
push gives its slot back once its finish is sent: waiting for the ack holds nothing heavy. With a
`TransferSecret`, each connection's handshake proves it to the receiver and checks the receiver's proof.
"""

from __future__ import annotations

import asyncio
from abc import abstractmethod

from baton.shared.transfer.auth import TransferSecret
from baton.shared.transfer.base import KVLayout, KVPushSession, KVSender
from baton.shared.transfer.faults import FaultConfig, FaultInjector
from baton.shared.transfer.protocol import Channel, OutboundConnection, PushSession, check_request, handshake


class PooledKVSender(KVSender):
    """A `KVSender` over pooled connections; a transport supplies `_check_address` and `_connect`."""

    def __init__(
        self,
        layout: KVLayout,
        faults: FaultConfig | None = None,
        reply_timeout_s: float = 10.0,
        max_pushes_per_address: int = 128,
        connections_per_address: int = 2,
        secret: TransferSecret | None = None,
    ) -> None:
        if max_pushes_per_address < 1:
            raise ValueError(f"max_pushes_per_address must be >= 1, got {max_pushes_per_address}")
        if connections_per_address < 1:
            raise ValueError(f"connections_per_address must be >= 1, got {connections_per_address}")
        self.layout = layout
        self._faults = FaultInjector(faults)
        self._reply_timeout_s = reply_timeout_s
        self._max_pushes = max_pushes_per_address
        self._max_connections = connections_per_address
        self._secret = secret
        self._slots: dict[str, asyncio.Semaphore] = {}
        self._pools: dict[str, list[OutboundConnection]] = {}  # live connections, by receiver address
        self._connecting: dict[str, asyncio.Lock] = {}
        self._closed = False

    @abstractmethod
    def _check_address(self, address: str) -> None:
        """ValueError if `address` is not one this transport can reach."""

    @abstractmethod
    async def _connect(self, address: str) -> Channel:
        """A fresh channel to the receiver at `address`; TransferError if it cannot be reached."""

    async def open(
        self, address: str, request_id: str, block_ids: list[int], num_layers: int
    ) -> KVPushSession:
        problem = check_request(self.layout, request_id, block_ids, num_layers)
        if problem is not None:
            raise ValueError(problem)
        self._check_address(address)
        if self._closed:
            raise RuntimeError(f"{type(self).__name__} is closed")
        if any(request_id in c.sessions for c in self._pools.get(address, [])):
            raise ValueError(f"request {request_id!r} is already being pushed to {address}")
        slots = self._slots.setdefault(address, asyncio.Semaphore(self._max_pushes))
        await slots.acquire()
        slot = _Slot(slots)
        try:
            connection = await self._connection(address)
            return await PushSession.open(
                connection, self.layout, request_id, block_ids, self._faults, slot.release
            )
        except BaseException:
            slot.release()
            raise

    async def close(self) -> None:
        self._closed = True
        for pool in list(self._pools.values()):
            for connection in list(pool):
                connection.close("sender closed")
        self._pools.clear()
        await asyncio.sleep(0)  # let receivers see the disconnects

    async def _connection(self, address: str) -> OutboundConnection:
        """The least busy connection to `address`, or a new one while the pool has room."""
        pool = self._pools.setdefault(address, [])
        connecting = self._connecting.setdefault(address, asyncio.Lock())
        if len(pool) >= self._max_connections or (pool and connecting.locked()):
            return _least_busy(pool)
        async with connecting:
            if len(pool) >= self._max_connections:
                return _least_busy(pool)
            channel = await self._connect(address)
            shook_hands = False
            try:
                await handshake(channel, self.layout, address, self._reply_timeout_s, self._secret)
                shook_hands = True
            finally:
                if not shook_hands:  # refused, failed or cancelled
                    channel.close("sender dropped the connection")
            connection = OutboundConnection(channel, address)
            if self._closed:
                connection.close("sender closed")
                raise RuntimeError(f"{type(self).__name__} is closed")
            pool.append(connection)
            connection.on_close(pool.remove)
            return connection


def _least_busy(pool: list[OutboundConnection]) -> OutboundConnection:
    return min(pool, key=lambda c: len(c.sessions))


class _Slot:
    """One of a receiver's push slots, released exactly once."""

    def __init__(self, slots: asyncio.Semaphore) -> None:
        self._slots: asyncio.Semaphore | None = slots

    def release(self) -> None:
        if self._slots is not None:
            self._slots.release()
            self._slots = None
