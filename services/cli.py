"""The `baton` command line: `serve` (a local cluster), `gateway`, `router`, `prefill`, `decode` (one
service each), `registry check`, `complete` (a gRPC client), `generate` (offline), `tiny-model`,
`bench`, `soak` (a local cluster under faults), `probe` (a health check for containers) and
`settings` (every BATON_* variable).

Every service flag can also come from the environment: `--lease-ttl-s` from BATON_LEASE_TTL_S, and so
on (flags win)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import secrets
import sys
import time
import weakref
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from baton.shared import env
from baton.shared.config import (
    EngineConfig,
    GatewayConfig,
    GrpcTlsConfig,
    RegistryConfig,
    RouterConfig,
    WorkerConfig,
)
from baton.shared.demo import ARCHITECTURES

if TYPE_CHECKING:
    from baton.shared.grpc_tls import GrpcTls

DEMO_ARCH = "llama"
DEMO_SEED = 0
SHARED_GPU_BURST_STEP_INTERVAL_MS = 15.0
"""`serve`'s --burst-step-interval-ms where a prefill and a decode worker share a GPU: the served
anchor workload on one H100 took 3.35 s with it, against 3.90 s with none and 3.71 s with 30."""


def demo_model_dir() -> Path:
    """The embedded default model: generated once into the cache directory, reused afterwards."""
    from baton.shared.demo.tiny_model import write_tiny_model

    path = env.cache_dir() / "models" / f"tiny-{DEMO_ARCH}-seed{DEMO_SEED}"
    if not (path / "config.json").is_file():
        print(f"baton: generating the demo model in {path} (once)", file=sys.stderr)
        write_tiny_model(path, DEMO_ARCH, DEMO_SEED)
    return path


def _cmd_tiny_model(args: argparse.Namespace) -> int:
    from baton.shared.demo.tiny_model import write_tiny_model

    out = write_tiny_model(args.out_dir, args.arch, args.seed, args.dtype, args.shards)
    print(f"wrote a tiny {args.arch} model (seed {args.seed}) to {out}")
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from baton import LLM, SamplingParams

    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        ignore_eos=args.ignore_eos,
    )
    llm = LLM(
        args.model or str(demo_model_dir()),
        dtype=args.dtype,
        device=args.device,
        attention_backend=args.attention_backend,
    )
    prompts = args.prompt or ["Once upon a time", "It was the best of times,", "Call me Ishmael."]
    start = time.perf_counter()
    if args.chat:
        outputs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params)
    else:
        outputs = llm.generate(prompts, params)
    elapsed_s = time.perf_counter() - start
    for prompt, out in zip(prompts, outputs, strict=True):
        print(
            f"prompt: {prompt!r}\noutput: {out.text!r}  ({len(out.token_ids)} tokens, {out.finish_reason})\n"
        )
    num_tokens = sum(len(o.token_ids) for o in outputs)
    dtype = str(llm.engine.dtype).removeprefix("torch.")
    rate = num_tokens / elapsed_s
    print(
        f"{len(outputs)} prompts, {num_tokens} tokens in {elapsed_s:.2f} s ({rate:.0f} tok/s) "
        f"on {llm.engine.device} ({dtype}), model {llm.config.model}",
        file=sys.stderr,
    )
    return 0


SETTING_DEFAULTS: weakref.WeakKeyDictionary[argparse.Action, Any] = weakref.WeakKeyDictionary()
"""The default each flag made by _flag declares, before BATON_* overrides it (see settings_table)."""


def _flag(group: Any, name: str, help: str, **kwargs: Any) -> None:
    """A `--name` flag whose default comes from BATON_<NAME> when set (argparse applies `type` to it)."""
    declared = kwargs.get("default", False if kwargs.get("action") == "store_true" else None)
    from_env = env.setting(name.removeprefix("--"))
    if from_env is not None:
        kwargs["default"] = (
            from_env if kwargs.get("action") is None else from_env.lower() in ("1", "true", "yes")
        )
    action = group.add_argument(name, help=f"{help} [env {env.variable(name)}]", **kwargs)
    SETTING_DEFAULTS[action] = declared


def _add_engine_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("engine")
    _flag(group, "--model", "Hugging Face model directory (default: the generated demo model)")
    _flag(
        group, "--dtype", "weights dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"]
    )
    _flag(group, "--device", "auto, cpu, cuda or cuda:N", default="auto")
    _flag(group, "--block-size", "tokens per KV block", type=int, default=16)
    _flag(group, "--num-kv-blocks", "KV blocks (default: sized from memory)", type=int, default=None)
    _flag(group, "--gpu-memory-utilization", "fraction of the GPU Baton may use", type=float, default=0.9)
    _flag(group, "--cpu-kv-cache-gib", "CPU KV cache size", type=float, default=1.0)
    _flag(group, "--max-num-batched-tokens", "token budget of one step", type=int, default=8192)
    _flag(
        group,
        "--max-num-seqs",
        "most sequences decoding together (not counting reservations)",
        type=int,
        default=256,
    )
    _flag(group, "--max-model-len", "context length (default: the model's)", type=int, default=None)
    _flag(group, "--no-prefix-caching", "disable the prefix cache", action="store_true")
    _flag(group, "--seed", "sampler seed for requests without one", type=int, default=0)
    _flag(group, "--enforce-eager", "CUDA: no CUDA graphs for decode steps", action="store_true")
    _flag(
        group,
        "--async-scheduling",
        "queue each decode-only step's successor before reading its tokens (host work overlaps the device)",
        action=argparse.BooleanOptionalAction,
        default=True,
    )
    _flag(
        group,
        "--burst-step-interval-ms",
        "decode worker: while 16+ requests wait for pushed KV, more than decode, at most one step per "
        "this many ms, leaving a shared GPU to the prefill (0: off; default: off, except that `serve` uses "
        f"{SHARED_GPU_BURST_STEP_INTERVAL_MS:g} where a prefill and a decode worker share a GPU)",
        type=float,
        default=None,
    )
    _flag(
        group,
        "--stream-interval",
        "served requests: tokens per streamed output after the first (1: every step)",
        type=int,
        default=1,
    )
    _flag(
        group,
        "--load-format",
        "auto (read the checkpoint) or dummy (seeded random weights: config.json suffices)",
        default="auto",
        choices=["auto", "dummy"],
    )
    _flag(
        group,
        "--attention-backend",
        "auto (triton on CUDA, torch elsewhere), torch or triton",
        default="auto",
        choices=["auto", "torch", "triton"],
    )


def _add_dataset_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("requests")
    group.add_argument("--dataset", default="random", help="random, or a ShareGPT-format JSON file")
    group.add_argument("--num-prompts", type=int, default=256)
    group.add_argument("--input-len", default="64,1024", help="random: prompt length range MIN,MAX")
    group.add_argument("--output-len", default="32,512", help="random: output length range MIN,MAX")
    group.add_argument("--dataset-seed", type=int, default=0, help="seed of the request set")


def _add_registry_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("registry")
    _flag(group, "--redis-url", "Redis holding the registry", default="redis://127.0.0.1:6379/0")
    _flag(group, "--redis-username", "Redis ACL user where the URL names none (default: the default user)")
    _flag(
        group,
        "--redis-password",
        "Redis AUTH password where the URL has none (better: BATON_REDIS_PASSWORD, from a secret)",
    )
    _flag(group, "--namespace", "prefix of every registry key", default="baton")
    _flag(group, "--lease-ttl-s", "a worker silent this long is dead", type=float, default=10.0)


def _add_grpc_tls_flags(parser: argparse.ArgumentParser, server: bool) -> None:
    """TLS of gRPC, the same settings for every command that serves or calls it; `server`: the
    command serves gRPC (or starts processes that do), so it takes --grpc-tls-client-auth."""
    group = parser.add_argument_group("gRPC TLS (off unless --grpc-tls-cert or --grpc-tls-ca is set)")
    _flag(
        group,
        "--grpc-tls-cert",
        "PEM certificate chain this process presents: a server's own, and a client's under mutual TLS "
        "(a path, e.g. a mounted secret; needs --grpc-tls-key)",
    )
    _flag(group, "--grpc-tls-key", "PEM private key of --grpc-tls-cert, unencrypted (a path)")
    _flag(
        group,
        "--grpc-tls-ca",
        "PEM CA certificates the peers' certificates must chain to (a path; a client without it trusts "
        "gRPC's default roots)",
    )
    _flag(
        group,
        "--grpc-tls-server-name",
        "clients: the name the servers' certificates must carry, instead of the host dialled (workers "
        "are dialled at their registered addresses)",
    )
    if server:
        _flag(
            group,
            "--grpc-tls-client-auth",
            "mutual TLS: gRPC servers require a client certificate signed by --grpc-tls-ca",
            action="store_true",
        )


def _grpc_tls_config(args: argparse.Namespace) -> GrpcTlsConfig:
    """The --grpc-tls-* settings; ValueError (one line, no traceback) when they do not fit together."""
    try:
        return GrpcTlsConfig(
            cert=args.grpc_tls_cert,
            key=args.grpc_tls_key,
            ca=args.grpc_tls_ca,
            client_auth=getattr(args, "grpc_tls_client_auth", False),
            server_name=args.grpc_tls_server_name,
        )
    except ValidationError as exc:
        reasons = [str(error["msg"]).removeprefix("Value error, ") for error in exc.errors()]
        raise ValueError("; ".join(reasons)) from None


def _server_tls_config(args: argparse.Namespace) -> GrpcTlsConfig:
    """A gRPC server's --grpc-tls-* settings, their files read and checked now, before the server's
    heavy start (the model load), which would otherwise come first."""
    from baton.shared import grpc_tls

    config = _grpc_tls_config(args)
    grpc_tls.load(config, server=True)
    return config


def _grpc_tls(args: argparse.Namespace) -> GrpcTls | None:
    """A gRPC client's TLS material, read and checked (None: plaintext)."""
    from baton.shared import grpc_tls

    return grpc_tls.load(_grpc_tls_config(args))


