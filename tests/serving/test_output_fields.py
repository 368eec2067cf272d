"""Every field of an answer that carries generated text or tokens passes the output guardrails or
does not leave the gateway (issue 23, "answers around the output guardrails").

The upstream is a scripted stand-in for vLLM (a mock: what is tested is what the gateway lets
through, so the "model" must say PII in every field vLLM can fill): an e-mail address in the
content, in ``reasoning_content``, in a tool call's arguments (split across stream deltas) and,
token by token, in ``logprobs``; plus vLLM's own response fields (``token_ids``,
``prompt_token_ids``, ``kv_transfer_params``, ``routed_experts``, ``system_fingerprint``,
``stop_reason``).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

sys.path.insert(0, str(Path(__file__).parent))
from test_gateway_support import KEY_A, make_config, running_gateway  # noqa: E402

from serving.gateway.app import serve_in_thread  # noqa: E402
from serving.gateway.upstream import Upstream  # noqa: E402
from serving.gateway.wire import (  # noqa: E402
    CHOICE_KEYS,
    CHUNK_CHOICE_KEYS,
    COMPLETION_KEYS,
    DELTA_KEYS,
    MESSAGE_KEYS,
    USAGE_KEYS,
)

EMAIL = "jane.doe@example.com"
REPLY = f"Write to {EMAIL} today."
TOKENS = ["Write", " to", " jane", ".d", "oe", "@", "example", ".com", " today", "."]
VLLM_ONLY = ("token_ids", "prompt_token_ids", "kv_transfer_params", "routed_experts",
             "system_fingerprint", "stop_reason", "reasoning", "prompt_logprobs")
TOOLS = [{"type": "function", "function": {"name": "send_mail", "parameters": {"type": "object"}}}]
HEADERS = {"Authorization": f"Bearer {KEY_A}"}


def _logprob(token: str) -> dict:
    entry = {"token": token, "logprob": -0.5, "bytes": list(token.encode())}
    return {**entry, "top_logprobs": [entry]}


class LeakyVllm:
    """Answers like vLLM with every optional field filled, PII in each text-carrying one."""

    def __init__(self) -> None:
        self.app = FastAPI()
        self.app.post("/v1/chat/completions")(self._chat)
        self.app.get("/health")(lambda: {"ok": True})

    async def _chat(self, request: Request):  # noqa: ANN202
        body = await request.json()
        tools = bool(body.get("tools"))
        base = {"id": "chatcmpl-up", "created": int(time.time()), "model": body["model"],
                "system_fingerprint": "vllm-0.32-cpu", "prompt_token_ids": [1, 2, 3],
                "kv_transfer_params": {"remote_host": "10.0.0.5", "remote_block_ids": [7]}}
        call = {"id": "call_1", "type": "function",
                "function": {"name": "send_mail", "arguments": json.dumps({"to": EMAIL})}}
        if not body.get("stream"):
            message = {"role": "assistant", "content": REPLY, "refusal": None,
                       "reasoning_content": f"The user is {EMAIL}.", "reasoning": f"The user is {EMAIL}.",
                       "tool_calls": [call] if tools else []}
            return JSONResponse({
                **base, "object": "chat.completion",
                "choices": [{"index": 0, "message": message,
                             "finish_reason": "tool_calls" if tools else "stop", "stop_reason": None,
                             "token_ids": list(range(len(TOKENS))), "routed_experts": [[0, 1]],
                             "logprobs": {"content": [_logprob(t) for t in TOKENS]}}],
                "usage": {"prompt_tokens": 3, "completion_tokens": len(TOKENS), "total_tokens": 13,
                          "prompt_tokens_details": {"cached_tokens": 0, "note": "x"}},
                "prompt_logprobs": None,
            })

        def chunk(delta: dict, finish: str | None = None, **extra) -> bytes:  # noqa: ANN003
            choice = {"index": 0, "delta": delta, "finish_reason": finish, **extra}
            obj = {**base, "object": "chat.completion.chunk", "choices": [choice]}
            return f"data: {json.dumps(obj)}\n\n".encode()

        async def events():  # noqa: ANN202
            yield chunk({"role": "assistant", "content": ""}, token_ids=None)  # as vLLM sends it
            yield chunk({"reasoning_content": f"The user is {EMAIL}."})
            for k, t in enumerate(TOKENS):
                yield chunk({"content": t}, token_ids=[k], logprobs={"content": [_logprob(t)]})
            if tools:
                args = call["function"]["arguments"]
                yield chunk({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                             "function": {"name": "send_mail", "arguments": args[:14]}}]})
                yield chunk({"tool_calls": [{"index": 0, "function": {"arguments": args[14:]}}]})
            yield chunk({}, "tool_calls" if tools else "stop", stop_reason=None, routed_experts=[[1]])
            usage = {"prompt_tokens": 3, "completion_tokens": len(TOKENS), "total_tokens": 13,
                     "prompt_tokens_details": None}
            yield f"data: {json.dumps({**base, 'object': 'chat.completion.chunk', 'choices': [], 'usage': usage})}\n\n".encode()
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")


@pytest.fixture(scope="module")
def leaky() -> Iterator[Upstream]:
    with serve_in_thread(LeakyVllm().app) as base:
        yield Upstream(base + "/v1", "leaky-r1", "leaky", tool_parser="hermes")


def _gateway(tmp_path_factory: pytest.TempPathFactory, leaky: Upstream, **cfg):  # noqa: ANN003
    return running_gateway(tmp_path_factory.mktemp("gw"), leaky, make_config(**cfg))


@pytest.fixture(scope="module")
def redacting(tmp_path_factory, leaky):  # noqa: ANN001, ANN201 - make_config: pii_output redacts
    with _gateway(tmp_path_factory, leaky) as gw:
        yield gw


@pytest.fixture(scope="module")
def blocking(tmp_path_factory, leaky):  # noqa: ANN001, ANN201
    with _gateway(tmp_path_factory, leaky,
                  guardrails={"output": [{"name": "pii_output", "params": {"mode": "block"}}]}) as gw:
        yield gw


@pytest.fixture(scope="module")
def unguarded(tmp_path_factory, leaky):  # noqa: ANN001, ANN201
    with _gateway(tmp_path_factory, leaky, guardrails={"output": []}) as gw:
        yield gw


def _request(stream: bool, tools: bool = False, **kw) -> dict:  # noqa: ANN003
    body = {"model": "alignloop", "messages": [{"role": "user", "content": "mail her"}], "stream": stream, **kw}
    if tools:
        body["tools"] = TOOLS
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


def _post(base: str, body: dict) -> tuple[httpx.Response, str, list[dict]]:
    """The response, its raw text (every byte the client got) and, for a stream, its chunks."""
    with httpx.stream("POST", base + "/v1/chat/completions", headers=HEADERS, json=body, timeout=20) as r:
        raw = r.read().decode()
    chunks = [json.loads(line[6:]) for line in raw.splitlines()
              if line.startswith("data: {")] if body["stream"] else []
    return r, raw, chunks


def _assert_openai_shape(raw: str, stream: bool, chunks: list[dict]) -> None:
    for name in VLLM_ONLY:
        assert f'"{name}"' not in raw, name
    assert "reasoning_content" not in raw
    for obj in chunks if stream else [json.loads(raw)]:
        assert obj.keys() <= COMPLETION_KEYS, obj.keys()
        assert obj.get("usage") is None or obj["usage"].keys() <= USAGE_KEYS
        for c in obj["choices"]:
            assert c.keys() <= (CHUNK_CHOICE_KEYS if stream else CHOICE_KEYS), c.keys()
            assert (c["delta"] if stream else c["message"]).keys() <= (DELTA_KEYS if stream else MESSAGE_KEYS)
            assert c.get("logprobs") is None  # not asked for


def _tool_calls(chunks: list[dict]) -> list[dict]:
    return [tc for ch in chunks for c in ch["choices"] for tc in c["delta"].get("tool_calls") or []]


@pytest.mark.parametrize("stream", [False, True])
def test_logprobs_are_refused_while_output_hooks_run(redacting, stream: bool) -> None:  # noqa: ANN001
    base, _, _ = redacting
    for extra in ({"logprobs": True}, {"logprobs": True, "top_logprobs": 3}):
        r, raw, _ = _post(base, _request(stream, **extra))
        assert r.status_code == 400, raw
        err = json.loads(raw)["error"]
        assert err["param"] == "logprobs" and err["code"] == "unsupported_with_output_guardrails"
        assert EMAIL not in raw


@pytest.mark.parametrize("stream", [False, True])
def test_redacted_answer_leaves_no_field_with_the_original(redacting, stream: bool) -> None:  # noqa: ANN001
    base, _, store = redacting
    r, raw, chunks = _post(base, _request(stream, tools=True))
    assert r.status_code == 200, raw
    assert EMAIL not in raw and "oe@example" not in raw and '"@"' not in raw
    _assert_openai_shape(raw, stream, chunks)
    if stream:
        calls = _tool_calls(chunks)
        assert len(calls) == 1  # held back and sent whole, once checked
        args, rid = calls[0]["function"]["arguments"], chunks[0]["id"]
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == len(TOKENS)
    else:
        message = json.loads(raw)["choices"][0]["message"]
        args, rid = message["tool_calls"][0]["function"]["arguments"], json.loads(raw)["id"]
        assert "<EMAIL_ADDRESS>" in message["content"]
    assert json.loads(args) == {"to": "<EMAIL_ADDRESS>"}
    store.flush()
    row = store.get_exchange(rid)
    assert row["choices"][0]["tool_calls"][0]["function"]["arguments"] == args  # logged as sent
    assert EMAIL not in json.dumps(row, default=str)


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("tools", [False, True])
def test_blocked_answer_cannot_be_read_back(blocking, stream: bool, tools: bool) -> None:  # noqa: ANN001
    base, _, _ = blocking
    r, raw, chunks = _post(base, _request(stream, tools=tools))
    assert r.status_code == 200, raw
    for piece in (EMAIL, "oe@example", "jane", "send_mail", "call_1"):
        assert piece not in raw, piece
    _assert_openai_shape(raw, stream, chunks)
    finishes = [c["finish_reason"] for ch in chunks for c in ch["choices"]] if stream else [
        json.loads(raw)["choices"][0]["finish_reason"]]
    assert finishes[-1] == "content_filter"


@pytest.mark.parametrize("stream", [False, True])
def test_without_output_hooks_logprobs_pass_and_vllm_fields_do_not(unguarded, stream: bool) -> None:  # noqa: ANN001
    base, _, _ = unguarded
    r, raw, chunks = _post(base, _request(stream, tools=True, logprobs=True, top_logprobs=1))
    assert r.status_code == 200, raw
    for name in VLLM_ONLY:
        assert f'"{name}"' not in raw, name
    assert "reasoning_content" not in raw
    if stream:
        tokens = [lp["token"] for ch in chunks for c in ch["choices"] for lp in (c.get("logprobs") or {}).get("content", [])]
        assert "".join(_tool_calls(chunks)[k]["function"]["arguments"] for k in range(2)) == json.dumps({"to": EMAIL})
    else:
        tokens = [lp["token"] for lp in json.loads(raw)["choices"][0]["logprobs"]["content"]]
    assert tokens == TOKENS
