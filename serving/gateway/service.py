"""Gateway logic: admission (backpressure, fair share), guardrail chains, the upstream call, the
streaming relay, logging, metrics.

The upstream is injected (:class:`UpstreamProvider`), and so are the log store and the admission
counters, so the releases helper can switch blue/green upstreams atomically, worker processes can
share one set of limits (serving.gateway.dataplane) and tests can use a fake upstream. Each request reads
``provider.current()`` once at its start and keeps that upstream to its end: in-flight requests
and streams finish on the old release after a switch.

Every admitted request (past parsing and the 429 check) becomes exactly one log row, whatever
happens next (blocked, upstream error, client gone, client stalled), written exactly once by
:meth:`GatewayService._finish`; the stream's response object calls it on every way out, even when
the client left before the body started.

Where the time goes (measured with py-spy; docs/GATEWAY.md): the per-chunk relay, not the hooks.
So the relay reads upstream with aiohttp (C parser), parses each chunk once (the log needs its
text) and forwards the upstream's own bytes, with only ``id`` and ``model`` swapped, unless an
output hook changed the text or the chunk has fields that are not OpenAI's (then it is
re-encoded without them: ground.protocol.public_chunk); output hooks run on windows of text (guardrails.base.StreamGuard);
hooks over large texts run in a small thread pool so they never stall the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiohttp
import orjson
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from pydantic import ValidationError

from ground.logstore import ActorRole, ExchangeRecord, LogStore
from ground.protocol import (
    DELTA_KEYS,
    GUARDED_DELTA_KEYS,
    ChatCompletionRequest,
    FeedbackRequest,
    FeedbackResponse,
    GatewayError,
    ModelCard,
    ModelList,
    check_limits,
    chunk_body,
    completion_body,
    parse_json_object,
    public_chunk,
    public_completion,
    validation_error,
)
from guardrails.base import ChainResult, InputChain, OutputChain, StreamGuard, Verdict
from guardrails.registry import build_hook
from serving.gateway.config import GatewayConfig

log = logging.getLogger(__name__)

OVERHEAD_HEADER = "x-alignloop-overhead-ms"  # the gateway's own time, guardrails included
GUARDRAIL_HEADER = "x-alignloop-guardrail-ms"  # of which guardrail hooks
KEEPALIVE = b": keep-alive\n\n"
_MAX_LINE = 1 << 20  # the longest SSE line (one chunk) accepted from upstream


@dataclass(frozen=True)
class Upstream:
    """One live release the gateway forwards to (a vLLM it runs, or an external server)."""

    base_url: str  # e.g. http://127.0.0.1:PORT/v1
    release_id: str
    served_model: str  # the model name the upstream answers to
    api_key: str | None = None  # sent as a bearer key (external upstreams that need one)
    # vLLM's tool-call parser; None = tools not enabled (requests with tools get a 400);
    # EXTERNAL_TOOLS = an external server, which decides for itself
    tool_parser: str | None = None
    # A canary beside this live release: a share of some tenants' end users go to it instead.
    canary: Canary | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain data (the control plane publishes it to worker processes)."""
        d = dict(self.__dict__)
        if self.canary is not None:
            d["canary"] = {**self.canary.__dict__, "upstream": self.canary.upstream.to_dict(),
                           "tenants": list(self.canary.tenants)}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Upstream:
        d = dict(d)
        if d.get("canary") is not None:
            c = dict(d["canary"])
            d["canary"] = Canary(Upstream.from_dict(c["upstream"]), c["share"], tuple(c["tenants"]))
        return cls(**d)


@dataclass(frozen=True)
class Canary:
    """A release that serves ``share`` of ``tenants``' end users (every tenant when empty)."""

    upstream: Upstream
    share: float
    tenants: tuple[str, ...] = ()


def route_request(live: Upstream | None, tenant: str, user: str | None, request_id: str) -> Upstream | None:
    """The release that answers this request: live, or its canary for a ``share`` of the
    canary's tenants' end users. Sticky: the choice hashes the canary's release id with the
    tenant and the request's ``user``, so one person sees one release for the canary's whole
    life; a request without ``user`` is assigned by its own id (a coin per request)."""
    if live is None or live.canary is None:
        return live
    c = live.canary
    if c.tenants and tenant not in c.tenants:
        return live
    key = f"{c.upstream.release_id}\0{tenant}\0" + (f"u:{user}" if user else f"r:{request_id}")
    draw = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64
    return c.upstream if draw < c.share else live


