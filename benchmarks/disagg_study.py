"""Disaggregation on two GPUs: one prefill + one decode worker against two colocated replicas (decode
workers that prefill their own prompts) on the same two GPUs, under a prefill-heavy mix at rising
Poisson rates, through the gateway. Goodput is the highest rate at which at least 90 % of requests
meet TTFT <= 1 s and TPOT <= 25 ms (and none fails). A third layout is 1P+1D whose decode worker also
prefills while the prefill worker's queue is full (`--max-prefill-queue-tokens`).

Decode interference, per layout after its rates: the TPOT of a fixed set of long decodes (32 prompts
of 128 tokens, 512 output tokens each) alone, then while prefill-only requests (the mix's prompts,
one output token: nothing joins the decode batch) arrive at `--interference-rate`. On 1P+1D what
reaches the decode GPU is the prompts' KV; on the colocated replicas, the prefills themselves.

    python3 benchmarks/disagg_study.py OUT_DIR            # on a machine with two GPUs
    python3 benchmarks/disagg_study.py OUT_DIR --rates '' --layouts disaggregated_1p1d,colocated_x2
                                                          # the interference probe alone
    ... --interference-repeats 3                          # three probes a layout, their median ratio
    ... --engine-process                                  # decode workers' engine cores in processes

Writes OUT_DIR/disagg_study.json (every run's summary and the comparison) and the cluster logs.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import json
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from bench_model_dir import write_bench_model_dir

from baton.services.bench.client_processes import run_load_in_processes
from baton.services.bench.datasets import random_requests
from baton.services.bench.serve import LoadConfig, summarize
from baton.services.launcher import ClusterSpec, LocalCluster
from baton.shared.models.model_config import ModelConfig

HERE = Path(__file__).resolve().parent
SLO_TTFT_MS, SLO_TPOT_MS, SLO_FRACTION = 1000.0, 25.0, 0.9
OVERFLOW_QUEUE_TOKENS = 65536  # ~0.3 s of the prefill GPU's work for this model on an H100
STEP_TOKENS = 8192  # the engine's default --max-num-batched-tokens
LAYOUTS = {
    # decode workers start first: decode-0 gets GPU 0, prefill-0 GPU 1
    "disaggregated_1p1d": {"num_prefill": 1, "num_decode": 1, "local_prefill_max_tokens": 64},
    # the same, and the decode worker prefills what arrives while prefill-0's queue is full, in
    # chunks of decode_step_tokens (a whole 8192-token step beside its decodes would cost ~25 ms of TPOT)
    "disaggregated_1p1d_overflow": {
        "num_prefill": 1,
        "num_decode": 1,
        "local_prefill_max_tokens": 64,
        "max_prefill_queue_tokens": OVERFLOW_QUEUE_TOKENS,
        "decode_step_tokens": 2048,
    },
    # no prefill worker: each decode worker prefills its own prompts (a colocated replica per GPU)
    "colocated_x2": {"num_prefill": 0, "num_decode": 2, "local_prefill_max_tokens": 1 << 30},
}
PLACEMENT_COUNTERS = ("num_remote_prefills", "num_local_prefills", "num_overflow_prefills", "num_retries")


def placements(cluster: LocalCluster) -> dict[str, int]:
    """The router's placement counters (since its start)."""
    stats = cluster.router_stats()
    return {name: getattr(stats, name) for name in PLACEMENT_COUNTERS}


