"""Authentication of KV connections by a shared secret, over the in-process loopback twin: the proofs,
who is let in, what a refused or silent peer gets to do (nothing), and what is logged (no secret)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import pickle
from collections.abc import Coroutine
from typing import Any, TypeVar

import pytest
import torch

from baton.shared.config import WorkerConfig
from baton.shared.transfer import (
    KVLayout,
    LoopbackKVReceiver,
    LoopbackKVSender,
    TransferError,
    TransferRefused,
    TransferSecret,
    make_sender,
)
from baton.shared.transfer.auth import is_nonce, new_nonce
from baton.shared.transfer.loopback import _LoopbackChannel
from baton.shared.transfer.protocol import (
    PROTOCOL_VERSION,
    ChannelClosed,
    InboundConnection,
    encode_message,
    handshake,
)

T = TypeVar("T")
LAYOUT = KVLayout("tiny@1", num_layers=2, block_size=4, num_kv_heads=2, head_dim=8, dtype="float32")
SECRET = "correct-horse-battery-staple-42"
OTHER = "another-secret-of-enough-length"
NUM_CACHE_BLOCKS = 8


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, timeout=10))


class Recorder:
    """A decode worker's stand-in: scatters pushed layers into a cache and records every call."""

    def __init__(self) -> None:
        # cache: [num_layers, 2, NUM_CACHE_BLOCKS, block_size, kv_heads, head_dim]
        self.cache = torch.zeros(LAYOUT.num_layers, *LAYOUT.layer_shape(NUM_CACHE_BLOCKS))
        self.blocks: dict[str, list[int]] = {}
        self.calls: list[str] = []

    async def begin(self, request_id: str, block_ids: list[int], num_layers: int) -> None:
        self.calls.append(f"begin {request_id}")
        self.blocks[request_id] = block_ids

    def write_layers(self, request_id: str, first_layer: int, kv: torch.Tensor) -> None:
        self.calls.append(f"write {request_id}")
        for i, layer_kv in enumerate(kv):
            self.cache[first_layer + i][:, self.blocks[request_id]] = layer_kv

    async def complete(self, request_id: str, trailer: dict[str, Any]) -> dict[str, Any]:
        self.calls.append(f"complete {request_id}")
        return {"ok": True}

    def fail(self, request_id: str, reason: str) -> None:
        self.calls.append(f"fail {request_id}")


def kv(num_blocks: int, seed: int) -> torch.Tensor:
    """Never-zero KV of every layer: [num_layers, 2, num_blocks, block_size, kv_heads, head_dim]."""
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(LAYOUT.num_layers, *LAYOUT.layer_shape(num_blocks), generator=gen) + 1.0


async def push(sender: LoopbackKVSender, address: str, request_id: str, block_ids: list[int]) -> Any:
    session = await sender.open(address, request_id, block_ids, LAYOUT.num_layers)
    await session.send_layers(0, kv(len(block_ids), seed=len(request_id)))
    return await session.finish({})


# -- the proofs -----------------------------------------------------------------------------------
def test_a_secret_is_never_shown_and_travels_to_a_child_whole() -> None:
    secret = TransferSecret(SECRET)
    assert SECRET not in repr(secret) and SECRET not in str(secret)
    with pytest.raises(ValueError, match="at least 16 characters, got 5") as short:
        TransferSecret("hunt2")
    assert "hunt2" not in str(short.value)
    copy = pickle.loads(pickle.dumps(secret))
    assert copy.proof("sender", "a" * 64, "b" * 64, "x") == secret.proof("sender", "a" * 64, "b" * 64, "x")
    config_error = None
    try:
        WorkerConfig(role="decode", engine={"model": "m"}, kv_transfer_secret="hunt2")  # type: ignore[arg-type]
    except ValueError as e:
        config_error = str(e)
    assert config_error is not None and "at least 16" in config_error and "hunt2" not in config_error
    config = WorkerConfig(role="decode", engine={"model": "m"}, kv_transfer_secret=SECRET)  # type: ignore[arg-type]
    assert SECRET not in repr(config)


