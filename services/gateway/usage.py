"""Usage of one HTTP request across its choices: each prompt counted once, every choice's tokens."""

from __future__ import annotations

from typing import Any

from baton.services.gateway.responses import usage_body
from baton.shared.rpc import common_pb2


class UsageTally:
    def __init__(self, prompts: list[list[int]], n: int) -> None:
        self.n = n
        self.prompt_tokens = sum(len(p) for p in prompts)
        self._completion_tokens: dict[int, int] = {}
        self._cached_tokens: dict[int, int] = {}

    def add(self, choice: int, usage: common_pb2.Usage) -> None:
        """Record a choice's usage so far (the Router's counts are cumulative)."""
        self._completion_tokens[choice] = usage.completion_tokens
        if choice % self.n == 0:  # the first choice of each prompt speaks for the prompt's cache hits
            self._cached_tokens[choice // self.n] = usage.cached_prompt_tokens

    def body(self) -> dict[str, Any]:
        return usage_body(
            self.prompt_tokens, sum(self._completion_tokens.values()), sum(self._cached_tokens.values())
        )
