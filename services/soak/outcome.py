"""How one soak request ended, from what its client saw (pure: the unit tests feed it synthetic
responses).

- completed: HTTP 200 and every choice has a finish_reason of stop or length; a stream also ends
  with exactly one `data: [DONE]`, after which nothing comes.
- cancelled: the client went away on purpose before the answer ended.
- failed (with a clear error): an HTTP 4xx/5xx whose body is an OpenAI error object, or a stream
  whose last event before `[DONE]` is one (README, "Faults").
- lost: anything else, e.g. no answer by the deadline, a connection closed or reset without an error,
  a stream cut off before `[DONE]`, a malformed body, a choice without its finish_reason. A soak
  must lose none.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Literal

OutcomeKind = Literal["completed", "cancelled", "failed", "lost"]
FINISHED = ("stop", "length")
"""The finish reasons of a choice that ended normally."""
MAX_DETAIL_CHARS = 200
_IDS = re.compile(r"\b(?:[0-9a-f]{16,}|[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})\b")


@dataclass
class Observation:
    """What the client saw of one request."""

    stream: bool
    num_choices: int = 1
    status: int | None = None
    """HTTP status; None when no response head arrived."""
    body: bytes = b""
    """The body as far as it was read."""
    cancelled: bool = False
    """The client went away on purpose before the answer ended."""
    error: str | None = None
    """Why the exchange broke off (transport error, deadline), if it did."""


@dataclass(frozen=True)
class Outcome:
    kind: OutcomeKind
    detail: str = ""
    """failed: `HTTP <status> <type>: <message>` (or `stream <type>: <message>`), request ids blanked
    so that equal errors count together; lost: what was wrong."""


def classify(seen: Observation) -> Outcome:
    if seen.cancelled:
        return Outcome("cancelled")
    if seen.error is not None:
        return _lost(seen.error)
    if seen.status is None:
        return _lost("no response")
    if seen.status != 200:
        return _error_response(seen.status, seen.body)
    if seen.stream:
        return _stream(seen.body, seen.num_choices)
    return _whole(seen.body, seen.num_choices)


def _error_response(status: int, body: bytes) -> Outcome:
    error = _error_object(_json(body))
    if error is None:
        return _lost(f"HTTP {status} without an OpenAI error object: {body[:100]!r}")
    return _failed(f"HTTP {status} {error}")


def _whole(body: bytes, num_choices: int) -> Outcome:
    payload = _json(body)
    if not isinstance(payload, dict) or not isinstance(payload.get("choices"), list):
        return _lost(f"HTTP 200 whose body is not a response object: {body[:100]!r}")
    finish = {c.get("index"): c.get("finish_reason") for c in payload["choices"] if isinstance(c, dict)}
    return _finished(finish, num_choices)


def _stream(body: bytes, num_choices: int) -> Outcome:
    if not body.endswith(b"\n\n"):
        return _lost(f"stream cut off mid-event after {len(body)} bytes")
    events = body[:-2].split(b"\n\n")
    if any(not e.startswith(b"data: ") for e in events):
        return _lost("stream with an event that is not `data: ...`")
    data = [e.removeprefix(b"data: ") for e in events]
    if b"[DONE]" in data[:-1]:
        return _lost("stream went on after [DONE]")
    if data[-1] != b"[DONE]":
        return _lost(f"stream ended without [DONE] after {len(data)} events")
    parsed = [_json(d) for d in data[:-1]]
    payloads = [p for p in parsed if isinstance(p, dict)]
    if len(payloads) != len(parsed):
        return _lost("stream with an event that is not a JSON object")
    errors = [i for i, p in enumerate(payloads) if "error" in p]
    if errors:
        error = _error_object(payloads[errors[0]])
        if error is None:
            return _lost(f"stream with a malformed error event: {data[errors[0]][:100]!r}")
        if errors != [len(payloads) - 1]:
            return _lost(f"stream went on after its error event ({error})")
        return _failed(f"stream {error}")
    finish: dict[Any, Any] = {}
    for payload in payloads:
        choices = payload.get("choices", [])
        if not isinstance(choices, list) or not all(isinstance(c, dict) for c in choices):
            return _lost(f"stream with malformed choices: {choices!r:.100}")
        for choice in choices:
            index, reason = choice.get("index"), choice.get("finish_reason")
            if reason is not None or index not in finish:
                finish[index] = reason
    return _finished(finish, num_choices)


def _finished(finish: dict[Any, Any], num_choices: int) -> Outcome:
    """Completed if exactly choices 0..n-1 each ended with stop or length."""
    if set(finish) != set(range(num_choices)):
        return _lost(f"choices {sorted(finish, key=str)} where {num_choices} were asked for")
    unfinished = {i: r for i, r in finish.items() if r not in FINISHED}
    if unfinished:
        return _lost(f"choices ended without stop or length: {unfinished}")
    return Outcome("completed")


def _error_object(payload: object) -> str | None:
    """`<type>: <message>` of an OpenAI error object `{"error": {"message", "type", ...}}`."""
    error = payload.get("error") if isinstance(payload, dict) else None
    if not isinstance(error, dict):
        return None
    message, kind = error.get("message"), error.get("type")
    if not isinstance(message, str) or not message or not isinstance(kind, str):
        return None
    return f"{kind}: {message}"


def _json(data: bytes) -> object:
    try:
        return json.loads(data)
    except ValueError:
        return None


def _failed(detail: str) -> Outcome:
    return Outcome("failed", _IDS.sub("<id>", detail)[:MAX_DETAIL_CHARS])


def _lost(detail: str) -> Outcome:
    return Outcome("lost", detail[:MAX_DETAIL_CHARS])