def test_a_proof_is_bound_to_its_role_its_connection_and_the_receiver_dialled() -> None:
    secret, nonce_r, nonce_s = TransferSecret(SECRET), new_nonce(), new_nonce()
    assert is_nonce(nonce_r) and nonce_r != nonce_s and not is_nonce("zz" * 32) and not is_nonce(None)
    proof = secret.proof("sender", nonce_r, nonce_s, "ucx://10.0.0.5:50081")
    assert secret.verify(proof, "sender", nonce_r, nonce_s, "ucx://10.0.0.5:50081")
    for role, r, s, address in (
        ("receiver", nonce_r, nonce_s, "ucx://10.0.0.5:50081"),  # reflected as the other end's proof
        ("sender", new_nonce(), nonce_s, "ucx://10.0.0.5:50081"),  # replayed on another connection
        ("sender", nonce_r, new_nonce(), "ucx://10.0.0.5:50081"),
        ("sender", nonce_r, nonce_s, "ucx://10.0.0.6:50081"),  # relayed to another receiver
    ):
        assert not secret.verify(proof, role, r, s, address)  # type: ignore[arg-type]
    assert not TransferSecret(OTHER).verify(proof, "sender", nonce_r, nonce_s, "ucx://10.0.0.5:50081")
    for junk in (None, 42, "", proof.upper(), proof[:-1], "é" * 64):
        assert not secret.verify(junk, "sender", nonce_r, nonce_s, "ucx://10.0.0.5:50081")


# -- who gets in --------------------------------------------------------------------------------------
def test_the_right_secret_pushes_and_any_other_is_refused_before_anything_is_read(
    caplog: pytest.LogCaptureFixture,
) -> None:
    handler = Recorder()

    async def main() -> dict[str, str]:
        receiver = LoopbackKVReceiver(LAYOUT, handler, name="auth", secret=TransferSecret(SECRET))
        await receiver.start()
        refusals = {}
        for name, sender in (
            ("wrong", LoopbackKVSender(LAYOUT, secret=TransferSecret(OTHER))),
            ("missing", LoopbackKVSender(LAYOUT)),
        ):
            with pytest.raises(TransferRefused) as refused:
                await push(sender, receiver.address, "r", [3, 5])
            refusals[name] = str(refused.value)
            await sender.close()
        assert handler.calls == [] and not handler.cache.any()  # nothing reached the cache
        good = make_sender(LAYOUT, secret=TransferSecret(SECRET))
        assert await push(good, receiver.address, "r", [3, 5]) == {"ok": True}  # the same request
        await good.close()
        await receiver.close()
        return refusals

    with caplog.at_level(logging.WARNING, logger="baton.shared.transfer.protocol"):
        refusals = run(main())
    prefix = "the decode worker at loopback://auth refused the KV connection: authentication failed: "
    assert refusals["wrong"] == prefix + "wrong proof of the KV transfer secret (the secrets differ)"
    assert refusals["missing"].startswith(prefix + "no proof of the KV transfer secret")
    assert handler.calls == ["begin r", "write r", "complete r"]
    assert torch.equal(handler.cache[:, :, [3, 5]], kv(2, seed=1))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2, warnings
    assert all(w.startswith("KV receiver: refused loopback sender #") for w in warnings), warnings
    assert all(SECRET not in w and OTHER not in w for w in warnings)


def test_a_secret_on_one_side_only_is_refused_naming_the_mismatch() -> None:
    handler = Recorder()

    async def main() -> str:
        receiver = LoopbackKVReceiver(LAYOUT, handler, name="open")
        await receiver.start()
        sender = LoopbackKVSender(LAYOUT, secret=TransferSecret(SECRET))
        try:
            with pytest.raises(TransferRefused) as refused:
                await push(sender, receiver.address, "r", [1])
            plain = LoopbackKVSender(LAYOUT)  # both unset: as before the secret existed
            assert await push(plain, receiver.address, "r", [1]) == {"ok": True}
            await plain.close()
            return str(refused.value)
        finally:
            await sender.close()
            await receiver.close()

    assert "KV transfer secret mismatch: the sender proves a --kv-transfer-secret" in run(main())
    assert handler.calls == ["begin r", "write r", "complete r"]


