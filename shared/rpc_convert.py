"""Conversions between the wire messages (`baton.shared.rpc`) and the engine's types."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from baton.shared.engine.outputs import EngineOutput, Logprob, PositionLogprobs
from baton.shared.engine.sampling_params import SamplingParams
from baton.shared.engine.scheduler import SampledToken
from baton.shared.rpc import common_pb2, worker_pb2

DEFAULT_MAX_TOKENS = 16

_FINISH_TO_PROTO = {
    None: common_pb2.FINISH_REASON_UNSPECIFIED,
    "stop": common_pb2.FINISH_REASON_STOP,
    "length": common_pb2.FINISH_REASON_LENGTH,
    "abort": common_pb2.FINISH_REASON_ABORT,
    "error": common_pb2.FINISH_REASON_ERROR,
}
_FINISH_FROM_PROTO = {v: k for k, v in _FINISH_TO_PROTO.items()}


def sampling_from_proto(msg: common_pb2.SamplingParams) -> SamplingParams:
    """Validated SamplingParams; ValueError names the bad field."""
    return SamplingParams(
        max_tokens=msg.max_tokens or DEFAULT_MAX_TOKENS,
        temperature=msg.temperature if msg.HasField("temperature") else 1.0,
        top_p=msg.top_p if msg.HasField("top_p") else 1.0,
        top_k=msg.top_k,
        min_p=msg.min_p,
        seed=msg.seed if msg.HasField("seed") else None,
        presence_penalty=msg.presence_penalty,
        frequency_penalty=msg.frequency_penalty,
        repetition_penalty=msg.repetition_penalty if msg.HasField("repetition_penalty") else 1.0,
        stop_token_ids=list(msg.stop_token_ids),
        ignore_eos=msg.ignore_eos,
        min_tokens=msg.min_tokens,
        logprobs=msg.logprobs if msg.HasField("logprobs") else None,
        skip_special_tokens=msg.skip_special_tokens if msg.HasField("skip_special_tokens") else True,
    )


def sampling_to_proto(params: SamplingParams) -> common_pb2.SamplingParams:
    msg = common_pb2.SamplingParams(
        max_tokens=params.max_tokens,
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k,
        min_p=params.min_p,
        presence_penalty=params.presence_penalty,
        frequency_penalty=params.frequency_penalty,
        repetition_penalty=params.repetition_penalty,
        stop_token_ids=params.stop_token_ids,
        ignore_eos=params.ignore_eos,
        min_tokens=params.min_tokens,
        skip_special_tokens=params.skip_special_tokens,
    )
    if params.seed is not None:
        msg.seed = params.seed
    if params.logprobs is not None:
        msg.logprobs = params.logprobs
    return msg


def finish_reason_to_proto(reason: str | None) -> common_pb2.FinishReason.ValueType:
    return _FINISH_TO_PROTO[reason]


def finish_reason_from_proto(reason: common_pb2.FinishReason.ValueType) -> str | None:
    return _FINISH_FROM_PROTO[reason]


def logprobs_to_proto(
    token_ids: Sequence[int], positions: Sequence[PositionLogprobs], num_top: int
) -> list[common_pb2.PositionLogprobs]:
    """One message per generated token: the sampled token, then the `num_top` most likely by rank."""
    out = []
    for token_id, position in zip(token_ids, positions, strict=True):
        sampled = position[token_id]
        top = sorted(
            (t for t, lp in position.items() if (lp.rank or 0) <= num_top), key=lambda t: position[t].rank
        )
        out.append(
            common_pb2.PositionLogprobs(
                sampled=_token_logprob(token_id, sampled),
                top=[_token_logprob(tid, position[tid]) for tid in top],
            )
        )
    return out


def logprobs_from_proto(messages: Sequence[common_pb2.PositionLogprobs]) -> list[PositionLogprobs]:
    positions = []
    for msg in messages:
        position = {t.token_id: Logprob(t.logprob, t.rank or None) for t in msg.top}
        position[msg.sampled.token_id] = Logprob(msg.sampled.logprob, msg.sampled.rank or None)
        positions.append(position)
    return positions


def _token_logprob(token_id: int, lp: Logprob) -> common_pb2.TokenLogprob:
    return common_pb2.TokenLogprob(token_id=token_id, logprob=lp.logprob, rank=lp.rank or 0)


def delta_from_output(
    out: EngineOutput, num_top_logprobs: int = 0, request_id: str = ""
) -> worker_pb2.TokenDelta:
    msg = worker_pb2.TokenDelta(
        request_id=request_id,
        token_ids=out.new_token_ids,
        finish_reason=finish_reason_to_proto(out.finish_reason),
        error=out.error or "",
        num_prompt_tokens=out.num_prompt_tokens,
        num_cached_tokens=out.num_cached_tokens,
    )
    if out.new_logprobs is not None:
        msg.logprobs.extend(logprobs_to_proto(out.new_token_ids, out.new_logprobs, num_top_logprobs))
    if out.stop_reason is not None:
        msg.stop_token_id = out.stop_reason
    return msg


def output_from_delta(request_id: str, msg: worker_pb2.TokenDelta) -> EngineOutput:
    return EngineOutput(
        request_id,
        list(msg.token_ids),
        logprobs_from_proto(msg.logprobs) if msg.logprobs else None,
        finish_reason=finish_reason_from_proto(msg.finish_reason),
        stop_reason=msg.stop_token_id if msg.HasField("stop_token_id") else None,
        error=msg.error or None,
        num_prompt_tokens=msg.num_prompt_tokens,
        num_cached_tokens=msg.num_cached_tokens,
    )


def first_token_to_dict(out: EngineOutput) -> dict[str, Any]:
    """The prefill worker's first token (and its logprobs) as the KV push's JSON trailer."""
    token_id = out.new_token_ids[0]
    trailer: dict[str, Any] = {"token_id": token_id, "num_cached_tokens": out.num_cached_tokens}
    if out.new_logprobs:
        position = out.new_logprobs[0]
        sampled = position[token_id]
        trailer["logprob"], trailer["rank"] = sampled.logprob, sampled.rank
        trailer["top"] = [[tid, lp.logprob] for tid, lp in sorted(position.items(), key=_by_rank)]
    return trailer


def first_token_from_dict(trailer: dict[str, Any]) -> tuple[SampledToken, int]:
    """(first token, prompt tokens the prefill worker had cached); ValueError if malformed."""
    try:
        top = trailer.get("top")
        token = SampledToken(
            token_id=int(trailer["token_id"]),
            logprob=trailer.get("logprob"),
            rank=trailer.get("rank"),
            top_logprobs=[(int(t), float(lp)) for t, lp in top] if top is not None else None,
        )
        return token, int(trailer.get("num_cached_tokens", 0))
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"malformed first-token trailer {trailer!r}: {exc}") from exc


def _by_rank(item: tuple[int, Logprob]) -> int:
    return item[1].rank or 0
