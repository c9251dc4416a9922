"""The public Router API: validates and tokenizes at the edge, hands token ids to a backend
(disaggregated workers or a colocated engine) and streams text deltas, logprobs and usage back."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Protocol

import grpc

from baton.services.lifecycle import request_logger
from baton.shared.engine.outputs import EngineOutput
from baton.shared.engine.sampling_params import SamplingParams
from baton.shared.grpc_server import CapacityError, UnavailableError, error_message, status_for
from baton.shared.models.model_config import ModelConfig
from baton.shared.output_mux import Failed, Subscribers
from baton.shared.rpc import common_pb2, router_pb2, router_pb2_grpc
from baton.shared.rpc_convert import finish_reason_to_proto, logprobs_to_proto, sampling_from_proto
from baton.shared.tokenizer import IncrementalDetokenizer, Tokenizer

logger = logging.getLogger(__name__)
request_log = request_logger(__name__)


class Backend(Protocol):
    def generate(
        self, request_id: str, prompt: list[int], params: SamplingParams
    ) -> AsyncIterator[EngineOutput]: ...

    async def cluster_stats(self) -> router_pb2.ClusterStats: ...

    async def reset_prefix_cache(self) -> router_pb2.ResetClusterPrefixCacheResponse: ...

    async def close(self) -> None: ...


class RouterService(router_pb2_grpc.RouterServicer):
    def __init__(
        self,
        model_dir: Path,
        backend: Backend,
        max_model_len: int | None = None,
        max_pending_requests: int = 4096,
    ) -> None:
        self.model_config = ModelConfig.from_dir(model_dir)
        self.model_name = model_dir.name
        self.tokenizer = Tokenizer.from_dir(model_dir)
        self.max_model_len = max_model_len or self.model_config.max_position_embeddings
        self.backend = backend
        self.max_pending_requests = max_pending_requests
        self._active: dict[str, asyncio.Task[None]] = {}  # by request id, until the backend is done
        self._subscribers = Subscribers(self._abort_orphans)
        self._writers: dict[str, _ResponseWriter] = {}  # submitted requests, until their end is sent

    async def Generate(
        self, request: router_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[router_pb2.GenerateResponse]:
        rid = request.request_id or uuid.uuid4().hex
        writer = self._start_checks(rid, request)
        outputs: asyncio.Queue[EngineOutput | BaseException] = asyncio.Queue()
        pump = self._start(rid, writer, outputs)
        try:
            while True:
                out = await outputs.get()
                if isinstance(out, BaseException):
                    writer.finish = f"failed ({out})"
                    raise out
                yield writer.response(out)
                if out.finished:
                    return
        finally:
            writer.log_end()
            if not pump.done():  # the client went away: stop the request everywhere
                pump.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await pump

    async def Subscribe(
        self, request: router_pb2.SubscribeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[router_pb2.GenerateResponseBatch]:
        # the first (empty) message says the subscription is in place: Submit may name it
        opening = router_pb2.GenerateResponseBatch()
        async for message in self._subscribers.stream(request.subscriber, opening, self._response_batch):
            yield message

    async def Submit(
        self, request: router_pb2.SubmitRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.SubmitResponse:
        mux = self._subscribers.get(request.subscriber)
        if mux is None:
            raise UnavailableError(f"no Subscribe stream is open for subscriber {request.subscriber!r}")
        rid = request.request.request_id
        if not rid:
            raise ValueError("request.request_id must be set: the subscriber's stream names requests by it")
        self._writers[rid] = writer = self._start_checks(rid, request.request)
        self._start(rid, writer, mux.attach(rid))
        return router_pb2.SubmitResponse()

    async def drain(self, timeout_s: float) -> None:
        """Until every request ended and its end was sent (or `timeout_s` passed), then end the
        subscribers' streams (they never end by themselves: the server's stop would wait for them);
        requests still running then are aborted."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while (self._active or self._writers) and loop.time() < deadline:
            await asyncio.sleep(0.02)
        self._subscribers.close_all()

    def _start_checks(self, rid: str, request: router_pb2.GenerateRequest) -> _ResponseWriter:
        """The request's response writer, once there is room for it (CapacityError if not, before any
        work), its input is valid and its id free (ValueError if not)."""
        if len(self._active) >= self.max_pending_requests:
            raise CapacityError(
                f"the Router has {len(self._active)} requests in flight, its limit "
                f"(--max-pending-requests {self.max_pending_requests}): retry later"
            )
        prompt = self._prompt(request)
        params = sampling_from_proto(request.sampling)
        if rid in self._active or rid in self._writers:
            raise ValueError(f"request_id {rid!r} is already in flight")
        return _ResponseWriter(rid, prompt, params, self.tokenizer)

    def _start(self, rid: str, writer: _ResponseWriter, sink: _OutputSink) -> asyncio.Task[None]:
        request_log.info(
            "request %s: %d prompt tokens, max_tokens %d", rid, len(writer.prompt), writer.params.max_tokens
        )
        pump = self._active[rid] = asyncio.create_task(self._pump(rid, writer, sink))
        return pump

    async def _pump(self, rid: str, writer: _ResponseWriter, sink: _OutputSink) -> None:
        """Move the backend's outputs to the request's sink; Abort cancels this task, which ends the
        request with finish_reason ABORT."""
        try:
            async for out in self.backend.generate(rid, writer.prompt, writer.params):
                sink.put_nowait(out)
                if out.finished:
                    return
            sink.put_nowait(RuntimeError("the backend ended the request without a last output"))
        except asyncio.CancelledError:
            sink.put_nowait(
                EngineOutput(rid, [], finish_reason="abort", num_prompt_tokens=len(writer.prompt))
            )
        except Exception as exc:
            sink.put_nowait(exc)
        finally:
            self._active.pop(rid, None)

    def _response_batch(self, batch: list[EngineOutput | Failed]) -> router_pb2.GenerateResponseBatch:
        message = router_pb2.GenerateResponseBatch()
        for item in batch:
            writer = self._writers[item.request_id]
            if isinstance(item, Failed):
                code = status_for(item.error)
                message.failures.append(
                    router_pb2.RequestFailure(
                        request_id=item.request_id, code=code.value[0], message=error_message(item.error)
                    )
                )
                writer.finish = f"failed ({item.error})"
            else:
                message.responses.append(writer.response(item))
                if not item.finished:
                    continue
            del self._writers[item.request_id]
            writer.log_end()
        return message

    def _abort_orphans(self, request_ids: set[str]) -> None:
        """A subscriber is gone: its requests have no reader, so they are aborted."""
        for rid in request_ids:
            writer = self._writers.pop(rid, None)
            if writer is not None:
                writer.finish = "aborted: its subscriber went away"
                writer.log_end()
            pump = self._active.get(rid)
            if pump is not None:
                pump.cancel("its subscriber went away")

    async def Abort(
        self, request: router_pb2.AbortRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.AbortResponse:
        task = self._active.get(request.request_id)
        if task is None:
            return router_pb2.AbortResponse(found=False)
        task.cancel("aborted by request")
        return router_pb2.AbortResponse(found=True)

    async def ListModels(
        self, request: router_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.ListModelsResponse:
        return router_pb2.ListModelsResponse(
            models=[
                router_pb2.ModelInfo(
                    name=self.model_name,
                    max_model_len=self.max_model_len,
                    architecture=self.model_config.architecture,
                    vocab_size=self.model_config.vocab_size,
                )
            ]
        )

    async def GetClusterStats(
        self, request: router_pb2.GetClusterStatsRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.ClusterStats:
        return await self.backend.cluster_stats()

    async def ResetPrefixCache(
        self, request: router_pb2.ResetClusterPrefixCacheRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.ResetClusterPrefixCacheResponse:
        reply = await self.backend.reset_prefix_cache()
        logger.info(
            "prefix caches reset: %d blocks on %d workers (%d did not answer)",
            reply.num_blocks, reply.num_workers, reply.num_unreachable_workers,
        )  # fmt: skip
        return reply

    # -- edge ------------------------------------------------------------------------------------
    def _prompt(self, request: router_pb2.GenerateRequest) -> list[int]:
        """The prompt's token ids, validated (ValueError names the problem)."""
        if request.model and request.model != self.model_name:
            raise ValueError(
                f"model {request.model!r} is not served here; this Router serves {self.model_name!r}"
            )
        kind = request.WhichOneof("prompt")
        if kind is None:
            raise ValueError("prompt is missing: set text or token_ids")
        if kind == "text":
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer: send token_ids")
            prompt = self.tokenizer.encode(request.text)
        else:
            prompt = list(request.token_ids.ids)
        if not prompt:
            raise ValueError("prompt is empty: it must have at least one token")
        vocab = self.model_config.vocab_size
        bad = [t for t in prompt if t >= vocab]
        if bad:
            raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
        if len(prompt) >= self.max_model_len:
            raise ValueError(
                f"prompt has {len(prompt)} tokens, too long for max_model_len {self.max_model_len} "
                "(prompt plus at least one generated token)"
            )
        return prompt


class _OutputSink(Protocol):
    def put_nowait(self, item: EngineOutput | BaseException) -> None: ...


class _ResponseWriter:
    """One request's responses: the text its tokens add, logprobs with their text, usage so far."""

    def __init__(
        self, rid: str, prompt: list[int], params: SamplingParams, tokenizer: Tokenizer | None
    ) -> None:
        self.rid = rid
        self.prompt = prompt
        self.params = params
        self.finish = "cancelled by the caller"  # what ended it, for the log
        self._tokenizer = tokenizer
        self._detok = (
            IncrementalDetokenizer(tokenizer, prompt, params.skip_special_tokens)
            if tokenizer is not None
            else None
        )
        self._num_completion = 0

    def response(self, out: EngineOutput) -> router_pb2.GenerateResponse:
        self._num_completion += len(out.new_token_ids)
        if out.finished:
            self.finish = out.finish_reason or "finished"
        msg = router_pb2.GenerateResponse(
            request_id=self.rid,
            token_ids=out.new_token_ids,
            text=self._text_of(out),
            finish_reason=finish_reason_to_proto(out.finish_reason),
            error=out.error or "",
            usage=common_pb2.Usage(
                prompt_tokens=len(self.prompt),
                completion_tokens=self._num_completion,
                cached_prompt_tokens=out.num_cached_tokens,
            ),
        )
        if out.new_logprobs is not None:
            positions = logprobs_to_proto(out.new_token_ids, out.new_logprobs, self.params.logprobs or 0)
            if self._tokenizer is not None:
                for position in positions:
                    for entry in (position.sampled, *position.top):
                        entry.text = self._tokenizer.decode([entry.token_id], skip_special_tokens=False)
            msg.logprobs.extend(positions)
        if out.stop_reason is not None:
            msg.stop_token_id = out.stop_reason
        return msg

    def log_end(self) -> None:
        request_log.info("request %s: %s after %d tokens", self.rid, self.finish, self._num_completion)

    def _text_of(self, out: EngineOutput) -> str:
        """The text the output's tokens add; the last output also releases any text held back."""
        if self._detok is None:
            return ""
        text = self._detok.push(out.new_token_ids)
        return text + self._detok.flush() if out.finished else text
