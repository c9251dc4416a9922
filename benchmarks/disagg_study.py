"""Disaggregation on two GPUs: one prefill + one decode worker against two colocated replicas (decode
workers that prefill their own prompts) on the same two GPUs, under a prefill-heavy mix at rising
Poisson rates, through the gateway. Goodput is the highest rate at which at least 90 % of requests
meet TTFT <= 1 s and TPOT <= 25 ms (and none fails).

    python3 benchmarks/disagg_study.py OUT_DIR            # on a machine with two GPUs

Writes OUT_DIR/disagg_study.json (every run's summary and the comparison) and the cluster logs.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
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
LAYOUTS = {
    # decode workers start first: decode-0 gets GPU 0, prefill-0 GPU 1
    "disaggregated_1p1d": {"num_prefill": 1, "num_decode": 1, "local_prefill_max_tokens": 64},
    # no prefill worker: each decode worker prefills its own prompts (a colocated replica per GPU)
    "colocated_x2": {"num_prefill": 0, "num_decode": 2, "local_prefill_max_tokens": 1 << 30},
}


def run_layout(
    name: str, layout: dict[str, Any], model: Path, args: argparse.Namespace, out: Path
) -> list[dict[str, Any]]:
    engine = ["--load-format", "dummy", "--dtype", "bfloat16", "--max-model-len", "8192"]
    spec = ClusterSpec(
        model=str(model),
        num_prefill=layout["num_prefill"],
        num_decode=layout["num_decode"],
        router_port=0,
        http_port=0,
        engine_args=engine,
        router_args=["--local-prefill-max-tokens", str(layout["local_prefill_max_tokens"])],
        gpus=["0", "1"],
    )
    vocab = ModelConfig.from_dir(model).vocab_size
    runs = []
    with open(out / f"{name}.log", "w") as log:
        cluster = LocalCluster(spec, log=log)
        cluster.start(timeout_s=600)
        try:
            for index, rate in enumerate([args.warmup_rate, *args.rates]):
                # a fresh seed per run: no prompt is in any prefix cache
                requests = random_requests(args.num_prompts, (1024, 4096), (64, 256), vocab, seed=100 + index)
                config = LoadConfig(url=cluster.gateway_url, request_rate=rate, seed=index, progress=False)
                run = run_load_in_processes(config, requests, args.client_processes)
                summary = summarize(run.records, run.elapsed_s, SLO_TTFT_MS, SLO_TPOT_MS)
                summary["slo_fraction"] = summary["slo"]["met"] / len(run.records)
                summary["client_cpu_busy"] = run.cpu_s / run.elapsed_s
                if index == 0:
                    continue  # warm-up: compiles kernels and fills the allocator's pools
                runs.append({"request_rate": rate, "summary": summary})
                ttft, tpot = summary["ttft_ms"]["p90"], summary["tpot_ms"]["p99"]
                print(
                    f"{name} rate {rate}: {summary['slo_fraction']:.0%} met the SLOs, "
                    f"failed {summary['failed']}, TTFT p90 {ttft:.0f} ms, TPOT p99 {tpot:.1f} ms",
                    flush=True,
                )
        finally:
            cluster.stop()
    return runs


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
    parser.add_argument("--rates", default="2,4,6,8,10,12,16", help="Poisson rates, requests/s")
    parser.add_argument("--num-prompts", type=int, default=100, help="requests per rate")
    parser.add_argument("--warmup-rate", type=float, default=4.0)
    parser.add_argument("--client-processes", type=int, default=4, help="load processes (see bench serve)")
    args = parser.parse_args()
    args.rates = [float(r) for r in args.rates.split(",")]
    if torch.cuda.device_count() < 2:
        sys.exit("disagg_study.py needs two GPUs")
    args.out.mkdir(parents=True, exist_ok=True)
    model = write_bench_model_dir(HERE / "models" / "llama-3.2-1b-shape", Path(tempfile.mkdtemp()) / "anchor")
    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0),
        "num_gpus": torch.cuda.device_count(),
        "workload": {
            "input_len": [1024, 4096],
            "output_len": [64, 256],
            "num_prompts_per_rate": args.num_prompts,
        },
        "slo": {"ttft_ms": SLO_TTFT_MS, "tpot_ms": SLO_TPOT_MS, "fraction": SLO_FRACTION},
        "layouts": {},
    }
    for name, layout in LAYOUTS.items():
        results["layouts"][name] = {"layout": layout, "runs": run_layout(name, layout, model, args, args.out)}
        results["layouts"][name]["goodput_rps"] = goodput(results["layouts"][name]["runs"])
    disagg, coloc = (results["layouts"][n] for n in LAYOUTS)
    results["goodput_ratio"] = disagg["goodput_rps"] / coloc["goodput_rps"] if coloc["goodput_rps"] else None
    # decode under load: TPOT p99 at the highest good rate against the lowest rate tried (the decode
    # worker never prefills here, so what grows is its batch and the KV pushes landing beside it)
    by_rate = {r["request_rate"]: r["summary"]["tpot_ms"]["p99"] for r in disagg["runs"]}
    results["decode_tpot_p99_ms_by_rate"] = by_rate
    quiet, loaded = min(by_rate), disagg["goodput_rps"]
    comparable = loaded in by_rate and loaded > quiet
    results["decode_tpot_p99_ratio"] = by_rate[loaded] / by_rate[quiet] if comparable else None
    (args.out / "disagg_study.json").write_text(json.dumps(results, indent=2))
    print(
        json.dumps(
            {k: results[k] for k in ("goodput_ratio", "decode_tpot_p99_ms_by_rate", "decode_tpot_p99_ratio")}
        )
    )
    for name in LAYOUTS:
        print(f"{name}: goodput {results['layouts'][name]['goodput_rps']} req/s")


if __name__ == "__main__":
    main()
