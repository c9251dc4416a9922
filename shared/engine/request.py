"""One request's state inside the engine: its tokens, how many are in the KV cache, and how it ended."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from baton.shared.engine.block_hash import BlockHash, hash_full_blocks
from baton.shared.engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from baton.shared.engine.sampler import SamplingRow


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    RESERVED = "reserved"  # decode worker: blocks held for a prompt whose KV another worker computes
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    """Why a request ended; the values are the strings OpenAI clients expect."""

    STOP = "stop"  # an end-of-sequence or stop token
    LENGTH = "length"  # max_tokens or the model's context length
    ABORT = "abort"  # cancelled by the caller
    ERROR = "error"  # failed; see the request's error message


@dataclass
class Request:
    """A prompt being generated. `all_token_ids` = prompt + output; KV exists for the first
    `num_computed_tokens` of them, so a running request in decode has exactly one token to compute."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: frozenset[int]
    block_size: int
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0
    """Prompt tokens served from the prefix cache when the request was first scheduled."""
    num_preemptions: int = 0
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    stop_reason: int | None = None
    """The stop token that ended the request (None for end-of-sequence or other reasons)."""
    error: str | None = None
    prefill_only: bool = False
    """Prefill worker: the request ends after its first token (its KV is shipped to a decode worker)."""
    holds_blocks: bool = False
    """Its blocks outlive it until the scheduler's release_held() (its announced prompt KV is read)."""

    def __post_init__(self) -> None:
        self.all_token_ids: list[int] = list(self.prompt_token_ids)
        self._block_hashes: list[BlockHash] = []
        self.sampling_row: SamplingRow | None = None
        """The model runner's per-request sampling inputs, kept across steps once they stop changing."""

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    @property
    def block_hashes(self) -> list[BlockHash]:
        """Chained content hashes of every full block of `all_token_ids` (extended lazily)."""
        hash_full_blocks(self.all_token_ids, self.block_size, self._block_hashes)
        return self._block_hashes

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    def finish(self, reason: FinishReason, stop_reason: int | None = None, error: str | None = None) -> None:
        self.status = RequestStatus.FINISHED
        self.finish_reason = reason
        self.stop_reason = stop_reason
        self.error = error
