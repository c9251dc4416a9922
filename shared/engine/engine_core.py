"""The engine core: requests in, one step at a time, outputs back. No threads, no sockets
(the async engine and the worker services wrap it)."""

from __future__ import annotations

import contextlib
import gc
import logging
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch

from baton.shared.config import EngineConfig
from baton.shared.engine.attention import AttentionMetadata, get_attention_backend, resolve_backend_name
from baton.shared.engine.block_pool import BlockPool
from baton.shared.engine.cuda_graphs import DecodeGraphs
from baton.shared.engine.host_to_device import host_to_device
from baton.shared.engine.kv_cache import allocate_kv_caches, block_nbytes, check_kv_run, scatter_kv_run
from baton.shared.engine.kv_cache_manager import KVCacheManager, cdiv
from baton.shared.engine.model_runner import ModelRunner
from baton.shared.engine.outputs import EngineOutput, Logprob, PositionLogprobs
from baton.shared.engine.request import Request, RequestStatus
from baton.shared.engine.request_validator import RequestValidator, resolve_max_model_len
from baton.shared.engine.sampler import QueuedTokens, Sampler
from baton.shared.engine.sampling_params import SamplingParams
from baton.shared.engine.scheduler import (
    SampledToken,
    ScheduledChunk,
    Scheduler,
    SchedulerConfig,
    SchedulerOutput,
)
from baton.shared.engine.step_stats import StepKindTotals, StepStats
from baton.shared.models.loader import load_model, resolve_dtype
from baton.shared.models.model_config import ModelConfig, read_json

logger = logging.getLogger(__name__)

PromptKVSink = Callable[[str, list[int], "torch.cuda.Event | None"], None]
"""Receives (request_id, block_ids, ready) for each prefill-only request whose prompt a step has just
computed: every layer's KV of the prompt is in these blocks of the engine's cache (prompt order) once
the interprocess CUDA event `ready` completed (None off the GPU: it is there already). The blocks stay
the request's, though it has finished, until `EngineCore.release_prompt_kv(request_id)`: read them
before calling it."""


class _QueuedStep(NamedTuple):
    """A step queued on the device: what was scheduled, and the function that waits for its tokens."""

    sched: SchedulerOutput
    result: QueuedTokens[dict[str, SampledToken]]
    totals: StepKindTotals  # where its wait and finish times count


@dataclass(frozen=True)
class EngineStats:
    num_waiting: int
    num_running: int
    num_reserved: int
    num_free_blocks: int
    num_cached_blocks: int
    num_held_blocks: int
    num_request_blocks: int
    """Distinct blocks held by the requests the engine knows (equals num_held_blocks unless leaking)."""
    num_preemptions: int
    prefix_query_tokens: int
    prefix_hit_tokens: int
    request_ids: tuple[str, ...]

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_hit_tokens / self.prefix_query_tokens if self.prefix_query_tokens else 0.0


