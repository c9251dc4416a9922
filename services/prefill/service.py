"""The prefill worker's gRPC servicer: prefill a prompt, push its KV layer by layer to the decode
worker that reserved blocks for it, and return once that worker acknowledged the handoff.

Registry record: RESERVED (by D) → PREFILLING (owner P, here) → D commits DECODING on receipt. On any
failure the record goes back to RESERVED under D, the push is aborted (D fails its reservation) and
the RPC fails with UNAVAILABLE/ABORTED so the router retries elsewhere."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import grpc
import torch

from baton.services.lifecycle import request_logger
from baton.shared.config import WorkerConfig
from baton.shared.engine.async_engine import AsyncEngine
from baton.shared.engine.outputs import EngineOutput
from baton.shared.grpc_server import ConflictError, UnavailableError
from baton.shared.registry import Registry, RegistryError, RegistryUnavailable, RequestRecord, RequestState
from baton.shared.rpc import worker_pb2, worker_pb2_grpc
from baton.shared.rpc_convert import first_token_to_dict, sampling_from_proto
from baton.shared.transfer import KVPushSession, KVSender
from baton.shared.worker_runtime import TransferCounters, request_record, stats_reply

logger = logging.getLogger(__name__)
request_log = request_logger(__name__)

_LayerItem = tuple[int, torch.Tensor, "torch.cuda.Event | None"]  # (first layer, run, ready)


class PrefillService(worker_pb2_grpc.PrefillWorkerServicer):
    def __init__(
        self,
        config: WorkerConfig,
        engine: AsyncEngine,
        registry: Registry,
        sender: KVSender,
        worker_id: str,
        num_layers: int,
    ) -> None:
        self.config = config
        self.engine = engine
        self.registry = registry
        self.sender = sender
        self.worker_id = worker_id
        self.num_layers = num_layers
        self._layers: dict[str, asyncio.Queue[_LayerItem]] = {}
        self._tasks: dict[str, asyncio.Task[Any]] = {}
        self._pushing_to: dict[str, tuple[str, int]] = {}  # request -> (decode worker, blocks)
        self._loop: asyncio.AbstractEventLoop | None = None
        self.counters = TransferCounters()
        self.draining = False
        engine.core.layer_kv_sink = self._on_layer  # called on the engine thread, a run of layers at a time

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

    def _on_layer(
        self, request_id: str, first_layer: int, kv: torch.Tensor, ready: torch.cuda.Event | None
    ) -> None:
        queue = self._layers.get(request_id)
        if queue is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(queue.put_nowait, (first_layer, kv, ready))

    # -- gRPC ------------------------------------------------------------------------------------
    async def Prefill(
        self, request: worker_pb2.PrefillRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.PrefillResponse:
        rid, prompt = request.request_id, list(request.prompt_token_ids)
        if self.draining:
            raise UnavailableError(f"prefill worker {self.worker_id} is draining: prefill elsewhere")
        params = sampling_from_proto(request.sampling)
        self.engine.core.validate(prompt, params)
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
            self._layers.pop(rid, None)

    async def _prefill(
        self, request: worker_pb2.PrefillRequest, rid: str, prompt: list[int], params: Any
    ) -> worker_pb2.PrefillResponse:
        start_ns = time.monotonic_ns()
        await self._begin(rid)
        session: KVPushSession | None = None
        pushed: asyncio.Task[int] | None = None
        try:
            session = await self.sender.open(
                request.transfer_address, rid, list(request.block_ids), self.num_layers
            )
            opened_ns = time.monotonic_ns()
            self._layers[rid] = asyncio.Queue()
            outputs = self.engine.add(rid, prompt, params, prefill_only=True)
            push_ms: dict[str, float] = {}
            pushed = asyncio.create_task(self._push_layers(session, self._layers[rid], push_ms))
            first = await _only_output(outputs)
            push_ms["token_at_ms"] = (time.monotonic_ns() - opened_ns) / 1e6
            if first.finish_reason in ("abort", "error"):
                raise UnavailableError(
                    f"prefill of {rid!r} ended early: {first.error or first.finish_reason}"
                )
            nbytes = await pushed
            computed_ns = time.monotonic_ns()
            push_ms["pushed_at_ms"] = (computed_ns - opened_ns) / 1e6
            trailer = {**first_token_to_dict(first), "prefill_worker": self.worker_id}
            await session.finish(trailer, timeout_s=self.config.transfer_timeout_s)
            acked_ns = time.monotonic_ns()
        except BaseException as exc:
            self.counters.num_transfer_failures += 1
            if pushed is not None:
                pushed.cancel()
            await self._undo(rid, session, exc)
            raise
        self.counters.num_transfers += 1
        self.counters.num_finished += 1
        self.counters.transfer_bytes += nbytes
        request_log.info(
            "request %s: prefilled %d tokens (%d cached), pushed %d bytes to %s "
            "(%.0f ms for a transfer slot, %.0f ms to compute and push: %s; %.0f ms for the ack: %s)",
            rid, len(prompt), first.num_cached_tokens, nbytes, request.decode_worker_id,
            (opened_ns - start_ns) / 1e6, (computed_ns - opened_ns) / 1e6,
            ", ".join(f"{k} {v:.0f}" for k, v in push_ms.items()), (acked_ns - computed_ns) / 1e6,
            ", ".join(f"{k} {v:.0f}" for k, v in session.finish_timings.items()),
        )  # fmt: skip
        return worker_pb2.PrefillResponse(
            first_token_id=first.new_token_ids[0],
            num_cached_tokens=first.num_cached_tokens,
            prefill_ns=computed_ns - start_ns,
            handoff_ns=time.monotonic_ns() - computed_ns,
            transfer_bytes=nbytes,
        )

    async def _begin(self, rid: str) -> None:
        try:
            await self.registry.begin_prefill(rid, self.worker_id)
        except RegistryError as exc:
            raise ConflictError(f"cannot prefill {rid!r}: {exc}") from exc
        except RegistryUnavailable as exc:
            logger.warning("registry unreachable, prefilling %s without recording it: %s", rid, exc)

    async def _push_layers(
        self, session: KVPushSession, queue: asyncio.Queue[_LayerItem], timings: dict[str, float]
    ) -> int:
        """Send each run of layers as the engine copies it out; returns the bytes sent. `timings` gets
        where the time went, in ms: waiting for the engine's runs, for them to be ready, sending them."""
        nbytes, expected = 0, 0
        timings.update(engine_ms=0.0, ready_ms=0.0, send_ms=0.0)
        while expected < self.num_layers:
            t0 = time.monotonic()
            first, kv, ready = await queue.get()  # kv: [run_layers, 2, blocks, block_size, heads, dim]
            t1 = time.monotonic()
            if first != expected:
                raise RuntimeError(f"layer {first} arrived when layer {expected} was due")
            if ready is not None and not ready.query():
                await asyncio.to_thread(ready.synchronize)
            t2 = time.monotonic()
            await session.send_layers(first, kv)
            nbytes += kv.numel() * kv.element_size()
            expected = first + kv.shape[0]
            timings["engine_ms"] += (t1 - t0) * 1e3
            timings["ready_ms"] += (t2 - t1) * 1e3
            timings["send_ms"] += (time.monotonic() - t2) * 1e3
        return nbytes

    async def _undo(self, rid: str, session: KVPushSession | None, exc: BaseException) -> None:
        """A failed or cancelled prefill: stop computing, tell D, give the record back to D."""
        reason = f"prefill worker {self.worker_id}: {exc!r}"
        logger.warning("prefill of %s failed: %r", rid, exc)
        self.engine.abort(rid)
        if session is not None:
            await asyncio.shield(session.abort(reason))
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
        num_blocks = await self.engine.call(lambda core: core.reset_prefix_cache())
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
