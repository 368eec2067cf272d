"""The dataset ledger: every window's governed rows, kept, and the mix a run trains on.

Each data-stage run records its window's rows (built from feedback, PII already scrubbed) under
``<ledger>/<window id>/`` and then trains on a mix of windows, not on its own window alone:

    <ledger>/<window id>/window.json   bounds, when recorded, counts, content hash
    <ledger>/<window id>/rows.jsonl    one row a line: the dataset row + its window + answer releases

The mix (:class:`MixConfig`) is built from every window up to this one (by window end), so a
rerun of a window sees the same mix however many windows came after it:

1. cross-window conflicts: the same answer to the same prompt judged good in one window and bad
   in another. ``newest_wins`` drops the older judgment's rows; ``drop_both`` drops every row that
   judges it. (Conflicts inside one window are settled by training/preferences.py.)
2. answers from an older release: rows whose answer came from a release other than the current
   one (the live release by default) are kept, down-weighted (kept with probability ``weight``,
   chosen by a seeded hash of the row, so a row is in or out the same way every time) or dropped.
3. selection: ``all`` windows, or ``new`` windows (those the live model has not learned from:
   not in the datasets of its lineage) plus a seeded ``replay_share`` of older rows.
4. then the data stage's own governance runs on the mix: decontamination against the current
   eval sets, dedup across windows (newest window first within a source's priority), split.

A window with fewer than ``min_new_rows`` new examples (rows of new windows in the training
splits, one per feedback event across splits) is skipped, not failed: its rows stay in the ledger
and count as new for the next window.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from ground.config import StrictModel
from training.preferences import normalize_text, prompt_key

KINDS = ("sft", "dpo", "kto")
"""Row kinds the ledger keeps: SFT targets, preference pairs, unpaired (thumbs-only) labels."""


class MixConfig(StrictModel):
    """Which windows of the ledger a run trains on, and the rules applied across windows."""

    path: str | None = Field(None, description="Ledger folder; default <data dir>/ledger.")
    windows: Literal["all", "new"] = Field(
        "all",
        description="'all': every window to date; 'new': windows the live model has not learned "
        "from yet (plus replay_share of older rows).",
    )
    replay_share: float = Field(
        0.0, ge=0, lt=1,
        description="With windows=new: share of each training split drawn from older windows "
        "(seeded sample), against forgetting.",
    )
    trained_windows: list[str] | None = Field(
        None,
        description="Windows the live model already learned from; None = none (the loop and "
        "`alignloop data build` fill it from the live release's lineage).",
    )
    min_new_rows: int = Field(
        8, ge=0,
        description="Fewer new examples than this (rows of new windows in the training splits, one "
        "per feedback event) and the window is skipped: 'not enough new feedback'.",
    )
    conflicts: Literal["newest_wins", "drop_both"] = Field(
        "newest_wins",
        description="An answer judged good in one window and bad in another: keep the newest "
        "judgment, or drop every row that judges it.",
    )
    older_release: Literal["keep", "downweight", "drop"] = Field(
        "keep",
        description="Rows whose answer came from a release other than the current one.",
    )
    older_release_weight: float = Field(
        0.5, gt=0, lt=1,
        description="With older_release=downweight: the share of such rows kept (seeded by row).",
    )
    current_releases: list[str] | None = Field(
        None,
        description="Releases whose answers count as current; None = every answer is current (the "
        "loop and `alignloop data build` set the live release).",
    )
    seed: int = Field(0, description="Seed of the replay sample and of down-weighting.")


@dataclass
class WindowEntry:
    """One window of the ledger (``window.json``)."""

    id: str
    since: str | None
    until: str | None
    recorded_at: str
    counts: dict[str, int]
    rows_hash: str

    @property
    def order(self) -> tuple[str, str]:
        """Windows are ordered by their end (when recorded, for windows without one), then id."""
        return (_utc_iso(self.until or self.recorded_at), self.id)


def _utc_iso(stamp: str) -> str:
    t = datetime.fromisoformat(stamp)
    t = t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)
    return t.isoformat()


def row_id(row: dict[str, Any]) -> str:
    """A row's identity: content + provenance, not the window it was recorded in."""
    body = {k: v for k, v in row.items() if k != "window"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class Ledger:
    """The ledger folder: record a window's rows, list windows, read rows back."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def windows(self) -> list[WindowEntry]:
        """Every recorded window, oldest first."""
        out = []
        for meta in self.root.glob("*/window.json"):
            out.append(WindowEntry(**json.loads(meta.read_text())))
        return sorted(out, key=lambda w: w.order)

    def get(self, window_id: str) -> WindowEntry | None:
        meta = self.root / window_id / "window.json"
        return WindowEntry(**json.loads(meta.read_text())) if meta.is_file() else None

    def record(
        self, window_id: str, since: str | None, until: str | None, rows: dict[str, list[dict]]
    ) -> WindowEntry:
        """Keep a window's rows (by kind). Recording the same rows again changes nothing."""
        lines = [
            json.dumps({"kind": kind, "row": {**row, "window": window_id}}, sort_keys=True)
            for kind in KINDS for row in rows.get(kind, [])
        ]
        digest = hashlib.sha256("\n".join(lines).encode()).hexdigest()
        old = self.get(window_id)
        if old is not None and old.rows_hash == digest and (old.since, old.until) == (since, until):
            return old
        folder = self.root / window_id
        folder.mkdir(parents=True, exist_ok=True)
        entry = WindowEntry(
            id=window_id, since=since, until=until,
            recorded_at=datetime.now(UTC).isoformat(timespec="seconds"),
            counts={kind: len(rows.get(kind, [])) for kind in KINDS}, rows_hash=digest,
        )
        _write_atomic(folder / "rows.jsonl", "".join(line + "\n" for line in lines))
        _write_atomic(folder / "window.json", json.dumps(asdict(entry), indent=2))
        return entry

    def upto(self, entry: WindowEntry) -> list[WindowEntry]:
        """The windows that end no later than ``entry`` (itself included), oldest first."""
        return [w for w in self.windows() if w.order <= entry.order]

    def rows(self, windows: list[WindowEntry]) -> dict[str, list[dict]]:
        """The rows of ``windows`` by kind, oldest window first."""
        out: dict[str, list[dict]] = {kind: [] for kind in KINDS}
        for w in windows:
            for line in (self.root / w.id / "rows.jsonl").read_text().splitlines():
                if line.strip():
                    item = json.loads(line)
                    out[item["kind"]].append(item["row"])
        return out

    def fingerprint(self, windows: list[WindowEntry], exclude: str) -> str:
        """Content hash of the windows a run mixes, except its own (its sources are hashed apart)."""
        parts = [(w.id, w.rows_hash) for w in windows if w.id != exclude]
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


# -- the rules applied across windows ----------------------------------------------------------
def _judgments(kind: str, row: dict[str, Any]) -> list[tuple[tuple[str, str], bool]]:
    """What a row says: ((prompt, answer), good?) for every answer it judges."""
    key = prompt_key(row["prompt"])
    text = lambda f: normalize_text(row[f][0]["content"])  # noqa: E731
    if kind == "sft":
        return [((key, text("completion")), True)]
    if kind == "dpo":
        return [((key, text("chosen")), True), ((key, text("rejected")), False)]
    return [((key, text("completion")), bool(row["label"]))]


def resolve_conflicts(
    rows: dict[str, list[dict]], order: dict[str, int], rule: str
) -> tuple[dict[str, list[dict]], dict[str, int]]:
    """Settle answers judged good in one window and bad in another.

    Args:
        rows: rows by kind; each has a ``window``.
        order: window id -> position (higher = newer).
        rule: ``newest_wins`` (the newest window's judgment stands) or ``drop_both``.

    Returns:
        (kept rows by kind, {"answers_in_conflict": n, "rows_dropped": n}).
    """
    seen: dict[tuple[str, str], dict[bool, set[int]]] = defaultdict(lambda: {True: set(), False: set()})
    for kind, items in rows.items():
        for row in items:
            for key, good in _judgments(kind, row):
                seen[key][good].add(order[row["window"]])
    # Only disagreements between windows: one window saying both is settled by the row builder.
    conflicted = {
        key: by for key, by in seen.items()
        if by[True] and by[False] and (by[True] | by[False]) != (by[True] & by[False])
    }

    def dropped(kind: str, row: dict) -> bool:
        for key, good in _judgments(kind, row):
            by = conflicted.get(key)
            if by is None:
                continue
            if rule == "drop_both":
                return True
            newest = max(by[True] | by[False])
            if newest not in by[good]:  # a newer window judged this answer the other way
                return True
        return False

    kept = {kind: [r for r in items if not dropped(kind, r)] for kind, items in rows.items()}
    n_dropped = sum(len(rows[k]) - len(kept[k]) for k in rows)
    return kept, {"answers_in_conflict": len(conflicted), "rows_dropped": n_dropped}


def _unit(seed: int, rid: str) -> float:
    """A number in [0, 1) fixed by (seed, row): the same row is always in or out."""
    return int(hashlib.sha256(f"{seed}:{rid}".encode()).hexdigest()[:12], 16) / 16**12


def apply_release_policy(
    rows: dict[str, list[dict]], current: set[str], policy: str, weight: float, seed: int
) -> tuple[dict[str, list[dict]], dict[str, Any]]:
    """Keep, down-weight (keep a seeded ``weight`` share) or drop rows answered by an older release.

    A row is "older" when one of its answers came from a release not in ``current``; rows with no
    release (JSONL files) and every row when ``current`` is empty count as current.
    """
    older = lambda r: bool(current) and any(rel not in current for rel in r["releases"])  # noqa: E731
    stats: Counter[str] = Counter()
    kept: dict[str, list[dict]] = {}
    for kind, items in rows.items():
        kept[kind] = []
        for row in items:
            if not older(row):
                kept[kind].append(row)
                continue
            stats["older"] += 1
            if policy == "keep" or (policy == "downweight" and _unit(seed, row_id(row)) < weight):
                kept[kind].append(row)
            else:
                stats["dropped"] += 1
    return kept, {"policy": policy, "current_releases": sorted(current), **stats}


def select(
    rows: dict[str, list[dict]], new_windows: set[str], cfg: MixConfig
) -> tuple[dict[str, list[dict]], dict[str, Any]]:
    """All windows, or new windows plus a seeded replay share of older rows (per kind)."""
    if cfg.windows == "all":
        return rows, {"windows": "all"}
    out: dict[str, list[dict]] = {}
    replayed: dict[str, int] = {}
    for kind, items in rows.items():
        new = [r for r in items if r["window"] in new_windows]
        old = [r for r in items if r["window"] not in new_windows]
        k = min(len(old), round(cfg.replay_share / (1 - cfg.replay_share) * len(new)))
        picked = set(sorted(range(len(old)), key=lambda i: _unit(cfg.seed, row_id(old[i])))[:k])
        out[kind] = [r for i, r in enumerate(old) if i in picked] + new
        replayed[kind] = k
    return out, {"windows": "new", "replay_share": cfg.replay_share, "replayed": replayed}


def new_examples(splits: dict[str, list[dict]], new_windows: set[str]) -> int:
    """Distinct feedback events (or curated rows) behind the training rows of new windows.

    An edit gives an SFT row and a DPO pair, a thumbs-up an SFT row and a KTO row: each counts once.
    """
    keys = {
        (tuple(r["request_ids"]), tuple(r["feedback_ids"]))
        for split in KINDS for r in splits.get(split, []) if r["window"] in new_windows
    }
    return len(keys)


def dataset_version(splits: dict[str, list[dict]]) -> str:
    """A short content id of the rows a run trains and holds out on: 'ds-' + 12 hex digits."""
    ids = {s: [row_id(r) for r in rows] for s, rows in sorted(splits.items())}
    return "ds-" + hashlib.sha256(json.dumps(ids).encode()).hexdigest()[:12]


@dataclass
class MixSummary:
    """What the manifest records about the ledger for one run."""

    path: str
    window: str
    windows: list[dict[str, Any]] = field(default_factory=list)
    trained_windows: list[str] = field(default_factory=list)
    new_windows: list[str] = field(default_factory=list)