def _engine_config(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        model=args.model or str(demo_model_dir()),
        dtype=args.dtype,
        device=args.device,
        block_size=args.block_size,
        num_kv_blocks=args.num_kv_blocks,
        gpu_memory_utilization=args.gpu_memory_utilization,
        cpu_kv_cache_gib=args.cpu_kv_cache_gib,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_num_seqs=args.max_num_seqs,
        max_model_len=args.max_model_len,
        enable_prefix_caching=not args.no_prefix_caching,
        seed=args.seed,
        attention_backend=args.attention_backend,
        load_format=args.load_format,
        enforce_eager=args.enforce_eager,
        async_scheduling=args.async_scheduling,
        stream_interval=args.stream_interval,
        burst_step_interval_ms=args.burst_step_interval_ms or 0.0,
    )


def _registry_config(args: argparse.Namespace) -> RegistryConfig:
    return RegistryConfig(
        redis_url=args.redis_url,
        redis_username=args.redis_username,
        redis_password=args.redis_password,
        namespace=args.namespace,
        lease_ttl_s=args.lease_ttl_s,
    )


def _cmd_worker(args: argparse.Namespace) -> int:
    from baton.services.lifecycle import setup_logging

    tls = _server_tls_config(args)  # first: before the demo model is generated, or torch imported
    config = WorkerConfig(
        role=args.command,
        engine=_engine_config(args),
        registry=_registry_config(args),
        worker_id=args.worker_id,
        host=args.host,
        advertise_host=args.advertise_host,
        port=args.port,
        transfer_port=args.transfer_port,
        reservation_timeout_s=args.reservation_timeout_s,
        kv_faults=args.kv_faults,
        max_pushes_per_receiver=args.max_pushes_per_receiver,
        kv_copy_buffer_gib=args.kv_copy_buffer_gib,
        kv_connections_per_receiver=args.kv_connections_per_receiver,
        kv_transfer_secret=args.kv_transfer_secret,
        threads=args.threads,
        drain_timeout_s=args.drain_timeout_s,
        stall_timeout_s=args.stall_timeout_s,
        engine_process=getattr(args, "engine_process", False),
        grpc_tls=tls,
    )
    from baton.services.worker_main import run_worker  # torch and the engine: after the checks

    setup_logging(args.log_level, args.log_requests)
    asyncio.run(run_worker(config))
    return 0


