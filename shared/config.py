"""The engine's one validated configuration (frozen; unknown or out-of-range settings raise ValueError)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

MIN_KV_TRANSFER_SECRET_CHARS = 16
"""The shortest KV transfer secret accepted: its proofs cross the network in the clear, so a short one
could be guessed offline from a recorded handshake."""


def check_kv_transfer_secret(secret: str) -> None:
    """ValueError, which never shows the secret, if it is too short to be a KV transfer secret."""
    if len(secret) < MIN_KV_TRANSFER_SECRET_CHARS:
        raise ValueError(
            f"the KV transfer secret (--kv-transfer-secret) must be at least {MIN_KV_TRANSFER_SECRET_CHARS} "
            f"characters, got {len(secret)} (e.g. openssl rand -hex 32)"
        )


class EngineConfig(BaseModel):
    """Everything an engine (offline LLM, prefill or decode worker) is built from."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str = Field(description="Path of a Hugging Face model directory.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights and activations dtype; 'auto' takes the checkpoint's."
    )
    device: str = Field(
        "auto", description="'auto' (CUDA when present, else CPU), 'cpu', 'cuda' or 'cuda:N'."
    )
    block_size: int = Field(16, ge=1, le=1024, description="Tokens per KV block.")
    num_kv_blocks: int | None = Field(
        None, ge=1, description="KV blocks to allocate; None sizes the cache from memory (see below)."
    )
    gpu_memory_utilization: float = Field(
        0.9, gt=0, le=1, description="On CUDA: fraction of the card's memory Baton may use in all."
    )
    cpu_kv_cache_gib: float = Field(
        1.0, gt=0, description="On CPU: most memory the KV cache may take, in GiB."
    )
    max_num_batched_tokens: int = Field(
        8192, ge=1, description="Token budget of one step; prompts are chunked to fit."
    )
    max_num_seqs: int = Field(
        256,
        ge=1,
        description="Most requests decoding together (a decode worker's reservations, prompts being "
        "prefilled elsewhere, wait outside this batch).",
    )
    max_model_len: int | None = Field(
        None, ge=1, description="Context length (prompt + output); None: the model's max_position_embeddings."
    )
    enable_prefix_caching: bool = Field(
        True, description="Reuse KV of identical prompt prefixes across requests."
    )
    enforce_eager: bool = Field(
        False, description="CUDA: run decode steps eagerly instead of replaying captured CUDA graphs."
    )
    async_scheduling: bool = Field(
        True,
        description="Queue a decode-only step's successor before its tokens are read: the next step's "
        "inputs are the sampled ids still on the device, so the host's update and output work overlaps "
        "the device's step (requests with penalties, a seed, or min_tokens not yet reached fall back to "
        "a step at a time).",
    )
    stream_interval: int = Field(
        1,
        ge=1,
        description="Served requests: tokens gathered per streamed output after the first (1: every step). "
        "Fewer, larger messages relieve the event loops of the workers, router and gateway.",
    )
    burst_step_interval_ms: float = Field(
        0.0,
        ge=0,
        le=1000,
        description="Decode worker: while at least 16 requests wait for their pushed KV and more than are "
        "decoding (a burst being prefilled), run at most one step per this many ms, so that a prefill worker "
        "sharing the GPU gets it for the burst (0: step as fast as possible). Bounds the extra time between "
        "tokens.",
    )
    load_format: Literal["auto", "dummy"] = Field(
        "auto",
        description="auto: read the checkpoint; dummy: seeded random weights (needs only config.json).",
    )
    attention_backend: Literal["auto", "torch", "triton"] = Field(
        "auto", description="Attention implementation; auto: triton on CUDA, torch elsewhere."
    )
    seed: int = Field(0, description="Seed of the sampler's generator for requests without their own seed.")


