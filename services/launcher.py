"""`baton serve`: a whole cluster on this machine, each service its own process.

Starts Redis (unless BATON_REDIS_URL names one), the decode and prefill workers, the router, then the
OpenAI gateway; waits until every worker registered, the router reports SERVING and the gateway is
ready; prefixes each process's log lines with its name; on Ctrl-C or SIGTERM stops the gateway and the
router first, then the workers, then Redis. `LocalCluster`
is the same thing as a Python object (the integration tests drive it)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TextIO, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from baton.services.lifecycle import terminate_with_parent
from baton.shared import grpc_tls
from baton.shared.config import GrpcTlsConfig, check_kv_transfer_secret
from baton.shared.grpc_tls import GrpcTls
from baton.shared.registry import Registry, RegistryUnavailable, redacted
from baton.shared.rpc import router_pb2, router_pb2_grpc

STOP_TIMEOUT_S = 45.0
"""How long stop() waits for each group after SIGTERM before SIGKILL: longer than any service's default
drain (gateway 30 s, router 10 s, workers 15 s plus their shutdown)."""
_T = TypeVar("_T")


@dataclass(frozen=True)
class ClusterSpec:
    model: str
    num_prefill: int = 1
    num_decode: int = 1
    colocated: bool = False
    host: str = "127.0.0.1"
    router_port: int = 50051
    """Router gRPC port; 0 picks a free one."""
    num_routers: int = 1
    """Router replicas: `router` on router_port, then `router-1`, ... on the next ports (free ones
    when router_port is 0); the gateway is given every address."""
    http_port: int | None = 8000
    """Gateway HTTP port; 0 picks a free one; None runs no gateway."""
    redis_url: str | None = None
    """None: start a private redis-server."""
    redis_username: str | None = None
    """ACL user of redis_url's server (BATON_REDIS_USERNAME for every process); None: the default user."""
    redis_password: str | None = field(default=None, repr=False)
    """AUTH password of redis_url's server: every process gets it as BATON_REDIS_PASSWORD (never in
    an argv, where ps shows it)."""
    kv_transfer_secret: str | None = field(default=None, repr=False)
    """The workers' KV transfer secret: each prefill and decode worker gets it as
    BATON_KV_TRANSFER_SECRET (never in an argv); None: their KV connections are not authenticated."""
    namespace: str = "baton"
    lease_ttl_s: float = 10.0
    engine_args: Sequence[str] = ()
    router_args: Sequence[str] = ()
    gateway_args: Sequence[str] = ()
    worker_args: Sequence[str] = ()
    prefill_args: Sequence[str] = ()
    decode_args: Sequence[str] = ()
    log_level: str = "INFO"
    log_requests: bool = False
    """Every process logs each request's lifecycle (--log-requests)."""
    threads: int | None = None
    """Torch threads per engine process; None: the machine's cores shared between them."""
    env: dict[str, str] = field(default_factory=dict)
    grpc_tls: GrpcTlsConfig = field(default_factory=GrpcTlsConfig)
    """TLS of every process's gRPC: passed on as the files' paths (--grpc-tls-*), checked before
    anything starts."""
    gpus: Sequence[str] = ()
    """GPUs dealt round-robin to the engine processes (decode workers, then prefill workers; the
    router when colocated) through CUDA_VISIBLE_DEVICES; empty: every process sees every GPU."""


def dealt_gpu(gpus: Sequence[str], engine_index: int) -> str | None:
    """The GPU the `engine_index`-th engine process gets (decode workers first, then prefill
    workers): the listed GPUs round-robin; None when none are listed (it sees every GPU)."""
    return gpus[engine_index % len(gpus)] if gpus else None


