"""KV transfer over real UCX (ucxx) on TCP loopback: round trips, concurrency, refusals, failures."""

from __future__ import annotations

import asyncio
import json
import socket
import sys
from collections.abc import Coroutine
from typing import Any, TypeVar

import pytest
import torch

from baton.shared.transfer import (
    FaultConfig,
    KVLayout,
    TransferError,
    TransferRefused,
    UcxKVReceiver,
    UcxKVSender,
    stop_ucx,
)

pytestmark = pytest.mark.integration

T = TypeVar("T")
SMALL = KVLayout(model_id="tiny@1", num_layers=4, block_size=4, num_kv_heads=2, head_dim=16, dtype="bfloat16")
# one block of one layer: 2 * 16 * 8 * 128 * 2 bytes = 64 KiB, so 1024 blocks make a 64 MiB layer
LARGE = KVLayout(
    model_id="big@1", num_layers=2, block_size=16, num_kv_heads=8, head_dim=128, dtype="bfloat16"
)


def run(coro: Coroutine[Any, Any, T], timeout_s: float = 30) -> T:
    async def main() -> T:
        try:
            return await asyncio.wait_for(coro, timeout=timeout_s)
        finally:
            stop_ucx()  # this loop closes next; the next test starts UCX on its own loop

    return asyncio.run(main())


class ScatterHandler:
    """A decode worker's stand-in: scatters received layers into a KV cache by block id."""

    def __init__(self, layout: KVLayout, num_cache_blocks: int) -> None:
        # cache: [num_layers, 2, num_cache_blocks, block_size, kv_heads, head_dim]
        self.cache = torch.zeros(
            (layout.num_layers, *layout.layer_shape(num_cache_blocks)), dtype=layout.torch_dtype
        )
        self.blocks: dict[str, list[int]] = {}
        self.completed: dict[str, dict[str, Any]] = {}
        self.failed: dict[str, str] = {}

    async def begin(self, request_id: str, block_ids: list[int], num_layers: int) -> None:
        self.blocks[request_id] = block_ids

    def write_layers(self, request_id: str, first_layer: int, kv: torch.Tensor) -> None:
        for i, layer_kv in enumerate(kv):
            self.cache[first_layer + i][:, self.blocks[request_id]] = layer_kv

    async def complete(self, request_id: str, trailer: dict[str, Any]) -> dict[str, Any]:
        self.completed[request_id] = trailer
        return {"request_id": request_id}

    def fail(self, request_id: str, reason: str) -> None:
        if request_id in self.failed or request_id in self.completed:
            raise AssertionError(f"fail({request_id!r}) called twice or after complete")
        self.failed[request_id] = reason

    async def wait_failed(self, request_id: str, timeout_s: float = 10.0) -> str:
        deadline = asyncio.get_running_loop().time() + timeout_s
        while request_id not in self.failed:
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"handler.fail({request_id!r}) not called within {timeout_s} s")
            await asyncio.sleep(0.02)
        return self.failed[request_id]


def random_layers(layout: KVLayout, num_blocks: int, seed: int) -> list[torch.Tensor]:
    """Random, never-zero KV for every layer."""
    gen = torch.Generator().manual_seed(seed)
    shape = layout.layer_shape(num_blocks)
    return [
        torch.rand(shape, generator=gen).add_(1.0).to(layout.torch_dtype) for _ in range(layout.num_layers)
    ]


async def push(
    sender: UcxKVSender, address: str, request_id: str, block_ids: list[int], layers: list[torch.Tensor]
) -> dict[str, Any]:
    session = await sender.open(address, request_id, block_ids, len(layers))
    for layer, kv in enumerate(layers):
        await session.send_layer(layer, kv)
    return await session.finish({"num_tokens": 7})


def assert_scattered(handler: ScatterHandler, block_ids: list[int], layers: list[torch.Tensor]) -> None:
    for layer, kv in enumerate(layers):
        assert torch.equal(handler.cache[layer][:, block_ids], kv), f"layer {layer} differs"


