"""What makes a request acceptable to an engine, decided from the model's configuration alone, so that
a process without the model (a worker whose engine core runs elsewhere) checks requests the same way."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from baton.shared.config import EngineConfig
from baton.shared.engine.sampling_params import SamplingParams
from baton.shared.models.model_config import ModelConfig


@dataclass(frozen=True)
class RequestValidator:
    max_model_len: int
    vocab_size: int

    @classmethod
    def from_config(cls, config: EngineConfig) -> RequestValidator:
        """From the engine's settings and the model directory's config.json (no weights read)."""
        model_config = ModelConfig.from_dir(Path(config.model))
        return cls(resolve_max_model_len(config, model_config), model_config.vocab_size)

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError naming what is wrong with a request."""
        if not prompt_token_ids:
            raise ValueError("prompt is empty: it must have at least one token")
        if len(prompt_token_ids) > self.max_model_len:
            raise ValueError(
                f"prompt has {len(prompt_token_ids)} tokens, longer than the model allows "
                f"(max_model_len {self.max_model_len})"
            )
        vocab = self.vocab_size
        # the common case in C (a 4k-token prompt: ~3x faster than the loop); the loop names the culprit
        plain_ints = set(map(type, prompt_token_ids)) == {int}
        if not plain_ints or min(prompt_token_ids) < 0 or max(prompt_token_ids) >= vocab:
            for position, token_id in enumerate(prompt_token_ids):
                if not isinstance(token_id, int) or isinstance(token_id, bool) or not 0 <= token_id < vocab:
                    raise ValueError(
                        f"prompt token id {token_id!r} at position {position} "
                        f"is outside the vocabulary [0, {vocab})"
                    )
        bad_stops = [t for t in params.stop_token_ids if t >= vocab]
        if bad_stops:
            raise ValueError(f"stop_token_ids {bad_stops} are outside the vocabulary [0, {vocab})")


def resolve_max_model_len(config: EngineConfig, model_config: ModelConfig) -> int:
    """The configured max_model_len, or the model's own; ValueError if it exceeds the model's."""
    limit = model_config.max_position_embeddings
    if config.max_model_len is None:
        return limit
    if config.max_model_len > limit:
        raise ValueError(
            f"max_model_len {config.max_model_len} exceeds the model's max_position_embeddings {limit}"
        )
    return config.max_model_len