class LocalCluster:
    def __init__(self, spec: ClusterSpec, log: TextIO = sys.stderr) -> None:
        if spec.num_prefill < 0 or spec.num_decode < (0 if spec.colocated else 1):
            raise ValueError("a cluster needs at least one decode worker (and no negative counts)")
        if spec.num_routers < 1 or (spec.colocated and spec.num_routers > 1):
            raise ValueError("a cluster needs a router (only one when colocated: it runs the engine)")
        if spec.kv_transfer_secret is not None:
            check_kv_transfer_secret(spec.kv_transfer_secret)
        self.spec = spec
        self.log = log
        self.tls = grpc_tls.load(spec.grpc_tls, server=True)
        """What the cluster's own calls (its health checks) use; None: plaintext."""
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self._launches: dict[str, tuple[list[str], dict[str, str]]] = {}
        """Each process's argv and extra environment, as first spawned (restart reuses them)."""
        self.redis_url = spec.redis_url or ""
        self.router_address = ""
        """The first router's host:port."""
        self.router_addresses: dict[str, str] = {}
        """Every router's host:port, by process name."""
        self.gateway_url = ""
        """http://host:port of the gateway ('' when there is none)."""
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._spawner: concurrent.futures.ThreadPoolExecutor | None = None
        """The one thread that starts every process: a child's parent-death signal fires when the
        thread that started it ends, so it must outlive them all (until stop())."""
        self._log_lock = threading.Lock()
        self._pumps: list[threading.Thread] = []

    # -- start -----------------------------------------------------------------------------------
    def start(self, timeout_s: float = 180.0) -> None:
        deadline = time.monotonic() + timeout_s
        try:
            if not self.spec.colocated:
                if not self.redis_url:
                    self._start_redis(deadline)
                workers = [f"decode-{i}" for i in range(self.spec.num_decode)]
                workers += [f"prefill-{i}" for i in range(self.spec.num_prefill)]
                for index, name in enumerate(workers):
                    self._spawn(name, self._worker_argv(name), self._gpu_env(index))
            # the router and the gateway start while the workers load their model: they find them
            # in the registry once they register
            for index in range(self.spec.num_routers):
                name = "router" if index == 0 else f"router-{index}"
                port = self.spec.router_port + index if self.spec.router_port else _free_port()
                self.router_addresses[name] = f"{self.spec.host}:{port}"
                self._spawn(name, self._router_argv(port), self._gpu_env(0) if self.spec.colocated else {})
            self.router_address = self.router_addresses["router"]
            if self.spec.http_port is not None:
                http_port = self.spec.http_port or _free_port()
                self.gateway_url = f"http://{_url_host(self.spec.host)}:{http_port}"
                self._spawn("gateway", self._gateway_argv(http_port))
            if not self.spec.colocated:
                self._wait_registered(set(workers), deadline)
            for name in self.router_addresses:
                self._wait_serving(name, deadline)
                if not self.spec.colocated:
                    self._wait_router_sees_workers(name, deadline)
            if self.spec.http_port is not None:
                self._wait_gateway_ready(deadline)
        except BaseException:
            self.stop()
            raise

    def _start_redis(self, deadline: float) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise ValueError(
                "redis-server is not installed: install Redis, or set BATON_REDIS_URL to a running one"
            )
        self._tmp = tempfile.TemporaryDirectory(prefix="baton-redis-")
        port = _free_port()
        argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self._spawn("redis", [*argv, "--dir", self._tmp.name])
        self.redis_url = f"redis://127.0.0.1:{port}/0"

        async def ping() -> bool:
            async with self.registry() as registry:
                return await registry.ping()

        self._poll(lambda: _quietly(lambda: asyncio.run(ping())), deadline, "Redis to answer")

    def registry(self) -> Registry:
        """A client of the cluster's registry (use as `async with`)."""
        if not self.redis_url:
            raise ValueError("this cluster has no registry (colocated, or not started)")
        spec = self.spec
        return Registry(
            self.redis_url, spec.namespace, password=spec.redis_password, username=spec.redis_username
        )

    def _engine_count(self) -> int:
        return self.spec.num_prefill + self.spec.num_decode + (1 if self.spec.colocated else 0)

    def _common_argv(self) -> list[str]:
        threads = self.spec.threads or max(1, (os.cpu_count() or 1) // max(1, self._engine_count()))
        return [
            "--model", self.spec.model,
            "--threads", str(threads),
            "--log-level", self.spec.log_level,
            *self._log_requests_argv(),
            *self.spec.engine_args,
        ]  # fmt: skip

    def _log_requests_argv(self) -> list[str]:
        return ["--log-requests"] if self.spec.log_requests else []

    def _registry_argv(self) -> list[str]:
        return [
            "--redis-url", self.redis_url,
            "--namespace", self.spec.namespace,
            "--lease-ttl-s", str(self.spec.lease_ttl_s),
        ]  # fmt: skip

    def _worker_argv(self, name: str) -> list[str]:
        role = name.split("-")[0]
        by_role = self.spec.prefill_args if role == "prefill" else self.spec.decode_args
        extra = [*self.spec.worker_args, *by_role]
        argv = [role, "--worker-id", name, "--host", self.spec.host, *self._common_argv()]
        return [*argv, *self._registry_argv(), *self._tls_argv(server=True), *extra]

    def _router_argv(self, port: int) -> list[str]:
        argv = [
            "router",
            "--host",
            self.spec.host,
            "--port",
            str(port),
            *self._common_argv(),
            *self._tls_argv(server=True),
            *self.spec.router_args,
        ]
        if self.spec.colocated:
            return [*argv, "--colocated"]
        return [*argv, *self._registry_argv()]

    def _gateway_argv(self, port: int) -> list[str]:
        return [
            "gateway",
            "--model", self.spec.model,
            "--router", ",".join(self.router_addresses.values()),
            "--host", self.spec.host,
            "--port", str(port),
            "--log-level", self.spec.log_level,
            *self._log_requests_argv(),
            *self._tls_argv(server=False),
            *self.spec.gateway_args,
        ]  # fmt: skip

    def _tls_argv(self, server: bool) -> list[str]:
        """The TLS settings as flags: absolute paths of the files (never their contents);
        --grpc-tls-client-auth only for servers (the gateway is a client)."""
        tls = self.spec.grpc_tls
        argv = []
        files = (("--grpc-tls-cert", tls.cert), ("--grpc-tls-key", tls.key), ("--grpc-tls-ca", tls.ca))
        for flag, path in files:
            if path is not None:
                argv += [flag, str(path.resolve())]
        if tls.server_name is not None:
            argv += ["--grpc-tls-server-name", tls.server_name]
        if server and tls.client_auth:
            argv.append("--grpc-tls-client-auth")
        return argv

    def _gpu_env(self, engine_index: int) -> dict[str, str]:
        gpu = dealt_gpu(self.spec.gpus, engine_index)
        return {"CUDA_VISIBLE_DEVICES": gpu} if gpu is not None else {}

    def _spawn(self, name: str, argv: list[str], extra_env: dict[str, str] | None = None) -> None:
        self._launches[name] = (argv, dict(extra_env or {}))
        if not argv[0].endswith("redis-server"):
            argv = [sys.executable, "-m", "baton.services.cli", *argv]
        env = self._environment(name, extra_env or {})
        # Own session: a Ctrl-C in the terminal reaches only the launcher, which stops the services in
        # order; the parent-death signal stops them if the launcher itself is killed. Started from the
        # spawner thread, whichever thread asks (restart() may be called from a short-lived one).
        if self._spawner is None:
            self._spawner = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="baton-spawner")
        process = self._spawner.submit(
            subprocess.Popen,
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
            preexec_fn=terminate_with_parent,  # in the child, before exec
        ).result()
        self.processes[name] = process
        pump = threading.Thread(target=self._pump_log, args=(name, process), daemon=True)
        pump.start()
        self._pumps.append(pump)

    def _environment(self, name: str, extra_env: dict[str, str]) -> dict[str, str]:
        """Process `name`'s environment: this one's, with the cluster's secrets where that process reads
        them (never in its argv, where ps shows them)."""
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "UCX_WARN_UNUSED_ENV_VARS": "n", **self.spec.env}
        if self.spec.redis_username:
            env["BATON_REDIS_USERNAME"] = self.spec.redis_username
        if self.spec.redis_password:
            env["BATON_REDIS_PASSWORD"] = self.spec.redis_password
        if self.spec.kv_transfer_secret and name.startswith(("prefill", "decode")):
            env["BATON_KV_TRANSFER_SECRET"] = self.spec.kv_transfer_secret
        return {**env, **extra_env}

    def _pump_log(self, name: str, process: subprocess.Popen[bytes]) -> None:
        assert process.stdout is not None
        for raw in process.stdout:
            line = raw.decode(errors="replace").rstrip()
            with self._log_lock:
                print(f"{name:<10}| {line}", file=self.log, flush=True)

    def _wait_registered(self, names: set[str], deadline: float) -> None:
        async def registered() -> set[str]:
            async with self.registry() as registry:
                return {w.info.worker_id for w in await registry.live_workers()}

        self._poll(
            lambda: names <= (_quietly(lambda: asyncio.run(registered())) or set()),
            deadline,
            f"{sorted(names)} to register",
        )

    def _wait_serving(self, router: str, deadline: float) -> None:
        address = self.router_addresses[router]
        self._poll(lambda: _health_serving(address, self.tls), deadline, f"{router} on {address} to serve")

    def router_stats(self, router: str = "router", timeout_s: float = 10.0) -> router_pb2.ClusterStats:
        """Router `router`'s GetClusterStats: the workers it sees, summed, and its own placements
        (grpc.RpcError when it does not answer)."""
        with grpc_tls.sync_channel(self.router_addresses[router], self.tls) as channel:
            stub = router_pb2_grpc.RouterStub(channel)
            return stub.GetClusterStats(router_pb2.GetClusterStatsRequest(), timeout=timeout_s)

    def _wait_router_sees_workers(self, router: str, deadline: float) -> None:
        """Until the router's worker list (refreshed from the registry) holds every worker."""
        want = (self.spec.num_decode, self.spec.num_prefill)

        def seen() -> bool:
            try:
                stats = self.router_stats(router, timeout_s=2)
            except grpc.RpcError:
                return False
            return (stats.num_decode_workers, stats.num_prefill_workers) == want

        self._poll(seen, deadline, f"{router} to see {want[0]} decode and {want[1]} prefill workers")

    def _wait_gateway_ready(self, deadline: float) -> None:
        def ready() -> bool:
            try:
                with urllib.request.urlopen(f"{self.gateway_url}/ready", timeout=2) as reply:
                    return bool(reply.status == 200)
            except OSError:
                return False

        self._poll(ready, deadline, f"the gateway on {self.gateway_url} to be ready")

    def _poll(self, ready: Callable[[], object], deadline: float, what: str) -> None:
        while not ready():
            dead = [n for n, p in self.processes.items() if p.poll() is not None]
            if dead:
                raise RuntimeError(f"{', '.join(dead)} exited while waiting for {what} (see its log above)")
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out waiting for {what}")
            time.sleep(0.1)

    # -- run / stop ------------------------------------------------------------------------------
    def exited(self) -> dict[str, int]:
        """Processes that ended, with their exit codes."""
        return {n: p.returncode for n, p in self.processes.items() if p.poll() is not None}

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        self.processes[name].send_signal(sig)
        self.processes[name].wait(STOP_TIMEOUT_S)

    def restart(self, name: str, timeout_s: float = 180.0) -> None:
        """Start the exited process `name` again, with the argv and environment it was first given
        (a worker keeps its id, the router and the gateway their ports), and wait until it serves: a
        worker registered again and its gRPC health, at the address it registered, says SERVING (a
        lease of the dead process may still be live); the router SERVING; the gateway ready."""
        process = self.processes[name]
        if process.poll() is None:
            raise ValueError(f"{name} is still running (pid {process.pid}): kill it before restarting it")
        argv, extra_env = self._launches[name]
        self._spawn(name, argv, extra_env)
        deadline = time.monotonic() + timeout_s
        if name.startswith(("prefill", "decode")):
            self._wait_worker_serving(name, deadline)
        elif name in self.router_addresses:
            self._wait_serving(name, deadline)
        elif name == "gateway":
            self._wait_gateway_ready(deadline)

    def _wait_worker_serving(self, name: str, deadline: float) -> None:
        async def address() -> str | None:
            async with self.registry() as registry:
                live = {w.info.worker_id: w.info.grpc_address for w in await registry.live_workers()}
            return live.get(name)

        def serving() -> bool:
            where = _quietly(lambda: asyncio.run(address()))
            return where is not None and _health_serving(where, self.tls)

        self._poll(serving, deadline, f"{name} to register and serve again")

    def stop(self) -> dict[str, int]:
        """SIGTERM the gateway, then the router, then the workers, then Redis (each group drains);
        SIGKILL stragglers. Returns every process's exit code."""
        workers = [n for n in self.processes if n.startswith(("prefill", "decode"))]
        order = [["gateway"], list(self.router_addresses), workers, ["redis"]]
        for group in order:
            running = [
                self.processes[n] for n in group if n in self.processes and self.processes[n].poll() is None
            ]
            for process in running:
                process.send_signal(signal.SIGTERM)
            for process in running:
                try:
                    process.wait(STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        for pump in self._pumps:
            pump.join(timeout=5)
        if self._spawner is not None:
            self._spawner.shutdown()
            self._spawner = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
        return {n: p.returncode for n, p in self.processes.items()}

    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve_forever(spec: ClusterSpec) -> int:
    """Run the cluster until Ctrl-C / SIGTERM (exit 0) or until the router dies (exit 1)."""
    cluster = LocalCluster(spec)  # checks the settings (TLS files) before anything starts
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    cluster.start()
    mode = "colocated" if spec.colocated else f"{spec.num_prefill} prefill + {spec.num_decode} decode workers"
    registry = "" if spec.colocated else f", registry {redacted(cluster.redis_url or '')}"
    lines = [f"\nBaton is serving {spec.model} ({mode}{registry})."]
    if cluster.gateway_url:
        lines += [
            f"  OpenAI API:  {cluster.gateway_url}/v1   (metrics: {cluster.gateway_url}/metrics)",
            f"  Try it:      curl {cluster.gateway_url}/v1/completions -H 'Content-Type: application/json' "
            + '-d \'{"prompt": "Once upon a time", "max_tokens": 16}\'',
        ]
    lines += [
        f"  gRPC Router: {', '.join(cluster.router_addresses.values())} ({grpc_tls.describe(cluster.tls)})",
        "Press Ctrl-C to stop.\n",
    ]
    print("\n".join(lines), flush=True)
    code = 0
    while not stop.wait(0.5):
        exited = cluster.exited()
        if exited.keys() & {"gateway", "redis", *cluster.router_addresses}:
            print(f"baton serve: {exited} exited; stopping the cluster", file=sys.stderr)
            code = 1
            break
    print("baton serve: stopping", file=sys.stderr, flush=True)
    cluster.stop()
    return code


def _url_host(host: str) -> str:
    """The address to reach a server bound to `host` (a wildcard bind is reached on loopback)."""
    return {"0.0.0.0": "127.0.0.1", "::": "[::1]"}.get(host, f"[{host}]" if ":" in host else host)


def _health_serving(address: str, tls: GrpcTls | None) -> bool:
    """True if the gRPC server at `address` answers its health check with SERVING."""
    with grpc_tls.sync_channel(address, tls) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
        except grpc.RpcError:
            return False
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _quietly(fn: Callable[[], _T]) -> _T | None:
    try:
        return fn()
    except (RegistryUnavailable, OSError):
        return None
