"""Sources of the data stage: the gateway's log store (a time window) and JSONL files.

Both are read into the same two record types, :class:`Exchange` (a prompt and the answer served
for it) and :class:`Feedback` (a rating, preference or edit attached to an exchange id), so the
row builder (training/preferences.py) does not care where they came from.

JSONL files hold one exchange per line in either common OpenAI chat format:

- ``{"messages": [..., {"role": "assistant", "content": "..."}]}`` (the answer is the last turn);
- ``{"request": {"messages": [...]}, "response": {"choices": [{"message": {...}}]}}`` as
  chat-completions APIs log them (each side may also be wrapped as ``{"body": {...}}``, the
  Batch API's shape).

A line may carry ``"id"`` and ``"feedback": [...]`` whose items have the feedback API's shapes
(``{"rating": {"score": 5}}``, ``{"preference": {...}}``, ``{"edit": {"text": "..."}}``). Reading is
strict: a bad line is skipped and reported with its line number and reason; a file with no good
line is an error.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

ROLES = ("system", "user", "assistant", "tool", "developer")
FEEDBACK_KINDS = ("rating", "preference", "edit")


class DataError(ValueError):
    """Input that cannot become a dataset (unreadable file, empty window). The message says why."""


class EmptyWindow(DataError):
    """The log store window holds no feedback: a quiet window, which the data stage skips."""


@dataclass
class Exchange:
    """One served answer: the request's messages (ending with the user turn) and the response."""

    id: str
    tenant: str
    prompt: list[dict[str, str]]
    response: str
    source: str
    created_at: datetime | None = None
    release: str | None = None
    status: str = "ok"


@dataclass
class Feedback:
    """One feedback event on an exchange (kind: rating | preference | edit)."""

    id: str
    request_id: str
    kind: str
    payload: dict[str, Any]
    tenant: str = ""
    comment: str | None = None
    created_at: datetime | None = None
    actor: str | None = None  # who gave it, as the server recorded it (training/trust.py)
    actor_role: str = "user"  # user | reviewer | simulated, set by the server


@dataclass
class SourceBatch:
    """What the sources produced: exchanges by id, feedback in time order, and what was skipped."""

    exchanges: dict[str, Exchange] = field(default_factory=dict)
    feedback: list[Feedback] = field(default_factory=list)
    curated: set[str] = field(default_factory=set)  # JSONL exchanges without feedback
    bad_lines: list[dict[str, Any]] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)


def check_messages(messages: Any, where: str = "messages") -> list[dict[str, str]]:
    """Validate an OpenAI chat message list; return it as plain role/content dicts.

    Raises:
        ValueError: naming the first bad message and field.
    """
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: expected a non-empty list of messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"{where}[{i}]: expected an object with role and content")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise ValueError(f"{where}[{i}].role: {role!r} is not one of {list(ROLES)}")
        if isinstance(content, list):  # content parts: keep the text ones
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        if not isinstance(content, str):
            raise ValueError(f"{where}[{i}].content: expected a string")
        out.append({"role": role, "content": content})
    return out


def check_feedback(kind: str, payload: Any) -> dict[str, Any]:
    """Validate one feedback payload of ``kind``; return it normalized (ratings get a score).

    Raises:
        ValueError: naming the bad field.
    """
    if kind not in FEEDBACK_KINDS:
        raise ValueError(f"feedback kind: {kind!r} is not one of {list(FEEDBACK_KINDS)}")
    if not isinstance(payload, dict):
        raise ValueError(f"{kind}: expected an object")
    if kind == "rating":
        score = payload.get("score")
        if score is None and payload.get("thumbs") in ("up", "down"):
            score = 5 if payload["thumbs"] == "up" else 1
        if isinstance(score, bool) or not isinstance(score, int | float) or not 1 <= score <= 5:
            raise ValueError(f"rating.score: expected a number from 1 to 5 (got {score!r})")
        return {**payload, "score": score}
    if kind == "edit":
        if not isinstance(payload.get("text"), str) or not payload["text"].strip():
            raise ValueError("edit.text: expected a non-empty string")
        return payload
    if isinstance(payload.get("better_text"), str) and payload["better_text"].strip():
        return payload
    if not isinstance(payload.get("other_request_id"), str):
        raise ValueError("preference: expected other_request_id + preferred, or better_text")
    if payload.get("preferred") not in ("this", "other"):
        raise ValueError(
            f"preference.preferred: expected 'this' or 'other' (got {payload.get('preferred')!r})"
        )
    return payload


