"""Admin HTTP API for releases (list, stage, promote, rollback, retire, attach eval) and its client.

The router is mounted by the gateway (``create_app(..., extra_routers=[router])``) and every route
needs the admin key. Routes are plain ``def`` so FastAPI runs them in its thread pool: staging
blocks for the candidate's whole start-up (tens of seconds on CPU) without stalling user traffic.

| method | path | body | answer |
|---|---|---|---|
| GET | /admin/releases | | ``{"data": [release, ...], "current": id or null}`` |
| GET | /admin/releases/{id} | | release |
| POST | /admin/releases | StageRequest | release (status ``staged`` or ``failed``) |
| POST | /admin/releases/{id}/promote | PromoteRequest | release (now ``live``) |
| POST | /admin/releases/rollback | RollbackRequest | release (now ``live``) |
| POST | /admin/releases/{id}/retire | RollbackRequest | release (now ``retired``) |
| POST | /admin/releases/{id}/eval | EvalRequest | release |
| POST | /admin/releases/{id}/approve | | 403: only a reviewer approves (on the review page) |

Promotions, rollbacks and retirements record who asked (the admin key's id) in the status
history.

Errors use OpenAI's error shape: 404 unknown release, 409 a state that forbids the operation
(e.g. promoting a failed release, nothing to roll back to), 403 a stage request outside the
server's staging policy (a model folder outside its roots, a vLLM argument it does not let the
admin API set: :class:`~serving.releases.staging.StagingPolicy`), 413 a body over
``limits.max_admin_body_bytes``, 400/422 a bad body.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import fields
from typing import Any

import httpx
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import Field

from ground.config import StrictModel
from serving.engine.vllm_server import VLLMArgs
from serving.gateway.auth import require_admin
from serving.releases.manager import ReleaseManager
from serving.releases.records import Release, ReleaseError, ReleaseNotFound
from serving.releases.staging import StagingError, StagingPolicy


class StageRequest(StrictModel):
    """Stage a candidate: start its vLLM and health-check it (not routed to users)."""

    model_dir: str = Field(..., min_length=1, description="Model folder (or hub id) to serve.")
    args: VLLMArgs | None = Field(
        None, description="vLLM arguments; None = the gateway's defaults."
    )
    source: dict[str, Any] = Field(
        default_factory=dict, description="Lineage: run folder, stage, anything the report links."
    )
    release_id: str | None = Field(None, description="Id to use; None = timestamp + model name.")


class PromoteRequest(StrictModel):
    force: bool = Field(False, description="Promote against a gate decision (needs a reason).")
    reason: str | None = Field(
        None, max_length=2000, description="Why; stored in the status history."
    )
    holdback: float | None = Field(
        None, gt=0, lt=1, description="Share of users kept on the previous release while it is warm (watched).",
    )
    holdback_tenants: list[str] = Field(default_factory=list, description="Tenants of the holdback; [] = all.")


class RollbackRequest(StrictModel):
    reason: str | None = Field(
        None, max_length=2000, description="Why; stored in the status history."
    )


class CanaryRequest(StrictModel):
    share: float = Field(..., gt=0, lt=1, description="Share of the tenants' end users routed to it.")
    tenants: list[str] = Field(default_factory=list, description="Tenants whose users may see it; [] = all.")
    force: bool = Field(False, description="Start it without a passing gate decision (needs a reason).")
    reason: str | None = Field(None, max_length=2000, description="Why; stored in the status history.")


class EvalRequest(StrictModel):
    report: dict[str, Any] = Field(..., description="The eval report (metrics JSON) to attach.")


def _error(
    status: int, message: str, code: str, type_: str = "invalid_request_error", param: str | None = None
) -> JSONResponse:
    return JSONResponse(
        status_code=status,
        content={"error": {"message": message, "type": type_, "param": param, "code": code}},
    )


def _actor(request: Request) -> str:
    """Who made an admin request: the admin key's id (``serving.gateway.auth.require_admin`` sets it)."""
    return getattr(request.state, "admin_key_id", None) or "admin API"


def _one(manager: ReleaseManager, release_id: str) -> dict[str, Any]:
    return next(r for r in manager.describe() if r["release_id"] == release_id)


