"""The gateway's FastAPI app: thin routers over :class:`~serving.service.GatewayService`.

    app = create_app(config, StaticUpstream(Upstream(url, "r1", "tiny")), LogStore(url))
    uvicorn.run(app)                      # or, in tests: with serve_in_thread(app) as base: ...

Every error is answered in OpenAI's shape (``{"error": {...}}``) with a 4xx for anything the
client got wrong (bad JSON, bad fields, oversize bodies, unknown routes) and never a bare 500.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import asynccontextmanager

import orjson
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.auth import KeyRing, require_tenant
from serving.gateway_config import GatewayConfig
from serving.logstore import LogStore
from serving.protocol import FeedbackRequest, GatewayError
from serving.service import GatewayService, UpstreamProvider

log = logging.getLogger(__name__)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, or 413 as soon as it is known to exceed ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise GatewayError(
            413, f"request body is larger than {limit} bytes", code="request_too_large"
        )
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise GatewayError(
                413, f"request body is larger than {limit} bytes", code="request_too_large"
            )
        chunks.append(chunk)
    return b"".join(chunks)


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
        loc = ".".join(str(p) for p in err["loc"] if p != "body")
        return _response(GatewayError(400, f"{loc}: {err['msg']}", param=loc or None, code="invalid_value"))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException) -> JSONResponse:
        type_ = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return _response(GatewayError(e.status_code, str(e.detail), type_, headers=getattr(e, "headers", None)))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, e: Exception) -> JSONResponse:
        log.exception("gateway: unexpected error")
        return _response(GatewayError(500, f"internal gateway error ({type(e).__name__})", "server_error"))


def _routes(service: GatewayService) -> APIRouter:
    router = APIRouter()
    limit = service.config.limits.max_body_bytes

    @router.post("/v1/chat/completions")
    async def chat_completions(request: Request, tenant: str = Depends(require_tenant)) -> Response:
        return await service.chat(await read_body(request, limit), tenant)

    @router.get("/v1/models")
    async def models(tenant: str = Depends(require_tenant)) -> dict:
        return service.models().model_dump()

    @router.post("/v1/feedback")
    async def feedback(request: Request, tenant: str = Depends(require_tenant)) -> dict:
        body = await read_body(request, limit)
        try:
            req = FeedbackRequest.model_validate(orjson.loads(body))
        except orjson.JSONDecodeError as e:
            raise GatewayError(400, f"request body is not valid JSON: {e}") from None
        except ValidationError as e:
            err = e.errors()[0]
            loc = ".".join(str(p) for p in err["loc"])
            raise GatewayError(
                400, f"{loc or 'body'}: {err['msg']}", param=loc or None, code="invalid_value"
            ) from None
        # The store is synchronous (and flushes queued rows first): keep it off the event loop.
        return (await run_in_threadpool(service.feedback, req, tenant)).model_dump()

    @router.get("/healthz")
    async def healthz() -> JSONResponse:
        status, state = await service.health()
        return JSONResponse(state, status_code=status)

    @router.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return router


def create_app(
    config: GatewayConfig,
    upstream: UpstreamProvider,
    store: LogStore,
    extra_routers: Sequence[APIRouter] = (),
) -> FastAPI:
    """The gateway app. It owns ``store`` from now on: shutdown flushes and closes it."""
    service = GatewayService(config, upstream, store)

    @asynccontextmanager
    async def lifespan(_: FastAPI):  # noqa: ANN202
        await service.start()
        try:
            yield
        finally:
            await service.aclose()

    app = FastAPI(title="alignloop gateway", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.service = service
    app.state.keyring = KeyRing(config)
    app.state.config = config
    _install_error_handlers(app)
    app.include_router(_routes(service))
    for r in extra_routers:
        app.include_router(r)
    return app


def store_from_config(config: GatewayConfig) -> LogStore:
    """The log store the config names (``log_store_url``), default ``<data dir>/logs.db``."""
    from serving.logstore import default_url

    return LogStore(config.log_store_url or default_url())


@contextlib.contextmanager
def serve_in_thread(
    app: FastAPI, host: str = "127.0.0.1", port: int | None = None, timeout_s: float = 30
) -> Iterator[str]:
    """Run ``app`` with uvicorn in a thread; yields ``http://host:port`` (tests, benchmarks)."""
    import uvicorn

    from serving.vllm_server import free_port

    port = port or free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5)
    )
    thread = threading.Thread(target=server.run, name=f"gateway-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"gateway did not start on {host}:{port}")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=timeout_s)
