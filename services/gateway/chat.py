"""POST /v1/chat/completions: a conversation, rendered with the model's chat template → n choices."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from baton.services.gateway.context import GatewayContext
from baton.services.gateway.generation import ChoiceEvent, merged_events
from baton.services.gateway.prepare import choice_plans, max_tokens_for
from baton.services.gateway.protocol import ChatCompletionRequest
from baton.services.gateway.responses import chat_choice, chat_chunk, chat_role_chunk
from baton.services.gateway.serving import first_event, gather_or_fail, sse_response
from baton.services.gateway.usage import UsageTally


async def create_chat_completion(
    ctx: GatewayContext, req: ChatCompletionRequest, request: Request
) -> Response:
    model = await ctx.router.served_model(req.model)
    rid: str = request.state.request_id
    prompt = ctx.encode_chat(req.conversation(), req.add_generation_prompt)
    max_tokens = max_tokens_for(len(prompt), req.requested_max_tokens, None, model.max_model_len)
    plans = choice_plans(rid, [prompt], req, [max_tokens], req.num_logprobs, model.name)
    ctx.admit(rid, "chat", req, [prompt])
    tally = UsageTally([prompt], req.n)
    events = merged_events(ctx.router.generate, plans, ctx.metrics.on_choice_finished)
    created = int(time.time())
    if not req.stream:
        results = await gather_or_fail(request, events, len(plans))
        for r in results:
            tally.add(r.index, r.usage)
        return JSONResponse(
            {
                "id": f"chatcmpl-{rid}",
                "object": "chat.completion",
                "created": created,
                "model": model.name,
                "choices": [chat_choice(r, req.logprobs) for r in results],
                "usage": tally.body(),
            }
        )

    first = await first_event(request, events)
    header = {
        "id": f"chatcmpl-{rid}",
        "object": "chat.completion.chunk",
        "created": created,
        "model": model.name,
    }

    def render(event: ChoiceEvent) -> Iterable[dict[str, Any]]:
        tally.add(event.index, event.usage)
        if event.text or event.finish_reason is not None or (req.logprobs and event.logprobs):
            yield chat_chunk(header, event, req.logprobs)

    def closing() -> Iterable[dict[str, Any]]:
        if req.include_usage:
            yield {**header, "choices": [], "usage": tally.body()}

    opening = [chat_role_chunk(header, plan.index) for plan in plans]
    return sse_response(rid, opening, first, events, render, closing)
