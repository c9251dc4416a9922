"""Hostile input against a real cluster: generated request bodies (property-based, hypothesis) and
raw malformed or oversized HTTP get a 4xx with a bounded OpenAI error object, or a proper completion;
generated Router requests complete or get INVALID_ARGUMENT; never a 5xx or INTERNAL, never a hang; and
the services stay up with nothing leaked. FUZZ_EXAMPLES=N (default 120) examples per property."""

from __future__ import annotations

import json
import math
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from baton_cluster import assert_no_leaks, start_cluster
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from baton.services.launcher import LocalCluster
from baton.shared.rpc import common_pb2, router_pb2, router_pb2_grpc

pytestmark = pytest.mark.integration

VOCAB = 2048  # the generated llama's vocabulary size
MAX_BODY = 64 * 1024
ERROR_BODY_LIMIT = 4096
EXAMPLES = settings(
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", "120")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


@pytest.fixture(scope="module")
def cluster(llama_dir: Path, redis_server: str) -> Iterator[LocalCluster]:
    cluster = start_cluster(
        llama_dir,
        redis_server,
        http_port=0,
        engine_args=["--max-model-len", "256"],
        gateway_args=["--max-body-bytes", str(MAX_BODY)],
    )
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def http(cluster: LocalCluster) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=cluster.gateway_url, timeout=60) as client:
        yield client


# -- generated bodies -----------------------------------------------------------------------------
token_ids = st.one_of(
    st.integers(0, VOCAB - 1), st.integers(-(2**40), -1), st.integers(VOCAB, 2**70), st.booleans(), st.none()
)
small_ints = st.one_of(st.integers(-3, 12), st.sampled_from([10**6, 2**31, 2**63, -(2**63)]))
numbers = st.one_of(
    st.floats(-5, 5), st.sampled_from([math.inf, -math.inf, math.nan, 1e308]), st.integers(-10, 10)
)
text = st.text(max_size=40)
anything = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4),
    max_leaves=12,
)
prompts = st.one_of(
    text,
    st.lists(token_ids, max_size=40),
    st.lists(text, max_size=3),
    st.lists(st.lists(st.integers(0, VOCAB - 1), max_size=10), max_size=3),
    anything,
)
stops = st.one_of(text, st.lists(text, max_size=6), st.lists(anything, max_size=3), st.integers())
completion_fields = {
    "prompt": prompts,
    "model": st.one_of(text, st.integers()),
    "max_tokens": small_ints,
    "n": small_ints,
    "best_of": small_ints,
    "temperature": numbers,
    "top_p": numbers,
    "top_k": small_ints,
    "min_p": numbers,
    "seed": st.one_of(small_ints, text),
    "stop": stops,
    "stop_token_ids": st.lists(token_ids, max_size=5),
    "logprobs": st.one_of(small_ints, st.booleans()),
    "echo": anything,
    "stream": st.booleans(),
    "ignore_eos": anything,
    "presence_penalty": numbers,
    "repetition_penalty": numbers,
    "logit_bias": anything,
    "user": anything,
    "unknown_field": anything,
}
VALID_COMPLETION = {"prompt": "Once upon a time", "max_tokens": 3}
VALID_CHAT = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 3}


def bodies(valid: dict[str, Any], fields: dict[str, st.SearchStrategy[Any]]) -> st.SearchStrategy[dict]:
    """Anything the fields allow, or a valid body with one or two fields changed: most requests are
    refused, and many get through to the workers."""
    one_field = st.sampled_from(sorted(fields)).flatmap(lambda k: fields[k].map(lambda v: {k: v}))
    perturbed = st.lists(one_field, min_size=1, max_size=2).map(
        lambda changes: {**valid, **{k: v for change in changes for k, v in change.items()}}
    )
    return st.one_of(st.fixed_dictionaries({}, optional=fields), perturbed)


