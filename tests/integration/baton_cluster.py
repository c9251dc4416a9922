"""Helpers for tests that drive a real local cluster (processes, Redis, UCX over TCP, gRPC)."""

from __future__ import annotations

import asyncio
import io
import itertools
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from baton import LLM, SamplingParams
from baton.services.launcher import ClusterSpec, LocalCluster
from baton.services.registry_check import IdleResult, check_idle
from baton.shared.grpc_tls import GrpcTls, aio_channel
from baton.shared.registry import Registry
from baton.shared.rpc import common_pb2, router_pb2, router_pb2_grpc, worker_pb2, worker_pb2_grpc

_namespaces = itertools.count()
_rng = random.Random(11)


@dataclass
class Completion:
    token_ids: list[int]
    text: str
    finish_reason: str
    error: str
    cached_prompt_tokens: int


class TeeLog(io.TextIOBase):
    """Keeps the cluster's labelled logs (shown by pytest when a test fails)."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def write(self, text: str) -> int:
        self.lines.append(text)
        sys.stderr.write(text)
        return len(text)


def start_cluster(model: Path, redis_url: str, **spec: object) -> LocalCluster:
    defaults: dict[str, object] = {
        "router_port": 0,
        "http_port": None,
        "redis_url": redis_url,
        "namespace": f"test{next(_namespaces)}",
        "lease_ttl_s": 3.0,
        "threads": 1,
        "router_args": ["--local-prefill-max-tokens", "0"],
        "engine_args": ["--max-model-len", "1024"],
    }
    cluster = LocalCluster(ClusterSpec(model=str(model), **{**defaults, **spec}), log=TeeLog())  # type: ignore[arg-type]
    cluster.start(timeout_s=180)
    return cluster


def prompts(n: int, low: int = 20, high: int = 150) -> list[list[int]]:
    """`n` random prompts of `low` to `high - 1` token ids."""
    return [[_rng.randrange(3, 2000) for _ in range(_rng.randrange(low, high))] for _ in range(n)]


def greedy(max_tokens: int, **extra: object) -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **extra)  # type: ignore[arg-type]


async def generate(
    address: str,
    prompt: list[int] | str,
    sampling: common_pb2.SamplingParams,
    timeout_s: float = 120,
    tls: GrpcTls | None = None,
) -> Completion:
    request = router_pb2.GenerateRequest(sampling=sampling)
    if isinstance(prompt, str):
        request.text = prompt
    else:
        request.token_ids.ids.extend(prompt)
    async with aio_channel(address, tls) as channel:
        tokens: list[int] = []
        text, finish, error, cached = "", "", "", 0
        async for response in router_pb2_grpc.RouterStub(channel).Generate(request, timeout=timeout_s):
            tokens += response.token_ids
            text += response.text
            cached = response.usage.cached_prompt_tokens
            if response.finish_reason:
                finish = common_pb2.FinishReason.Name(response.finish_reason)
                error = response.error
        return Completion(tokens, text, finish, error, cached)


def generate_all(
    address: str, prompts: list[list[int]], sampling: common_pb2.SamplingParams, tls: GrpcTls | None = None
) -> list[Completion]:
    async def main() -> list[Completion]:
        return list(await asyncio.gather(*(generate(address, p, sampling, tls=tls) for p in prompts)))

    return asyncio.run(main())


def cluster_registry(cluster: LocalCluster) -> Registry:
    """A client of the cluster's registry (use as `async with`)."""
    return cluster.registry()


async def _worker_stats(cluster: LocalCluster) -> dict[str, worker_pb2.WorkerStats]:
    async with cluster_registry(cluster) as registry:
        workers = await registry.live_workers()
    stats = {}
    for worker in workers:
        async with aio_channel(worker.info.grpc_address, cluster.tls) as channel:
            stub_class = (
                worker_pb2_grpc.DecodeWorkerStub
                if worker.info.role == "decode"
                else worker_pb2_grpc.PrefillWorkerStub
            )
            stats[worker.info.worker_id] = await stub_class(channel).GetStats(
                worker_pb2.GetStatsRequest(check_integrity=True), timeout=10
            )
    return stats