# -- log store ----------------------------------------------------------------------------------
def load_logstore(
    url: str,
    since: datetime | None,
    until: datetime | None,
    tenants: list[str] | None = None,
    releases: list[str] | None = None,
    batch: SourceBatch | None = None,
) -> SourceBatch:
    """Read the feedback of a window and the exchanges it refers to from the log store.

    The window selects feedback (when the user reacted); the exchanges are looked up by id, so
    feedback on an answer served just before the window is not lost between scheduled runs.
    Tenant and release filters apply to the exchanges.

    Raises:
        EmptyWindow: "no feedback in window ..." when the window holds no feedback at all.
    """
    # lazy: ground.logstore loads sqlalchemy
    from ground.logstore import LogStore

    batch = batch or SourceBatch()
    store = LogStore(url)
    try:
        in_window = {e["id"]: e for e in store.exchanges(since, until, tenants, releases)}
        events = list(store.feedback_events(since, until, tenants))
        window = (
            f"[{since.isoformat() if since else '-inf'}, {until.isoformat() if until else 'now'})"
        )
        if not events:
            batch.stats["logstore"] = {
                "url": _safe_url(url), "window": window, "exchanges_in_window": len(in_window),
                "feedback_in_window": 0,
            }
            raise EmptyWindow(
                f"no feedback in window {window} (tenants={tenants or 'all'}, "
                f"releases={releases or 'all'}): {len(in_window)} exchanges, 0 feedback events; "
                "nothing to train on"
            )
        skipped: dict[str, int] = {}

        def fetch(rid: str) -> dict[str, Any] | None:
            row = in_window.get(rid) or store.get_exchange(rid)
            if row is None or (tenants and row["tenant"] not in tenants):
                return None
            if releases and row.get("release") not in releases:
                return None
            return row

        for ev in events:
            try:
                payload = check_feedback(ev["kind"], ev["payload"])
            except ValueError as err:
                skipped[f"invalid feedback ({err})"] = (
                    skipped.get(f"invalid feedback ({err})", 0) + 1
                )
                continue
            rids = [ev["request_id"]]
            if ev["kind"] == "preference" and "other_request_id" in payload:
                rids.append(payload["other_request_id"])
            for rid in rids:
                if rid in batch.exchanges:
                    continue
                row = fetch(rid)
                if row is not None:
                    batch.exchanges[rid] = _exchange_from_row(row)
            batch.feedback.append(
                Feedback(
                    ev["id"],
                    ev["request_id"],
                    ev["kind"],
                    payload,
                    ev["tenant"],
                    ev.get("comment"),
                    ev["created_at"],
                    ev.get("actor"),
                    ev.get("actor_role") or "user",
                )
            )
        batch.stats["logstore"] = {
            "url": _safe_url(url),
            "window": window,
            "tenants": tenants or "all",
            "releases": releases or "all",
            "exchanges_in_window": len(in_window),
            "feedback_in_window": len(events),
            "feedback_skipped": skipped,
        }
    finally:
        store.close()
    return batch


def _exchange_from_row(row: dict[str, Any]) -> Exchange:
    return Exchange(
        id=row["id"],
        tenant=row["tenant"],
        prompt=[dict(m) for m in row["messages"]],
        response=row.get("response") or "",
        source="logstore",
        created_at=row["created_at"],
        release=row.get("release"),
        status=row.get("status") or "ok",
    )


def _safe_url(url: str) -> str:
    """The URL without a password (it goes into the manifest)."""
    # lazy: sqlalchemy, about half a second
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