class RegistryConfig(BaseModel):
    """Where the shared view of workers and block ownership lives."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Redis holding the registry.")
    redis_username: str | None = Field(
        None, description="Redis ACL user, when redis_url names none (None: the default user)."
    )
    redis_password: str | None = Field(
        None, repr=False, description="Redis AUTH password, when redis_url carries none (from a secret)."
    )
    namespace: str = Field("baton", min_length=1, description="Prefix of every registry key.")
    lease_ttl_s: float = Field(
        10.0, gt=0, description="A worker silent this long is dead; its requests are failed and reaped."
    )


class GrpcTlsConfig(BaseModel):
    """TLS of every gRPC server and channel of one process (router, workers, and their clients: the
    gateway, `baton probe`, the CLI). Off, plaintext, unless `cert` or `ca` is set. Files are paths, so
    that they can be a mounted secret; they are read and checked at startup (shared/grpc_tls.py)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    cert: Path | None = Field(
        None,
        description="PEM certificate chain this process presents: a server's own, and a client's under "
        "mutual TLS.",
    )
    key: Path | None = Field(None, description="PEM private key of `cert` (unencrypted).")
    ca: Path | None = Field(
        None,
        description="PEM CA certificates that peers' certificates must chain to; a client without it "
        "trusts gRPC's default roots.",
    )
    client_auth: bool = Field(
        False, description="Servers: mutual TLS, every client must present a certificate `ca` signed."
    )
    server_name: str | None = Field(
        None,
        description="Clients: the name servers' certificates must carry, instead of the host dialled "
        "(grpc.ssl_target_name_override; workers are dialled at the addresses they registered).",
    )

    @property
    def enabled(self) -> bool:
        """Whether gRPC runs over TLS."""
        return self.cert is not None or self.ca is not None

    @model_validator(mode="after")
    def _complete(self) -> GrpcTlsConfig:
        if self.cert is not None and self.key is None:
            raise ValueError("gRPC TLS: --grpc-tls-cert is set but not its private key, --grpc-tls-key")
        if self.key is not None and self.cert is None:
            raise ValueError("gRPC TLS: --grpc-tls-key is set but not its certificate, --grpc-tls-cert")
        if self.client_auth and (self.ca is None or self.cert is None):
            raise ValueError(
                "gRPC TLS: --grpc-tls-client-auth needs --grpc-tls-ca (to check client certificates "
                "against) and the server's own --grpc-tls-cert and --grpc-tls-key"
            )
        if self.server_name is not None and not self.enabled:
            raise ValueError(
                "gRPC TLS: --grpc-tls-server-name is set but TLS is off (set --grpc-tls-ca, or "
                "--grpc-tls-cert and --grpc-tls-key)"
            )
        return self


class WorkerConfig(BaseModel):
    """A prefill or decode worker: its engine, where it listens, and how it registers."""

    # errors name the setting and the rule, never the value given (it may be a secret)
    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)

    role: Literal["prefill", "decode"]
    engine: EngineConfig
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    worker_id: str | None = Field(None, description="Registry id; None: '<role>-<host>-<pid>'.")
    host: str = Field("127.0.0.1", description="Interface the gRPC and KV transfer servers bind.")
    advertise_host: str | None = Field(None, description="Host others reach this worker at; None: `host`.")
    port: int = Field(0, ge=0, le=65535, description="gRPC port; 0 picks a free one (it is registered).")
    transfer_port: int = Field(0, ge=0, le=65535, description="Decode: UCX listener port; 0 picks one.")
    reservation_timeout_s: float = Field(
        30.0, gt=0, description="Decode: reserved blocks whose KV has not arrived by then are released."
    )
    transfer_timeout_s: float = Field(
        30.0, gt=0, description="Prefill: longest wait for the decode worker's acknowledgement."
    )
    kv_faults: str = Field(
        "", description="Prefill: fault injection on KV pushes, e.g. 'drop=0.1,delay_ms=5,corrupt=0.05'."
    )
    max_pushes_per_receiver: int = Field(
        128,
        ge=1,
        description="Prefill: KV pushes in flight to one decode worker (each holds its copied-out KV until "
        "sent); more wait.",
    )
    kv_copy_buffer_gib: float = Field(
        2.0,
        gt=0,
        description="Prefill: device memory the sending process may hold in prompt KV copied out of the "
        "cache and not yet sent; further prompts wait, their blocks kept in the cache. It comes out of "
        "what --gpu-memory-utilization leaves free.",
    )
    kv_transfer_secret: SecretStr | None = Field(
        None,
        description="Prefill and decode: the secret every KV transfer connection proves knowledge of, both "
        "ways, before anything else crosses it (the same on every prefill and decode worker, at least 16 "
        "characters, from a secret); None: KV connections are not authenticated.",
    )
    kv_connections_per_receiver: int = Field(
        4,
        ge=1,
        description="Prefill: UCX connections to one decode worker, pushes multiplexed over them (the "
        "decode worker's receiving process keeps two staging buffers per connection).",
    )
    threads: int | None = Field(None, ge=1, description="Torch CPU threads; None: torch's default.")
    drain_timeout_s: float = Field(
        15.0, ge=0, description="On SIGTERM: how long in-flight requests may finish before they are aborted."
    )
    grpc_tls: GrpcTlsConfig = Field(
        default_factory=GrpcTlsConfig, description="TLS of its gRPC server and clients."
    )
    stall_timeout_s: float = Field(
        120.0,
        gt=0,
        description="Liveness: an engine step running longer than this (a hung device, a deadlock) turns "
        "the worker's gRPC health NOT_SERVING until it progresses again.",
    )

    engine_process: bool = Field(
        False,
        description="Decode: run the engine core (model, KV cache, step loop) in a process of its own, so "
        "that the step loop does not share the GIL with the worker's gRPC and output streams (as vLLM V1's "
        "engine core process).",
    )

    @field_validator("kv_transfer_secret")
    @classmethod
    def _long_enough(cls, secret: SecretStr | None) -> SecretStr | None:
        if secret is not None:
            check_kv_transfer_secret(secret.get_secret_value())
        return secret

    @model_validator(mode="after")
    def _engine_process_decode_only(self) -> WorkerConfig:
        if self.engine_process and self.role != "decode":
            raise ValueError("--engine-process is supported by decode workers only")
        return self

    @property
    def heartbeat_interval_s(self) -> float:
        return self.registry.lease_ttl_s / 3


