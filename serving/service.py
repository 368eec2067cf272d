"""Gateway logic: admission (backpressure), guardrail chains, the upstream call, logging, metrics.

The upstream is injected (:class:`UpstreamProvider`), and so is the log store, so the releases
helper can switch blue/green upstreams atomically and tests can use a fake upstream. Each request
reads ``provider.current()`` once at its start and keeps that upstream to its end: in-flight
requests and streams finish on the old release after a switch.

Every admitted request (past parsing and the 429 check) becomes exactly one log row, whatever
happens next (blocked, upstream error, client gone), written in a ``finally``.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx
import orjson
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from pydantic import ValidationError

from guardrails.base import InputChain, OutputChain, StreamGuard, Verdict, build_hook
from serving.gateway_config import GatewayConfig
from serving.logstore import ActorRole, ExchangeRecord, LogStore
from serving.protocol import (
    ChatCompletionRequest,
    FeedbackRequest,
    FeedbackResponse,
    GatewayError,
    ModelCard,
    ModelList,
    chunk_body,
    completion_body,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Upstream:
    """One live vLLM release the gateway forwards to."""

    base_url: str  # e.g. http://127.0.0.1:PORT/v1
    release_id: str
    served_model: str  # the model name vLLM answers to


class UpstreamProvider(Protocol):
    def current(self) -> Upstream | None: ...


class StaticUpstream:
    """A provider holding one upstream (tests, single-release setups); ``set`` swaps it atomically."""

    def __init__(self, upstream: Upstream | None = None) -> None:
        self._upstream = upstream

    def current(self) -> Upstream | None:
        return self._upstream

    def set(self, upstream: Upstream | None) -> None:
        self._upstream = upstream


class Metrics:
    """Prometheus metrics in a registry of their own (several apps can live in one process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "gateway_requests",
            "Chat requests by tenant and HTTP status",
            ["tenant", "status"],
            registry=r,
        )
        self.ttft = Histogram(
            "gateway_ttft_seconds",
            "Time to first content sent (streams)",
            registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.e2e = Histogram(
            "gateway_e2e_seconds",
            "End-to-end request latency",
            registry=r,
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
        )
        self.guardrail = Histogram(
            "gateway_guardrail_seconds",
            "Guardrail chain time per request",
            registry=r,
            buckets=(0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1),
        )
        self.verdicts = Counter(
            "gateway_guardrail_verdicts",
            "Guardrail verdicts",
            ["hook", "stage", "action"],
            registry=r,
        )
        self.upstream_errors = Counter(
            "gateway_upstream_errors", "Upstream failures by kind", ["kind"], registry=r
        )
        self.in_flight = Gauge("gateway_in_flight", "Chat requests in flight", registry=r)


def new_request_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex


@dataclass
class Exchange:
    """Mutable state of one admitted request, turned into its log row at the end."""

    id: str
    tenant: str
    request: ChatCompletionRequest
    public_model: str
    t0: float
    upstream: Upstream | None = None
    verdicts: list[Verdict] = field(default_factory=list)
    guardrail_s: float = 0.0
    response: str = ""
    finish_reason: str | None = None
    usage: dict[str, int] | None = None
    ttft_s: float | None = None
    status: str = "ok"
    http_status: int = 200
    logged: bool = False


def _sse(obj: Any) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


class GatewayService:
    """The gateway's request handling, independent of FastAPI routing."""

    def __init__(self, config: GatewayConfig, upstream: UpstreamProvider, store: LogStore) -> None:
        self.config = config
        self.provider = upstream
        self.store = store
        g = config.guardrails
        self.input_chain = InputChain(build_hook(h.name, h.params) for h in g.input)
        self.output_chain = OutputChain(build_hook(h.name, h.params) for h in g.output)
        self.metrics = Metrics()
        self.max_in_flight = {t.name: t.max_in_flight for t in config.tenants}
        self.in_flight = 0
        self.tenant_in_flight: dict[str, int] = {}
        self.client: httpx.AsyncClient | None = None

    async def start(self) -> None:
        u = self.config.upstream
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(
                u.read_timeout_s, connect=u.connect_timeout_s, pool=u.connect_timeout_s
            ),
            limits=httpx.Limits(
                max_connections=u.max_connections, max_keepalive_connections=u.max_connections
            ),
        )

    async def aclose(self) -> None:
        if self.client is not None:
            await self.client.aclose()
        self.store.close()  # flushes queued log rows

    # -- small endpoints ------------------------------------------------------------------------
    def models(self) -> ModelList:
        return ModelList(data=[ModelCard(id=m) for m in self.config.public_models])

    async def health(self) -> tuple[int, dict[str, Any]]:
        up = self.provider.current()
        state: dict[str, Any] = {"gateway": "ok", "in_flight": self.in_flight, "upstream": None}
        if up is None:
            return 503, state
        state["upstream"] = {
            "release_id": up.release_id,
            "served_model": up.served_model,
            "ok": False,
        }
        root = up.base_url.rstrip("/").removesuffix("/v1")
        try:
            r = await self.client.get(root + "/health", timeout=2.0)
            state["upstream"]["ok"] = r.status_code == 200
        except httpx.HTTPError as e:
            state["upstream"]["error"] = type(e).__name__
        return (200 if state["upstream"]["ok"] else 503), state

    def feedback(
        self, req: FeedbackRequest, tenant: str, *, actor: str | None = None,
        actor_role: ActorRole = "user",
    ) -> FeedbackResponse:
        """Store one feedback event; 404 unless every referenced request id is this tenant's.

        ``actor``/``actor_role`` say who gave it as the server knows it (the API's caller, or a
        reviewer signed in to the review page); they are never read from the request body.
        """
        if self.store.get_exchange(req.request_id, tenant=tenant) is None:
            raise GatewayError(
                404, f"no request with id {req.request_id!r}", param="request_id", code="not_found"
            )
        other = req.preference.other_request_id if req.preference else None
        if other is not None and self.store.get_exchange(other, tenant=tenant) is None:
            raise GatewayError(
                404,
                f"no request with id {other!r}",
                param="preference.other_request_id",
                code="not_found",
            )
        kind, payload = req.kind_and_payload()
        fid, created = self.store.add_feedback(
            req.request_id, tenant, kind, payload, req.comment, actor=actor, actor_role=actor_role
        )
        return FeedbackResponse(id=fid, created=created)

    # -- chat -----------------------------------------------------------------------------------
    def parse_chat(self, body: bytes) -> ChatCompletionRequest:
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError as e:
            raise GatewayError(400, f"request body is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise GatewayError(400, "request body must be a JSON object")
        try:
            req = ChatCompletionRequest.model_validate(data)
        except ValidationError as e:
            err = e.errors()[0]
            loc = ".".join(str(p) for p in err["loc"])
            raise GatewayError(
                400, f"{loc}: {err['msg']}", param=loc, code="invalid_value"
            ) from None
        if req.model not in self.config.public_models:
            raise GatewayError(
                404,
                f"model {req.model!r} does not exist; available: {self.config.public_models}",
                param="model",
                code="model_not_found",
            )
        return req

    def _admit(self, tenant: str) -> None:
        retry = {"Retry-After": str(self.config.limits.retry_after_s)}
        if self.in_flight >= self.config.limits.max_in_flight:
            raise GatewayError(
                429,
                "gateway is at capacity; retry later",
                "rate_limit_error",
                code="too_many_requests",
                headers=retry,
            )
        if self.tenant_in_flight.get(tenant, 0) >= self.max_in_flight.get(tenant, 1 << 30):
            raise GatewayError(
                429,
                f"tenant {tenant!r} has too many requests in flight; retry later",
                "rate_limit_error",
                code="too_many_requests",
                headers=retry,
            )
        self.in_flight += 1
        self.tenant_in_flight[tenant] = self.tenant_in_flight.get(tenant, 0) + 1
        self.metrics.in_flight.set(self.in_flight)

    def _release(self, tenant: str) -> None:
        self.in_flight -= 1
        self.tenant_in_flight[tenant] -= 1
        self.metrics.in_flight.set(self.in_flight)

    def _finish(self, ex: Exchange) -> None:
        """Release the admission slot, write the log row and observe metrics (exactly once)."""
        if ex.logged:
            return
        ex.logged = True
        self._release(ex.tenant)
        now = time.perf_counter()
        m = self.metrics
        m.requests.labels(ex.tenant, str(ex.http_status)).inc()
        m.e2e.observe(now - ex.t0)
        m.guardrail.observe(ex.guardrail_s)
        if ex.ttft_s is not None:
            m.ttft.observe(ex.ttft_s)
        for v in ex.verdicts:
            m.verdicts.labels(v.hook, v.stage, v.action).inc()
        record = ExchangeRecord(
            id=ex.id,
            tenant=ex.tenant,
            messages=[msg.model_dump(exclude_none=True) for msg in ex.request.messages],
            params=ex.request.params(),
            response=ex.response,
            finish_reason=ex.finish_reason,
            usage=ex.usage,
            ttft_ms=None if ex.ttft_s is None else ex.ttft_s * 1000,
            latency_ms=(now - ex.t0) * 1000,
            guardrail_ms=ex.guardrail_s * 1000,
            verdicts=[v.as_dict() for v in ex.verdicts],
            status=ex.status,
            http_status=ex.http_status,
            stream=ex.request.stream,
            release=ex.upstream.release_id if ex.upstream else None,
            model=ex.upstream.served_model if ex.upstream else None,
        )
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

    async def chat(self, body: bytes, tenant: str) -> Response:
        """Handle one chat completion request (body still raw bytes)."""
        req = self.parse_chat(body)
        self._admit(tenant)
        ex = Exchange(new_request_id(), tenant, req, req.model, time.perf_counter())
        streaming = False
        try:
            ex.request, res = self.input_chain.run(req)
            ex.verdicts, ex.guardrail_s = list(res.verdicts), res.seconds
            if res.blocked:
                return self._refusal(ex)
            ex.upstream = self.provider.current()
            if ex.upstream is None:
                raise self._upstream_failure(
                    ex, "no_release", "no live release: the model is not being served"
                )
            payload = ex.request.model_dump(exclude_unset=True, exclude_none=False)
            payload["model"] = ex.upstream.served_model
            if req.stream:
                # Always ask for usage so the log has it; the client sees it only if it asked.
                payload["stream_options"] = {
                    **(payload.get("stream_options") or {}),
                    "include_usage": True,
                }
                resp = await self._open_stream(ex, payload)
                # the relay logs a stream when it ends; an upstream 4xx is logged below
                streaming = isinstance(resp, StreamingResponse)
                return resp
            return await self._complete(ex, payload)
        except GatewayError as e:
            if ex.status == "ok":
                ex.status, ex.http_status = "client_error", e.status
            e.counted = True  # by _finish below
            raise
        except Exception:
            ex.status, ex.http_status = "error", 500
            raise
        except BaseException:  # cancelled: the client went away
            ex.status, ex.http_status = "cancelled", 499
            raise
        finally:
            if not streaming:
                self._finish(ex)

    def _refusal(self, ex: Exchange) -> Response:
        ex.status, ex.finish_reason, ex.response = (
            "blocked",
            "content_filter",
            self.config.guardrails.refusal,
        )
        ex.usage = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
        if not ex.request.stream:
            return JSONResponse(
                completion_body(ex.id, ex.public_model, ex.response, "content_filter", ex.usage)
            )
        with_usage = bool(ex.request.stream_options and ex.request.stream_options.include_usage)

        async def events() -> AsyncIterator[bytes]:
            yield _sse(
                chunk_body(
                    ex.id, ex.public_model, {"role": "assistant", "content": ex.response}, None
                )
            )
            yield _sse(chunk_body(ex.id, ex.public_model, {}, "content_filter"))
            if with_usage:
                yield _sse(
                    {
                        **chunk_body(ex.id, ex.public_model, {}, None),
                        "choices": [],
                        "usage": ex.usage,
                    }
                )
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    async def _send(self, ex: Exchange, payload: dict[str, Any], stream: bool) -> httpx.Response:
        """POST the request upstream; a timeout or a connection error becomes a 503."""
        url = ex.upstream.base_url.rstrip("/") + "/chat/completions"
        req = self.client.build_request(
            "POST", url, content=orjson.dumps(payload), headers={"content-type": "application/json"}
        )
        try:
            return await self.client.send(req, stream=stream)
        except httpx.TimeoutException:
            raise self._upstream_failure(ex, "timeout", "the model server timed out") from None
        except httpx.HTTPError as e:
            raise self._upstream_failure(
                ex, "unavailable", f"the model server is unavailable ({type(e).__name__})"
            ) from None
        except Exception as e:  # noqa: BLE001
            # A peer dying during connect can surface from below httpx's exception types:
            # anyio raised AttributeError ('NoneType' has no 'getpeername') when vLLM was killed
            # under load (tests/serving/test_gateway_vllm.py). It is still "upstream down": 503.
            log.warning("upstream send failed outside httpx's errors: %r", e)
            raise self._upstream_failure(
                ex, "unavailable", f"the model server is unavailable ({type(e).__name__})"
            ) from None

    async def _complete(self, ex: Exchange, payload: dict[str, Any]) -> Response:
        r = await self._send(ex, payload, stream=False)
        if r.status_code != 200:
            return self._upstream_status(ex, r.status_code, r.content)
        data = orjson.loads(r.content)
        data["id"], data["model"] = ex.id, ex.public_model
        ex.usage = data.get("usage")
        choice = data["choices"][0]
        text = choice.get("message", {}).get("content") or ""
        t0 = time.perf_counter()
        new_text, verdicts = self.output_chain.run(text)
        ex.guardrail_s += time.perf_counter() - t0
        ex.verdicts += verdicts
        if any(v.action == "block" for v in verdicts):
            ex.status, new_text = "blocked", self.config.guardrails.refusal
            choice["finish_reason"] = "content_filter"
        if new_text != text:
            choice["message"]["content"] = new_text
        ex.response, ex.finish_reason = new_text, choice.get("finish_reason")
        return Response(orjson.dumps(data), media_type="application/json")

    def _upstream_status(self, ex: Exchange, status: int, content: bytes) -> Response:
        """Pass upstream 4xx through (vLLM's errors are OpenAI-shaped); 5xx becomes 503."""
        if 400 <= status < 500:
            ex.status, ex.http_status = "client_error", status
            return Response(content, status_code=status, media_type="application/json")
        raise self._upstream_failure(
            ex, f"http_{status}", f"the model server failed (HTTP {status})"
        )

    async def _open_stream(self, ex: Exchange, payload: dict[str, Any]) -> Response:
        """Connect before answering, so a down upstream is a 503, not a broken 200 stream."""
        r = await self._send(ex, payload, stream=True)
        if r.status_code != 200:
            try:
                content = await r.aread()
            except httpx.HTTPError:
                content = b""
            finally:
                await r.aclose()
            return self._upstream_status(ex, r.status_code, content)
        return StreamingResponse(self._relay(ex, r), media_type="text/event-stream")

    async def _relay(self, ex: Exchange, r: httpx.Response) -> AsyncIterator[bytes]:
        """Relay vLLM's SSE stream through the output guard; rewrite ids; log at the end."""
        guard = StreamGuard(self.output_chain)
        client_usage = bool(ex.request.stream_options and ex.request.stream_options.include_usage)
        stopped = False  # a hook blocked: drain upstream for usage, forward nothing else
        parts: list[str] = []
        done = False
        try:
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data_s = line[5:].strip()
                if data_s == "[DONE]":
                    done = True
                    break
                obj = orjson.loads(data_s)
                obj["id"], obj["model"] = ex.id, ex.public_model
                if "error" in obj and not obj.get("choices"):
                    ex.status, ex.http_status = "upstream_error", 503
                    self.metrics.upstream_errors.labels("stream_error").inc()
                    yield _sse(obj)
                    break
                choices = obj.get("choices") or []
                if not choices:  # the usage chunk
                    ex.usage = obj.get("usage") or ex.usage
                    if client_usage:
                        yield _sse(obj)
                    continue
                if stopped:
                    continue
                choice = choices[0]
                delta = choice.get("delta") or {}
                finish = choice.get("finish_reason")
                content = delta.get("content")
                out = guard.feed(content) if content else ""
                if finish is not None:
                    out += guard.finish()
                if guard.blocked:
                    stopped = True
                    ex.status, ex.finish_reason = "blocked", "content_filter"
                    yield _sse(chunk_body(ex.id, ex.public_model, {}, "content_filter"))
                    continue
                if content is not None or out:
                    delta["content"] = out
                    choice["delta"] = delta
                if out:
                    parts.append(out)
                    if ex.ttft_s is None:
                        ex.ttft_s = time.perf_counter() - ex.t0
                elif content and finish is None and set(delta) <= {"content"}:
                    continue  # everything held back: nothing to send yet
                if finish is not None:
                    ex.finish_reason = finish
                yield _sse(obj)
            if done:
                # Log before the client sees the end, so feedback sent right after finds the row.
                self._finish_stream(ex, guard, parts)
                yield b"data: [DONE]\n\n"
            elif ex.status == "ok":  # upstream closed without [DONE]
                raise httpx.RemoteProtocolError("upstream stream ended early")
        except httpx.HTTPError as e:
            kind = "timeout" if isinstance(e, httpx.TimeoutException) else "stream_broken"
            self.metrics.upstream_errors.labels(kind).inc()
            ex.status, ex.http_status = "upstream_error", 503
            yield _sse(
                {
                    "error": {
                        "message": f"the model server failed mid-stream ({type(e).__name__})",
                        "type": "upstream_error",
                        "param": None,
                        "code": kind,
                    }
                }
            )
        except BaseException:
            ex.status, ex.http_status = "cancelled", 499  # client went away
            raise
        finally:
            await r.aclose()
            self._finish_stream(ex, guard, parts)

    def _finish_stream(self, ex: Exchange, guard: StreamGuard, parts: list[str]) -> None:
        if ex.logged:
            return
        ex.response = "".join(parts)
        ex.guardrail_s += guard.seconds
        ex.verdicts += guard.merged_verdicts() if self.output_chain.hooks else []
        self._finish(ex)
