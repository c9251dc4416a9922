"""Disaggregation on a CUDA device: KV copied out of a prefill engine's cache on the GPU, pushed over
UCX from CUDA memory into CUDA memory, decoded by another engine; and a whole 1P+1D cluster on the
card. Skipped without CUDA; run through the device tool."""

from __future__ import annotations

import asyncio
import random
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from baton import LLM, SamplingParams
from baton.shared.config import EngineConfig
from baton.shared.engine.engine_core import EngineCore
from baton.shared.engine.kv_cache import gather_prompt_kv, layer_runs
from baton.shared.engine.scheduler import SampledToken
from baton.shared.transfer import KVLayout, UcxKVReceiver, UcxKVSender, stop_ucx

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
rng = random.Random(3)
PROMPTS = [[rng.randrange(3, 2000) for _ in range(n)] for n in (7, 40, 300)]


class CacheWriter:
    """Receive handler writing into a decode engine's reserved blocks (as the decode worker does)."""

    def __init__(self, engine: EngineCore) -> None:
        self.engine = engine
        self.trailers: dict[str, dict[str, Any]] = {}

    async def begin(self, request_id: str, block_ids: list[int], num_layers: int) -> None:
        pass

    def write_layers(self, request_id: str, first_layer: int, kv: torch.Tensor) -> None:
        assert kv.is_cuda
        self.engine.write_reserved_kv_run(request_id, first_layer, kv)

    async def complete(self, request_id: str, trailer: dict[str, Any]) -> dict[str, Any]:
        self.trailers[request_id] = trailer
        return {"ok": True}

    def fail(self, request_id: str, reason: str) -> None:
        raise AssertionError(f"{request_id}: {reason}")