roles = st.one_of(st.sampled_from(["system", "user", "assistant"]), text)
messages = st.lists(st.fixed_dictionaries({}, optional={"role": roles, "content": anything}), max_size=4)
chat_fields = {**completion_fields, "messages": st.one_of(messages, anything), "logprobs": st.booleans()}
del chat_fields["prompt"]
completion_bodies = bodies(VALID_COMPLETION, completion_fields)
chat_bodies = bodies(VALID_CHAT, chat_fields)


def assert_well_answered(reply: httpx.Response) -> None:
    """A completion, or a client error with a bounded OpenAI error object: never a server error."""
    assert reply.status_code < 500, reply.text[:500]
    if reply.status_code >= 400:
        assert len(reply.content) <= ERROR_BODY_LIMIT
        error = reply.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
    elif reply.headers["content-type"].startswith("text/event-stream"):
        assert reply.text.rstrip().endswith("data: [DONE]"), reply.text[-300:]
    else:
        assert reply.json()["choices"]


def post_json(http: httpx.Client, path: str, body: dict[str, Any]) -> httpx.Response:
    # NaN and infinities as JSON's common extension (Python's json writes them; a client may send them)
    return http.post(path, content=json.dumps(body), headers={"Content-Type": "application/json"})


@EXAMPLES
@given(body=completion_bodies)
def test_generated_completion_bodies_are_answered_or_refused_cleanly(http: httpx.Client, body: dict) -> None:
    assert_well_answered(post_json(http, "/v1/completions", body))


@EXAMPLES
@given(body=chat_bodies)
def test_generated_chat_bodies_are_answered_or_refused_cleanly(http: httpx.Client, body: dict) -> None:
    assert_well_answered(post_json(http, "/v1/chat/completions", body))


@EXAMPLES
@given(raw=st.binary(max_size=300), content_type=st.sampled_from(["application/json", "text/plain", ""]))
def test_arbitrary_bytes_get_a_client_error(http: httpx.Client, raw: bytes, content_type: str) -> None:
    reply = http.post("/v1/completions", content=raw, headers={"Content-Type": content_type})
    assert_well_answered(reply)
    assert reply.status_code >= 400 or json.loads(raw)  # only a valid body may succeed


# -- the Router's gRPC API ---------------------------------------------------------------------------
uint32 = st.one_of(st.integers(0, 40), st.integers(0, 2**32 - 1))
doubles = st.one_of(st.floats(-10, 10), st.sampled_from([math.inf, -math.inf, math.nan, 1e308]))
sampling_params = st.builds(
    common_pb2.SamplingParams,
    max_tokens=st.one_of(st.integers(0, 6), uint32),
    temperature=doubles,
    top_p=doubles,
    top_k=st.integers(-(2**31), 2**31 - 1),
    min_p=doubles,
    seed=st.integers(-(2**63), 2**63 - 1),
    presence_penalty=doubles,
    repetition_penalty=doubles,
    stop_token_ids=st.lists(uint32, max_size=5),
    min_tokens=st.one_of(st.integers(0, 8), uint32),
    logprobs=st.one_of(st.integers(0, 25), uint32),
)
generate_requests = st.builds(
    lambda prompt, sampling, model, request_id: _generate_request(prompt, sampling, model, request_id),
    st.one_of(st.text(max_size=60), st.lists(uint32, max_size=60)),
    sampling_params,
    st.one_of(st.just(""), st.text(max_size=20)),
    st.one_of(st.just(""), st.text(max_size=300)),
)
REFUSALS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED}


def _generate_request(
    prompt: str | list[int], sampling: common_pb2.SamplingParams, model: str, request_id: str
) -> router_pb2.GenerateRequest:
    request = router_pb2.GenerateRequest(sampling=sampling, model=model, request_id=request_id)
    if isinstance(prompt, str):
        request.text = prompt
    else:
        request.token_ids.ids.extend(prompt)
    return request