EXTERNAL_TOOLS = "external"


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


class Admission(Protocol):
    """Concurrent-request accounting, global and per tenant (in one process or shared)."""

    def admit(self, tenant: str) -> str | None:
        """Take a slot; None when admitted, else why not (the 429's message)."""

    def release(self, tenant: str) -> None: ...

    def in_flight(self) -> int: ...


def fair_share_refusal(
    tenant: str, counts: dict[str, int], total: int, caps: dict[str, int], global_cap: int
) -> str | None:
    """Why ``tenant`` may not take one more slot now, or None.

    Every tenant is guaranteed ``min(its cap, global cap / number of tenants)`` slots: capacity
    another tenant is not using up to its guarantee stays free for it, so a tenant at its limit
    cannot starve the others (a trade: that reserve is idle while its owner is). Plus the tenant's
    own cap and the global cap.
    """
    if counts.get(tenant, 0) >= caps.get(tenant, global_cap):
        return f"tenant {tenant!r} has too many requests in flight; retry later"
    share = global_cap // max(1, len(caps))
    reserved = sum(
        max(0, min(cap, share) - counts.get(t, 0)) for t, cap in caps.items() if t != tenant
    )
    if total >= global_cap - reserved:
        return "gateway is at capacity; retry later"
    return None


class LocalAdmission:
    """Admission counters of one process (the event loop is single-threaded: no lock needed)."""

    def __init__(self, config: GatewayConfig) -> None:
        self.caps = {t.name: t.max_in_flight for t in config.tenants}
        self.global_cap = config.limits.max_in_flight
        self.counts: dict[str, int] = {}
        self.total = 0

    def admit(self, tenant: str) -> str | None:
        why = fair_share_refusal(tenant, self.counts, self.total, self.caps, self.global_cap)
        if why is None:
            self.total += 1
            self.counts[tenant] = self.counts.get(tenant, 0) + 1
        return why

    def release(self, tenant: str) -> None:
        self.total -= 1
        self.counts[tenant] -= 1

    def in_flight(self) -> int:
        return self.total


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
        self.overhead = Histogram(
            "gateway_overhead_seconds",
            "The gateway's own time per request (not waiting on upstream or client), guardrails included",
            registry=r,
            buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5),
        )
        self.guardrail = Histogram(
            "gateway_guardrail_seconds",
            "Guardrail chain time per request",
            registry=r,
            buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5),
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
        self.client_aborts = Counter(
            "gateway_client_aborts",
            "Requests the client ended early: disconnect, or stalled (read nothing for write_timeout_s)",
            ["kind"],
            registry=r,
        )
        self.in_flight = Gauge(
            "gateway_in_flight", "Chat requests in flight", registry=r, multiprocess_mode="livesum"
        )


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
    own_s: float = 0.0  # the gateway's own time: all but waiting on upstream and client
    response: str = ""  # the first choice's text (the answer feedback refers to)
    choices: list[dict[str, Any]] | None = None  # every choice, when n > 1 or tools were called
    finish_reason: str | None = None
    usage: dict[str, int] | None = None
    ttft_s: float | None = None
    status: str = "ok"
    http_status: int = 200
    stream_done: bool = False  # the relay saw the upstream's [DONE] or ended the stream itself
    relay_closed: bool = False
    logged: bool = False

    def add_chain(self, res: ChainResult) -> bool:
        """Record an input chain's verdicts; True when it blocked."""
        self.verdicts += res.verdicts
        self.guardrail_s += res.seconds
        return res.blocked

    def overhead_headers(self) -> dict[str, str]:
        return {
            OVERHEAD_HEADER: f"{self.own_s * 1000:.3f}",
            GUARDRAIL_HEADER: f"{self.guardrail_s * 1000:.3f}",
        }


def _sse(obj: Any) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def _texts_size(req: ChatCompletionRequest) -> int:
    return sum(len(t) for m in req.messages for t in m.texts())