def _cmd_router(args: argparse.Namespace) -> int:
    from baton.services.lifecycle import setup_logging

    tls = _server_tls_config(args)  # first: before the demo model is generated, or torch imported
    engine = _engine_config(args)
    config = RouterConfig(
        model=engine.model,
        registry=_registry_config(args),
        host=args.host,
        port=args.port,
        colocated=engine if args.colocated else None,
        local_prefill_max_tokens=args.local_prefill_max_tokens,
        max_prefill_queue_tokens=args.max_prefill_queue_tokens,
        max_attempts=args.max_attempts,
        max_pending_requests=args.max_pending_requests,
        max_model_len=engine.max_model_len,
        drain_timeout_s=args.drain_timeout_s,
        grpc_tls=tls,
    )
    from baton.services.router.main import run_router  # after the checks

    setup_logging(args.log_level, args.log_requests)
    if args.threads is not None and args.colocated:  # only a colocated router runs torch
        import torch

        torch.set_num_threads(args.threads)
    asyncio.run(run_router(config))
    return 0


def _cmd_gateway(args: argparse.Namespace) -> int:
    from baton.services.gateway.main import run_gateway
    from baton.services.lifecycle import setup_logging
    from baton.shared import grpc_tls

    tls = _grpc_tls_config(args)
    grpc_tls.load(tls)  # the files checked here, before any gateway process starts
    config = GatewayConfig(
        model=args.model or str(demo_model_dir()),
        router=args.router,
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        max_pending_requests=args.max_pending_requests,
        processes=args.gateway_processes,
        drain_timeout_s=args.drain_timeout_s,
        max_body_bytes=args.max_body_bytes,
        grpc_tls=tls,
    )
    setup_logging(args.log_level, args.log_requests)
    if config.processes > 1:
        from baton.services.gateway.processes import serve_processes

        return serve_processes(config, args.log_level, args.log_requests)
    asyncio.run(run_gateway(config))
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from baton.services.launcher import ClusterSpec, serve_forever

    tls = _server_tls_config(args)  # every process gets them: checked before any starts
    GatewayConfig(  # validates the gateway flags before anything starts
        model="-",
        api_key=args.api_key,
        max_pending_requests=args.max_pending_requests,
        processes=args.gateway_processes,
        max_body_bytes=args.max_body_bytes,
    )
    gpus = _parse_gpus(args.gpus)
    spec = ClusterSpec(
        model=args.model or str(demo_model_dir()),
        num_prefill=args.prefill_workers,
        num_decode=args.decode_workers,
        colocated=args.colocated,
        host=args.host,
        router_port=args.router_port,
        num_routers=args.routers,
        http_port=args.port,
        redis_url=args.redis_url,
        redis_username=args.redis_username,
        redis_password=args.redis_password,
        # its workers' KV connections are authenticated whatever the user set: UCX listens on every
        # interface, even for a cluster on 127.0.0.1
        kv_transfer_secret=args.kv_transfer_secret or secrets.token_hex(32),
        namespace=args.namespace,
        lease_ttl_s=args.lease_ttl_s,
        engine_args=[
            *_engine_argv(args),
            "--burst-step-interval-ms",
            str(_burst_step_interval_ms(args, gpus)),
        ],
        router_args=[
            "--local-prefill-max-tokens",
            str(args.local_prefill_max_tokens),
            "--max-prefill-queue-tokens",
            str(args.max_prefill_queue_tokens),
        ],
        gateway_args=_gateway_argv(args),
        decode_args=["--engine-process"] if args.engine_process else [],
        log_level=args.log_level,
        log_requests=args.log_requests,
        env={"BATON_API_KEY": args.api_key} if args.api_key else {},  # not in argv, where ps shows it
        grpc_tls=tls,
        gpus=gpus,
    )
    return serve_forever(spec)


