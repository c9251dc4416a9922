"""The decode worker's KV receiving process: a real child process, real UCX on TCP loopback, the
worker's KV cache shared with it. The worker's side is a recording HandoffHandler."""

from __future__ import annotations

import array
import asyncio
import json
import logging
import os
import signal
import socket
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from child_process_helpers import LAYOUT, NUM_CACHE_BLOCKS, assert_child_dies_with_its_worker, run

from baton.services.decode.receiver_process import ReceiverProcess, ReceiverSpec
from baton.services.lifecycle import LOG_FORMAT
from baton.shared.engine.kv_cache import KVCaches
from baton.shared.transfer import FaultConfig, TransferError, TransferRefused, TransferSecret, UcxKVSender
from baton.shared.transfer.protocol import encode_message
from baton.shared.transfer.ucx import parse_ucx_address, ucx_for_this_loop

pytestmark = pytest.mark.integration


class RecordingWorker:
    """Stands in for the decode service: records handoffs and failures; `refuse` nacks completes."""

    def __init__(self) -> None:
        self.completed: dict[str, int] = {}
        self.failed: dict[str, str] = {}
        self.refuse: str | None = None

    async def complete(self, request_id: str, trailer: dict[str, Any], nbytes: int) -> dict[str, Any]:
        if self.refuse is not None:
            raise TransferError(self.refuse)
        self.completed[request_id] = nbytes
        return {"ok": True, "tokens": trailer["num_tokens"]}

    def fail(self, request_id: str, reason: str) -> None:
        assert request_id not in self.failed, f"fail({request_id!r}) reported twice"
        self.failed[request_id] = reason

    async def wait_failed(self, request_id: str, timeout_s: float = 10.0) -> str:
        async with asyncio.timeout(timeout_s):
            while request_id not in self.failed:
                await asyncio.sleep(0.02)
        return self.failed[request_id]


def new_caches() -> KVCaches:
    shape = (NUM_CACHE_BLOCKS, LAYOUT.block_size, LAYOUT.num_kv_heads, LAYOUT.head_dim)
    return [(torch.zeros(shape), torch.zeros(shape)) for _ in range(LAYOUT.num_layers)]


def spec(**overrides: Any) -> ReceiverSpec:
    settings: dict[str, Any] = dict(
        layout=LAYOUT,
        host="127.0.0.1",
        port=0,
        advertise_host=None,
        attention_backend="torch",
        log_format=LOG_FORMAT,
        log_level=logging.WARNING,
        idle_timeout_s=10.0,
        announce_wait_s=0.3,
    )
    return ReceiverSpec(**(settings | overrides))


