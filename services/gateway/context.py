"""What every gateway handler uses: the Router client, the model's tokenizer and chat template, metrics."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from baton.services.gateway.errors import bad_request
from baton.services.gateway.metrics import GatewayMetrics
from baton.services.gateway.protocol import SamplingFields
from baton.services.gateway.router_pool import RouterPool
from baton.services.lifecycle import request_logger
from baton.shared import grpc_tls
from baton.shared.config import GatewayConfig
from baton.shared.tokenizer import Tokenizer

request_log = request_logger(__name__)


class GatewayContext:
    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        model_dir = Path(config.model)
        self.tokenizer = Tokenizer.from_dir(model_dir)
        self.router = RouterPool(config.router_addresses, grpc_tls.load(config.grpc_tls))
        self.metrics = GatewayMetrics(model_dir.name)

    def encode(self, text: str, param: str) -> list[int]:
        if self.tokenizer is None:
            raise bad_request(f"{param}: this model has no tokenizer; send token ids", param=param)
        return self.tokenizer.encode(text)

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=False) if self.tokenizer else ""

    def encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool) -> list[int]:
        if self.tokenizer is None:
            raise bad_request("this model has no tokenizer, so it cannot chat; use /v1/completions")
        try:
            return self.tokenizer.encode_chat(messages, add_generation_prompt)
        except ValueError as exc:
            raise bad_request(str(exc), param="messages") from exc

    def admit(self, request_id: str, endpoint: str, req: SamplingFields, prompts: list[list[int]]) -> None:
        """Log the request (its shape, never its text) and count its prompt tokens."""
        num_tokens = [len(p) for p in prompts]
        self.metrics.on_prompts(sum(num_tokens))
        request_log.info(
            "request %s: %s, prompt tokens %s, n=%d, stream=%s%s",
            request_id, endpoint, num_tokens, req.n, req.stream,
            f", ignored fields {req.unknown_fields[:10]}" if req.unknown_fields else "",
        )  # fmt: skip