def test_round_trip_small_layers_reusing_the_endpoint() -> None:
    handler = ScatterHandler(SMALL, num_cache_blocks=32)
    requests = {"a": [3, 17, 8], "b": [30, 0]}
    layers = {rid: random_layers(SMALL, len(ids), seed=i) for i, (rid, ids) in enumerate(requests.items())}

    async def main() -> list[dict[str, Any]]:
        receiver = UcxKVReceiver(SMALL, handler)
        await receiver.start()
        sender = UcxKVSender(SMALL)
        try:
            return [
                await push(sender, receiver.address, rid, ids, layers[rid]) for rid, ids in requests.items()
            ]
        finally:
            await sender.close()
            await receiver.close()

    assert run(main()) == [{"request_id": "a"}, {"request_id": "b"}]
    assert handler.completed == {"a": {"num_tokens": 7}, "b": {"num_tokens": 7}} and handler.failed == {}
    for rid, ids in requests.items():
        assert_scattered(handler, ids, layers[rid])


def test_round_trip_64_mib_layers() -> None:
    block_ids = list(range(1024))
    layers = random_layers(LARGE, len(block_ids), seed=5)
    assert layers[0].nbytes == 64 << 20
    handler = ScatterHandler(LARGE, num_cache_blocks=1024)

    async def main() -> dict[str, Any]:
        receiver = UcxKVReceiver(LARGE, handler, advertise_host="localhost")
        await receiver.start()
        assert receiver.address.startswith("ucx://localhost:")
        sender = UcxKVSender(LARGE)
        try:
            return await push(
                sender, receiver.address.replace("localhost", "127.0.0.1"), "big", block_ids, layers
            )
        finally:
            await sender.close()
            await receiver.close()

    assert run(main()) == {"request_id": "big"}
    assert_scattered(handler, block_ids, layers)


def test_four_concurrent_pushes_from_one_sender() -> None:
    handler = ScatterHandler(SMALL, num_cache_blocks=32)
    requests = {f"req-{i}": [8 * i + j for j in range(5)] for i in range(4)}
    layers = {rid: random_layers(SMALL, 5, seed=10 + i) for i, rid in enumerate(requests)}

    async def main() -> None:
        receiver = UcxKVReceiver(SMALL, handler)
        await receiver.start()
        sender = UcxKVSender(SMALL, FaultConfig(delay_s=0.01))  # keeps the four pushes overlapping
        try:
            acks = await asyncio.gather(
                *(push(sender, receiver.address, rid, ids, layers[rid]) for rid, ids in requests.items())
            )
            assert [a["request_id"] for a in acks] == list(requests)
        finally:
            await sender.close()
            await receiver.close()

    run(main())
    assert sorted(handler.completed) == sorted(requests) and handler.failed == {}
    for rid, ids in requests.items():
        assert_scattered(handler, ids, layers[rid])


def test_pushes_beyond_the_cap_wait_and_the_rest_share_two_endpoints() -> None:
    handler = ScatterHandler(SMALL, num_cache_blocks=32)
    requests = {f"req-{i}": [4 * i + j for j in range(3)] for i in range(6)}
    layers = {rid: random_layers(SMALL, 3, seed=20 + i) for i, rid in enumerate(requests)}
    n = SMALL.num_layers

    async def main() -> None:
        receiver = UcxKVReceiver(SMALL, handler)
        await receiver.start()
        sender = UcxKVSender(
            SMALL, FaultConfig(delay_s=0.01), max_pushes_per_address=2, connections_per_address=2
        )
        try:
            first = await sender.open(receiver.address, "held", [30], n)
            second = await sender.open(receiver.address, "held-too", [31], n)
            third = asyncio.create_task(sender.open(receiver.address, "waiting", [29], n))
            await asyncio.sleep(0.2)
            assert not third.done()  # both slots are taken
            await first.abort("test")
            await (await third).abort("test")
            await second.abort("test")
            many = UcxKVSender(SMALL, FaultConfig(delay_s=0.01), connections_per_address=2)
            try:  # six pushes at once, multiplexed over two endpoints
                await asyncio.gather(
                    *(push(many, receiver.address, rid, ids, layers[rid]) for rid, ids in requests.items())
                )
                assert len(many._pools[receiver.address]) == 2
            finally:
                await many.close()
        finally:
            await sender.close()
            await receiver.close()

    run(main())
    assert sorted(handler.completed) == sorted(requests)
    for rid, ids in requests.items():
        assert_scattered(handler, ids, layers[rid])


