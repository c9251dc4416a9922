"""`baton bench serve`: a load generator against a running OpenAI-compatible gateway, or straight
against the Router's gRPC API. Requests go out as streamed completions of token-id prompts, at Poisson
arrivals (or all at once) under an optional concurrency cap; each stream's chunk arrival times give
TTFT, inter-token latencies and TPOT."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import random
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import grpc
import httpx

from baton.services.bench.datasets import BenchRequest
from baton.shared.grpc_tls import GrpcTls, aio_channel


@dataclass(frozen=True)
class LoadConfig:
    url: str
    """The gateway's base URL, e.g. http://127.0.0.1:8000, or grpc://HOST:PORT for the Router."""
    model: str | None = None
    request_rate: float = float("inf")
    """Mean requests per second of the Poisson arrivals; inf sends every request at once."""
    max_concurrency: int | None = None
    seed: int = 0
    api_key: str | None = None
    tls: GrpcTls | None = None
    """grpc:// only: TLS of the channel to the Router (None: plaintext)."""
    timeout_s: float = 600.0
    progress: bool = True


@dataclass
class RequestRecord:
    """What one request measured (times in seconds from its own send)."""

    prompt_tokens: int
    output_len: int
    ok: bool = False
    error: str | None = None
    ttft_s: float | None = None
    latency_s: float | None = None
    output_tokens: int = 0
    itl_s: list[float] = field(default_factory=list)

    @property
    def tpot_s(self) -> float | None:
        if not self.ok or self.ttft_s is None or self.latency_s is None or self.output_tokens < 2:
            return None
        return (self.latency_s - self.ttft_s) / (self.output_tokens - 1)


GRPC_SCHEME = "grpc://"


class _Chunk(NamedTuple):
    """One streamed piece of a completion, as the load generator sees it."""

    has_tokens: bool
    completion_tokens: int | None = None
    """The usage count, where the piece carries one."""
    error: str | None = None


_Stream = Callable[[BenchRequest], AsyncIterator[_Chunk]]


@dataclass
class LoadRun:
    """What one load-generating process measured."""

    records: list[RequestRecord]
    """One per request, in request order."""
    started_s: float
    """Wall-clock time (time.time()) of the run's start."""
    elapsed_s: float
    cpu_s: float
    """This process's CPU time during the run: near `elapsed_s`, the client itself was the limit."""


async def run_load(
    config: LoadConfig,
    requests: list[BenchRequest],
    send_at_s: list[float] | None = None,
    ready: Callable[[], object] | None = None,
    progress: ProgressSink | None = None,
) -> LoadRun:
    """Send every request, each at its offset from the start (default: the config's arrival process).
    `ready` (blocking; e.g. a barrier shared with other load processes) is called once connected."""
    limit = asyncio.Semaphore(config.max_concurrency or len(requests))
    progress = progress or Progress(len(requests), config.progress)
    if send_at_s is None:
        send_at_s = send_times(len(requests), config.request_rate, config.seed)
    async with _client(config) as stream:
        if ready is not None:
            await asyncio.to_thread(ready)
        started, start, cpu_start = time.time(), time.perf_counter(), time.process_time()
        tasks = []
        for request, at in zip(requests, send_at_s, strict=True):
            if (delay := start + at - time.perf_counter()) > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(_one(stream, request, limit, progress)))
        records = await asyncio.gather(*tasks)
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    progress.close()
    return LoadRun(list(records), started, elapsed, cpu)


@contextlib.asynccontextmanager
async def _client(config: LoadConfig) -> AsyncIterator[_Stream]:
    """A function streaming one request's chunks from the gateway (HTTP) or the Router (gRPC)."""
    if config.url.startswith(GRPC_SCHEME):
        from baton.shared.rpc import router_pb2_grpc

        async with aio_channel(config.url.removeprefix(GRPC_SCHEME), config.tls) as channel:
            stub = router_pb2_grpc.RouterStub(channel)
            model = config.model or ""  # empty: the Router's only model
            yield lambda request: _grpc_chunks(stub, model, request, config.timeout_s)
        return
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(
        base_url=config.url, headers=_headers(config), timeout=config.timeout_s, limits=limits
    ) as client:
        model = config.model or await _served_model(client)
        yield lambda request: _http_chunks(client, model, request)


async def _served_model(client: httpx.AsyncClient) -> str:
    response = await client.get("/v1/models")
    response.raise_for_status()
    return str(response.json()["data"][0]["id"])


def _headers(config: LoadConfig) -> dict[str, str]:
    return {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}


def send_times(num: int, rate: float, seed: int) -> list[float]:
    """Seconds from the run's start at which each request goes out."""
    return list(itertools.accumulate(_arrival_gaps(num, rate, seed)))


def _arrival_gaps(num: int, rate: float, seed: int) -> list[float]:
    """Seconds to wait before each send: exponential gaps (a Poisson process), or none for rate inf."""
    if rate == float("inf"):
        return [0.0] * num
    rng = random.Random(seed)
    return [0.0] + [rng.expovariate(rate) for _ in range(num - 1)]


async def _one(
    stream: _Stream, request: BenchRequest, limit: asyncio.Semaphore, progress: ProgressSink
) -> RequestRecord:
    record = RequestRecord(len(request.prompt_token_ids), request.output_len)
    async with limit:
        sent = time.perf_counter()
        last = sent
        try:
            async for chunk in stream(request):
                if chunk.error is not None:
                    record.error = chunk.error[:200]
                    return record
                if chunk.completion_tokens is not None:
                    record.output_tokens = chunk.completion_tokens
                if chunk.has_tokens:
                    now = time.perf_counter()
                    if record.ttft_s is None:
                        record.ttft_s = now - sent
                    else:
                        record.itl_s.append(now - last)
                    last = now
            record.latency_s = time.perf_counter() - sent
            record.ok = record.ttft_s is not None
        except (httpx.HTTPError, grpc.aio.AioRpcError, ValueError) as exc:
            record.error = f"{type(exc).__name__}: {exc}"[:200]
        finally:
            progress.advance()
    return record


