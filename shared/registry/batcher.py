"""Per-request registry scripts made while earlier ones are on the wire travel to Redis together.

Under a burst, a worker runs a transition per request (Reserve, the handoff, the end) and the router
a prefix lookup: each round trip costs the event loop a pooled connection's checkout, a write and a
parse, on the loop whose process also runs the engine's step loop. Here a call that finds the link
idle goes at once, so a light load waits for nothing; calls made while `max_in_flight` round trips
are out queue, and the next round trip carries them all as one pipeline. Redis runs them in order,
each script still atomic on its own, and each caller gets its own reply: a refused transition fails
only its caller. A queued call whose caller was cancelled before it was sent is not sent.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import redis.asyncio as redis
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError


@dataclass(frozen=True)
class _Queued:
    script: AsyncScript
    args: list[str]
    reply: asyncio.Future[Any]


class ScriptBatcher:
    """Runs registered scripts (no keys, only args) for one client on one event loop."""

    def __init__(self, client: redis.Redis, max_in_flight: int = 1) -> None:
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight}")
        self._client = client
        self._max_in_flight = max_in_flight
        self._in_flight = 0
        self._queued: list[_Queued] = []
        self._sending: set[asyncio.Task[None]] = set()
        self.num_scripts = 0
        """Scripts run (counting those whose caller went away before they were sent)."""
        self.num_round_trips = 0
        """Round trips that carried them: fewer than num_scripts once calls overlapped."""

    async def run(self, script: AsyncScript, args: list[str]) -> Any:
        """`script`'s reply, or the error Redis (or the connection) gave for it."""
        self.num_scripts += 1
        if self._in_flight < self._max_in_flight and not self._queued:
            self._in_flight += 1
            self.num_round_trips += 1
            try:
                return await script(args=args)
            finally:
                self._in_flight -= 1
                self._send_queued()
        reply: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queued.append(_Queued(script, args, reply))
        return await reply

    async def drain(self) -> None:
        """Wait until every queued script has been answered (before the client closes)."""
        while self._sending:
            await asyncio.gather(*self._sending, return_exceptions=True)

    def _send_queued(self) -> None:
        if not self._queued or self._in_flight >= self._max_in_flight:
            return
        batch = [q for q in self._queued if not q.reply.done()]  # done: its caller was cancelled
        self._queued = []
        if not batch:
            return
        sending = self._send(batch)
        try:
            task = asyncio.get_running_loop().create_task(sending)
        except RuntimeError:  # no loop runs any more (a call ended while the loop was being torn down)
            sending.close()
            for queued in batch:
                _settle(queued.reply, error=RedisConnectionError("the registry's event loop is closed"))
            return
        self._in_flight += 1
        self.num_round_trips += 1
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _send(self, batch: list[_Queued]) -> None:
        try:
            pipe = self._client.pipeline(transaction=False)
            for queued in batch:
                pipe.evalsha(queued.script.sha, 0, *queued.args)
            replies = await pipe.execute(raise_on_error=False)
            for queued, reply in zip(batch, replies, strict=True):
                if isinstance(reply, NoScriptError):
                    # Redis lost its scripts (a restart or SCRIPT FLUSH): this one did not run
                    await _run_alone(queued)
                elif isinstance(reply, Exception):
                    _settle(queued.reply, error=reply)
                else:
                    _settle(queued.reply, reply)
        except Exception as exc:
            for queued in batch:
                _settle(queued.reply, error=exc)
        except BaseException:  # cancelled (the loop is closing): nobody may wait for ever
            for queued in batch:
                _settle(queued.reply, error=RedisConnectionError("the registry client was closed"))
            raise
        finally:
            self._in_flight -= 1
            self._send_queued()


async def _run_alone(queued: _Queued) -> None:
    """Run one script on its own; the script loads itself into Redis first if it must."""
    try:
        reply = await queued.script(args=queued.args)
    except Exception as exc:
        _settle(queued.reply, error=exc)
    else:
        _settle(queued.reply, reply)


def _settle(future: asyncio.Future[Any], result: Any = None, error: BaseException | None = None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