def _burst_step_interval_ms(args: argparse.Namespace, gpus: list[str]) -> float:
    """The flag when given; else SHARED_GPU_BURST_STEP_INTERVAL_MS if some prefill worker shares a
    GPU with a decode worker (as the launcher deals them; with none listed, all share the first),
    else 0."""
    from baton.services.launcher import dealt_gpu

    if args.burst_step_interval_ms is not None:
        return float(args.burst_step_interval_ms)
    if args.colocated or args.prefill_workers == 0:
        return 0.0
    dealt = [dealt_gpu(gpus, i) for i in range(args.decode_workers + args.prefill_workers)]
    shared = set(dealt[: args.decode_workers]) & set(dealt[args.decode_workers :])
    return SHARED_GPU_BURST_STEP_INTERVAL_MS if shared else 0.0


def _gateway_argv(args: argparse.Namespace) -> list[str]:
    """The gateway flags given to `serve`, passed on to the gateway."""
    return [
        "--max-pending-requests", str(args.max_pending_requests),
        "--gateway-processes", str(args.gateway_processes),
        "--max-body-bytes", str(args.max_body_bytes),
    ]  # fmt: skip


def _parse_gpus(text: str) -> list[str]:
    """ "0,1" -> ["0", "1"]; "" -> [] (every process sees every GPU)."""
    gpus = [g.strip() for g in text.split(",") if g.strip()]
    if not all(g.isdigit() for g in gpus):
        raise ValueError(f"--gpus takes GPU indices separated by commas, e.g. 0,1; got {text!r}")
    return gpus


def _engine_argv(args: argparse.Namespace) -> list[str]:
    """The engine flags given to `serve`, passed on to every engine process."""
    argv = ["--dtype", args.dtype, "--device", args.device, "--block-size", str(args.block_size)]
    argv += [
        "--max-num-batched-tokens",
        str(args.max_num_batched_tokens),
        "--max-num-seqs",
        str(args.max_num_seqs),
    ]
    argv += ["--gpu-memory-utilization", str(args.gpu_memory_utilization), "--seed", str(args.seed)]
    argv += ["--cpu-kv-cache-gib", str(args.cpu_kv_cache_gib), "--attention-backend", args.attention_backend]
    argv += ["--load-format", args.load_format]
    for flag, value in (("--num-kv-blocks", args.num_kv_blocks), ("--max-model-len", args.max_model_len)):
        if value is not None:
            argv += [flag, str(value)]
    if args.no_prefix_caching:
        argv.append("--no-prefix-caching")
    if args.enforce_eager:
        argv.append("--enforce-eager")
    argv.append("--async-scheduling" if args.async_scheduling else "--no-async-scheduling")
    argv += ["--stream-interval", str(args.stream_interval)]
    return argv


def _cmd_bench_kernels(args: argparse.Namespace) -> int:
    from baton.kernels.bench import KernelBenchConfig, run_kernel_benchmarks
    from baton.kernels.bench.runner import FAMILIES

    families = tuple(args.only.split(",")) if args.only else FAMILIES
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        raise ValueError(
            f"--only: unknown kernel families {', '.join(unknown)}; known: {', '.join(FAMILIES)}"
        )
    config = KernelBenchConfig(families=families, out=Path(args.out) if args.out else None)
    if args.decode_shapes:
        batches, contexts = _grid(args.decode_shapes, "--decode-shapes")
        config = replace(config, decode_batches=batches, decode_contexts=contexts)
    if args.prefill_shapes:
        pairs = tuple(_grid(part, "--prefill-shapes") for part in args.prefill_shapes.split(","))
        config = replace(config, prefill_shapes=tuple((b[0], n[0]) for b, n in pairs))
    config = replace(config, tuning=dict(_tuning(item) for item in args.tune))
    run_kernel_benchmarks(config)
    return 0


def _cmd_bench_throughput(args: argparse.Namespace) -> int:
    from baton.services.bench.report import run_throughput_benchmark

    run_throughput_benchmark(args, _engine_config(args))
    return 0


def _cmd_bench_serve(args: argparse.Namespace) -> int:
    from baton.services.bench.report import run_serve_benchmark

    report = run_serve_benchmark(args, args.model or str(demo_model_dir()), _grpc_tls(args))
    return 0 if report["summary"]["failed"] == 0 else 1


