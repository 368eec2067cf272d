"""The gateway's FastAPI app: thin routers over :class:`~serving.gateway.service.GatewayService`.

    app = create_app(config, StaticUpstream(Upstream(url, "r1", "tiny")), LogStore(url))
    uvicorn.run(app)                      # or, in tests: with serve_in_thread(app) as base: ...

Every error is answered in OpenAI's shape (``{"error": {...}}``) with a 4xx for anything the
client got wrong (bad JSON, bad fields, oversize bodies, unknown routes) and never a bare 500.

What is public: ``GET /healthz`` answers ``{"status": "ok"}`` (200) or ``"unavailable"`` (503) to
anyone and its details (live release, in-flight count) to the admin key only. ``/metrics`` needs
the admin key or a metrics key (``public_metrics: true`` opens it). Everything under ``/v1`` needs
a tenant key and everything under ``/admin`` the admin key; there is no OpenAPI page.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from ground.logstore import LogStore, default_url
from ground.protocol import FeedbackRequest, param_path
from serving.engine.vllm_server import free_port
from serving.gateway.admission import Admission
from serving.gateway.auth import (
    KeyRing,
    is_admin_request,
    keys_router,
    require_metrics,
    require_tenant,
)
from serving.gateway.config import GatewayConfig
from serving.gateway.service import GatewayService
from serving.gateway.upstream import UpstreamProvider
from serving.gateway.wire import GatewayError, parse_json_object, validation_error

log = logging.getLogger(__name__)


def too_large(size: int | None, limit: int, setting: str) -> GatewayError:
    got = f"is {size} bytes" if size is not None else "is larger than that"
    return GatewayError(
        413,
        f"request body {got}; this gateway accepts at most {limit} bytes ({setting} in the "
        "gateway config): send less text, or fewer messages",
        code="request_too_large",
    )


def check_content_type(request: Request) -> None:
    """A body that says it is not JSON is a 415 (a missing Content-Type is read as JSON)."""
    ctype = request.headers.get("content-type")
    if ctype is None:
        return
    media = ctype.split(";")[0].strip().lower()
    if media != "application/json" and not media.endswith("+json"):
        raise GatewayError(
            415,
            f"Content-Type {media or ctype!r} is not supported: send the body as JSON with "
            "'Content-Type: application/json'",
            code="unsupported_media_type",
        )


async def read_body(
    request: Request, limit: int, timeout_s: float = 30.0, setting: str = "limits.max_body_bytes"
) -> bytes:
    """The request body; a 413 when it exceeds ``limit`` bytes; a 408 when it has not all arrived
    within ``timeout_s`` (a slow-loris client holds nothing longer).

    An oversize body is still read to its end (and dropped, never kept) before the 413 goes out,
    within the same ``timeout_s``: answering first and closing a connection with unread data
    makes the kernel reset it, so a client that sends its whole body before reading (or asks for
    ``Connection: close``) would get a reset instead of the 413. The cost is bounded in time,
    not in bytes; a body still arriving at the deadline gets its 413 then.
    """
    declared = request.headers.get("content-length")
    size = int(declared) if declared is not None and declared.isdigit() else None
    oversize = size is not None and size > limit
    chunks, got = [], 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                got += len(chunk)
                if got > limit:
                    oversize = True
                if not oversize:
                    chunks.append(chunk)
    except TimeoutError:
        if oversize:
            raise too_large(size, limit, setting) from None
        raise GatewayError(
            408, f"request body not received within {timeout_s:g} s", code="request_timeout"
        ) from None
    if oversize:
        raise too_large(size or got, limit, setting)
    return b"".join(chunks)


class GatewayHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a deadline for a request's headers.

    uvicorn times out idle keep-alive connections but not a client that opens a connection and
    sends its headers a byte at a time (slow loris): here the connection is closed when a
    request's headers are not complete within ``HEADER_TIMEOUT_S``. It also hands the transport to
    the app (``scope["extensions"]["alignloop.transport"]``) so a stream whose client stopped
    reading can be aborted instead of waiting forever for a graceful close.
    """

    HEADER_TIMEOUT_S = 10.0
    _header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def _arm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        self._header_timer = self.loop.call_later(self.HEADER_TIMEOUT_S, self._headers_too_slow)

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            self.transport.abort()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        ext = self.scope.setdefault("extensions", {})
        ext["alignloop.transport"] = self.transport
        ext["alignloop.t0"] = time.perf_counter()  # the overhead header counts from here
        if self._header_timer is None:
            self._arm_header_timer()

    def on_headers_complete(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        super().connection_lost(exc)


def protocol_for(config: GatewayConfig) -> type[GatewayHttpProtocol]:
    """The HTTP protocol class with this config's header timeout."""
    return type(
        "GatewayHttpProtocol",
        (GatewayHttpProtocol,),
        {"HEADER_TIMEOUT_S": config.limits.header_timeout_s},
    )


def uvicorn_config(app: FastAPI, **kwargs: Any) -> uvicorn.Config:
    """uvicorn's config for a gateway app: our protocol (header deadline), no access log."""
    kwargs.setdefault("log_level", "warning")
    # uvicorn closes idle keep-alive connections after 5 s by default; a client reusing one just
    # then gets a reset (a known keep-alive race). Clients (the OpenAI SDK) keep connections
    # longer: 30 s makes the race rarer; idle connections cost a file descriptor each.
    kwargs.setdefault("timeout_keep_alive", 30)
    return uvicorn.Config(
        app, http=protocol_for(app.state.config), access_log=False, loop="auto", **kwargs
    )


def _response(e: GatewayError) -> JSONResponse:
    """The error in OpenAI's shape, with its status and headers (Retry-After, ...)."""
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(GatewayError)
    async def _gateway_error(request: Request, e: GatewayError) -> JSONResponse:
        if not e.counted and request.url.path == "/v1/chat/completions":
            tenant = getattr(request.state, "tenant", "-")  # "-": failed before authentication
            app.state.service.metrics.requests.labels(tenant, str(e.status)).inc()
        return _response(e)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, e: RequestValidationError) -> JSONResponse:
        err = e.errors()[0]
        loc = param_path([p for p in err["loc"] if p != "body"])
        return _response(GatewayError(400, f"Invalid '{loc}': {err['msg']}" if loc else err["msg"],
                                      param=loc or None, code="invalid_value"))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException) -> JSONResponse:
        type_ = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return _response(GatewayError(e.status_code, str(e.detail), type_, headers=getattr(e, "headers", None)))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, e: Exception) -> JSONResponse:
        log.exception("gateway: unexpected error")
        return _response(GatewayError(500, f"internal gateway error ({type(e).__name__})", "server_error"))


