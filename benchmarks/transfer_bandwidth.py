"""KV transfer bandwidth between two GPUs (or within one): a torch peer copy, raw UCX messages through
`ucxx`, and Baton's own KV push (`UcxKVSender` -> `UcxKVReceiver`, checksums and the receiver's
scatter into a paged cache included), each at several message sizes, medians of repeated timings.

    python3 benchmarks/transfer_bandwidth.py --src cuda:0 --dst cuda:1 --out transfer.json

Raw UCX is timed twice: `--in-flight` messages and then a one-byte ack, whose round trip through
ucxx's Python layers (~1 ms) is part of every round; and `--window` messages posted at once before the
ack, against as many torch copies queued before one synchronize, which is how ucx_perftest's and
nvbandwidth's streaming figures are taken (the round trip spread over the window).

Sender and receiver run in separate processes, as the prefill and decode workers do. UCX's transports
come from its environment (UCX_TLS, ...), which the command line passes through; `--proto-info` asks
UCX to print the protocols it chose.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
from typing import Any

import torch

from baton.shared.transfer.ucx import as_ucx_buffer, stop_ucx, ucx_for_this_loop

MiB = 1 << 20


def _gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9


def _sync(*devices: str) -> None:
    for device in devices:
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)


def torch_copy(src: str, dst: str, size: int, repeats: int, window: int = 1) -> float:
    """GB/s of `window` copies `dst_tensor.copy_(src_tensor)` (a peer copy across GPUs) queued back to
    back and waited for once, median of `repeats`."""
    a = torch.randint(0, 255, (size,), dtype=torch.uint8, device=src)
    b = torch.empty(size, dtype=torch.uint8, device=dst)
    for _ in range(3):
        b.copy_(a)
    _sync(src, dst)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(window):
            b.copy_(a)
        _sync(src, dst)
        times.append(time.perf_counter() - start)
    assert torch.equal(a.to(dst), b)
    return _gbps(size * window, statistics.median(times))


# -- raw UCX ---------------------------------------------------------------------------------------
def _raw_receiver(device: str, sizes: list[int], count: int, repeats: int, port_q: Any) -> None:
    async def main() -> None:
        ucxx = ucx_for_this_loop()
        done = asyncio.Event()

        async def serve(ep: Any) -> None:
            for size in sizes:
                buffers = [torch.empty(size, dtype=torch.uint8, device=device) for _ in range(count)]
                for _ in range(repeats + 1):  # one warm-up round
                    await asyncio.gather(*(ep.recv(as_ucx_buffer(b)) for b in buffers))
                    _sync(device)
                    await ep.send(as_ucx_buffer(torch.ones(1, dtype=torch.uint8, device=device)))
            done.set()

        listener = ucxx.create_listener(serve)
        port_q.put(listener.port)
        await done.wait()
        listener.close()
        stop_ucx()

    asyncio.run(main())


def raw_ucx(src: str, dst: str, sizes: list[int], count: int, repeats: int) -> dict[int, float]:
    """GB/s of `count` tagged messages in flight at once, per size, sender's wall clock to the ack."""
    ctx = mp.get_context("spawn")
    port_q = ctx.Queue()
    proc = ctx.Process(target=_raw_receiver, args=(dst, sizes, count, repeats, port_q))
    proc.start()
    port = port_q.get(timeout=120)
    results: dict[int, float] = {}

    async def main() -> None:
        ep = await ucx_for_this_loop().create_endpoint("127.0.0.1", port)
        ack = torch.empty(1, dtype=torch.uint8, device=src)
        for size in sizes:
            payloads = [torch.randint(0, 255, (size,), dtype=torch.uint8, device=src) for _ in range(count)]
            _sync(src)
            times = []
            for round_ in range(repeats + 1):
                start = time.perf_counter()
                await asyncio.gather(*(ep.send(as_ucx_buffer(p)) for p in payloads))
                await ep.recv(as_ucx_buffer(ack))
                if round_:
                    times.append(time.perf_counter() - start)
            results[size] = _gbps(size * count, statistics.median(times))
        await ep.close()
        stop_ucx()

    asyncio.run(main())
    proc.join(60)
    return results


