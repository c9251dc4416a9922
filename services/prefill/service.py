"""The prefill worker's gRPC servicer: prefill a prompt, have its KV pushed (by the worker's sending
process, see sender_process.py) to the decode worker that reserved blocks for it, and return once that
worker acknowledged the handoff.

Registry record: RESERVED (by D) → PREFILLING (owner P, here) → D commits DECODING on receipt. On any
failure the record goes back to RESERVED under D, the push is aborted (D fails its reservation) and
the RPC fails with UNAVAILABLE/ABORTED so the router retries elsewhere."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import grpc

from baton.services.lifecycle import request_logger
from baton.services.prefill.sender_process import SenderProcess
from baton.shared.config import WorkerConfig
from baton.shared.engine.async_engine import AsyncEngine
from baton.shared.engine.engine_core import EngineCore
from baton.shared.engine.outputs import EngineOutput
from baton.shared.grpc_server import ConflictError, UnavailableError
from baton.shared.registry import Registry, RegistryError, RegistryUnavailable, RequestRecord, RequestState
from baton.shared.rpc import worker_pb2, worker_pb2_grpc
from baton.shared.rpc_convert import first_token_to_dict, sampling_from_proto
from baton.shared.worker_runtime import TransferCounters, request_record, stats_reply

logger = logging.getLogger(__name__)
request_log = request_logger(__name__)


class PrefillService(worker_pb2_grpc.PrefillWorkerServicer):
    def __init__(
        self,
        config: WorkerConfig,
        engine: AsyncEngine,
        registry: Registry,
        sender: SenderProcess,
        worker_id: str,
        num_layers: int,
    ) -> None:
        self.config = config
        self.engine = engine
        self.registry = registry
        self.sender = sender
        self.worker_id = worker_id
        self.num_layers = num_layers
        self._tasks: dict[str, asyncio.Task[Any]] = {}
        self._pushing_to: dict[str, tuple[str, int]] = {}  # request -> (decode worker, blocks)
        self._loop: asyncio.AbstractEventLoop | None = None
        self.counters = TransferCounters()
        self.draining = False
        engine.core.prompt_kv_sink = self._on_prompt_kv  # called on the engine thread

    @property
    def request_ids(self) -> list[str]:
        return list(self._tasks)

    def registry_records(self) -> list[RequestRecord]:
        """PREFILLING records of the pushes in flight (I5: restored after a flush)."""
        return [
            request_record(
                rid, RequestState.PREFILLING, self.worker_id, decode_worker, self.worker_id, num_blocks
            )
            for rid, (decode_worker, num_blocks) in self._pushing_to.items()
        ]

    def _on_prompt_kv(self, request_id: str, block_ids: list[int], ready: Any) -> None:
        if self._loop is None:  # no request came through an RPC: nothing pushes it
            self.engine.release_prompt_kv(request_id)
        else:
            self._loop.call_soon_threadsafe(self.sender.ship, request_id, block_ids, ready)

    # -- gRPC ------------------------------------------------------------------------------------
    async def Prefill(
        self, request: worker_pb2.PrefillRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.PrefillResponse:
        rid, prompt = request.request_id, list(request.prompt_token_ids)
        if self.draining:
            raise UnavailableError(f"prefill worker {self.worker_id} is draining: prefill elsewhere")
        params = sampling_from_proto(request.sampling)
        self.engine.validate(prompt, params)  # before the registry and the push hear of it
        if rid in self._tasks:
            raise ValueError(f"request id {rid!r} is already being prefilled here")
        self._loop = asyncio.get_running_loop()
        current = asyncio.current_task()
        assert current is not None
        self._tasks[rid] = current
        self._pushing_to[rid] = (request.decode_worker_id, len(request.block_ids))
        try:
            return await self._prefill(request, rid, prompt, params)
        finally:
            self._tasks.pop(rid, None)
            self._pushing_to.pop(rid, None)

    async def _prefill(
        self, request: worker_pb2.PrefillRequest, rid: str, prompt: list[int], params: Any
    ) -> worker_pb2.PrefillResponse:
        start_ns = time.monotonic_ns()
        await self._begin(rid)
        opened = False
        try:
            self.sender.open(rid, request.transfer_address, list(request.block_ids), self.num_layers)
            opened = True
            opened_ns = time.monotonic_ns()
            outputs = self.engine.add(rid, prompt, params, prefill_only=True, validated=True)
            first = await _only_output(outputs)
            computed_ns = time.monotonic_ns()
            if first.finish_reason in ("abort", "error"):
                raise UnavailableError(
                    f"prefill of {rid!r} ended early: {first.error or first.finish_reason}"
                )
            trailer = {**first_token_to_dict(first), "prefill_worker": self.worker_id}
            pushed = await self.sender.finish(rid, trailer, timeout_s=self.config.transfer_timeout_s)
            acked_ns = time.monotonic_ns()
        except BaseException as exc:
            self.counters.num_transfer_failures += 1
            await self._undo(rid, opened, exc)
            raise
        self.counters.num_transfers += 1
        self.counters.num_finished += 1
        self.counters.transfer_bytes += pushed.nbytes
        request_log.info(
            "request %s: prefilled %d tokens (%d cached) in %.0f ms, pushed %d bytes to %s "
            "(%.0f ms for the push to open, then %.0f ms to push and ack: %s; ack: %s)",
            rid, len(prompt), first.num_cached_tokens, (computed_ns - opened_ns) / 1e6, pushed.nbytes,
            request.decode_worker_id, (opened_ns - start_ns) / 1e6, (acked_ns - computed_ns) / 1e6,
            ", ".join(f"{k} {v:.0f}" for k, v in pushed.push_ms.items()),
            ", ".join(f"{k} {v:.0f}" for k, v in pushed.finish_timings.items()),
        )  # fmt: skip
        return worker_pb2.PrefillResponse(
            first_token_id=first.new_token_ids[0],
            num_cached_tokens=first.num_cached_tokens,
            prefill_ns=computed_ns - start_ns,
            handoff_ns=acked_ns - computed_ns,
            transfer_bytes=pushed.nbytes,
        )

    async def _begin(self, rid: str) -> None:
        try:
            await self.registry.begin_prefill(rid, self.worker_id)
        except RegistryError as exc:
            raise ConflictError(f"cannot prefill {rid!r}: {exc}") from exc
        except RegistryUnavailable as exc:
            logger.warning("registry unreachable, prefilling %s without recording it: %s", rid, exc)

    async def _undo(self, rid: str, opened: bool, exc: BaseException) -> None:
        """A failed or cancelled prefill: stop computing, tell D, give the record back to D."""
        reason = f"prefill worker {self.worker_id}: {exc!r}"
        logger.warning("prefill of %s failed: %r", rid, exc)
        self.engine.abort(rid)
        if opened:
            self.sender.abort(rid, reason)
        try:
            await asyncio.shield(self.registry.release_prefill(rid, self.worker_id))
        except (RegistryError, RegistryUnavailable) as release_exc:
            logger.info("record of %s not released: %s", rid, release_exc)

    async def Abort(
        self, request: worker_pb2.AbortRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.AbortResponse:
        task = self._tasks.get(request.request_id)
        if task is None:
            return worker_pb2.AbortResponse(found=False)
        task.cancel(f"aborted: {request.reason or 'by request'}")
        return worker_pb2.AbortResponse(found=True)

    async def GetStats(
        self, request: worker_pb2.GetStatsRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.WorkerStats:
        return await stats_reply(
            self.engine, self.worker_id, "prefill", self._tasks, request.check_integrity, self.counters
        )

    async def ResetPrefixCache(
        self, request: worker_pb2.ResetPrefixCacheRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.ResetPrefixCacheResponse:
        num_blocks = await self.engine.call(EngineCore.reset_prefix_cache)
        return worker_pb2.ResetPrefixCacheResponse(num_blocks=num_blocks)

    async def drain(self, timeout_s: float) -> None:
        """Refuse new prefills and give the ones in flight `timeout_s` to finish their push."""
        self.draining = True
        if self._tasks:
            await asyncio.wait(list(self._tasks.values()), timeout=timeout_s)

    async def shutdown(self) -> None:
        for task in list(self._tasks.values()):
            task.cancel("prefill worker shutting down")
        if self._tasks:
            await asyncio.wait(list(self._tasks.values()), timeout=5)


async def _only_output(outputs: Any) -> EngineOutput:
    """A prefill-only request yields exactly one output (its first token, finished)."""
    last = None
    async for out in outputs:
        last = out
    if last is None:
        raise UnavailableError("the engine ended the prefill without an output")
    return last
