"""What the gateway puts on the wire: errors, request-body checks and responses in OpenAI's shape.

The request models live in ground/protocol.py (guardrails see them too); this module is the
gateway's side of the protocol:

- errors: :class:`GatewayError`, answered as ``{"error": {"message", "type", "param", "code"}}``
  with its status (never a bare 500), and the checks that raise it before a request is modelled
  (:func:`parse_json_object`), while it is (:func:`validation_error`) and after
  (:func:`check_limits`, the gateway's own limits);
- responses: the answers the gateway makes itself (refusals, :func:`completion_body`,
  :func:`chunk_body`), and vLLM's cut to OpenAI's chat-completion shape
  (:func:`public_completion`, :func:`public_chunk`): vLLM's own fields (``token_ids``,
  ``prompt_token_ids``, ``kv_transfer_params``, ``reasoning_content``, ``system_fingerprint``...)
  carry generated text, tokens or details of the server and never pass the output guardrails, so
  they do not leave the gateway (docs/GATEWAY.md lists what does);
- server-sent events: :func:`sse`, :func:`error_event`.
"""

from __future__ import annotations

import json
import time
from typing import Any, Literal

import orjson
from pydantic import BaseModel, Field, ValidationError

from ground.protocol import ChatCompletionRequest, error_message, param_path
from serving.gateway.config import LimitsConfig


# -- errors ------------------------------------------------------------------------------------
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


