"""A SYNTHETIC OpenAI-compatible upstream: no model, it streams made-up tokens at a set pace.

    .venv/bin/python benchmarks/synthetic_upstream.py --port 9000 --ttft-ms 20 --itl-ms 10 \
        --tokenizer .alignloop-test/models/base

This is not vLLM. Like the fake endpoint LiteLLM's own proxy benchmarks use, it exists to measure
the gateway's cost on any machine: it answers ``POST /v1/chat/completions`` (streamed or not)
with ``max_completion_tokens`` (or ``max_tokens``) tokens, the first after ``--ttft-ms`` and the
rest ``--itl-ms`` apart, in vLLM's chunk format (a role chunk, one chunk per token, a finish
chunk, a usage chunk when ``stream_options.include_usage``, ``[DONE]``). With ``--tokenizer`` the
tokens are random entries of that tokenizer's vocabulary (what a model with random weights emits:
digits and symbols included, the expensive case for PII checks); without it, English words.

``GET /stats`` reports streams started, finished, in progress and abandoned by the client, so
tests can check that the gateway leaves no upstream request behind. Raw ASGI on uvicorn
(httptools + uvloop): it should cost much less per chunk than the gateway it is measured with.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from dataclasses import dataclass, field

import orjson

WORDS = " ".join([
    "the of and to in is that for it as was with be by on not he this are or his from at which",
    "but have an they you were her she there been one all we their has would when if so no will",
    "more can out up about what into them some could time only other new these two may then do",
    "first any my now such like our over man me even most made after also did many before must",
]).split()


@dataclass
class Stats:
    started: int = 0
    finished: int = 0
    abandoned: int = 0  # the client (the gateway) closed the connection mid-stream
    requests: int = 0
    active: set[int] = field(default_factory=set)

    def as_dict(self) -> dict[str, int]:
        return {
            "requests": self.requests,
            "started": self.started,
            "finished": self.finished,
            "abandoned": self.abandoned,
            "active": len(self.active),
        }


class SyntheticUpstream:
    """The ASGI app. ``faults`` makes a request misbehave when its last message contains a key:

    - ``"MALFORMED"``: a chunk that is not JSON after the third token;
    - ``"HANG"``: headers, then nothing until the client leaves;
    - ``"SLOWFIRST"``: the first token after ``slow_first_s``;
    - ``"SLOWHEADERS"``: even the response headers only after ``slow_first_s``.
    """

    def __init__(
        self,
        ttft_s: float = 0.0,
        itl_s: float = 0.0,
        vocab: list[str] | None = None,
        seed: int = 0,
        slow_first_s: float = 3.0,
        model: str = "synthetic",
    ) -> None:
        self.ttft_s, self.itl_s, self.slow_first_s = ttft_s, itl_s, slow_first_s
        self.vocab = vocab or [" " + w for w in WORDS]
        self.rng = random.Random(seed)
        self.model = model
        self.stats = Stats()

    async def __call__(self, scope, receive, send) -> None:  # noqa: ANN001
        if scope["type"] == "lifespan":
            while True:
                kind = (await receive())["type"]
                await send({"type": kind + ".complete"})
                if kind == "lifespan.shutdown":
                    return
        path, method = scope["path"], scope["method"]
        if method == "GET" and path in ("/health", "/stats", "/v1/models"):
            body = {
                "/health": {"ok": True},
                "/stats": self.stats.as_dict(),
                "/v1/models": {"object": "list", "data": [{"id": self.model, "object": "model"}]},
            }[path]
            return await _json(send, 200, body)
        if method != "POST" or path != "/v1/chat/completions":
            return await _json(send, 404, {"error": {"message": "not found", "type": "x"}})
        raw = b""
        while True:
            msg = await receive()
            raw += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        self.stats.requests += 1
        req = orjson.loads(raw)
        n = int(req.get("max_completion_tokens") or req.get("max_tokens") or 16)
        last = req["messages"][-1].get("content") or ""
        last = last if isinstance(last, str) else orjson.dumps(last).decode()
        tokens = [self.rng.choice(self.vocab) for _ in range(n)]
        usage = {"prompt_tokens": 8, "completion_tokens": n, "total_tokens": 8 + n}
        rid = f"chatcmpl-synthetic-{self.stats.requests}"
        base = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()),
                "model": req.get("model", self.model)}
        if not req.get("stream"):
            await asyncio.sleep(self.ttft_s + self.itl_s * max(0, n - 1))
            return await _json(send, 200, {
                **base, "object": "chat.completion", "usage": usage,
                "choices": [{"index": 0, "finish_reason": "length",
                             "message": {"role": "assistant", "content": "".join(tokens)}}],
            })
        await self._stream(send, receive, base, tokens, usage, req, last)

    async def _stream(self, send, receive, base, tokens, usage, req, last) -> None:  # noqa: ANN001
        key = id(base)
        self.stats.started += 1
        self.stats.active.add(key)
        finished = False
        # A client that leaves mid-stream shows up as a failed send or an http.disconnect message.
        gone = asyncio.Event()

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()

        watcher = asyncio.create_task(watch())

        def chunk(delta: dict, finish: str | None = None) -> bytes:
            obj = {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            return b"data: " + orjson.dumps(obj) + b"\n\n"

        async def body(data: bytes) -> None:
            if gone.is_set():
                raise ConnectionError("client gone")
            await send({"type": "http.response.body", "body": data, "more_body": True})

        try:
            if "SLOWHEADERS" in last:
                await asyncio.sleep(self.slow_first_s)
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"text/event-stream")]})
            if "HANG" in last:
                await gone.wait()
                return
            await asyncio.sleep(self.slow_first_s if "SLOWFIRST" in last else self.ttft_s)
            await body(chunk({"role": "assistant", "content": ""}))
            for i, tok in enumerate(tokens):
                if i and self.itl_s:
                    await asyncio.sleep(self.itl_s)
                await body(chunk({"content": tok}))
                if i == 2 and "MALFORMED" in last:
                    await body(b'data: {"id": "broken", "choices": [\n\n')
            await body(chunk({}, "length"))
            if (req.get("stream_options") or {}).get("include_usage"):
                obj = {**base, "choices": [], "usage": usage}
                await body(b"data: " + orjson.dumps(obj) + b"\n\n")
            await body(b"data: [DONE]\n\n")
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            finished = True
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            watcher.cancel()
            self.stats.active.discard(key)
            if finished:
                self.stats.finished += 1
            else:
                self.stats.abandoned += 1


async def _json(send, status: int, body: dict) -> None:  # noqa: ANN001
    data = orjson.dumps(body)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": data})


def vocab_from_tokenizer(path: str) -> list[str]:
    """Every token of a HF tokenizer decoded on its own (special tokens left out)."""
    from pathlib import Path

    from tokenizers import Tokenizer

    file = Path(path) / "tokenizer.json" if Path(path).is_dir() else Path(path)
    tok = Tokenizer.from_file(str(file))
    special = set(tok.get_added_tokens_decoder())
    out = [tok.decode([i]) for i in range(tok.get_vocab_size()) if i not in special]
    return [t for t in out if t]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9000)
    p.add_argument("--ttft-ms", type=float, default=0.0)
    p.add_argument("--itl-ms", type=float, default=0.0)
    p.add_argument("--tokenizer", default=None, help="HF tokenizer folder: emit random vocab tokens")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    import uvicorn

    vocab = vocab_from_tokenizer(a.tokenizer) if a.tokenizer else None
    app = SyntheticUpstream(a.ttft_ms / 1000, a.itl_ms / 1000, vocab, a.seed)
    uvicorn.run(app, host=a.host, port=a.port, log_level="warning", access_log=False,
                timeout_graceful_shutdown=2)


if __name__ == "__main__":
    main()