class RouterConfig(BaseModel):
    """The Router: public gRPC API, placement, and (colocated) an engine of its own."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str = Field(description="Model directory (tokenizer, context length, name).")
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    host: str = Field("127.0.0.1", description="Interface the gRPC server binds.")
    port: int = Field(50051, ge=0, le=65535, description="gRPC port; 0 picks a free one.")
    colocated: EngineConfig | None = Field(
        None, description="Run this engine in the Router itself (no workers, no transfer, no Redis)."
    )
    local_prefill_max_tokens: int = Field(
        64,
        ge=0,
        description="Prompts with at most this many uncached tokens are prefilled by the decode worker.",
    )
    max_prefill_queue_tokens: int = Field(
        0,
        ge=0,
        description="While every prefill worker has at least this many prompt tokens queued (sent by "
        "this Router, not yet handed off), prompts are prefilled by their decode worker instead; "
        "0: no limit (prompts always wait for a prefill worker).",
    )
    max_attempts: int = Field(3, ge=1, description="Placements tried for a request before it fails.")
    max_pending_requests: int = Field(
        4096,
        ge=1,
        description="Requests in flight at the Router (from every gateway and gRPC client); more are "
        "refused with RESOURCE_EXHAUSTED at once, before they are tokenized or placed.",
    )
    drain_timeout_s: float = Field(
        10.0,
        gt=0,
        description="On SIGTERM: how long requests in flight get to finish (new ones are refused).",
    )
    max_model_len: int | None = Field(
        None, ge=1, description="Context length the workers serve; None: the model's max_position_embeddings."
    )
    worker_refresh_s: float = Field(0.5, gt=0, description="How often the live worker list is re-read.")
    grpc_tls: GrpcTlsConfig = Field(
        default_factory=GrpcTlsConfig,
        description="TLS of its gRPC server and of its channels to the workers.",
    )


class GatewayConfig(BaseModel):
    """The OpenAI-compatible HTTP gateway: validates, applies the chat template, tokenizes, and streams
    from the Router over gRPC."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str = Field(description="Model directory (tokenizer and chat template; its name is the model id).")
    router: str = Field(
        "127.0.0.1:50051",
        description="The Router's gRPC address, host:port; several Router replicas comma-separated "
        "(each request goes to the one with the fewest of this gateway's requests in flight, and to "
        "another when its Router cannot be reached).",
    )
    grpc_tls: GrpcTlsConfig = Field(
        default_factory=GrpcTlsConfig, description="TLS of its channels to the Router."
    )
    host: str = Field("127.0.0.1", description="Interface the HTTP server binds (0.0.0.0 for all).")
    port: int = Field(8000, ge=0, le=65535, description="HTTP port; 0 picks a free one.")
    api_key: SecretStr | None = Field(
        None, description="When set, /v1 requests need 'Authorization: Bearer <key>'."
    )
    max_pending_requests: int = Field(
        512, ge=1, description="Requests in flight at the gateway; more are refused with 503 at once."
    )
    processes: int = Field(
        1,
        ge=1,
        le=64,
        description="Gateway processes sharing the HTTP port (the gateway is stateless; more processes "
        "take more requests and stream more tokens a second). The in-flight limit is split between them.",
    )
    drain_timeout_s: float = Field(
        30.0,
        gt=0,
        description="On SIGTERM: how long streams in flight get to finish (new connections are refused).",
    )
    max_body_bytes: int = Field(
        16 << 20, ge=1024, description="Largest request body; a larger one gets 413 before it is read."
    )

    @field_validator("router")
    @classmethod
    def _router_addresses(cls, router: str) -> str:
        if not all(_comma_separated(router)):
            raise ValueError(f"router must be host:port, or several comma-separated; got {router!r}")
        return router

    @property
    def router_addresses(self) -> list[str]:
        return _comma_separated(self.router)

    @property
    def max_pending_per_process(self) -> int:
        return -(-self.max_pending_requests // self.processes)


def _comma_separated(text: str) -> list[str]:
    """'a, b' -> ['a', 'b'] (an empty entry stays, as '')."""
    return [item.strip() for item in text.split(",")]