def _grid(text: str, flag: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """'32,64x1024,2048' -> ((32, 64), (1024, 2048))."""
    try:
        left, right = text.split("x")
        grid = tuple(int(v) for v in left.split(",")), tuple(int(v) for v in right.split(","))
    except ValueError:
        raise ValueError(f"{flag}: expected e.g. 32,64x1024,2048, got {text!r}") from None
    if min(grid[0] + grid[1]) < 1:
        raise ValueError(f"{flag}: sizes must be positive, got {text!r}")
    return grid


def _tuning(item: str) -> tuple[str, int]:
    name, _, value = item.partition("=")
    if not value.lstrip("-").isdigit():
        raise ValueError(f"--tune: expected NAME=INT, got {item!r}")
    return name, int(value)


def _cmd_registry_check(args: argparse.Namespace) -> int:
    from baton.services.registry_check import run_check
    from baton.shared.registry import RegistryUnavailable, redacted

    try:
        return asyncio.run(run_check(_registry_config(args), _grpc_tls(args)))
    except RegistryUnavailable as exc:
        print(f"baton: registry {redacted(args.redis_url)} is unreachable: {exc}", file=sys.stderr)
        return 1


def _cmd_complete(args: argparse.Namespace) -> int:
    """Stream one completion from a running Router (the example client)."""
    import grpc

    from baton.shared.grpc_tls import sync_channel
    from baton.shared.rpc import common_pb2, router_pb2, router_pb2_grpc

    request = router_pb2.GenerateRequest(
        text=args.prompt,
        sampling=common_pb2.SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature),
    )
    with sync_channel(args.address, _grpc_tls(args)) as channel:
        try:
            for response in router_pb2_grpc.RouterStub(channel).Generate(request, timeout=args.timeout_s):
                print(response.text, end="", flush=True)
                if response.error:
                    print(f"\nbaton: request failed: {response.error}", file=sys.stderr)
                    return 1
        except grpc.RpcError as exc:
            print(f"baton: {exc.code().name}: {exc.details()}", file=sys.stderr)  # type: ignore[attr-defined]
            return 1
    print()
    return 0


def _cmd_reset_prefix_cache(args: argparse.Namespace) -> int:
    """Empty every worker's prefix cache through a running Router (benchmarks: a cold cache again)."""
    import grpc

    from baton.shared.grpc_tls import sync_channel
    from baton.shared.rpc import router_pb2, router_pb2_grpc

    with sync_channel(args.address, _grpc_tls(args)) as channel:
        try:
            reply = router_pb2_grpc.RouterStub(channel).ResetPrefixCache(
                router_pb2.ResetClusterPrefixCacheRequest(), timeout=args.timeout_s
            )
        except grpc.RpcError as exc:
            print(f"baton: {exc.code().name}: {exc.details()}", file=sys.stderr)  # type: ignore[attr-defined]
            return 1
    print(f"forgot {reply.num_blocks} cached blocks on {reply.num_workers} workers")
    if reply.num_unreachable_workers:
        print(f"baton: {reply.num_unreachable_workers} workers did not answer", file=sys.stderr)
        return 1
    return 0


def _add_service_flags(
    parser: argparse.ArgumentParser, default_port: int, port_help: str = "gRPC port (0: any free port)"
) -> None:
    group = parser.add_argument_group("service")
    _flag(group, "--host", "interface to bind (0.0.0.0: all)", default="127.0.0.1")
    _flag(group, "--port", port_help, type=int, default=default_port)
    _flag(group, "--threads", "torch CPU threads", type=int, default=None)
    _flag(group, "--log-level", "DEBUG, INFO, WARNING", default="INFO")
    _flag(
        group, "--log-requests", "log each request's lifecycle (admitted, placed, ended)", action="store_true"
    )


def _add_router_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("router")
    _flag(
        group,
        "--local-prefill-max-tokens",
        "prompts with at most this many uncached tokens are prefilled on the decode worker",
        type=int,
        default=64,
    )
    _flag(
        group,
        "--max-prefill-queue-tokens",
        "while every prefill worker has this many prompt tokens queued, decode workers prefill (0: no limit)",
        type=int,
        default=0,
    )
    _flag(
        group, "--colocated", "run the engine inside the router (no workers, no Redis)", action="store_true"
    )


