"""The prefill worker's push loop: consecutive layers leave together once a run is large enough."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import torch

from baton.services.prefill import service as prefill_service
from baton.services.prefill.service import PrefillService


class RecordingSession:
    def __init__(self) -> None:
        self.sent: list[tuple[int, torch.Tensor]] = []

    async def send_layers(self, first_layer: int, kv: torch.Tensor) -> None:
        self.sent.append((first_layer, kv.clone()))


def push(num_layers: int, layer_bytes_each: int) -> tuple[list[tuple[int, torch.Tensor]], int, torch.Tensor]:
    # kv: [num_layers, 2, blocks, block_size, heads, head_dim] as the engine's copy-out buffer, uint8
    kv = torch.randint(0, 255, (num_layers, 2, layer_bytes_each // 2, 1, 1, 1), dtype=torch.uint8)
    service: Any = PrefillService.__new__(PrefillService)
    service.num_layers = num_layers
    session = RecordingSession()

    async def main() -> int:
        queue: asyncio.Queue[Any] = asyncio.Queue()
        for layer in range(num_layers):
            queue.put_nowait((layer, kv, None))
        return await service._push_layers(session, queue)

    return session.sent, asyncio.run(main()), kv


def test_layers_go_in_runs_of_at_least_the_message_size(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(prefill_service, "PUSH_MESSAGE_BYTES", 3000)
    sent, nbytes, kv = push(num_layers=7, layer_bytes_each=1000)
    assert [(first, t.shape[0]) for first, t in sent] == [(0, 3), (3, 3), (6, 1)]  # the rest goes at the end
    assert nbytes == 7000
    assert torch.equal(torch.cat([t for _, t in sent]), kv)


def test_a_small_prompt_is_one_message_and_a_large_layer_goes_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(prefill_service, "PUSH_MESSAGE_BYTES", 3000)
    sent, _, _ = push(num_layers=4, layer_bytes_each=200)
    assert [(first, t.shape[0]) for first, t in sent] == [(0, 4)]
    sent, _, _ = push(num_layers=3, layer_bytes_each=4000)
    assert [(first, t.shape[0]) for first, t in sent] == [(0, 1), (1, 1), (2, 1)]