def test_prefill_push_over_ucx_from_cuda_then_decode(llama_dir: Path) -> None:
    config = {"model": str(llama_dir), "device": "cuda", "dtype": "bfloat16", "max_model_len": 1024}
    prefill = EngineCore(EngineConfig(**config, num_kv_blocks=256, max_num_batched_tokens=128))
    decode = EngineCore(EngineConfig(**config, num_kv_blocks=256))
    offline = LLM(**config, num_kv_blocks=256)
    expected = [o.token_ids for o in offline.generate(PROMPTS, GREEDY)]
    mc = prefill.model_config
    layout = KVLayout("tiny", mc.num_layers, 16, mc.num_kv_heads, mc.head_dim, "bfloat16")

    async def main() -> list[list[int]]:
        writer = CacheWriter(decode)
        receiver = UcxKVReceiver(layout, writer, device=torch.device("cuda"))
        await receiver.start()
        sender = UcxKVSender(layout)
        results = []
        announced: list[tuple[str, list[int], Any]] = []
        prefill.prompt_kv_sink = lambda rid, block_ids, ready: announced.append((rid, block_ids, ready))
        try:
            for i, prompt in enumerate(PROMPTS):
                announced.clear()
                prefill.add_request(f"r{i}", prompt, GREEDY, prefill_only=True)
                outputs = []
                while prefill.has_unfinished():
                    outputs += prefill.step()
                (first,) = outputs
                block_ids = decode.reserve(f"r{i}", prompt, GREEDY)
                session = await sender.open(receiver.address, f"r{i}", block_ids, mc.num_layers)
                ((rid, prompt_blocks, ready),) = announced
                torch.cuda.current_stream().wait_event(
                    ready
                )  # an interprocess event, as the sender child gets
                index = torch.tensor(prompt_blocks, device="cuda")
                kv = gather_prompt_kv(prefill.attention, prefill.kv_caches, index)
                torch.cuda.synchronize()
                prefill.release_prompt_kv(rid)
                for start, count in layer_runs(mc.num_layers, kv[0].numel() * kv.element_size(), 1 << 14):
                    await session.send_layers(start, kv[start : start + count])
                await session.finish({"token_id": first.new_token_ids[0]})
                tokens = list(
                    decode.commit_reserved(f"r{i}", SampledToken(first.new_token_ids[0]), 0).new_token_ids
                )
                while decode.has_unfinished():
                    tokens += [t for out in decode.step() for t in out.new_token_ids]
                results.append(tokens)
        finally:
            await sender.close()
            await receiver.close()
            stop_ucx()
        return results

    assert asyncio.run(main()) == expected
    prefill.assert_no_leaks()
    decode.assert_no_leaks()


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")
@pytest.mark.parametrize("decode_args", [[], ["--engine-process"]], ids=["engine-thread", "engine-process"])
def test_one_prefill_one_decode_cluster_on_the_gpu(llama_dir: Path, decode_args: list[str]) -> None:
    """Greedy outputs through the cluster equal the offline engine's; with --engine-process the decode
    worker's cache is allocated by its engine core's process and written by its KV receiver's (CUDA
    IPC across two children of the worker), each reservation's fence crossing as a handle."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
    from baton_cluster import assert_no_leaks, generate_all, greedy, start_cluster, worker_stats

    cluster = start_cluster(
        llama_dir,
        "",
        engine_args=[
            "--device",
            "cuda",
            "--dtype",
            "bfloat16",
            "--max-model-len",
            "1024",
            "--num-kv-blocks",
            "512",
        ],
        decode_args=decode_args,
    )
    try:
        got = generate_all(cluster.router_address, PROMPTS * 4, greedy(12))
        offline = LLM(str(llama_dir), device="cuda", dtype="bfloat16", max_model_len=1024, num_kv_blocks=512)
        want = [o.token_ids for o in offline.generate(PROMPTS * 4, GREEDY)]
        assert [c.token_ids for c in got] == want
        assert worker_stats(cluster)["prefill-0"].num_transfers == len(PROMPTS) * 4
        assert_no_leaks(cluster)
    finally:
        cluster.stop()


class AsyncScatter:
    """Receive handler that queues each layer's scatter on the GPU and returns at once (as the decode
    worker does), so a staging buffer reused too early would show up as a wrong cache."""

    def __init__(self, layout: KVLayout, num_blocks: int) -> None:
        # cache: [num_layers, 2, num_blocks, block_size, kv_heads, head_dim]
        shape = (layout.num_layers, *layout.layer_shape(num_blocks))
        self.cache = torch.zeros(shape, dtype=layout.torch_dtype, device="cuda")
        self.blocks: dict[str, torch.Tensor] = {}
        self.failed: dict[str, str] = {}

    async def begin(self, request_id: str, block_ids: list[int], num_layers: int) -> None:
        self.blocks[request_id] = torch.tensor(block_ids, device="cuda")

    def write_layers(self, request_id: str, first_layer: int, kv: torch.Tensor) -> None:
        torch.cuda._sleep(1_000_000)  # a busy device: the scatter runs well after this returns
        for i, layer_kv in enumerate(kv):
            self.cache[first_layer + i].index_copy_(1, self.blocks[request_id], layer_kv)

    async def complete(self, request_id: str, trailer: dict[str, Any]) -> dict[str, Any]:
        return {}

    def fail(self, request_id: str, reason: str) -> None:
        self.failed[request_id] = reason


def test_concurrent_cuda_pushes_land_intact_while_the_receiver_queues_its_copies() -> None:
    """Rounds of concurrent pushes of growing size: connections are reused, their staging buffers grow
    while other connections' checksums and copies are still queued on the device."""
    layout = KVLayout("stress", 8, 16, 8, 128, "bfloat16")
    sizes = [[4, 9, 16, 25, 6, 12], [20, 33, 8, 40, 27, 48], [64, 5, 50, 71, 36, 80]]  # blocks per request
    offsets = [0]
    for size in (b for round_ in sizes for b in round_):
        offsets.append(offsets[-1] + size)
    handler = AsyncScatter(layout, offsets[-1])
    # layers[i]: [num_layers, 2, blocks, 16, 8, 128] of request i
    layers = [
        torch.randn((layout.num_layers, *layout.layer_shape(b)), device="cuda").to(torch.bfloat16)
        for round_ in sizes
        for b in round_
    ]

    async def push(sender: UcxKVSender, address: str, i: int) -> None:
        session = await sender.open(
            address, f"r{i}", list(range(offsets[i], offsets[i + 1])), layout.num_layers
        )
        for layer in range(layout.num_layers):
            await session.send_layer(layer, layers[i][layer])
        await session.finish({})

    async def main() -> None:
        receiver = UcxKVReceiver(layout, handler, device=torch.device("cuda"))
        await receiver.start()
        sender = UcxKVSender(layout)
        try:
            first = 0
            for round_ in sizes:
                await asyncio.gather(
                    *(push(sender, receiver.address, i) for i in range(first, first + len(round_)))
                )
                first += len(round_)
        finally:
            await sender.close()
            await receiver.close()
            stop_ucx()

    asyncio.run(main())
    torch.cuda.synchronize()
    assert handler.failed == {}
    for i in range(len(layers)):
        got = handler.cache[:, :, offsets[i] : offsets[i + 1]]
        assert torch.equal(got, layers[i]), f"request {i} arrived damaged"