def decode_interference(
    cluster: LocalCluster,
    vocab: int,
    rate: float,
    client_processes: int,
    victims: tuple[int, int, int] = (32, 128, 512),
    prompt_len: tuple[int, int] = (1024, 4096),
    lead_s: float = 0.5,
    repeat: int = 0,
) -> dict[str, Any]:
    """The victims' (count, prompt, output tokens) TPOT alone and under prefill-only arrivals at
    `rate`. The victims start `lead_s` after the first arrival has been answered (the arrivals' load
    processes take seconds to start), and the arrivals last twice the victims' time alone; the result
    says when each began and ended, so a probe whose load missed its victims shows. Each `repeat` draws
    other prompts (none is in a prefix cache from an earlier probe)."""
    count, prompt, output = victims
    config = LoadConfig(url=cluster.gateway_url, progress=False)
    result: dict[str, Any] = {"rate": rate, "victims": {"count": count, "prompt": prompt, "output": output}}
    result["load_prompt_len"] = list(prompt_len)

    def victim_set(seed: int) -> list[Any]:
        return random_requests(count, (prompt, prompt), (output, output), vocab, seed)

    seed = 7 + 100 * repeat
    alone = run_load_in_processes(config, victim_set(seed), 1)
    result["alone"] = summarize(alone.records, alone.elapsed_s, None, None)
    # arrivals for twice the victims' time alone, so the load outlasts them
    num_stream = max(1, round(rate * (lead_s + 2 * alone.elapsed_s)))
    stream = random_requests(num_stream, prompt_len, (1, 1), vocab, seed=seed + 1)
    stream_config = LoadConfig(url=cluster.gateway_url, request_rate=rate, seed=seed + 1, progress=False)
    flowing = threading.Event()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        background_run = pool.submit(run_load_in_processes, stream_config, stream, client_processes, flowing)
        while not flowing.wait(0.5):
            if background_run.done():
                background_run.result()  # raises what stopped it
                raise RuntimeError("the background load ended before any request was answered")
        time.sleep(lead_s)
        loaded = run_load_in_processes(config, victim_set(seed + 2), 1)
        background = background_run.result()
    result["loaded"] = summarize(loaded.records, loaded.elapsed_s, None, None)
    result["background"] = summarize(background.records, background.elapsed_s, None, None)
    victims_end = loaded.started_s + loaded.elapsed_s
    result["victims_after_background_began_s"] = loaded.started_s - background.started_s
    result["background_after_victims_ended_s"] = background.started_s + background.elapsed_s - victims_end
    result["background_covered_victims"] = (
        result["victims_after_background_began_s"] > 0 and result["background_after_victims_ended_s"] >= 0
    )
    quiet, busy = result["alone"]["tpot_ms"]["p99"], result["loaded"]["tpot_ms"]["p99"]
    result["tpot_p99_ratio"] = busy / quiet if quiet else None
    return result


