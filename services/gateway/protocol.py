"""The OpenAI request bodies the gateway accepts, with vLLM's sampling extensions. Bounds live on the
fields, so a bad value is a 400 naming its parameter before any work is spent. Unknown fields are
ignored (as OpenAI and vLLM do) and logged; known features Baton does not implement are refused."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from baton.shared.engine.sampling_params import MAX_LOGPROBS

MAX_CHOICES = 128
"""Most choices (n) one request may ask for."""
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256
INT64_MAX = 2**63 - 1
INT32_MAX = 2**31 - 1
UINT32_MAX = 2**32 - 1
"""Bounds of the Router API's fields (common.proto): a value past them is a 400, not an overflow."""

StopString = Annotated[str, Field(min_length=1, max_length=MAX_STOP_STRING_CHARS)]
StopStrings = Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)]


class ParameterError(ValueError):
    """A parameter that is wrong, or a known OpenAI feature Baton does not implement (400 naming it)."""

    def __init__(self, param: str, message: str, unsupported: bool = False) -> None:
        super().__init__(message)
        self.param = param
        self.code = "unsupported_parameter" if unsupported else None


def unsupported(param: str, what: str) -> ParameterError:
    return ParameterError(param, f"{what} is not supported", unsupported=True)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False
    """Send a last chunk with `choices: []` and the request's usage."""


class SamplingFields(BaseModel):
    """What completions and chat share: sampling, stopping, streaming, and vLLM's extensions."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    model: str | None = None
    """Served model id; None means the only one."""
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: StopString | StopStrings | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(None, ge=-INT64_MAX - 1, le=INT64_MAX)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    user: str | None = Field(None, max_length=256)
    logit_bias: dict[str, float] | None = None
    # vLLM extensions
    top_k: int | None = Field(None, ge=-1, le=INT32_MAX)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0)
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0, le=UINT32_MAX)
    stop_token_ids: list[Annotated[int, Field(ge=0, le=UINT32_MAX)]] | None = Field(
        None, max_length=MAX_STOP_STRINGS * 4
    )
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False

    @model_validator(mode="after")
    def _check_common(self) -> SamplingFields:
        if self.stream_options is not None and not self.stream:
            raise ParameterError("stream_options", "stream_options is only allowed when stream is true")
        if self.logit_bias:
            raise unsupported("logit_bias", "logit_bias")
        return self

    @property
    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def unknown_fields(self) -> list[str]:
        """Names of the fields this server ignores (cut to 40 characters: they end up in logs)."""
        return sorted(name[:40] for name in self.model_extra or {})


TokenIdList = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


class CompletionRequest(SamplingFields):
    """POST /v1/completions."""

    prompt: str | TokenIdList | list[str] | list[TokenIdList] = Field(
        description="A prompt, a list of token ids, or a batch of either."
    )
    max_tokens: int | None = Field(16, ge=1, le=UINT32_MAX)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    best_of: int | None = Field(None, ge=1)
    suffix: str | None = None

    @model_validator(mode="after")
    def _check_completion(self) -> CompletionRequest:
        if self.best_of is not None and self.best_of != self.n:
            raise unsupported("best_of", "best_of other than n")
        if self.suffix:
            raise unsupported("suffix", "suffix")
        if isinstance(self.prompt, list) and not self.prompt:
            raise ParameterError("prompt", "prompt must not be an empty list")
        if self.echo and self.logprobs is not None:
            raise unsupported("echo", "echo together with logprobs (it needs prompt logprobs)")
        return self

    @property
    def prompts(self) -> list[str | list[int]]:
        """The batch of prompts: one string or token list each."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None

    def text(self, index: int) -> str:
        """The message's text; content parts must all be text."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        texts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ParameterError(
                    f"messages.{index}.content",
                    f"only text content parts are supported, got type {str(part.get('type'))[:40]!r}",
                    unsupported=True,
                )
            texts.append(part["text"])
        return "".join(texts)


class ChatCompletionRequest(SamplingFields):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, le=UINT32_MAX)
    max_completion_tokens: int | None = Field(None, ge=1, le=UINT32_MAX)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    add_generation_prompt: bool = True
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _check_chat(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ParameterError("top_logprobs", "top_logprobs needs logprobs set to true")
        if self.tools:
            raise unsupported("tools", "tool calling")
        if self.tool_choice not in (None, "none"):
            raise unsupported("tool_choice", "tool calling")
        if self.response_format is not None and self.response_format.get("type") != "text":
            raise unsupported("response_format", "a response_format other than text")
        return self

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        """Alternatives per position for the engine (None: no logprobs)."""
        return (self.top_logprobs or 0) if self.logprobs else None

    def conversation(self) -> list[dict[str, str]]:
        """Messages as the chat template expects them (developer speaks as system)."""
        out = []
        for i, message in enumerate(self.messages):
            entry: dict[str, str] = {"role": "system" if message.role == "developer" else message.role}
            entry["content"] = message.text(i)
            if message.name is not None:
                entry["name"] = message.name
            out.append(entry)
        return out
