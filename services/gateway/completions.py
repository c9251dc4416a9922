"""POST /v1/completions: prompts (text, token ids, or a batch of either) → n choices each."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from baton.services.gateway.context import GatewayContext
from baton.services.gateway.errors import bad_request
from baton.services.gateway.generation import ChoiceEvent, merged_events
from baton.services.gateway.prepare import (
    DEFAULT_COMPLETION_MAX_TOKENS,
    check_token_ids,
    choice_plans,
    max_tokens_for,
)
from baton.services.gateway.protocol import CompletionRequest
from baton.services.gateway.responses import (
    completion_choice,
    completion_chunk,
    completion_logprobs,
)
from baton.services.gateway.serving import first_event, gather_or_fail, sse_response
from baton.services.gateway.usage import UsageTally


async def create_completion(ctx: GatewayContext, req: CompletionRequest, request: Request) -> Response:
    model = await ctx.router.served_model(req.model)
    rid: str = request.state.request_id
    prompts: list[list[int]] = []
    echoes: list[str] = []
    for i, prompt in enumerate(req.prompts):
        param = "prompt" if len(req.prompts) == 1 else f"prompt.{i}"
        if isinstance(prompt, str):
            if not prompt:
                raise bad_request(f"{param} is empty", param=param)
            ids = ctx.encode(prompt, param)
            echoes.append(prompt)
        else:
            check_token_ids(prompt, model.vocab_size, param)
            ids = prompt
            echoes.append(ctx.decode(ids) if req.echo else "")
        if not ids:
            raise bad_request(f"{param} is empty: it must have at least one token", param=param)
        prompts.append(ids)
    explicit = req.max_tokens if "max_tokens" in req.model_fields_set else None
    default = DEFAULT_COMPLETION_MAX_TOKENS
    max_tokens = [max_tokens_for(len(ids), explicit, default, model.max_model_len) for ids in prompts]
    plans = choice_plans(rid, prompts, req, max_tokens, req.logprobs, model.name)
    ctx.admit(rid, "completions", req, prompts)
    tally = UsageTally(prompts, req.n)
    events = merged_events(ctx.router.generate, plans, ctx.metrics.on_choice_finished)
    created = int(time.time())
    header = {"id": f"cmpl-{rid}", "object": "text_completion", "created": created, "model": model.name}
    echo_of = [echoes[c // req.n] if req.echo else "" for c in range(len(plans))]
    if not req.stream:
        results = await gather_or_fail(request, events, len(plans))
        for r in results:
            tally.add(r.index, r.usage)
        choices = [completion_choice(r, echo_of[r.index], req.logprobs is not None) for r in results]
        return JSONResponse({**header, "choices": choices, "usage": tally.body()})

    first = await first_event(request, events)
    offsets = [len(e) for e in echo_of]
    started = [False] * len(plans)

    def render(event: ChoiceEvent) -> Iterable[dict[str, Any]]:
        prefix = "" if started[event.index] else echo_of[event.index]
        started[event.index] = True
        logprobs = None
        if req.logprobs is not None:
            logprobs, offsets[event.index] = completion_logprobs(event.logprobs, offsets[event.index])
        tally.add(event.index, event.usage)
        if event.text or prefix or event.finish_reason is not None or event.logprobs:
            yield completion_chunk(header, event, prefix, logprobs)

    def closing() -> Iterable[dict[str, Any]]:
        if req.include_usage:
            yield {**header, "choices": [], "usage": tally.body()}

    return sse_response(rid, [], first, events, render, closing)