def run_layout(
    name: str,
    layout: dict[str, Any],
    model: Path,
    args: argparse.Namespace,
    out: Path,
    save: Callable[[dict[str, Any]], None],
) -> dict[str, Any]:
    """Every rate's summary ("runs") and the decode interference probe's ("interference"), handed to
    `save` after each (a run cut short keeps what it measured)."""
    engine = ["--load-format", "dummy", "--dtype", "bfloat16", "--max-model-len", "8192"]
    decode_step_tokens = layout.get("decode_step_tokens", STEP_TOKENS)
    spec = ClusterSpec(
        model=str(model),
        num_prefill=layout["num_prefill"],
        num_decode=layout["num_decode"],
        router_port=0,
        http_port=0,
        engine_args=[*engine, "--max-num-batched-tokens", str(decode_step_tokens)],
        prefill_args=["--max-num-batched-tokens", str(STEP_TOKENS)],  # after engine_args: it wins
        decode_args=["--engine-process"] if args.engine_process else [],
        router_args=[
            "--local-prefill-max-tokens",
            str(layout["local_prefill_max_tokens"]),
            "--max-prefill-queue-tokens",
            str(layout.get("max_prefill_queue_tokens", 0)),
        ],
        gpus=["0", "1"],
    )
    vocab = ModelConfig.from_dir(model).vocab_size
    runs: list[dict[str, Any]] = []
    result: dict[str, Any] = {"layout": layout, "runs": runs, "interference": None}
    with open(out / f"{name}.log", "w") as log:
        cluster = LocalCluster(spec, log=log)
        cluster.start(timeout_s=600)
        try:
            for index, rate in enumerate([args.warmup_rate, *args.rates]):
                # a fresh seed per run: no prompt is in any prefix cache; enough requests that the
                # arrivals last --min-duration-s (a short burst measures a queue, not a rate)
                num_prompts = max(args.num_prompts, round(rate * args.min_duration_s))
                requests = random_requests(num_prompts, (1024, 4096), (64, 256), vocab, seed=100 + index)
                config = LoadConfig(url=cluster.gateway_url, request_rate=rate, seed=index, progress=False)
                before = placements(cluster)
                run = run_load_in_processes(config, requests, args.client_processes)
                after = placements(cluster)
                summary = summarize(run.records, run.elapsed_s, SLO_TTFT_MS, SLO_TPOT_MS)
                summary["slo_fraction"] = summary["slo"]["met"] / len(run.records)
                summary["client_cpu_busy"] = run.cpu_s / run.elapsed_s
                summary["placements"] = {c: after[c] - before[c] for c in PLACEMENT_COUNTERS}
                if index == 0:
                    continue  # warm-up: compiles kernels and fills the allocator's pools
                runs.append({"request_rate": rate, "summary": summary})
                save(result)
                overloaded = summary["slo_fraction"] < args.stop_below
                ttft, tpot = summary["ttft_ms"]["p90"], summary["tpot_ms"]["p99"]
                print(
                    f"{name} rate {rate}: {summary['slo_fraction']:.0%} met the SLOs, "
                    f"failed {summary['failed']}, TTFT p90 {ttft:.0f} ms, TPOT p99 {tpot:.1f} ms, "
                    f"{num_prompts} requests, placements {summary['placements']}",
                    flush=True,
                )
                if overloaded:
                    print(
                        f"{name}: below {args.stop_below:.0%} met at {rate}, higher rates skipped", flush=True
                    )
                    break  # a higher rate only queues longer: goodput is settled
            if args.interference_rate > 0:
                probes = result["interference_repeats"] = []
                for repeat in range(args.interference_repeats):
                    probe = decode_interference(
                        cluster,
                        vocab,
                        args.interference_rate,
                        args.client_processes,
                        prompt_len=args.interference_prompt_len,
                        repeat=repeat,
                    )
                    probes.append(probe)
                    print(
                        f"{name} decode interference at {args.interference_rate:g} req/s: victims' TPOT p99 "
                        f"{probe['alone']['tpot_ms']['p99']:.1f} ms alone, "
                        f"{probe['loaded']['tpot_ms']['p99']:.1f} ms under load (the load began "
                        f"{probe['victims_after_background_began_s']:.2f} s before them and ended "
                        f"{probe['background_after_victims_ended_s']:.2f} s after)",
                        flush=True,
                    )
                result["interference"] = {**probes[0], "tpot_p99_ratio_median": median_ratio(probes)}
                save(result)
        finally:
            cluster.stop()
    return result


def median_ratio(probes: list[dict[str, Any]]) -> float | None:
    """The median TPOT p99 ratio of the probes whose load spanned their victims (None: none did)."""
    ratios = [p["tpot_p99_ratio"] for p in probes if p["background_covered_victims"] and p["tpot_p99_ratio"]]
    return statistics.median(ratios) if ratios else None