async def tenant_of(request: Request) -> str:
    """``require_tenant`` as an async dependency: FastAPI runs a plain ``def`` dependency on its
    thread pool, a thread hop per request (13% of the gateway's time per short request, profiled)
    for a dictionary lookup."""
    return require_tenant(request)


async def metrics_reader(request: Request) -> None:
    """``require_metrics`` as an async dependency (no thread hop)."""
    require_metrics(request)


def _routes(service: GatewayService, with_feedback: bool = True) -> APIRouter:
    router = APIRouter()
    limit = service.config.limits.max_body_bytes
    body_s = service.config.limits.body_timeout_s

    @router.post("/v1/chat/completions")
    async def chat_completions(request: Request, tenant: str = Depends(tenant_of)) -> Response:
        # From the request's first byte (our protocol stamps it), so parsing, routing and
        # authentication count as the gateway's own time too.
        t0 = (request.scope.get("extensions") or {}).get("alignloop.t0") or time.perf_counter()
        check_content_type(request)
        return await service.chat(await read_body(request, limit, body_s), tenant, t0)

    @router.get("/v1/models")
    async def models(tenant: str = Depends(tenant_of)) -> dict:
        return service.models().model_dump()

    async def feedback(request: Request, tenant: str = Depends(tenant_of)) -> dict:
        check_content_type(request)
        body = await read_body(request, limit, body_s)
        try:
            req = FeedbackRequest.model_validate(parse_json_object(body))
        except ValidationError as e:
            raise validation_error(e) from None
        # The store is synchronous (one lookup and one insert): keep it off the event loop.
        return (await run_in_threadpool(service.feedback, req, tenant)).model_dump()

    if with_feedback:  # else forwarded to the control plane, which owns the store
        router.post("/v1/feedback")(feedback)

    @router.get("/healthz")
    async def healthz(request: Request) -> JSONResponse:
        status, state = await service.health()
        if not is_admin_request(request):  # the live release's name is not for everyone
            state = {"status": state["status"]}
        return JSONResponse(state, status_code=status)

    return router


