"""The decode worker's gRPC servicer and handoff handler around one AsyncEngine.

Per request: Reserve (blocks held, registry record RESERVED, announced to the KV receiving process)
→ the prefill worker pushes every layer into those blocks (`receiver_process.py`) → the handoff
commits in Redis (PREFILLING → DECODING, owner D) and the first token joins the running batch →
tokens stream out → the record ends with the request.
Local prefill skips the push: the request is queued like any other.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc

from baton.services.lifecycle import request_logger
from baton.shared.background import BackgroundTasks
from baton.shared.config import WorkerConfig
from baton.shared.engine.async_engine import AsyncEngine
from baton.shared.engine.engine_core import EngineCore
from baton.shared.engine.outputs import EngineOutput
from baton.shared.grpc_server import CapacityError, ConflictError, UnavailableError
from baton.shared.output_mux import Failed, Subscribers
from baton.shared.registry import Registry, RegistryError, RegistryUnavailable, RequestRecord, RequestState
from baton.shared.rpc import worker_pb2, worker_pb2_grpc
from baton.shared.rpc_convert import delta_from_output, first_token_from_dict, sampling_from_proto
from baton.shared.transfer import TransferError
from baton.shared.worker_runtime import TransferCounters, request_record, stats_reply

if TYPE_CHECKING:
    from baton.services.decode.receiver_process import ReceiverProcess

logger = logging.getLogger(__name__)
request_log = request_logger(__name__)

MAX_EARLY_ABORTS = 65536  # aborts remembered for Reserve calls they overtook (oldest forgotten first)


@dataclass
class _Tracked:
    """A request this worker holds, from Reserve until its last output was read."""

    block_ids: list[int]
    num_top_logprobs: int
    outputs: AsyncGenerator[EngineOutput, None] | None  # None: they go to a subscriber's OutputMux
    remote: bool
    ready: Any = None  # the reservation's fence event: kept alive while the receiving process may open it
    committed: bool = False
    timeout: asyncio.TimerHandle | None = None
    streamed: bool = False
    aborted: bool = False
    reserving: bool = True  # its Reserve call has not returned yet
    ended: bool = False  # its last output went to a subscriber while it was still reserving


class DecodeService(worker_pb2_grpc.DecodeWorkerServicer):
    def __init__(
        self,
        config: WorkerConfig,
        engine: AsyncEngine,
        registry: Registry,
        worker_id: str,
        num_layers: int,
        receiver: ReceiverProcess | None = None,
    ) -> None:
        """`receiver`: the KV receiving process, told of each reservation (None: this worker only
        prefills locally)."""
        self.config = config
        self.engine = engine
        self.registry = registry
        self.receiver = receiver
        self.worker_id = worker_id
        self.num_layers = num_layers
        self.transfer_address = ""
        self._tracked: dict[str, _Tracked] = {}
        # ids aborted before their Reserve got them tracked (the Abort overtook it): id -> until when
        self._early_aborts: OrderedDict[str, float] = OrderedDict()
        self._background = BackgroundTasks()
        self._subscribers = Subscribers(self._abort_orphans, engine.stream_interval)
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
        self._refuse_if_aborted(rid)
        params = sampling_from_proto(request.sampling)
        mux = None
        if request.subscriber:
            mux = self._subscribers.get(request.subscriber)
            if mux is None:
                raise UnavailableError(
                    f"decode worker {self.worker_id} has no StreamOutputs stream open for subscriber "
                    f"{request.subscriber!r}"
                )
        ready, outputs = None, None
        sink = mux.attach(rid) if mux is not None else None
        try:
            if request.local_prefill:
                if sink is not None:
                    self.engine.add_to_sink(sink, rid, prompt, params)
                else:
                    outputs = self.engine.add(rid, prompt, params)
                block_ids: list[int] = []
            else:
                if self.receiver is None:
                    raise UnavailableError(f"decode worker {self.worker_id} receives no KV pushes")
                reserved = await self.engine.reserve(rid, prompt, params, sink)
                if reserved is None:
                    raise CapacityError(
                        f"decode worker {self.worker_id} has no room for {len(prompt)} prompt tokens"
                    )
                block_ids, outputs, ready = reserved.block_ids, reserved.outputs, reserved.ready
        except BaseException:
            if mux is not None:
                mux.detach(rid)
            raise
        tracked = _Tracked(block_ids, params.logprobs or 0, outputs, not request.local_prefill, ready)
        tracked.streamed = mux is not None
        self._tracked[rid] = tracked
        try:
            self._refuse_if_aborted(rid)  # an Abort that came while the engine reserved found nothing
            await self.registry.reserve(
                rid, self.worker_id, len(block_ids), local_prefill=request.local_prefill
            )
        except RegistryError as exc:
            self._undo_reserve(rid, mux)
            raise ValueError(f"request id {rid!r} is already registered: {exc}") from exc
        except RegistryUnavailable as exc:
            logger.warning("registry unreachable, reserving %s without a record: %s", rid, exc)
        except BaseException:  # aborted meanwhile, or this call was cancelled: nobody will use it
            self._undo_reserve(rid, mux, end_record=True)
            raise
        tracked.reserving = False
        if tracked.ended:  # it ended (finished, or aborted) meanwhile: settled now its record exists
            self._background.spawn(self._settle(rid))
        if tracked.aborted or self._tracked.get(rid) is not tracked:  # aborted while its record was written
            raise ConflictError(f"request {rid!r} was aborted while it was being reserved")
        if not tracked.ended:
            if tracked.remote and self.receiver is not None:
                # before the router can hand it to a prefill worker
                self.receiver.reserve(rid, block_ids, ready)
            if tracked.remote or not tracked.streamed:  # something to wait for: the KV, or a reader
                timeout_s = self.config.reservation_timeout_s
                tracked.timeout = asyncio.get_running_loop().call_later(
                    timeout_s, self._expire, rid, timeout_s
                )
        how = "prefilled here" if request.local_prefill else f"{len(block_ids)} blocks reserved"
        request_log.info("request %s: %d prompt tokens, %s", rid, len(prompt), how)
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
        assert tracked.outputs is not None  # reserved without a subscriber
        try:
            async for out in tracked.outputs:
                yield delta_from_output(out, tracked.num_top_logprobs)
        finally:
            await tracked.outputs.aclose()  # not finished (the router went away): aborts the request
            # In a task of its own: this handler may be cancelled again while the record is ended.
            self._background.spawn(self._settle(rid))

    async def StreamOutputs(
        self, request: worker_pb2.StreamOutputsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_pb2.TokenDeltaBatch]:
        # the first (empty) message says the subscription is in place: Reserve may name it
        opening = worker_pb2.TokenDeltaBatch()
        async for message in self._subscribers.stream(request.subscriber, opening, self._delta_batch):
            yield message

    def _delta_batch(self, batch: list[EngineOutput | Failed]) -> worker_pb2.TokenDeltaBatch:
        message = worker_pb2.TokenDeltaBatch()
        for item in batch:
            out = _as_output(item)
            tracked = self._tracked.get(out.request_id)
            top = tracked.num_top_logprobs if tracked is not None else 0
            message.deltas.append(delta_from_output(out, top, out.request_id))
            if out.finished:
                if tracked is not None and tracked.reserving:
                    tracked.ended = True  # settled once its Reserve has written the record
                else:
                    self._background.spawn(self._settle(out.request_id))
        return message

    def _abort_orphans(self, request_ids: set[str]) -> None:
        """A subscriber is gone: its requests' outputs have no reader, so they end here."""
        for request_id in request_ids:
            self.engine.abort(request_id)
            self._background.spawn(self._settle(request_id))

    async def Abort(
        self, request: worker_pb2.AbortRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.AbortResponse:
        tracked = self._tracked.get(request.request_id)
        if tracked is None:
            self._remember_early_abort(request.request_id)  # its Reserve may still be on the way
            return worker_pb2.AbortResponse(found=False)
        request_log.info("abort %s: %s", request.request_id, request.reason or "by request")
        tracked.aborted = True
        self.engine.abort(request.request_id)
        if not tracked.streamed:  # nobody will read the stream: settle here
            self._background.spawn(self._drain(request.request_id, tracked))
        return worker_pb2.AbortResponse(found=True)

    async def GetStats(
        self, request: worker_pb2.GetStatsRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.WorkerStats:
        return await stats_reply(
            self.engine, self.worker_id, "decode", self._tracked, request.check_integrity, self.counters
        )

    async def ResetPrefixCache(
        self, request: worker_pb2.ResetPrefixCacheRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.ResetPrefixCacheResponse:
        num_blocks = await self.engine.call(EngineCore.reset_prefix_cache)
        return worker_pb2.ResetPrefixCacheResponse(num_blocks=num_blocks)

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

    # -- handoffs (called by the receiving process's link) ----------------------------------------
    async def complete(self, request_id: str, trailer: dict[str, Any], nbytes: int) -> dict[str, Any]:
        """The request's KV landed in its blocks and was verified: record the handoff and admit it."""
        tracked = self._tracked.get(request_id)
        if tracked is None or not tracked.remote or tracked.committed:
            raise TransferError(f"request {request_id!r} is no longer reserved here")
        first_token, num_cached = first_token_from_dict(trailer)
        prefill_worker = str(trailer.get("prefill_worker", ""))
        start_ns = time.monotonic_ns()
        try:
            await self.registry.commit_handoff(request_id, prefill_worker, self.worker_id)
        except RegistryError as exc:
            raise TransferError(f"handoff of {request_id!r} refused by the registry: {exc}") from exc
        except RegistryUnavailable as exc:
            logger.warning(
                "registry unreachable, committing %s without recording the handoff: %s", request_id, exc
            )
        if self._tracked.get(request_id) is not tracked:
            raise TransferError(f"request {request_id!r} ended while its handoff was recorded")
        tracked.committed = True
        tracked.ready = None
        if tracked.timeout is not None and tracked.streamed:
            tracked.timeout.cancel()
        self.engine.commit(request_id, first_token, num_cached)
        self.counters.num_transfers += 1
        self.counters.transfer_bytes += nbytes
        request_log.info(
            "request %s: KV from %s complete (handoff recorded in %.1f ms)",
            request_id, prefill_worker, (time.monotonic_ns() - start_ns) / 1e6,
        )  # fmt: skip
        return {"ok": True, "decode_worker": self.worker_id}

    def fail(self, request_id: str, reason: str) -> None:
        """The push broke (the receiving process already let go of the blocks): end the request."""
        tracked = self._tracked.get(request_id)
        if tracked is None or tracked.committed:
            return
        self.counters.num_transfer_failures += 1
        logger.warning("KV transfer for %s failed: %s", request_id, reason)
        self.engine.fail(request_id, f"KV transfer failed: {reason}")

    # -- lifecycle -------------------------------------------------------------------------------
    def _expire(self, request_id: str, timeout_s: float) -> None:
        """The reservation's deadline: nobody attached to the stream (the router went away), or the
        pushed KV never arrived. Either way the request ends and its blocks are freed."""
        tracked = self._tracked.get(request_id)
        if tracked is None:
            return
        if not tracked.streamed:
            self.engine.fail(request_id, f"nobody read the output stream within {timeout_s:g} s")
            self._background.spawn(self._drain(request_id, tracked))
        elif tracked.remote and not tracked.committed:
            self.engine.fail(request_id, f"the prompt's KV did not arrive within {timeout_s:g} s")

    async def _drain(self, request_id: str, tracked: _Tracked) -> None:
        """Read an unattended stream to its end (the engine delivers the abort or error), then settle."""
        if tracked.streamed or tracked.outputs is None:  # read by a Stream call or a subscriber
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
        request_log.info("request %s: ended", request_id)
        try:
            await self.registry.end_request(request_id, self.worker_id)
        except (RegistryError, RegistryUnavailable) as exc:
            logger.warning("could not end the registry record of %s: %s", request_id, exc)

    def _remember_early_abort(self, request_id: str) -> None:
        """An abort for a request not (yet) held here: a Reserve for it arriving later is refused,
        within the reservation timeout (after it, a late Reserve's blocks would expire anyway)."""
        now = time.monotonic()
        self._early_aborts[request_id] = now + self.config.reservation_timeout_s
        self._early_aborts.move_to_end(request_id)
        while self._early_aborts and (
            len(self._early_aborts) > MAX_EARLY_ABORTS or next(iter(self._early_aborts.values())) < now
        ):
            self._early_aborts.popitem(last=False)

    def _refuse_if_aborted(self, request_id: str) -> None:
        """ConflictError (ABORTED) if an Abort for this request came before it was tracked."""
        until = self._early_aborts.pop(request_id, None)
        if until is not None and until >= time.monotonic():
            raise ConflictError(f"request {request_id!r} was aborted before it was reserved")

    def _undo_reserve(self, request_id: str, mux: Any, end_record: bool = False) -> None:
        """A Reserve that cannot complete: forget the request, free its blocks (the engine's abort
        also makes the receiving process let go of them) and, when asked, end its registry record."""
        if self._drop(request_id) is None:
            return
        if mux is not None:
            mux.detach(request_id)
        self.engine.abort(request_id)  # its unread stream is dropped with it
        if end_record:
            self._background.spawn(self._end_record_quietly(request_id))

    async def _end_record_quietly(self, request_id: str) -> None:
        with contextlib.suppress(RegistryError, RegistryUnavailable):
            await self.registry.end_request(request_id, self.worker_id)

    def _drop(self, request_id: str) -> _Tracked | None:
        tracked = self._tracked.pop(request_id, None)
        if tracked is not None and tracked.timeout is not None:
            tracked.timeout.cancel()
        return tracked

    async def drain(self, timeout_s: float) -> None:
        """Refuse new requests and give the ones in flight `timeout_s` to finish."""
        self.draining = True
        await self._until_settled(timeout_s)

    async def _until_settled(self, timeout_s: float) -> None:
        """Until no request is held here, or `timeout_s` passed."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while self._tracked and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.02)

    async def shutdown(self, timeout_s: float = 5.0) -> None:
        """End what is still in flight with an error naming the stop (a request with no token out yet
        is placed again by the router), settle every record, and end the subscribers' output streams
        (they never end by themselves; the server's stop would wait)."""
        reason = (
            f"decode worker {self.worker_id} stopped before the request finished "
            f"(drain timeout {self.config.drain_timeout_s:g} s)"
        )
        for request_id, tracked in list(self._tracked.items()):
            self.engine.fail(request_id, reason)
            if not tracked.streamed:
                self._background.spawn(self._drain(request_id, tracked))
        await self._until_settled(timeout_s)  # the failures reach the subscribers
        self._subscribers.close_all()
        await self._background.wait(timeout_s)


def _as_output(item: EngineOutput | Failed) -> EngineOutput:
    """A failed request's last output: the engine died under it."""
    if isinstance(item, Failed):
        return EngineOutput(
            item.request_id, [], finish_reason="error", error=f"engine failed: {item.error!r}"
        )
    return item
