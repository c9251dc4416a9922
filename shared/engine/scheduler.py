"""Continuous batching: each step mixes decodes and (chunked) prefills under a token budget.

Order of service in a step: running requests with one token to compute (decodes), then running
requests part-way through their prompt (prefill chunks), then requests whose pushed prompt KV arrived
while the running batch was full, then waiting requests in arrival order.
When blocks run out, the most recently arrived running request not yet scheduled this step is
preempted (its blocks freed, its tokens recomputed later, cached prefix blocks reused); a request
is never dropped.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

from baton.shared.engine.kv_cache_manager import NO_MATCH, KVCacheManager, PrefixMatch, cdiv
from baton.shared.engine.request import FinishReason, Request, RequestStatus


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_batched_tokens: int
    """Token budget of one step (decodes count one each; prompts are chunked to fit)."""
    max_num_seqs: int
    """Most requests in the running batch (a decode worker's reservations wait outside it)."""
    max_model_len: int
    """Context length: a request ends (finish_reason "length") when it reaches it."""


class ScheduledChunk(NamedTuple):
    """`num_new_tokens` tokens of `request`, starting at position `start`, computed this step.
    (A tuple: a step makes one per running request, so it must be cheap to build.)"""

    request: Request
    start: int
    num_new_tokens: int
    samples: bool
    """The chunk reaches the end of the known tokens, so its last position yields a new token."""

    @classmethod
    def of(cls, request: Request, start: int, num_new_tokens: int) -> ScheduledChunk:
        return cls(request, start, num_new_tokens, start + num_new_tokens == len(request.all_token_ids))

    @property
    def end(self) -> int:
        return self.start + self.num_new_tokens


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    """Decodes first, then prefill chunks; the model runner keeps this order."""
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(c.num_new_tokens for c in self.chunks)

    @property
    def is_empty(self) -> bool:
        return not self.chunks


class SampledToken(NamedTuple):
    """What the model runner produced for one request in one step."""

    token_id: int
    logprob: float | None = None
    rank: int | None = None
    top_logprobs: list[tuple[int, float]] | None = None


class Scheduler:
    """Owns the waiting and running queues and decides what each step computes."""

    def __init__(self, config: SchedulerConfig, kv_manager: KVCacheManager) -> None:
        self.config = config
        self.kv = kv_manager
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.reserved: dict[str, Request] = {}
        """Decode worker: requests holding blocks for a prompt whose KV is being pushed to us."""
        self.ready: deque[Request] = deque()
        """Decode worker: requests whose pushed prompt KV arrived while the running batch was full;
        they join it, in arrival order and before any waiting request, as it makes room."""
        self.held: dict[str, Request] = {}
        """Prefill worker: finished requests whose blocks are kept until their prompt KV was read."""
        self._requests: dict[str, Request] = {}
        self.num_preemptions = 0

    # -- queue management ------------------------------------------------------------------------
    def add(self, request: Request) -> None:
        if request.request_id in self._requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        if request.request_id in self.held:
            raise ValueError(
                f"request id {request.request_id!r} is in use: its prompt KV is still being read"
            )
        self._requests[request.request_id] = request
        self.waiting.append(request)

    def reserve(self, request: Request) -> list[int] | None:
        """Hold blocks for the request's whole prompt, whose KV another worker computes and pushes.
        None (nothing changed) when they are not free, keeping `watermark_blocks` free beside them
        for the running batch to grow into. Reservations take no place in the running batch: a
        prompt queued at a prefill worker costs its blocks alone."""
        if request.request_id in self._requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        needed = cdiv(request.num_prompt_tokens, self.kv.block_size)
        if needed > self.kv.pool.num_free_blocks - self.watermark_blocks:
            return None
        self.kv.allocate_slots(request, request.num_prompt_tokens)  # fits: checked just above
        request.status = RequestStatus.RESERVED
        self._requests[request.request_id] = request
        self.reserved[request.request_id] = request
        return self.kv.block_ids(request.request_id)

    def commit_reserved(self, request_id: str, first_token: SampledToken, num_cached_tokens: int) -> Request:
        """The reserved request's prompt KV arrived: it joins the running batch (or, while that is
        full, `ready`) with the first token (sampled by the prefill worker) appended, or finishes if
        that token ends it."""
        request = self.reserved.pop(request_id)
        request.num_computed_tokens = request.num_prompt_tokens
        request.num_cached_tokens = num_cached_tokens
        if self.ready or len(self.running) >= self.config.max_num_seqs:
            request.status = RequestStatus.WAITING
            self.ready.append(request)
        else:
            request.status = RequestStatus.RUNNING
            self.running.append(request)
        self.kv.publish_computed_blocks(request)
        self._append_token(request, first_token.token_id)
        return request

    @property
    def watermark_blocks(self) -> int:
        """Blocks a reservation leaves free: 1 % of the cache (at least one), room for the running
        batch to grow and for a ready request's next token."""
        return max(1, self.kv.pool.num_blocks // 100)

    def abort(self, request_ids: Iterable[str]) -> list[Request]:
        """Finish these requests with reason ABORT wherever they are; unknown ids are ignored."""
        aborted = []
        for request_id in request_ids:
            request = self._requests.get(request_id)
            if request is not None:
                self._finish(request, FinishReason.ABORT)
                aborted.append(request)
        return aborted

    def get(self, request_id: str) -> Request | None:
        return self._requests.get(request_id)

    @property
    def request_ids(self) -> list[str]:
        return list(self._requests)

    @property
    def num_unfinished(self) -> int:
        return len(self._requests)

    def has_unfinished(self) -> bool:
        return bool(self._requests)

    # -- one step --------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        scheduled: set[str] = set()
        decodes, prefills = [], []
        for r in self.running:
            remaining = len(r.all_token_ids) - r.num_computed_tokens
            if remaining == 1:
                decodes.append(r)
            elif remaining > 1:
                prefills.append(r)
        chunks = out.chunks
        for request in decodes + prefills:
            if budget == 0:
                break
            if request.status is not RequestStatus.RUNNING:
                continue  # preempted earlier in this loop
            start = request.num_computed_tokens
            remaining = len(request.all_token_ids) - start
            num_new = min(remaining, budget)
            if not self._make_room(request, num_new, scheduled, out):
                continue
            chunks.append(ScheduledChunk(request, start, num_new, num_new == remaining))
            scheduled.add(request.request_id)
            budget -= num_new
        if not out.preempted:
            budget = self._admit_ready(out, budget)
            self._admit_waiting(out, budget)
        return out

    def _make_room(self, request: Request, num_new: int, scheduled: set[str], out: SchedulerOutput) -> bool:
        """Allocate slots for a running request, preempting later arrivals until they fit.
        False if the request had to preempt itself."""
        while self.kv.allocate_slots(request, num_new) is None:
            victims = [r for r in self.running if r.request_id not in scheduled]
            victim = victims[-1]  # the request itself is always among them
            self._preempt(victim)
            out.preempted.append(victim)
            if victim is request:
                return False
        return True

    def _admit_ready(self, out: SchedulerOutput, budget: int) -> int:
        """Move ready requests (prompt KV in place, one token to compute) into the running batch;
        returns the budget left."""
        while self.ready and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.ready[0]
            if self.kv.allocate_slots(request, 1) is None:
                break  # no block for its next token: running requests free some as they finish
            self.ready.popleft()
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            out.chunks.append(ScheduledChunk.of(request, request.num_computed_tokens, 1))
            budget -= 1
        return budget

    def _admit_waiting(self, out: SchedulerOutput, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            prefix: PrefixMatch = (
                self.kv.find_cached_prefix(request) if request.num_computed_tokens == 0 else NO_MATCH
            )
            start = max(request.num_computed_tokens, prefix.num_tokens)
            num_new = min(request.num_tokens - start, budget)
            if self.kv.allocate_slots(request, num_new, prefix) is None:
                break  # first come, first served: nobody overtakes the head of the queue
            self.waiting.popleft()
            if request.num_preemptions == 0:
                request.num_cached_tokens = prefix.num_tokens
            request.num_computed_tokens = start
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            out.chunks.append(ScheduledChunk.of(request, start, num_new))
            budget -= num_new

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.kv.free(request)
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        request.status = RequestStatus.PREEMPTED
        self.waiting.appendleft(request)
        self.num_preemptions += 1

    # -- after the step ran ----------------------------------------------------------------------
    def update(self, out: SchedulerOutput, sampled: dict[str, SampledToken]) -> list[Request]:
        """Advance computed counts, publish full blocks to the prefix cache, append sampled tokens
        and finish requests that hit a stop condition. Returns the requests that changed
        (got a token or finished)."""
        changed = []
        bs = self.kv.block_size
        for request, start, num_new, _ in out.chunks:
            if request.status is RequestStatus.FINISHED:
                continue  # aborted while the step ran
            request.num_computed_tokens = end = start + num_new
            if end // bs > start // bs:  # the chunk filled a block (most decode steps fill none)
                self.kv.publish_computed_blocks(request)
            token = sampled.get(request.request_id)
            if token is None:
                continue
            self._append_token(request, token.token_id)
            changed.append(request)
        return changed

    def _append_token(self, request: Request, token_id: int) -> None:
        request.append_output_token(token_id)
        reason, stop_reason = self._stop_condition(request, token_id)
        if reason is None and request.prefill_only:
            reason = FinishReason.LENGTH  # its one token is the prefill's; decoding happens elsewhere
        if reason is not None:
            self._finish(request, reason, stop_reason)

    def _stop_condition(self, request: Request, token_id: int) -> tuple[FinishReason | None, int | None]:
        params = request.sampling_params
        num_output = len(request.output_token_ids)
        if num_output >= params.min_tokens:
            if token_id in request.eos_token_ids and not params.ignore_eos:
                return FinishReason.STOP, None
            if token_id in params.stop_token_ids:
                return FinishReason.STOP, token_id
        if num_output >= params.max_tokens or len(request.all_token_ids) >= self.config.max_model_len:
            return FinishReason.LENGTH, None
        return None, None

    def fail(self, request_id: str, message: str) -> Request | None:
        """Finish one request with an error (a per-request failure, the engine goes on)."""
        request = self._requests.get(request_id)
        if request is not None:
            self._finish(request, FinishReason.ERROR, error=message)
        return request

    def _finish(
        self, request: Request, reason: FinishReason, stop_reason: int | None = None, error: str | None = None
    ) -> None:
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        elif request.status is RequestStatus.RESERVED:
            del self.reserved[request.request_id]
        elif request in self.ready:
            self.ready.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        if request.holds_blocks:
            self.held[request.request_id] = request  # its blocks go once release_held() is called
        else:
            self.kv.free(request)
        request.finish(reason, stop_reason, error)
        del self._requests[request.request_id]

    def hold_blocks(self, request: Request) -> None:
        """Keep the request's blocks when it finishes, until release_held() (a prefill worker's
        prompt KV, read by another process after the request ended)."""
        request.holds_blocks = True

    def release_held(self, request_id: str) -> bool:
        """Free the blocks of a request that held them (finished or not: it stops holding them
        either way); False if it held none."""
        request = self.held.pop(request_id, None)
        if request is not None:
            self.kv.free(request)
            return True
        request = self._requests.get(request_id)
        if request is not None and request.holds_blocks:
            request.holds_blocks = False  # not finished yet: its blocks go when it ends
            return True
        return False