def _metrics_route(service: GatewayService, forward_to: str | None) -> APIRouter:
    router = APIRouter()

    @router.get("/metrics", dependencies=[Depends(metrics_reader)])
    async def metrics(request: Request) -> Response:
        if forward_to is None:
            return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)
        # A worker: every worker's series (prometheus multiprocess files) + the control plane's
        # log-writer series.

        registry = CollectorRegistry()
        MultiProcessCollector(registry)
        text = generate_latest(registry).decode()
        try:
            auth = {k: v for k, v in request.headers.items() if k.lower() in ("authorization", "api-key")}
            async with request.app.state.forward_session.get(
                "http://control/metrics", headers=auth
            ) as r:
                control = await r.text()
            text += "".join(
                line + "\n" for line in control.splitlines()
                if line.removeprefix("# HELP ").removeprefix("# TYPE ").startswith("gateway_log")
            )
        except Exception as e:  # noqa: BLE001 - metrics still answer without the writer's
            log.warning("control plane metrics unavailable: %r", e)
        return Response(text, media_type=CONTENT_TYPE_LATEST)

    return router


# Not forwarded (hop-by-hop, or recomputed); Host is, so the control plane sees the client's
# origin (the review page checks it).
_HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "te", "upgrade",
                "content-length", "proxy-connection"}


def _forward_router(limit: int, body_s: float) -> APIRouter:
    """A worker's catch-all: everything that is not the data plane (admin API, feedback, pages)
    is answered by the control plane, over its Unix socket."""
    router = APIRouter()

    @router.api_route("/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
    async def forward(request: Request, path: str) -> Response:
        body = await read_body(request, limit, body_s)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_HEADERS}
        url = "http://control" + request.url.path + (f"?{request.url.query}" if request.url.query else "")
        try:
            async with request.app.state.forward_session.request(
                request.method, url, data=body, headers=headers, allow_redirects=False
            ) as r:
                content = await r.read()
                out = Response(content, status_code=r.status)
                # raw pairs: repeated headers (several Set-Cookie) must all pass
                out.raw_headers = [
                    *[(k, v) for k, v in out.raw_headers if k == b"content-length"],
                    *[
                        (k.lower(), v)
                        for k, v in r.raw_headers
                        if k.decode("latin-1").lower() not in _HOP_HEADERS
                    ],
                ]
                return out
        except Exception as e:  # noqa: BLE001
            raise GatewayError(
                503, f"the gateway's control plane is unavailable ({type(e).__name__})",
                "server_error", code="control_plane_unavailable",
            ) from None

    return router


class _LogStoreCollector:
    """The log writer's queue on /metrics: queued now, written, dropped (a queue full, the
    workers' included), failed, rejected (not rows)."""

    def __init__(self, store: LogStore) -> None:
        self.store = store

    def collect(self):  # noqa: ANN201

        s = self.store
        yield GaugeMetricFamily(
            "gateway_log_queue_rows", "Log rows waiting for the writer", value=_call(s, "queued")
        )
        for name, value, doc in (
            ("gateway_log_rows_written", getattr(s, "written", 0), "Log rows written"),
            ("gateway_log_rows_dropped", _call(s, "dropped_total"),
             "Log rows dropped: the writer's or a worker's queue full"),
            ("gateway_log_rows_failed", getattr(s, "write_errors", 0), "Log rows the database refused"),
            ("gateway_log_rows_rejected", getattr(s, "rejected", 0),
             "Messages from worker processes that were not log rows (skipped)"),
        ):
            yield CounterMetricFamily(name, doc, value=value)


def _call(obj: Any, name: str) -> float:
    fn = getattr(obj, name, None)
    return fn() if callable(fn) else 0