def random_layers(num_blocks: int, seed: int) -> list[torch.Tensor]:
    """Never-zero KV for every layer: [2, num_blocks, block_size, kv_heads, head_dim] each."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.rand(LAYOUT.layer_shape(num_blocks), generator=gen) + 1.0 for _ in range(LAYOUT.num_layers)]


def assert_in_cache(caches: KVCaches, block_ids: list[int], layers: list[torch.Tensor]) -> None:
    for layer, kv in enumerate(layers):
        k_cache, v_cache = caches[layer]
        assert torch.equal(k_cache[block_ids], kv[0]) and torch.equal(v_cache[block_ids], kv[1]), layer


async def push(sender: UcxKVSender, address: str, request_id: str, block_ids: list[int], seed: int) -> Any:
    layers = random_layers(len(block_ids), seed)
    session = await sender.open(address, request_id, block_ids, LAYOUT.num_layers)
    await session.send_layers(0, torch.stack(layers))
    return await session.finish({"num_tokens": 7})


def test_pushes_land_in_the_shared_cache_and_failures_reach_the_worker() -> None:
    caches, worker = new_caches(), RecordingWorker()

    async def main() -> None:
        process = ReceiverProcess(spec(), caches, worker)
        await process.start()
        sender, corrupting = UcxKVSender(LAYOUT), UcxKVSender(LAYOUT, FaultConfig(corrupt=1.0, seed=0))
        try:
            process.reserve("a", [3, 17, 8], None)
            process.reserve("b", [30, 0], None)
            acks = await asyncio.gather(
                push(sender, process.address, "a", [3, 17, 8], seed=1),
                push(sender, process.address, "b", [30, 0], seed=2),
            )
            assert [ack["tokens"] for ack in acks] == [7, 7]
            assert worker.completed == {"a": 3 * LAYOUT.layer_nbytes(3), "b": 3 * LAYOUT.layer_nbytes(2)}
            assert_in_cache(caches, [3, 17, 8], random_layers(3, seed=1))  # written by the child
            assert_in_cache(caches, [30, 0], random_layers(2, seed=2))

            process.reserve("bad", [5], None)  # a corrupted payload: nacked, and the worker is told
            with pytest.raises(TransferError, match="checksum mismatch"):
                await push(corrupting, process.address, "bad", [5], seed=3)
            assert "checksum mismatch" in await worker.wait_failed("bad")

            worker.refuse = "request 'late' is no longer reserved here"  # the worker nacks
            process.reserve("late", [6], None)
            with pytest.raises(TransferError, match="no longer reserved"):
                await push(sender, process.address, "late", [6], seed=4)
            assert "no longer reserved" in await worker.wait_failed("late")
            assert set(worker.completed) == {"a", "b"}
        finally:
            await sender.close()
            await corrupting.close()
            await process.close()

    run(main())


SECRET = "the-decode-worker-kv-secret"


async def hung_up_on(address: str, *messages: Any, timeout_s: float = 5.0) -> list[dict[str, Any]]:
    """Connect with raw ucxx, read the receiver's first message (its challenge), send `messages` as
    they come (a dict as Baton's sender sends one, an array as a payload) without any handshake, and
    read until the receiver hangs up; what it sent. A send the hang-up cuts short ends it too (the
    receiver refuses at the first message it does not expect, maybe before the rest is out)."""
    ucx = ucx_for_this_loop()
    ep = await ucx.create_endpoint(*parse_ucx_address(address))
    received = []
    try:
        async with asyncio.timeout(timeout_s):
            received.append(json.loads(bytes(await ep.recv_obj())))
            for message in messages:
                is_message = isinstance(message, dict)
                await (ep.send_obj(encode_message(message)) if is_message else ep.send(message))
            while True:
                received.append(json.loads(bytes(await ep.recv_obj())))
    except ucx.exceptions.UCXError:
        return received  # hung up on
    finally:
        ep.abort()


def test_only_senders_that_prove_the_secret_write_into_the_cache() -> None:
    """UCX listens on every interface: whoever reaches the port may connect, but only a sender that
    proves the worker's secret gets a request, or a byte, into its cache. Wrong or missing proofs,
    raw clients that skip the handshake or stay silent, and junk on the TCP port are turned away
    without touching the reservation, and the listener serves on."""
    caches, worker = new_caches(), RecordingWorker()
    block_ids = [3, 17, 8]
    nbytes = LAYOUT.layer_nbytes(len(block_ids))
    layer = {"type": "layer", "request_id": "r", "layer": 0, "count": 1, "nbytes": nbytes}
    begin = {"type": "begin", "request_id": "r", "block_ids": block_ids, "num_layers": LAYOUT.num_layers}
    payload = np.full(nbytes, 7, dtype=np.uint8)

    async def main() -> None:
        secure = spec(secret=TransferSecret(SECRET), handshake_timeout_s=1.0)
        process = ReceiverProcess(secure, caches, worker)
        await process.start()
        right = UcxKVSender(LAYOUT, secret=TransferSecret(SECRET))
        wrong = UcxKVSender(LAYOUT, secret=TransferSecret("a-different-kv-secret"))
        missing = UcxKVSender(LAYOUT)
        try:
            process.reserve("r", block_ids, None)
            refused = "refused the KV connection: authentication failed: "
            with pytest.raises(TransferRefused, match=refused + "wrong proof"):
                await push(wrong, process.address, "r", block_ids, seed=1)
            with pytest.raises(TransferRefused, match=refused + "no proof"):
                await push(missing, process.address, "r", block_ids, seed=1)
            # a payload, a request, a size header announcing a TiB, silence (past the 1 s handshake)
            for raw in ((payload,), (begin, layer, payload), (array.array("Q", [1 << 40]),), ()):
                got = await hung_up_on(process.address, *raw)
                assert [m["type"] for m in got] == ["challenge"], raw
            with socket.create_connection(parse_ucx_address(process.address)) as junk:
                junk.sendall(b"GET / HTTP/1.1\r\n\r\n" + bytes(range(256)) * 16)
            assert not any(k.any() or v.any() for k, v in caches)  # not a byte written
            assert worker.failed == {}  # nor the reservation disturbed: it still takes the push
            ack = await push(right, process.address, "r", block_ids, seed=1)
        finally:
            await right.close()
            await wrong.close()
            await missing.close()
            await process.close()
        assert ack == {"ok": True, "tokens": 7}

    run(main())
    assert worker.completed == {"r": LAYOUT.num_layers * nbytes} and worker.failed == {}
    assert_in_cache(caches, block_ids, random_layers(len(block_ids), seed=1))
    untouched = [b for b in range(NUM_CACHE_BLOCKS) if b not in block_ids]
    assert not any(k[untouched].any() or v[untouched].any() for k, v in caches)


def test_unannounced_and_revoked_reservations_get_no_writes() -> None:
    caches, worker = new_caches(), RecordingWorker()

    async def main() -> None:
        process = ReceiverProcess(spec(), caches, worker)
        await process.start()
        sender = UcxKVSender(LAYOUT)
        try:
            with pytest.raises(TransferError, match="holds no reservation"):
                await push(sender, process.address, "ghost", [1, 2], seed=1)

            process.reserve("gone", [4], None)
            await process.revoke("gone")
            with pytest.raises(TransferError, match="holds no reservation"):
                await push(sender, process.address, "gone", [4], seed=2)

            # revoked between two messages of one push: nothing is written after revoke() returned
            process.reserve("mid", [9, 10], None)
            layers = random_layers(2, seed=3)
            session = await sender.open(process.address, "mid", [9, 10], LAYOUT.num_layers)
            await session.send_layers(0, layers[0].unsqueeze(0))
            async with asyncio.timeout(10):
                while not torch.equal(caches[0][0][[9, 10]], layers[0][0]):  # the first message landed
                    await asyncio.sleep(0.02)
            await process.revoke("mid")
            await session.send_layers(1, torch.stack(layers[1:]))
            with pytest.raises(TransferError, match="aborted while its KV arrived"):
                await session.finish({"num_tokens": 7})
            for layer in (1, 2):
                assert not caches[layer][0][[9, 10]].any() and not caches[layer][1][[9, 10]].any()
            assert worker.completed == {} and worker.failed == {}  # revoked: the worker already knows
        finally:
            await sender.close()
            await process.close()

    run(main())


def test_the_worker_hears_when_the_child_dies_or_cannot_start() -> None:
    worker = RecordingWorker()

    async def main() -> None:
        process = ReceiverProcess(spec(), new_caches(), worker)
        await process.start()
        lost = asyncio.Event()
        process.on_lost = lost.set
        process.reserve("r", [1], None)
        os.kill(process.pid, signal.SIGKILL)
        await asyncio.wait_for(lost.wait(), 10)
        assert not process.alive
        await asyncio.wait_for(process.revoke("r"), 1)  # nothing writes any more: returns at once
        await process.close()

        taken = ReceiverProcess(spec(), new_caches(), worker)
        await taken.start()
        clash = ReceiverProcess(spec(port=int(taken.address.rpartition(":")[2])), new_caches(), worker)
        try:
            with pytest.raises(RuntimeError, match="failed to start"):
                await clash.start()
        finally:
            await taken.close()

    run(main())


WORKER_SCRIPT = """
import asyncio, logging, sys, torch
from baton.services.decode.receiver_process import ReceiverProcess, ReceiverSpec
from baton.shared.transfer import KVLayout

class Worker:
    async def complete(self, request_id, trailer, nbytes):
        return {{}}

    def fail(self, request_id, reason):
        pass

async def main():
    layout = KVLayout.from_dict({layout!r})
    caches = [(torch.zeros(8, 4, 2, 16), torch.zeros(8, 4, 2, 16)) for _ in range(layout.num_layers)]
    spec = ReceiverSpec(layout, "127.0.0.1", 0, None, "torch", "%(message)s", logging.WARNING)
    process = ReceiverProcess(spec, caches, Worker())
    await process.start()
    print(process.pid, flush=True)
    await asyncio.sleep(600)

if __name__ == "__main__":
    asyncio.run(main())
"""


def test_the_child_exits_when_its_worker_is_killed(tmp_path: Path) -> None:
    """kill -9 of a decode worker must not leave its receiving process holding the UCX port."""
    assert_child_dies_with_its_worker(tmp_path, WORKER_SCRIPT.format(layout=LAYOUT.to_dict()), "receiving")
