"""The OpenAI-compatible gateway in front of a real cluster (gateway, router, one prefill and one
decode worker, Redis, UCX over TCP), driven by the official `openai` package and by raw HTTP."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Iterable, Iterator
from pathlib import Path

import httpx
import openai
import pytest
from baton_cluster import assert_no_leaks, start_cluster
from openai import AsyncOpenAI, OpenAI

from baton import LLM, SamplingParams
from baton.services.bench.datasets import random_requests
from baton.services.launcher import LocalCluster, _free_port
from baton.shared.models.model_config import ModelConfig
from baton.shared.tokenizer import Tokenizer

pytestmark = pytest.mark.integration

PROMPT = "It was the best of times, it was the worst of times,"
CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Tell me a story."},
    {"role": "assistant", "content": "Once upon a time."},
    {"role": "user", "content": "Another one."},
]


@pytest.fixture(scope="module")
def cluster(llama_dir: Path, redis_server: str) -> Iterator[LocalCluster]:
    cluster = start_cluster(llama_dir, redis_server, http_port=0, log_requests=True)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def client(cluster: LocalCluster) -> OpenAI:
    return OpenAI(base_url=f"{cluster.gateway_url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model(client: OpenAI) -> str:
    return client.models.list().data[0].id


def greedy_text(offline: LLM, prompt: str, max_tokens: int) -> str:
    out = offline.generate([prompt], SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))
    return out[0].text


# -- completions and chat through the official client ---------------------------------------------
def test_models_lists_the_served_model(client: OpenAI, llama_dir: Path) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == [llama_dir.name]
    assert models[0].max_model_len == 1024  # type: ignore[attr-defined]
    assert client.models.retrieve(llama_dir.name).id == llama_dir.name
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("not-this-one")


def test_completion_equals_the_offline_engine(client: OpenAI, model: str, offline: LLM) -> None:
    out = client.completions.create(
        model=model, prompt=PROMPT, max_tokens=20, temperature=0, extra_body={"ignore_eos": True}
    )
    assert out.choices[0].text == greedy_text(offline, PROMPT, 20)
    assert out.choices[0].finish_reason == "length"
    assert out.usage is not None
    assert out.usage.completion_tokens == 20
    assert out.usage.prompt_tokens == len(offline.tokenizer.encode(PROMPT))  # type: ignore[union-attr]


def test_streamed_completion_equals_non_streamed(client: OpenAI, model: str, offline: LLM) -> None:
    """Long enough to hold characters split across tokens: the incremental detokenizer must give the
    text that decoding all tokens at once gives."""
    kwargs = {
        "model": model,
        "prompt": PROMPT,
        "max_tokens": 150,
        "temperature": 0,
        "extra_body": {"ignore_eos": True},
    }
    whole = client.completions.create(**kwargs)  # type: ignore[call-overload]
    assert whole.choices[0].text == greedy_text(offline, PROMPT, 150)
    chunks = list(
        client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True})  # type: ignore[call-overload]
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None and whole.usage is not None
    # the same counts (the second request may find the prompt in the prefix cache)
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_chat_goes_through_the_chat_template(
    client: OpenAI, model: str, offline: LLM, llama_dir: Path
) -> None:
    tokenizer = Tokenizer.from_dir(llama_dir)
    assert tokenizer is not None
    out = client.chat.completions.create(
        model=model,
        messages=CHAT,
        max_completion_tokens=16,
        temperature=0,  # type: ignore[arg-type]
    )
    want = offline.chat([CHAT], SamplingParams(max_tokens=16, temperature=0))[0]
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == want.text
    assert out.usage is not None and out.usage.prompt_tokens == len(tokenizer.encode_chat(CHAT))


def test_streamed_chat_equals_non_streamed(client: OpenAI, model: str) -> None:
    kwargs = {"model": model, "messages": CHAT, "max_tokens": 24, "temperature": 0}
    whole = client.chat.completions.create(**kwargs)  # type: ignore[call-overload]
    chunks = list(
        client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True})  # type: ignore[call-overload]
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage is not None and whole.usage is not None
    # the same counts (the second request may find the prompt in the prefix cache)
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert len({c.id for c in chunks}) == 1


def test_n_choices_are_distinct_and_indexed(client: OpenAI, model: str) -> None:
    out = client.completions.create(model=model, prompt=PROMPT, max_tokens=12, temperature=1.0, n=3, seed=5)
    assert sorted(c.index for c in out.choices) == [0, 1, 2]
    assert len({c.text for c in out.choices}) == 3
    assert out.usage is not None and out.usage.completion_tokens == 36

    chat = client.chat.completions.create(
        model=model,
        messages=CHAT,
        max_tokens=8,
        temperature=1.0,
        n=2,
        seed=5,
        stream=True,  # type: ignore[arg-type]
    )
    texts = ["", ""]
    for chunk in chat:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert texts[0] != texts[1]


def test_seeded_requests_repeat_exactly(client: OpenAI, model: str) -> None:
    def sample(seed: int) -> list[str]:
        out = client.completions.create(
            model=model, prompt=PROMPT, max_tokens=16, temperature=1.0, top_p=0.9, n=2, seed=seed
        )
        return [c.text for c in sorted(out.choices, key=lambda c: c.index)]

    first = sample(1234)
    assert sample(1234) == first
    assert sample(4321) != first


def test_async_client_runs_requests_concurrently(cluster: LocalCluster, model: str, offline: LLM) -> None:
    prompts = [f"{PROMPT} {i}" for i in range(8)]

    async def main() -> list[str]:
        async with AsyncOpenAI(base_url=f"{cluster.gateway_url}/v1", api_key="x", max_retries=0) as aclient:
            outs = await asyncio.gather(
                *(aclient.completions.create(model=model, prompt=p, max_tokens=10, temperature=0,
                                             extra_body={"ignore_eos": True}) for p in prompts)
            )  # fmt: skip
        return [o.choices[0].text for o in outs]

    assert asyncio.run(main()) == [greedy_text(offline, p, 10) for p in prompts]


def test_stop_strings_never_reach_the_client(client: OpenAI, model: str, offline: LLM) -> None:
    full = greedy_text(offline, PROMPT, 24)
    stop = full[8:11]
    assert stop.strip(), f"pick another slice of {full!r}"
    cut = full[: full.index(stop)]
    kwargs = {"model": model, "prompt": PROMPT, "max_tokens": 24, "temperature": 0}
    whole = client.completions.create(**kwargs, stop=[stop, "\x00zz"])  # type: ignore[call-overload]
    assert whole.choices[0].text == cut
    assert whole.choices[0].finish_reason == "stop"
    assert whole.choices[0].stop_reason == stop  # type: ignore[attr-defined]
    streamed = client.completions.create(**kwargs, stop=stop, stream=True)  # type: ignore[call-overload]
    assert "".join(c.choices[0].text for c in streamed) == cut
    kept = client.completions.create(**kwargs, stop=stop, extra_body={"include_stop_str_in_output": True})  # type: ignore[call-overload]
    assert kept.choices[0].text == cut + stop


def test_logprobs_in_both_apis(client: OpenAI, model: str) -> None:
    out = client.completions.create(model=model, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3)
    lp = out.choices[0].logprobs
    assert lp is not None and lp.tokens is not None and lp.top_logprobs is not None
    assert len(lp.tokens) == 6
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(6)]
    for sampled, top in zip(lp.token_logprobs or [], lp.top_logprobs, strict=True):
        assert len(top) == 3 and sampled <= 0
        assert sampled == pytest.approx(max(top.values()))  # greedy: the sampled token is the top one

    chat = client.chat.completions.create(
        model=model,
        messages=CHAT,
        max_tokens=5,
        temperature=0,
        logprobs=True,
        top_logprobs=2,  # type: ignore[arg-type]
    )
    content = chat.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == 5
    assert all(len(c.top_logprobs) == 2 and c.bytes == list(c.token.encode()) for c in content)


def test_echo_and_vllm_extensions(client: OpenAI, model: str, offline: LLM) -> None:
    out = client.completions.create(
        model=model, prompt=PROMPT, max_tokens=8, temperature=0, echo=True,
        extra_body={"top_k": 5, "min_p": 0.01, "repetition_penalty": 1.0, "ignore_eos": True, "user": "u1"},
    )  # fmt: skip
    assert out.choices[0].text == PROMPT + greedy_text(offline, PROMPT, 8)
    ids = [5, 6, 7, 8]
    by_ids = client.completions.create(model=model, prompt=[ids, ids], max_tokens=4, temperature=0, n=2)
    assert sorted(c.index for c in by_ids.choices) == [0, 1, 2, 3]
    assert len({c.text for c in by_ids.choices}) == 1


# -- errors, over raw HTTP -------------------------------------------------------------------------
COMPLETIONS, CHAT_API = "/v1/completions", "/v1/chat/completions"
USER_X = [{"role": "user", "content": "x"}]
BAD_REQUESTS = [
    (COMPLETIONS, b"{not json", "not valid JSON", None),
    (COMPLETIONS, [], "dictionary", None),
    (COMPLETIONS, {}, "prompt is required", "prompt"),
    (COMPLETIONS, {"prompt": "x", "temperature": -1}, "temperature", "temperature"),
    (COMPLETIONS, {"prompt": "x", "top_p": 1.5}, "top_p", "top_p"),
    (COMPLETIONS, {"prompt": "x", "n": 100000}, "n:", "n"),
    (COMPLETIONS, {"prompt": "x", "max_tokens": 0}, "max_tokens", "max_tokens"),
    (COMPLETIONS, {"prompt": "x", "logprobs": 50}, "logprobs", "logprobs"),
    (COMPLETIONS, {"prompt": [-3]}, "token ids", "prompt"),
    (COMPLETIONS, {"prompt": [4000000000]}, "outside the vocabulary", "prompt"),
    (COMPLETIONS, {"prompt": []}, "prompt", "prompt"),
    (COMPLETIONS, {"prompt": ""}, "empty", "prompt"),
    (COMPLETIONS, {"prompt": "x", "stop": ""}, "stop", "stop"),
    (COMPLETIONS, {"prompt": "x", "stop": [1, 2]}, "stop", "stop"),
    (COMPLETIONS, {"prompt": "x", "presence_penalty": 3}, "presence_penalty", "presence_penalty"),
    (COMPLETIONS, {"prompt": "x", "seed": 1e30}, "seed", "seed"),
    (COMPLETIONS, {"prompt": "x", "min_tokens": 9, "max_tokens": 2}, "min_tokens", "min_tokens"),
    (COMPLETIONS, {"prompt": "x", "best_of": 3}, "best_of", "best_of"),
    (COMPLETIONS, {"prompt": "x", "stream_options": {"include_usage": True}}, "stream", "stream_options"),
    (COMPLETIONS, {"prompt": "x", "max_tokens": 5000}, "maximum context length", "max_tokens"),
    (COMPLETIONS, {"prompt": "word " * 1500}, "maximum context length", "prompt"),
    (CHAT_API, {"messages": []}, "messages", "messages"),
    (CHAT_API, {"messages": [{"role": "robot", "content": "x"}]}, "role", "messages.0.role"),
    (CHAT_API, {"messages": [{"role": "user", "content": [{"type": "img"}]}]}, "text", "messages.0.content"),
    (CHAT_API, {"messages": USER_X, "top_logprobs": 2}, "logprobs", "top_logprobs"),
    (CHAT_API, {"messages": USER_X, "tools": [{"type": "function"}]}, "tool", "tools"),
]


@pytest.mark.parametrize(("path", "body", "message", "param"), BAD_REQUESTS)
def test_bad_requests_get_400_with_an_openai_error(
    cluster: LocalCluster, path: str, body: object, message: str, param: str | None
) -> None:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    reply = httpx.post(cluster.gateway_url + path, content=content, headers=headers)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert message in error["message"] and error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert len(reply.content) < 2048


def test_unknown_model_is_404_and_context_overflow_has_its_code(cluster: LocalCluster) -> None:
    reply = httpx.post(f"{cluster.gateway_url}/v1/completions", json={"prompt": "x", "model": "gpt-9" * 500})
    assert reply.status_code == 404 and reply.json()["error"]["code"] == "model_not_found"
    assert len(reply.content) < 2048
    reply = httpx.post(f"{cluster.gateway_url}/v1/completions", json={"prompt": "x", "max_tokens": 2000})
    assert reply.json()["error"]["code"] == "context_length_exceeded"
    assert httpx.get(f"{cluster.gateway_url}/v1/nothing").status_code == 404


def test_request_id_is_echoed_and_reaches_every_service_log(cluster: LocalCluster) -> None:
    reply = httpx.post(
        f"{cluster.gateway_url}/v1/completions",
        json={"prompt": PROMPT, "max_tokens": 4},
        headers={"X-Request-Id": "trace-me-42"},
    )
    assert reply.status_code == 200 and reply.headers["x-request-id"] == "trace-me-42"
    assert reply.json()["id"] == "cmpl-trace-me-42"
    generated = httpx.get(f"{cluster.gateway_url}/health").headers["x-request-id"]
    assert len(generated) == 32
    bad = httpx.get(f"{cluster.gateway_url}/health", headers={"X-Request-Id": "a b;c"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "X-Request-Id"
    time.sleep(0.5)  # the log pumps are threads
    logs = "".join(cluster.log.lines)  # type: ignore[attr-defined]
    for service in ("gateway", "router", "prefill-0", "decode-0"):
        assert any(line.startswith(service) and "trace-me-42" in line for line in logs.splitlines()), service


def test_health_ready_and_metrics(cluster: LocalCluster, client: OpenAI, model: str) -> None:
    assert httpx.get(f"{cluster.gateway_url}/health").json() == {"status": "ok"}
    ready = httpx.get(f"{cluster.gateway_url}/ready")
    assert ready.status_code == 200 and ready.json()["decode_workers"] == 1
    client.completions.create(model=model, prompt=PROMPT, max_tokens=5, temperature=0)
    text = httpx.get(f"{cluster.gateway_url}/metrics").text
    samples = _samples(text)
    label = f'{{model_name="{model}"}}'
    for name in (
        "vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
        "vllm:num_preemptions_total", "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total",
    ):  # fmt: skip
        assert name + label in samples, name
    for name in ("vllm:time_to_first_token_seconds_count", "vllm:e2e_request_latency_seconds_count",
                 "vllm:inter_token_latency_seconds_count", "vllm:prompt_tokens_total",
                 "vllm:generation_tokens_total", "vllm:prefix_cache_queries_total"):  # fmt: skip
        assert samples[name + label] > 0, name
    assert samples[f'baton:workers{{model_name="{model}",role="decode"}}'] == 1


def test_reset_prefix_cache_empties_every_workers_cache(
    cluster: LocalCluster, client: OpenAI, model: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from baton.services.cli import main

    prompt = " ".join([PROMPT] * 6)  # several full blocks
    hits_name = f'vllm:prefix_cache_hits_total{{model_name="{model}"}}'

    def hits_after_one_request() -> float:
        client.completions.create(model=model, prompt=prompt, max_tokens=2, temperature=0)
        return _samples(httpx.get(f"{cluster.gateway_url}/metrics").text)[hits_name]

    first = hits_after_one_request()
    warm = hits_after_one_request()
    assert warm > first  # the second time, the prompt's blocks were cached
    capsys.readouterr()
    assert main(["reset-prefix-cache", "--address", cluster.router_address]) == 0
    forgot = capsys.readouterr().out
    assert forgot.startswith("forgot ") and forgot.rstrip().endswith("on 2 workers"), forgot
    assert int(forgot.split()[1]) > 0
    assert hits_after_one_request() == warm  # cold again: no hit
    assert_no_leaks(cluster)


def _samples(exposition: str) -> dict[str, float]:
    out = {}
    for line in exposition.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


# -- cancellation ----------------------------------------------------------------------------------
@pytest.mark.parametrize("stream", [False, True])
def test_abandoned_requests_are_aborted_everywhere(cluster: LocalCluster, model: str, stream: bool) -> None:
    """As vLLM tests it: many long requests whose client gives up after a short timeout; then a fresh
    request is answered and nothing is left anywhere (registry, allocators, router)."""

    async def abandon() -> int:
        async with AsyncOpenAI(
            base_url=f"{cluster.gateway_url}/v1", api_key="x", max_retries=0, timeout=1.0
        ) as aclient:

            async def one(i: int) -> str:
                out = await aclient.completions.create(
                    model=model, prompt=f"{PROMPT} {i}", max_tokens=900, extra_body={"ignore_eos": True},
                    stream=stream,
                )  # fmt: skip
                if not stream:
                    return "finished"
                async for _ in out:  # type: ignore[union-attr]
                    break  # a first chunk came: walk away mid-stream
                await out.close()  # type: ignore[union-attr]
                return "abandoned"

            results = await asyncio.gather(*(one(i) for i in range(16)), return_exceptions=True)
        if stream:
            return results.count("abandoned")
        return sum(isinstance(r, openai.APITimeoutError) for r in results)

    assert asyncio.run(abandon()) == 16
    fresh = OpenAI(base_url=f"{cluster.gateway_url}/v1", api_key="x", max_retries=0, timeout=30)
    assert fresh.completions.create(model=model, prompt=PROMPT, max_tokens=4).choices[0].text is not None
    assert_no_leaks(cluster, timeout_s=30)
    metrics = _samples(httpx.get(f"{cluster.gateway_url}/metrics").text)
    assert metrics[f'vllm:num_requests_running{{model_name="{model}"}}'] == 0


# -- more gateways on the same router: API key and the bound on requests in flight; two processes --
def _start_gateway(
    cluster: LocalCluster, llama_dir: Path, *args: str, **env: str
) -> tuple[subprocess.Popen, str]:
    """`baton gateway ARGS` in front of the cluster's router, once it answers /health."""
    port = _free_port()
    argv = [sys.executable, "-m", "baton.services.cli", "gateway", "--model", str(llama_dir)]
    argv += ["--router", cluster.router_address, "--port", str(port), *args]
    process = subprocess.Popen(
        argv, env={**os.environ, "PYTHONUNBUFFERED": "1", **env}, stdin=subprocess.DEVNULL
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise AssertionError("the gateway did not start")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def guarded(cluster: LocalCluster, llama_dir: Path) -> Iterator[str]:
    process, url = _start_gateway(cluster, llama_dir, "--max-pending-requests", "1", BATON_API_KEY="s3cret")
    try:
        yield url
    finally:
        process.terminate()
        assert process.wait(timeout=40) == 0


def test_api_key_is_required_on_v1_only(guarded: str) -> None:
    body = {"prompt": PROMPT, "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
        reply = httpx.post(f"{guarded}/v1/completions", json=body, headers=headers)
        assert reply.status_code == 401 and reply.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{guarded}/v1/models").status_code == 401
    ok = OpenAI(base_url=f"{guarded}/v1", api_key="s3cret", max_retries=0)
    assert ok.completions.create(model=ok.models.list().data[0].id, prompt=PROMPT, max_tokens=2).choices
    assert httpx.get(f"{guarded}/health").status_code == 200
    assert httpx.get(f"{guarded}/metrics").status_code == 200


def test_requests_beyond_the_pending_bound_get_503_at_once(guarded: str) -> None:
    headers = {"Authorization": "Bearer s3cret"}
    long = {"prompt": PROMPT, "max_tokens": 900, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{guarded}/v1/completions", json=long, headers=headers, timeout=60) as first:
        assert first.status_code == 200
        lines = first.iter_lines()
        next(lines)  # it is generating
        refused = httpx.post(f"{guarded}/v1/completions", json={"prompt": "x"}, headers=headers)
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["type"] == "server_error"
    # the abandoned stream is aborted and the slot is free again
    deadline = time.monotonic() + 30
    while (reply := httpx.post(f"{guarded}/v1/completions", json={"prompt": "x", "max_tokens": 2},
                               headers=headers)).status_code == 503:  # fmt: skip
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert reply.status_code == 200


def test_a_gateway_of_two_processes_serves_and_sums_its_metrics(
    cluster: LocalCluster, llama_dir: Path, offline: LLM
) -> None:
    process, url = _start_gateway(
        cluster, llama_dir, "--gateway-processes", "2", "--max-pending-requests", "64"
    )
    try:
        children = _children(process.pid)
        assert len(children) == 2

        async def streamed(i: int) -> str:  # concurrent streams hold connections open on both processes
            async with AsyncOpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0) as client:
                stream = await client.completions.create(
                    model=llama_dir.name, prompt=f"{PROMPT} {i}", max_tokens=12, temperature=0, stream=True
                )
                return "".join([chunk.choices[0].text async for chunk in stream if chunk.choices])

        texts = asyncio.run(_gather(streamed(i) for i in range(24)))
        assert texts[3] == greedy_text(offline, f"{PROMPT} 3", 12)
        # each process writes its series to the shared directory; any process answers with the sums
        metrics_dir = Path(_environ(children[0])["PROMETHEUS_MULTIPROC_DIR"])
        writers = {int(f.stem.rpartition("_")[2]) for f in metrics_dir.glob("counter_*.db")}
        assert writers == set(children), "both processes should have served some of 24 concurrent streams"
        deadline = time.monotonic() + 10  # a stream's metrics are recorded just after its last event
        while _finished(url) != 24:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert [_finished(url) for _ in range(6)] == [24] * 6  # fresh connections: both processes answer
        process.terminate()
        assert process.wait(timeout=40) == 0
        assert not metrics_dir.exists() and not any(_alive(pid) for pid in children)
    finally:
        process.kill()


def test_a_gateway_process_that_dies_stops_the_others(cluster: LocalCluster, llama_dir: Path) -> None:
    process, _ = _start_gateway(cluster, llama_dir, "--gateway-processes", "2")
    try:
        first, second = _children(process.pid)
        os.kill(first, signal.SIGKILL)
        assert process.wait(timeout=40) == 1  # the orchestrator restarts the gateway whole
        assert not _alive(second)
    finally:
        process.kill()


def _finished(url: str) -> float:
    """Finished choices (every finish reason) as the gateway's /metrics counts them."""
    samples = _samples(httpx.get(f"{url}/metrics").text)
    return sum(v for name, v in samples.items() if name.startswith("vllm:request_success_total{"))


async def _gather(work: Iterable[Awaitable[str]]) -> list[str]:
    return list(await asyncio.gather(*work))


def _children(pid: int) -> list[int]:
    """The gateway's serving processes (multiprocessing may add a resource tracker: not counted)."""
    deadline = time.monotonic() + 10
    while True:
        pids = [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
        serving = [p for p in pids if b"resource_tracker" not in Path(f"/proc/{p}/cmdline").read_bytes()]
        if len(serving) >= 2 or time.monotonic() > deadline:
            return sorted(serving)
        time.sleep(0.1)


def _environ(pid: int) -> dict[str, str]:
    pairs = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(p.decode().partition("=")[::2] for p in pairs if p)


def _alive(pid: int) -> bool:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
        except FileNotFoundError:
            return False
        if state == "Z":
            return False
        time.sleep(0.1)
    return True


# -- baton bench serve against this gateway -------------------------------------------------------
@pytest.mark.parametrize(("target", "processes"), [("gateway", 1), ("router", 1), ("gateway", 3)])
def test_bench_serve_measures_every_request(
    cluster: LocalCluster, llama_dir: Path, tmp_path: Path, target: str, processes: int
) -> None:
    from baton.services.cli import main

    out = tmp_path / "serve.json"
    url = cluster.gateway_url if target == "gateway" else f"grpc://{cluster.router_address}"
    argv = ["bench", "serve", "--url", url, "--model", str(llama_dir), "--num-prompts", "12"]
    argv += ["--input-len", "8,40", "--output-len", "4,12", "--request-rate", "20", "--max-concurrency", "4"]
    argv += ["--client-processes", str(processes)]
    assert main([*argv, "--slo-ttft-ms", "60000", "--slo-tpot-ms", "0.001", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    summary = report["summary"]
    assert report["client_processes"] == processes and 0 < summary["client_cpu_busy"] < 1.5
    assert summary["completed"] == 12 and summary["failed"] == 0
    assert summary["output_throughput"] > 0 and summary["request_throughput"] > 0
    for name in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
        stats = summary[name]
        assert 0 < stats["p50"] <= stats["p99"], name
    assert summary["ttft_ms"]["p99"] <= summary["e2el_ms"]["p99"]
    assert summary["slo"]["met"] == 0 and summary["goodput"] == 0  # a 1 µs TPOT limit nobody meets
    # the token counts come from the usage chunks: exactly the requested output lengths
    vocab = ModelConfig.from_dir(llama_dir).vocab_size
    wanted = random_requests(12, (8, 40), (4, 12), vocab, seed=0)
    assert summary["output_tokens"] == sum(r.output_len for r in wanted)


@pytest.mark.parametrize("processes", [1, 2])
def test_a_load_tells_when_its_first_request_was_answered(cluster: LocalCluster, processes: int) -> None:
    # the decode interference probe starts its victims on this, not on a guess of how long the
    # load processes take to start (seconds, for spawned processes that import torch)
    from baton.services.bench.client_processes import run_load_in_processes
    from baton.services.bench.serve import LoadConfig

    config = LoadConfig(url=cluster.gateway_url, request_rate=10.0, progress=False)
    requests = random_requests(
        6, (8, 16), (2, 2), ModelConfig.from_dir(Path(cluster.spec.model)).vocab_size, 1
    )
    flowing = threading.Event()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        load = pool.submit(run_load_in_processes, config, requests, processes, flowing)
        assert flowing.wait(120)
        flowed_at = time.time()
        run = load.result()
    assert run.started_s < flowed_at < run.started_s + run.elapsed_s
    assert all(r.ok for r in run.records)
