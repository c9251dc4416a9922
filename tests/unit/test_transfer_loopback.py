"""KV transfer over the in-process loopback twin: protocol, validation, faults, checksum."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Coroutine
from typing import Any, TypeVar

import pytest
import torch

from baton.shared.transfer import (
    FaultConfig,
    KVLayout,
    LoopbackKVReceiver,
    LoopbackKVSender,
    TransferError,
    TransferRefused,
    kv_checksum,
    make_sender,
)
from baton.shared.transfer.loopback import _LoopbackChannel
from baton.shared.transfer.protocol import PROTOCOL_VERSION, ChannelClosed, InboundConnection

T = TypeVar("T")
LAYOUT = KVLayout(
    model_id="tiny-llama@abc", num_layers=3, block_size=4, num_kv_heads=2, head_dim=8, dtype="bfloat16"
)
NUM_CACHE_BLOCKS = 16


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, timeout=10))


class ScatterHandler:
    """A decode worker's stand-in: scatters received layers into a KV cache by block id."""

    def __init__(self, layout: KVLayout = LAYOUT) -> None:
        # cache: [num_layers, 2, NUM_CACHE_BLOCKS, block_size, kv_heads, head_dim]
        self.cache = torch.zeros(
            (layout.num_layers, *layout.layer_shape(NUM_CACHE_BLOCKS)), dtype=layout.torch_dtype
        )
        self.blocks: dict[str, list[int]] = {}
        self.layers: dict[str, list[int]] = {}
        self.completed: dict[str, dict[str, Any]] = {}
        self.failed: dict[str, str] = {}
        self.refuse_begin: str | None = None
        self.refuse_complete: str | None = None

    async def begin(self, request_id: str, block_ids: list[int], num_layers: int) -> None:
        if self.refuse_begin is not None:
            raise TransferError(self.refuse_begin)
        self.blocks[request_id] = block_ids
        self.layers[request_id] = []

    def write_layers(self, request_id: str, first_layer: int, kv: torch.Tensor) -> None:
        for i, layer_kv in enumerate(kv):
            self.cache[first_layer + i][:, self.blocks[request_id]] = layer_kv
            self.layers[request_id].append(first_layer + i)

    async def complete(self, request_id: str, trailer: dict[str, Any]) -> dict[str, Any]:
        if self.refuse_complete is not None:
            raise TransferError(self.refuse_complete)
        self.completed[request_id] = trailer
        return {"request_id": request_id, "layers": len(self.layers[request_id])}

    def fail(self, request_id: str, reason: str) -> None:
        if request_id in self.failed or request_id in self.completed:
            raise AssertionError(f"fail({request_id!r}) called twice or after complete")
        self.failed[request_id] = reason

    async def wait_failed(self, request_id: str, timeout_s: float = 5.0) -> str:
        deadline = asyncio.get_running_loop().time() + timeout_s
        while request_id not in self.failed:
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"handler.fail({request_id!r}) not called within {timeout_s} s")
            await asyncio.sleep(0.01)
        return self.failed[request_id]