# -- JSONL --------------------------------------------------------------------------------------
def _body(obj: Any, name: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise ValueError(f"{name}: expected an object")
    return obj["body"] if isinstance(obj.get("body"), dict) else obj


def parse_jsonl_line(obj: Any, default_id: str) -> tuple[Exchange, list[tuple[str, dict]]]:
    """One JSONL record -> (exchange, [(feedback kind, payload)]).

    Raises:
        ValueError: naming the bad field.
    """
    if not isinstance(obj, dict):
        raise ValueError("expected a JSON object")
    if "messages" in obj:
        messages = check_messages(obj["messages"])
        if messages[-1]["role"] != "assistant":
            raise ValueError("messages: the last message must be the assistant's answer")
        prompt, response = messages[:-1], messages[-1]["content"]
        rid = obj.get("id")
    elif "request" in obj and "response" in obj:
        request, response_body = (
            _body(obj["request"], "request"),
            _body(obj["response"], "response"),
        )
        prompt = check_messages(request.get("messages"), "request.messages")
        choices = response_body.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            raise ValueError("response.choices: expected a non-empty list")
        message = choices[0].get("message") or {}
        response = message.get("content") if isinstance(message, dict) else None
        if not isinstance(response, str):
            raise ValueError("response.choices[0].message.content: expected a string")
        rid = obj.get("id") or obj.get("custom_id") or response_body.get("id")
    else:
        raise ValueError("expected 'messages' or 'request' + 'response'")
    if not prompt or prompt[-1]["role"] != "user":
        raise ValueError("messages: the prompt must end with a user message")
    if not response.strip():
        raise ValueError("the assistant's answer is empty")
    feedback = []
    items = obj.get("feedback", [])
    if not isinstance(items, list):
        raise ValueError("feedback: expected a list")
    for i, item in enumerate(items):
        kinds = [k for k in FEEDBACK_KINDS if isinstance(item, dict) and k in item]
        if len(kinds) != 1:
            raise ValueError(f"feedback[{i}]: expected exactly one of {list(FEEDBACK_KINDS)}")
        try:
            feedback.append((kinds[0], check_feedback(kinds[0], item[kinds[0]])))
        except ValueError as err:
            raise ValueError(f"feedback[{i}].{err}") from None
    ex = Exchange(
        id=str(rid or default_id),
        tenant=str(obj.get("tenant", "jsonl")),
        prompt=prompt,
        response=response,
        source="jsonl",
    )
    return ex, feedback


def load_jsonl(path: str | Path, batch: SourceBatch | None = None) -> SourceBatch:
    """Read one JSONL file into ``batch``; bad lines are recorded in ``batch.bad_lines``.

    Raises:
        DataError: the file is missing, not UTF-8, or has no readable line.
    """
    path = Path(path)
    batch = batch or SourceBatch()
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DataError(f"jsonl source {path}: file not found") from None
    except UnicodeDecodeError as err:
        raise DataError(
            f"jsonl source {path}: not UTF-8 text ({err.reason} at byte {err.start})"
        ) from None
    good, bad = 0, 0
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            ex, feedback = parse_jsonl_line(json.loads(line), f"{path.name}:{lineno}")
            if ex.id in batch.exchanges:
                raise ValueError(f"id: {ex.id!r} already used by an earlier line")
        except (ValueError, TypeError) as err:  # json.JSONDecodeError is a ValueError
            reason = (
                f"invalid JSON: {err.msg}" if isinstance(err, json.JSONDecodeError) else str(err)
            )
            batch.bad_lines.append({"file": str(path), "line": lineno, "reason": reason})
            bad += 1
            continue
        good += 1
        batch.exchanges[ex.id] = ex
        if not feedback:
            batch.curated.add(ex.id)
        for k, (kind, payload) in enumerate(feedback):
            batch.feedback.append(Feedback(f"{ex.id}#fb{k}", ex.id, kind, payload, ex.tenant))
    if good == 0:
        raise DataError(
            f"jsonl source {path}: no readable line ({bad} bad"
            + (
                f"; first: line {batch.bad_lines[-bad]['line']}: {batch.bad_lines[-bad]['reason']}"
                if bad
                else ""
            )
            + ")"
        )
    batch.stats.setdefault("jsonl", []).append({"path": str(path), "rows": good, "bad_lines": bad})
    return batch
