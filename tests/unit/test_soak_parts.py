"""`baton soak`'s pure parts: the classifier on synthetic responses (anything that is neither an
answer nor a clear error is lost), the seeded workload, and what fails a report."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from typing import Any

import pytest

from baton.services.gateway.protocol import ChatCompletionRequest, CompletionRequest
from baton.services.soak.memory import MemoryTrack, rss_mib
from baton.services.soak.outcome import Observation, Outcome, classify
from baton.services.soak.report import failures
from baton.services.soak.workload import CHAT_PATH, Workload, WorkloadConfig


def _sse(*events: dict[str, Any] | str) -> bytes:
    return b"".join(f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n".encode() for e in events)


def _chunk(text: str, finish: str | None = None, index: int = 0) -> dict[str, Any]:
    return {"object": "text_completion", "choices": [{"index": index, "text": text, "finish_reason": finish}]}


ERROR = {"error": {"message": "generation failed: decode worker decode-0 failed", "type": "server_error"}}
USAGE = {"object": "text_completion", "choices": [], "usage": {"completion_tokens": 2}}


def _stream(body: bytes, num_choices: int = 1) -> Outcome:
    return classify(Observation(stream=True, num_choices=num_choices, status=200, body=body))


def test_a_stream_that_finishes_then_says_done_completed() -> None:
    assert _stream(_sse(_chunk("a"), _chunk("b", "length"), USAGE, "[DONE]")) == Outcome("completed")
    both = _sse(_chunk("a", index=1), _chunk("b", "stop", 0), _chunk("c", "length", 1), "[DONE]")
    assert _stream(both, num_choices=2) == Outcome("completed")


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (_sse(_chunk("a"), _chunk("b", "length")), "without [DONE]"),  # truncated: closed before [DONE]
        (_sse(_chunk("a"), _chunk("b", "length"), "[DONE]")[:-1], "cut off mid-event"),
        (_sse(_chunk("a"), "[DONE]"), "without stop or length"),  # [DONE] but no finish_reason
        (_sse(_chunk("a", "abort"), "[DONE]"), "without stop or length"),
        (_sse(_chunk("a", "length"), "[DONE]", _chunk("b")), "after [DONE]"),
        (_sse(_chunk("a", "length"), "[DONE]", "[DONE]"), "after [DONE]"),
        (_sse(_chunk("a"), ERROR), "without [DONE]"),  # an error event, then the connection closed
        (_sse(ERROR, _chunk("a", "length"), "[DONE]"), "after its error event"),
        (_sse({"error": "oops"}, "[DONE]"), "malformed error event"),
        (b'data: {"choices": [\n\ndata: [DONE]\n\n', "not a JSON object"),
        (b"event: x\n\ndata: [DONE]\n\n", "not `data: ...`"),
        (b"", "cut off mid-event"),
        (_sse(_chunk("a", "length", 1), "[DONE]"), "where 1 were asked for"),
    ],
)
def test_a_stream_that_is_neither_an_answer_nor_a_clear_error_is_lost(body: bytes, why: str) -> None:
    outcome = _stream(body)
    assert outcome.kind == "lost" and why in outcome.detail, outcome


def test_a_choice_missing_from_a_stream_of_two_is_lost() -> None:
    outcome = _stream(_sse(_chunk("a", "length", 0), "[DONE]"), num_choices=2)
    assert outcome.kind == "lost" and "2 were asked for" in outcome.detail


def test_an_error_event_then_done_is_a_clear_failure_counted_by_its_message() -> None:
    outcome = _stream(_sse(_chunk("a"), ERROR, "[DONE]"))
    assert outcome == Outcome(
        "failed", "stream server_error: generation failed: decode worker decode-0 failed"
    )


def test_http_errors_need_an_openai_error_object() -> None:
    def status(code: int, body: bytes, stream: bool = False) -> Outcome:
        return classify(Observation(stream=stream, status=code, body=body))

    overloaded = {
        "error": {"message": "no capacity (request 0123456789abcdef0123)", "type": "rate_limit_error"}
    }
    assert status(429, json.dumps(overloaded).encode(), stream=True) == Outcome(
        "failed", "HTTP 429 rate_limit_error: no capacity (request <id>)"
    )
    assert status(503, json.dumps(ERROR).encode()).kind == "failed"
    assert status(502, b"<html>Bad Gateway</html>").kind == "lost"
    assert status(500, b'{"error": {"message": "", "type": "x"}}').kind == "lost"


def test_a_whole_response_completes_only_if_every_choice_finished() -> None:
    def whole(choices: list[dict[str, Any]], n: int = 1) -> Outcome:
        body = json.dumps({"object": "text_completion", "choices": choices}).encode()
        return classify(Observation(stream=False, num_choices=n, status=200, body=body))

    assert whole([{"index": 0, "text": "a", "finish_reason": "stop"}]) == Outcome("completed")
    assert whole(
        [{"index": 0, "finish_reason": "length"}, {"index": 1, "finish_reason": "stop"}], 2
    ).kind == ("completed")
    assert whole([{"index": 0, "finish_reason": None}]).kind == "lost"
    assert whole([{"index": 0, "finish_reason": "error"}]).kind == "lost"
    assert whole([{"index": 0, "finish_reason": "stop"}], 2).kind == "lost"
    assert classify(Observation(stream=False, status=200, body=b'{"choices": [')).kind == "lost"
    assert classify(Observation(stream=False, status=200, body=json.dumps(ERROR).encode())).kind == "lost"


def test_no_answer_and_broken_connections_are_lost_unless_the_client_cancelled() -> None:
    truncated = _sse(_chunk("a"))
    assert classify(Observation(stream=True, status=200, body=truncated, cancelled=True)).kind == "cancelled"
    assert classify(Observation(stream=False, cancelled=True)).kind == "cancelled"
    reset = Observation(stream=True, status=200, body=truncated, error="RemoteProtocolError: peer closed")
    assert classify(reset) == Outcome("lost", "RemoteProtocolError: peer closed")
    assert classify(Observation(stream=False, error="no complete answer within 120 s")).kind == "lost"
    assert classify(Observation(stream=False)).kind == "lost"  # no response head


def test_the_workload_is_seeded_mixed_and_valid_for_the_gateway() -> None:
    config = WorkloadConfig(cancel_fraction=0.3, max_tokens=64, max_prompt_words=200)

    def run(seed: int) -> list[Any]:
        workload = Workload(config, seed)
        rng = random.Random(f"{seed}:0")
        return [workload.next(rng) for _ in range(300)]

    requests = run(1)
    assert requests == run(1) and requests != run(2)
    kinds = {r.kind for r in requests}
    assert kinds == {"chat", "chat stream", "completions", "completions stream"}
    for r in requests:
        model = ChatCompletionRequest if r.path == CHAT_PATH else CompletionRequest
        model.model_validate(r.body)  # no request of the soak is refused as bad input
        assert 1 <= r.body["max_tokens"] <= 64
    cancelled = [r for r in requests if r.cancel is not None]
    assert 0.2 < len(cancelled) / len(requests) < 0.4
    assert any(r.cancel.after_events for r in cancelled if r.cancel is not None)
    assert any(r.cancel.after_s < 0.1 for r in cancelled if r.cancel is not None)
    prefixes = Workload(config, 1).prefixes
    shared = [r for r in requests if any(p in json.dumps(r.body) for p in prefixes)]
    assert 0.25 < len(shared) / len(requests) < 0.55
    never = Workload(WorkloadConfig(cancel_fraction=0), 1)
    assert not any(never.next(random.Random(i)).cancel for i in range(50))


def test_a_report_fails_on_anything_lost_leaked_dirty_or_unrestarted() -> None:
    good: dict[str, Any] = {
        "lost": 0,
        "leaked_blocks": 0,
        "registry_audit": {"clean": True, "problems": []},
        "worker_restarts": [{"worker": "decode-0", "serving_after_s": 9.0}],
        "unexpected_exits": {},
        "completed": 10,
    }
    assert failures(good) == []
    for change, why in [
        ({"lost": 1}, "1 requests lost"),
        ({"leaked_blocks": 3}, "3 blocks leaked"),
        ({"registry_audit": {"clean": False, "problems": ["x"]}}, "audit"),
        ({"worker_restarts": []}, "restart"),
        ({"worker_restarts": [{"worker": "decode-0", "serving_after_s": None}]}, "restart"),
        ({"unexpected_exits": {"router": 1}}, "router"),
        ({"completed": 0}, "no request completed"),
    ]:
        assert any(why in reason for reason in failures({**good, **change})), change


def test_memory_track_keeps_first_peak_and_last_by_name_and_skips_exited_processes() -> None:
    assert rss_mib(2**22 + 12345) is None  # no such process
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait()
    try:
        track = MemoryTrack()
        track.sample({"sleeper": sleeper, "done": done})
        track.sample({"sleeper": sleeper, "done": done})
        report = track.report()
        assert set(report) == {"sleeper"}  # an exited process is not sampled
        line = report["sleeper"]
        assert 1 < line["first"] <= line["peak"] and line["last"] <= line["peak"]
    finally:
        sleeper.kill()
        sleeper.wait()
