"""The router's end of a decode worker's StreamOutputs stream: one stream per decode worker carries
the outputs of every request this router placed there, demultiplexed to the attempts."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from baton.shared.engine.outputs import EngineOutput, merge_outputs
from baton.shared.rpc import worker_pb2
from baton.shared.rpc_convert import output_from_delta
from baton.shared.subscription import Subscription


def decode_outputs(stub: Any, subscriber: str, worker_id: str) -> Subscription[EngineOutput]:
    """The subscription to decode worker `worker_id`'s outputs for this router (`subscriber`)."""
    return Subscription(
        f"output stream from decode worker {worker_id}",
        lambda: stub.StreamOutputs(worker_pb2.StreamOutputsRequest(subscriber=subscriber)),
        _split,
        merge_outputs,
        lambda out: out.finished,
    )


def _split(batch: worker_pb2.TokenDeltaBatch) -> Iterable[tuple[str, EngineOutput]]:
    return ((delta.request_id, output_from_delta(delta.request_id, delta)) for delta in batch.deltas)