def _add_gateway_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("gateway")
    _flag(group, "--api-key", "require 'Authorization: Bearer KEY' on /v1 (better: BATON_API_KEY)")
    _flag(
        group,
        "--max-pending-requests",
        "requests in flight at the gateway; more get 503 at once",
        type=int,
        default=512,
    )
    _flag(
        group,
        "--max-body-bytes",
        "largest request body the gateway reads; a larger one gets 413",
        type=int,
        default=16 << 20,
    )
    _flag(
        group,
        "--gateway-processes",
        "gateway processes sharing the HTTP port (as vLLM's --api-server-count); the in-flight "
        "limit is split between them",
        type=int,
        default=1,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="baton", description="Baton: disaggregated LLM inference.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log engine details")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text offline (default model: the generated demo model)")
    gen.add_argument("prompt", nargs="*", help="prompt text (several allowed; default: three examples)")
    gen.add_argument("--model", help="Hugging Face model directory (default: the demo model)")
    gen.add_argument("--max-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--ignore-eos", action="store_true")
    gen.add_argument("--chat", action="store_true", help="wrap each prompt as a user message (chat template)")
    gen.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    gen.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    gen.add_argument("--attention-backend", default="auto", choices=["auto", "torch", "triton"])
    gen.set_defaults(func=_cmd_generate)

    tiny = sub.add_parser("tiny-model", help="write a small random-weight model in Hugging Face format")
    tiny.add_argument("out_dir", help="directory to create (must not exist, or be empty)")
    tiny.add_argument("--arch", default="llama", choices=ARCHITECTURES)
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    tiny.add_argument("--shards", type=int, default=1, help="split the weights over N safetensors files")
    tiny.set_defaults(func=_cmd_tiny_model)

    serve = sub.add_parser(
        "serve", help="start a local cluster: Redis, the router and prefill/decode workers as processes"
    )
    _flag(serve, "--prefill-workers", "prefill worker processes", type=int, default=1)
    _flag(serve, "--decode-workers", "decode worker processes", type=int, default=1)
    _flag(
        serve,
        "--gpus",
        "GPU indices dealt round-robin to the engine processes, decode workers first (e.g. 0,1); "
        "empty: all processes see all GPUs",
        default="",
    )
    _add_service_flags(serve, default_port=8000, port_help="the gateway's HTTP port (0: any free port)")
    _flag(serve, "--router-port", "the Router's gRPC port (0: any free port)", type=int, default=50051)
    _flag(
        serve,
        "--engine-process",
        "decode workers run their engine core in a process of their own (see `baton decode`)",
        action="store_true",
    )
    _flag(
        serve,
        "--routers",
        "Router replicas (on --router-port and the ports after it); the gateway spreads requests over "
        "them and fails over when one is unreachable",
        type=int,
        default=1,
    )
    _add_gateway_flags(serve)
    _add_router_flags(serve)
    _add_engine_flags(serve)
    _flag(serve, "--redis-url", "an external Redis for the registry (default: start a private one)")
    _flag(serve, "--redis-username", "that Redis's ACL user (default: Redis's default user)")
    _flag(
        serve,
        "--redis-password",
        "that Redis's AUTH password (better: BATON_REDIS_PASSWORD); the processes get it in their "
        "environment",
    )
    _flag(
        serve,
        "--kv-transfer-secret",
        "the secret the workers' KV transfer connections prove (better: BATON_KV_TRANSFER_SECRET); the "
        "workers get it in their environment (default: a random one for this cluster)",
    )
    serve.add_argument("--namespace", default="baton", help="registry key prefix")
    serve.add_argument("--lease-ttl-s", type=float, default=10.0, help="worker lease")
    _add_grpc_tls_flags(serve, server=True)
    serve.set_defaults(func=_cmd_serve)

    gateway = sub.add_parser("gateway", help="run the OpenAI-compatible HTTP gateway in front of a Router")
    _flag(gateway, "--model", "model directory: tokenizer and chat template (default: the demo model)")
    _flag(
        gateway,
        "--router",
        "the Router's gRPC address; several replicas comma-separated (each request goes to the one "
        "with the fewest in flight, and to another when its Router cannot be reached)",
        default="127.0.0.1:50051",
    )
    _flag(gateway, "--host", "interface to bind (0.0.0.0: all)", default="127.0.0.1")
    _flag(gateway, "--port", "HTTP port (0: any free port)", type=int, default=8000)
    _flag(gateway, "--log-level", "DEBUG, INFO, WARNING", default="INFO")
    _flag(gateway, "--log-requests", "log each request's lifecycle (admitted, aborted)", action="store_true")
    _add_gateway_flags(gateway)
    _flag(
        gateway,
        "--drain-timeout-s",
        "on SIGTERM, time streams in flight get to finish (new connections are refused)",
        type=float,
        default=30.0,
    )
    _add_grpc_tls_flags(gateway, server=False)
    gateway.set_defaults(func=_cmd_gateway)

    router = sub.add_parser("router", help="run the Router (public gRPC API, placement, reaper)")
    _add_service_flags(router, default_port=50051)
    _add_router_flags(router)
    _flag(router, "--max-attempts", "placements tried per request", type=int, default=3)
    _flag(
        router,
        "--max-pending-requests",
        "requests in flight at the Router (every gateway's and gRPC client's); more are refused with "
        "RESOURCE_EXHAUSTED at once",
        type=int,
        default=4096,
    )
    _flag(
        router,
        "--drain-timeout-s",
        "on SIGTERM, time requests in flight get to finish (new ones are refused)",
        type=float,
        default=10.0,
    )
    _add_registry_flags(router)
    _add_engine_flags(router)
    _add_grpc_tls_flags(router, server=True)
    router.set_defaults(func=_cmd_router)

    for role, text in (("prefill", "computes prompt KV and pushes it"), ("decode", "decodes pushed prompts")):
        worker = sub.add_parser(role, help=f"run a {role} worker ({text})")
        _add_service_flags(worker, default_port=0)
        _flag(worker, "--worker-id", "registry id (default: <role>-<host>-<pid>)", default=None)
        _flag(worker, "--advertise-host", "host others reach this worker at (default: --host)", default=None)
        _flag(worker, "--transfer-port", "KV transfer (UCX) port, decode only; 0: any", type=int, default=0)
        _flag(
            worker, "--reservation-timeout-s", "release reserved blocks after this", type=float, default=30.0
        )
        _flag(worker, "--kv-faults", "fault injection on pushes, e.g. drop=0.1,corrupt=0.05", default="")
        _flag(
            worker,
            "--max-pushes-per-receiver",
            "prefill only: KV pushes in flight to one decode worker (more wait)",
            type=int,
            default=128,
        )
        _flag(
            worker,
            "--kv-copy-buffer-gib",
            "prefill only: device memory for prompt KV copied out and not yet sent (more prompts wait, "
            "their blocks kept in the cache); it comes out of what --gpu-memory-utilization leaves free",
            type=float,
            default=2.0,
        )
        _flag(
            worker,
            "--kv-connections-per-receiver",
            "prefill only: UCX connections to one decode worker, pushes multiplexed over them",
            type=int,
            default=4,
        )
        _flag(
            worker,
            "--kv-transfer-secret",
            "secret every KV transfer connection proves, both ways, before any KV crosses it: the same on "
            "every prefill and decode worker, 16+ characters (better: BATON_KV_TRANSFER_SECRET, from a "
            "secret); unset: KV connections are not authenticated",
        )
        _flag(
            worker,
            "--drain-timeout-s",
            "on SIGTERM, time in-flight requests get to finish",
            type=float,
            default=15.0,
        )
        _flag(
            worker,
            "--stall-timeout-s",
            "liveness: an engine step longer than this turns gRPC health NOT_SERVING",
            type=float,
            default=120.0,
        )
        if role == "decode":
            _flag(
                worker,
                "--engine-process",
                "run the engine core in a process of its own: its step loop then shares no GIL with the "
                "worker's gRPC and output streams",
                action="store_true",
            )
        _add_registry_flags(worker)
        _add_engine_flags(worker)
        _add_grpc_tls_flags(worker, server=True)
        worker.set_defaults(func=_cmd_worker)

    complete = sub.add_parser("complete", help="stream a completion from a running Router")
    complete.add_argument("prompt", help="prompt text")
    complete.add_argument("--address", default="127.0.0.1:50051", help="the Router's host:port")
    complete.add_argument("--max-tokens", type=int, default=32)
    complete.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    complete.add_argument("--timeout-s", type=float, default=60.0)
    _add_grpc_tls_flags(complete, server=False)
    complete.set_defaults(func=_cmd_complete)

    reset = sub.add_parser(
        "reset-prefix-cache", help="empty every worker's prefix cache through a running Router (benchmarks)"
    )
    reset.add_argument("--address", default="127.0.0.1:50051", help="the Router's host:port")
    reset.add_argument("--timeout-s", type=float, default=10.0)
    _add_grpc_tls_flags(reset, server=False)
    reset.set_defaults(func=_cmd_reset_prefix_cache)

    bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    kernels = bench_sub.add_parser(
        "kernels", help="time every Triton kernel against its torch baseline on this GPU (needs CUDA)"
    )
    kernels.add_argument(
        "--only", help="comma-separated families: decode, prefill, elementwise (default: all)"
    )
    kernels.add_argument("--decode-shapes", help="batches x contexts, e.g. 32,64,128x1024,2048,4096,8192")
    kernels.add_argument("--prefill-shapes", help="sequences x tokens pairs, e.g. 16x512,4x2048")
    kernels.add_argument(
        "--tune",
        action="append",
        default=[],
        help="override a kernel constant, e.g. decode.NUM_STAGES=3 (repeatable)",
    )
    kernels.add_argument("--out", help="write the results as JSON here")
    kernels.set_defaults(func=_cmd_bench_kernels)

    throughput = bench_sub.add_parser(
        "throughput", help="offline engine throughput on a request set, optionally against Hugging Face"
    )
    _add_dataset_flags(throughput)
    throughput.add_argument(
        "--baseline", choices=["hf"], help="also run Hugging Face generate, same requests"
    )
    throughput.add_argument("--hf-batch-sizes", default="32,64,128", help="static batch sizes HF may use")
    throughput.add_argument("--out", help="write the results as JSON here")
    _add_engine_flags(throughput)
    throughput.set_defaults(func=_cmd_bench_throughput)

    serve_bench = bench_sub.add_parser(
        "serve", help="load-test a running gateway: TTFT, TPOT, ITL, latency, throughput, goodput"
    )
    serve_bench.add_argument(
        "--url",
        default="http://127.0.0.1:8000",
        help="the gateway's base URL, or grpc://HOST:PORT to load the Router's gRPC API directly",
    )
    serve_bench.add_argument(
        "--model", help="model directory: vocabulary and tokenizer (default: the demo model)"
    )
    serve_bench.add_argument("--served-model-name", help="the API's model name (default: the first listed)")
    _add_dataset_flags(serve_bench)
    serve_bench.add_argument("--request-rate", type=float, default=float("inf"), help="Poisson rate, req/s")
    serve_bench.add_argument("--max-concurrency", type=int, default=None, help="most requests in flight")
    serve_bench.add_argument(
        "--client-processes",
        type=int,
        default=1,
        help="load processes sharing the requests and their schedule (one process saturates at some "
        "tens of thousands of streamed events a second; the report says when it was the limit)",
    )
    serve_bench.add_argument("--slo-ttft-ms", type=float, default=None, help="goodput: TTFT limit")
    serve_bench.add_argument("--slo-tpot-ms", type=float, default=None, help="goodput: TPOT limit")
    serve_bench.add_argument("--api-key", default=None, help="bearer key, if the gateway wants one")
    serve_bench.add_argument("--out", help="write the results as JSON here")
    _add_grpc_tls_flags(serve_bench, server=False)  # a grpc:// URL's
    serve_bench.set_defaults(func=_cmd_bench_serve)

    _add_soak_parser(sub)

    probe = sub.add_parser(
        "probe", help="health check: exit 0 if a Baton gRPC server (or an http(s) URL) says it serves"
    )
    probe.add_argument("target", help="host:port of a gateway, router or worker gRPC port, or an http(s) URL")
    probe.add_argument("--service", default="", help="gRPC: the service to ask about (default: the server)")
    probe.add_argument("--timeout-s", type=float, default=2.0)
    _add_grpc_tls_flags(probe, server=False)
    probe.set_defaults(func=_cmd_probe)

    settings = sub.add_parser("settings", help="list every BATON_* setting, its flag and its defaults")
    settings.add_argument("--markdown", action="store_true", help="as a Markdown table (the README's)")
    settings.set_defaults(func=_cmd_settings)

    registry = sub.add_parser("registry", help="inspect the Redis registry")
    registry_sub = registry.add_subparsers(dest="registry_command", required=True)
    check = registry_sub.add_parser(
        "check", help="exit 0 if the registry and every live worker's allocator agree and nothing leaked"
    )
    _add_registry_flags(check)
    _add_grpc_tls_flags(check, server=False)  # it asks every worker for its allocator
    check.set_defaults(func=_cmd_registry_check)
    return parser


