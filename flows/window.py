"""Data windows of scheduled runs: each run takes the feedback since the last successful one.

State lives in ``<data dir>/loop-state.json``:
- ``last_until``: where the last successful run's window ended (the next one starts there);
- ``pending``: the window of a run that started and has not succeeded yet. A run without an
  explicit window resumes the pending one when its datasets were already built (its run folder
  then holds finished stages that are skipped), so a failed run is retried on the same data.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from training.config import data_dir


@dataclass(frozen=True)
class Window:
    since: datetime | None
    until: datetime

    @property
    def label(self) -> str:
        return label(self.since, self.until)

    @property
    def run_id(self) -> str:
        return "w-" + self.label


def _stamp(t: datetime | str | None) -> str:
    if t is None:
        return "start"
    if isinstance(t, str):
        t = datetime.fromisoformat(t)
    return _utc(t).strftime("%Y%m%dT%H%M%SZ")


def _utc(t: datetime) -> datetime:
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)


def label(since: datetime | str | None, until: datetime | str | None) -> str:
    """``<since>_<until>`` in compact UTC (``start`` for an open start, ``now`` for an open end)."""
    return f"{_stamp(since)}_{_stamp(until) if until is not None else 'now'}"


def artifact_key(run_id: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9-]+", "-", run_id.lower()).strip("-")


def state_file() -> Path:
    return data_dir() / "loop-state.json"


def _load() -> dict:
    try:
        return json.loads(state_file().read_text())
    except (OSError, ValueError):
        return {}


def _save(state: dict) -> None:
    path = state_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2, default=str))
    tmp.replace(path)


def _from_state(d: dict) -> Window:
    since = datetime.fromisoformat(d["since"]) if d.get("since") else None
    return Window(since, datetime.fromisoformat(d["until"]))


def resolve(since: datetime | None, until: datetime | None, now: datetime | None = None) -> Window:
    """The window to run: explicit bounds win; else a resumable pending one; else last success -> now."""
    state = _load()
    if since is None and until is None and state.get("pending"):
        pending = _from_state(state["pending"])
        if (data_dir() / "runs" / pending.run_id / "data" / "result.json").is_file():
            return pending
    if since is None and state.get("last_until"):
        since = datetime.fromisoformat(state["last_until"])
    until = until or (now or datetime.now(UTC)).replace(microsecond=0)
    return Window(_utc(since) if since else None, _utc(until))


def mark_pending(win: Window) -> None:
    state = _load()
    state["pending"] = {"since": win.since.isoformat() if win.since else None, "until": win.until.isoformat()}
    _save(state)


def mark_success(win: Window) -> None:
    state = _load()
    last = state.get("last_until")
    if last is None or datetime.fromisoformat(last) < win.until:
        state["last_until"] = win.until.isoformat()
    state.pop("pending", None)
    state["last_success"] = {"run_id": win.run_id, "at": datetime.now(UTC).isoformat()}
    _save(state)
