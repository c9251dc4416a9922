"""Turns a step's logits into tokens: penalties, temperature, min-p / top-k / top-p, seeded sampling,
and logprobs of the raw model distribution.

Sampling uses the exponential race: argmax(p / e) with e ~ Exp(1) draws a token with probability p.
A seeded request draws its noise from a generator seeded by (seed, output position), so its tokens
depend only on its own logits: not on batch composition, preemption, or which worker sampled.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch

from baton.shared.engine.host_to_device import host_to_device
from baton.shared.engine.sampling_params import SamplingParams

_SEED_MIX = (
    0x9E3779B97F4A7C15  # 64-bit golden ratio: spreads (seed, position) over the generator's seed space
)
_MASK64 = (1 << 64) - 1

T = TypeVar("T")


@dataclass(frozen=True)
class SamplingRow:
    """One request's sampling inputs for this step."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    banned_token_ids: frozenset[int] = frozenset()
    """Tokens that must not be sampled now (end tokens before min_tokens)."""


@dataclass(frozen=True)
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[float] | None = None
    """Per row: log-probability of the sampled token under the raw model distribution."""
    ranks: list[int] | None = None
    """Per row: 1-based rank of the sampled token under the raw distribution."""
    top_logprobs: list[list[tuple[int, float]]] | None = None
    """Per row: the most likely (token, logprob) pairs, as many as the row's `logprobs` asked."""


class QueuedTokens(Generic[T]):
    """Sampled tokens queued on the device: `token_ids` [num_rows] (int64, on the device, valid in the
    queue's stream order; None when nothing samples) can feed the next step before they are read;
    calling it waits for the device and reads the result."""

    def __init__(self, token_ids: torch.Tensor | None, read: Callable[[], T]) -> None:
        self.token_ids = token_ids
        self._read = read

    def __call__(self) -> T:
        return self._read()


