"""The streaming relay: an upstream SSE stream through the output guardrails to the client.

Where the time goes (measured with py-spy; docs/GATEWAY.md): the per-chunk relay, not the hooks.
So the relay reads upstream with aiohttp (C parser), parses each chunk once (the log needs its
text) and forwards the upstream's own bytes, with only ``id`` and ``model`` swapped, unless an
output hook changed the text or the chunk has fields that are not OpenAI's (then it is
re-encoded without them: serving.gateway.wire.public_chunk); output hooks run on windows of text
(guardrails.base.StreamGuard).

:class:`RelayResponse` ends every stream the same way (upstream closed, log row written, slot
freed), even when the client left before the body started or stopped reading.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import orjson
from fastapi.responses import StreamingResponse

from guardrails.base import OutputChain, StreamGuard
from serving.gateway.config import GatewayConfig, GuardrailsConfig
from serving.gateway.exchange import GUARDRAIL_HEADER, OVERHEAD_HEADER, Exchange, logged_choice
from serving.gateway.metrics import Metrics
from serving.gateway.wire import (
    DELTA_KEYS,
    GUARDED_DELTA_KEYS,
    error_event,
    public_chunk,
    sse,
    upstream_error_body,
)

KEEPALIVE = b": keep-alive\n\n"
_MAX_LINE = 1 << 20  # the longest SSE line (one chunk) accepted from upstream


class RelayResponse(StreamingResponse):
    """A streamed answer that always cleans up, and cuts clients that stop reading.

    ``cleanup`` (close the upstream response, write the log row, free the slot) runs however the
    response ends: finished, client gone, client stalled, or the client gone before the body
    started (then the body generator never runs, so its own ``finally`` cannot do it). A send
    that the client does not take within ``write_timeout_s`` ends the stream; the connection is
    then aborted (not closed gracefully: a graceful close would wait for the client to read).
    """

    def __init__(
        self,
        body: AsyncIterator[bytes],
        cleanup: Callable[[str | None], Awaitable[None]],
        write_timeout_s: float,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(body, media_type="text/event-stream", headers=headers)
        self.cleanup = cleanup
        self.write_timeout_s = write_timeout_s

    async def __call__(self, scope, receive, send) -> None:  # noqa: ANN001
        # One watchdog per stream (not a timer per send: sends are per chunk): it cancels the
        # stream when a send has waited write_timeout_s for the client to take data.
        loop = asyncio.get_running_loop()
        timeout = self.write_timeout_s
        pending_since: list[float | None] = [None]
        task = asyncio.current_task()
        stalled = False

        async def tracked_send(message: dict) -> None:
            pending_since[0] = loop.time()
            await send(message)
            pending_since[0] = None

        def watch() -> None:
            nonlocal handle, stalled
            since = pending_since[0]
            if since is not None and loop.time() - since >= timeout:
                stalled = True
                task.cancel()
                return
            handle = loop.call_later(timeout / 2, watch)

        handle = loop.call_later(timeout / 2, watch)
        abort = None
        try:
            await super().__call__(scope, receive, tracked_send)
        except asyncio.CancelledError:
            if not stalled:
                abort = "disconnect"
                raise
            task.uncancel()
            abort = "stalled"
            transport = (scope.get("extensions") or {}).get("alignloop.transport")
            if transport is not None:
                transport.abort()
        except BaseException:
            abort = "disconnect"
            raise
        finally:
            handle.cancel()
            with contextlib.suppress(Exception):
                await self.body_iterator.aclose()
            await self.cleanup(abort)


async def relay_stream(
    ex: Exchange,
    r: aiohttp.ClientResponse,
    *,
    config: GatewayConfig,
    chain: OutputChain,
    metrics: Metrics,
    finish: Callable[[Exchange], None],
) -> AsyncIterator[bytes]:
    """Relay the upstream's SSE stream through the output guard; rewrite ids; log at the end.

    Reads whatever bytes upstream has (``readany``), handles every complete event in them and
    sends the results as one write: under load several chunks of a stream often arrive
    together. Chunks whose text no hook changed are forwarded as the upstream's own bytes
    with only the ``id`` and ``model`` values swapped (a bytes replace of ``"id":<value>``;
    that key/value pair cannot occur inside a JSON string, where quotes are escaped); the
    rest, and chunks with fields that are not OpenAI's, are re-encoded. ``chain``: the output
    hooks; ``finish`` writes the exchange's log row once the stream is done.
    """
    st = _StreamState(chain, config.guardrails)
    # Only OpenAI's chunk fields go on (serving/gateway/wire.py); token logprobs only when asked
    # for, which parse_chat allows only without output hooks.
    keep_logprobs = bool(ex.request.logprobs)
    delta_keys = GUARDED_DELTA_KEYS if chain.hooks else DELTA_KEYS
    client_usage = bool(ex.request.stream_options and ex.request.stream_options.include_usage)
    swap = _IdSwap(ex)
    reader = r.content
    waiting: asyncio.Future | None = None
    keepalive_s = config.upstream.keepalive_s
    buf = b""
    ended = False  # [DONE], an error event, or a malformed chunk: stop reading
    try:
        while not ended:
            if ex.ttft_s is None:
                # Until the first token, say "still here" every keepalive_s (SSE comment).
                waiting = waiting or asyncio.ensure_future(reader.readany())
                finished, _ = await asyncio.wait((waiting,), timeout=keepalive_s)
                if not finished:
                    yield KEEPALIVE
                    continue
                fut, waiting = waiting, None
                data = fut.result()
            else:
                data = await reader.readany()
            if not data:
                break  # upstream closed
            t = time.perf_counter()
            lines = (buf + data).split(b"\n")
            buf = lines.pop()  # an incomplete line waits for the next read
            if len(buf) > _MAX_LINE:
                lines, buf = [buf], b""  # not an SSE stream we can parse
            out: list[bytes] = []
            for line in lines:
                if not line.startswith(b"data:"):
                    continue  # blank separators, upstream comments
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    ex.stream_done = ended = True
                    break
                try:
                    obj = orjson.loads(payload)
                    if not isinstance(obj, dict):
                        raise TypeError(type(obj).__name__)
                    if "error" in obj and not obj.get("choices"):
                        public = obj
                    else:  # vLLM's chunks carry token_ids: null: re-encoded without it
                        public = public_chunk(obj, keep_logprobs, delta_keys)
                except (orjson.JSONDecodeError, TypeError):
                    ex.status, ex.http_status, ex.stream_done = "upstream_error", 502, True
                    metrics.upstream_errors.labels("malformed_chunk").inc()
                    out.append(
                        error_event("the model server sent a malformed chunk", "malformed_chunk")
                    )
                    ended = True
                    break
                if "error" in obj and not obj.get("choices"):
                    ex.status, ex.http_status, ex.stream_done = "upstream_error", 503, True
                    metrics.upstream_errors.labels("stream_error").inc()
                    out.append(sse(upstream_error_body(payload, 503)))  # its four fields only
                    ended = True
                    break
                reshaped, obj = public is not obj, public
                choices = obj.get("choices") or []
                if not choices:  # the usage chunk
                    ex.usage = obj.get("usage") or ex.usage
                    if client_usage:
                        out.append(_with_ids(obj, ex) if reshaped else swap.forward(payload, obj))
                    continue
                # With n > 1 the choices arrive interleaved by index; each has its own guard.
                kept, changed = [], False
                for choice in choices:
                    c = st.feed(ex, choice)
                    if c is not choice:
                        changed = True
                    if c is not None:
                        kept.append(c)
                if not kept:
                    continue  # everything held back (or stopped): nothing to send yet
                if not changed and not reshaped:
                    out.append(swap.forward(payload, obj))
                else:
                    obj["choices"] = kept
                    out.append(_with_ids(obj, ex))
            if ex.stream_done and ex.status in ("ok", "blocked"):
                # Log before the client sees the end, so feedback sent right after finds it.
                _close_relay(ex, st, finish)
                out.append(
                    f": alignloop {OVERHEAD_HEADER}={ex.own_s * 1000:.3f} "
                    f"{GUARDRAIL_HEADER}={ex.guardrail_s * 1000:.3f}\n\n".encode()
                )
                out.append(b"data: [DONE]\n\n")
            ex.own_s += time.perf_counter() - t
            if out:
                yield b"".join(out)
        if not ended and ex.status in ("ok", "blocked"):  # upstream closed without [DONE]
            raise aiohttp.ClientPayloadError("upstream stream ended early")
    except (aiohttp.ClientError, TimeoutError) as e:
        kind = "timeout" if isinstance(e, TimeoutError) else "stream_broken"
        metrics.upstream_errors.labels(kind).inc()
        ex.status, ex.http_status, ex.stream_done = "upstream_error", 503, True
        yield error_event(f"the model server failed mid-stream ({type(e).__name__})", kind)
    finally:
        if waiting is not None:
            waiting.cancel()
        _close_relay(ex, st, finish)


def _close_relay(ex: Exchange, st: _StreamState, finish: Callable[[Exchange], None]) -> None:
    """Put what the stream sent into the exchange (once) and, if it ended, log it."""
    if ex.logged or ex.relay_closed:
        return
    ex.relay_closed = True
    logged = st.logged()
    if logged:
        ex.response, ex.finish_reason = logged[0]["content"], logged[0]["finish_reason"]
        if len(logged) > 1 or logged[0].get("tool_calls"):
            ex.choices = logged
    for g in st.guards.values():
        ex.verdicts += g.merged_verdicts()
    if ex.stream_done:
        finish(ex)
    # else the client left: RelayResponse's cleanup logs it as the client's abort


class _StreamState:
    """Per-choice state of a relayed stream: its guard, the text sent, tool-call deltas."""

    def __init__(self, chain: OutputChain, g: GuardrailsConfig) -> None:
        self.chain, self.window_chars, self.window_s = chain, g.stream_window_chars, g.stream_window_ms / 1000
        self.guards: dict[int, StreamGuard] = {}
        self.parts: dict[int, list[str]] = {}
        self.finish: dict[int, str] = {}
        self.tool_deltas: dict[int, list[dict[str, Any]]] = {}
        self.tool_calls: dict[int, list[dict[str, Any]]] = {}  # guarded whole calls, as sent
        self.stopped: set[int] = set()  # a hook blocked: forward nothing more of this choice
        self.seen: list[int] = []

    def feed(self, ex: Exchange, choice: dict[str, Any]) -> dict[str, Any] | None:
        """The choice to send on: ``choice`` itself when unchanged, a rewritten one, or None to
        hold it back."""
        i = choice.get("index", 0)
        if i in self.stopped:
            return None
        if i not in self.parts:
            self.parts[i] = []
            self.seen.append(i)
        delta = choice.get("delta") or {}
        finish = choice.get("finish_reason")
        content = delta.get("content")
        if delta.get("tool_calls"):
            self.tool_deltas.setdefault(i, []).extend(delta["tool_calls"])
        if not self.chain.hooks:
            text = content or ""
        else:
            if "tool_calls" in delta:
                # Arguments are held until the choice ends and checked whole (a hook must see
                # a value in one piece), then sent as one delta of whole calls.
                delta = {k: v for k, v in delta.items() if k != "tool_calls"}
            if finish is not None and self.tool_deltas.get(i):
                if self._guard_tool_calls(ex, i):
                    return self._stop(ex, i)
                delta = {**delta, "tool_calls": self.tool_calls[i]}
            guard = self.guards.get(i)
            if guard is None:
                guard = self.guards[i] = StreamGuard(self.chain, self.window_chars, self.window_s)
            g0 = time.perf_counter()
            text = guard.feed(content) if content else ""
            if finish is not None:
                text += guard.finish()
            ex.guardrail_s += time.perf_counter() - g0
            if guard.blocked:
                return self._stop(ex, i)
        if text:
            self.parts[i].append(text)
            if ex.ttft_s is None:
                ex.ttft_s = time.perf_counter() - ex.t0
        elif finish is None and set(delta) <= {"content"} and choice.get("logprobs") is None:
            return None  # everything held back, or nothing left to send: no chunk yet
        if finish is not None:
            self.finish[i] = finish
        if text == (content or "") and delta is choice.get("delta"):
            return choice
        if text or content is not None:
            delta["content"] = text
        return {**choice, "delta": delta}

    def _stop(self, ex: Exchange, i: int) -> dict[str, Any]:
        """A hook blocked choice ``i``: end it with ``content_filter`` and send nothing more."""
        self.stopped.add(i)
        ex.status = "blocked"
        self.finish[i] = "content_filter"
        self.tool_calls.pop(i, None)
        return {"index": i, "delta": {}, "finish_reason": "content_filter", "logprobs": None}

    def _guard_tool_calls(self, ex: Exchange, i: int) -> bool:
        """Check choice ``i``'s whole tool calls (their arguments) with the output hooks,
        keeping the rewritten calls in ``tool_calls``; True when a hook blocked."""
        calls = _merge_tool_deltas(self.tool_deltas[i]) or []
        g0 = time.perf_counter()
        try:
            for call in calls:
                args, verdicts = self.chain.run(call["function"]["arguments"])
                ex.verdicts += verdicts
                if any(v.action == "block" for v in verdicts):
                    return True
                call["function"]["arguments"] = args
        finally:
            ex.guardrail_s += time.perf_counter() - g0
        self.tool_calls[i] = [{"index": k, **call} for k, call in enumerate(calls)]
        return False

    def logged(self) -> list[dict[str, Any]]:
        return [
            logged_choice(
                i, "".join(self.parts[i]), self.finish.get(i),
                [{k: v for k, v in c.items() if k != "index"} for c in self.tool_calls[i]]
                if i in self.tool_calls else
                None if self.chain.hooks else _merge_tool_deltas(self.tool_deltas.get(i, [])),
            )
            for i in sorted(self.seen)
        ]


def _merge_tool_deltas(deltas: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    """Streamed tool-call deltas (by ``index``) as whole tool calls: id, name, arguments."""
    calls: dict[int, dict[str, Any]] = {}
    for d in deltas:
        call = calls.setdefault(d.get("index", 0), {"id": None, "type": "function",
                                                    "function": {"name": "", "arguments": ""}})
        call["id"] = d.get("id") or call["id"]
        fn = d.get("function") or {}
        call["function"]["name"] += fn.get("name") or ""
        call["function"]["arguments"] += fn.get("arguments") or ""
    return [calls[k] for k in sorted(calls)] or None


def _with_ids(obj: dict[str, Any], ex: Exchange) -> bytes:
    """A chunk re-encoded with our ``id`` and public model name."""
    obj["id"], obj["model"] = ex.id, ex.public_model
    return sse(obj)


class _IdSwap:
    """Forwards an upstream chunk with our ``id`` and public model name in place of upstream's."""

    def __init__(self, ex: Exchange) -> None:
        self.ex = ex
        self.up_id: Any = None
        self.pairs: list[tuple[bytes, bytes]] = []

    def forward(self, data: bytes, obj: dict[str, Any]) -> bytes:
        ex = self.ex
        if obj.get("id") != self.up_id or not self.pairs:
            self.up_id = obj.get("id")
            self.pairs = [
                (b'"id":' + orjson.dumps(self.up_id), b'"id":' + orjson.dumps(ex.id)),
                (
                    b'"model":' + orjson.dumps(obj.get("model")),
                    b'"model":' + orjson.dumps(ex.public_model),
                ),
            ]
        out = data
        for old, new in self.pairs:
            if out.count(old) != 1:  # not the compact form we expect: re-encode instead
                obj["id"], obj["model"] = ex.id, ex.public_model
                return sse(obj)
            out = out.replace(old, new, 1)
        return b"data: " + out + b"\n\n"
