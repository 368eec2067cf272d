"""Pydantic models of the gateway's OpenAI-compatible requests (chat completions, feedback).

Requests are validated as OpenAI validates them, before anything else happens: a malformed body
is a 400 in OpenAI's error shape naming the parameter (``messages[0].content``), never a
guardrail refusal and never a 500. The rules:

- the body is one JSON object: valid UTF-8, no NaN/Infinity, no duplicate keys, numbers that fit
  (checked by the gateway before these models see it: serving.gateway.wire.parse_json_object);
- every field OpenAI documents is typed strictly (``"0.5"`` is not a number, ``"yes"`` not a
  bool); messages follow their role's rules (a ``tool`` message needs ``tool_call_id``, an
  ``assistant`` message needs content or tool calls, content parts of a known type);
- vLLM's own sampling parameters that clients send through ``extra_body`` (``top_k``, ``min_p``,
  ``ignore_eos``...) are accepted and typed too; any other argument is refused as OpenAI refuses
  it ("Unrecognized request argument supplied"), so nothing unchecked reaches the model server.

Guardrail hooks see the validated :class:`ChatCompletionRequest`. What the gateway answers (the
error shape, responses cut to OpenAI's fields) is serving/gateway/wire.py.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

Role = Literal["system", "developer", "user", "assistant", "tool"]
ROLES: tuple[str, ...] = ("system", "developer", "user", "assistant", "tool")
# Content part types each role may send (OpenAI's chat schema).
PART_TYPES: dict[str, tuple[str, ...]] = {
    "system": ("text",),
    "developer": ("text",),
    "tool": ("text",),
    "user": ("text", "image_url", "input_audio", "file"),
    "assistant": ("text", "refusal"),
}
MAX_SCHEMA_DEPTH = 32
"""Free-form JSON (a tool's parameter schema, a response schema) nested deeper than this is refused."""
INT64 = (-(2**63), 2**63 - 1)


def _invalid(message: str, subpath: str = "") -> PydanticCustomError:
    """A validation error whose message is ``message`` as written; ``subpath`` extends the param."""
    return PydanticCustomError("invalid_value", message, {"subpath": subpath})


class _Strict(BaseModel):
    # strict: "yes" is not a bool and "0.5" not a number (OpenAI rejects both too)
    model_config = ConfigDict(extra="forbid", strict=True)


def _depth(obj: Any, limit: int, level: int = 1) -> bool:
    """Whether ``obj`` nests at most ``limit`` levels of objects and arrays."""
    if level > limit:
        return False
    if isinstance(obj, dict):
        return all(_depth(v, limit, level + 1) for v in obj.values())
    if isinstance(obj, list):
        return all(_depth(v, limit, level + 1) for v in obj)
    return True


def _json_schema(v: Any, what: str) -> dict[str, Any] | None:
    if v is None:
        return None
    if not isinstance(v, dict):
        raise _invalid(f"{what} must be a JSON Schema object")
    if not _depth(v, MAX_SCHEMA_DEPTH):
        raise _invalid(f"{what} is nested deeper than {MAX_SCHEMA_DEPTH} levels")
    return v


# -- content parts -----------------------------------------------------------------------------
class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImageURL(_Strict):
    url: str = Field(..., min_length=1)
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


class InputAudio(_Strict):
    data: str = Field(..., min_length=1)
    format: Literal["wav", "mp3"]


class AudioPart(_Strict):
    type: Literal["input_audio"]
    input_audio: InputAudio


class FileRef(_Strict):
    file_data: str | None = Field(None, min_length=1)
    file_id: str | None = Field(None, min_length=1)
    filename: str | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _some(self) -> FileRef:
        if self.file_data is None and self.file_id is None:
            raise _invalid("give 'file_data' or 'file_id'")
        return self


class FilePart(_Strict):
    type: Literal["file"]
    file: FileRef


class RefusalPart(_Strict):
    type: Literal["refusal"]
    refusal: str


_PARTS: dict[str, type[_Strict]] = {
    "text": TextPart,
    "image_url": ImagePart,
    "input_audio": AudioPart,
    "file": FilePart,
    "refusal": RefusalPart,
}


def _first(e: ValidationError) -> tuple[str, str]:
    """(sub-param, message) of the first error of a nested validation."""
    err = e.errors()[0]
    sub = (param_path(err["loc"]) + (err.get("ctx") or {}).get("subpath", "")).lstrip(".")
    return ("." + sub if sub and not sub.startswith("[") else sub), error_message(err)


def _check_parts(parts: list[Any], role: str) -> list[dict[str, Any]]:
    allowed = PART_TYPES[role]
    if not parts:
        raise _invalid("expected a string or a non-empty list of content parts")
    for i, p in enumerate(parts):
        if not isinstance(p, dict):
            raise _invalid("expected a content part object like {'type': 'text', 'text': '...'}", f"[{i}]")
        kind = p.get("type")
        if kind not in allowed:
            raise _invalid(
                f"{kind!r} is not a content part type of a {role} message; expected one of "
                f"{list(allowed)}",
                f"[{i}].type",
            )
        try:
            _PARTS[kind].model_validate(p)
        except ValidationError as e:
            sub, msg = _first(e)
            raise _invalid(msg, f"[{i}]{sub}") from None
    return parts


# -- messages ----------------------------------------------------------------------------------
class ToolCallFunction(_Strict):
    name: str = Field(..., min_length=1, max_length=64)
    arguments: str = Field(..., description="The call's arguments as a JSON string (OpenAI's shape).")


class ToolCall(_Strict):
    id: str = Field(..., min_length=1, max_length=256)
    type: Literal["function"]
    function: ToolCallFunction


class ChatMessage(BaseModel):
    """One chat message; ``content`` is a string or a list of content parts (text parts are guarded).

    Keys the official SDK echoes back when a response message is re-sent (``refusal``,
    ``annotations``, ``audio: null``, ``function_call: null``) and vLLM's ``reasoning_content`` are
    accepted; they are not forwarded to the model server.
    """

    model_config = ConfigDict(extra="forbid", strict=True)

    role: Role
    content: Any = None
    name: str | None = Field(None, min_length=1, max_length=64)
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = Field(None, min_length=1, max_length=256)
    refusal: str | None = None
    annotations: list[Any] | None = None
    audio: Any = None
    function_call: Any = None
    reasoning_content: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _content(cls, v: Any, info: ValidationInfo) -> Any:
        role = info.data.get("role")
        if v is None or role is None:  # missing content is checked with the role, below
            return v
        if isinstance(v, str):
            if not v and role in ("system", "developer", "user"):
                raise _invalid("string too short: expected at least 1 character")
            return v
        if isinstance(v, list):
            return _check_parts(v, role)
        raise _invalid("expected a string or a list of content parts")

    @field_validator("audio", "function_call", mode="before")
    @classmethod
    def _echo_only(cls, v: Any, info: ValidationInfo) -> Any:
        if v is not None:
            hint = "use 'tool_calls'" if info.field_name == "function_call" else "audio is not served"
            raise _invalid(f"not supported by this gateway ({hint}); send null or leave it out")
        return v

    @model_validator(mode="after")
    def _by_role(self) -> ChatMessage:
        if self.role in ("system", "developer", "user", "tool") and self.content is None:
            raise _invalid(f"a {self.role} message needs 'content'", ".content")
        if self.role == "tool" and self.tool_call_id is None:
            raise _invalid("a tool message needs the 'tool_call_id' it answers", ".tool_call_id")
        if self.role != "tool" and self.tool_call_id is not None:
            raise _invalid("only tool messages have a 'tool_call_id'", ".tool_call_id")
        if self.role != "assistant" and self.tool_calls is not None:
            raise _invalid("only assistant messages have 'tool_calls'", ".tool_calls")
        if self.role == "assistant" and self.content is None and not self.tool_calls and not self.refusal:
            raise _invalid("an assistant message needs 'content' or 'tool_calls'", ".content")
        return self

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

    def upstream(self) -> dict[str, Any]:
        """The message as the model server gets it (echoed-back keys dropped)."""
        return self.model_dump(
            exclude_none=True,
            exclude={"annotations", "audio", "function_call", "reasoning_content", "refusal"},
        )


# -- tools and formats --------------------------------------------------------------------------
class FunctionDef(_Strict):
    name: str = Field(..., pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: Any = None
    strict: bool | None = None

    @field_validator("parameters", mode="before")
    @classmethod
    def _schema(cls, v: Any) -> Any:
        return _json_schema(v, "parameters")


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDef


class StreamOptions(_Strict):
    include_usage: bool = False
    include_obfuscation: bool | None = None


def _tool_choice(v: Any) -> Any:
    if v is None or v in ("none", "auto", "required"):
        return v
    if isinstance(v, dict):
        fn = v.get("function")
        if (
            set(v) == {"type", "function"}
            and v["type"] == "function"
            and isinstance(fn, dict)
            and set(fn) == {"name"}
            and isinstance(fn["name"], str)
            and fn["name"]
        ):
            return v
    raise _invalid(
        "expected 'none', 'auto', 'required' or {'type': 'function', 'function': {'name': ...}}"
    )


class JSONSchemaFormat(_Strict):
    name: str = Field(..., pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    schema_: Any = Field(None, alias="schema")
    strict: bool | None = None

    @field_validator("schema_", mode="before")
    @classmethod
    def _schema(cls, v: Any) -> Any:
        return _json_schema(v, "schema")


def _response_format(v: Any) -> Any:
    if v is None:
        return v
    if not isinstance(v, dict) or v.get("type") not in ("text", "json_object", "json_schema"):
        raise _invalid("expected {'type': 'text' | 'json_object' | 'json_schema', ...}")
    if v["type"] != "json_schema":
        if set(v) != {"type"}:
            raise _invalid(f"a {v['type']!r} response format takes no other keys")
        return v
    if set(v) != {"type", "json_schema"}:
        raise _invalid("a 'json_schema' response format needs exactly 'type' and 'json_schema'")
    try:
        JSONSchemaFormat.model_validate(v["json_schema"])
    except ValidationError as e:
        sub, msg = _first(e)
        raise _invalid(msg, ".json_schema" + sub) from None
    return v


def _stop(v: Any) -> Any:
    if v is None or isinstance(v, str):
        return v
    if isinstance(v, list) and len(v) <= 4 and all(isinstance(s, str) for s in v):
        return v
    raise _invalid("expected a string or a list of at most 4 strings")


def _logit_bias(v: Any) -> Any:
    if v is None:
        return v
    if not isinstance(v, dict):
        raise _invalid("expected an object mapping token ids to a bias from -100 to 100")
    for k, b in v.items():
        if not k.isdigit():
            raise _invalid(f"key {k[:40]!r} is not a token id")
        if isinstance(b, bool) or not isinstance(b, int | float) or not -100 <= b <= 100:
            raise _invalid(f"bias of token {k} must be a number from -100 to 100")
    return v


def _metadata(v: Any) -> Any:
    if v is None:
        return v
    if (
        isinstance(v, dict)
        and len(v) <= 16
        and all(isinstance(x, str) and len(k) <= 64 and len(x) <= 512 for k, x in v.items())
    ):
        return v
    raise _invalid("expected at most 16 string keys (<= 64 chars) with string values (<= 512)")


_FREE_FORM = {
    "stop": _stop,
    "logit_bias": _logit_bias,
    "response_format": _response_format,
    "tool_choice": _tool_choice,
    "metadata": _metadata,
}


class ChatCompletionRequest(_Strict):
    """``POST /v1/chat/completions`` body: OpenAI's parameters plus vLLM's sampling extras."""

    model: str = Field(..., min_length=1, max_length=256)
    messages: list[ChatMessage] = Field(..., min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1, le=INT64[1])
    max_completion_tokens: int | None = Field(None, ge=1, le=INT64[1])
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=128, description="Choices per request (limits.max_n caps it).")
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    stop: Any = None
    seed: int | None = Field(None, ge=INT64[0], le=INT64[1])
    user: str | None = Field(
        None, max_length=128, description="The end user's id; feedback on this answer is theirs."
    )
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    logit_bias: Any = None
    response_format: Any = None
    tools: list[Tool] | None = Field(None, max_length=128)
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    # Accepted as OpenAI does, kept in the log, not sent to the model server.
    metadata: Any = None
    store: bool | None = None
    service_tier: str | None = Field(None, max_length=32)
    # vLLM's sampling extras (what `vllm bench serve` and `extra_body` users send).
    top_k: int | None = Field(None, ge=-1, le=INT64[1])
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0, le=10)
    min_tokens: int | None = Field(None, ge=0, le=INT64[1])
    ignore_eos: bool | None = None
    stop_token_ids: list[int] | None = Field(None, max_length=64)
    skip_special_tokens: bool | None = None
    spaces_between_special_tokens: bool | None = None
    include_stop_str_in_output: bool | None = None

    @field_validator("stop", "logit_bias", "response_format", "tool_choice", "metadata", mode="before")
    @classmethod
    def _free_form(cls, v: Any, info: ValidationInfo) -> Any:
        return _FREE_FORM[info.field_name](v)

    @model_validator(mode="after")
    def _together(self) -> ChatCompletionRequest:
        if self.stream_options is not None and not self.stream:
            raise _invalid("'stream_options' is only allowed when 'stream' is true", "stream_options")
        if self.top_logprobs is not None and not self.logprobs:
            raise _invalid("'top_logprobs' needs 'logprobs': true", "top_logprobs")
        if self.tool_choice is not None and not self.tools:
            raise _invalid("'tool_choice' is only allowed when 'tools' are given", "tool_choice")
        if self.parallel_tool_calls is not None and not self.tools:
            raise _invalid("'parallel_tool_calls' is only allowed when 'tools' are given", "parallel_tool_calls")
        if isinstance(self.tool_choice, dict):
            name = self.tool_choice["function"]["name"]
            if name not in {t.function.name for t in self.tools or []}:
                raise _invalid(f"tool_choice names {name!r}, which is not in 'tools'", "tool_choice")
        return self

    def requested_max_tokens(self) -> int | None:
        return (
            self.max_completion_tokens
            if self.max_completion_tokens is not None
            else self.max_tokens
        )

    def wants_tools(self) -> bool:
        """Whether answering needs the model server's tool calling (tools the model may call)."""
        return bool(self.tools) and self.tool_choice != "none"

    def params(self) -> dict[str, Any]:
        """Everything but the messages, as sent (for the log)."""
        return self.model_dump(exclude={"messages"}, exclude_unset=True, by_alias=True)

    def upstream_payload(self) -> dict[str, Any]:
        """The body the model server gets: what the client set, minus what stays with us."""
        payload = self.model_dump(
            exclude={"messages", "metadata", "store", "service_tier"},
            exclude_unset=True,
            by_alias=True,
        )
        payload["messages"] = [m.upstream() for m in self.messages]
        return payload


# -- feedback ----------------------------------------------------------------------------------
class Rating(_Strict):
    thumbs: Literal["up", "down"] | None = None
    score: int | None = Field(None, ge=1, le=5)

    @model_validator(mode="after")
    def _one(self) -> Rating:
        if (self.thumbs is None) == (self.score is None):
            raise _invalid("give exactly one of 'thumbs' ('up'|'down') or 'score' (1-5)")
        return self


class Preference(_Strict):
    other_request_id: str | None = Field(None, min_length=1, max_length=64)
    preferred: Literal["this", "other"] | None = None
    better_text: str | None = Field(None, min_length=1, max_length=32_000)

    @model_validator(mode="after")
    def _one(self) -> Preference:
        pair = self.other_request_id is not None
        if pair == (self.better_text is not None):
            raise _invalid("give either 'other_request_id' + 'preferred' or 'better_text'")
        if pair and self.preferred is None:
            raise _invalid("'preferred' ('this'|'other') is required with 'other_request_id'")
        if not pair and self.preferred is not None:
            raise _invalid("'preferred' only goes with 'other_request_id'")
        if self.better_text is not None and not self.better_text.strip():
            raise _invalid("only whitespace: give the better answer's text", ".better_text")
        return self


class Edit(_Strict):
    text: str = Field(..., min_length=1, max_length=32_000)

    @field_validator("text")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise _invalid("only whitespace: give the corrected answer's text")
        return v


class FeedbackRequest(_Strict):
    """``POST /v1/feedback``: exactly one of rating, preference, edit, for a served request id.

    Who gave it is not part of the body: the server records the end user of the rated answer
    (its request's ``user``) and a role from the tenant's config (see docs/SECURITY.md).
    """

    request_id: str = Field(..., min_length=1, max_length=64)
    rating: Rating | None = None
    preference: Preference | None = None
    edit: Edit | None = None
    comment: str | None = Field(None, max_length=10_000)

    @model_validator(mode="after")
    def _exactly_one(self) -> FeedbackRequest:
        kinds = [k for k in ("rating", "preference", "edit") if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise _invalid(
                f"give exactly one of 'rating', 'preference', 'edit' (got {kinds or 'none'})"
            )
        if self.preference is not None and self.preference.other_request_id == self.request_id:
            raise _invalid(
                "an answer compared with itself says nothing: name another request",
                "preference.other_request_id",
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


# -- errors as OpenAI names them ---------------------------------------------------------------
def param_path(loc: tuple[Any, ...] | list[Any]) -> str:
    """A pydantic location as OpenAI names parameters: ``messages[0].content``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def error_message(err: dict[str, Any]) -> str:
    """One pydantic error's message: a plain ValueError's own words, else pydantic's."""
    if err["type"] == "value_error":  # a plain ValueError from a validator: its own words
        return str(err["ctx"]["error"])
    return err["msg"]
