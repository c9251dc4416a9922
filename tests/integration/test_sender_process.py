"""The prefill worker's KV sending process: a real child process reading the worker's KV cache (shared
memory), real UCX on TCP loopback to a real UcxKVReceiver in this process. Checks what reaches the
receiver, and the block-ownership contract: every announced prompt is released exactly once, after
the child stopped reading it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import torch
from child_process_helpers import LAYOUT, NUM_CACHE_BLOCKS, assert_child_dies_with_its_worker, run

from baton.services.lifecycle import LOG_FORMAT
from baton.services.prefill.sender_process import SenderProcess, SenderSpec
from baton.shared.engine.kv_cache import KVCaches
from baton.shared.transfer import TransferError, TransferSecret, UcxKVReceiver

pytestmark = pytest.mark.integration


def new_caches() -> KVCaches:
    shape = (NUM_CACHE_BLOCKS, LAYOUT.block_size, LAYOUT.num_kv_heads, LAYOUT.head_dim)
    return [(torch.randn(shape), torch.randn(shape)) for _ in range(LAYOUT.num_layers)]


def spec(**overrides: Any) -> SenderSpec:
    settings: dict[str, Any] = dict(
        layout=LAYOUT,
        faults="",
        max_pushes_per_address=8,
        connections_per_address=2,
        attention_backend="torch",
        log_format=LOG_FORMAT,
        log_level=logging.WARNING,
        run_nbytes=2 * LAYOUT.layer_nbytes(2),  # two layers a message for a 2-block prompt
    )
    return SenderSpec(**(settings | overrides))


class DecodeSide:
    """A receiver's handler that scatters pushed layers into a cache of its own and records what
    happened; `refuse` nacks completes."""

    def __init__(self) -> None:
        self.cache = torch.zeros(LAYOUT.num_layers, 2, NUM_CACHE_BLOCKS, LAYOUT.block_size, 2, 16)
        self.blocks: dict[str, list[int]] = {}
        self.messages: dict[str, list[int]] = {}  # request -> first layer of each message
        self.trailers: dict[str, dict[str, Any]] = {}
        self.failed: dict[str, str] = {}
        self.refuse: str | None = None

    async def begin(self, request_id: str, block_ids: list[int], num_layers: int) -> None:
        self.blocks[request_id] = block_ids

    def write_layers(self, request_id: str, first_layer: int, kv: torch.Tensor) -> None:
        self.messages.setdefault(request_id, []).append(first_layer)
        for i, layer_kv in enumerate(kv):
            self.cache[first_layer + i][:, self.blocks[request_id]] = layer_kv

    async def complete(self, request_id: str, trailer: dict[str, Any]) -> dict[str, Any]:
        if self.refuse is not None:
            raise TransferError(self.refuse)
        self.trailers[request_id] = trailer
        return {"ok": True}

    def fail(self, request_id: str, reason: str) -> None:
        self.failed[request_id] = reason

    async def wait_failed(self, request_id: str, timeout_s: float = 10.0) -> str:
        async with asyncio.timeout(timeout_s):
            while request_id not in self.failed:
                await asyncio.sleep(0.02)
        return self.failed[request_id]


class Releases:
    """The engine's side of the contract: counts each request's releases."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def __call__(self, request_id: str) -> None:
        self.counts[request_id] = self.counts.get(request_id, 0) + 1

    async def wait(self, request_id: str, timeout_s: float = 10.0) -> None:
        async with asyncio.timeout(timeout_s):
            while request_id not in self.counts:
                await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def pushing(
    caches: KVCaches,
    releases: Releases,
    decode: DecodeSide,
    secret: TransferSecret | None = None,
    **spec_overrides: Any,
) -> AsyncIterator[tuple[str, SenderProcess]]:
    """A receiver for `decode` (its address) and a started sending process over `caches`; with
    `secret`, both ends have it."""
    receiver = UcxKVReceiver(LAYOUT, decode, host="127.0.0.1", secret=secret)
    await receiver.start()
    sender = SenderProcess(spec(secret=secret, **spec_overrides), caches, releases)
    try:
        await sender.start()
        yield receiver.address, sender
    finally:
        await sender.close()
        await receiver.close()


