"""The OpenAI-compatible request bodies the server accepts, and the response bodies it sends.

Requests are validated strictly (a string where a number belongs is a 400, not a guess) and
every rejection becomes an OpenAI-style error body: {"error": {message, type, param, code}}.
Unknown request fields are ignored, as OpenAI clients send optional ones freely.
"""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class APIError(Exception):
    """A request the server refuses: becomes an OpenAI-style error body with this status code."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)


def error_body(
    message: str, *, type: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# --- requests ------------------------------------------------------------------------------------


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    # "developer" is OpenAI's newer name for the system role.
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(_Request):
    include_usage: bool = False


class _Decoding(_Request):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(0.0, ge=0, le=2)  # greedy by default: the same answer as `lorakit generate`
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    logprobs: bool | int | None = None

    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        return [s for s in stops if s]

    def check_supported(self) -> None:
        """Refuse the options this server cannot honour rather than silently ignoring them."""
        if self.n != 1:
            raise APIError(
                400,
                f"n={self.n} is not supported; this server returns one choice per request.",
                param="n",
                code="unsupported_parameter",
            )
        if self.logprobs not in (None, False, 0):
            raise APIError(
                400, "logprobs are not supported by this server.", param="logprobs", code="unsupported_parameter"
            )
        if len(self.stop_strings()) > 4:
            raise APIError(400, "at most 4 stop sequences are allowed.", param="stop")


class ChatCompletionRequest(_Decoding):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    # lorakit extension: the passage for an extractive-QA run, placed where its template puts it
    context: str | None = None

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def conversation(self) -> list[dict]:
        """Plain {"role", "content"} messages, as lorakit's templates take them."""
        turns = []
        for message in self.messages:
            role = "system" if message.role == "developer" else message.role
            turns.append({"role": role, "content": message.text()})
        if turns[-1]["role"] == "assistant":
            raise APIError(
                400, "the last message must come from the user (or system), not the assistant.", param="messages"
            )
        if not any(t["role"] == "user" for t in turns):
            raise APIError(400, "messages holds no user message.", param="messages")
        return turns


class CompletionRequest(_Decoding):
    prompt: str | list[str]
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def prompts(self) -> list[str]:
        prompts = [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)
        if not prompts:
            raise APIError(400, "prompt is an empty list.", param="prompt")
        if any(p == "" for p in prompts):
            raise APIError(400, "prompt is an empty string.", param="prompt")
        return prompts

    def check_supported(self) -> None:
        super().check_supported()
        if self.echo:
            raise APIError(400, "echo is not supported.", param="echo", code="unsupported_parameter")
        if self.suffix:
            raise APIError(400, "suffix is not supported.", param="suffix", code="unsupported_parameter")
        if self.best_of not in (None, 1):
            raise APIError(400, "best_of is not supported.", param="best_of", code="unsupported_parameter")
        if self.stream and isinstance(self.prompt, list) and len(self.prompt) > 1:
            raise APIError(400, "streaming takes a single prompt.", param="prompt", code="unsupported_parameter")


def parse_request(model: type[BaseModel], raw: bytes):
    """Validate a JSON body; malformed JSON and wrong fields become a 400 naming the field."""
    if not raw.strip():
        raise APIError(400, "the request body is empty; send a JSON object.")
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        if first["type"] == "json_invalid":
            raise APIError(
                400, f"the request body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}."
            ) from None
        if first["type"] == "model_type":
            raise APIError(400, "the request body must be a JSON object.") from None
        param = ".".join(str(p) for p in first["loc"]) or None
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors()[:5])
        raise APIError(400, f"invalid request: {problems}.", param=param) from None


# --- responses -----------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def chat_response(
    rid: str, model: str, text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int
) -> dict:
    return {
        "id": rid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        ],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def chat_chunk(rid: str, model: str, created: int, delta: dict, finish_reason: str | None = None) -> dict:
    return {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
    }


def completion_response(
    rid: str, model: str, choices: list[tuple[str, str]], prompt_tokens: int, completion_tokens: int
) -> dict:
    return {
        "id": rid,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {"index": i, "text": text, "logprobs": None, "finish_reason": reason}
            for i, (text, reason) in enumerate(choices)
        ],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def completion_chunk(rid: str, model: str, created: int, text: str, finish_reason: str | None = None) -> dict:
    return {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}],
    }


def usage_chunk(rid: str, model: str, created: int, obj: str, prompt_tokens: int, completion_tokens: int) -> dict:
    """The extra last chunk sent when stream_options.include_usage is set: no choices, only usage."""
    return {
        "id": rid,
        "object": obj,
        "created": created,
        "model": model,
        "choices": [],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def model_card(name: str, created: int, base: str | None) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "lorakit", "root": base}
