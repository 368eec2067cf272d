"""The review page (``/review``): people look at served answers, rate, compare and correct them,
and approve releases, in the browser. Server-rendered Jinja templates + htmx (vendored in
``serving/review/static``, no build step); mounted by the gateway next to the admin API::

    app = create_app(config, manager, store,
                     extra_routers=[build_review_router(manager.store, candidates_of(manager))])

- **Who.** Reviewers are listed in the gateway config (``reviewers``: id, hashed key, tenants,
  ``can_approve``). Signing in with the key sets a signed, HttpOnly, SameSite=Strict session
  cookie (itsdangerous); every action POST also needs the session's CSRF token (a header htmx
  sends). A reviewer sees and acts on their tenants' exchanges only.
- **Actions go through the API's rules.** Thumbs, edits and preferences are
  :class:`~ground.protocol.FeedbackRequest` objects handed to
  ``GatewayService.feedback(req, tenant, actor=<reviewer id>, actor_role="reviewer")``: the same
  tenant check, idempotency and validation as ``POST /v1/feedback``.
- **Compare.** The served answer against a staged candidate's answer to the same (redacted)
  prompt, asked through the gateway's own service (same guardrails, logged as an exchange of the
  same tenant), shown blind in random order; the pick is a preference between the two exchanges.
- **Releases.** Lineage, eval report and plots, live vs candidate answers on the held-out eval
  prompts, and approval (:meth:`serving.releases.store.ReleaseStore.approve`).
"""

from __future__ import annotations

import hmac
import logging
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from markupsafe import escape
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from ground.protocol import FeedbackRequest
from serving.gateway.config import GatewayConfig
from serving.gateway.service import GatewayService
from serving.gateway.upstream import StaticUpstream, Upstream
from serving.gateway.wire import GatewayError
from serving.releases.records import ReleaseError, ReleaseNotFound
from serving.releases.verify import approval_required
from serving.review.data import (
    REPORT_PLOTS,
    QueueQuery,
    approvable,
    display_exchange,
    feedback_by_request,
    gate_word,
    load_queue,
    redact_for_display,
    release_view,
)
from serving.review.session import COOKIE, ReviewAuth, Session, read_form, reviewer_for_key

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
STATIC_FILES = {  # name -> media type: the only files /review/static serves
    "htmx.min.js": "text/javascript",
    "review.js": "text/javascript",
    "review.css": "text/css",
}

CandidateSource = Callable[[], list[Upstream]]


def candidates_of(manager: Any) -> CandidateSource:
    """Staged releases of a :class:`~serving.releases.manager.ReleaseManager` whose vLLM is warm."""

    def warm_candidates() -> list[Upstream]:
        warm = manager.warm()
        staged = [r for r in manager.list() if r.status == "staged" and r.release_id in warm]
        return [
            Upstream(warm[r.release_id]["base_url"], r.release_id, r.served_name)
            for r in reversed(staged)  # newest first
        ]

    return warm_candidates


async def candidate_answer(
    service: GatewayService, exchange: dict[str, Any], upstream: Upstream, reviewer: str
) -> dict[str, Any]:
    """Ask ``upstream`` the exchange's (stored, redacted) prompt through the gateway's own
    request path: same guardrails, logged as an exchange of the same tenant. Returns its row."""
    params = {
        k: v
        for k, v in (exchange.get("params") or {}).items()
        if k not in ("stream", "stream_options", "n", "model")
    }
    body = {
        **params,
        "model": service.config.public_models[0],
        "messages": exchange["messages"],
        "user": f"review:{reviewer}",
    }
    relay = GatewayService(service.config, StaticUpstream(upstream), service.store)
    await relay.start()
    try:
        resp = await relay.chat(orjson.dumps(body), exchange["tenant"])
    finally:
        await relay.close_upstream()  # not aclose(): the store is the gateway's
    data = orjson.loads(resp.body)
    row = await run_in_threadpool(service.store.get_exchange, data["id"], exchange["tenant"])
    if row is None:
        raise GatewayError(503, "the candidate's answer was not logged", "upstream_error")
    return row


