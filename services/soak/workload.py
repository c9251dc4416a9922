"""The soak's requests: a seeded mix of completions and chat, streamed or not, of short to long
prompts cut from the demo corpus and short to long outputs, with varied sampling; some prompts start
with one of a few long shared prefixes (prefix-cache hits and placement by overlap), and a fraction
of requests carry the moment their client gives up."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from baton.shared.demo.tiny_model import corpus_text

COMPLETIONS_PATH = "/v1/completions"
CHAT_PATH = "/v1/chat/completions"
NUM_SHARED_PREFIXES = 4
SHARED_PREFIX_WORDS = (120, 240)
"""Length range of a shared prefix, in words of the corpus."""


@dataclass(frozen=True)
class CancelPlan:
    """When the client goes away: `after_s` seconds after sending, or (streams only) once it has
    read `after_events` server-sent events, whichever comes first."""

    after_s: float
    after_events: int | None = None


@dataclass(frozen=True)
class SoakRequest:
    """One HTTP request of the soak."""

    path: str
    body: dict[str, Any]
    cancel: CancelPlan | None = None

    @property
    def stream(self) -> bool:
        return bool(self.body.get("stream"))

    @property
    def num_choices(self) -> int:
        return int(self.body.get("n", 1))

    @property
    def kind(self) -> str:
        """e.g. `chat stream`, `completions`: what the report counts requests by."""
        api = "chat" if self.path == CHAT_PATH else "completions"
        return f"{api} stream" if self.stream else api


@dataclass(frozen=True)
class WorkloadConfig:
    cancel_fraction: float = 0.2
    """Fraction of requests whose client goes away before the answer ends."""
    max_tokens: int = 128
    """Longest output asked for."""
    max_prompt_words: int = 300
    """Longest prompt (without its shared prefix), in words."""
    shared_prefix_fraction: float = 0.4
    """Fraction of prompts that start with a shared prefix."""
    late_cancel_s: float = 3.0
    """A cancellation at a random moment falls within this many seconds of sending."""

    def __post_init__(self) -> None:
        for name in ("cancel_fraction", "shared_prefix_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be within [0, 1], got {getattr(self, name)}")
        if self.max_tokens < 1 or self.max_prompt_words < 1:
            raise ValueError("max_tokens and max_prompt_words must be >= 1")


class Workload:
    """Makes requests from a random generator (the caller seeds it: one per client lane keeps each
    lane's sequence reproducible whatever the timing)."""

    def __init__(self, config: WorkloadConfig, seed: int) -> None:
        self.config = config
        self.words = corpus_text().split()
        prefix_rng = random.Random(seed)
        self.prefixes = [self._passage(prefix_rng, *SHARED_PREFIX_WORDS) for _ in range(NUM_SHARED_PREFIXES)]

    def next(self, rng: random.Random) -> SoakRequest:
        chat = rng.random() < 0.5
        stream = rng.random() < 0.6
        prompt = self._prompt(rng)
        body: dict[str, Any] = {"max_tokens": self._max_tokens(rng), "stream": stream, **_sampling(rng)}
        if stream and rng.random() < 0.5:
            body["stream_options"] = {"include_usage": True}
        if chat:
            prefix, text = prompt
            system = [{"role": "system", "content": prefix}] if prefix else []
            body["messages"] = [*system, {"role": "user", "content": text}]
            if rng.random() < 0.1:
                body.update(logprobs=True, top_logprobs=2)
        else:
            body["prompt"] = " ".join(p for p in prompt if p)
            if rng.random() < 0.1:
                body["logprobs"] = 2
        if rng.random() < 0.1:
            body["n"] = 2
        cancel = self._cancel_plan(rng, stream, body["max_tokens"])
        return SoakRequest(CHAT_PATH if chat else COMPLETIONS_PATH, body, cancel)

    def _prompt(self, rng: random.Random) -> tuple[str, str]:
        """(shared prefix or "", the rest of the prompt)."""
        low, high = rng.choice([(1, 20), (20, 120), (120, max(121, self.config.max_prompt_words))])
        text = self._passage(rng, low, min(high, self.config.max_prompt_words))
        prefix = rng.choice(self.prefixes) if rng.random() < self.config.shared_prefix_fraction else ""
        return prefix, text

    def _passage(self, rng: random.Random, low: int, high: int) -> str:
        count = rng.randint(min(low, high), high)
        start = rng.randrange(max(1, len(self.words) - count))
        return " ".join(self.words[start : start + count])

    def _max_tokens(self, rng: random.Random) -> int:
        top = self.config.max_tokens
        low, high = rng.choice([(1, 16), (16, 64), (64, top)])
        return rng.randint(min(low, top), min(high, top))

    def _cancel_plan(self, rng: random.Random, stream: bool, max_tokens: int) -> CancelPlan | None:
        if rng.random() >= self.config.cancel_fraction:
            return None
        moment = rng.choice(["before the first byte", "at a random moment", "mid-stream"])
        if moment == "before the first byte":
            return CancelPlan(after_s=rng.uniform(0.0, 0.05))
        if moment == "mid-stream" and stream:
            return CancelPlan(after_s=float("inf"), after_events=rng.randint(1, max(1, max_tokens // 2)))
        return CancelPlan(after_s=rng.uniform(0.0, self.config.late_cancel_s))


def _sampling(rng: random.Random) -> dict[str, Any]:
    """Greedy or seeded sampling, sometimes with nucleus, penalties, stop strings, ignore_eos."""
    params: dict[str, Any] = {}
    if rng.random() < 0.5:
        params.update(temperature=rng.choice([0.7, 1.0]), seed=rng.randrange(1 << 31))
        if rng.random() < 0.3:
            params["top_p"] = 0.9
    else:
        params["temperature"] = 0.0
    if rng.random() < 0.5:
        params["ignore_eos"] = True
    if rng.random() < 0.1:
        params["stop"] = _stops(rng, ["\n\n", " the", "."])
    if rng.random() < 0.1:
        params["frequency_penalty"] = 0.5
    return params


def _stops(rng: random.Random, candidates: Sequence[str]) -> list[str]:
    return rng.sample(list(candidates), rng.randint(1, len(candidates)))