async def _http_chunks(client: httpx.AsyncClient, model: str, request: BenchRequest) -> AsyncIterator[_Chunk]:
    body = {
        "model": model, "prompt": request.prompt_token_ids, "max_tokens": request.output_len,
        "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
    }  # fmt: skip
    async with client.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            yield _Chunk(False, error=f"HTTP {response.status_code}: {(await response.aread())[:200]!r}")
            return
        async for data in _sse_data(response):
            if "error" in data:
                yield _Chunk(False, error=str(data["error"].get("message")))
                return
            usage = data.get("usage")
            yield _Chunk(bool(data.get("choices")), int(usage["completion_tokens"]) if usage else None)


async def _sse_data(response: httpx.Response) -> AsyncIterator[dict[str, Any]]:
    """The JSON of each `data:` event until `[DONE]`. Splits the raw bytes itself: httpx's line
    iterator costs several times more per event, enough to make the client the slowest process of a
    served benchmark streaming tens of thousands of tokens a second."""
    pending = b""
    async for raw in response.aiter_raw():
        pending += raw
        *lines, pending = pending.split(b"\n")
        for line in lines:
            if line.startswith(b"data: ") and line != b"data: [DONE]":
                yield json.loads(line[6:])


async def _grpc_chunks(
    stub: Any, model: str, request: BenchRequest, timeout_s: float
) -> AsyncIterator[_Chunk]:
    from baton.shared.rpc import common_pb2, router_pb2

    sampling = common_pb2.SamplingParams(max_tokens=request.output_len, temperature=0.0, ignore_eos=True)
    message = router_pb2.GenerateRequest(
        token_ids=router_pb2.TokenIds(ids=request.prompt_token_ids), sampling=sampling, model=model
    )
    async for response in stub.Generate(message, timeout=timeout_s):
        if response.error:
            yield _Chunk(False, error=response.error)
            return
        yield _Chunk(bool(response.token_ids), response.usage.completion_tokens)


class ProgressSink(Protocol):
    """Told of every request that ended."""

    def advance(self, count: int = 1) -> None: ...

    def close(self) -> None: ...


class Progress:
    """A one-line progress bar on stderr (no dependency), redrawn at most ten times a second."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.done, self.enabled, self._drawn = total, 0, enabled and sys.stderr.isatty(), 0.0

    def advance(self, count: int = 1) -> None:
        self.done += count
        now = time.monotonic()
        if self.enabled and (now - self._drawn > 0.1 or self.done == self.total):
            filled = 30 * self.done // self.total
            sys.stderr.write(f"\r[{'#' * filled}{'.' * (30 - filled)}] {self.done}/{self.total}")
            sys.stderr.flush()
            self._drawn = now

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")


def summarize(
    records: list[RequestRecord], elapsed_s: float, slo_ttft_ms: float | None, slo_tpot_ms: float | None
) -> dict[str, Any]:
    """Latency percentiles (ms), throughputs, goodput (requests/s meeting every SLO given)."""
    done = [r for r in records if r.ok]
    output_tokens = sum(r.output_tokens for r in done)
    summary: dict[str, Any] = {
        "completed": len(done),
        "failed": len(records) - len(done),
        "errors": sorted({r.error for r in records if r.error})[:5],
        "duration_s": elapsed_s,
        "output_tokens": output_tokens,
        "request_throughput": len(done) / elapsed_s,
        "output_throughput": output_tokens / elapsed_s,
        "total_token_throughput": (output_tokens + sum(r.prompt_tokens for r in done)) / elapsed_s,
    }
    series: dict[str, Sequence[float | None]] = {
        "ttft_ms": [r.ttft_s for r in done],
        "tpot_ms": [r.tpot_s for r in done],
        "itl_ms": [gap for r in done for gap in r.itl_s],
        "e2el_ms": [r.latency_s for r in done],
    }
    for name, values in series.items():
        summary[name] = _stats([1000 * v for v in values if v is not None])
    good = [r for r in done if _meets(r, slo_ttft_ms, slo_tpot_ms)]
    summary["goodput"] = len(good) / elapsed_s
    summary["slo"] = {"ttft_ms": slo_ttft_ms, "tpot_ms": slo_tpot_ms, "met": len(good)}
    return summary


def _meets(record: RequestRecord, slo_ttft_ms: float | None, slo_tpot_ms: float | None) -> bool:
    if slo_ttft_ms is not None and (record.ttft_s is None or 1000 * record.ttft_s > slo_ttft_ms):
        return False
    tpot = record.tpot_s
    return slo_tpot_ms is None or tpot is None or 1000 * tpot <= slo_tpot_ms


def _stats(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "p50": None, "p90": None, "p99": None}
    ordered = sorted(values)

    def pct(q: float) -> float:  # nearest-rank on the sorted values, linearly interpolated
        pos = q * (len(ordered) - 1)
        low = int(pos)
        high = min(low + 1, len(ordered) - 1)
        return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)

    return {"mean": sum(ordered) / len(ordered), "p50": pct(0.5), "p90": pct(0.9), "p99": pct(0.99)}