def test_a_sender_pushes_nothing_to_a_receiver_that_cannot_prove_the_secret() -> None:
    """An impostor (or a relay of another receiver's challenge) welcomes the sender without a valid
    proof: the handshake fails before any request is announced."""

    async def impostor(channel: _LoopbackChannel, proof: Any) -> dict[str, Any]:
        await channel.send_message({"type": "challenge", "protocol": PROTOCOL_VERSION, "nonce": new_nonce()})
        hello = await channel.recv_message(1.0)
        await channel.send_message({"type": "welcome", "proof": proof})
        return hello

    async def main() -> None:
        for proof in (None, "0" * 64):
            mine, theirs = _LoopbackChannel.pair()
            faking = asyncio.create_task(impostor(theirs, proof))
            with pytest.raises(TransferError, match="did not prove the KV transfer secret"):
                await handshake(mine, LAYOUT, "loopback://x", 1.0, TransferSecret(SECRET))
            hello = await faking
            assert SECRET not in str(hello) and set(hello) >= {"nonce", "proof", "address"}

    run(main())


# -- a peer that does not follow the handshake --------------------------------------------------------
def test_a_raw_peer_gets_nothing_read_past_its_hello_and_a_silent_one_is_dropped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    handler = Recorder()
    nbytes = LAYOUT.layer_nbytes(1)
    payload = torch.ones(nbytes, dtype=torch.uint8)
    begin = {"type": "begin", "request_id": "r", "block_ids": [0], "num_layers": 2}
    layer = {"type": "layer", "request_id": "r", "layer": 0, "count": 1, "nbytes": nbytes}

    async def serve(*items: dict[str, Any] | torch.Tensor) -> list[dict[str, Any]]:
        """Send `items` without waiting (a hostile sender does not); what came back before the
        receiver hung up."""
        mine, theirs = _LoopbackChannel.pair()
        connection = InboundConnection(
            LAYOUT, handler, set(), "raw", "loopback://me", TransferSecret(SECRET), handshake_timeout_s=0.2
        )
        serving = asyncio.create_task(connection.serve(theirs, 5.0))
        with contextlib.suppress(ChannelClosed):  # until the receiver hangs up
            for item in items:
                if isinstance(item, torch.Tensor):
                    await mine.send_payload(item)
                else:
                    await mine.send_message(item)
        await asyncio.wait_for(serving, 2.0)  # the receiver hangs up on its own
        replies = []
        while not mine._inbox.empty() and (item := mine._inbox.get_nowait())[0] == "msg":
            replies.append(item[1])
        return replies

    forged = {
        "type": "hello",
        "protocol": PROTOCOL_VERSION,
        "layout": LAYOUT.to_dict(),
        "address": "loopback://me",
        "nonce": new_nonce(),
        "proof": "0" * 64,
    }
    huge = {**forged, "padding": "x" * (100 << 10)}  # more than a hello may be: refused unread

    async def main() -> None:
        assert [r["type"] for r in await serve(payload, begin, layer, payload)] == ["challenge"]
        assert [r["type"] for r in await serve(begin, layer, payload)] == ["challenge"]
        replies = await serve(forged, begin, layer, payload, {"type": "finish", "request_id": "r"})
        assert [r["type"] for r in replies] == ["challenge", "refused"]
        assert "wrong proof" in replies[1]["reason"]
        assert [r["type"] for r in await serve(huge)] == ["challenge"]
        assert [r["type"] for r in await serve()] == ["challenge"]  # silent: dropped after 0.2 s

    with caplog.at_level(logging.WARNING, logger="baton.shared.transfer.protocol"):
        run(main())
    assert handler.calls == [] and not handler.cache.any()
    reasons = [r.getMessage().partition("raw: ")[2] for r in caplog.records]
    assert reasons == [
        "not a hello: a payload arrived where a message was expected",
        "not a hello: expected hello, got 'begin'",
        "authentication failed: wrong proof of the KV transfer secret (the secrets differ)",
        f"not a hello: a message of {len(encode_message(huge))} bytes announced, at most 65536 accepted",
        "no hello within the handshake timeout (0.2 s)",
    ]
