"""KV transfers that go wrong between real workers: every push corrupted, or every push stalled past
the decode worker's reservation timeout. The router places the request again (new blocks, and the
decode worker prefilling it itself once the prefill worker is to be avoided): each request either
completes token for token as offline, or ends with UNAVAILABLE naming the cause after its last
attempt; in bounded time, with nothing left held in any worker or in the registry."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from baton_cluster import assert_no_leaks, expected, generate, greedy, greedy_mismatch, prompts

from baton import LLM

pytestmark = pytest.mark.integration


def _outcomes(cluster, batch: list[list[int]]) -> list:
    """Send the prompts at once; each one's Completion, or its error."""

    async def main() -> list:
        calls = (generate(cluster.router_address, p, greedy(4), timeout_s=60) for p in batch)
        return list(await asyncio.gather(*calls, return_exceptions=True))

    return asyncio.run(main())


@pytest.mark.parametrize(
    ("prefill_args", "worker_args", "cause"),
    [
        (["--kv-faults", "corrupt=1.0,seed=0"], [], "checksum mismatch"),
        (["--kv-faults", "delay_s=2"], ["--reservation-timeout-s", "1"], "did not arrive within 1 s"),
    ],
    ids=["corrupted", "stalled"],
)
def test_a_push_that_always_fails_completes_elsewhere_or_ends_with_a_clear_error(
    make_cluster, offline: LLM, prefill_args: list[str], worker_args: list[str], cause: str
) -> None:
    cluster = make_cluster(num_prefill=1, num_decode=1, prefill_args=prefill_args, worker_args=worker_args)
    batch = prompts(4, 40, 80)
    started = time.monotonic()
    outcomes = _outcomes(cluster, batch)
    assert time.monotonic() - started < 45  # three attempts at most each, never a hang
    for prompt, outcome, tokens in zip(batch, outcomes, expected(offline, batch, 4), strict=True):
        if isinstance(outcome, BaseException):
            assert isinstance(outcome, grpc.aio.AioRpcError), outcome
            assert outcome.code() is grpc.StatusCode.UNAVAILABLE
            details = outcome.details() or ""
            assert "failed after 3 attempts" in details and cause in details, details
        else:
            assert outcome.finish_reason == "FINISH_REASON_LENGTH" and len(outcome.token_ids) == 4
            assert greedy_mismatch(offline, prompt, outcome.token_ids, tokens) is None
    assert_no_leaks(cluster)
