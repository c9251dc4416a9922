"""The decode worker's gRPC servicer and KV receive handler around one AsyncEngine.

Per request: Reserve (blocks held, registry record RESERVED) → the prefill worker pushes every layer
(begin / write_layers / complete) → the handoff commits in Redis (PREFILLING → DECODING, owner D) and
the first token joins the running batch → tokens stream out → the record ends with the request.
Local prefill skips the push: the request is queued like any other.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import torch

from baton.shared.config import WorkerConfig
from baton.shared.engine.async_engine import AsyncEngine
from baton.shared.engine.outputs import EngineOutput
from baton.shared.grpc_server import CapacityError, UnavailableError
from baton.shared.registry import Registry, RegistryError, RegistryUnavailable, RequestRecord, RequestState
from baton.shared.rpc import worker_pb2, worker_pb2_grpc
from baton.shared.rpc_convert import delta_from_output, first_token_from_dict, sampling_from_proto
from baton.shared.transfer import TransferError
from baton.shared.worker_runtime import TransferCounters, request_record, stats_reply

logger = logging.getLogger(__name__)


@dataclass
class _Tracked:
    """A request this worker holds, from Reserve until its last output was read."""

    block_ids: list[int]
    num_top_logprobs: int
    outputs: AsyncGenerator[EngineOutput, None]
    remote: bool
    receiving: bool = False
    committed: bool = False
    timeout: asyncio.TimerHandle | None = None
    streamed: bool = False
    transfer_bytes: int = field(default=0)


class DecodeService(worker_pb2_grpc.DecodeWorkerServicer):
    def __init__(
        self,
        config: WorkerConfig,
        engine: AsyncEngine,
        registry: Registry,
        worker_id: str,
        num_layers: int,
        handoff_registry: Registry | None = None,
    ) -> None:
        """`handoff_registry`: the client `complete` records handoffs with, when the KV receiver runs on
        another event loop than the gRPC servicer (a Redis client belongs to one loop)."""
        self.config = config
        self.engine = engine
        self.registry = registry
        self.handoff_registry = handoff_registry if handoff_registry is not None else registry
        self._loop: asyncio.AbstractEventLoop | None = None  # the servicer's loop, which owns the timers
        self.worker_id = worker_id
        self.num_layers = num_layers
        self.transfer_address = ""
        self._tracked: dict[str, _Tracked] = {}
        self._background: set[asyncio.Task[Any]] = set()
        self.counters = TransferCounters()
        self.draining = False

    # -- gRPC ------------------------------------------------------------------------------------
    async def Reserve(
        self, request: worker_pb2.ReserveRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.ReserveResponse:
        rid, prompt = request.request_id, list(request.prompt_token_ids)
        if self.draining:
            raise UnavailableError(f"decode worker {self.worker_id} is draining: place the request elsewhere")
        if not rid:
            raise ValueError("request_id must not be empty")
        params = sampling_from_proto(request.sampling)
        self._loop = asyncio.get_running_loop()
        if request.local_prefill:
            outputs = self.engine.add(rid, prompt, params)
            block_ids: list[int] = []
        else:
            reserved = await self.engine.reserve(rid, prompt, params)
            if reserved is None:
                raise CapacityError(
                    f"decode worker {self.worker_id} has no room for {len(prompt)} prompt tokens"
                )
            block_ids, outputs = reserved
        tracked = _Tracked(block_ids, params.logprobs or 0, outputs, remote=not request.local_prefill)
        self._tracked[rid] = tracked
        try:
            await self.registry.reserve(
                rid, self.worker_id, len(block_ids), local_prefill=request.local_prefill
            )
        except RegistryError as exc:
            self._drop(rid)
            self.engine.abort(rid)  # frees what it holds; its unread stream is dropped with it
            raise ValueError(f"request id {rid!r} is already registered: {exc}") from exc
        except RegistryUnavailable as exc:
            logger.warning("registry unreachable, reserving %s without a record: %s", rid, exc)
        timeout_s = self.config.reservation_timeout_s
        tracked.timeout = asyncio.get_running_loop().call_later(timeout_s, self._expire, rid, timeout_s)
        how = "prefilled here" if request.local_prefill else f"{len(block_ids)} blocks reserved"
        logger.info("request %s: %d prompt tokens, %s", rid, len(prompt), how)
        return worker_pb2.ReserveResponse(
            worker_id=self.worker_id, transfer_address=self.transfer_address, block_ids=block_ids
        )

    async def Stream(
        self, request: worker_pb2.StreamRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_pb2.TokenDelta]:
        rid = request.request_id
        tracked = self._tracked.get(rid)
        if tracked is None or tracked.streamed:
            raise KeyError(f"request {rid!r} is not reserved here (or is already being streamed)")
        tracked.streamed = True
        if tracked.timeout is not None and (tracked.committed or not tracked.remote):
            tracked.timeout.cancel()
        try:
            async for out in tracked.outputs:
                yield delta_from_output(out, tracked.num_top_logprobs)
        finally:
            await tracked.outputs.aclose()  # not finished (the router went away): aborts the request
            # In a task of its own: this handler may be cancelled again while the record is ended.
            self._spawn(self._settle(rid))

    async def Abort(
        self, request: worker_pb2.AbortRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.AbortResponse:
        tracked = self._tracked.get(request.request_id)
        if tracked is None:
            return worker_pb2.AbortResponse(found=False)
        logger.info("abort %s: %s", request.request_id, request.reason or "by request")
        self.engine.abort(request.request_id)
        if not tracked.streamed:  # nobody will read the stream: settle here
            self._spawn(self._drain(request.request_id, tracked))
        return worker_pb2.AbortResponse(found=True)

    async def GetStats(
        self, request: worker_pb2.GetStatsRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.WorkerStats:
        return await stats_reply(
            self.engine, self.worker_id, "decode", self._tracked, request.check_integrity, self.counters
        )

    @property
    def request_ids(self) -> list[str]:
        return list(self._tracked)

    def registry_records(self) -> list[RequestRecord]:
        """The records of the requests held here, as this worker knows them (I5: restored after a flush)."""
        return [
            request_record(
                rid,
                RequestState.RESERVED if t.remote and not t.committed else RequestState.DECODING,
                self.worker_id,
                self.worker_id,
                "",
                len(t.block_ids),
            )
            for rid, t in self._tracked.items()
        ]

    # -- KV receive handler (called by the transfer receiver) -----------------------------------
    def begin(self, request_id: str, block_ids: list[int], num_layers: int) -> None:
        tracked = self._tracked.get(request_id)
        if tracked is None or not tracked.remote or tracked.committed:
            raise TransferError(f"decode worker {self.worker_id} holds no reservation for {request_id!r}")
        if tracked.receiving:
            raise TransferError(f"request {request_id!r} is already receiving KV from another push")
        if list(block_ids) != tracked.block_ids or num_layers != self.num_layers:
            raise TransferError(
                f"push for {request_id!r} names blocks {list(block_ids)} x {num_layers} layers; "
                f"reserved {tracked.block_ids} x {self.num_layers}"
            )
        tracked.receiving = True

    def write_layers(self, request_id: str, first_layer: int, kv: torch.Tensor) -> None:
        try:
            self.engine.write_kv_run(request_id, first_layer, kv)
        except KeyError as exc:
            raise TransferError(f"request {request_id!r} was aborted while its KV arrived") from exc
        self.counters.transfer_bytes += kv.numel() * kv.element_size()

    async def complete(self, request_id: str, trailer: dict[str, Any]) -> dict[str, Any]:
        tracked = self._tracked.get(request_id)
        if tracked is None or not tracked.receiving:
            raise TransferError(f"request {request_id!r} is no longer reserved here")
        first_token, num_cached = first_token_from_dict(trailer)
        prefill_worker = str(trailer.get("prefill_worker", ""))
        start_ns = time.monotonic_ns()
        try:
            await self.handoff_registry.commit_handoff(request_id, prefill_worker, self.worker_id)
        except RegistryError as exc:
            raise TransferError(f"handoff of {request_id!r} refused by the registry: {exc}") from exc
        except RegistryUnavailable as exc:
            logger.warning(
                "registry unreachable, committing %s without recording the handoff: %s", request_id, exc
            )
        tracked.committed = True
        if tracked.timeout is not None and tracked.streamed:
            self._on_servicer_loop(tracked.timeout.cancel)
        self.engine.commit(request_id, first_token, num_cached)
        self.counters.num_transfers += 1
        logger.info(
            "request %s: KV from %s complete (handoff recorded in %.1f ms)",
            request_id, prefill_worker, (time.monotonic_ns() - start_ns) / 1e6,
        )  # fmt: skip
        return {"ok": True, "decode_worker": self.worker_id}

    def fail(self, request_id: str, reason: str) -> None:
        tracked = self._tracked.get(request_id)
        if tracked is None or tracked.committed:
            return
        self.counters.num_transfer_failures += 1
        logger.warning("KV transfer for %s failed: %s", request_id, reason)
        self.engine.fail(request_id, f"KV transfer failed: {reason}")

    def _on_servicer_loop(self, fn: Any) -> None:
        """Call `fn` on the servicer's loop: the KV handler may run on the receiver's own loop."""
        loop = self._loop
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if loop is None or loop is running:
            fn()
        else:
            loop.call_soon_threadsafe(fn)

    # -- lifecycle -------------------------------------------------------------------------------
    def _expire(self, request_id: str, timeout_s: float) -> None:
        """The reservation's deadline: nobody attached to the stream (the router went away), or the
        pushed KV never arrived. Either way the request ends and its blocks are freed."""
        tracked = self._tracked.get(request_id)
        if tracked is None:
            return
        if not tracked.streamed:
            self.engine.fail(request_id, f"nobody read the output stream within {timeout_s:g} s")
            self._spawn(self._drain(request_id, tracked))
        elif tracked.remote and not tracked.committed:
            self.engine.fail(request_id, f"the prompt's KV did not arrive within {timeout_s:g} s")

    async def _drain(self, request_id: str, tracked: _Tracked) -> None:
        """Read an unattended stream to its end (the engine delivers the abort or error), then settle."""
        if tracked.streamed:
            return
        tracked.streamed = True
        with contextlib.suppress(Exception):
            async for _ in tracked.outputs:
                pass
        await self._settle(request_id)

    async def _settle(self, request_id: str) -> None:
        """The request ended here: forget it and end its registry record."""
        tracked = self._drop(request_id)
        if tracked is None:
            return
        self.counters.num_finished += 1
        logger.info("request %s: ended", request_id)
        try:
            await self.registry.end_request(request_id, self.worker_id)
        except (RegistryError, RegistryUnavailable) as exc:
            logger.warning("could not end the registry record of %s: %s", request_id, exc)

    def _drop(self, request_id: str) -> _Tracked | None:
        tracked = self._tracked.pop(request_id, None)
        if tracked is not None and tracked.timeout is not None:
            tracked.timeout.cancel()
        return tracked

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def drain(self, timeout_s: float) -> None:
        """Refuse new requests and give the ones in flight `timeout_s` to finish."""
        self.draining = True
        deadline = asyncio.get_running_loop().time() + timeout_s
        while self._tracked and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)

    async def shutdown(self) -> None:
        """Abort what is in flight (streams end with 'abort') and settle every record."""
        for request_id, tracked in list(self._tracked.items()):
            self.engine.abort(request_id)
            if not tracked.streamed:
                self._spawn(self._drain(request_id, tracked))
        if self._background:
            await asyncio.wait(self._background, timeout=5)