class GuardrailPool:
    """Runs guardrail work inline when it is small, else on a bounded thread pool.

    A thread hop costs more than checking a chat-sized text (tens of microseconds, measured), so
    small texts stay on the event loop; large ones (up to ``max_body_bytes``) go to threads so the
    loop keeps relaying other streams meanwhile. Threads share the GIL: they keep the loop
    responsive, they do not add CPU; more CPU comes from more worker processes
    (``alignloop serve`` ``workers``).
    """

    def __init__(self, threads: int, inline_max_chars: int) -> None:
        self.inline_max_chars = inline_max_chars
        self.pool = (
            ThreadPoolExecutor(threads, thread_name_prefix="guardrails") if threads else None
        )

    async def call(self, size: int, fn: Callable[..., Any], *args: Any) -> Any:
        if self.pool is None or size <= self.inline_max_chars:
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)


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
        """Store one feedback event; 404 unless every referenced request id is this tenant's
        (410 for one answered but not logged), 400 for feedback that carries no information.

        ``actor``/``actor_role`` say who gave it as the server knows it (a reviewer signed in to
        the review page); they are never read from the request body. Through the API, the actor
        is the end user the answer was served to (the chat request's ``user``, None if it had
        none) and the role is ``simulated`` for a tenant flagged so in the config, else ``user``.
        The ids are looked up without waiting for the log writer's backlog
        (``LogStore.exchange_params`` also sees rows still queued).
        """
        found = self.store.exchange_brief(req.request_id, tenant=tenant, wait_s=self.feedback_wait_s)
        if found is None:
            raise self._not_found(req.request_id, tenant, "request_id")
        params = found["params"]
        if actor_role in ("user", "simulated"):
            if actor is None:
                actor = params.get("user")
            if tenant in self.simulated_tenants:
                actor_role = "simulated"
        other = req.preference.other_request_id if req.preference else None
        other_found = None
        if other is not None:
            other_found = self.store.exchange_brief(other, tenant=tenant, wait_s=self.feedback_wait_s)
            if other_found is None:
                raise self._not_found(other, tenant, "preference.other_request_id")
        _refuse_no_information(req, found.get("response"), other_found)
        kind, payload = req.kind_and_payload()
        fid, created = self.store.add_feedback(
            req.request_id, tenant, kind, payload, req.comment, actor=actor, actor_role=actor_role
        )
        return FeedbackResponse(id=fid, created=created, actor_role=actor_role)

    def _not_found(self, request_id: str, tenant: str, param: str) -> GatewayError:
        """404 for an unknown id; 410 for one that was answered but whose log row was dropped
        (a full log queue): feedback on it cannot be stored, and sending it again will not help."""
        if _was_dropped(self.store, request_id, tenant):
            return GatewayError(
                410,
                f"request {request_id!r} was answered but not logged (the gateway's log queue was "
                "full), so feedback on it cannot be stored",
                param=param,
                code="request_not_logged",
            )
        return GatewayError(404, f"no request with id {request_id!r}", param=param, code="not_found")

    # -- chat -----------------------------------------------------------------------------------
    def parse_chat(self, body: bytes) -> ChatCompletionRequest:
        """The validated request, or a 4xx naming what is wrong (ground/protocol.py)."""
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
        record = ExchangeRecord(
            id=ex.id,
            tenant=ex.tenant,
            messages=[msg.model_dump(exclude_none=True) for msg in ex.request.messages],
            params=ex.request.params(),
            response=ex.response,
            choices=ex.choices,
            finish_reason=ex.finish_reason,
            usage=ex.usage,
            ttft_ms=None if ex.ttft_s is None else ex.ttft_s * 1000,
            latency_ms=(now - ex.t0) * 1000,
            guardrail_ms=ex.guardrail_s * 1000,
            overhead_ms=ex.own_s * 1000,
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
                    self._relay(ex, upstream_resp),
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
                yield _sse(chunk_body(ex.id, ex.public_model, delta, None, i))
                yield _sse(chunk_body(ex.id, ex.public_model, {}, "content_filter", i))
            if with_usage:
                yield _sse(
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
            logged.append(_logged_choice(choice.get("index", len(logged)), text,
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
            return JSONResponse(_openai_error(content, status), status_code=status)
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

    async def _relay(self, ex: Exchange, r: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
        """Relay the upstream's SSE stream through the output guard; rewrite ids; log at the end.

        Reads whatever bytes upstream has (``readany``), handles every complete event in them and
        sends the results as one write: under load several chunks of a stream often arrive
        together. Chunks whose text no hook changed are forwarded as the upstream's own bytes
        with only the ``id`` and ``model`` values swapped (a bytes replace of ``"id":<value>``;
        that key/value pair cannot occur inside a JSON string, where quotes are escaped); the
        rest, and chunks with fields that are not OpenAI's, are re-encoded.
        """
        st = _StreamState(self.output_chain, self.config.guardrails)
        # Only OpenAI's chunk fields go on (ground/protocol.py); token logprobs only when asked
        # for, which parse_chat allows only without output hooks.
        keep_logprobs = bool(ex.request.logprobs)
        delta_keys = GUARDED_DELTA_KEYS if self.output_chain.hooks else DELTA_KEYS
        client_usage = bool(ex.request.stream_options and ex.request.stream_options.include_usage)
        swap = _IdSwap(ex)
        reader = r.content
        waiting: asyncio.Future | None = None
        keepalive_s = self.config.upstream.keepalive_s
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
                        self.metrics.upstream_errors.labels("malformed_chunk").inc()
                        out.append(
                            _error_event("the model server sent a malformed chunk", "malformed_chunk")
                        )
                        ended = True
                        break
                    if "error" in obj and not obj.get("choices"):
                        ex.status, ex.http_status, ex.stream_done = "upstream_error", 503, True
                        self.metrics.upstream_errors.labels("stream_error").inc()
                        out.append(_sse(_openai_error(payload, 503)))  # its four fields only
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
                    self._close_relay(ex, st)
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
            self.metrics.upstream_errors.labels(kind).inc()
            ex.status, ex.http_status, ex.stream_done = "upstream_error", 503, True
            yield _error_event(f"the model server failed mid-stream ({type(e).__name__})", kind)
        finally:
            if waiting is not None:
                waiting.cancel()
            self._close_relay(ex, st)

    def _close_relay(self, ex: Exchange, st: _StreamState) -> None:
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
            self._finish(ex)
        # else the client left: RelayResponse's cleanup logs it as the client's abort


class _StreamState:
    """Per-choice state of a relayed stream: its guard, the text sent, tool-call deltas."""

    def __init__(self, chain: OutputChain, g: Any) -> None:  # g: GuardrailsConfig
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
            _logged_choice(
                i, "".join(self.parts[i]), self.finish.get(i),
                [{k: v for k, v in c.items() if k != "index"} for c in self.tool_calls[i]]
                if i in self.tool_calls else
                None if self.chain.hooks else _merge_tool_deltas(self.tool_deltas.get(i, [])),
            )
            for i in sorted(self.seen)
        ]


def _logged_choice(
    index: int, content: str, finish_reason: str | None, tool_calls: list[dict[str, Any]] | None
) -> dict[str, Any]:
    out: dict[str, Any] = {"index": index, "content": content, "finish_reason": finish_reason}
    if tool_calls:
        out["tool_calls"] = tool_calls
    return out


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


def _was_dropped(store: Any, request_id: str, tenant: str) -> bool:
    fn = getattr(store, "was_dropped", None)
    return bool(fn and fn(request_id, tenant))


def _same_text(a: str | None, b: str | None) -> bool:
    """Equal up to whitespace (spaces, line breaks, their amount)."""
    return a is not None and b is not None and a.split() == b.split()


def _refuse_no_information(
    req: FeedbackRequest, answer: str | None, other: dict[str, Any] | None
) -> None:
    """A 400 naming the field when feedback says nothing about the answer: an edit or a better
    text equal to the answer up to whitespace, a preference between two identical answers (the
    request body alone is checked in ground.protocol: an answer preferred over itself)."""
    if req.edit is not None and _same_text(req.edit.text, answer):
        raise GatewayError(
            400, "Invalid 'edit.text': it is the answer itself (differing at most in whitespace)",
            param="edit.text", code="no_information",
        )
    pref = req.preference
    if pref is not None and _same_text(pref.better_text, answer):
        raise GatewayError(
            400, "Invalid 'preference.better_text': it is the answer itself (differing at most in "
            "whitespace)", param="preference.better_text", code="no_information",
        )
    if pref is not None and other is not None and _same_text(other.get("response"), answer):
        raise GatewayError(
            400, "Invalid 'preference.other_request_id': both answers are the same text (differing "
            "at most in whitespace), so neither can be preferred", param="preference.other_request_id",
            code="no_information",
        )


def _openai_error(content: bytes, status: int) -> dict[str, Any]:
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


def _with_ids(obj: dict[str, Any], ex: Exchange) -> bytes:
    """A chunk re-encoded with our ``id`` and public model name."""
    obj["id"], obj["model"] = ex.id, ex.public_model
    return _sse(obj)


def _error_event(message: str, code: str) -> bytes:
    return _sse({"error": {"message": message, "type": "upstream_error", "param": None, "code": code}})


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
                return _sse(obj)
            out = out.replace(old, new, 1)
        return b"data: " + out + b"\n\n"
