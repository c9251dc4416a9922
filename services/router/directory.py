"""The router's view of live workers: read from the registry at most every `refresh_s`, with gRPC
stubs per worker and the router's own in-flight counts. Redis being unreachable keeps the last known
list (the router degrades, it does not stop); a worker that failed a call is avoided until the
registry forgets it or its lease would have expired."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from typing import Any

import grpc

from baton.shared.grpc_server import open_channel
from baton.shared.grpc_tls import GrpcTls
from baton.shared.registry import Registry, RegistryUnavailable, WorkerRecord
from baton.shared.rpc import worker_pb2_grpc

logger = logging.getLogger(__name__)


class WorkerDirectory:
    def __init__(
        self, registry: Registry, refresh_s: float, suspect_s: float, tls: GrpcTls | None = None
    ) -> None:
        self.registry = registry
        self.tls = tls
        self.refresh_s = refresh_s
        self.suspect_s = suspect_s
        self.in_flight: Counter[str] = Counter()
        self._workers: list[WorkerRecord] = []
        self._read_at = float("-inf")
        self._suspect_until: dict[str, float] = {}
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._lock = asyncio.Lock()

    async def live(self, role: str) -> list[WorkerRecord]:
        """Live workers of a role, minus those that recently failed a call."""
        async with self._lock:
            if time.monotonic() - self._read_at >= self.refresh_s:
                await self._refresh()
        now = time.monotonic()
        return [
            w
            for w in self._workers
            if w.info.role == role and self._suspect_until.get(w.info.worker_id, 0.0) <= now
        ]

    async def _refresh(self) -> None:
        try:
            self._workers = await self.registry.live_workers()
        except RegistryUnavailable as exc:
            logger.warning("registry unreachable, placing on the last known workers: %s", exc)
        self._read_at = time.monotonic()

    def mark_failed(self, worker_id: str) -> None:
        self._suspect_until[worker_id] = time.monotonic() + self.suspect_s

    def decode_stub(self, worker: WorkerRecord) -> worker_pb2_grpc.DecodeWorkerStub:
        return worker_pb2_grpc.DecodeWorkerStub(self._channel(worker.info.grpc_address))

    def prefill_stub(self, worker: WorkerRecord) -> worker_pb2_grpc.PrefillWorkerStub:
        return worker_pb2_grpc.PrefillWorkerStub(self._channel(worker.info.grpc_address))

    def _channel(self, address: str) -> Any:
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = open_channel(address, self.tls)
        return channel

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()