@EXAMPLES
@given(request=generate_requests)
def test_generated_router_requests_complete_or_get_invalid_argument(
    cluster: LocalCluster, request: router_pb2.GenerateRequest
) -> None:
    with grpc.insecure_channel(cluster.router_address) as channel:
        stream = router_pb2_grpc.RouterStub(channel).Generate(request, timeout=60)
        try:
            finish = [r.finish_reason for r in stream if r.finish_reason]
        except grpc.RpcError as exc:
            assert exc.code() in REFUSALS, (exc.code(), exc.details())  # type: ignore[attr-defined]
            assert exc.details() and len(exc.details()) <= ERROR_BODY_LIMIT  # type: ignore[attr-defined]
            return
    assert len(finish) == 1 and finish[0] != common_pb2.FINISH_REASON_ERROR


# -- malformed HTTP, oversized bodies and headers ---------------------------------------------------
@pytest.mark.parametrize(
    "body",
    [
        b'{"prompt": "\xff\xfe invalid utf-8", "max_tokens": 2}',
        b'{"prompt": "x", "max_tokens": 2',  # truncated
        b"[1, 2, 3]",
        b'"just a string"',
        b'{"prompt": "x", "max_tokens": 1e400}',
        b'{"prompt": "x", "n": 1000000000}',
        b'{"prompt": [' + b"1," * 5000 + b"1]}",  # longer than the model allows
        b'{"prompt": "x", "stop": [' + b'"s",' * 100 + b'"s"]}',
        b'{"prompt": "x", "logprobs": 1000}',
    ],
)
def test_malformed_bodies_get_400(http: httpx.Client, body: bytes) -> None:
    reply = http.post("/v1/completions", content=body, headers={"Content-Type": "application/json"})
    assert 400 <= reply.status_code < 500, reply.text[:300]
    assert_well_answered(reply)


def test_an_oversized_body_gets_413_before_it_is_read(http: httpx.Client) -> None:
    big = json.dumps({"prompt": "x" * (MAX_BODY + 1)}).encode()
    reply = http.post("/v1/completions", content=big, headers={"Content-Type": "application/json"})
    assert reply.status_code == 413 and reply.json()["error"]["code"] == "request_too_large"

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        yield b'{"prompt": "'
        for _ in range(MAX_BODY // 1024 + 1):
            yield b"x" * 1024
        yield b'"}'

    reply = http.post("/v1/completions", content=chunks(), headers={"Content-Type": "application/json"})
    assert reply.status_code == 413 and reply.json()["error"]["code"] == "request_too_large"
    assert len(reply.content) < ERROR_BODY_LIMIT


def test_oversized_and_broken_headers_do_not_take_the_gateway_down(
    cluster: LocalCluster, http: httpx.Client
) -> None:
    port = int(cluster.gateway_url.rsplit(":", 1)[1])
    for request in (
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 200_000 + b"\r\n\r\n",
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
        b"GARBAGE\r\n\r\n",
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n{",  # then silence
    ):
        answer = _exchange(port, request)
        assert answer == b"" or answer.startswith(b"HTTP/1.1 4"), answer[:200]  # refused, or a 4xx
    reply = http.get("/health")
    assert reply.status_code == 200
    reply = http.post(
        "/v1/completions", json={"prompt": "x", "max_tokens": 2}, headers={"X-Request-Id": "a" * 129}
    )
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "X-Request-Id"


def _exchange(port: int, request: bytes) -> bytes:
    """Send raw bytes, then read what comes back until the server closes (b"" if it hung up first)."""
    answer = b""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        try:
            sock.sendall(request)
            sock.shutdown(socket.SHUT_WR)
            while chunk := sock.recv(4096):
                answer += chunk
        except OSError:  # the server closed the connection on a request it refused
            pass
    return answer


def test_the_services_are_up_and_clean_after_all_of_it(cluster: LocalCluster, http: httpx.Client) -> None:
    reply = http.post("/v1/completions", json={"prompt": "Once upon a time", "max_tokens": 4})
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 4
    assert cluster.exited() == {}
    assert_no_leaks(cluster)