def random_layers(layout: KVLayout, num_blocks: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shape = layout.layer_shape(num_blocks)
    return [
        torch.randn(shape, generator=gen).add_(3.0).to(layout.torch_dtype) for _ in range(layout.num_layers)
    ]


async def push(
    sender: LoopbackKVSender, address: str, request_id: str, block_ids: list[int], layers: list[torch.Tensor]
) -> dict[str, Any]:
    session = await sender.open(address, request_id, block_ids, len(layers))
    for layer, kv in enumerate(layers):
        await session.send_layer(layer, kv)
    return await session.finish({"first_token": 42})


def test_round_trip_scatters_every_layer_exactly() -> None:
    handler = ScatterHandler()
    block_ids = [5, 2, 9]
    layers = random_layers(LAYOUT, len(block_ids), seed=0)

    async def main() -> dict[str, Any]:
        receiver = LoopbackKVReceiver(LAYOUT, handler, name="rt")
        await receiver.start()
        sender = LoopbackKVSender(LAYOUT)
        session = await sender.open(receiver.address, "req-1", block_ids, len(layers))
        for layer, kv in enumerate(layers):
            await session.send_layer(layer, kv)
        ack = await session.finish({"first_token": 42})
        # the receiver's wall-clock times land on the sender's timeline, in order
        times = session.finish_timings
        assert 0 <= times["begun_at_ms"] <= times["payload_at_ms"] <= times["finish_sent_at_ms"] + 1.0
        assert {"reply_ms", "last_payload_ms", "last_message_ms", "complete_ms"} <= set(times)
        await sender.close()
        await receiver.close()
        return ack

    assert run(main()) == {"request_id": "req-1", "layers": 3}
    assert handler.completed == {"req-1": {"first_token": 42}} and handler.failed == {}
    for layer, kv in enumerate(layers):
        assert torch.equal(handler.cache[layer][:, block_ids], kv)
    untouched = [b for b in range(NUM_CACHE_BLOCKS) if b not in block_ids]
    assert not handler.cache[:, :, untouched].any()


@pytest.mark.parametrize("together", [True, False])
def test_the_finish_leaves_right_behind_the_last_payload(
    monkeypatch: pytest.MonkeyPatch, together: bool
) -> None:
    # two pushes share one connection; what each posts is recorded in order
    posted: list[tuple[str, str]] = []
    post = _LoopbackChannel.post

    def recording(channel: _LoopbackChannel, msg: dict[str, Any], payload: torch.Tensor | None = None) -> Any:
        if msg["type"] in ("layer", "finish"):
            posted.append(
                (msg["request_id"], f"layer {msg['layer']}" if msg["type"] == "layer" else "finish")
            )
        return post(channel, msg, payload)

    monkeypatch.setattr(_LoopbackChannel, "post", recording)
    handler = ScatterHandler()
    layers = {rid: random_layers(LAYOUT, 3, seed=i) for i, rid in enumerate("ab")}
    blocks = {"a": [0, 1, 2], "b": [3, 4, 5]}

    async def main() -> None:
        receiver = LoopbackKVReceiver(LAYOUT, handler, name=f"together-{together}")
        await receiver.start()
        sender = LoopbackKVSender(LAYOUT, connections_per_address=1)
        a = await sender.open(receiver.address, "a", blocks["a"], 3)
        b = await sender.open(receiver.address, "b", blocks["b"], 3)

        async def push_a() -> None:
            for layer in (0, 1):
                await a.send_layer(layer, layers["a"][layer])
            if together:
                await a.finish_with_layers(2, layers["a"][2][None], {"first_token": 1})
            else:
                await a.send_layer(2, layers["a"][2])
                await a.finish({"first_token": 1})

        async def push_b() -> None:
            for layer in range(3):
                await b.send_layer(layer, layers["b"][layer])
            await b.finish({"first_token": 2})

        await asyncio.gather(push_a(), push_b())
        await sender.close()
        await receiver.close()

    run(main())
    assert sorted(handler.completed) == ["a", "b"]
    last = posted.index(("a", "layer 2"))
    # sent apart, b's next layer slips in between (the finish waited for the payload to be sent)
    assert (posted[last + 1] == ("a", "finish")) == together, posted
    for rid in "ab":
        for layer, kv in enumerate(layers[rid]):
            assert torch.equal(handler.cache[layer][:, blocks[rid]], kv)


def test_concurrent_requests_and_make_sender_dispatch() -> None:
    handler = ScatterHandler()
    requests = {f"req-{i}": [4 * i, 4 * i + 1, 4 * i + 2] for i in range(4)}
    layers = {rid: random_layers(LAYOUT, 3, seed=i) for i, rid in enumerate(requests)}

    async def main() -> None:
        receiver = LoopbackKVReceiver(LAYOUT, handler, name="conc")
        await receiver.start()
        sender = make_sender(LAYOUT)
        await asyncio.gather(
            *(push(sender, receiver.address, rid, ids, layers[rid]) for rid, ids in requests.items())
        )
        with pytest.raises(ValueError, match="scheme"):
            await sender.open("tcp://x:1", "r", [0], 3)
        await sender.close()
        await receiver.close()

    run(main())
    assert sorted(handler.completed) == sorted(requests)
    for rid, ids in requests.items():
        for layer, kv in enumerate(layers[rid]):
            assert torch.equal(handler.cache[layer][:, ids], kv)


def test_layout_mismatch_is_refused_naming_the_fields() -> None:
    handler = ScatterHandler()
    theirs = KVLayout(
        "tiny-llama@abc", num_layers=4, block_size=4, num_kv_heads=2, head_dim=8, dtype="float16"
    )

    async def main() -> str:
        receiver = LoopbackKVReceiver(LAYOUT, handler, name="mismatch")
        await receiver.start()
        try:
            with pytest.raises(TransferRefused) as refused:
                await LoopbackKVSender(theirs).open(receiver.address, "req", [0], 4)
            ack = await push(
                LoopbackKVSender(LAYOUT), receiver.address, "ok", [1], random_layers(LAYOUT, 1, 1)
            )
            assert ack["request_id"] == "ok"  # the receiver keeps serving
        finally:
            await receiver.close()
        return str(refused.value)

    message = run(main())
    assert "num_layers: 3 vs 4" in message and "dtype: 'bfloat16' vs 'float16'" in message
    assert "block_size" not in message
    assert handler.blocks.keys() == {"ok"} and handler.failed == {}


def test_corrupt_layer_fails_with_checksum_reason_and_receiver_keeps_serving() -> None:
    handler = ScatterHandler()
    layers = random_layers(LAYOUT, 2, seed=3)

    async def main() -> None:
        receiver = LoopbackKVReceiver(LAYOUT, handler, name="corrupt")
        await receiver.start()
        bad = LoopbackKVSender(LAYOUT, FaultConfig(corrupt=1.0, seed=0))
        with pytest.raises(TransferError, match="layer 0: checksum mismatch"):
            await push(bad, receiver.address, "bad", [0, 1], layers)
        await push(LoopbackKVSender(LAYOUT), receiver.address, "good", [2, 3], layers)
        await receiver.close()

    run(main())
    assert "layer 0: checksum mismatch" in handler.failed["bad"]
    # checksums are compared at finish: the corrupt layers reached the handler, which then failed the
    # request instead of completing it (a decode worker frees those blocks unread)
    assert "bad" not in handler.completed
    assert "good" in handler.completed and "good" not in handler.failed
    assert torch.equal(handler.cache[2][:, [2, 3]], layers[2])
    assert layers[0].ne(0).any()  # the sender's tensors were not corrupted in place


def _seed_dropping_only_layer_1(drop: float) -> int:
    """A seed whose injector drops layer 1 but not layers 0 and 2 (one draw per layer)."""
    for seed in range(1000):
        rng = random.Random(seed)
        draws = [rng.random() < drop for _ in range(3)]
        if draws == [False, True, False]:
            return seed
    raise AssertionError("no such seed")


@pytest.mark.parametrize(
    ("drop", "seed", "reason"),
    [
        (1.0, 0, "finish after 0 of 3 layers: layer 0 missing"),
        (0.5, _seed_dropping_only_layer_1(0.5), "layer 1 missing: layer 2 arrived instead"),
    ],
)
def test_dropped_layer_is_detected(drop: float, seed: int, reason: str) -> None:
    handler = ScatterHandler()

    async def main() -> None:
        receiver = LoopbackKVReceiver(LAYOUT, handler, name="drop")
        await receiver.start()
        sender = LoopbackKVSender(LAYOUT, FaultConfig(drop=drop, seed=seed))
        with pytest.raises(TransferError, match=reason):
            await push(sender, receiver.address, "req", [0], random_layers(LAYOUT, 1, 0))
        await receiver.close()

    run(main())
    assert handler.failed == {"req": reason}


def test_handler_refusing_begin_fails_the_session_and_the_connection_serves_on() -> None:
    handler = ScatterHandler()
    handler.refuse_begin = "no such request"
    layers = random_layers(LAYOUT, 1, 0)

    async def main() -> None:
        receiver = LoopbackKVReceiver(LAYOUT, handler, name="refuse")
        await receiver.start()
        sender = LoopbackKVSender(LAYOUT, connections_per_address=1)
        session = await sender.open(receiver.address, "req", [0], 3)  # begin is not answered...
        with pytest.raises(TransferError, match="refused by loopback://refuse: no such request"):
            for layer, kv in enumerate(layers):  # ...but its refusal fails the session's next call
                await session.send_layer(layer, kv)
                await asyncio.sleep(0.01)
            await session.finish({})
        handler.refuse_begin = None
        # the refused request's payloads were drained: the same connection carries the next push
        assert (await push(sender, receiver.address, "next", [1], layers))["layers"] == 3
        await receiver.close()

    run(main())
    assert handler.failed == {}  # begin never succeeded: nothing to release


def test_abort_calls_fail_once_and_ends_the_session() -> None:
    handler = ScatterHandler()

    async def main() -> None:
        receiver = LoopbackKVReceiver(LAYOUT, handler, name="abort")
        await receiver.start()
        session = await LoopbackKVSender(LAYOUT).open(receiver.address, "req", [0, 1], 3)
        await session.send_layer(0, random_layers(LAYOUT, 2, 0)[0])
        await session.abort("prefill cancelled")
        await session.abort("again")  # idempotent
        assert await handler.wait_failed("req") == "aborted by the sender: prefill cancelled"
        with pytest.raises(TransferError, match="aborted: prefill cancelled"):
            await session.send_layer(1, random_layers(LAYOUT, 2, 0)[1])
        await receiver.close()

    run(main())
    assert handler.layers["req"] == [0]


def test_complete_raising_nacks_and_then_fails() -> None:
    handler = ScatterHandler()
    handler.refuse_complete = "request was cancelled"

    async def main() -> None:
        receiver = LoopbackKVReceiver(LAYOUT, handler, name="nack")
        await receiver.start()
        with pytest.raises(TransferError, match="rejected by loopback://nack: request was cancelled"):
            await push(LoopbackKVSender(LAYOUT), receiver.address, "req", [0], random_layers(LAYOUT, 1, 0))
        await receiver.close()

    run(main())
    assert handler.failed == {"req": "request was cancelled"}


def test_sender_gone_and_idle_timeout_call_fail() -> None:
    handler = ScatterHandler()

    async def main() -> None:
        receiver = LoopbackKVReceiver(LAYOUT, handler, name="gone", idle_timeout_s=0.2)
        await receiver.start()
        kv = random_layers(LAYOUT, 1, 0)[0]
        sender = LoopbackKVSender(LAYOUT)
        session = await sender.open(receiver.address, "closed", [0], 3)
        await session.send_layer(0, kv)
        await sender.close()
        assert "connection lost" in await handler.wait_failed("closed")

        stalled = await LoopbackKVSender(LAYOUT).open(receiver.address, "stalled", [1], 3)
        await stalled.send_layer(0, kv)
        assert "timed out" in await handler.wait_failed("stalled", timeout_s=2.0)
        with pytest.raises(TransferError):
            await stalled.send_layer(1, kv)
            await stalled.finish({})
        await receiver.close()

    run(main())


def test_duplicate_request_id_and_unknown_receiver_are_refused() -> None:
    handler = ScatterHandler()

    async def main() -> None:
        receiver = LoopbackKVReceiver(LAYOUT, handler, name="dup")
        await receiver.start()
        with pytest.raises(ValueError, match="already started"):
            await LoopbackKVReceiver(LAYOUT, handler, name="dup").start()
        sender = LoopbackKVSender(LAYOUT)
        first = await sender.open(receiver.address, "req", [0], 3)
        with pytest.raises(ValueError, match="already being pushed"):  # caught by the sender itself
            await sender.open(receiver.address, "req", [1], 3)
        second = await LoopbackKVSender(LAYOUT).open(receiver.address, "req", [1], 3)  # another sender
        with pytest.raises(TransferError, match="already being received"):
            await asyncio.sleep(0.01)
            await second.finish({})
        await first.abort("done")
        await receiver.close()
        with pytest.raises(TransferError, match="unreachable"):
            await sender.open(receiver.address, "req", [0], 3)

    run(main())


def test_sender_rejects_caller_mistakes_locally() -> None:
    handler = ScatterHandler()

    async def main() -> None:
        receiver = LoopbackKVReceiver(LAYOUT, handler, name="mistakes")
        await receiver.start()
        sender = LoopbackKVSender(LAYOUT)
        with pytest.raises(ValueError, match="num_layers"):
            await sender.open(receiver.address, "req", [0], 2)
        with pytest.raises(ValueError, match="duplicates"):
            await sender.open(receiver.address, "req", [1, 1], 3)
        session = await sender.open(receiver.address, "req", [0, 1], 3)
        kv = random_layers(LAYOUT, 2, 0)
        with pytest.raises(ValueError, match="out of order"):
            await session.send_layer(1, kv[1])
        with pytest.raises(ValueError, match="shape"):
            await session.send_layer(0, kv[0][:, :1].contiguous())
        with pytest.raises(ValueError, match="contiguous=False"):
            await session.send_layer(0, kv[0].transpose(3, 4).contiguous().transpose(3, 4))
        stacked = torch.stack(kv)  # [3, 2, 2, block_size, heads, head_dim]
        with pytest.raises(ValueError, match="1 <= count <= 3"):
            await session.send_layers(0, torch.cat([stacked, stacked[:1]]))
        await session.send_layers(0, stacked[:2])  # layers 0 and 1 in one message
        with pytest.raises(ValueError, match="1 <= count <= 1"):
            await session.send_layers(2, stacked[1:])
        await session.send_layer(2, kv[2])
        await session.finish({})
        with pytest.raises(RuntimeError, match="already finished"):
            await session.finish({})
        await receiver.close()

    run(main())
    assert handler.failed == {} and list(handler.completed) == ["req"]
    assert handler.layers["req"] == [0, 1, 2]
    assert torch.equal(handler.cache[1][:, [0, 1]], random_layers(LAYOUT, 2, 0)[1])


def test_receiver_validates_raw_protocol_messages() -> None:
    """Checks a buggy or foreign sender would hit, spoken directly over a loopback channel."""
    handler = ScatterHandler()
    nbytes = LAYOUT.layer_nbytes(1)

    async def exchange(
        messages: list[dict[str, Any] | torch.Tensor], refused: tuple[str, ...] = ()
    ) -> list[dict[str, Any]]:
        """Read the challenge; send each item; read a reply after a hello, a finish, and a begin of a
        `refused` request."""
        mine, theirs = _LoopbackChannel.pair()
        serving = asyncio.create_task(InboundConnection(LAYOUT, handler, set(), "raw").serve(theirs, 1.0))
        replies = []
        try:
            assert (await mine.recv_message(1.0))["type"] == "challenge"
            for item in messages:
                if isinstance(item, torch.Tensor):
                    await mine.send_payload(item)
                    continue
                await mine.send_message(item)
                kind = item["type"]
                if kind in ("hello", "finish") or (kind == "begin" and item["request_id"] in refused):
                    replies.append(await mine.recv_message(1.0))
        finally:
            mine.close("test done")
            await serving
        return replies

    hello = {
        "type": "hello",
        "protocol": PROTOCOL_VERSION,
        "layout": LAYOUT.to_dict(),
        "address": "raw",
        "nonce": "ab" * 32,
    }

    def begin(request_id: str, num_layers: int = 3) -> dict[str, Any]:
        return {"type": "begin", "request_id": request_id, "block_ids": [0], "num_layers": num_layers}

    def header(request_id: str, layer: int, size: int, count: int = 1) -> dict[str, Any]:
        return {"type": "layer", "request_id": request_id, "layer": layer, "count": count, "nbytes": size}

    def finish(request_id: str, checksums: Any = None) -> dict[str, Any]:
        msg = {"type": "finish", "request_id": request_id, "trailer": {}}
        return msg if checksums is None else {**msg, "checksums": checksums}

    def nack(request_id: str, reason: str) -> dict[str, Any]:
        return {"type": "nack", "request_id": request_id, "reason": reason}

    payload = torch.randint(1, 256, (nbytes,), dtype=torch.uint8)
    oversized = torch.randint(1, 256, (3 * nbytes + 2,), dtype=torch.uint8)  # more than all 3 layers
    two = torch.cat([payload, payload])
    good, good2 = kv_checksum(payload), kv_checksum(two)
    layers = [item for i in range(3) for item in (header("x", i, nbytes), payload)]

    def layers_of(request_id: str) -> list[dict[str, Any] | torch.Tensor]:
        return [{**m, "request_id": request_id} if isinstance(m, dict) else m for m in layers]

    def grouped(request_id: str) -> list[dict[str, Any] | torch.Tensor]:
        return [header(request_id, 0, 2 * nbytes, count=2), two, header(request_id, 2, nbytes), payload]

    async def main() -> None:
        replies = await exchange([{**hello, "protocol": 1}])
        assert replies == [
            {"type": "refused", "reason": f"protocol version 1, receiver speaks {PROTOCOL_VERSION}"}
        ]
        # a refused begin is answered at once; its payloads are drained and its finish is nacked
        few = await exchange(
            [hello, begin("few", num_layers=2), header("few", 0, nbytes), payload, finish("few")], ("few",)
        )
        assert few[1]["type"] == "error" and few[1]["request_id"] == "few"
        assert "num_layers is 2" in few[1]["reason"] and few[2] == nack("few", few[1]["reason"])
        replies = await exchange(
            [hello, begin("size"), header("size", 0, nbytes - 2), payload, finish("size")]
        )
        assert replies[1] == nack("size", f"layer 0: header says {nbytes - 2} bytes, expected {nbytes}")
        replies = await exchange(
            [hello, begin("big"), header("big", 0, 3 * nbytes + 2), oversized, finish("big")]
        )
        assert replies[1]["reason"] == f"layer 0: header says {3 * nbytes + 2} bytes, expected {nbytes}"
        replies = await exchange(
            [hello, begin("long"), header("long", 0, nbytes), oversized[: nbytes + 2], finish("long")]
        )
        assert replies[1]["reason"] == f"layer 0: payload is larger than the {nbytes} bytes announced"
        replies = await exchange(
            [hello, begin("brief"), header("brief", 0, nbytes), payload[:-2], finish("brief")]
        )
        assert replies[1]["reason"] == f"layer 0: payload is {nbytes - 2} bytes, {nbytes} announced"
        replies = await exchange(
            [hello, begin("over"), header("over", 1, nbytes, count=3), payload, finish("over")]
        )
        assert replies[1]["reason"] == "layers 1 to 3 out of range (the request has 3 layers)"
        replies = await exchange(
            [hello, begin("short"), header("short", 0, nbytes, count=2), payload, finish("short")]
        )
        assert replies[1]["reason"] == f"layer 0: header says {nbytes} bytes, expected {2 * nbytes}"
        replies = await exchange(
            [hello, begin("range"), header("range", 5, nbytes), payload, finish("range")]
        )
        assert replies[1]["reason"] == "layer 5 out of range (the request has 3 layers)"
        replies = await exchange(
            [hello, begin("sums"), *layers_of("sums"), finish("sums", [good, good + 1, good])]
        )
        assert replies[1]["type"] == "nack" and replies[1]["reason"].startswith("layer 1: checksum mismatch")
        replies = await exchange([hello, begin("nosums"), *layers_of("nosums"), finish("nosums")])
        assert replies[1] == nack("nosums", "finish must carry 3 checksums (one a message), got None")
        replies = await exchange([hello, begin("ok"), *layers_of("ok"), finish("ok", [good] * 3)])
        assert replies[1]["type"] == "ack" and replies[1]["request_id"] == "ok"
        replies = await exchange([hello, begin("ok2"), *grouped("ok2"), finish("ok2", [good2, good])])
        assert replies[1]["type"] == "ack"
        replies = await exchange([hello, begin("bad2"), *grouped("bad2"), finish("bad2", [good2, good2])])
        assert replies[1]["reason"].startswith("layer 2: checksum mismatch")
        # two requests interleaved on one connection, each verified on its own
        replies = await exchange(
            [
                hello,
                begin("a"),
                begin("b"),
                *[
                    m
                    for i in range(0, 6, 2)
                    for m in (*layers_of("a")[i : i + 2], *layers_of("b")[i : i + 2])
                ],
                finish("b", [good] * 3),
                finish("a", [good, good, good + 1]),
            ]
        )
        assert replies[1]["request_id"] == "b" and replies[1]["type"] == "ack"
        assert replies[2]["request_id"] == "a" and replies[2]["reason"].startswith(
            "layer 2: checksum mismatch"
        )
        # a finish of a request never begun is nacked; an abort of one is ignored
        replies = await exchange([hello, {"type": "abort", "request_id": "ghost"}, finish("ghost")])
        assert replies[1] == nack("ghost", "finish of request 'ghost', which was not begun here")
        # a layer outside any request puts the stream out of step: the receiver hangs up
        with pytest.raises(ChannelClosed):
            await exchange([hello, header("none", 0, nbytes), payload, finish("late")])

    run(main())
    assert set(handler.failed) == {
        "size",
        "big",
        "long",
        "brief",
        "range",
        "over",
        "short",
        "sums",
        "nosums",
        "bad2",
        "a",
    }
    assert list(handler.completed) == ["ok", "ok2", "b"]


def test_fault_config_parse() -> None:
    config = FaultConfig.parse("drop=0.1,delay_ms=50,corrupt=0.05,seed=3")
    assert config == FaultConfig(drop=0.1, delay_s=0.05, corrupt=0.05, seed=3) and config.enabled
    assert FaultConfig.parse("") == FaultConfig() and not FaultConfig().enabled
    assert FaultConfig.parse(" delay_s = 0.5 , ") == FaultConfig(delay_s=0.5)
    for spec, named in [
        ("drop=2", "drop=2.0"),
        ("jitter=1", "'jitter'"),
        ("drop=often", "'drop'"),
        ("seed=1.5", "'seed'"),
        ("corrupt", "'corrupt'"),
        ("delay_ms=1,delay_s=1", "'delay_s'"),
        ("delay_ms=-5", "delay_s=-0.005"),
    ]:
        with pytest.raises(ValueError, match=named):
            FaultConfig.parse(spec)


def test_layout_helpers() -> None:
    assert LAYOUT.layer_shape(3) == (2, 3, 4, 2, 8)
    assert LAYOUT.layer_nbytes(3) == 2 * 3 * 4 * 2 * 8 * 2
    assert KVLayout.from_dict(LAYOUT.to_dict()) == LAYOUT and LAYOUT.mismatch(LAYOUT) is None
    with pytest.raises(ValueError, match="missing \\['dtype'\\], unknown \\['extra'\\]"):
        KVLayout.from_dict({**{k: v for k, v in LAYOUT.to_dict().items() if k != "dtype"}, "extra": 1})
    with pytest.raises(ValueError, match="dtype"):
        KVLayout("m", 1, 1, 1, 1, dtype="bfloat17")
    with pytest.raises(ValueError, match="head_dim"):
        KVLayout("m", 1, 1, 1, 0, dtype="float16")


def test_checksum_detects_every_flipped_byte_and_swapped_blocks() -> None:
    gen = torch.Generator().manual_seed(0)
    for numel in (1, 7, 64, 333):  # odd and even byte counts
        data = torch.randint(0, 256, (numel,), dtype=torch.uint8, generator=gen)
        base = kv_checksum(data)
        for i in range(numel):
            flipped = data.clone()
            flipped[i] ^= 1 << (i % 8)
            assert kv_checksum(flipped) != base, (numel, i)

    kv = random_layers(LAYOUT, 6, seed=1)[0]  # kv: [2, 6, 4, 2, 8]
    swapped = kv.clone()
    swapped[:, [1, 4]] = kv[:, [4, 1]]
    assert kv_checksum(swapped) != kv_checksum(kv)
    kv_swapped = kv.flip(0).contiguous()  # K and V exchanged
    assert kv_checksum(kv_swapped) != kv_checksum(kv)
    # bytes, not values: any view of the same bytes agrees, aligned or not
    assert kv_checksum(kv) == kv_checksum(kv.view(torch.int16)) == kv_checksum(kv.clone())
    raw = torch.randint(0, 256, (101,), dtype=torch.uint8, generator=gen)
    assert kv_checksum(raw[3:]) == kv_checksum(raw[3:].clone())


def test_checksum_across_chunks() -> None:
    big = torch.randint(-(2**31), 2**31 - 1, (5 << 20,), dtype=torch.int32)  # 20 MiB: 3 chunks
    base = kv_checksum(big)
    swapped = big.clone()
    swapped[:1024], swapped[(4 << 20) : (4 << 20) + 1024] = big[(4 << 20) : (4 << 20) + 1024], big[:1024]
    assert kv_checksum(swapped) != base
    flipped = big.clone()
    flipped[-1] ^= 1 << 30
    assert kv_checksum(flipped) != base
    assert kv_checksum(torch.zeros(8, dtype=torch.uint8)) != kv_checksum(torch.zeros(16, dtype=torch.uint8))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_checksum_same_on_cpu_and_cuda() -> None:
    for numel in (13, 1 << 10, (3 << 20) + 5):
        data = torch.randint(0, 256, (numel,), dtype=torch.uint8)
        assert kv_checksum(data) == kv_checksum(data.cuda())
