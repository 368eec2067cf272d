"""The malformed-request corpus: chat and feedback bodies the gateway must answer with a 4xx in
OpenAI's error shape, within a second, without passing anything to the model server.

Each entry is (name, raw body bytes, the param the error must name or None). The wrong-type
sweep (every path of a valid request, every wrong type) is generated from ``VALID_CHAT`` by
``wrong_type_cases``; the entries here are the cases a sweep does not reach: bytes that are not
JSON, numbers JSON cannot hold, structure that is valid JSON but wrong for OpenAI's schema.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from typing import Any

VALID_CHAT: dict[str, Any] = {
    "model": "alignloop",
    "messages": [
        {"role": "system", "content": "Be brief."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is the weather?"},
                {"type": "image_url", "image_url": {"url": "https://example.com/a.png", "detail": "low"}},
            ],
        },
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ],
    "tools": [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "The weather in a city.",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ],
    "tool_choice": "auto",
    "parallel_tool_calls": False,
    "temperature": 0.5,
    "top_p": 0.9,
    "max_tokens": 16,
    "n": 1,
    "stream": False,
    "seed": 7,
    "stop": ["\n\n"],
    "user": "user-1",
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "logprobs": False,  # true is refused while output hooks run (the corpus's gateway has them)
    "logit_bias": {"50256": -100},
    "response_format": {"type": "text"},
    "metadata": {"app": "test"},
    "top_k": 5,
    "min_p": 0.1,
    "ignore_eos": False,
}

VALID_FEEDBACK: list[dict[str, Any]] = [
    {"rating": {"thumbs": "up"}, "comment": "good"},
    {"rating": {"score": 4}},
    {"preference": {"better_text": "A better answer."}},
    {"edit": {"text": "The corrected answer."}},
]

# Paths under which any JSON is valid (a tool's JSON Schema): the sweep does not go inside them.
FREE_FORM = ("tools[0].function.parameters",)
# Fields that take more than one JSON type, and which.
UNIONS: dict[str, tuple[type, ...]] = {
    "stop": (str, list),
    "tool_choice": (str, dict),
    "messages[0].content": (str, list),
    "messages[1].content": (str, list),
    "messages[2].content": (str, list, type(None)),
    "messages[3].content": (str, list),
    "logit_bias.50256": (int, float),
}
# Keys that may be left out; every other key of VALID_CHAT is required where it stands.
OPTIONAL = {
    "tools", "tool_choice", "parallel_tool_calls", "temperature", "top_p", "max_tokens", "n",
    "stream", "seed", "stop", "user", "presence_penalty", "frequency_penalty", "logprobs",
    "logit_bias", "response_format", "metadata", "top_k", "min_p", "ignore_eos",
    "messages[1].content[1].image_url.detail", "tools[0].function.description",
    "tools[0].function.parameters", "messages[2].content", "logit_bias.50256", "metadata.app",
}
_WRONG: dict[type, list[Any]] = {
    str: [5, 1.5, True, [], {}, ["a"]],
    int: ["1", 1.5, True, [], {}],
    float: ["0.5", True, [], {}, [0.5]],
    bool: ["true", 1, 0, [], {}],
    list: ["x", 5, {}, True],
    dict: ["x", 5, [], True],
    type(None): [5, {}, "x"],
}


def _paths(obj: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    yield prefix, obj
    if prefix in FREE_FORM:
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, f"{prefix}.{k}" if prefix else k)
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, f"{prefix}[{i}]")


def _split(path: str) -> list[str | int]:
    parts: list[str | int] = []
    for dotted in path.split("."):
        name, _, rest = dotted.partition("[")
        if name:
            parts.append(name)
        for idx in filter(None, rest.replace("]", "").split("[")):
            parts.append(int(idx))
    return parts


def _set(doc: Any, path: str, value: Any, delete: bool = False) -> Any:
    doc = copy.deepcopy(doc)
    *head, last = _split(path)
    node = doc
    for p in head:
        node = node[p]
    if delete:
        del node[last]
    else:
        node[last] = value
    return doc


def body(doc: Any) -> bytes:
    return json.dumps(doc, allow_nan=True).encode()


def wrong_type_cases() -> Iterator[tuple[str, bytes, str]]:
    """Every path of VALID_CHAT with every value of a wrong JSON type; and every required key left out."""
    for path, value in _paths(VALID_CHAT):
        if not path:
            continue
        allowed = UNIONS.get(path, (type(value),))
        if float in allowed:
            allowed = (*allowed, int)
        for wrong in _WRONG[type(value)]:
            if isinstance(wrong, allowed) and not (isinstance(wrong, bool) and bool not in allowed):
                continue
            yield f"{path} = {wrong!r}", body(_set(VALID_CHAT, path, wrong)), path
        if path not in OPTIONAL and not path.endswith("]") and path not in FREE_FORM:
            yield f"{path} left out", body(_set(VALID_CHAT, path, None, delete=True)), path


def _chat(**changes: Any) -> bytes:
    return body({**VALID_CHAT, **changes})


def _msgs(*messages: dict[str, Any]) -> bytes:
    return body({"model": "alignloop", "messages": list(messages)})


BIG_NUMBER = b"1" + b"0" * 400
DEEP = b'{"model": "alignloop", "messages": ' + b"[" * 5000 + b"]" * 5000 + b"}"

CHAT_CORPUS: list[tuple[str, bytes, str | None]] = [
    # bytes that are not (one) JSON object
    ("empty body", b"", None),
    ("whitespace", b"  \n ", None),
    ("invalid UTF-8", b'{"model": "alignloop", "messages": [{"role": "user", "content": "\xff\xfe"}]}', None),
    ("lone surrogate escape", b'{"model": "alignloop", "messages": [{"role": "user", "content": "\\ud800"}]}', None),
    ("truncated", body(VALID_CHAT)[:-7], None),
    ("trailing garbage", body(VALID_CHAT) + b"}", None),
    ("two objects", body(VALID_CHAT) + body(VALID_CHAT), None),
    ("array", b"[" + body(VALID_CHAT) + b"]", None),
    ("string", b'"hello"', None),
    ("null", b"null", None),
    ("number", b"42", None),
    ("deep nesting", DEEP, None),
    ("NaN", b'{"model": "alignloop", "temperature": NaN, "messages": [{"role": "user", "content": "h"}]}', None),
    ("Infinity", b'{"model": "alignloop", "top_p": Infinity, "messages": [{"role": "user", "content": "h"}]}', None),
    ("-Infinity", b'{"model": "alignloop", "seed": -Infinity, "messages": [{"role": "user", "content": "h"}]}', None),
    ("overflowing float", b'{"model": "alignloop", "temperature": 1e999, "messages": [{"role": "user", "content": "h"}]}', None),
    ("duplicate top-level key", b'{"model": "alignloop", "model": "x", "messages": [{"role": "user", "content": "h"}]}', None),
    ("duplicate nested key", b'{"model": "alignloop", "messages": [{"role": "user", "role": "system", "content": "h"}]}', None),
    ("single quotes", b"{'model': 'alignloop'}", None),
    ("comment", b'{"model": "alignloop", /* hi */ "messages": []}', None),
    # numbers JSON carries but the fields cannot hold
    ("400-digit seed", b'{"model": "alignloop", "seed": ' + BIG_NUMBER + b', "messages": [{"role": "user", "content": "h"}]}', None),
    ("30-digit seed", b'{"model": "alignloop", "seed": 1' + b"0" * 30 + b', "messages": [{"role": "user", "content": "h"}]}', "seed"),
    ("huge max_tokens", _chat(max_tokens=2**80), "max_tokens"),
    ("max_tokens over the gateway limit", _chat(max_tokens=100_000), "max_tokens"),
    ("negative max_tokens", _chat(max_tokens=-1), "max_tokens"),
    ("zero n", _chat(n=0), "n"),
    ("n over the limit", _chat(n=1000), "n"),
    ("temperature too high", _chat(temperature=2.5), "temperature"),
    ("negative temperature", _chat(temperature=-0.1), "temperature"),
    ("top_p zero", _chat(top_p=0), "top_p"),
    ("top_logprobs 21", _chat(logprobs=True, top_logprobs=21), "top_logprobs"),
    ("logit bias 200", _chat(logit_bias={"5": 200}), "logit_bias"),
    ("logit bias key not a token id", _chat(logit_bias={"hello": 1}), "logit_bias"),
    ("seed beyond int64", _chat(seed=2**63), "seed"),
    ("presence penalty 3", _chat(presence_penalty=3), "presence_penalty"),
    # roles and messages
    ("unknown role", _msgs({"role": "wizard", "content": "hi"}), "messages[0].role"),
    ("role function (deprecated)", _msgs({"role": "function", "name": "f", "content": "hi"}), "messages[0].role"),
    ("empty role", _msgs({"role": "", "content": "hi"}), "messages[0].role"),
    ("role in wrong case", _msgs({"role": "User", "content": "hi"}), "messages[0].role"),
    ("no messages", body({"model": "alignloop", "messages": []}), "messages"),
    ("message not an object", _msgs("hi"), "messages[0]"),  # type: ignore[arg-type]
    ("user message without content", _msgs({"role": "user"}), "messages[0].content"),
    ("empty user content", _msgs({"role": "user", "content": ""}), "messages[0].content"),
    ("empty content part list", _msgs({"role": "user", "content": []}), "messages[0].content"),
    ("unknown message key", _msgs({"role": "user", "content": "hi", "mood": "happy"}), "messages[0].mood"),
    ("too many messages", body({"model": "alignloop", "messages": [{"role": "user", "content": "h"}] * 65}), "messages"),
    ("prompt over the char limit", _msgs({"role": "user", "content": "x" * 40_000}), "messages"),
    # content part types
    ("unknown content part type", _msgs({"role": "user", "content": [{"type": "video", "video": "x"}]}), "messages[0].content[0].type"),
    ("image part in a system message", _msgs({"role": "system", "content": [{"type": "image_url", "image_url": {"url": "https://a/b.png"}}]}), "messages[0].content[0].type"),
    ("text part without text", _msgs({"role": "user", "content": [{"type": "text"}]}), "messages[0].content[0].text"),
    ("image part with empty url", _msgs({"role": "user", "content": [{"type": "image_url", "image_url": {"url": ""}}]}), "messages[0].content[0].image_url.url"),
    ("audio part with a bad format", _msgs({"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "AAAA", "format": "ogg"}}]}), "messages[0].content[0].input_audio.format"),
    ("content part not an object", _msgs({"role": "user", "content": ["hi"]}), "messages[0].content[0]"),
    # tool calls and tools
    ("tool message without tool_call_id", _msgs({"role": "user", "content": "h"}, {"role": "tool", "content": "x"}), "messages[1].tool_call_id"),
    ("tool_call_id on a user message", _msgs({"role": "user", "content": "h", "tool_call_id": "c"}), "messages[0].tool_call_id"),
    ("tool_calls on a user message", _msgs({"role": "user", "content": "h", "tool_calls": []}), "messages[0].tool_calls"),
    ("assistant with neither content nor tool_calls", _msgs({"role": "user", "content": "h"}, {"role": "assistant"}), "messages[1].content"),
    ("tool call without id", _msgs({"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{}"}}]}), "messages[0].tool_calls[0].id"),
    ("tool call of type retrieval", _msgs({"role": "assistant", "tool_calls": [{"id": "c", "type": "retrieval", "function": {"name": "f", "arguments": "{}"}}]}), "messages[0].tool_calls[0].type"),
    ("tool call arguments as an object", _msgs({"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": {}}}]}), "messages[0].tool_calls[0].function.arguments"),
    ("tool_calls not a list", _msgs({"role": "assistant", "tool_calls": {"id": "c"}}), "messages[0].tool_calls"),
    ("tool name with spaces", _chat(tools=[{"type": "function", "function": {"name": "get weather"}}]), "tools[0].function.name"),
    ("tool name of 65 chars", _chat(tools=[{"type": "function", "function": {"name": "f" * 65}}], tool_choice="auto"), "tools[0].function.name"),
    ("tool parameters not an object", _chat(tools=[{"type": "function", "function": {"name": "f", "parameters": "x"}}]), "tools[0].function.parameters"),
    ("tool parameters nested 100 deep", _chat(tools=[{"type": "function", "function": {"name": "f", "parameters": json.loads('{"a":' * 100 + "1" + "}" * 100)}}]), "tools[0].function.parameters"),
    ("tool_choice without tools", _chat(tools=None, tool_choice="auto"), "tool_choice"),
    ("tool_choice names an unknown tool", _chat(tool_choice={"type": "function", "function": {"name": "nope"}}), "tool_choice"),
    ("tool_choice unknown string", _chat(tool_choice="always"), "tool_choice"),
    ("functions (deprecated)", _chat(functions=[{"name": "f"}]), "functions"),
    # other fields
    ("unknown top-level argument", _chat(frobnicate=True), "frobnicate"),
    ("stream_options without stream", _chat(stream_options={"include_usage": True}), "stream_options"),
    ("top_logprobs without logprobs", _chat(top_logprobs=2), "top_logprobs"),
    # token logprobs would spell out an answer the output hooks redacted or blocked (issue 23)
    ("logprobs under output hooks", _chat(logprobs=True), "logprobs"),
    ("top_logprobs under output hooks", _chat(logprobs=True, top_logprobs=2), "logprobs"),
    ("logprobs under output hooks, streamed", _chat(logprobs=True, stream=True), "logprobs"),
    ("five stop sequences", _chat(stop=["a", "b", "c", "d", "e"]), "stop"),
    ("response_format of an unknown type", _chat(response_format={"type": "yaml"}), "response_format"),
    ("json_schema without a name", _chat(response_format={"type": "json_schema", "json_schema": {"schema": {}}}), "response_format.json_schema.name"),
    ("metadata value not a string", _chat(metadata={"k": 1}), "metadata"),
    ("empty model", _chat(model=""), "model"),
    ("enormous model name", _chat(model="m" * 100_000), "model"),
    ("enormous user id", _chat(user="u" * 1000), "user"),
]

FEEDBACK_CORPUS: list[tuple[str, dict[str, Any] | bytes, str | None]] = [
    ("empty body", b"", None),
    ("invalid UTF-8", b'{"request_id": "\xff", "rating": {"score": 5}}', None),
    ("NaN score", b'{"request_id": "r", "rating": {"score": NaN}}', None),
    ("huge score", b'{"request_id": "r", "rating": {"score": ' + BIG_NUMBER + b"}}", None),
    ("duplicate keys", b'{"request_id": "r", "rating": {"score": 1, "score": 5}}', None),
    ("deep nesting", b'{"request_id": "r", "rating": ' + b"[" * 3000 + b"]" * 3000 + b"}", None),
    ("array", b'[{"request_id": "r"}]', None),
    ("missing request_id", {"rating": {"score": 5}}, "request_id"),
    ("request_id a number", {"request_id": 5, "rating": {"score": 5}}, "request_id"),
    ("empty request_id", {"request_id": "", "rating": {"score": 5}}, "request_id"),
    ("enormous request_id", {"request_id": "r" * 10_000, "rating": {"score": 5}}, "request_id"),
    ("no kind", {"request_id": "r"}, None),
    ("two kinds", {"request_id": "r", "rating": {"score": 1}, "edit": {"text": "x"}}, None),
    ("score as a string", {"request_id": "r", "rating": {"score": "5"}}, "rating.score"),
    ("score 6", {"request_id": "r", "rating": {"score": 6}}, "rating.score"),
    ("score a float", {"request_id": "r", "rating": {"score": 4.5}}, "rating.score"),
    ("score a bool", {"request_id": "r", "rating": {"score": True}}, "rating.score"),
    ("thumbs sideways", {"request_id": "r", "rating": {"thumbs": "sideways"}}, "rating.thumbs"),
    ("thumbs and score", {"request_id": "r", "rating": {"thumbs": "up", "score": 5}}, "rating"),
    ("rating not an object", {"request_id": "r", "rating": 5}, "rating"),
    ("empty edit", {"request_id": "r", "edit": {"text": ""}}, "edit.text"),
    ("enormous edit", {"request_id": "r", "edit": {"text": "x" * 40_000}}, "edit.text"),
    ("edit text a list", {"request_id": "r", "edit": {"text": ["x"]}}, "edit.text"),
    ("preference without preferred", {"request_id": "r", "preference": {"other_request_id": "o"}}, "preference"),
    ("preference with both", {"request_id": "r", "preference": {"other_request_id": "o", "preferred": "this", "better_text": "b"}}, "preference"),
    ("preferred neither", {"request_id": "r", "preference": {"other_request_id": "o", "preferred": "both"}}, "preference.preferred"),
    ("actor in the body", {"request_id": "r", "rating": {"score": 5}, "actor": "reviewer-1"}, "actor"),
    ("actor_role in the body", {"request_id": "r", "rating": {"score": 5}, "actor_role": "reviewer"}, "actor_role"),
    ("unknown key in rating", {"request_id": "r", "rating": {"score": 5, "stars": 5}}, "rating.stars"),
    ("comment a number", {"request_id": "r", "rating": {"score": 5}, "comment": 5}, "comment"),
    ("enormous comment", {"request_id": "r", "rating": {"score": 5}, "comment": "c" * 20_000}, "comment"),
    # feedback that carries no information (issue 23); "r" is the served request's id, and the
    # served answer is test_gateway_support.FakeUpstream's "Hello there, friend."
    ("an answer preferred over itself", {"request_id": "r", "preference": {"other_request_id": "r", "preferred": "this"}}, "preference.other_request_id"),
    ("an answer dispreferred to itself", {"request_id": "r", "preference": {"other_request_id": "r", "preferred": "other"}}, "preference.other_request_id"),
    ("edit of only whitespace", {"request_id": "r", "edit": {"text": " \n\t "}}, "edit.text"),
    ("edit equal to the answer", {"request_id": "r", "edit": {"text": "Hello there, friend."}}, "edit.text"),
    ("edit differing only in whitespace", {"request_id": "r", "edit": {"text": "  Hello\nthere,\u00a0 friend.\t"}}, "edit.text"),
    ("better text of only whitespace", {"request_id": "r", "preference": {"better_text": "\u2003"}}, "preference.better_text"),
    ("better text equal to the answer", {"request_id": "r", "preference": {"better_text": "Hello there,  friend. "}}, "preference.better_text"),
]
