"""First look at the Triton paged decode kernel on a GPU (not yet `baton bench kernels`): correctness
on the issue's shapes, then time (median, cold L2 by rotating KV caches) and achieved bandwidth against
the measured device copy bandwidth and the torch baseline (gather the pages, then SDPA).

    python benchmarks/paged_decode_probe.py [--out results.json]
"""

from __future__ import annotations

import argparse
import json

import torch
import triton.testing

from baton.kernels import paged_decode_attention, paged_decode_attention_reference

Q_HEADS, KV_HEADS, HEAD_DIM, BLOCK = 32, 8, 128, 16


def copy_bandwidth_gbs() -> float:
    src = torch.randn(256 * 2**20, device="cuda", dtype=torch.bfloat16)  # 512 MiB
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    return 2 * src.numel() * src.element_size() / ms / 1e6


def make(batch: int, ctx: int, copies: int, gen: torch.Generator) -> tuple:
    pages = ctx // BLOCK
    num_blocks = batch * pages
    caches = []
    for _ in range(copies):  # several caches: consecutive runs do not find the last one in L2
        shape = (num_blocks, BLOCK, KV_HEADS, HEAD_DIM)
        k = torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=gen)
        caches.append((k, torch.randn_like(k)))
    tables = torch.randperm(num_blocks, device="cuda", generator=gen).view(batch, pages).int()
    lens = torch.full((batch,), ctx, device="cuda", dtype=torch.int32)
    q = torch.randn(batch, Q_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=gen)
    return q, caches, tables, lens


def baseline(q, k, v, tables, lens):  # gather + SDPA (all sequences full length here)
    b = q.shape[0]
    keys = k[tables.long()].reshape(b, -1, KV_HEADS, HEAD_DIM).transpose(1, 2)
    values = v[tables.long()].reshape(b, -1, KV_HEADS, HEAD_DIM).transpose(1, 2)
    return torch.nn.functional.scaled_dot_product_attention(
        q[:, :, None], keys, values, scale=HEAD_DIM**-0.5, enable_gqa=True
    )[:, :, 0]


def kernel(q, k, v, tables, lens):
    return paged_decode_attention(q, k, v, tables, lens, HEAD_DIM**-0.5)


def median_ms(fn, q, caches, tables, lens) -> float:
    """Median time of fn, each run on the next of the rotating caches (a cold L2 for the KV)."""
    turn = iter(range(10**9))

    def call():
        k, v = caches[next(turn) % len(caches)]
        fn(q, k, v, tables, lens)

    return triton.testing.do_bench(call, warmup=25, rep=200, return_mode="median")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out")
    parser.add_argument("--tile", type=int, default=None)
    parser.add_argument("--warps", type=int, default=None)
    parser.add_argument("--waves", type=int, default=None)
    parser.add_argument("--shapes", default="32,64,128x1024,2048,4096,8192")
    args = parser.parse_args()
    from baton.kernels import paged_decode as module

    module.TILE_TOKENS = args.tile or module.TILE_TOKENS
    module.NUM_WARPS = args.warps or module.NUM_WARPS
    module.WAVES = args.waves or module.WAVES
    batches, contexts = ([int(x) for x in part.split(",")] for part in args.shapes.split("x"))
    gen = torch.Generator(device="cuda").manual_seed(0)
    copy_gbs = copy_bandwidth_gbs()
    q, caches, tables, lens = make(batches[0], contexts[0], 2, gen)
    median_ms(kernel, q, caches, tables, lens)  # discarded: the first timing of a run reads slow
    del caches
    rows = []
    for batch in batches:
        for ctx in contexts:
            copies = max(2, int(2 * 50e6 // (batch * ctx * KV_HEADS * HEAD_DIM * 4)) + 1)
            q, caches, tables, lens = make(batch, ctx, copies, gen)
            k0, v0 = caches[0]
            ref = paged_decode_attention_reference(q[:4], k0, v0, tables[:4], lens[:4], HEAD_DIM**-0.5)
            got = paged_decode_attention(q, k0, v0, tables, lens, HEAD_DIM**-0.5)[:4]
            err = ((got.double() - ref.double()).norm() / ref.double().norm()).item()
            ms = median_ms(kernel, q, caches, tables, lens)
            ms_base = median_ms(baseline, q, caches, tables, lens)
            nbytes = 2 * batch * ctx * KV_HEADS * HEAD_DIM * 2 + 2 * q.numel() * 2
            gbs = nbytes / ms / 1e6
            rows.append(
                dict(
                    batch=batch,
                    ctx=ctx,
                    ms=ms,
                    gbs=gbs,
                    frac_copy=gbs / copy_gbs,
                    baseline_ms=ms_base,
                    baseline_frac=nbytes / ms_base / 1e6 / copy_gbs,
                    speedup=ms_base / ms,
                    rel_err=err,
                )
            )
            del caches
            torch.cuda.empty_cache()
    print(
        f"device {torch.cuda.get_device_name()}, copy {copy_gbs:.0f} GB/s, "
        f"tile {module.TILE_TOKENS}, warps {module.NUM_WARPS}, waves {module.WAVES}"
    )
    print(f"{'B':>4} {'ctx':>5} {'ms':>8} {'GB/s':>7} {'%copy':>6} {'base%':>6} {'speedup':>7} {'err':>8}")
    for r in rows:
        print(
            f"{r['batch']:>4} {r['ctx']:>5} {r['ms']:8.4f} {r['gbs']:7.0f} {100 * r['frac_copy']:6.1f} "
            f"{100 * r['baseline_frac']:6.1f} {r['speedup']:7.2f} {r['rel_err']:8.1e}"
        )
    if args.out:
        with open(args.out, "w") as f:
            result = {"device": torch.cuda.get_device_name(), "copy_gbs": copy_gbs, "rows": rows}
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
