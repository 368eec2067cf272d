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
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from ground.config import data_dir


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


# -- the windows so far: what each run decided, for the trend artifact and the demo's table ------
def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def window_summary(run_dir: Path) -> dict:
    """One finished run, from its folder: decision, dataset version, lineage start, gate rules.

    The gate rules are those of the promoted candidate, else of the aligned one (the candidate
    whose training the window paid for), else of the first candidate gated.
    """
    outcome = _read(run_dir / "loop-result.json")
    data = _read(run_dir / "data" / "result.json")
    gate = _read(run_dir / "report" / "gate.json")
    candidates = [v for v, d in gate.items() if isinstance(d, dict) and "rules" in d]
    shown = outcome.get("winner") or ("aligned" if "aligned" in candidates else next(iter(candidates), None))
    training = {}
    for stage in ("sft", "dpo", "kto"):
        res = _read(run_dir / stage / "result.json")
        if res:
            training[stage] = {"rows": res.get("train_rows", res.get("train_pairs")), "train_s": res.get("train_s")}
    return {
        "run_id": run_dir.name,
        "window": outcome.get("window"),
        "decision": outcome.get("decision"),
        "skipped": bool(outcome.get("skipped")),
        "winner": outcome.get("winner"),
        "promoted": (outcome.get("promotion") or {}).get("release_id"),
        "start": outcome.get("start"),
        "dataset_version": data.get("dataset_version"),
        "new_examples": data.get("new_examples"),
        "rows": {k: v for k, v in (data.get("counts") or {}).items() if not k.startswith("heldout")},
        "training": training,
        "gated_variant": shown,
        "gate_verdict": (gate.get(shown) or {}).get("verdict") if shown else None,
        "rules": [
            {k: r.get(k) for k in ("rule", "metric", "value", "reference", "diff", "low", "high", "n", "verdict")}
            for r in (gate.get(shown) or {}).get("rules", [])
        ] if shown else [],
    }


def history(runs_root: Path | None = None) -> list[dict]:
    """Every run that finished (decided or skipped), oldest window first."""
    root = runs_root or data_dir() / "runs"
    done = [p.parent for p in root.glob("*/loop-result.json")]

    def end(run: Path) -> str:
        until = (_read(run / "loop-result.json").get("window") or [None, ""])[-1] or ""
        return _utc(datetime.fromisoformat(until)).isoformat() if until not in ("", "None") else ""

    return [window_summary(r) for r in sorted(done, key=lambda r: (end(r), r.name))]


def _fmt(x: object) -> str:
    if isinstance(x, float):
        return f"{x + 0.0:.3g}"  # + 0.0: a rate of -0.0 (1 - 1.0 on some path) prints as 0
    return "–" if x is None else str(x)


def trend_rows(runs: list[dict]) -> list[dict]:
    """A flat table for the Prefect UI: one row per window, a column per gate rule's value vs live."""
    rows = []
    for r in runs:
        row = {
            "window": r["run_id"], "decision": (r["decision"] or "")[:120],
            "dataset": r["dataset_version"] or "–", "new examples": _fmt(r["new_examples"]),
            "start": r["start"] or "–", "now live": r["promoted"] or "(unchanged)",
        }
        labels = Counter(rule["rule"] for rule in r["rules"])
        for rule in r["rules"]:  # a pattern rule gives one outcome per metric: name those apart
            name = rule["rule"] if labels[rule["rule"]] == 1 else f"{rule['rule']}: {rule['metric']}"
            diff = "" if rule.get("diff") is None else f" ({rule['diff']:+.3f})"
            row[str(name)] = f"{_fmt(rule['value'])} vs {_fmt(rule['reference'])}{diff} {rule['verdict'] or ''}".strip()
        rows.append(row)
    return rows