class Sampler:
    """Batched: one pass of tensor ops for the whole step, one host sync at the end."""

    def __init__(self, device: torch.device, seed: int = 0) -> None:
        self.device = device
        self._generator = torch.Generator(device=device)
        self._generator.manual_seed(seed)

    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> SamplerOutput:
        """logits: [num_rows, vocab] float32, one row per request that samples this step."""
        return self.launch(logits, rows)()

    def launch(self, logits: torch.Tensor, rows: list[SamplingRow]) -> QueuedTokens[SamplerOutput]:
        """Queue the sampling on the device; the returned function waits for it and reads the result
        (so the host can do other work meanwhile). Non-greedy filters may still wait for the device."""
        wants_logprobs = any(r.params.logprobs is not None for r in rows)
        raw_logprobs = torch.log_softmax(logits, dim=-1) if wants_logprobs else None
        logits = logits.clone()
        for i, row in enumerate(rows):
            _apply_penalties(logits[i], row)
            if row.banned_token_ids:
                banned = host_to_device(list(row.banned_token_ids), torch.long, logits.device)
                logits[i, banned] = float("-inf")
        chosen = logits.argmax(dim=-1)  # [num_rows]
        if not all(r.params.is_greedy for r in rows):
            greedy = host_to_device([r.params.is_greedy for r in rows], torch.bool, self.device)
            chosen = torch.where(greedy, chosen, self._sample(logits, rows))
        if raw_logprobs is None:
            return QueuedTokens(chosen, _reader(chosen))
        return QueuedTokens(chosen, lambda: _with_logprobs(raw_logprobs, rows, chosen))

    def _sample(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:  # -> [num_rows]
        temps = host_to_device(
            [1.0 if r.params.is_greedy else r.params.temperature for r in rows], logits.dtype, self.device
        )
        probs = torch.softmax(_filter(logits / temps[:, None], [r.params for r in rows]), dim=-1)
        noise = torch.empty_like(probs).exponential_(generator=self._generator)
        for i, row in enumerate(rows):
            if row.params.seed is not None:
                noise[i].exponential_(
                    generator=self._seeded_generator(row.params.seed, len(row.output_token_ids))
                )
        return (probs / noise).argmax(dim=-1)

    def _seeded_generator(self, seed: int, position: int) -> torch.Generator:
        """A generator that depends only on the request's seed and the output position being sampled."""
        gen = torch.Generator(device=self.device)
        gen.manual_seed((((seed & _MASK64) * _SEED_MIX + position) & _MASK64) % (1 << 63))
        return gen


def _reader(ids: torch.Tensor) -> Callable[[], SamplerOutput]:
    """Reads `ids` [rows] once the device has computed them, without waiting for work queued after
    them (a step queued before this one's tokens are read): on a GPU, a copy into pinned memory is
    queued now, and reading waits for an event recorded behind it."""
    if ids.device.type != "cuda":
        return lambda: SamplerOutput(ids.tolist())
    host = torch.empty(ids.shape, dtype=ids.dtype, pin_memory=True)
    host.copy_(ids, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record()

    def read() -> SamplerOutput:
        copied.synchronize()
        return SamplerOutput(host.tolist())

    return read


def _apply_penalties(logits: torch.Tensor, row: SamplingRow) -> None:  # logits: [vocab], in place
    params = row.params
    if not params.has_penalties:
        return
    if params.repetition_penalty != 1.0:
        seen_ids = sorted(set(row.prompt_token_ids) | set(row.output_token_ids))
        seen = host_to_device(seen_ids, torch.long, logits.device)
        if seen.numel():
            values = logits[seen]
            logits[seen] = torch.where(
                values > 0, values / params.repetition_penalty, values * params.repetition_penalty
            )
    if row.output_token_ids and (params.frequency_penalty or params.presence_penalty):
        out = host_to_device(row.output_token_ids, torch.long, logits.device)
        counts = torch.bincount(out, minlength=logits.shape[0]).to(logits.dtype)
        logits -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).to(logits.dtype)


def _filter(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:  # [rows, vocab]
    """Mask (to -inf) what min_p, top_k and top_p exclude; each row's most likely token survives."""
    device, vocab = logits.device, logits.shape[-1]
    if any(p.min_p > 0 for p in params):  # decided on the host: the device may still be computing
        min_p = host_to_device([p.min_p for p in params], logits.dtype, device)
        probs = torch.softmax(logits, dim=-1)
        logits = logits.masked_fill(probs < min_p[:, None] * probs.amax(dim=-1, keepdim=True), float("-inf"))
    top_ks = [p.top_k if p.top_k_enabled else vocab for p in params]
    if all(k >= vocab for k in top_ks) and all(p.top_p >= 1 for p in params):
        return logits
    top_k = host_to_device(top_ks, torch.long, device)
    top_p = host_to_device([p.top_p for p in params], logits.dtype, device)
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    drop = torch.arange(vocab, device=device)[None, :] >= top_k[:, None]
    probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # probability of the strictly more likely tokens
    drop |= mass_before >= top_p[:, None]
    drop[:, 0] = False
    return logits.masked_fill(torch.empty_like(drop).scatter_(1, order, drop), float("-inf"))


def _with_logprobs(raw: torch.Tensor, rows: list[SamplingRow], chosen: torch.Tensor) -> SamplerOutput:
    """raw: [rows, vocab] log-softmax of the unprocessed logits; chosen: [rows] sampled tokens."""
    chosen_lp = raw.gather(1, chosen[:, None])  # [rows, 1]
    ranks = (raw > chosen_lp).sum(dim=-1) + 1
    k_max = max(r.params.logprobs or 0 for r in rows)
    top_values: list[list[float]] = [[] for _ in rows]
    top_ids: list[list[int]] = [[] for _ in rows]
    if k_max:
        values, ids = raw.topk(k_max, dim=-1)
        top_values, top_ids = values.tolist(), ids.tolist()
    tops = [
        list(zip(top_ids[i][: r.params.logprobs or 0], top_values[i][: r.params.logprobs or 0], strict=True))
        for i, r in enumerate(rows)
    ]
    return SamplerOutput(chosen.tolist(), chosen_lp[:, 0].tolist(), ranks.tolist(), tops)