def build_admin_router(
    manager: ReleaseManager,
    dependencies: Sequence[Callable[..., Any]] | None = None,
    staging: StagingPolicy | None = None,
) -> APIRouter:
    """The admin routes over ``manager``; ``dependencies`` default to ``serving.gateway.auth.require_admin``.

    ``staging`` is what stage requests may ask for (default: models under the data dir's runs,
    models and releases folders, vLLM arguments as :class:`StagingPolicy` allows by default).
    """
    policy = staging or StagingPolicy()
    if dependencies is None:
        dependencies = [require_admin]
    router = APIRouter(
        prefix="/admin/releases", tags=["admin"], dependencies=[Depends(d) for d in dependencies]
    )

    def guarded(fn: Callable[[], Release]) -> Any:
        try:
            rel = fn()
        except StagingError as exc:
            return _error(403, str(exc), "staging_not_allowed", "permission_error", exc.field)
        except ReleaseNotFound as exc:
            return _error(404, str(exc), "release_not_found")
        except ReleaseError as exc:
            return _error(409, str(exc), "release_conflict")
        return _one(manager, rel.release_id)

    @router.get("")
    def list_releases() -> dict[str, Any]:
        cur = manager.current()
        return {
            "object": "list",
            "data": manager.describe(),
            "current": cur.release_id if cur else None,
        }

    @router.post("")
    def stage(body: StageRequest) -> Any:
        def checked() -> Release:
            known = [r.model_dir for r in manager.list()]  # e.g. live's folder: a baseline copy
            model_dir = policy.check(body.model_dir, body.args, manager.default_args, known)
            return manager.stage(model_dir, body.args, body.source, body.release_id)

        return guarded(checked)

    # Declared before "/{release_id}" routes so "rollback" is never read as an id.
    @router.post("/rollback")
    def rollback(request: Request, body: RollbackRequest | None = None) -> Any:
        return guarded(lambda: manager.rollback((body or RollbackRequest()).reason, _actor(request)))

    @router.post("/canary/end")
    def end_canary(request: Request, body: RollbackRequest | None = None) -> Any:
        reason = (body or RollbackRequest()).reason or "canary ended"
        return guarded(lambda: manager.end_canary(reason, _actor(request)))

    @router.get("/{release_id}")
    def get_release(release_id: str) -> Any:
        return guarded(lambda: manager.get(release_id))

    @router.post("/{release_id}/promote")
    def promote(request: Request, release_id: str, body: PromoteRequest | None = None) -> Any:
        body = body or PromoteRequest()
        return guarded(lambda: manager.promote(release_id, body.force, body.reason, _actor(request),
                                               body.holdback, body.holdback_tenants))

    @router.post("/{release_id}/canary")
    def canary(request: Request, release_id: str, body: CanaryRequest) -> Any:
        return guarded(lambda: manager.start_canary(
            release_id, body.share, body.tenants, body.force, body.reason, _actor(request)))

    @router.post("/{release_id}/retire")
    def retire(request: Request, release_id: str, body: RollbackRequest | None = None) -> Any:
        reason = (body or RollbackRequest()).reason or ""
        return guarded(lambda: manager.retire(release_id, reason, _actor(request)))

    @router.post("/{release_id}/approve")
    def approve(release_id: str) -> Any:
        # The admin key is held by the loop itself: an approval it could record would satisfy
        # require_approval by the very automation the rule is there to check.
        return _error(
            403, "only a reviewer approves a release (the review page, /review/releases, with a "
            "reviewer key that may approve); the admin key cannot", "approval_needs_reviewer",
            "permission_error",
        )

    @router.post("/{release_id}/eval")
    def attach_eval(release_id: str, body: EvalRequest) -> Any:
        # A plain def runs in the thread pool: the gate verdict stored here takes about a second.
        return guarded(lambda: manager.attach_eval(release_id, body.report))

    return router


