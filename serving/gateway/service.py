"""The gateway's request handling: admission, guardrail chains, the upstream call, the answer.

The upstream is injected (serving.gateway.upstream.UpstreamProvider), and so are the log store
and the admission counters, so the releases manager can switch blue/green upstreams atomically,
worker processes can share one set of limits (serving.gateway.dataplane) and tests can use a fake
upstream. Each request reads ``provider.current()`` once at its start and keeps that upstream to
its end: in-flight requests and streams finish on the old release after a switch.

Every admitted request (past parsing and the 429 check) becomes exactly one log row, whatever
happens next (blocked, upstream error, client gone, client stalled), written exactly once by
:meth:`GatewayService._finish`; a stream's response object (serving.gateway.relay.RelayResponse)
calls it on every way out, even when the client left before the body started.

Streams are relayed by serving.gateway.relay; hooks over large texts run in a small thread pool
so they never stall the event loop (serving.gateway.guardpool).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError

from ground.logstore import ActorRole, LogStore
from ground.protocol import ChatCompletionRequest, FeedbackRequest
from guardrails.base import InputChain, OutputChain
from guardrails.registry import build_hook
from serving.gateway.admission import Admission, LocalAdmission
from serving.gateway.config import GatewayConfig
from serving.gateway.exchange import Exchange, logged_choice, new_request_id
from serving.gateway.feedback import store_feedback
from serving.gateway.guardpool import GuardrailPool
from serving.gateway.metrics import Metrics
from serving.gateway.relay import RelayResponse, relay_stream
from serving.gateway.upstream import UpstreamProvider, route_request
from serving.gateway.wire import (
    FeedbackResponse,
    GatewayError,
    ModelCard,
    ModelList,
    check_limits,
    chunk_body,
    completion_body,
    parse_json_object,
    public_completion,
    sse,
    upstream_error_body,
    validation_error,
)

log = logging.getLogger(__name__)


def _texts_size(req: ChatCompletionRequest) -> int:
    return sum(len(t) for m in req.messages for t in m.texts())


class GatewayService:
    """The gateway's request handling, independent of FastAPI routing."""

    def __init__(
        self,
        config: GatewayConfig,
        upstream: UpstreamProvider,
        store: LogStore,
        admission: Admission | None = None,
    ) -> None:
        self.config = config
        self.provider = upstream
        self.store = store
        g = config.guardrails
        self.input_chain = InputChain(build_hook(h.name, h.params) for h in g.input)
        self.front_chain, self.during_chain = self.input_chain.split()
        self.output_chain = OutputChain(build_hook(h.name, h.params) for h in g.output)
        self.guards = GuardrailPool(g.pool_threads, g.inline_max_chars)
        self.metrics = Metrics()
        self.admission = admission or LocalAdmission(config)
        self.simulated_tenants = {t.name for t in config.tenants if t.simulated}
        self.session: aiohttp.ClientSession | None = None
        # With worker processes, a row may still be on its way to the writer when its feedback
        # arrives at the control plane: wait this long for that one row (never for the backlog).
        self.feedback_wait_s = 0.0

    @property
    def in_flight(self) -> int:
        return self.admission.in_flight()

    async def start(self) -> None:
        u = self.config.upstream
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=u.max_connections, ttl_dns_cache=300),
            timeout=aiohttp.ClientTimeout(
                total=None, connect=u.connect_timeout_s, sock_read=u.read_timeout_s
            ),
            auto_decompress=False,
            read_bufsize=1 << 20,  # the longest SSE line (one chunk) we accept from upstream
        )

    async def close_upstream(self) -> None:
        """Close the upstream connections and the guardrail pool, not the store (a second
        service over the same store, e.g. the review page's one-off relay)."""
        if self.session is not None:
            await self.session.close()
        self.guards.close()

    async def aclose(self) -> None:
        await self.close_upstream()
        self.store.close()  # flushes queued log rows

    # -- small endpoints ------------------------------------------------------------------------
    def models(self) -> ModelList:
        return ModelList(data=[ModelCard(id=m) for m in self.config.public_models])

    async def health(self) -> tuple[int, dict[str, Any]]:
        """(status, state); the app shows the state to the admin only (it names the release)."""
        up = self.provider.current()
        state: dict[str, Any] = {
            "status": "unavailable", "gateway": "ok", "in_flight": self.in_flight, "upstream": None,
        }
        if up is None:
            return 503, state
        state["upstream"] = {
            "release_id": up.release_id,
            "served_model": up.served_model,
            "tool_parser": up.tool_parser,
            "ok": False,
        }
        root = up.base_url.rstrip("/").removesuffix("/v1")
        try:
            async with self.session.get(
                root + "/health", timeout=aiohttp.ClientTimeout(total=2.0)
            ) as r:
                state["upstream"]["ok"] = r.status == 200
        except (aiohttp.ClientError, TimeoutError) as e:
            state["upstream"]["error"] = type(e).__name__
        state["status"] = "ok" if state["upstream"]["ok"] else "unavailable"
        return (200 if state["upstream"]["ok"] else 503), state

    def feedback(
        self, req: FeedbackRequest, tenant: str, *, actor: str | None = None,
        actor_role: ActorRole = "user",
    ) -> FeedbackResponse:
        """Store one feedback event (see serving.gateway.feedback.store_feedback)."""
        return store_feedback(
            self.store, req, tenant, actor=actor, actor_role=actor_role,
            simulated=tenant in self.simulated_tenants, wait_s=self.feedback_wait_s,
        )

    # -- chat -----------------------------------------------------------------------------------
    def parse_chat(self, body: bytes) -> ChatCompletionRequest:
        """The validated request, or a 4xx naming what is wrong (ground/protocol.py,
        serving/gateway/wire.py)."""
        try:
            req = ChatCompletionRequest.model_validate(parse_json_object(body))
        except ValidationError as e:
            raise validation_error(e) from None
        check_limits(req, self.config.limits)
        if req.logprobs and self.output_chain.hooks:
            # Token logprobs spell the answer token by token (top_logprobs the alternatives too):
            # a redacted or blocked answer could be read back from them.
            raise GatewayError(
                400,
                "Invalid 'logprobs': this gateway checks answers with output guardrails, and token "
                "logprobs would return the unchecked tokens; leave out 'logprobs' and 'top_logprobs'",
                param="logprobs",
                code="unsupported_with_output_guardrails",
            )
        if req.model not in self.config.public_models:
            raise GatewayError(
                404,
                f"model {req.model!r} does not exist; available: {self.config.public_models}",
                param="model",
                code="model_not_found",
            )
        return req

    def _admit(self, tenant: str) -> None:
        why = self.admission.admit(tenant)
        if why is not None:
            raise GatewayError(
                429,
                why,
                "rate_limit_error",
                code="too_many_requests",
                headers={"Retry-After": str(self.config.limits.retry_after_s)},
            )
        self.metrics.in_flight.set(self.in_flight)

    def _finish(self, ex: Exchange) -> None:
        """Release the admission slot, write the log row and observe metrics (exactly once)."""
        if ex.logged:
            return
        ex.logged = True
        self.admission.release(ex.tenant)
        now = time.perf_counter()
        m = self.metrics
        m.in_flight.set(self.in_flight)
        m.requests.labels(ex.tenant, str(ex.http_status)).inc()
        m.e2e.observe(now - ex.t0)
        m.guardrail.observe(ex.guardrail_s)
        m.overhead.observe(ex.own_s)
        if ex.ttft_s is not None:
            m.ttft.observe(ex.ttft_s)
        for v in ex.verdicts:
            m.verdicts.labels(v.hook, v.stage, v.action).inc()
        record = ex.record(now)
        try:
            self.store.log_exchange(record)
        except RuntimeError:  # store already closed: a stream cut off by shutdown's grace timeout
            log.error("log store closed; exchange %s (%s) not logged", ex.id, ex.status)

    def _upstream_failure(self, ex: Exchange, kind: str, message: str) -> GatewayError:
        self.metrics.upstream_errors.labels(kind).inc()
        ex.status, ex.http_status = "upstream_error", 503
        return GatewayError(
            503,
            message,
            "upstream_error",
            code=kind,
            headers={"Retry-After": str(self.config.limits.retry_after_s)},
        )

    async def chat(self, body: bytes, tenant: str, t0: float | None = None) -> Response:
        """Handle one chat completion request (body still raw bytes; ``t0``: when it arrived)."""
        t0 = time.perf_counter() if t0 is None else t0
        req = self.parse_chat(body)
        self._admit(tenant)
        ex = Exchange(new_request_id(), tenant, req, req.model, t0)
        streaming = False
        upstream_resp: aiohttp.ClientResponse | None = None
        call: asyncio.Task | None = None
        try:
            # Hooks that rewrite the prompt (PII redaction) and those before them: in front.
            if self.front_chain.hooks:
                ex.request, res = await self.guards.call(
                    _texts_size(req), self.front_chain.run, req
                )
                if ex.add_chain(res):
                    return self._refusal(ex)
            ex.upstream = route_request(self.provider.current(), tenant, ex.request.user, ex.id)
            if ex.upstream is None:
                raise self._upstream_failure(
                    ex, "no_release", "no live release: the model is not being served"
                )
            if ex.request.wants_tools() and ex.upstream.tool_parser is None:
                raise GatewayError(
                    400,
                    "tools are not enabled for the model being served: its chat template has no "
                    "tool-call format the gateway recognizes, so its release runs without a "
                    "tool-call parser (leave out 'tools', or send tool_choice 'none')",
                    param="tools",
                    code="tools_not_enabled",
                )
            payload = ex.request.upstream_payload()
            payload["model"] = ex.upstream.served_model
            if req.stream:
                # Always ask for usage so the log has it; the client sees it only if it asked.
                payload["stream_options"] = {
                    **(payload.get("stream_options") or {}),
                    "include_usage": True,
                }
            ex.own_s = time.perf_counter() - t0
            send = self._open_stream(ex, payload) if req.stream else self._complete(ex, payload)
            if not self.during_chain.hooks:
                result = await send
            else:
                # Look-only hooks run while the upstream call is on its way; nothing reaches the
                # client until they pass, and a block cancels the call (vLLM sees the disconnect).
                call = asyncio.ensure_future(send)
                await asyncio.sleep(0)  # let the call write its request before the hooks run
                t1 = time.perf_counter()
                _, res = await self.guards.call(
                    _texts_size(ex.request), self.during_chain.run, ex.request
                )
                ex.own_s += time.perf_counter() - t1
                if ex.add_chain(res):
                    call.cancel()
                    with contextlib.suppress(BaseException):
                        await call
                    ex.status, ex.http_status = "ok", 200  # whatever the cancelled call set
                    return self._refusal(ex)
                result = await call
            if isinstance(result, aiohttp.ClientResponse):
                upstream_resp = result
                streaming = True
                return RelayResponse(
                    relay_stream(
                        ex, upstream_resp, config=self.config, chain=self.output_chain,
                        metrics=self.metrics, finish=self._finish,
                    ),
                    lambda abort: self._end_stream(ex, upstream_resp, abort),
                    self.config.limits.write_timeout_s,
                    headers=ex.overhead_headers(),
                )
            return result
        except GatewayError as e:
            if ex.status == "ok":
                ex.status, ex.http_status = "client_error", e.status
            e.counted = True  # by _finish below
            e.headers.update(ex.overhead_headers())
            raise
        except Exception:
            ex.status, ex.http_status = "error", 500
            raise
        except BaseException:  # cancelled: the client went away
            ex.status, ex.http_status = "cancelled", 499
            raise
        finally:
            if not streaming:
                _discard(call)
                self._finish(ex)

    def _refusal(self, ex: Exchange) -> Response:
        ex.status, ex.finish_reason, ex.response = (
            "blocked",
            "content_filter",
            self.config.guardrails.refusal,
        )
        ex.usage = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
        ex.own_s = time.perf_counter() - ex.t0
        n = ex.request.n
        if not ex.request.stream:
            return JSONResponse(
                completion_body(ex.id, ex.public_model, ex.response, "content_filter", ex.usage, n),
                headers=ex.overhead_headers(),
            )
        with_usage = bool(ex.request.stream_options and ex.request.stream_options.include_usage)

        async def events() -> AsyncIterator[bytes]:
            for i in range(n):  # every choice is refused
                delta = {"role": "assistant", "content": ex.response}
                yield sse(chunk_body(ex.id, ex.public_model, delta, None, i))
                yield sse(chunk_body(ex.id, ex.public_model, {}, "content_filter", i))
            if with_usage:
                yield sse(
                    {
                        **chunk_body(ex.id, ex.public_model, {}, None),
                        "choices": [],
                        "usage": ex.usage,
                    }
                )
            yield b"data: [DONE]\n\n"

        return StreamingResponse(
            events(), media_type="text/event-stream", headers=ex.overhead_headers()
        )

    async def _send(self, ex: Exchange, payload: dict[str, Any]) -> aiohttp.ClientResponse:
        """POST the request upstream; a timeout or a connection error becomes a 503."""
        up = ex.upstream
        url = up.base_url.rstrip("/") + "/chat/completions"
        headers = {"content-type": "application/json"}
        if up.api_key:
            headers["authorization"] = f"Bearer {up.api_key}"
        t = time.perf_counter()
        data = orjson.dumps(payload)
        ex.own_s += time.perf_counter() - t
        try:
            return await self.session.post(url, data=data, headers=headers)
        except TimeoutError:
            raise self._upstream_failure(ex, "timeout", "the model server timed out") from None
        except aiohttp.ClientError as e:
            raise self._upstream_failure(
                ex, "unavailable", f"the model server is unavailable ({type(e).__name__})"
            ) from None
        except Exception as e:  # noqa: BLE001
            # A peer dying during connect can surface from below the client's exception types
            # (seen with another client library when vLLM was killed under load,
            # tests/serving/test_gateway_vllm.py). It is still "upstream down": 503.
            log.warning("upstream send failed outside the client's errors: %r", e)
            raise self._upstream_failure(
                ex, "unavailable", f"the model server is unavailable ({type(e).__name__})"
            ) from None

    async def _complete(self, ex: Exchange, payload: dict[str, Any]) -> Response:
        r = await self._send(ex, payload)
        try:
            try:
                content = await r.read()
            except (aiohttp.ClientError, TimeoutError) as e:
                kind = "timeout" if isinstance(e, TimeoutError) else "unavailable"
                raise self._upstream_failure(
                    ex, kind, f"the model server failed ({type(e).__name__})"
                ) from None
        finally:
            r.release()
        if r.status != 200:
            return self._upstream_status(ex, r.status, content)
        t = time.perf_counter()
        try:
            data = orjson.loads(content)
            choices = data["choices"]
            texts = [(c.get("message") or {}).get("content") or "" for c in choices]
            if not texts:
                raise IndexError("no choices")
        except (orjson.JSONDecodeError, KeyError, IndexError, TypeError, AttributeError):
            raise self._upstream_failure(
                ex, "malformed", "the model server sent a malformed answer"
            ) from None
        data["id"], data["model"] = ex.id, ex.public_model
        ex.usage = data.get("usage")
        logged = []
        data = public_completion(data, keep_logprobs=bool(ex.request.logprobs))
        for choice, text in zip(data["choices"], texts, strict=True):  # n choices: each is checked
            message = choice["message"]
            if self.output_chain.hooks and await self._guard_message(ex, message, text):
                ex.status = "blocked"
                message.clear()
                message.update(role="assistant", content=self.config.guardrails.refusal)
                choice["finish_reason"] = "content_filter"
            text = message.get("content") or ""
            logged.append(logged_choice(choice.get("index", len(logged)), text,
                                         choice.get("finish_reason"), message.get("tool_calls")))
        ex.response, ex.finish_reason = logged[0]["content"], logged[0]["finish_reason"]
        if len(logged) > 1 or logged[0].get("tool_calls"):
            ex.choices = logged
        out = orjson.dumps(data)
        ex.own_s += time.perf_counter() - t
        return Response(out, media_type="application/json", headers=ex.overhead_headers())

    async def _guard_message(self, ex: Exchange, message: dict[str, Any], text: str) -> bool:
        """Run the output hooks over every text of a whole answer's message (content, refusal,
        each tool call's arguments), rewriting it in place; True when a hook blocked."""
        texts: list[tuple[dict[str, Any], str]] = [(message, "content")]
        if isinstance(message.get("refusal"), str):
            texts.append((message, "refusal"))
        for call in message.get("tool_calls") or []:
            if isinstance(call.get("function"), dict) and isinstance(call["function"].get("arguments"), str):
                texts.append((call["function"], "arguments"))
        for owner, key in texts:
            old = text if owner is message and key == "content" else owner[key]
            g0 = time.perf_counter()
            new, verdicts = await self.guards.call(len(old), self.output_chain.run, old)
            ex.guardrail_s += time.perf_counter() - g0
            ex.verdicts += verdicts
            if any(v.action == "block" for v in verdicts):
                return True
            if new != old:
                owner[key] = new
        return False

    def _upstream_status(self, ex: Exchange, status: int, content: bytes) -> Response:
        """Pass upstream 4xx through in OpenAI's error shape; 5xx becomes 503."""
        if 400 <= status < 500:
            ex.status, ex.http_status = "client_error", status
            return JSONResponse(upstream_error_body(content, status), status_code=status)
        raise self._upstream_failure(
            ex, f"http_{status}", f"the model server failed (HTTP {status})"
        )

    async def _open_stream(
        self, ex: Exchange, payload: dict[str, Any]
    ) -> aiohttp.ClientResponse | Response:
        """Connect before answering, so a down upstream is a 503, not a broken 200 stream."""
        r = await self._send(ex, payload)
        if r.status != 200:
            try:
                content = await r.read()
            except (aiohttp.ClientError, TimeoutError):
                content = b""
            finally:
                r.release()
            return self._upstream_status(ex, r.status, content)
        return r

    async def _end_stream(
        self, ex: Exchange, r: aiohttp.ClientResponse, abort: str | None
    ) -> None:
        """Every way a stream ends: close upstream (an unfinished read closes the connection,
        so vLLM aborts the request) and log it, once."""
        if not ex.logged and not ex.stream_done and ex.status in ("ok", "blocked"):
            # not finished by the relay: the client left (or stopped reading)
            ex.status, ex.http_status = "cancelled", 499
            self.metrics.client_aborts.labels(abort or "disconnect").inc()
        r.close()
        self._finish(ex)


def _discard(call: asyncio.Task | None) -> None:
    """Cancel an upstream call we no longer want; close its response if it already came."""
    if call is None:
        return
    if not call.done():
        call.cancel()
    elif not call.cancelled() and call.exception() is None:
        result = call.result()
        if isinstance(result, aiohttp.ClientResponse):
            result.close()