def test_a_shipped_prompt_arrives_whole_and_its_blocks_are_released_once() -> None:
    caches, releases, decode = new_caches(), Releases(), DecodeSide()

    async def main() -> None:
        async with pushing(caches, releases, decode) as (address, sender):
            sender.open("r", address, [10, 11], LAYOUT.num_layers)  # decode-side blocks
            sender.ship("r", [3, 7], None)  # prefill-side blocks
            await releases.wait("r")
            result = await sender.finish("r", {"token_id": 5}, timeout_s=10)
        assert result.nbytes == LAYOUT.num_layers * LAYOUT.layer_nbytes(2)
        assert {"engine_ms", "copy_ms", "send_ms"} <= set(result.push_ms)
        assert decode.messages["r"] == [0, 2]  # runs of two layers, then the last alone
        assert decode.trailers["r"] == {"token_id": 5}
        for layer, (k, v) in enumerate(caches):
            assert torch.equal(decode.cache[layer, 0, [10, 11]], k[[3, 7]])
            assert torch.equal(decode.cache[layer, 1, [10, 11]], v[[3, 7]])
        assert releases.counts == {"r": 1}

    run(main())


def test_the_child_proves_the_secret_and_a_refusal_names_the_cause() -> None:
    """The worker's secret reaches its sending process (pickled with its spec): its pushes land on a
    decode worker with the same secret; one with another secret refuses the connection, the push
    fails with that cause (for the router to place the request again), and the blocks are released."""
    caches, releases, decode = new_caches(), Releases(), DecodeSide()
    other = DecodeSide()

    async def main() -> None:
        async with pushing(caches, releases, decode, TransferSecret("kv-secret-of-this-cluster")) as (
            address,
            sender,
        ):
            sender.open("r", address, [10, 11], LAYOUT.num_layers)
            sender.ship("r", [3, 7], None)
            await sender.finish("r", {"token_id": 5}, timeout_s=10)
            stranger = UcxKVReceiver(LAYOUT, other, host="127.0.0.1", secret=TransferSecret("x" * 16))
            await stranger.start()
            try:
                sender.open("s", stranger.address, [1], LAYOUT.num_layers)
                sender.ship("s", [2], None)
                with pytest.raises(TransferError) as refused:
                    await sender.finish("s", {}, timeout_s=10)
            finally:
                await stranger.close()
        assert str(refused.value) == (
            f"the decode worker at {stranger.address} refused the KV connection: authentication failed: "
            "wrong proof of the KV transfer secret (the secrets differ)"
        )
        assert releases.counts == {"r": 1, "s": 1}

    run(main())
    assert decode.trailers == {"r": {"token_id": 5}}
    for layer, (k, v) in enumerate(caches):
        assert torch.equal(decode.cache[layer, 0, [10, 11]], k[[3, 7]])
        assert torch.equal(decode.cache[layer, 1, [10, 11]], v[[3, 7]])
    assert other.blocks == {} and not other.cache.any()


def test_aborted_pushes_release_their_blocks_and_tell_the_receiver() -> None:
    caches, releases, decode = new_caches(), Releases(), DecodeSide()

    async def main() -> None:
        async with pushing(caches, releases, decode) as (address, sender):
            # aborted while its prompt computes: the announcement that follows is released at once
            sender.open("early", address, [1], LAYOUT.num_layers)
            await asyncio.sleep(0.3)  # connected and begun
            sender.abort("early", "client went away")
            assert "client went away" in await decode.wait_failed("early")
            sender.ship("early", [2], None)
            await releases.wait("early")
            with pytest.raises(TransferError, match="no push"):
                await sender.finish("early", {}, timeout_s=5)
            # aborted after its announcement: released once, the receiver fails it
            sender.open("late", address, [4], LAYOUT.num_layers)
            sender.ship("late", [5], None)
            await releases.wait("late")
            sender.abort("late", "router cancelled")
            assert "router cancelled" in await decode.wait_failed("late")
            # the receiver refuses the handoff: finish raises, the blocks were released once
            decode.refuse = "no room"
            sender.open("nacked", address, [6], LAYOUT.num_layers)
            sender.ship("nacked", [7], None)
            with pytest.raises(TransferError, match="no room"):
                await sender.finish("nacked", {}, timeout_s=10)
            # an unreachable receiver: the push fails, the announced blocks are released anyway
            sender.open("lost", "ucx://127.0.0.1:1", [8], LAYOUT.num_layers)
            sender.ship("lost", [9], None)
            with pytest.raises(TransferError):
                await sender.finish("lost", {}, timeout_s=10)
            await releases.wait("lost")
        assert releases.counts == {"early": 1, "late": 1, "nacked": 1, "lost": 1}

    run(main())


