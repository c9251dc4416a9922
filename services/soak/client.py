"""Sends one soak request over HTTP and records what came back, cancelling it as its plan says: the
connection is closed (the gateway sees the client disconnect) before the first byte, at a random
moment, or after some server-sent events. Every request has its own connection, so a keep-alive
connection the server closed cannot pass for a lost request."""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator

import httpx

from baton.services.soak.outcome import Observation
from baton.services.soak.workload import SoakRequest

_DONE = b"data: [DONE]\n\n"


@contextlib.asynccontextmanager
async def http_client(base_url: str, timeout_s: float) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the gateway at `base_url` that opens a connection per request."""
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=base_url, timeout=timeout_s, limits=limits) as client:
        yield client


async def send(client: httpx.AsyncClient, request: SoakRequest, timeout_s: float) -> Observation:
    """Send `request`, read the answer until it ends, its cancellation comes, or `timeout_s` passed
    (then `error` says so: a hang is a lost request)."""
    seen = Observation(stream=request.stream, num_choices=request.num_choices)
    cancel_after_s = request.cancel.after_s if request.cancel is not None else math.inf
    try:
        await asyncio.wait_for(_exchange(client, request, seen), min(cancel_after_s, timeout_s))
    except TimeoutError:
        if cancel_after_s <= timeout_s:
            seen.cancelled = True
        else:
            seen.error = f"no complete answer within {timeout_s:g} s"
    except httpx.HTTPError as exc:
        seen.error = f"{type(exc).__name__}: {exc}"
    return seen


async def _exchange(client: httpx.AsyncClient, request: SoakRequest, seen: Observation) -> None:
    after_events = request.cancel.after_events if request.cancel is not None else None
    async with client.stream("POST", request.path, json=request.body) as response:
        seen.status = response.status_code
        async for chunk in response.aiter_raw():
            seen.body += chunk
            if after_events is not None and seen.body.count(b"\n\n") >= after_events:
                if not seen.body.endswith(_DONE):  # ended already: nothing left to cancel
                    seen.cancelled = True
                return  # leaving the block closes the connection mid-stream
