"""Pydantic models of the gateway's OpenAI-compatible protocol (requests, feedback, errors).

Chat requests validate the fields the gateway relies on and keep every other field (``extra``),
so sampling parameters vLLM supports (``top_k``, ``min_p``, ``ignore_eos``...) pass through
unchanged and vLLM itself rejects what it does not know. Responses from vLLM are passed on as
dicts (rewriting only ``id`` and ``model``) so vLLM's extra fields survive too.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Role = Literal["system", "developer", "user", "assistant", "tool"]


class ChatMessage(BaseModel):
    """One chat message; ``content`` is a string or a list of content parts (text parts are guarded)."""

    model_config = ConfigDict(extra="allow", strict=True)

    role: Role
    content: str | list[dict[str, Any]] | None = None

    def texts(self) -> list[str]:
        """The message's text pieces (string content or the ``text`` of text parts)."""
        if isinstance(self.content, str):
            return [self.content]
        if isinstance(self.content, list):
            return [
                p["text"]
                for p in self.content
                if p.get("type") == "text" and isinstance(p.get("text"), str)
            ]
        return []

    def map_texts(self, fn) -> ChatMessage:  # noqa: ANN001 - Callable[[str], str]
        """A copy with ``fn`` applied to each text piece."""
        if isinstance(self.content, str):
            return self.model_copy(update={"content": fn(self.content)})
        if isinstance(self.content, list):
            parts = [
                {**p, "text": fn(p["text"])}
                if p.get("type") == "text" and isinstance(p.get("text"), str)
                else p
                for p in self.content
            ]
            return self.model_copy(update={"content": parts})
        return self


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """``POST /v1/chat/completions`` body (the subset the gateway checks; the rest passes through)."""

    # strict: "yes" is not a bool and "0.5" not a number (OpenAI rejects both too)
    model_config = ConfigDict(extra="allow", strict=True)

    model: str = Field(..., min_length=1)
    messages: list[ChatMessage] = Field(..., min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=1, description="Only one choice: each exchange logs one answer.")
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None

    def requested_max_tokens(self) -> int | None:
        return (
            self.max_completion_tokens
            if self.max_completion_tokens is not None
            else self.max_tokens
        )

    def params(self) -> dict[str, Any]:
        """Everything but the messages, as sent (for the log)."""
        return self.model_dump(exclude={"messages"}, exclude_unset=True)


class Rating(BaseModel):
    model_config = ConfigDict(extra="forbid")

    thumbs: Literal["up", "down"] | None = None
    score: int | None = Field(None, ge=1, le=5)

    @model_validator(mode="after")
    def _one(self) -> Rating:
        if (self.thumbs is None) == (self.score is None):
            raise ValueError("give exactly one of 'thumbs' ('up'|'down') or 'score' (1-5)")
        return self


class Preference(BaseModel):
    model_config = ConfigDict(extra="forbid")

    other_request_id: str | None = Field(None, min_length=1, max_length=64)
    preferred: Literal["this", "other"] | None = None
    better_text: str | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _one(self) -> Preference:
        pair = self.other_request_id is not None
        if pair == (self.better_text is not None):
            raise ValueError("give either 'other_request_id' + 'preferred' or 'better_text'")
        if pair and self.preferred is None:
            raise ValueError("'preferred' ('this'|'other') is required with 'other_request_id'")
        if not pair and self.preferred is not None:
            raise ValueError("'preferred' only goes with 'other_request_id'")
        return self


class Edit(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: str = Field(..., min_length=1)


class FeedbackRequest(BaseModel):
    """``POST /v1/feedback``: exactly one of rating, preference, edit, for a served request id."""

    model_config = ConfigDict(extra="forbid")

    request_id: str = Field(..., min_length=1, max_length=64)
    rating: Rating | None = None
    preference: Preference | None = None
    edit: Edit | None = None
    comment: str | None = Field(None, max_length=10_000)

    @model_validator(mode="after")
    def _exactly_one(self) -> FeedbackRequest:
        kinds = [k for k in ("rating", "preference", "edit") if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ValueError(
                f"give exactly one of 'rating', 'preference', 'edit' (got {kinds or 'none'})"
            )
        return self

    def kind_and_payload(self) -> tuple[str, dict[str, Any]]:
        """The stored kind and payload; thumbs are normalized to a 1-5 score as well."""
        if self.rating is not None:
            payload = self.rating.model_dump(exclude_none=True)
            if self.rating.thumbs is not None:
                payload["score"] = 5 if self.rating.thumbs == "up" else 1
            return "rating", payload
        if self.preference is not None:
            return "preference", self.preference.model_dump(exclude_none=True)
        assert self.edit is not None
        return "edit", self.edit.model_dump()


class FeedbackResponse(BaseModel):
    id: str
    object: Literal["feedback"] = "feedback"
    created: bool


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "alignloop"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}``."""

    error: ErrorDetail


def error_body(
    message: str,
    type_: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
) -> dict[str, Any]:
    return ErrorResponse(
        error=ErrorDetail(message=message, type=type_, param=param, code=code)
    ).model_dump()


def completion_body(
    request_id: str,
    model: str,
    content: str,
    finish_reason: str,
    usage: dict[str, int] | None = None,
) -> dict[str, Any]:
    """A non-streaming chat completion made by the gateway itself (refusals)."""
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": finish_reason,
                "logprobs": None,
            }
        ],
        "usage": usage or {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
    }


def chunk_body(
    request_id: str, model: str, delta: dict[str, Any], finish_reason: str | None
) -> dict[str, Any]:
    """One streaming chunk made by the gateway itself."""
    return {
        "id": request_id,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}],
    }


class GatewayError(Exception):
    """An error the gateway answers in OpenAI's shape with ``status`` (never a bare 500)."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.counted = False  # already in the requests metric (the service counted it)
        self.status, self.message, self.type, self.param, self.code = (
            status,
            message,
            type_,
            param,
            code,
        )
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)