def worker_stats(cluster: LocalCluster) -> dict[str, worker_pb2.WorkerStats]:
    return asyncio.run(_worker_stats(cluster))


def assert_no_leaks(cluster: LocalCluster, timeout_s: float = 10.0) -> None:
    """I3 across the cluster: the registry audit is clean, no live request record is left, and every
    worker's allocator holds no block (everything free or prefix-cached) and passes its integrity check."""

    async def settle() -> IdleResult:
        async with cluster_registry(cluster) as registry:
            return await check_idle(registry, timeout_s, tls=cluster.tls)

    result = asyncio.run(settle())
    assert result.problems == [], result.problems


def expected(offline: LLM, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """What the offline engine generates greedily (ignoring end-of-sequence) for these prompts."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    return [o.token_ids for o in offline.generate(prompts, params)]


# Two tokens whose logprobs differ by less than this are tied. A CPU matmul's kernel, so the order of
# its float32 sums, depends on the batch's shape, and a served batch is never the offline one: that
# moves this model's logits by ~1e-5, so which of two tied tokens greedy decoding picks depends on what
# else was in the batch (one CI run met a pair 1.0e-5 apart).
TIE_LOGPROB_GAP = 1e-3


def greedy_mismatch(offline: LLM, prompt: list[int], got: list[int], want: list[int]) -> str | None:
    """Why `got` is not a greedy completion of `prompt` (or the start of one), else None. `want` is the
    offline engine's greedy completion; where `got` leaves it, the token it took must tie with the best
    one (within TIE_LOGPROB_GAP), and the comparison goes on along `got`'s branch."""
    if len(got) > len(want):
        return f"{len(got)} tokens, more than the {len(want)} asked for"
    while True:
        k = next((i for i, (g, w) in enumerate(zip(got, want, strict=False)) if g != w), None)
        if k is None:
            return None
        probe = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True, logprobs=5)
        top = offline.generate([prompt + got[:k]], probe)[0].logprobs[0]  # type: ignore[index]
        best = max(lp.logprob for lp in top.values())
        gap = best - top[got[k]].logprob if got[k] in top else None
        if gap is None or gap > TIE_LOGPROB_GAP:
            how = "not among the 5 likeliest" if gap is None else f"logprob {gap:.3g} below the best"
            return f"token {k} is {got[k]} where greedy decoding gives {want[k]} ({how})"
        if k + 1 == len(want):
            return None
        want = got[: k + 1] + expected(offline, [prompt + got[: k + 1]], len(want) - k - 1)[0]


def assert_greedy(offline: LLM, prompts: list[list[int]], got: list[Any], max_tokens: int) -> None:
    """Each of `got` is a whole greedy completion (`max_tokens` token ids) of its prompt, up to ties."""
    want = expected(offline, prompts, max_tokens)
    problems = {}
    for i, (prompt, tokens, greedy_tokens) in enumerate(zip(prompts, got, want, strict=True)):
        if not isinstance(tokens, list):  # say, the exception a call raised
            problems[i] = repr(tokens)
            continue
        why = greedy_mismatch(offline, prompt, tokens, greedy_tokens)
        if why is None and len(tokens) < max_tokens:
            why = f"{len(tokens)} tokens of {max_tokens}"
        if why is not None:
            problems[i] = why
    assert not problems, problems


def wait_reaped(cluster: LocalCluster, worker_id: str) -> None:
    """The dead worker and every record naming it leave the registry within about a lease."""

    async def named() -> list[str]:
        async with cluster_registry(cluster) as registry:
            workers = [w.info.worker_id for w in await registry.live_workers()]
            records = [
                r.request_id
                for r in await registry.live_requests()
                if worker_id in (r.owner, r.decode_worker)
            ]
            return [w for w in workers if w == worker_id] + records

    within_s = 2 * cluster.spec.lease_ttl_s
    deadline = time.monotonic() + within_s
    while asyncio.run(named()):
        assert time.monotonic() < deadline, (
            f"{worker_id} not reaped within {within_s} s: {asyncio.run(named())}"
        )
        time.sleep(0.2)
