"""Test support for the gateway tests (no tests here): a scripted fake upstream and app builders.

The fake upstream is a *mock of vLLM* used only where a test must control what the model says
(PII in outputs, slow answers) or see exactly what the upstream received; tests say so.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from ground.logstore import LogStore
from serving.gateway.app import create_app, serve_in_thread
from serving.gateway.config import GatewayConfig, hash_key
from serving.gateway.upstream import StaticUpstream, Upstream

KEY_A, KEY_B, ADMIN = "sk-tenant-a", "sk-tenant-b", "sk-admin"


class FakeUpstream:
    """A scripted OpenAI-compatible server: answers ``reply`` in ``chunk_chars``-sized stream pieces.

    With ``n`` it answers n choices (choice i says ``replies[i]`` if given, else ``reply``), their
    stream chunks interleaved by index as vLLM sends them.
    """

    def __init__(
        self, reply: str = "Hello there, friend.", chunk_chars: int = 3, delay_s: float = 0.0,
        replies: list[str] | None = None,
    ) -> None:
        self.reply, self.chunk_chars, self.delay_s = reply, chunk_chars, delay_s
        self.replies = replies
        self.received: list[dict] = []
        self.app = FastAPI()
        self.app.post("/v1/chat/completions")(self._chat)
        self.app.get("/health")(lambda: {"ok": True})

    def _usage(self) -> dict:
        n = max(1, len(self.reply) // self.chunk_chars)
        return {"prompt_tokens": 7, "completion_tokens": n, "total_tokens": 7 + n}

    async def _chat(self, request: Request):  # noqa: ANN202
        body = await request.json()
        self.received.append(body)
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        base = {"id": "chatcmpl-upstream", "created": int(time.time()), "model": body["model"]}
        n = body.get("n", 1)
        replies = [(self.replies or [])[i] if i < len(self.replies or []) else self.reply for i in range(n)]
        if not body.get("stream"):
            return JSONResponse(
                {
                    **base,
                    "object": "chat.completion",
                    "usage": self._usage(),
                    "choices": [
                        {
                            "index": i,
                            "message": {"role": "assistant", "content": text},
                            "finish_reason": "stop",
                        }
                        for i, text in enumerate(replies)
                    ],
                }
            )

        async def events():  # noqa: ANN202
            def chunk(delta: dict, finish: str | None = None, index: int = 0) -> bytes:
                obj = {
                    **base,
                    "object": "chat.completion.chunk",
                    "choices": [{"index": index, "delta": delta, "finish_reason": finish}],
                }
                return f"data: {json.dumps(obj)}\n\n".encode()

            for i in range(n):
                yield chunk({"role": "assistant", "content": ""}, index=i)
            longest = max(len(t) for t in replies)
            for pos in range(0, longest, self.chunk_chars):  # interleaved by index, as vLLM does
                for i, text in enumerate(replies):
                    if pos < len(text):
                        yield chunk({"content": text[pos : pos + self.chunk_chars]}, index=i)
            for i in range(n):
                yield chunk({}, "stop", index=i)
            if (body.get("stream_options") or {}).get("include_usage"):
                obj = {
                    **base,
                    "object": "chat.completion.chunk",
                    "choices": [],
                    "usage": self._usage(),
                }
                yield f"data: {json.dumps(obj)}\n\n".encode()
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")


def make_config(**overrides) -> GatewayConfig:  # noqa: ANN003
    data = {
        "tenants": [
            {"name": "a", "key_hash": hash_key(KEY_A)},
            {"name": "b", "key_hash": hash_key(KEY_B)},
        ],
        "admin_key_hash": hash_key(ADMIN),
        "upstream": {"connect_timeout_s": 1.0, "read_timeout_s": 10.0},
        # request limits are the gateway's own (a 400 naming the parameter), not a guardrail
        "limits": {"max_prompt_chars": 2000, "max_messages": 8, "max_tokens": 512},
        "guardrails": {
            "input": [
                {"name": "injection"},
                {
                    "name": "blocked_topics",
                    "params": {"topics": {"weapons": [r"\bbuild a bomb\b"]}},
                },
                {"name": "pii"},
            ],
            "output": [{"name": "pii_output", "params": {"mode": "redact"}}],
        },
    }
    data.update(overrides)
    return GatewayConfig.model_validate(data)


@contextlib.contextmanager
def running_gateway(
    tmp_path: Path, upstream: Upstream | None, config: GatewayConfig | None = None, extra_routers=()
) -> Iterator[tuple[str, StaticUpstream, LogStore]]:  # noqa: ANN001
    """A gateway on a free port over a fresh SQLite store; yields (base_url, provider, store)."""
    db = tmp_path / "logs.db"
    store = LogStore(f"sqlite:///{db}")
    provider = StaticUpstream(upstream)
    app = create_app(config or make_config(), provider, store, extra_routers=extra_routers)
    with serve_in_thread(app) as base:
        yield base, provider, store  # the app closes (flushes) it on shutdown


@contextlib.contextmanager
def running_fake(fake: FakeUpstream) -> Iterator[Upstream]:
    with serve_in_thread(fake.app) as base:
        yield Upstream(base_url=base + "/v1", release_id="fake-r1", served_model="fake-model")


def test_feedback_actor_is_stored_and_part_of_identity(tmp_path):
    from ground.logstore import LogStore

    db = LogStore(f"sqlite:///{tmp_path / 'logs.db'}")
    try:
        a, created_a = db.add_feedback("r1", "t", "rating", {"score": 5}, actor="u1")
        b, created_b = db.add_feedback("r1", "t", "rating", {"score": 5}, actor="u2")
        again, created_again = db.add_feedback("r1", "t", "rating", {"score": 5}, actor="u1")
        rev, _ = db.add_feedback("r1", "t", "rating", {"score": 5}, actor="u1", actor_role="reviewer")
        assert created_a and created_b and not created_again and a == again
        assert len({a, b, rev}) == 3
        rows = {r["id"]: r for r in db.feedback_events()}
        assert rows[a]["actor"] == "u1" and rows[a]["actor_role"] == "user"
        assert rows[rev]["actor_role"] == "reviewer"
    finally:
        db.close()


def test_logstore_adds_feedback_columns_to_an_older_database(tmp_path):
    import sqlite3

    from ground.logstore import LogStore

    path = tmp_path / "old.db"
    con = sqlite3.connect(path)  # the feedback table as the first release created it
    con.execute(
        "CREATE TABLE feedback (id VARCHAR(64) PRIMARY KEY, request_id VARCHAR(64) NOT NULL, "
        "tenant VARCHAR(128) NOT NULL, kind VARCHAR(16) NOT NULL, payload JSON NOT NULL, "
        "comment TEXT, created_at DATETIME NOT NULL)"
    )
    con.execute(
        "INSERT INTO feedback VALUES ('fb-old', 'r0', 't', 'rating', '{\"score\": 1}', NULL, "
        "'2026-11-01 00:00:00')"
    )
    con.commit()
    con.close()
    db = LogStore(f"sqlite:///{path}")
    try:
        db.add_feedback("r1", "t", "edit", {"text": "x"}, actor="rev", actor_role="reviewer")
        rows = {r["id"]: r for r in db.feedback_events()}
        assert rows["fb-old"]["actor"] is None and rows["fb-old"]["actor_role"] == "user"
        assert len(rows) == 2
    finally:
        db.close()
