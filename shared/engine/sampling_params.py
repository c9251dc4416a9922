"""Per-request sampling parameters, validated at construction (named as vLLM users expect)."""

from __future__ import annotations

from dataclasses import dataclass, field

# Temperatures below this are treated as greedy decoding (argmax), as in vLLM.
GREEDY_TEMPERATURE = 1e-5
# Most top-logprob alternatives a request may ask for.
MAX_LOGPROBS = 20


@dataclass
class SamplingParams:
    """How to pick each next token of one request, and when to stop.

    Invalid values raise `ValueError` naming the field, so bad input never reaches the engine.
    """

    max_tokens: int = 16
    """Most tokens to generate (the sequence also stops at the model's context length)."""
    temperature: float = 1.0
    """Softmax temperature; 0 means greedy (argmax)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the fewest most likely tokens whose probability sums to top_p; in (0, 1]."""
    top_k: int = 0
    """Keep only the k most likely tokens; 0 or -1 disables."""
    min_p: float = 0.0
    """Drop tokens whose probability is below min_p times the most likely token's; in [0, 1]."""
    seed: int | None = None
    """Per-request seed: the same seed gives the same tokens whatever else is in the batch."""
    presence_penalty: float = 0.0
    """Subtracted from the logit of every token already generated; in [-2, 2]."""
    frequency_penalty: float = 0.0
    """Subtracted from a token's logit once per time it was generated; in [-2, 2]."""
    repetition_penalty: float = 1.0
    """CTRL-style penalty for tokens in the prompt or output: logits > 0 divided, < 0 multiplied; > 0."""
    stop_token_ids: list[int] = field(default_factory=list)
    """Generation stops after any of these tokens (it is kept in token_ids)."""
    ignore_eos: bool = False
    """Keep generating past the model's end-of-sequence tokens."""
    min_tokens: int = 0
    """End-of-sequence and stop tokens cannot be sampled before this many tokens were generated."""
    logprobs: int | None = None
    """Return log-probabilities of each sampled token plus this many top alternatives (0: sampled only)."""
    skip_special_tokens: bool = True
    """Leave special tokens out of the decoded text."""

    def __post_init__(self) -> None:
        self.stop_token_ids = list(self.stop_token_ids)
        _check(
            isinstance(self.max_tokens, int) and self.max_tokens >= 1,
            f"max_tokens must be >= 1, got {self.max_tokens}",
        )
        _check(self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}")
        _check(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")
        _check(self.top_k >= -1, f"top_k must be -1, 0 (disabled) or a positive number, got {self.top_k}")
        _check(0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}")
        _check(
            -2 <= self.presence_penalty <= 2,
            f"presence_penalty must be in [-2, 2], got {self.presence_penalty}",
        )
        _check(
            -2 <= self.frequency_penalty <= 2,
            f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}",
        )
        _check(self.repetition_penalty > 0, f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        _check(self.min_tokens >= 0, f"min_tokens must be >= 0, got {self.min_tokens}")
        _check(
            self.min_tokens <= self.max_tokens,
            f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})",
        )
        _check(
            all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
            f"stop_token_ids must be non-negative integers, got {self.stop_token_ids}",
        )
        if self.logprobs is not None:
            _check(
                0 <= self.logprobs <= MAX_LOGPROBS,
                f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}",
            )
        if self.seed is not None:
            _check(isinstance(self.seed, int), f"seed must be an integer, got {self.seed!r}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def top_k_enabled(self) -> bool:
        return self.top_k > 0

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)
