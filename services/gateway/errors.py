"""The one mapping from failures to OpenAI error objects: `{"error": {"message", "type", "param",
"code"}}` with the HTTP status OpenAI clients expect. Messages are bounded in size; bad input is always
a 4xx, never a 500."""

from __future__ import annotations

from typing import Any

import grpc
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from baton.services.gateway.protocol import MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS, ParameterError

MAX_MESSAGE_CHARS = 1024
RETRY_AFTER_S = 1


class OpenAIError(Exception):
    """A failure with its HTTP status and OpenAI error fields."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = _bounded(message)
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"Retry-After": str(RETRY_AFTER_S)} if self.status in (429, 503) else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, param=param, code=code)


def overloaded(message: str) -> OpenAIError:
    return OpenAIError(429, message, type="rate_limit_error", code="rate_limit_exceeded")


def unavailable(message: str) -> OpenAIError:
    return OpenAIError(503, message, type="server_error", code="service_unavailable")


def from_validation(exc: RequestValidationError) -> OpenAIError:
    """Pydantic's first complaint, as `param: message` (never echoing the offending input)."""
    errors = exc.errors()
    if not errors:
        return bad_request("invalid request body")
    first = errors[0]
    if first.get("type") == "json_invalid":
        return bad_request(f"request body is not valid JSON: {first.get('ctx', {}).get('error', '')}")
    cause = first.get("ctx", {}).get("error")
    if isinstance(cause, ParameterError):
        return from_parameter_error(cause)
    # unions (prompt, stop, content) add one location part per alternative: keep field names only
    loc = [str(p) for p in first.get("loc", ()) if p != "body" and _is_field_name(p)]
    param = ".".join(loc) or None
    if first.get("type") == "missing":
        return bad_request(f"{param} is required", param=param)
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    if loc and loc[0] in _UNION_FIELDS and first.get("type") != "value_error":
        param, message = loc[0], _UNION_FIELDS[loc[0]]
    return bad_request(f"{param}: {message}" if param else message, param=param)


def from_parameter_error(exc: ParameterError) -> OpenAIError:
    return bad_request(str(exc), param=exc.param, code=exc.code)


def from_grpc(exc: grpc.aio.AioRpcError) -> OpenAIError:
    """The Router's status codes, as the client should see them."""
    code, details = exc.code(), exc.details() or ""
    if code is grpc.StatusCode.INVALID_ARGUMENT:
        return bad_request(details)
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
        return overloaded(f"the server has no capacity for this request now, retry later ({details})")
    if code is grpc.StatusCode.NOT_FOUND:
        return OpenAIError(404, details, code="model_not_found")
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return unavailable(f"the server cannot serve this request now ({code.name}: {details})")
    return OpenAIError(500, f"internal error ({code.name}: {details})", type="server_error")


def _bounded(message: str) -> str:
    if len(message) <= MAX_MESSAGE_CHARS:
        return message
    return message[: MAX_MESSAGE_CHARS - 3] + "..."


_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none", "union"}


def _is_field_name(part: object) -> bool:
    return isinstance(part, int) or (
        isinstance(part, str) and part.isidentifier() and part.lower() not in _TYPE_TAGS
    )


_UNION_FIELDS = {
    "prompt": "must be a string, a non-empty list of token ids (integers >= 0), or a list of either",
    "stop": (
        f"must be a string or a list of at most {MAX_STOP_STRINGS} non-empty strings of at most "
        f"{MAX_STOP_STRING_CHARS} characters"
    ),
}