def create_app(
    config: GatewayConfig,
    upstream: UpstreamProvider,
    store: LogStore,
    extra_routers: Sequence[APIRouter] = (),
    admission: Admission | None = None,
    forward_to: str | None = None,
    keyring: KeyRing | None = None,
) -> FastAPI:
    """The gateway app. It owns ``store`` from now on: shutdown flushes and closes it.

    ``admission`` and ``forward_to`` make it a worker of serving.gateway.dataplane: admission counters
    shared with the other workers, and every route but the data plane's (chat, models, healthz,
    metrics) forwarded to the control plane listening on the Unix socket ``forward_to``.
    """
    service = GatewayService(config, upstream, store, admission)
    if forward_to is None:
        service.metrics.registry.register(_LogStoreCollector(store))

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # noqa: ANN202
        await service.start()
        if forward_to is not None:
            app.state.forward_session = aiohttp.ClientSession(
                connector=aiohttp.UnixConnector(path=forward_to),
                timeout=aiohttp.ClientTimeout(total=None, connect=5),
                auto_decompress=False,  # bytes pass through as the control plane sent them
            )
        try:
            yield
        finally:
            if forward_to is not None:
                await app.state.forward_session.close()
            await service.aclose()

    app = FastAPI(
        title="alignloop gateway", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None
    )
    app.state.service = service
    app.state.keyring = keyring or KeyRing(config)
    app.state.config = config
    app.add_middleware(
        AdminBodyLimit, limit=config.limits.max_admin_body_bytes, timeout_s=config.limits.body_timeout_s
    )
    _install_error_handlers(app)
    app.include_router(_routes(service, with_feedback=forward_to is None))
    app.include_router(_metrics_route(service, forward_to))
    if forward_to is not None:
        app.include_router(
            _forward_router(
                max(config.limits.max_body_bytes, config.limits.max_admin_body_bytes),
                config.limits.body_timeout_s,
            )
        )
        return app
    app.include_router(keys_router())
    for r in extra_routers:
        app.include_router(r)
    return app


class AdminBodyLimit:
    """ASGI middleware: an ``/admin`` request body over ``limit`` bytes is a 413 before any route
    parses it (the admin routes let FastAPI read their bodies); read to its end first, within
    ``timeout_s``, as :func:`read_body` does, so the client gets the 413 and not a reset."""

    def __init__(self, app, limit: int, timeout_s: float = 30.0) -> None:  # noqa: ANN001 - an ASGI app
        self.app, self.limit, self.timeout_s = app, limit, timeout_s

    async def __call__(self, scope, receive, send) -> None:  # noqa: ANN001
        if scope["type"] != "http" or not scope["path"].startswith("/admin"):
            await self.app(scope, receive, send)
            return
        chunks, got, more = [], 0, True
        try:
            async with asyncio.timeout(self.timeout_s):
                while more:
                    msg = await receive()
                    if msg["type"] == "http.disconnect":
                        return
                    got += len(msg.get("body", b""))
                    more = msg.get("more_body", False)
                    if got <= self.limit:
                        chunks.append(msg.get("body", b""))
        except TimeoutError:
            e = GatewayError(408, f"request body not received within {self.timeout_s:g} s",
                             code="request_timeout")
            if got > self.limit:
                e = too_large(None, self.limit, "limits.max_admin_body_bytes")
            await _response(e)(scope, receive, send)
            return
        if got > self.limit:
            e = too_large(got, self.limit, "limits.max_admin_body_bytes")
            await _response(e)(scope, receive, send)
            return
        body, sent = b"".join(chunks), False

        async def replay():  # noqa: ANN202
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def store_from_config(config: GatewayConfig) -> LogStore:
    """The log store the config names (``log_store_url``), default ``<data dir>/logs.db``."""
    return LogStore(config.log_store_url or default_url())


@contextlib.contextmanager
def serve_in_thread(
    app: FastAPI, host: str = "127.0.0.1", port: int | None = None, timeout_s: float = 30,
    uds: str | None = None,
) -> Iterator[str]:
    """Run ``app`` with uvicorn in a thread; yields ``http://host:port`` (tests, benchmarks), or
    the socket's path when serving on the Unix socket ``uds``."""
    port = port or free_port()
    where = {"uds": uds} if uds else {"host": host, "port": port}
    if getattr(getattr(app, "state", None), "config", None) is not None:
        server = uvicorn.Server(uvicorn_config(app, timeout_graceful_shutdown=5, **where))
    else:  # not a gateway app (a test's fake upstream)
        server = uvicorn.Server(
            uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5, **where)
        )
    thread = threading.Thread(target=server.run, name=f"gateway-{uds or port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"gateway did not start on {uds or f'{host}:{port}'}")
        time.sleep(0.02)
    try:
        yield uds or f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=timeout_s)