# -- Baton's KV push -------------------------------------------------------------------------------
def _layout(block_size: int) -> Any:
    from baton.shared.transfer import KVLayout

    return KVLayout("bench", 16, block_size, 8, 128, "bfloat16")  # the anchor model's KV: 4 KiB/token/layer


class _Scatter:
    """The decode worker's part: queue each layer's scatter into a paged cache."""

    def __init__(self, layout: Any, num_blocks: int, device: str) -> None:
        # cache: [num_layers, 2, num_blocks, block_size, kv_heads, head_dim]
        self.cache = torch.empty(
            (layout.num_layers, *layout.layer_shape(num_blocks)), dtype=torch.bfloat16, device=device
        )
        self.index: dict[str, torch.Tensor] = {}
        self.device = device

    async def begin(self, request_id: str, block_ids: list[int], num_layers: int) -> None:
        self.index[request_id] = torch.tensor(block_ids, device=self.device)

    def write_layers(self, request_id: str, first_layer: int, kv: torch.Tensor) -> None:
        for i, layer_kv in enumerate(kv):
            self.cache[first_layer + i].index_copy_(1, self.index[request_id], layer_kv)

    async def complete(self, request_id: str, trailer: dict[str, Any]) -> dict[str, Any]:
        del self.index[request_id]
        return {}

    def fail(self, request_id: str, reason: str) -> None:
        print(f"receiver: {request_id} failed: {reason}", file=sys.stderr)


def _kv_receiver(device: str, block_size: int, num_blocks: int, addr_q: Any, stop_q: Any) -> None:
    from baton.shared.transfer import UcxKVReceiver, stop_ucx

    async def main() -> None:
        layout = _layout(block_size)
        receiver = UcxKVReceiver(layout, _Scatter(layout, num_blocks, device), device=torch.device(device))
        await receiver.start()
        addr_q.put(receiver.address)
        await asyncio.to_thread(stop_q.get)
        await receiver.close()
        stop_ucx()

    asyncio.run(main())