# -- request bodies ---------------------------------------------------------------------------
def parse_json_object(body: bytes) -> dict[str, Any]:
    """The body as one JSON object; anything else is a 400 that says what is wrong.

    orjson refuses invalid UTF-8, lone surrogates, NaN/Infinity, numbers that overflow a double
    and nesting deeper than 1024; duplicate keys, which it would silently collapse, are refused
    here (two parsers could disagree on which value counts).
    """
    if not body.strip():
        raise GatewayError(400, "request body is empty: send a JSON object", code="invalid_json")
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise GatewayError(400, f"request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise GatewayError(400, "request body must be a JSON object", code="invalid_json")
    duplicate = _duplicate_key(body)
    if duplicate is not None:
        raise GatewayError(
            400, f"request body has the key {duplicate[:64]!r} twice in one object", code="invalid_json"
        )
    return data


class _DuplicateKey(ValueError):
    pass


def _unique_pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
    d = dict(items)
    if len(d) != len(items):
        seen: set[str] = set()
        raise _DuplicateKey(next(k for k, _ in items if k in seen or seen.add(k)))
    return d


_PAIRS_DECODER = json.JSONDecoder(object_pairs_hook=_unique_pairs)


def _duplicate_key(body: bytes) -> str | None:
    """The first key given twice in one object of ``body`` (valid JSON: orjson accepted it)."""
    try:
        _PAIRS_DECODER.decode(body.decode())
    except _DuplicateKey as e:
        return str(e)
    return None


_TYPE_CODES = {"missing": "missing_required_parameter", "extra_forbidden": "unknown_parameter"}
_DEPRECATED = {
    "functions": "'functions' is deprecated by OpenAI; use 'tools'",
    "function_call": "'function_call' is deprecated by OpenAI; use 'tool_choice'",
}


def validation_error(e: ValidationError) -> GatewayError:
    """The first validation error as a 400 naming the parameter, in OpenAI's words."""
    err = e.errors()[0]
    param = param_path(err["loc"]) + (err.get("ctx") or {}).get("subpath", "")
    param = param.removeprefix(".")
    kind = err["type"]
    code = _TYPE_CODES.get(kind) or ("invalid_type" if kind.endswith("_type") else "invalid_value")
    if kind == "missing":
        message = f"Missing required parameter: '{param}'."
    elif kind == "extra_forbidden":
        message = _DEPRECATED.get(param) or f"Unrecognized request argument supplied: {param}"
    elif param:
        message = f"Invalid '{param}': {error_message(err)}"
    else:
        message = error_message(err)
    return GatewayError(400, message, param=param or None, code=code)


def check_limits(req: ChatCompletionRequest, limits: LimitsConfig) -> None:
    """The gateway's own request limits (``GatewayConfig.limits``): a 400 naming the parameter."""
    if len(req.messages) > limits.max_messages:
        raise GatewayError(
            400,
            f"Invalid 'messages': {len(req.messages)} messages; this gateway takes at most "
            f"{limits.max_messages}",
            param="messages",
            code="array_above_max_length",
        )
    chars = sum(len(t) for m in req.messages for t in m.texts())
    if chars > limits.max_prompt_chars:
        raise GatewayError(
            400,
            f"Invalid 'messages': {chars} characters of text; this gateway takes at most "
            f"{limits.max_prompt_chars}",
            param="messages",
            code="string_above_max_length",
        )
    for name in ("max_tokens", "max_completion_tokens"):
        value = getattr(req, name)
        if value is not None and value > limits.max_tokens:
            raise GatewayError(
                400,
                f"Invalid '{name}': {value} is more than this gateway allows ({limits.max_tokens})",
                param=name,
                code="integer_above_max_value",
            )
    if req.n > limits.max_n:
        raise GatewayError(
            400,
            f"Invalid 'n': {req.n} choices; this gateway returns at most {limits.max_n}",
            param="n",
            code="integer_above_max_value",
        )


# -- responses --------------------------------------------------------------------------------
class FeedbackResponse(BaseModel):
    id: str
    object: Literal["feedback"] = "feedback"
    created: bool
    actor_role: str = Field("user", description="How the server recorded who gave it.")


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "alignloop"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def _made(
    object_: str, request_id: str, model: str, choices: list[dict[str, Any]]
) -> dict[str, Any]:
    """The envelope of a completion or a chunk made by the gateway itself."""
    return {
        "id": request_id,
        "object": object_,
        "created": int(time.time()),
        "model": model,
        "choices": choices,
    }


def completion_body(
    request_id: str,
    model: str,
    content: str,
    finish_reason: str,
    usage: dict[str, int] | None = None,
    n: int = 1,
) -> dict[str, Any]:
    """A non-streaming chat completion made by the gateway itself (refusals)."""
    choices = [
        {
            "index": i,
            "message": {"role": "assistant", "content": content},
            "finish_reason": finish_reason,
            "logprobs": None,
        }
        for i in range(n)
    ]
    return {
        **_made("chat.completion", request_id, model, choices),
        "usage": usage or {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
    }


def chunk_body(
    request_id: str, model: str, delta: dict[str, Any], finish_reason: str | None, index: int = 0
) -> dict[str, Any]:
    """One streaming chunk made by the gateway itself."""
    choice = {"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
    return _made("chat.completion.chunk", request_id, model, [choice])


# -- what leaves the gateway ----------------------------------------------------------------------
# OpenAI's chat-completion shape; everything else an upstream sends is dropped (docs/GATEWAY.md).
COMPLETION_KEYS = frozenset({"id", "object", "created", "model", "choices", "usage"})
CHOICE_KEYS = frozenset({"index", "message", "finish_reason", "logprobs"})
MESSAGE_KEYS = frozenset({"role", "content", "refusal", "tool_calls"})
CHUNK_CHOICE_KEYS = frozenset({"index", "delta", "finish_reason", "logprobs"})
DELTA_KEYS = frozenset({"role", "content", "refusal", "tool_calls"})
GUARDED_DELTA_KEYS = frozenset({"role", "content", "tool_calls"})
"""A stream's delta keys under output hooks: a streamed ``refusal`` is not guarded, so dropped."""
USAGE_KEYS = frozenset(
    {"prompt_tokens", "completion_tokens", "total_tokens", "prompt_tokens_details",
     "completion_tokens_details"}
)
_TOOL_CALL_KEYS = ("id", "type", "function")
_FUNCTION_KEYS = ("name", "arguments")


def _pick(d: dict[str, Any], keys: Any) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k in keys}


def _public_usage(u: Any) -> dict[str, Any] | None:
    if not isinstance(u, dict):
        return None
    out = _pick(u, USAGE_KEYS)
    for k in ("prompt_tokens_details", "completion_tokens_details"):
        if k in out:  # counts only
            d = out[k]
            out[k] = {n: v for n, v in d.items() if isinstance(v, int)} if isinstance(d, dict) else None
    return out


def _public_tool_calls(calls: Any, streamed: bool) -> list[dict[str, Any]] | None:
    if not isinstance(calls, list):
        return None
    out = []
    for c in calls:
        if not isinstance(c, dict):
            continue
        call = _pick(c, (*_TOOL_CALL_KEYS, "index") if streamed else _TOOL_CALL_KEYS)
        if isinstance(call.get("function"), dict):
            call["function"] = _pick(call["function"], _FUNCTION_KEYS)
        out.append(call)
    return out


def public_completion(data: dict[str, Any], keep_logprobs: bool) -> dict[str, Any]:
    """A non-streamed answer with only OpenAI's fields; choice ``logprobs`` only if kept."""
    out = _pick(data, COMPLETION_KEYS)
    choices = []
    for c in data["choices"]:
        choice = _pick(c, CHOICE_KEYS)
        message = _pick(c.get("message") or {}, MESSAGE_KEYS)
        if "tool_calls" in message:
            message["tool_calls"] = _public_tool_calls(message["tool_calls"], streamed=False)
        choice["message"] = message
        choice["logprobs"] = c.get("logprobs") if keep_logprobs else None
        choices.append(choice)
    out["choices"] = choices
    if "usage" in out:
        out["usage"] = _public_usage(out["usage"])
    return out


def _is_public_chunk(obj: dict[str, Any], keep_logprobs: bool, delta_keys: frozenset[str]) -> bool:
    """Whether a stream chunk has only OpenAI's fields (the common case: cheap to check)."""
    if not obj.keys() <= COMPLETION_KEYS:
        return False
    u = obj.get("usage")
    if u is not None and (not isinstance(u, dict) or not u.keys() <= {"prompt_tokens", "completion_tokens", "total_tokens"}):
        return False
    for c in obj.get("choices") or ():
        if not isinstance(c, dict) or not c.keys() <= CHUNK_CHOICE_KEYS:
            return False
        if not keep_logprobs and c.get("logprobs") is not None:
            return False
        d = c.get("delta")
        if d is not None and (not isinstance(d, dict) or not d.keys() <= delta_keys or "tool_calls" in d):
            return False
    return True


def public_chunk(
    obj: dict[str, Any], keep_logprobs: bool, delta_keys: frozenset[str] = DELTA_KEYS
) -> dict[str, Any]:
    """A stream chunk with only OpenAI's fields: ``obj`` itself when it has no others.

    Raises TypeError when ``choices`` is not a list of objects (a malformed chunk).
    """
    if _is_public_chunk(obj, keep_logprobs, delta_keys):
        return obj
    choices = obj.get("choices") or []
    if not isinstance(choices, list) or not all(isinstance(c, dict) for c in choices):
        raise TypeError("choices")
    out = _pick(obj, COMPLETION_KEYS)
    out["choices"] = []
    for c in choices:
        choice = _pick(c, CHUNK_CHOICE_KEYS)
        delta = c.get("delta")
        delta = _pick(delta, delta_keys) if isinstance(delta, dict) else {}
        if "tool_calls" in delta:
            delta["tool_calls"] = _public_tool_calls(delta["tool_calls"], streamed=True)
        choice["delta"] = delta
        choice["logprobs"] = c.get("logprobs") if keep_logprobs else None
        out["choices"].append(choice)
    if "usage" in out:
        out["usage"] = _public_usage(out["usage"])
    return out


# -- server-sent events ----------------------------------------------------------------------------
def sse(obj: Any) -> bytes:
    """``obj`` as one server-sent event."""
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def error_event(message: str, code: str) -> bytes:
    """An upstream failure told mid-stream, as an event in OpenAI's error shape."""
    return sse({"error": {"message": message, "type": "upstream_error", "param": None, "code": code}})


def upstream_error_body(content: bytes, status: int) -> dict[str, Any]:
    """An upstream error body in OpenAI's shape (vLLM's usually is; wrap anything that is not)."""
    try:
        err = orjson.loads(content).get("error")
    except (orjson.JSONDecodeError, AttributeError):
        err = None
    if isinstance(err, dict) and isinstance(err.get("message"), str):
        return {"error": {"message": err["message"], "type": str(err.get("type") or "invalid_request_error"),
                          "param": err.get("param") if isinstance(err.get("param"), str) else None,
                          "code": str(err["code"]) if err.get("code") is not None else None}}
    text = content.decode(errors="replace").strip()[:500] or f"HTTP {status}"
    return {"error": {"message": f"the model server refused the request: {text}",
                      "type": "invalid_request_error", "param": None, "code": None}}
