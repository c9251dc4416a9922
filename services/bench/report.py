"""Glue between the `baton bench` command line and the benchmarks: build the request set, run, print
a summary and write JSON with the card's name."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from baton.services.bench.datasets import BenchRequest, parse_range, random_requests, sharegpt_requests
from baton.shared.config import EngineConfig
from baton.shared.engine.step_stats import describe_steps
from baton.shared.grpc_tls import GrpcTls
from baton.shared.models.loader import resolve_dtype
from baton.shared.models.model_config import ModelConfig
from baton.shared.tokenizer import Tokenizer


def build_requests(
    args: argparse.Namespace, model: str, max_model_len: int | None = None
) -> tuple[list[BenchRequest], dict[str, Any]]:
    """The request set the flags describe, and a description of it for the JSON. ShareGPT pairs must
    fit `max_model_len` (default: the model's context length)."""
    if args.num_prompts < 1:
        raise ValueError(f"--num-prompts must be >= 1, got {args.num_prompts}")
    config = ModelConfig.from_dir(model)
    if args.dataset == "random":
        inputs, outputs = (
            parse_range(args.input_len, "--input-len"),
            parse_range(args.output_len, "--output-len"),
        )
        vocab = config.vocab_size
        requests = random_requests(args.num_prompts, inputs, outputs, vocab, args.dataset_seed)
        return requests, {
            "dataset": "random",
            "input_len": inputs,
            "output_len": outputs,
            "seed": args.dataset_seed,
        }
    tokenizer = Tokenizer.from_dir(model)
    if tokenizer is None:
        raise ValueError(f"a ShareGPT dataset needs the model's tokenizer, and {model} has none")
    max_len = max_model_len or config.max_position_embeddings
    requests = sharegpt_requests(Path(args.dataset), args.num_prompts, tokenizer, args.dataset_seed, max_len)
    return requests, {"dataset": str(args.dataset), "seed": args.dataset_seed}


def run_throughput_benchmark(args: argparse.Namespace, engine: EngineConfig) -> dict[str, Any]:
    from baton.services.bench.throughput import run_baton, run_hf

    if args.baseline == "hf" and not torch.cuda.is_available():
        raise ValueError("--baseline hf runs on a CUDA device; none is visible")
    requests, workload = build_requests(args, engine.model, engine.max_model_len)
    settings = engine.model_dump(exclude={"model"}, exclude_defaults=True)
    results = [run_baton(engine.model, requests, settings)]
    if args.baseline == "hf":
        sizes = [int(v) for v in args.hf_batch_sizes.split(",")]
        dtype = resolve_dtype(engine.dtype, ModelConfig.from_dir(engine.model))
        results.append(run_hf(engine.model, requests, dtype, sizes))
    report = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "model": engine.model,
        "workload": workload | {"num_requests": len(requests)},
        "results": [r.as_dict() for r in results],
    }
    if len(results) == 2:
        report["speedup_vs_hf"] = results[0].output_tokens_per_s / results[1].output_tokens_per_s
    _print(report)
    _save(report, args.out)
    return report


def _save(report: dict[str, Any], out: str | None) -> None:
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {out}")


def _print(report: dict[str, Any]) -> None:
    print(f"{report['device']}: {report['workload']}")
    for r in report["results"]:
        print(
            f"  {r['system']:>6}: {r['elapsed_s']:8.2f} s  {r['output_tokens_per_s']:10.1f} output tok/s  "
            f"{r['total_tokens_per_s']:10.1f} total tok/s  {r['settings']}"
        )
        for kind, totals in (r.get("engine_steps") or {}).items():
            print(f"          {describe_steps(kind, totals['per_step'])}")
        if r.get("gc_pauses"):
            print(f"          gc pauses: {r['gc_pauses']}")
    if "speedup_vs_hf" in report:
        print(f"  baton / hf output throughput: {report['speedup_vs_hf']:.1f}x")


CLIENT_SATURATED = 0.9  # a load process busier than this reads its streams late


def run_serve_benchmark(
    args: argparse.Namespace, model_dir: str, tls: GrpcTls | None = None
) -> dict[str, Any]:
    """Drive a running gateway (or, at a grpc:// URL, the Router: over TLS when `tls`) with the
    request set; print and (with --out) save the summary."""
    from baton.services.bench.client_processes import run_load_in_processes
    from baton.services.bench.serve import LoadConfig, summarize

    if args.request_rate <= 0:
        raise ValueError(f"--request-rate must be > 0 (or inf), got {args.request_rate}")
    if args.client_processes < 1:
        raise ValueError(f"--client-processes must be >= 1, got {args.client_processes}")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise ValueError(f"--max-concurrency must be >= 1, got {args.max_concurrency}")
    requests, workload = build_requests(args, model_dir)
    config = LoadConfig(
        url=args.url.rstrip("/"),
        model=args.served_model_name,
        request_rate=args.request_rate,
        max_concurrency=args.max_concurrency,
        seed=args.dataset_seed,
        api_key=args.api_key,
        tls=tls,
    )
    run = run_load_in_processes(config, requests, args.client_processes)
    summary = summarize(run.records, run.elapsed_s, args.slo_ttft_ms, args.slo_tpot_ms)
    summary["client_cpu_busy"] = run.cpu_s / run.elapsed_s
    report = {
        "url": config.url,
        "workload": workload | {"num_requests": len(requests)},
        "request_rate": args.request_rate,
        "max_concurrency": args.max_concurrency,
        "client_processes": args.client_processes,
        "summary": summary,
    }
    _print_serve(report)
    _save(report, args.out)
    return report


def _print_serve(report: dict[str, Any]) -> None:
    s = report["summary"]
    load = f"rate {report['request_rate']}, concurrency {report['max_concurrency']}"
    print(f"{report['url']}: {report['workload']}, {load}")
    print(
        f"  completed {s['completed']}, failed {s['failed']} in {s['duration_s']:.2f} s {s['errors'] or ''}"
    )
    print(
        f"  {s['request_throughput']:.2f} req/s, {s['output_throughput']:.1f} output tok/s, "
        f"{s['total_token_throughput']:.1f} total tok/s, goodput {s['goodput']:.2f} req/s {s['slo']}"
    )
    for name in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
        stats = s[name]
        cells = "  ".join(f"{k} {v:9.2f}" if v is not None else f"{k} -" for k, v in stats.items())
        print(f"  {name:>8}: {cells}")
    busy = s["client_cpu_busy"]
    if busy > CLIENT_SATURATED:
        print(
            f"  warning: the busiest load process was on the CPU {busy:.0%} of the run, so the client may "
            "have limited these figures; raise --client-processes"
        )