def test_announced_blocks_are_released_without_waiting_for_a_slow_connection() -> None:
    """The copy comes first: a receiver that takes its time to connect (here a socket that never
    answers UCX's handshake) must not keep the engine's blocks."""
    caches, releases, decode = new_caches(), Releases(), DecodeSide()

    async def main() -> None:
        with socket.socket() as silent:
            silent.bind(("127.0.0.1", 0))
            silent.listen()
            async with pushing(caches, releases, decode) as (_, sender):
                sender.open("r", f"ucx://127.0.0.1:{silent.getsockname()[1]}", [1], LAYOUT.num_layers)
                await asyncio.sleep(0.5)  # connecting
                started = time.monotonic()
                sender.ship("r", [2], None)
                await releases.wait("r", timeout_s=2)
                assert time.monotonic() - started < 2  # long before the connection attempt gives up
                sender.abort("r", "gave up")
        assert releases.counts == {"r": 1}

    run(main())


def test_copied_out_kv_is_bounded_by_the_copy_buffer_and_the_engine_keeps_what_does_not_fit() -> None:
    """With room for one prompt's KV, a push stuck connecting holds the whole buffer: the next prompt
    is not copied out (its blocks stay the engine's) until the stuck one goes, then arrives whole."""
    caches, releases, decode = new_caches(), Releases(), DecodeSide()
    one_prompt = LAYOUT.num_layers * LAYOUT.layer_nbytes(2)

    async def main() -> None:
        with socket.socket() as silent:
            silent.bind(("127.0.0.1", 0))
            silent.listen()
            async with pushing(caches, releases, decode, copy_buffer_nbytes=one_prompt) as (address, sender):
                sender.open("stuck", f"ucx://127.0.0.1:{silent.getsockname()[1]}", [1, 2], LAYOUT.num_layers)
                sender.ship("stuck", [3, 4], None)
                await releases.wait("stuck")  # copied out: it holds the buffer while it connects
                sender.open("next", address, [10, 11], LAYOUT.num_layers)
                sender.ship("next", [3, 7], None)
                await asyncio.sleep(0.5)
                assert "next" not in releases.counts  # not copied: the engine keeps its blocks
                sender.abort("stuck", "gave up")
                await releases.wait("next")
                result = await sender.finish("next", {"token_id": 5}, timeout_s=10)
        assert result.push_ms["buffer_ms"] >= 400
        for layer, (k, v) in enumerate(caches):
            assert torch.equal(decode.cache[layer, 0, [10, 11]], k[[3, 7]])
            assert torch.equal(decode.cache[layer, 1, [10, 11]], v[[3, 7]])
        assert releases.counts == {"stuck": 1, "next": 1}

    run(main())


def test_the_worker_hears_when_the_child_dies_and_gets_its_blocks_back() -> None:
    caches, releases, decode = new_caches(), Releases(), DecodeSide()

    async def main() -> None:
        async with pushing(caches, releases, decode) as (address, sender):
            lost = asyncio.Event()
            sender.on_lost = lost.set
            sender.open("r", address, [1], LAYOUT.num_layers)
            assert sender.pid is not None
            os.kill(sender.pid, signal.SIGKILL)
            sender.ship("r", [2], None)  # the pipe may still take it; nobody will read the blocks
            await asyncio.wait_for(lost.wait(), 10)
            await releases.wait("r")
            with pytest.raises(TransferError):
                await sender.finish("r", {}, timeout_s=5)
            with pytest.raises(TransferError, match="not running"):
                sender.open("s", address, [1], LAYOUT.num_layers)
            sender.ship("s", [3], None)  # announced after the child died: released at once
        assert releases.counts == {"r": 1, "s": 1}

    run(main())


WORKER_SCRIPT = """
import asyncio, logging, torch
from baton.services.prefill.sender_process import SenderProcess, SenderSpec
from baton.shared.transfer import KVLayout

async def main():
    layout = KVLayout.from_dict({layout!r})
    caches = [(torch.zeros(8, 4, 2, 16), torch.zeros(8, 4, 2, 16)) for _ in range(layout.num_layers)]
    spec = SenderSpec(layout, "", 8, 2, "torch", "%(message)s", logging.WARNING)
    process = SenderProcess(spec, caches, lambda request_id: None)
    await process.start()
    print(process.pid, flush=True)
    await asyncio.sleep(600)

if __name__ == "__main__":
    asyncio.run(main())
"""


def test_the_child_dies_with_its_worker(tmp_path: Path) -> None:
    """kill -9 of a prefill worker must break its pushes off at once, as in one process."""
    assert_child_dies_with_its_worker(tmp_path, WORKER_SCRIPT.format(layout=LAYOUT.to_dict()), "sending")