def kv_push(
    src: str, dst: str, tokens: list[int], concurrency: int, repeats: int, grouped: bool, block_size: int = 16
) -> dict[int, float]:
    """GB/s of `concurrency` requests of `tokens` prompt tokens pushed at once (16 layers each), a
    message per layer or (`grouped`) all of a request's layers in one."""
    from baton.shared.transfer import UcxKVSender, stop_ucx

    layout = _layout(block_size)
    max_blocks = max(tokens) // block_size
    ctx = mp.get_context("spawn")
    addr_q, stop_q = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=_kv_receiver, args=(dst, block_size, max_blocks * concurrency, addr_q, stop_q))
    proc.start()
    address = addr_q.get(timeout=120)
    results: dict[int, float] = {}

    async def main() -> None:
        sender = UcxKVSender(layout)
        serial = 0
        for n in tokens:
            blocks = n // block_size
            # layers[r]: [num_layers, 2, blocks, block_size, 8, 128]
            layers = [
                torch.randn((layout.num_layers, *layout.layer_shape(blocks)), device=src).to(torch.bfloat16)
                for _ in range(concurrency)
            ]
            _sync(src)

            async def push(r: int, tag: int, blocks: int, layers: list[torch.Tensor]) -> None:
                ids = list(range(r * max_blocks, r * max_blocks + blocks))
                session = await sender.open(address, f"r{tag}-{r}", ids, layout.num_layers)
                if grouped:
                    await session.send_layers(0, layers[r])
                else:
                    for layer in range(layout.num_layers):
                        await session.send_layer(layer, layers[r][layer])
                await session.finish({})

            times = []
            for round_ in range(repeats + 1):
                serial += 1
                start = time.perf_counter()
                await asyncio.gather(*(push(r, serial, blocks, layers) for r in range(concurrency)))
                if round_:
                    times.append(time.perf_counter() - start)
            nbytes = concurrency * layout.num_layers * layout.layer_nbytes(blocks)
            results[n] = _gbps(nbytes, statistics.median(times))
        await sender.close()
        stop_ucx()

    asyncio.run(main())
    stop_q.put(None)
    proc.join(60)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cuda = torch.cuda.is_available()
    parser.add_argument("--src", default="cuda:0" if cuda else "cpu")
    parser.add_argument(
        "--dst", default=("cuda:1" if torch.cuda.device_count() > 1 else "cuda:0") if cuda else "cpu"
    )
    parser.add_argument("--sizes-mib", default="1,4,16,64,256", help="raw message sizes")
    parser.add_argument("--in-flight", type=int, default=4, help="raw messages in flight at once")
    parser.add_argument(
        "--window",
        type=int,
        default=16,
        help="streaming figures: messages (and torch copies) posted back to back before one wait, as "
        "ucx_perftest's bandwidth tests do (0: skip)",
    )
    parser.add_argument("--raw-only", action="store_true", help="skip Baton's KV push")
    parser.add_argument("--kv-tokens", default="256,1024,4096", help="prompt lengths pushed")
    parser.add_argument("--kv-concurrency", type=int, default=8, help="requests pushed at once")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--proto-info", action="store_true", help="UCX prints the protocols it chose")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    if args.proto_info:
        os.environ["UCX_PROTO_INFO"] = "y"
    sizes = [int(float(s) * MiB) for s in args.sizes_mib.split(",")]
    tokens = [int(t) for t in args.kv_tokens.split(",")]
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "src": args.src,
        "dst": args.dst,
        "ucx_env": {k: v for k, v in os.environ.items() if k.startswith("UCX_")},
    }
    result["torch_copy_gbps"] = {s // MiB: torch_copy(args.src, args.dst, s, args.repeats) for s in sizes}
    print("torch copy GB/s by MiB:", result["torch_copy_gbps"], flush=True)
    raw = raw_ucx(args.src, args.dst, sizes, args.in_flight, args.repeats)
    result["ucx_raw_gbps"] = {s // MiB: v for s, v in raw.items()}
    result["ucx_raw_in_flight"] = args.in_flight
    print(f"raw UCX GB/s by MiB ({args.in_flight} in flight):", result["ucx_raw_gbps"], flush=True)
    largest = max(sizes) // MiB
    result["ucx_raw_vs_torch_at_largest"] = (
        result["ucx_raw_gbps"][largest] / result["torch_copy_gbps"][largest]
    )
    if args.window:
        result["window"] = args.window
        result["torch_copy_window_gbps"] = {
            s // MiB: torch_copy(args.src, args.dst, s, args.repeats, args.window) for s in sizes
        }
        raw = raw_ucx(args.src, args.dst, sizes, args.window, args.repeats)
        result["ucx_raw_window_gbps"] = {s // MiB: v for s, v in raw.items()}
        result["ucx_raw_window_vs_torch_window_at_largest"] = (
            result["ucx_raw_window_gbps"][largest] / result["torch_copy_window_gbps"][largest]
        )
        print(f"torch copy GB/s by MiB ({args.window} queued):", result["torch_copy_window_gbps"], flush=True)
        print(f"raw UCX GB/s by MiB ({args.window} in flight):", result["ucx_raw_window_gbps"], flush=True)
    save = functools.partial(_save, result, args.out)
    save()  # what the raw figures took, whatever comes next
    if args.raw_only:
        return
    result["kv_push_gbps"] = kv_push(args.src, args.dst, tokens, args.kv_concurrency, args.repeats, False)
    result["kv_push_grouped_gbps"] = kv_push(
        args.src, args.dst, tokens, args.kv_concurrency, args.repeats, True
    )
    result["kv_push_concurrency"] = args.kv_concurrency
    for key, how in (("kv_push_gbps", "a message per layer"), ("kv_push_grouped_gbps", "one message")):
        print(f"Baton KV push GB/s by prompt tokens ({args.kv_concurrency} at once, {how}):", result[key])
    save()


def _save(result: dict[str, Any], out: str | None) -> None:
    if out:
        with open(out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