def _add_soak_parser(sub: Any) -> None:
    soak = sub.add_parser(
        "soak",
        help="a bounded soak: a local cluster under mixed HTTP load, client cancellations and worker "
        "restarts; exits 1 if a request was lost or a block leaked",
    )
    soak.add_argument("--model", help="Hugging Face model directory (default: the generated demo model)")
    soak.add_argument("--prefill-workers", type=int, default=2)
    soak.add_argument("--decode-workers", type=int, default=2)
    soak.add_argument("--duration-s", type=float, default=180.0, help="how long new requests are sent")
    soak.add_argument("--concurrency", type=int, default=8, help="client lanes (requests in flight)")
    soak.add_argument(
        "--cancel-fraction", type=float, default=0.2, help="fraction of requests the client abandons"
    )
    soak.add_argument("--seed", type=int, default=0, help="seed of the requests and their cancellations")
    soak.add_argument(
        "--kill",
        choices=["decode", "prefill", "both"],
        default="both",
        help="whose first worker is killed (SIGKILL) and restarted; both: decode-0 at 1/3 of the run, "
        "prefill-0 at 2/3",
    )
    soak.add_argument("--max-tokens", type=int, default=128, help="longest output asked for")
    soak.add_argument(
        "--request-timeout-s", type=float, default=120.0, help="a request unanswered by then is lost"
    )
    soak.add_argument(
        "--settle-timeout-s", type=float, default=60.0, help="after the load: time to be clean of requests"
    )
    soak.add_argument("--lease-ttl-s", type=float, default=3.0, help="worker lease")
    soak.add_argument("--progress-interval-s", type=float, default=10.0)
    soak.add_argument("--cluster-log", help="the cluster's logs go here (default: a temporary file)")
    soak.add_argument("--out", help="write the report as JSON here")
    soak.set_defaults(func=_cmd_soak)


