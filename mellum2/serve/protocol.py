"""The OpenAI request bodies the server accepts, and its OpenAI-shaped errors.

Requests are pydantic models in strict mode with unknown fields forbidden: OpenAI's API answers 400
to a field it does not know ("Unrecognized request argument supplied") and to a value of the wrong
type (a string for max_tokens), and so does this server. The vLLM extensions clients send through
`extra_body` (top_k, min_p, repetition_penalty, ignore_eos, stop_token_ids, chat_template_kwargs)
are known fields. Range checks that need the model (context length) are in app.py.

Errors are `{"error": {"message", "type", "param", "code"}}` with the HTTP status OpenAI uses:
400 invalid_request_error, 401 authentication_error, 404 model not found, 503 when the queue is full
(with Retry-After), 500 for a failure inside the server.
"""
from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

MAX_N = 16  # choices per request
MAX_LOGPROBS = 20  # top alternatives per token (vLLM's default limit; OpenAI: 5 for completions, 20 for chat)


class APIError(Exception):
    """An error answered to the client as OpenAI's error JSON."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class _Sampling(_Strict):
    """Fields completions and chat share."""
    model: str | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)  # vLLM: -1 or 0 = off
    min_p: float | None = Field(None, ge=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    repetition_penalty: float = Field(1.0, gt=0)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    suffix: str | None = None
    max_tokens: int | None = Field(16, ge=0)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    best_of: int | None = Field(None, ge=1, le=MAX_N)


class ToolFunction(_Strict):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"] = "function"
    function: ToolFunction


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"] = "function"
    function: NamedFunction


class ResponseFormat(_Strict):
    type: Literal["text"]


class ChatRequest(_Sampling):
    # messages are checked by mellum2.chat.validate (errors name the index and field)
    messages: list[dict[str, Any]]
    tools: list[Tool] | None = None
    tool_choice: Union[Literal["none", "auto", "required"], NamedToolChoice, None] = None
    parallel_tool_calls: bool | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    chat_template_kwargs: dict[str, Any] | None = None
    response_format: ResponseFormat | None = None
    reasoning_effort: str | None = None  # accepted like vLLM; thinking is switched by enable_thinking
    include_reasoning: bool = True


def pydantic_error(exc) -> APIError:
    """The first validation error of a request body, as OpenAI words it."""
    errs = exc.errors()
    e = errs[0] if errs else {"loc": (), "msg": "invalid request", "type": ""}
    loc = [str(x) for x in e.get("loc", ()) if x != "body"]
    # a union reports each branch: name the field, not pydantic's branch tags
    field = ".".join(x for x in loc if not any(c in x for c in "[]()") and not x.startswith("function-"))
    if e.get("type") == "extra_forbidden":
        return bad_request(f"Unrecognized request argument supplied: {field}", field or None)
    if e.get("type") == "missing":
        return bad_request(f"Missing required parameter: '{field}'.", field or None)
    if e.get("type") == "json_invalid":
        return bad_request(f"We could not parse the JSON body of your request: {e.get('msg')}", None)
    got = e.get("input")
    shown = repr(got)[:80] if not isinstance(got, dict) else "an object"
    return bad_request(f"Invalid value for '{field}': {e.get('msg')} (got {shown}).", field or None)
