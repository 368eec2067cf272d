"""Feedback on served answers: checked against the log (whose request, anything new?), stored.

The body was validated already (ground.protocol.FeedbackRequest); here it is held against what
was served: every request id it names must be the tenant's and logged, and it must say something
about the answer it rates (no edit equal to the answer, no preference between equal answers).
"""

from __future__ import annotations

from typing import Any

from ground.logstore import ActorRole, LogStore
from ground.protocol import FeedbackRequest
from serving.gateway.wire import FeedbackResponse, GatewayError


def store_feedback(
    store: LogStore,
    req: FeedbackRequest,
    tenant: str,
    *,
    actor: str | None,
    actor_role: ActorRole,
    simulated: bool,
    wait_s: float,
) -> FeedbackResponse:
    """Store one feedback event; 404 unless every referenced request id is this tenant's
    (410 for one answered but not logged), 400 for feedback that carries no information.

    ``actor``/``actor_role`` say who gave it as the server knows it (a reviewer signed in to
    the review page); they are never read from the request body. Through the API, the actor
    is the end user the answer was served to (the chat request's ``user``, None if it had
    none) and the role is ``simulated`` for a tenant flagged so in the config, else ``user``.
    The ids are looked up without waiting for the log writer's backlog
    (``LogStore.exchange_params`` also sees rows still queued), except for the one row they
    name, for up to ``wait_s``. ``simulated``: the tenant is flagged so in the config.
    """
    found = store.exchange_brief(req.request_id, tenant=tenant, wait_s=wait_s)
    if found is None:
        raise _not_found(store, req.request_id, tenant, "request_id")
    params = found["params"]
    if actor_role in ("user", "simulated"):
        if actor is None:
            actor = params.get("user")
        if simulated:
            actor_role = "simulated"
    other = req.preference.other_request_id if req.preference else None
    other_found = None
    if other is not None:
        other_found = store.exchange_brief(other, tenant=tenant, wait_s=wait_s)
        if other_found is None:
            raise _not_found(store, other, tenant, "preference.other_request_id")
    _refuse_no_information(req, found.get("response"), other_found)
    kind, payload = req.kind_and_payload()
    fid, created = store.add_feedback(
        req.request_id, tenant, kind, payload, req.comment, actor=actor, actor_role=actor_role
    )
    return FeedbackResponse(id=fid, created=created, actor_role=actor_role)


def _not_found(store: LogStore, request_id: str, tenant: str, param: str) -> GatewayError:
    """404 for an unknown id; 410 for one that was answered but whose log row was dropped
    (a full log queue): feedback on it cannot be stored, and sending it again will not help."""
    if _was_dropped(store, request_id, tenant):
        return GatewayError(
            410,
            f"request {request_id!r} was answered but not logged (the gateway's log queue was "
            "full), so feedback on it cannot be stored",
            param=param,
            code="request_not_logged",
        )
    return GatewayError(404, f"no request with id {request_id!r}", param=param, code="not_found")


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
