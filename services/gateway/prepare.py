"""From a validated OpenAI request to the Router requests it becomes: tokenized prompts checked against
the context length, sampling parameters checked by the engine's own rules, one plan per choice."""

from __future__ import annotations

from baton.services.gateway.errors import bad_request
from baton.services.gateway.generation import ChoicePlan
from baton.services.gateway.protocol import INT64_MAX, SamplingFields
from baton.shared.engine.sampling_params import SamplingParams
from baton.shared.rpc import router_pb2
from baton.shared.rpc_convert import sampling_to_proto

DEFAULT_COMPLETION_MAX_TOKENS = 16


def max_tokens_for(
    num_prompt_tokens: int, requested: int | None, default: int | None, max_model_len: int
) -> int:
    """The request's token budget: an explicit value must fit the context; a default is clipped to it."""
    room = max_model_len - num_prompt_tokens
    if room < 1:
        raise bad_request(
            f"This model's maximum context length is {max_model_len} tokens; the prompt has "
            f"{num_prompt_tokens} tokens (prompt plus at least one generated token must fit)",
            param="messages" if default is None else "prompt",
            code="context_length_exceeded",
        )
    if requested is None:
        return room if default is None else min(default, room)
    if requested > room:
        raise bad_request(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{num_prompt_tokens + requested} tokens ({num_prompt_tokens} in the prompt, {requested} in "
            "the completion). Please reduce the length of the prompt or completion.",
            param="max_tokens",
            code="context_length_exceeded",
        )
    return requested


def check_token_ids(prompt: list[int], vocab_size: int, param: str) -> None:
    bad = [t for t in prompt if t >= vocab_size]
    if bad:
        raise bad_request(
            f"{param}: token ids {bad[:5]} are outside the vocabulary [0, {vocab_size})", param=param
        )


def sampling_for(
    req: SamplingFields, max_tokens: int, logprobs: int | None, choice: int
) -> router_pb2.SamplingParams:
    """The engine's SamplingParams (its checks apply) for choice `choice`: with a seed, choice i uses
    seed + i, so the choices differ and a repeated request repeats them all."""
    seed = None if req.seed is None else _wrap_int64(req.seed + choice)
    try:
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=req.top_k or 0,
            min_p=req.min_p or 0.0,
            seed=seed,
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
            stop_token_ids=list(req.stop_token_ids or []),
            ignore_eos=req.ignore_eos,
            min_tokens=req.min_tokens,
            logprobs=logprobs,
            skip_special_tokens=req.skip_special_tokens,
        )
    except ValueError as exc:  # the engine's messages start with the field's name
        field = str(exc).split(" ", 1)[0]
        raise bad_request(str(exc), param=field if field.isidentifier() else None) from exc
    return sampling_to_proto(params)


def choice_plans(
    request_id: str,
    prompts: list[list[int]],
    req: SamplingFields,
    max_tokens: list[int],
    logprobs: int | None,
    model: str,
) -> list[ChoicePlan]:
    """n plans per prompt, indexed prompt-major (choice index = prompt index * n + i), as OpenAI does."""
    plans = []
    total = len(prompts) * req.n
    for p, prompt in enumerate(prompts):
        for i in range(req.n):
            index = p * req.n + i
            rid = request_id if total == 1 else f"{request_id}-{index}"
            generate = router_pb2.GenerateRequest(
                request_id=rid, sampling=sampling_for(req, max_tokens[p], logprobs, i), model=model
            )
            generate.token_ids.ids.extend(prompt)
            plans.append(ChoicePlan(index, generate, req.stop_strings, req.include_stop_str_in_output))
    return plans


def _wrap_int64(value: int) -> int:
    return (value + INT64_MAX + 1) % 2**64 - INT64_MAX - 1