def test_layout_mismatch_is_refused() -> None:
    handler = ScatterHandler(SMALL, num_cache_blocks=4)
    other_model = KVLayout(
        "tiny@2", num_layers=4, block_size=4, num_kv_heads=2, head_dim=16, dtype="bfloat16"
    )

    async def main() -> None:
        receiver = UcxKVReceiver(SMALL, handler)
        await receiver.start()
        sender = UcxKVSender(other_model)
        try:
            with pytest.raises(TransferRefused, match="model_id: 'tiny@1' vs 'tiny@2'"):
                await sender.open(receiver.address, "req", [0], 4)
        finally:
            await sender.close()
            await receiver.close()

    run(main())
    assert handler.blocks == {} and handler.failed == {}


def test_corruption_is_detected_and_the_receiver_keeps_serving() -> None:
    handler = ScatterHandler(SMALL, num_cache_blocks=8)
    layers = random_layers(SMALL, 2, seed=2)

    async def main() -> None:
        receiver = UcxKVReceiver(SMALL, handler)
        await receiver.start()
        bad, good = UcxKVSender(SMALL, FaultConfig.parse("corrupt=1,seed=1")), UcxKVSender(SMALL)
        try:
            with pytest.raises(TransferError, match="layer 0: checksum mismatch"):
                await push(bad, receiver.address, "bad", [0, 1], layers)
            assert await push(good, receiver.address, "good", [2, 3], layers) == {"request_id": "good"}
        finally:
            await bad.close()
            await good.close()
            await receiver.close()

    run(main())
    # checksums are compared at finish: the corrupt layers were written, then the request failed
    assert "checksum mismatch" in handler.failed["bad"] and "good" in handler.completed
    assert "bad" not in handler.completed
    assert_scattered(handler, [2, 3], layers)


def test_sender_closing_mid_request_and_stalling_fail_the_request() -> None:
    handler = ScatterHandler(SMALL, num_cache_blocks=8)
    kv = random_layers(SMALL, 1, seed=0)[0]

    async def main() -> None:
        receiver = UcxKVReceiver(SMALL, handler, idle_timeout_s=0.5)
        await receiver.start()
        try:
            sender = UcxKVSender(SMALL)
            session = await sender.open(receiver.address, "closed", [0], 4)
            await session.send_layer(0, kv)
            await sender.close()
            assert "connection lost" in await handler.wait_failed("closed", timeout_s=5)

            staller = UcxKVSender(SMALL)
            stalled = await staller.open(receiver.address, "stalled", [1], 4)
            await stalled.send_layer(0, kv)
            assert "timed out" in await handler.wait_failed("stalled", timeout_s=5)
            with pytest.raises(TransferError):
                await stalled.finish({})
            await staller.close()
        finally:
            await receiver.close()

    run(main())


_KILLED_SENDER = """
import asyncio, json, os, signal, sys
import torch
from baton.shared.transfer import KVLayout, UcxKVSender

async def main():
    layout = KVLayout.from_dict(json.loads(sys.argv[2]))
    session = await UcxKVSender(layout).open(sys.argv[1], "killed", [0, 1], layout.num_layers)
    await session.send_layer(0, torch.ones(layout.layer_shape(2), dtype=layout.torch_dtype))
    print("sent", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)

asyncio.run(main())
"""


def test_sender_process_killed_mid_request_fails_the_request() -> None:
    handler = ScatterHandler(SMALL, num_cache_blocks=4)

    async def main() -> str:
        receiver = UcxKVReceiver(SMALL, handler)
        await receiver.start()
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            _KILLED_SENDER,
            receiver.address,
            json.dumps(SMALL.to_dict()),
            stdout=asyncio.subprocess.PIPE,
        )
        try:
            assert proc.stdout is not None
            assert await asyncio.wait_for(proc.stdout.readline(), 20) == b"sent\n"
            assert await asyncio.wait_for(proc.wait(), 10) == -9
            return await handler.wait_failed("killed", timeout_s=10)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            await receiver.close()

    assert "connection lost" in run(main(), timeout_s=45)


def test_unreachable_receiver_raises_transfer_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free_port = s.getsockname()[1]  # nothing listens here once the socket is closed

    async def main() -> None:
        sender = UcxKVSender(SMALL, connect_timeout_s=1.0)
        try:
            with pytest.raises(TransferError, match="unreachable"):
                await sender.open(f"ucx://127.0.0.1:{free_port}", "req", [0], 4)
        finally:
            await sender.close()

    run(main())