def _cmd_soak(args: argparse.Namespace) -> int:
    from baton.services.soak.report import failures
    from baton.services.soak.run import ROLES, SoakConfig, run_soak
    from baton.services.soak.workload import WorkloadConfig

    config = SoakConfig(
        model=args.model or str(demo_model_dir()),
        num_prefill=args.prefill_workers,
        num_decode=args.decode_workers,
        duration_s=args.duration_s,
        concurrency=args.concurrency,
        seed=args.seed,
        kill=ROLES if args.kill == "both" else (args.kill,),
        workload=WorkloadConfig(cancel_fraction=args.cancel_fraction, max_tokens=args.max_tokens),
        request_timeout_s=args.request_timeout_s,
        settle_timeout_s=args.settle_timeout_s,
        lease_ttl_s=args.lease_ttl_s,
        progress_interval_s=args.progress_interval_s,
        cluster_log=Path(args.cluster_log) if args.cluster_log else None,
    )
    report = run_soak(config)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    why = failures(report)
    print(f"baton soak: {'FAILED: ' + '; '.join(why) if why else 'passed'}", file=sys.stderr)
    return 1 if why else 0


def _cmd_probe(args: argparse.Namespace) -> int:
    from baton.services import probe

    return probe.main(args.target, args.service, args.timeout_s, _grpc_tls(args))


def _cmd_settings(args: argparse.Namespace) -> int:
    from baton.services import settings_table

    parser = build_parser()
    if args.markdown:
        print(settings_table.markdown(parser), end="")
        return 0
    for s in settings_table.settings(parser):
        defaults = ", ".join(f"{command}={default!r}" for command, default in s.defaults.items())
        print(f"{s.variable:34} {s.flag or '(environment only)':32} {defaults}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return args.func(args)
    except ValueError as exc:  # bad input: say what is wrong, no traceback
        print(f"baton: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
