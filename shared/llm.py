"""The offline API: `LLM(model=DIR).generate(prompts, SamplingParams(...))`, as vLLM users know it."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

from baton.shared.config import EngineConfig
from baton.shared.engine.engine_core import EngineCore
from baton.shared.engine.outputs import (
    CompletionOutput,
    EngineOutput,
    Logprob,
    PositionLogprobs,
    RequestOutput,
)
from baton.shared.engine.sampling_params import SamplingParams
from baton.shared.tokenizer import Tokenizer

PromptInput = str | Sequence[int]
Conversation = list[dict[str, Any]]


@dataclass(frozen=True)
class _Prompt:
    text: str | None
    token_ids: list[int]
    params: SamplingParams


class LLM:
    """Generates for a batch of prompts with continuous batching, paged KV and prefix caching.

    Keyword arguments are EngineConfig's fields (dtype, block_size, num_kv_blocks,
    max_num_batched_tokens, max_num_seqs, max_model_len, enable_prefix_caching, device, seed, ...).
    A model directory without tokenizer files works with token-id prompts; text is then empty.
    """

    def __init__(self, model: str, **kwargs: Any) -> None:
        self.config = EngineConfig(model=str(model), **kwargs)
        self.engine = EngineCore(self.config)
        self.tokenizer = Tokenizer.from_dir(self.config.model)
        self._ids = itertools.count()

    def generate(
        self,
        prompts: PromptInput | Sequence[PromptInput],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """One RequestOutput per prompt, in order. Prompts are strings or lists of token ids; every
        prompt is checked before any runs, so a bad one raises ValueError and nothing is queued."""
        batch = _as_prompt_list(prompts)
        params = _as_params_list(sampling_params, len(batch))
        queued = []
        for i, (prompt, sp) in enumerate(zip(batch, params, strict=True)):
            try:
                token_ids = self._encode(prompt)
                self.engine.validate(token_ids, sp)
            except ValueError as exc:
                raise ValueError(f"prompt {i}: {exc}") from exc
            queued.append(_Prompt(prompt if isinstance(prompt, str) else None, token_ids, sp))
        return self._run(queued)

    def chat(
        self,
        messages: Conversation | Sequence[Conversation],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        """Generate replies to one conversation (a list of {"role", "content"} dicts) or several,
        rendered with the model's chat template."""
        tokenizer = self._require_tokenizer("chat")
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = [tokenizer.encode_chat(list(c), add_generation_prompt) for c in conversations]
        return self.generate(prompts, sampling_params)

    def _encode(self, prompt: PromptInput) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt is empty: it must have at least one token")
            return self._require_tokenizer("text prompts").encode(prompt)
        return list(prompt)

    def _require_tokenizer(self, what: str) -> Tokenizer:
        if self.tokenizer is None:
            raise ValueError(
                f"{what} need a tokenizer, and {self.config.model} has no tokenizer.json; pass token ids"
            )
        return self.tokenizer

    def _run(self, prompts: list[_Prompt]) -> list[RequestOutput]:
        results: dict[str, RequestOutput] = {}
        try:
            for prompt in prompts:
                request_id = str(next(self._ids))
                self.engine.add_request(request_id, prompt.token_ids, prompt.params)
                logprobs: list[PositionLogprobs] | None = [] if prompt.params.logprobs is not None else None
                completion = CompletionOutput(0, "", [], logprobs, None)
                results[request_id] = RequestOutput(request_id, prompt.text, prompt.token_ids, [completion])
            while self.engine.has_unfinished():
                for out in self.engine.step():
                    self._accumulate(results[out.request_id], out)
        except BaseException:
            self.engine.abort_requests(list(results))  # Ctrl-C or a failure: leave nothing behind
            raise
        for result, prompt in zip(results.values(), prompts, strict=True):
            self._finalize(result, prompt.params)
        return list(results.values())

    @staticmethod
    def _accumulate(result: RequestOutput, out: EngineOutput) -> None:
        completion = result.outputs[0]
        completion.token_ids.extend(out.new_token_ids)
        if completion.logprobs is not None and out.new_logprobs:
            completion.logprobs.extend(out.new_logprobs)
        result.num_cached_tokens = out.num_cached_tokens
        if out.finished:
            completion.finish_reason = out.finish_reason
            completion.stop_reason = out.stop_reason
            result.error = out.error
            result.finished = True

    def _finalize(self, result: RequestOutput, params: SamplingParams) -> None:
        if self.tokenizer is None:
            return
        completion = result.outputs[0]
        completion.text = self.tokenizer.decode(completion.token_ids, params.skip_special_tokens)
        for position in completion.logprobs or []:
            for token_id, lp in position.items():
                position[token_id] = Logprob(lp.logprob, lp.rank, self.tokenizer.decode([token_id], False))

    def get_tokenizer(self) -> Tokenizer | None:
        return self.tokenizer


def _as_prompt_list(prompts: PromptInput | Sequence[PromptInput]) -> list[PromptInput]:
    if isinstance(prompts, str):
        return [prompts]
    items = list(prompts)
    if not items:
        raise ValueError("no prompts given")
    if all(isinstance(p, int) and not isinstance(p, bool) for p in items):
        return [cast("list[int]", items)]  # a single token-id prompt
    for i, p in enumerate(items):
        if not isinstance(p, str) and not (isinstance(p, Sequence) and not isinstance(p, (bytes, bytearray))):
            raise ValueError(f"prompt {i} must be a string or a list of token ids, got {type(p).__name__}")
    return cast("list[PromptInput]", items)


def _as_params_list(params: SamplingParams | Sequence[SamplingParams] | None, n: int) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams() for _ in range(n)]
    if isinstance(params, SamplingParams):
        return [params] * n
    params = list(params)
    if len(params) != n:
        raise ValueError(f"got {len(params)} sampling params for {n} prompts")
    return params