class AdminError(RuntimeError):
    """The admin API answered with an error (message from its OpenAI-shaped body)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


_RELEASE_FIELDS = {f.name for f in fields(Release)}


def release_from_api(d: dict[str, Any]) -> Release:
    """A :class:`Release` from an admin API answer (drops the runtime-only keys)."""
    return Release.from_dict({k: v for k, v in d.items() if k in _RELEASE_FIELDS})


class AdminClient:
    """The admin API of a running gateway, with ReleaseManager's verbs.

    >>> client = AdminClient("http://127.0.0.1:8000", admin_key)
    >>> rel = client.stage("runs/.../quantize/output", source={"run": "...", "stage": "quantize"})
    >>> client.promote(rel.release_id)
    """

    def __init__(self, base_url: str, admin_key: str, timeout_s: float = 900.0) -> None:
        # Staging waits for a whole vLLM start-up (up to VLLMArgs.startup_timeout_s).
        self.base_url = base_url.rstrip("/").removesuffix("/v1")
        self._client = httpx.Client(
            base_url=self.base_url,
            headers={"Authorization": f"Bearer {admin_key}"},
            timeout=httpx.Timeout(timeout_s, connect=5.0),
        )

    def _call(self, method: str, path: str, json: dict[str, Any] | None = None) -> Any:
        r = self._client.request(method, "/admin/releases" + path, json=json)
        if r.status_code >= 400:
            try:
                msg = r.json()["error"]["message"]
            except Exception:  # noqa: BLE001 - not our error shape (proxy, wrong URL)
                msg = r.text[:500]
            raise AdminError(r.status_code, msg)
        return r.json()

    def describe(self) -> list[dict[str, Any]]:
        """Releases with runtime state (``warm``, ``base_url``, ``serving``)."""
        return self._call("GET", "")["data"]

    def list(self) -> list[Release]:
        return [release_from_api(d) for d in self.describe()]

    def live(self) -> Release | None:
        found = [r for r in self.list() if r.status == "live"]
        return found[-1] if found else None

    def get(self, release_id: str) -> Release:
        return release_from_api(self._call("GET", f"/{release_id}"))

    def stage(
        self,
        model_dir: str,
        args: VLLMArgs | None = None,
        source: dict[str, Any] | None = None,
        release_id: str | None = None,
    ) -> Release:
        body = StageRequest(
            model_dir=str(model_dir), args=args, source=source or {}, release_id=release_id
        )
        return release_from_api(self._call("POST", "", body.model_dump(mode="json")))

    def promote(self, release_id: str, force: bool = False, reason: str | None = None,
                holdback: float | None = None, holdback_tenants: list[str] | None = None) -> Release:
        body = {"force": force, "reason": reason, "holdback": holdback, "holdback_tenants": holdback_tenants or []}
        return release_from_api(self._call("POST", f"/{release_id}/promote", body))

    def rollback(self, reason: str | None = None) -> Release:
        return release_from_api(self._call("POST", "/rollback", {"reason": reason}))

    def start_canary(self, release_id: str, share: float, tenants: list[str] | None = None,
                     force: bool = False, reason: str | None = None) -> Release:
        body = {"share": share, "tenants": tenants or [], "force": force, "reason": reason}
        return release_from_api(self._call("POST", f"/{release_id}/canary", body))

    def end_canary(self, reason: str) -> Release:
        return release_from_api(self._call("POST", "/canary/end", {"reason": reason}))

    def retire(self, release_id: str, reason: str | None = None) -> Release:
        return release_from_api(self._call("POST", f"/{release_id}/retire", {"reason": reason}))

    def attach_eval(self, release_id: str, report: dict[str, Any]) -> Release:
        return release_from_api(self._call("POST", f"/{release_id}/eval", {"report": report}))

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextmanager
def startup_progress(
    client: AdminClient, log: Callable[[str], Any], every_s: float = 10.0
) -> Iterator[None]:
    """While the body runs (a blocking ``client.stage``), report every ``every_s`` seconds what
    each starting release's vLLM is doing, through ``log`` (e.g. a Prefect run logger's info)."""
    stop = threading.Event()

    def report() -> None:
        while not stop.wait(every_s):
            with suppress(Exception):  # progress is best effort; the stage call reports failures
                for rel in client.describe():
                    if rel.get("starting"):
                        s = rel["starting"]
                        log(f"release {rel['release_id']}: vLLM {s['phase']}, {s['elapsed_s']:.0f}s")

    thread = threading.Thread(target=report, name="startup-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(every_s + 15)