class EngineCore:
    """Owns the model, the paged KV cache, the scheduler and the sampler of one worker."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.model_dir = Path(config.model)
        self.model_config = ModelConfig.from_dir(self.model_dir)
        self.device = _resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.model_config)
        self.max_model_len = resolve_max_model_len(config, self.model_config)
        self.validator = RequestValidator(self.max_model_len, self.model_config.vocab_size)
        self.eos_token_ids = frozenset(_eos_token_ids(self.model_dir, self.model_config))
        self.attention = get_attention_backend(resolve_backend_name(config.attention_backend, self.device))
        self.model = load_model(
            self.model_dir,
            self.model_config,
            self.dtype,
            self.device,
            self.attention,
            self.max_model_len,
            config.load_format,
        )
        num_blocks = self._num_kv_blocks()
        self.kv_caches = allocate_kv_caches(
            self.model_config, num_blocks, config.block_size, self.dtype, self.device
        )
        self.kv_manager = KVCacheManager(
            BlockPool(num_blocks, config.enable_prefix_caching), config.block_size
        )
        self.scheduler = Scheduler(
            SchedulerConfig(config.max_num_batched_tokens, config.max_num_seqs, self.max_model_len),
            self.kv_manager,
        )
        self.runner = ModelRunner(
            self.model, self.kv_caches, self.kv_manager, Sampler(self.device, config.seed), self.device
        )
        if self.device.type == "cuda" and self.attention_backend == "triton" and not config.enforce_eager:
            self.runner.graphs = DecodeGraphs(
                self.model,
                self.kv_caches,
                config.max_num_seqs,
                cdiv(self.max_model_len, config.block_size),
                self.device,
            )
        if self.device.type == "cuda" and self.attention_backend == "triton":
            self._warm_up()
        self._compute_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._overlap_steps = self.device.type == "cuda"  # on a CPU a queued step is a computed one
        self._in_flight: _QueuedStep | None = None
        self._async_scheduling = config.async_scheduling
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # weights and caches are written before any step reads them
        self.step_stats = StepStats()
        """Where step time goes (host launch, device wait, finish), per kind of step."""
        self.prompt_kv_sink: PromptKVSink | None = None
        """Prefill worker: where a computed prompt's KV blocks are announced (see PromptKVSink)."""
        # Reserved blocks are written by the KV receiver's thread; this lock keeps a reservation from
        # being freed (and its blocks handed to another request) while a layer is being written.
        self._reservation_lock = threading.Lock()
        self._reserved_indexes: dict[str, torch.Tensor] = {}  # see _reserved_index
        logger.info(
            "engine ready: %s on %s (%s, %s attention), %d KV blocks of %d tokens, max_model_len %d",
            self.model_config.architecture,
            self.device,
            self.dtype,
            self.attention_backend,
            num_blocks,
            config.block_size,
            self.max_model_len,
        )

    @property
    def attention_backend(self) -> str:
        """The attention backend in use: `torch` or `triton`."""
        return self.attention.name

    # -- requests --------------------------------------------------------------------------------
    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError naming what is wrong with a request; touches no state."""
        self.validator.validate(prompt_token_ids, params)

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        prefill_only: bool = False,
        validated: bool = False,
    ) -> None:
        """Queue a request. `prefill_only`: compute the prompt, sample one token, announce the prompt's
        KV blocks to `prompt_kv_sink` and end (a prefill worker's request). `validated`: the caller
        ran validate() on these very arguments (AsyncEngine does, on its caller's thread), so the
        step loop does not check the prompt again."""
        if not validated:
            self.validate(prompt_token_ids, params)
        self.scheduler.add(self._new_request(request_id, prompt_token_ids, params, prefill_only))

    def _new_request(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, prefill_only: bool = False
    ) -> Request:
        return Request(
            request_id=request_id,
            prompt_token_ids=list(prompt_token_ids),
            sampling_params=params,
            eos_token_ids=self.eos_token_ids,
            block_size=self.config.block_size,
            prefill_only=prefill_only,
        )

    def abort_requests(self, request_ids: list[str]) -> list[EngineOutput]:
        with self._reservation_lock:
            for request_id in request_ids:
                self._reserved_indexes.pop(request_id, None)
            return [_final_output(r, []) for r in self.scheduler.abort(request_ids)]

    def fail_request(self, request_id: str, message: str) -> EngineOutput | None:
        """End one request with finish_reason 'error' (its blocks are freed); None if unknown."""
        with self._reservation_lock:
            self._reserved_indexes.pop(request_id, None)
            request = self.scheduler.fail(request_id, message)
        return _final_output(request, []) if request is not None else None

    # -- remote prefill (decode worker) ----------------------------------------------------------
    def reserve(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, validated: bool = False
    ) -> list[int] | None:
        """Hold blocks for a prompt whose KV another worker will push (ValueError on bad input).
        Returns the block ids in prompt order, or None when they (or a sequence slot) are not free.
        `validated`: as for add_request."""
        if not validated:
            self.validate(prompt_token_ids, params)
        request = self._new_request(request_id, prompt_token_ids, params)
        with self._reservation_lock:
            block_ids = self.scheduler.reserve(request)
        return list(block_ids) if block_ids is not None else None

    def fence(self) -> torch.cuda.Event | None:
        """An event that completes once the steps queued so far have run (None off the GPU). Another
        process that writes into blocks reserved now must wait for it: a step in flight may still
        write a block that an aborted request just gave up."""
        if self._compute_stream is None:
            return None
        event = torch.cuda.Event(interprocess=True)  # shareable with the receiving process
        event.record(self._compute_stream)
        return event

    def write_reserved_kv(self, request_id: str, layer: int, kv: torch.Tensor) -> None:
        """Copy one pushed layer into the request's reserved blocks; see `write_reserved_kv_run`.

        kv: [2, num_blocks, block_size, num_kv_heads, head_dim], K then V, blocks in prompt order."""
        self.write_reserved_kv_run(request_id, layer, kv.unsqueeze(0))

    def write_reserved_kv_run(self, request_id: str, first_layer: int, kv: torch.Tensor) -> None:
        """Copy a run of pushed layers into the request's reserved blocks. Thread-safe against aborts;
        raises KeyError if the request no longer holds a reservation, ValueError on a wrong shape.
        On a GPU the copies are queued on the default stream (the caller must not overwrite `kv`
        before that work ran); `commit_reserved` orders the engine's steps after them.

        kv: [count, 2, num_blocks, block_size, num_kv_heads, head_dim], layers first_layer.. in order."""
        with self._reservation_lock:
            if request_id not in self.scheduler.reserved:
                raise KeyError(f"request {request_id!r} holds no reservation")
            block_ids = self.kv_manager.block_ids(request_id)
            check_kv_run(self.kv_caches, first_layer, kv, len(block_ids))
            on_stream: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
            if self.device.type == "cuda":
                # after the steps queued so far: one in flight may still write a block that an
                # aborted request just gave up and this reservation received
                assert self._compute_stream is not None
                default_stream = torch.cuda.default_stream(self.device)
                default_stream.wait_stream(self._compute_stream)
                on_stream = torch.cuda.stream(default_stream)
            with on_stream:
                index = self._reserved_index(request_id, block_ids)
                scatter_kv_run(self.attention, self.kv_caches, first_layer, kv, index)

    def _reserved_index(self, request_id: str, block_ids: list[int]) -> torch.Tensor:
        """The reservation's block ids on the device, made by its first pushed layer and kept for the
        others (a prompt's 16+ layers share it) until the request leaves the reservation. Call under
        the lock."""
        index = self._reserved_indexes.get(request_id)
        if index is None:
            index = self._reserved_indexes[request_id] = host_to_device(block_ids, torch.long, self.device)
        return index

    def commit_reserved(
        self, request_id: str, first_token: SampledToken, num_cached_tokens: int
    ) -> EngineOutput:
        """Every layer of the reserved prompt arrived: admit it to the running batch with the first
        token (sampled by the prefill worker). KeyError if it holds no reservation (aborted)."""
        with self._reservation_lock:
            if request_id not in self.scheduler.reserved:
                raise KeyError(f"request {request_id!r} holds no reservation")
            self._reserved_indexes.pop(request_id, None)
            request = self.scheduler.commit_reserved(request_id, first_token, num_cached_tokens)
        if self._compute_stream is not None:  # steps read the pushed KV only after its copy ran
            self._compute_stream.wait_stream(torch.cuda.default_stream(self.device))
        return self._output(request, first_token)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def has_work(self) -> bool:
        """Something to compute (reserved requests wait for their KV, not for a step)."""
        sched = self.scheduler
        return bool(sched.waiting or sched.ready or sched.running or self._in_flight)

    # -- stepping --------------------------------------------------------------------------------
    def step(self) -> list[EngineOutput]:
        """Run the model once and sample: outputs for requests that got a token or ended.

        On a GPU the next step is queued before this one's outputs are built: the device computes
        step N+1 while the host builds step N's outputs and the caller handles them. Requests added,
        aborted or committed between calls are seen by the next schedule, as before; a request
        aborted while a step ran is skipped when that step's tokens arrive.

        With `async_scheduling`, a decode-only step's successor is queued before its tokens are read
        (see _launch_continuation), so the device does not wait for the host between the two."""
        if self._in_flight is None:
            self._in_flight = self._launch()
            if self._in_flight is None:
                return []
        # cleared first: a failure leaves none in flight
        (sched, result, totals), self._in_flight = self._in_flight, None
        ahead = self._launch_continuation(sched, result) if self._async_scheduling else None
        started = time.perf_counter()
        with self._on_compute_stream():  # the copy of the sampled ids queues behind the step
            sampled = result()  # waits for the device
        waited = time.perf_counter()
        changed = self.scheduler.update(sched, sampled)
        updated = time.perf_counter()
        if ahead is not None:
            self._in_flight = ahead
        elif self._overlap_steps:
            self._in_flight = self._launch()  # counted as the next step's launch
        resumed = time.perf_counter()
        outputs = [self._output(r, sampled[r.request_id]) for r in changed]
        totals.wait_s += waited - started
        totals.finish_s += updated - waited + time.perf_counter() - resumed
        return outputs

    def _launch(self) -> _QueuedStep | None:
        started, started_cpu = time.perf_counter(), time.thread_time()
        sched = self.scheduler.schedule()
        if sched.is_empty:
            return None
        with self._on_compute_stream():
            result = self.runner.launch(sched)
            self._announce_prompt_kv(sched)
        totals = self.step_stats.launched(
            sched, time.perf_counter() - started, time.thread_time() - started_cpu
        )
        return _QueuedStep(sched, result, totals)

    def _launch_continuation(
        self, sched: SchedulerOutput, launched: QueuedTokens[dict[str, SampledToken]]
    ) -> _QueuedStep | None:
        """Queue the step after `sched`, which is still on the device, when `sched` is decode-only:
        each of its requests one token further, its input token the one `sched` samples (taken on
        the device). A request whose pending token ends it by length is left out; one that a stop
        token ends is found when the tokens are read, and the token this step computes for it is
        dropped then (its blocks, freed meanwhile, are written only by steps queued before any later
        owner's, on the one stream; reservations wait for `fence`). Requests a decode worker committed
        since `sched` was scheduled (pushed prompt KV in place, the first token on the host) join it,
        after the others, so arrivals do not hold the batch to a step at a time.

        None, and the next step is scheduled once the tokens are read, when: a request waits to join
        (waiting or ready) or runs a prefill; a request's sampling needs its latest token on the host
        (penalties, a seeded draw, min_tokens not yet reached); or no block is free for a token."""
        scheduler = self.scheduler
        if launched.token_ids is None or scheduler.waiting or scheduler.ready:
            return None
        started, started_cpu = time.perf_counter(), time.thread_time()
        max_model_len = scheduler.config.max_model_len
        rows: list[int] = []  # of `sched`'s sampled ids, one per chunk of the next step
        chunks: list[ScheduledChunk] = []
        for row, chunk in enumerate(sched.chunks):  # decode-only: every chunk samples, in order
            request = chunk.request
            if chunk.num_new_tokens != 1 or not chunk.samples:
                return None
            if request.status is not RequestStatus.RUNNING:
                continue  # ended (aborted, failed) since it was scheduled
            params = request.sampling_params
            num_output = request.num_output_tokens
            if not _continuable(request):
                return None
            if num_output + 1 >= params.max_tokens or len(request.all_token_ids) + 1 >= max_model_len:
                continue  # the pending token is its last
            rows.append(row)
            chunks.append(ScheduledChunk(request, chunk.start + 1, 1, True))
        in_step = {chunk.request.request_id for chunk in sched.chunks}
        joining = [r for r in scheduler.running if r.request_id not in in_step]  # committed since
        if any(r.num_tokens - r.num_computed_tokens != 1 or not _continuable(r) for r in joining):
            return None  # (a running request `sched` left out has a prefill chunk or lacked budget)
        num_chunks = len(chunks) + len(joining)
        if num_chunks == 0 or num_chunks > scheduler.config.max_num_batched_tokens:
            return None
        for chunk in chunks:  # room for the pending token and this step's
            if self.kv_manager.allocate_slots(chunk.request, 2) is None:
                return None  # blocks given to the ones before stay theirs: their next steps use them
        for request in joining:
            if self.kv_manager.allocate_slots(request, 1) is None:
                return None
        chunks += [ScheduledChunk(r, r.num_computed_tokens, 1, True) for r in joining]
        continuation = SchedulerOutput(chunks)
        with self._on_compute_stream():
            input_ids = launched.token_ids  # [len(sched.chunks)]
            if len(rows) < len(sched.chunks):
                input_ids = input_ids.index_select(0, host_to_device(rows, torch.long, self.device))
            if joining:  # their input token is the first one, sampled by the prefill worker
                first = host_to_device([r.all_token_ids[-1] for r in joining], torch.long, self.device)
                input_ids = torch.cat([input_ids, first])
            result = self.runner.launch(continuation, input_ids)
        totals = self.step_stats.launched(
            continuation, time.perf_counter() - started, time.thread_time() - started_cpu, continued=True
        )
        return _QueuedStep(continuation, result, totals)

    @property
    def num_continued_steps(self) -> int:
        """Steps queued before their predecessor's tokens were read (see _launch_continuation), since
        `step_stats` was last reset."""
        return self.step_stats.decode.continued

    @torch.inference_mode()
    def _warm_up(self) -> None:
        """Compile the kernel variants steps need before serving (a first request would otherwise wait
        seconds for Triton's JIT): a full-budget prefill chunk, then decodes beside a chunk that has a
        cached prefix, short prefills, then the block copies of a KV transfer. Nothing lands in the KV
        cache: every slot is -1, the copied block is written back unchanged."""
        bs, longest = self.config.block_size, self.max_model_len
        n = min(self.config.max_num_batched_tokens, longest)
        shapes = [([n], [0])]
        mixed = min(n, longest - 3 * bs - 6) // 2  # a chunk after a 3-block prefix, within max_model_len
        if mixed >= 1:
            shapes.append(([1, 1, mixed], [3 * bs + 5, 7, 3 * bs]))
        # prefills whose block tables are 1 and 2 blocks wide: Triton compiles a variant for a row
        # stride of 1, a multiple of 16 (the full chunk above) and any other (measured: a served
        # prefill worker compiled one mid-run)
        shapes += [([q], [0]) for q in (bs, bs + 1) if q <= longest]
        for query_lens, prefix_lens in shapes:
            input_ids, positions, meta = _dummy_batch(query_lens, prefix_lens, bs, self.device)
            hidden = self.model(input_ids, positions, self.kv_caches, meta)
            self.model.compute_logits(hidden[-1:])
        k_cache, v_cache = self.kv_caches[0]
        block = torch.zeros(1, dtype=torch.long, device=self.device)
        self.attention.scatter_blocks(
            self.attention.gather_blocks(k_cache, v_cache, block), k_cache, v_cache, block
        )
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _on_compute_stream(self) -> AbstractContextManager[object]:
        """Steps run on the engine's own CUDA stream, so that other threads (the KV receiver writing
        pushed layers, a sender checksumming them) can wait for their own work on the default stream
        without waiting for the model step in flight."""
        if self._compute_stream is None:
            return nullcontext()
        return torch.cuda.stream(self._compute_stream)

    def _announce_prompt_kv(self, sched: SchedulerOutput) -> None:
        """Hand `prompt_kv_sink` the blocks of each prefill-only prompt this step completes, with one
        event recorded behind the step for all of them; their blocks are held until released."""
        sink = self.prompt_kv_sink
        shipping = [c.request for c in sched.chunks if c.samples and c.request.prefill_only]
        if sink is None or not shipping:
            return
        ready = None
        if self._compute_stream is not None:
            ready = torch.cuda.Event(interprocess=True)  # shareable with the sending process
            ready.record(self._compute_stream)
        bs = self.config.block_size
        for request in shipping:
            self.scheduler.hold_blocks(request)
            sink(
                request.request_id,
                self.kv_manager.block_ids(request.request_id)[: cdiv(request.num_prompt_tokens, bs)],
                ready,
            )

    def release_prompt_kv(self, request_id: str) -> bool:
        """Free the blocks a finished prefill-only request kept for its announced KV; False if it
        keeps none (already released, or never announced)."""
        return self.scheduler.release_held(request_id)

    def _output(self, request: Request, token: SampledToken) -> EngineOutput:
        logprobs = None
        if request.sampling_params.logprobs is not None and token.logprob is not None:
            top = token.top_logprobs or []
            position: PositionLogprobs = {
                tid: Logprob(lp, rank) for rank, (tid, lp) in enumerate(top, start=1)
            }
            position[token.token_id] = Logprob(token.logprob, token.rank)
            logprobs = [position]
        if request.is_finished:
            return _final_output(request, [token.token_id], logprobs)
        return EngineOutput(
            request.request_id,
            [token.token_id],
            logprobs,
            num_prompt_tokens=request.num_prompt_tokens,
            num_cached_tokens=request.num_cached_tokens,
        )

    # -- introspection ---------------------------------------------------------------------------
    def stats(self) -> EngineStats:
        usage = self.kv_manager.pool.usage()
        return EngineStats(
            num_waiting=len(self.scheduler.waiting) + len(self.scheduler.ready),
            num_running=len(self.scheduler.running),
            num_reserved=len(self.scheduler.reserved),
            num_free_blocks=usage.num_free,
            num_cached_blocks=usage.num_cached,
            num_held_blocks=usage.num_held,
            num_request_blocks=self.kv_manager.num_request_blocks,
            num_preemptions=self.scheduler.num_preemptions,
            prefix_query_tokens=self.kv_manager.prefix_queries,
            prefix_hit_tokens=self.kv_manager.prefix_hits,
            request_ids=tuple(self.scheduler.request_ids),
        )

    def allocator_summary(self) -> str | None:
        """How the CUDA caching allocator fared (None off the GPU): peak memory reserved, and how
        often it had to ask the driver for memory (each cudaMalloc or cudaFree a stall of the host,
        a retry after an out-of-memory a synchronization of the device)."""
        if self.device.type != "cuda":
            return None
        stats = torch.cuda.memory_stats(self.device)
        return (
            f"peak reserved {stats.get('reserved_bytes.all.peak', 0) / 2**30:.1f} GiB, "
            f"{stats.get('num_device_alloc', 0)} device allocations, "
            f"{stats.get('num_device_free', 0)} frees, {stats.get('num_alloc_retries', 0)} retries"
        )

    def reset_prefix_cache(self) -> int:
        """Forget the content of every cached block that no request holds (they become free blocks);
        returns how many. Blocks in use keep their data but leave the cache index."""
        pool = self.kv_manager.pool
        num_cached = pool.usage().num_cached
        pool.reset_prefix_cache()
        return num_cached

    def check_integrity(self) -> None:
        """Raise IntegrityError if any block's state or refcount is inconsistent (I1)."""
        self.kv_manager.check_integrity()

    def assert_no_leaks(self) -> None:
        """I3: with no request left, every block is free or cached."""
        self.check_integrity()
        usage = self.kv_manager.pool.usage()
        held = self.scheduler.held
        if self.scheduler.has_unfinished() or usage.num_held or self.kv_manager.num_requests or held:
            raise AssertionError(
                f"leak: {self.scheduler.num_unfinished} unfinished requests, {usage.num_held} held blocks"
                + (f", prompt KV never released for {sorted(held)}" if held else "")
            )
        if self._reserved_indexes:
            raise AssertionError(f"leak: block indexes kept for {sorted(self._reserved_indexes)}")

    def _num_kv_blocks(self) -> int:
        cfg = self.config
        per_block = block_nbytes(self.model_config, cfg.block_size, self.dtype)
        needed = cdiv(self.max_model_len, cfg.block_size)
        if cfg.num_kv_blocks is not None:
            num_blocks = cfg.num_kv_blocks
        elif self.device.type == "cuda":
            gc.collect()  # an engine dropped in a reference cycle still holds its KV cache until collected
            free, total = torch.cuda.mem_get_info(self.device)
            # memory this process's caching allocator holds but no tensor uses is free for us too
            free += torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
            budget = free - (1 - cfg.gpu_memory_utilization) * total - _activation_reserve_nbytes(self)
            num_blocks = int(budget // per_block)
        else:
            enough_for_all = cdiv(cfg.max_num_seqs * self.max_model_len, cfg.block_size)
            num_blocks = min(int(cfg.cpu_kv_cache_gib * 2**30 // per_block), enough_for_all)
        if num_blocks < needed:
            raise ValueError(
                f"KV cache of {num_blocks} blocks x {cfg.block_size} tokens cannot hold one sequence of "
                f"max_model_len {self.max_model_len}; raise num_kv_blocks (or the memory budget) to at least "
                f"{needed}, or lower max_model_len"
            )
        return num_blocks


def _dummy_batch(
    query_lens: list[int], prefix_lens: list[int], block_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
    """A batch of sequences (decodes first) whose tokens are all 0, whose keys all live in block 0 and
    whose new K/V are dropped (slot -1): for warming kernels up."""
    seq_lens = [p + q for p, q in zip(prefix_lens, query_lens, strict=True)]
    starts = [0]
    for q in query_lens:
        starts.append(starts[-1] + q)
    positions = torch.cat([torch.arange(p, p + q) for p, q in zip(prefix_lens, query_lens, strict=True)])
    width = cdiv(max(seq_lens), block_size)
    meta = AttentionMetadata(
        slot_mapping=torch.full((starts[-1],), -1, dtype=torch.long, device=device),
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_tables=torch.zeros((len(seq_lens), width), dtype=torch.int32, device=device),
        num_decodes=sum(1 for q in query_lens if q == 1),
        max_query_len=max(query_lens),
        max_seq_len=max(seq_lens),
        query_start_loc_host=tuple(starts),
        seq_lens_host=tuple(seq_lens),
    )
    input_ids = torch.zeros(starts[-1], dtype=torch.long, device=device)
    return input_ids, positions.to(device), meta


def _continuable(request: Request) -> bool:
    """Whether the request's next step may be queued before its latest token is read: not when its
    sampling needs that token on the host (penalties, a seeded draw, min_tokens not yet reached) or
    it only prefills."""
    params = request.sampling_params
    return not (
        params.has_penalties
        or (params.seed is not None and not params.is_greedy)
        or request.num_output_tokens < params.min_tokens
        or request.prefill_only
    )


def _final_output(
    request: Request, new_token_ids: list[int], logprobs: list[PositionLogprobs] | None = None
) -> EngineOutput:
    return EngineOutput(
        request.request_id,
        new_token_ids,
        logprobs,
        finish_reason=request.finish_reason.value if request.finish_reason else None,
        stop_reason=request.stop_reason,
        error=request.error,
        num_prompt_tokens=request.num_prompt_tokens,
        num_cached_tokens=request.num_cached_tokens,
    )


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"device {name!r} is not a valid torch device: {exc}") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device {name!r}: Baton runs on 'cpu' or 'cuda'")
    return device


def _eos_token_ids(model_dir: Path, model_config: ModelConfig) -> set[int]:
    """End-of-sequence ids: generation_config.json's (often a list), else config.json's."""
    path = model_dir / "generation_config.json"
    if path.is_file():
        value = read_json(path).get("eos_token_id")
        if value is not None:
            return set(value) if isinstance(value, list) else {value}
    return set(model_config.eos_token_ids)


def _activation_reserve_nbytes(engine: EngineCore) -> int:
    """Rough peak of one step's activations (hidden states, MLP, logits) to keep out of the KV budget."""
    cfg, mc = engine.config, engine.model_config
    itemsize = torch.empty((), dtype=engine.dtype).element_size()
    tokens = cfg.max_num_batched_tokens
    per_token = (
        4 * mc.hidden_size + 3 * mc.intermediate_size + 2 * (mc.num_heads + 2 * mc.num_kv_heads) * mc.head_dim
    )
    logits = cfg.max_num_seqs * mc.vocab_size * 4 * 3
    return tokens * per_token * itemsize + logits + 256 * 2**20