def goodput(runs: list[dict[str, Any]]) -> float:
    """The highest rate tried at which >= 90 % of requests met both SLOs and none failed (0: none)."""
    good = [
        r["request_rate"]
        for r in runs
        if r["summary"]["slo_fraction"] >= SLO_FRACTION and r["summary"]["failed"] == 0
    ]
    return max(good, default=0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument(
        "--rates",
        default="2,4,6,8,10,12,16",
        help="Poisson rates, requests/s ('': the warm-up and the probe only)",
    )
    parser.add_argument("--num-prompts", type=int, default=100, help="requests per rate (at least)")
    parser.add_argument(
        "--min-duration-s", type=float, default=0.0, help="more requests at a high rate: rate x this"
    )
    parser.add_argument("--layouts", default=",".join(LAYOUTS), help="which layouts, in order")
    parser.add_argument(
        "--interference-rate",
        type=float,
        default=64.0,
        help="prefill-only arrivals beside the victims (0: skip)",
    )
    parser.add_argument(
        "--engine-process",
        action="store_true",
        help="decode workers run their engine core in a process of their own (baton decode --engine-process)",
    )
    parser.add_argument(
        "--interference-repeats",
        type=int,
        default=1,
        help="probes per layout, each alone then loaded (the ratio reported is their median: one "
        "probe's ratio moved 1.24-1.68x between machines)",
    )
    parser.add_argument(
        "--interference-prompt-len",
        default="1024,4096",
        help="LOW,HIGH: the arrivals' prompt lengths. Short ones (say 96,128: still pushed, the layouts "
        "prefill locally only up to 64 tokens) keep the decode worker's host work per arrival and cut "
        "the KV written into its GPU ~30x: which of the two slows the victims",
    )
    parser.add_argument(
        "--stop-below",
        type=float,
        default=0.0,
        help="skip a layout's higher rates once fewer than this fraction met the SLOs (0: never)",
    )
    parser.add_argument("--warmup-rate", type=float, default=4.0)
    parser.add_argument("--client-processes", type=int, default=4, help="load processes (see bench serve)")
    args = parser.parse_args()
    args.rates = [float(r) for r in args.rates.split(",") if r.strip()]
    if args.interference_repeats < 1:
        parser.error("--interference-repeats must be at least 1")
    low, high = (int(n) for n in args.interference_prompt_len.split(","))
    args.interference_prompt_len = (low, high)
    layouts = {name: LAYOUTS[name] for name in args.layouts.split(",")}
    if torch.cuda.device_count() < 2:
        sys.exit("disagg_study.py needs two GPUs")
    args.out.mkdir(parents=True, exist_ok=True)
    model = write_bench_model_dir(HERE / "models" / "llama-3.2-1b-shape", Path(tempfile.mkdtemp()) / "anchor")
    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0),
        "num_gpus": torch.cuda.device_count(),
        "decode_engine_process": args.engine_process,
        "workload": {
            "input_len": [1024, 4096],
            "output_len": [64, 256],
            "num_prompts_per_rate": args.num_prompts,
            "min_duration_s": args.min_duration_s,
        },
        "slo": {"ttft_ms": SLO_TTFT_MS, "tpot_ms": SLO_TPOT_MS, "fraction": SLO_FRACTION},
        "layouts": {},
    }

    def save(name: str, so_far: dict[str, Any]) -> None:
        measured = goodput(so_far["runs"]) if so_far["runs"] else None  # None: no rate was run
        results["layouts"][name] = {**so_far, "goodput_rps": measured}
        (args.out / "disagg_study.json").write_text(json.dumps(results, indent=2))

    for name, layout in layouts.items():
        save_this = functools.partial(save, name)
        save_this(run_layout(name, layout, model, args, args.out, save_this))
    goodputs = {name: layout["goodput_rps"] for name, layout in results["layouts"].items()}
    coloc = goodputs.get("colocated_x2")
    for name in ("disaggregated_1p1d", "disaggregated_1p1d_overflow"):
        if coloc and goodputs.get(name) is not None:
            results["goodput_ratio" + name.removeprefix("disaggregated_1p1d")] = goodputs[name] / coloc
    disagg = results["layouts"].get("disaggregated_1p1d")
    if disagg is not None and disagg["runs"]:
        # decode under load: TPOT p99 at the highest good rate against the lowest rate tried (the
        # decode worker never prefills here, so what grows is its batch and the KV pushes beside it)
        by_rate = {r["request_rate"]: r["summary"]["tpot_ms"]["p99"] for r in disagg["runs"]}
        results["decode_tpot_p99_ms_by_rate"] = by_rate
        quiet, loaded = min(by_rate), disagg["goodput_rps"]
        comparable = loaded in by_rate and loaded > quiet
        results["decode_tpot_p99_ratio"] = by_rate[loaded] / by_rate[quiet] if comparable else None
    results["decode_interference_tpot_p99_ratio"] = {  # None: the load spanned no probe's victims
        name: layout["interference"]["tpot_p99_ratio_median"]
        for name, layout in results["layouts"].items()
        if layout["interference"] is not None
    }
    (args.out / "disagg_study.json").write_text(json.dumps(results, indent=2))
    print(json.dumps({k: v for k, v in results.items() if k.startswith(("goodput_ratio", "decode_tpot"))}))
    for name in layouts:
        if results["layouts"][name]["goodput_rps"] is not None:
            print(f"{name}: goodput {results['layouts'][name]['goodput_rps']} req/s")


if __name__ == "__main__":
    main()
