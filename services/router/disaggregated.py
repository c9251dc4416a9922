"""Generation across workers: reserve on a decode worker, prefill on a prefill worker (or locally on
the decode worker), stream the decode worker's tokens. Failures before the first token are retried
on other workers, invisibly to the client; after it, the stream ends with an error.

Each placement is an *attempt* with its own id (`<request id>~<n>`), so a late message about an
abandoned attempt can never touch the next one."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc

from baton.services.lifecycle import request_logger
from baton.services.router.cluster_stats import summed_stats
from baton.services.router.decode_outputs import decode_outputs
from baton.services.router.directory import WorkerDirectory
from baton.services.router.placement import (
    Placement,
    QueuedPrefill,
    choose_prefill_worker,
    prefill_locally,
    rank_decode_workers,
    with_queue_room,
)
from baton.shared.background import BackgroundTasks
from baton.shared.config import RouterConfig
from baton.shared.engine.block_hash import hash_full_blocks
from baton.shared.engine.outputs import EngineOutput
from baton.shared.engine.sampling_params import SamplingParams
from baton.shared.grpc_server import CapacityError, UnavailableError
from baton.shared.grpc_tls import GrpcTls
from baton.shared.registry import Registry, RegistryUnavailable, WorkerRecord
from baton.shared.rpc import router_pb2, worker_pb2
from baton.shared.rpc_convert import sampling_to_proto
from baton.shared.subscription import Subscription

logger = logging.getLogger(__name__)
request_log = request_logger(__name__)

RESERVE_TIMEOUT_S = 10.0
PREFILL_SETTLE_TIMEOUT_S = 30.0
"""A request can finish (one output token) before its prefill call returns with the decode worker's
ack: that call is left this long to end, not cancelled (a cancel would count as a failed transfer)."""
PREFILL_TIMEOUT_S = 300.0
STATS_TIMEOUT_S = 2.0
_RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED, grpc.StatusCode.DEADLINE_EXCEEDED}


@dataclass
class _Failures:
    """What went wrong in earlier attempts of one request (workers to avoid, the last reason)."""

    decode: set[str] = field(default_factory=set)
    full: set[str] = field(default_factory=set)
    """Decode workers that refused for lack of room (tried again by later requests, not this one)."""
    prefill: set[str] = field(default_factory=set)
    last_error: str = ""


@dataclass
class _AttemptState:
    emitted: bool = False
    """A token of this attempt reached the client: from now on the attempt cannot be replaced."""


class _RetryAttempt(Exception):
    """This attempt failed before any token reached the client: place the request again."""


class DisaggregatedBackend:
    def __init__(self, config: RouterConfig, registry: Registry, tls: GrpcTls | None = None) -> None:
        self.config = config
        self.registry = registry
        self.directory = WorkerDirectory(registry, config.worker_refresh_s, config.registry.lease_ttl_s, tls)
        self.num_remote_prefills = 0
        self.num_local_prefills = 0
        self.num_overflow_prefills = 0
        """Local prefills of prompts long enough to ship, taken while every prefill queue was full."""
        self.num_retries = 0
        self.prefill_queue: Counter[str] = Counter()
        """Uncached prompt tokens this router sent to each prefill worker and not yet seen handed off."""
        self.subscriber = f"router-{uuid.uuid4().hex[:12]}"  # this router on decode workers' output streams
        self._outputs: dict[
            tuple[str, str], Subscription[EngineOutput]
        ] = {}  # by decode worker id and address
        self._aborts = BackgroundTasks()

    async def generate(
        self, request_id: str, prompt: list[int], params: SamplingParams
    ) -> AsyncIterator[EngineOutput]:
        failures = _Failures()
        for attempt in range(1, self.config.max_attempts + 1):
            placement = await self._place(prompt, failures)
            request_log.info(
                "request %s attempt %d: decode %s, prefill %s",
                request_id, attempt, placement.decode.info.worker_id,
                placement.prefill.info.worker_id if placement.prefill else "local",
            )  # fmt: skip
            try:
                async for out in self._attempt(
                    f"{request_id}~{attempt}", prompt, params, placement, failures
                ):
                    yield _renamed(out, request_id)
                return
            except _RetryAttempt:
                self.num_retries += 1
                logger.warning(
                    "request %s attempt %d failed (%s): retrying", request_id, attempt, failures.last_error
                )
            finally:
                self._release(placement)
        raise UnavailableError(
            f"request {request_id} failed after {self.config.max_attempts} attempts: {failures.last_error}"
        )

    # -- placement -------------------------------------------------------------------------------
    async def _place(self, prompt: list[int], failures: _Failures) -> Placement:
        """Choose the workers and count the request against them at once (no await in between: the
        prefix index is read before), so a burst of requests spreads instead of all seeing the same
        idle worker."""
        live_decodes = await self.directory.live("decode")
        prefills = await self.directory.live("prefill")
        in_flight = self.directory.in_flight
        block_size = live_decodes[0].info.block_size if live_decodes else 0
        overlap = await self._prefix_overlap(prompt, block_size, prefills) if live_decodes else {}
        decodes = rank_decode_workers(live_decodes, in_flight, failures.decode)
        if not decodes and failures.full:
            raise CapacityError(f"no decode worker has room for this request ({failures.last_error})")
        if not decodes:  # (say, prefill workers registered again after a Redis restart, decode ones not yet)
            raise UnavailableError(
                "no decode worker is available"
                + (f" (last failure: {failures.last_error})" if failures.last_error else "")
            )
        decode = decodes[0]
        candidates = [w for w in prefills if w.info.worker_id not in failures.prefill]
        roomy = with_queue_room(candidates, self.prefill_queue, self.config.max_prefill_queue_tokens)
        prefill = choose_prefill_worker(roomy if roomy else candidates, overlap, in_flight)
        cached = overlap.get(prefill.info.worker_id, 0) * block_size if prefill else 0
        queued = None
        if prefill is not None and prefill_locally(len(prompt), cached, self.config.local_prefill_max_tokens):
            prefill = None
        elif prefill is not None and not roomy:  # every prefill queue is full: the decode GPU takes it
            prefill = None
            self.num_overflow_prefills += 1
        in_flight[decode.info.worker_id] += 1
        if prefill is not None:
            in_flight[prefill.info.worker_id] += 1
            queued = QueuedPrefill.join(self.prefill_queue, prefill.info.worker_id, len(prompt) - cached)
        return Placement(decode, prefill, cached, queued)

    def _release(self, placement: Placement) -> None:
        self.directory.in_flight[placement.decode.info.worker_id] -= 1
        if placement.prefill is not None:
            self.directory.in_flight[placement.prefill.info.worker_id] -= 1
        if placement.queued is not None:
            placement.queued.release()

    async def _prefix_overlap(
        self, prompt: list[int], block_size: int, prefills: list[WorkerRecord]
    ) -> dict[str, int]:
        if not prefills:
            return {}
        hashes: list[bytes] = []
        hash_full_blocks(prompt, block_size, hashes)
        if not hashes:
            return {}
        try:
            return await self.registry.prefix_overlap(
                [h.hex() for h in hashes], [w.info.worker_id for w in prefills]
            )
        except RegistryUnavailable:
            return {}  # degrade: placement by load only

    # -- one attempt -----------------------------------------------------------------------------
    async def _attempt(
        self,
        attempt_id: str,
        prompt: list[int],
        params: SamplingParams,
        placement: Placement,
        failures: _Failures,
    ) -> AsyncIterator[EngineOutput]:
        decode, prefill = placement.decode, placement.prefill
        d_id = decode.info.worker_id
        d_stub = self.directory.decode_stub(decode)
        shared = self._outputs_of(decode, d_stub)
        try:
            await shared.open()
        except grpc.aio.AioRpcError as exc:
            self._decode_failed(decode, exc, failures, before_reserve=True)
        outputs = shared.attach(attempt_id)  # before Reserve: a local prefill's token may come at once
        sampling = sampling_to_proto(params)
        reserve = worker_pb2.ReserveRequest(
            request_id=attempt_id,
            prompt_token_ids=prompt,
            sampling=sampling,
            local_prefill=prefill is None,
            subscriber=self.subscriber,
        )
        prefill_task = None
        finished = False
        state = _AttemptState()
        try:
            try:
                reserved = await d_stub.Reserve(reserve, timeout=RESERVE_TIMEOUT_S)
            except grpc.aio.AioRpcError as exc:
                self._decode_failed(decode, exc, failures, before_reserve=True)
            if prefill is not None:
                self.num_remote_prefills += 1
                prefill_task = asyncio.create_task(
                    self._prefill(placement, attempt_id, prompt, sampling, reserved, d_stub, failures, state)
                )
            else:
                self.num_local_prefills += 1
            async for out in outputs:
                if not state.emitted and out.finish_reason in ("abort", "error") and not out.new_token_ids:
                    failures.last_error = (
                        out.error or f"decode worker {d_id} ended the request ({out.finish_reason})"
                    )
                    raise _RetryAttempt()
                state.emitted = True
                finished = out.finished
                yield out
                if finished:
                    return
        except grpc.aio.AioRpcError as exc:
            if state.emitted:
                self.directory.mark_failed(d_id)
                yield EngineOutput(
                    attempt_id,
                    [],
                    finish_reason="error",
                    error=f"decode worker {d_id} failed: {exc.details()}",
                )
                return
            self._decode_failed(decode, exc, failures, before_reserve=False)
        finally:
            shared.detach(attempt_id)
            if not finished:  # the client went away or the attempt failed (perhaps while reserving)
                self._aborts.spawn(_abort_quietly(d_stub, attempt_id, "the router gave up on this attempt"))
            if prefill_task is not None and not prefill_task.done():
                if finished:  # its prefill call only waits for the handoff's ack: let it end by itself
                    self._aborts.spawn(_settle(prefill_task, PREFILL_SETTLE_TIMEOUT_S))
                else:
                    prefill_task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await prefill_task

    def _outputs_of(self, decode: WorkerRecord, d_stub: object) -> Subscription[EngineOutput]:
        key = (decode.info.worker_id, decode.info.grpc_address)
        shared = self._outputs.get(key)
        if shared is None:
            shared = self._outputs[key] = decode_outputs(d_stub, self.subscriber, decode.info.worker_id)
        return shared

    async def _prefill(
        self,
        placement: Placement,
        attempt_id: str,
        prompt: list[int],
        sampling: object,
        reserved: worker_pb2.ReserveResponse,
        d_stub: object,
        failures: _Failures,
        state: _AttemptState,
    ) -> None:
        """Run the prefill; if it fails, abort the decode attempt so its stream ends and the request is
        placed again (without this prefill worker). If the decode worker already streamed a token (the
        handoff committed and only the acknowledgement was lost), the attempt goes on."""
        prefill = placement.prefill
        assert prefill is not None
        p_id = prefill.info.worker_id
        try:
            await self.directory.prefill_stub(prefill).Prefill(
                worker_pb2.PrefillRequest(
                    request_id=attempt_id,
                    prompt_token_ids=prompt,
                    sampling=sampling,
                    decode_worker_id=reserved.worker_id,
                    transfer_address=reserved.transfer_address,
                    block_ids=reserved.block_ids,
                ),
                timeout=PREFILL_TIMEOUT_S,
            )
        except grpc.aio.AioRpcError as exc:
            failures.prefill.add(p_id)
            failures.last_error = f"prefill worker {p_id}: {exc.code().name} {exc.details()}"
            if exc.code() is grpc.StatusCode.UNAVAILABLE:
                self.directory.mark_failed(p_id)
            if not state.emitted:
                await _abort_quietly(d_stub, attempt_id, failures.last_error)
        finally:
            if placement.queued is not None:
                placement.queued.release()

    def _decode_failed(
        self, decode: WorkerRecord, exc: grpc.aio.AioRpcError, failures: _Failures, before_reserve: bool
    ) -> None:
        d_id = decode.info.worker_id
        code = exc.code()
        if code is grpc.StatusCode.INVALID_ARGUMENT:
            raise ValueError(exc.details())
        if code is grpc.StatusCode.RESOURCE_EXHAUSTED and before_reserve:
            failures.decode.add(d_id)
            failures.full.add(d_id)
            failures.last_error = exc.details() or f"decode worker {d_id} is full"
            raise _RetryAttempt()
        if code in _RETRYABLE or code is grpc.StatusCode.CANCELLED:
            failures.decode.add(d_id)
            failures.last_error = f"decode worker {d_id}: {code.name} {exc.details()}"
            if code is grpc.StatusCode.UNAVAILABLE:
                self.directory.mark_failed(d_id)
            raise _RetryAttempt()
        raise UnavailableError(f"decode worker {d_id}: {code.name} {exc.details()}")

    async def cluster_stats(self) -> router_pb2.ClusterStats:
        """Every live worker's GetStats, asked concurrently, summed; and this router's placements."""
        decodes, prefills, replies = await self._ask_every_worker("GetStats", worker_pb2.GetStatsRequest())
        answered = [r for r in replies if isinstance(r, worker_pb2.WorkerStats)]
        stats = summed_stats(answered)
        stats.num_decode_workers = len(decodes)
        stats.num_prefill_workers = len(prefills)
        stats.num_unreachable_workers = len(replies) - len(answered)
        stats.num_remote_prefills = self.num_remote_prefills
        stats.num_local_prefills = self.num_local_prefills
        stats.num_overflow_prefills = self.num_overflow_prefills
        stats.num_retries = self.num_retries
        return stats

    async def reset_prefix_cache(self) -> router_pb2.ResetClusterPrefixCacheResponse:
        """Every live worker's ResetPrefixCache, asked concurrently."""
        _, _, replies = await self._ask_every_worker("ResetPrefixCache", worker_pb2.ResetPrefixCacheRequest())
        answered = [r for r in replies if isinstance(r, worker_pb2.ResetPrefixCacheResponse)]
        return router_pb2.ResetClusterPrefixCacheResponse(
            num_blocks=sum(r.num_blocks for r in answered),
            num_workers=len(answered),
            num_unreachable_workers=len(replies) - len(answered),
        )

    async def _ask_every_worker(
        self, method: str, message: object
    ) -> tuple[list[WorkerRecord], list[WorkerRecord], list[object]]:
        """`method` (a unary RPC both worker services have) on every live worker at once: the live
        decode and prefill workers, and each one's reply or exception, decode workers first."""
        decodes = await self.directory.live("decode")
        prefills = await self.directory.live("prefill")
        stubs = [self.directory.decode_stub(w) for w in decodes]
        stubs += [self.directory.prefill_stub(w) for w in prefills]
        replies = await asyncio.gather(
            *(getattr(stub, method)(message, timeout=STATS_TIMEOUT_S) for stub in stubs),
            return_exceptions=True,
        )
        return decodes, prefills, list(replies)

    async def close(self) -> None:
        for shared in self._outputs.values():
            await shared.close()
        await self._aborts.wait(5)
        await self.directory.close()


async def _settle(task: asyncio.Task[None], timeout_s: float) -> None:
    """Wait for a finished request's prefill call to end (it reports its own failures); cancel it
    after `timeout_s`."""
    try:
        await asyncio.wait_for(task, timeout_s)
    except TimeoutError:
        logger.warning("a finished request's prefill call did not end within %g s: cancelled", timeout_s)
    except Exception:
        logger.debug("a finished request's prefill call failed", exc_info=True)


async def _abort_quietly(d_stub: object, attempt_id: str, reason: str) -> None:
    with contextlib.suppress(grpc.aio.AioRpcError):
        await d_stub.Abort(  # type: ignore[attr-defined]
            worker_pb2.AbortRequest(request_id=attempt_id, reason=reason), timeout=RESERVE_TIMEOUT_S
        )


def _renamed(out: EngineOutput, request_id: str) -> EngineOutput:
    return EngineOutput(
        request_id,
        out.new_token_ids,
        out.new_logprobs,
        finish_reason=out.finish_reason,
        stop_reason=out.stop_reason,
        error=out.error,
        num_prompt_tokens=out.num_prompt_tokens,
        num_cached_tokens=out.num_cached_tokens,
    )