# -- the router -----------------------------------------------------------------------------------
def build_review_router(
    releases: Any | None = None, candidates: CandidateSource | None = None
) -> APIRouter:
    """The review page's routes.

    Args:
        releases: a :class:`~serving.releases.store.ReleaseStore` (None = no release pages).
        candidates: warm staged releases to compare against (None = no compare).
    """
    router = APIRouter(prefix="/review", include_in_schema=False)
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    auth = ReviewAuth()

    def page(
        request: Request, name: str, session: Session | None, status: int = 200, **ctx: Any
    ) -> HTMLResponse:
        return templates.TemplateResponse(
            request, name, {"session": session, **ctx}, status_code=status
        )

    def fragment_error(message: str, status: int) -> HTMLResponse:
        return HTMLResponse(f'<div class="error" role="alert">{escape(message)}</div>', status)

    def signed_in(request: Request) -> Session | Response:
        session = auth.session(request)
        if session is not None:
            return session
        if request.method == "GET":
            target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            return RedirectResponse("/review/login?" + urlencode({"next": target}), 303)
        resp = fragment_error("your session has ended: sign in again", 401)
        resp.headers["HX-Redirect"] = "/review/login"
        return resp

    async def acting(request: Request) -> tuple[Session, dict[str, str]] | Response:
        """A signed-in POST with a valid CSRF token; returns the session and the form."""
        session = signed_in(request)
        if isinstance(session, Response):
            return session
        sent = request.headers.get("x-csrf-token", "")
        if not hmac.compare_digest(sent, session.csrf):
            return fragment_error("missing or stale CSRF token: reload the page", 403)
        try:
            form = await read_form(request)
        except GatewayError as e:
            return fragment_error(e.message, e.status)
        return session, form

    def _service(app: Any) -> GatewayService:
        return app.state.service

    async def visible_exchange(request: Request, session: Session, request_id: str) -> dict | None:
        ex = await run_in_threadpool(_service(request.app).store.get_exchange, request_id)
        if ex is None or not session.reviewer.may_review(ex["tenant"]):
            return None  # another tenant's exchange looks the same as none at all
        return ex

    async def acting_on(
        request: Request, request_id: str
    ) -> tuple[Session, dict[str, str], dict[str, Any]] | Response:
        """:func:`acting`, on an exchange the reviewer may see (404 for any other)."""
        got = await acting(request)
        if isinstance(got, Response):
            return got
        ex = await visible_exchange(request, got[0], request_id)
        if ex is None:
            return fragment_error(f"no request with id {request_id!r}", 404)
        return (*got, ex)

    async def card(
        request: Request, session: Session, ex: dict[str, Any], **extra: Any
    ) -> HTMLResponse:
        store = _service(request.app).store
        ex = dict(ex)
        ex["feedback"] = (await run_in_threadpool(feedback_by_request, store, [ex["id"]])).get(
            ex["id"], []
        )
        return page(
            request,
            "_card.html",
            session,
            ex=display_exchange(ex),
            can_compare=candidates is not None,
            **extra,
        )

    async def give_feedback(
        request: Request, session: Session, ex: dict, req: dict
    ) -> HTMLResponse:
        try:
            fb = FeedbackRequest.model_validate({"request_id": ex["id"], **req})
            result = await run_in_threadpool(
                _service(request.app).feedback,
                fb,
                ex["tenant"],
                actor=session.reviewer.name,
                actor_role="reviewer",
            )
        except ValidationError as e:
            return fragment_error(e.errors()[0]["msg"], 400)
        except GatewayError as e:
            return fragment_error(e.message, e.status)
        note = "saved" if result.created else "already recorded (same feedback from you)"
        return await card(request, session, ex, flash=f"{fb.kind_and_payload()[0]} {note}")

    # -- sign in / out ------------------------------------------------------------------------
    @router.get("/login")
    async def login_form(request: Request, next: str = "/review") -> HTMLResponse:  # noqa: A002
        return page(request, "login.html", None, next=_safe_next(next))

    @router.post("/login")
    async def login(request: Request) -> Response:
        origin = request.headers.get("origin")
        if origin and origin.rstrip("/") != str(request.base_url).rstrip("/"):
            return page(
                request,
                "login.html",
                None,
                status=403,
                next="/review",
                error="sign-in from another site refused",
            )
        try:
            form = await read_form(request)
        except GatewayError as e:
            return page(
                request, "login.html", None, status=e.status, next="/review", error=e.message
            )
        reviewer = reviewer_for_key(
            request.app.state.config, form.get("key", "").strip(), request.app.state.keyring
        )
        next_url = _safe_next(form.get("next", "/review"))
        if reviewer is None:
            return page(
                request, "login.html", None, status=401, next=next_url, error="unknown reviewer key"
            )
        resp = RedirectResponse(next_url, 303)
        resp.set_cookie(
            COOKIE,
            auth.cookie(request, reviewer),
            max_age=request.app.state.config.review.session_ttl_s,
            path="/review",
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )
        log.info("review: %s signed in", reviewer.name)
        return resp

    @router.post("/logout")
    async def logout(request: Request) -> Response:
        got = await acting(request)
        if isinstance(got, Response):
            return got
        resp = Response(status_code=204, headers={"HX-Redirect": "/review/login"})
        resp.delete_cookie(COOKIE, path="/review")
        return resp

    @router.get("/static/{name}")
    async def static(name: str) -> Response:
        if name not in STATIC_FILES:
            return fragment_error("not found", 404)
        return FileResponse(
            HERE / "static" / name,
            media_type=STATIC_FILES[name],
            headers={"Cache-Control": "max-age=3600"},
        )

    # -- the queue -----------------------------------------------------------------------------
    @router.get("")
    async def queue(request: Request) -> Response:
        session = signed_in(request)
        if isinstance(session, Response):
            return session
        config: GatewayConfig = request.app.state.config
        raw = {k: v for k, v in request.query_params.items() if v != ""}
        raw.setdefault("hours", str(config.review.window_hours))
        raw.setdefault("n", str(config.review.page_size))
        try:
            q = QueueQuery.model_validate(raw)
        except ValidationError as e:
            err = e.errors()[0]
            field = ".".join(str(p) for p in err["loc"])
            return page(
                request, "error.html", session, status=400, message=f"{field}: {err['msg']}"
            )
        store = _service(request.app).store
        result = await run_in_threadpool(load_queue, store, q, session.tenants)
        return page(
            request,
            "queue.html",
            session,
            q=q,
            queue=result,
            items=[display_exchange(ex) for ex in result.items],
            can_compare=candidates is not None,
            tenants=session.tenants or result.tenants,
        )

    @router.post("/x/{request_id}/rate")
    async def rate(request: Request, request_id: str) -> Response:
        got = await acting_on(request, request_id)
        if isinstance(got, Response):
            return got
        session, form, ex = got
        if form.get("thumbs") not in ("up", "down"):
            return fragment_error("thumbs: expected 'up' or 'down'", 400)
        return await give_feedback(request, session, ex, {"rating": {"thumbs": form["thumbs"]}})

    @router.post("/x/{request_id}/edit")
    async def edit(request: Request, request_id: str) -> Response:
        got = await acting_on(request, request_id)
        if isinstance(got, Response):
            return got
        session, form, ex = got
        text = form.get("text", "").strip()
        if not text:
            return fragment_error("text: the edited answer is empty", 400)
        if text == redact_for_display(ex.get("response")).strip():
            return fragment_error("text: unchanged; edit the answer before saving", 400)
        return await give_feedback(request, session, ex, {"edit": {"text": text}})

    @router.post("/x/{request_id}/compare")
    async def compare(request: Request, request_id: str) -> Response:
        got = await acting_on(request, request_id)
        if isinstance(got, Response):
            return got
        session, _, ex = got
        warm = candidates() if candidates else []
        warm = [u for u in warm if u.release_id != ex["release"]]
        if not warm:
            return fragment_error("no staged candidate release is running to compare with", 409)
        try:
            other = await candidate_answer(
                _service(request.app), ex, warm[0], session.reviewer.name
            )
        except GatewayError as e:
            return fragment_error(f"the candidate did not answer: {e.message}", e.status)
        # Blind: the order comes from a keyed coin, so not even the (signed, readable) token
        # says which answer is A.
        nonce = secrets.token_hex(8)
        token = auth.token(request, {"x": ex["id"], "o": other["id"], "k": nonce}, "compare")
        pair = auth.order(request, ex["id"], other["id"], nonce)
        answers = {ex["id"]: ex.get("response"), other["id"]: other.get("response")}
        return page(
            request,
            "_compare.html",
            session,
            ex=display_exchange(ex),
            token=token,
            a=redact_for_display(answers[pair[0]]),
            b=redact_for_display(answers[pair[1]]),
        )

    @router.post("/x/{request_id}/prefer")
    async def prefer(request: Request, request_id: str) -> Response:
        got = await acting(request)
        if isinstance(got, Response):
            return got
        session, form = got
        token = auth.untoken(request, form.get("token", ""), "compare")
        choice = form.get("choice")
        if token is None or token.get("x") != request_id or choice not in ("a", "b"):
            return fragment_error("this comparison is stale or was altered: start it again", 400)
        ex = await visible_exchange(request, session, request_id)
        if ex is None:
            return fragment_error(f"no request with id {request_id!r}", 404)
        other = token["o"]
        pair = auth.order(request, request_id, other, token["k"])
        preferred = "this" if pair["ab".index(choice)] == request_id else "other"
        return await give_feedback(
            request,
            session,
            ex,
            {"preference": {"other_request_id": other, "preferred": preferred}},
        )

    # -- releases ------------------------------------------------------------------------------
    def release_or_404(release_id: str) -> Any:
        if releases is None:
            return None
        try:
            return releases.get(release_id)
        except ReleaseNotFound:
            return None

    @router.get("/releases")
    async def release_list(request: Request) -> Response:
        session = signed_in(request)
        if isinstance(session, Response):
            return session

        rows = []
        for rel in reversed(await run_in_threadpool(releases.list) if releases else []):
            word, why = gate_word(rel)
            rows.append(
                {
                    "rel": rel,
                    "gate": word,
                    "gate_why": why,
                    "needs_approval": approval_required(rel),
                }
            )
        return page(request, "releases.html", session, rows=rows)

    @router.get("/releases/{release_id}")
    async def release_page(request: Request, release_id: str) -> Response:
        session = signed_in(request)
        if isinstance(session, Response):
            return session
        rel = release_or_404(release_id)
        if rel is None:
            return page(
                request,
                "error.html",
                session,
                status=404,
                message=f"release {release_id!r} not found",
            )

        view = await run_in_threadpool(release_view, rel)
        can, why_not = view["approvable"]
        return page(
            request,
            "release.html",
            session,
            v=view,
            rel=rel,
            needs_approval=approval_required(rel),
            approvable=can,
            why_not=why_not,
        )

    @router.get("/releases/{release_id}/plots/{name}")
    async def release_plot(request: Request, release_id: str, name: str) -> Response:
        session = signed_in(request)
        if isinstance(session, Response):
            return session
        rel = release_or_404(release_id)
        run_dir = (rel.source or {}).get("run_dir") if rel else None
        path = Path(run_dir) / "report" / name if run_dir else None
        if name not in REPORT_PLOTS or path is None or not path.is_file():
            return fragment_error("no such plot", 404)
        return FileResponse(path, media_type="image/png")

    @router.post("/releases/{release_id}/approve")
    async def approve(request: Request, release_id: str) -> Response:
        got = await acting(request)
        if isinstance(got, Response):
            return got
        session, form = got
        if not session.reviewer.can_approve:
            return fragment_error("your reviewer role may not approve releases", 403)
        target = release_or_404(release_id)
        if target is None:
            return fragment_error(f"release {release_id!r} not found", 404)
        can, why_not = await run_in_threadpool(approvable, target)
        if not can:  # the page offers no button here; a hand-made POST gets the same answer
            return fragment_error(why_not, 409)
        try:
            rel = await run_in_threadpool(
                releases.approve,
                release_id,
                session.reviewer.name,
                "reviewer",
                form.get("note", "").strip()[:2000],
            )
        except ReleaseError as e:
            return fragment_error(str(e), 409)
        return page(
            request,
            "_approvals.html",
            session,
            rel=rel,
            needs_approval=True,
            approvable=True,
            flash="approval recorded",
        )

    return router


def _safe_next(target: str) -> str:
    """Only paths of this page after sign-in: never another site (open redirect)."""
    return (
        target
        if target.startswith("/review") and "//" not in target and "\\" not in target
        else "/review"
    )
