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

from baton.shared.engine.outputs import EngineOutput
from baton.shared.engine.sampling_params import SamplingParams
from baton.shared.models import ModelConfig
from baton.shared.rpc import common_pb2, router_pb2, router_pb2_grpc
from baton.shared.rpc_convert import finish_reason_to_proto, logprobs_to_proto, sampling_from_proto
from baton.shared.tokenizer import IncrementalDetokenizer, Tokenizer

logger = logging.getLogger(__name__)


class Backend(Protocol):
    def generate(
        self, request_id: str, prompt: list[int], params: SamplingParams
    ) -> AsyncIterator[EngineOutput]: ...

    async def cluster_stats(self) -> router_pb2.ClusterStats: ...

    async def close(self) -> None: ...


class RouterService(router_pb2_grpc.RouterServicer):
    def __init__(self, model_dir: Path, backend: Backend, max_model_len: int | None = None) -> None:
        self.model_config = ModelConfig.from_dir(model_dir)
        self.model_name = model_dir.name
        self.tokenizer = Tokenizer.from_dir(model_dir)
        self.max_model_len = max_model_len or self.model_config.max_position_embeddings
        self.backend = backend
        self._active: dict[str, asyncio.Task[object]] = {}

    async def Generate(
        self, request: router_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[router_pb2.GenerateResponse]:
        rid = request.request_id or uuid.uuid4().hex
        prompt = self._prompt(request)
        params = sampling_from_proto(request.sampling)
        if rid in self._active:
            raise ValueError(f"request_id {rid!r} is already in flight")
        detok = (
            IncrementalDetokenizer(self.tokenizer, prompt, params.skip_special_tokens)
            if self.tokenizer is not None
            else None
        )
        outputs: asyncio.Queue[EngineOutput | BaseException | None] = asyncio.Queue()
        pump = asyncio.create_task(self._pump(rid, prompt, params, outputs))
        self._active[rid] = pump
        num_completion = 0
        finish = "cancelled by the caller"
        logger.info("request %s: %d prompt tokens, max_tokens %d", rid, len(prompt), params.max_tokens)
        try:
            while (out := await outputs.get()) is not None:
                if isinstance(out, BaseException):
                    finish = f"failed ({out})"
                    raise out
                num_completion += len(out.new_token_ids)
                if out.finished:
                    finish = out.finish_reason or "finished"
                yield self._response(rid, out, detok, params, len(prompt), num_completion)
        finally:
            logger.info("request %s: %s after %d tokens", rid, finish, num_completion)
            self._active.pop(rid, None)
            if not pump.done():  # the client went away: stop the request everywhere
                pump.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await pump

    async def _pump(
        self,
        rid: str,
        prompt: list[int],
        params: SamplingParams,
        outputs: asyncio.Queue[EngineOutput | BaseException | None],
    ) -> None:
        """Move the backend's outputs to the Generate stream; Abort cancels this task, which ends the
        stream with finish_reason ABORT."""
        try:
            async for out in self.backend.generate(rid, prompt, params):
                outputs.put_nowait(out)
                if out.finished:
                    break
        except asyncio.CancelledError:
            outputs.put_nowait(EngineOutput(rid, [], finish_reason="abort", num_prompt_tokens=len(prompt)))
        except Exception as exc:
            outputs.put_nowait(exc)
        outputs.put_nowait(None)

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

    def _response(
        self,
        rid: str,
        out: EngineOutput,
        detok: IncrementalDetokenizer | None,
        params: SamplingParams,
        num_prompt: int,
        num_completion: int,
    ) -> router_pb2.GenerateResponse:
        msg = router_pb2.GenerateResponse(
            request_id=rid,
            token_ids=out.new_token_ids,
            text=_text_of(out, detok),
            finish_reason=finish_reason_to_proto(out.finish_reason),
            error=out.error or "",
            usage=common_pb2.Usage(
                prompt_tokens=num_prompt,
                completion_tokens=num_completion,
                cached_prompt_tokens=out.num_cached_tokens,
            ),
        )
        if out.new_logprobs is not None:
            positions = logprobs_to_proto(out.new_token_ids, out.new_logprobs, params.logprobs or 0)
            if self.tokenizer is not None:
                for position in positions:
                    for entry in (position.sampled, *position.top):
                        entry.text = self.tokenizer.decode([entry.token_id], skip_special_tokens=False)
            msg.logprobs.extend(positions)
        if out.stop_reason is not None:
            msg.stop_token_id = out.stop_reason
        return msg


def _text_of(out: EngineOutput, detok: IncrementalDetokenizer | None) -> str:
    """The text the output's tokens add; the last output also releases any text held back."""
    if detok is None:
        return ""
    text = detok.push(out.new_token_ids)
    return text + detok.flush() if out.finished else text
