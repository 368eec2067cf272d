"""What the review page shows, as plain data: the queue (a window of exchanges, filtered and
sampled), PII redaction for display, and a release's lineage, eval report and held-out answers.

No web framework here (:mod:`serving.review.page` renders it), so each piece is testable on its own.
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from pydantic import Field
from sqlalchemy import select

from evals.render import (
    GAIN_HEADER,
    GAIN_NOTE,
    decision_facts,
    decision_word,
    rule_rows,
    verdict_of,
)
from ground.config import StrictModel
from ground.logstore import LogStore, feedback_table
from guardrails.pii import default_detector

VerdictFilter = Literal["any", "allow", "flagged", "redact", "block"]
FeedbackFilter = Literal["any", "none", "unreviewed", "reviewed", "user"]
REVIEWABLE_STATUS = ("ok", "blocked")  # exchanges that have an answer to look at


class QueueQuery(StrictModel):
    """The queue's filters (the page's query string)."""

    hours: float = Field(24.0, gt=0, le=24 * 366, description="Window: the last this many hours.")
    tenant: str | None = Field(None, description="Only this tenant (default: all you may review).")
    release: str | None = Field(None, description="Only answers of this release.")
    verdict: VerdictFilter = Field(
        "any", description="Guardrail verdicts: any, allow (nothing fired), flagged, redact, block."
    )
    feedback: FeedbackFilter = Field(
        "any",
        description="any, none (no feedback yet), unreviewed, reviewed (by a reviewer), user.",
    )
    n: int = Field(25, ge=1, le=500, description="Sample size (stratified by release and tenant).")
    seed: int = Field(0, ge=0, description="Sampling seed: the same seed shows the same slice.")


@dataclass
class Queue:
    items: list[dict[str, Any]]
    total: int  # exchanges that matched the filters, before sampling
    strata: dict[str, int]  # "release / tenant" -> matched count
    releases: list[str] = field(default_factory=list)  # every release seen in the window
    tenants: list[str] = field(default_factory=list)


def verdict_actions(ex: dict[str, Any]) -> set[str]:
    actions = {v.get("action", "allow") for v in ex.get("verdicts") or []}
    if ex.get("status") == "blocked":
        actions.add("block")
    return actions


def _verdict_ok(ex: dict[str, Any], want: VerdictFilter) -> bool:
    actions = verdict_actions(ex)
    if want == "any":
        return True
    if want == "allow":
        return actions <= {"allow"}
    if want == "flagged":
        return bool(actions - {"allow"})
    return want in actions


def _feedback_ok(rows: list[dict[str, Any]], want: FeedbackFilter) -> bool:
    roles = {r["actor_role"] for r in rows}
    return {
        "any": True,
        "none": not rows,
        "unreviewed": "reviewer" not in roles,
        "reviewed": "reviewer" in roles,
        "user": bool(roles - {"reviewer"}),
    }[want]


def feedback_by_request(store: LogStore, request_ids: Iterable[str]) -> dict[str, list[dict]]:
    """Feedback rows (any tenant's, any actor's) for these exchange ids, oldest first."""
    out: dict[str, list[dict]] = defaultdict(list)
    ids = list(request_ids)
    t = feedback_table
    with store.engine.connect() as conn:
        for i in range(0, len(ids), 500):  # SQLite's bound-parameter limit
            q = select(t).where(t.c.request_id.in_(ids[i : i + 500])).order_by(t.c.created_at)
            for row in conn.execute(q).mappings():
                out[row["request_id"]].append(dict(row))
    return out


def stratified_sample(
    items: list[dict[str, Any]],
    n: int,
    seed: int,
    key=lambda ex: (ex["release"], ex["tenant"]),  # noqa: ANN001
) -> list[dict[str, Any]]:
    """``n`` items drawn so each stratum (release, tenant) keeps its share of the window.

    Proportional allocation by largest remainder, at least one item per stratum while ``n``
    allows, then a seeded draw inside each stratum: a reviewer sees a representative slice
    rather than the newest burst of one tenant. With ``n >= len(items)`` everything is kept.
    """
    if n >= len(items):
        return list(items)
    groups: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    for ex in items:
        groups[key(ex)].append(ex)
    keys = sorted(groups, key=lambda k: tuple("" if p is None else str(p) for p in k))
    quota = {k: 0 for k in keys}
    budget = n
    if n >= len(keys):
        for k in keys:
            quota[k], budget = 1, budget - 1
    shares = {k: budget * len(groups[k]) / len(items) for k in keys}
    for k in keys:
        quota[k] += min(int(shares[k]), len(groups[k]) - quota[k])
    left = n - sum(quota.values())
    by_remainder = sorted(
        keys, key=lambda k: (shares[k] - int(shares[k]), len(groups[k])), reverse=True
    )
    while left > 0:
        for k in by_remainder:
            if left and quota[k] < len(groups[k]):
                quota[k] += 1
                left -= 1
    rng = random.Random(seed)
    picked = [ex for k in keys for ex in rng.sample(groups[k], quota[k])]
    return picked


def load_queue(
    store: LogStore, q: QueueQuery, allowed_tenants: list[str] | None, now: datetime | None = None
) -> Queue:
    """The exchanges a reviewer sees: window, tenant scope, filters, stratified sample."""
    now = now or datetime.now(UTC)
    tenants = [q.tenant] if q.tenant else allowed_tenants
    if q.tenant and allowed_tenants is not None and q.tenant not in allowed_tenants:
        tenants = []
    if tenants == []:
        return Queue([], 0, {})
    window = [
        ex
        for ex in store.exchanges(since=now - timedelta(hours=q.hours), until=now, tenants=tenants)
        if ex["status"] in REVIEWABLE_STATUS
    ]
    releases = sorted({ex["release"] for ex in window if ex["release"]})
    seen_tenants = sorted({ex["tenant"] for ex in window})
    feedback = feedback_by_request(store, [ex["id"] for ex in window])
    matched = [
        ex
        for ex in window
        if (q.release is None or ex["release"] == q.release)
        and _verdict_ok(ex, q.verdict)
        and _feedback_ok(feedback.get(ex["id"], []), q.feedback)
    ]
    strata: dict[str, int] = defaultdict(int)
    for ex in matched:
        strata[f"{ex['release'] or '-'} / {ex['tenant']}"] += 1
    items = stratified_sample(matched, q.n, q.seed)
    items.sort(key=lambda ex: ex["created_at"], reverse=True)
    for ex in items:
        ex["feedback"] = feedback.get(ex["id"], [])
    return Queue(items, len(matched), dict(sorted(strata.items())), releases, seen_tenants)


# -- PII on display ----------------------------------------------------------------------------
def redact_for_display(text: str | None) -> str:
    """``text`` with PII replaced by ``<ENTITY>``: what the store holds passed the input
    guardrails, but answers, older rows and other chains may still carry some."""
    if not text:
        return text or ""

    return default_detector().redact(text)[0]


def message_text(message: dict[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(p.get("text", "") for p in content if p.get("type") == "text")
    return ""


def display_exchange(ex: dict[str, Any]) -> dict[str, Any]:
    """The exchange as the page shows it: every text redacted."""
    return {
        **ex,
        "turns": [
            {"role": m.get("role", "?"), "text": redact_for_display(message_text(m))}
            for m in ex.get("messages") or []
        ],
        "answer": redact_for_display(ex.get("response")),
        "actions": sorted(verdict_actions(ex) - {"allow"}),
    }


# -- releases: lineage, eval report, held-out answers ------------------------------------------
SAMPLES_FILE = "quality_samples.jsonl"


def eval_samples_path(run_dir: str | Path, variant: str) -> Path:
    """Where the eval stage of ``variant`` left its held-out answers: the quality suite writes
    them into the stage's ``output/`` folder (older runs: the stage folder itself)."""
    stage = Path(run_dir) / f"evals-{variant}"
    for path in (stage / "output" / SAMPLES_FILE, stage / SAMPLES_FILE):
        if path.is_file():
            return path
    return stage / "output" / SAMPLES_FILE


def read_eval_samples(run_dir: str | Path, variant: str) -> dict[str, dict[str, Any]]:
    """``{item key: row}`` from the eval stage's ``quality_samples.jsonl``.

    The key is the row's item id (``id``, or ``item_id``) when the file has one, else task +
    prompt: the one place that knows the samples' format, so a format change is followed here
    only. Task and id together: ids are unique within a task only.
    """
    path = eval_samples_path(run_dir, variant)
    out: dict[str, dict[str, Any]] = {}
    if not path.is_file():
        return out
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        item = row.get("item_id") or row.get("id")
        key = f"{row.get('task', '')}\x1f{item if item else row.get('prompt', '')}"
        out[key] = row
    return out


def side_by_side(run_dir: str | Path, variant: str, baseline: str = "baseline") -> list[dict]:
    """Held-out prompts with live's and the candidate's answers, in the live file's order."""
    live, cand = read_eval_samples(run_dir, baseline), read_eval_samples(run_dir, variant)
    rows = []
    for key, a in live.items():
        b = cand.get(key)
        if b is None:
            continue
        rows.append(
            {
                "task": a.get("task", ""),
                "prompt": a.get("prompt", ""),
                "reference": a.get("answer", ""),
                "live": redact_for_display(a.get("response")),
                "candidate": redact_for_display(b.get("response")),
                "same": (a.get("response") or "").strip() == (b.get("response") or "").strip(),
            }
        )
    return rows


def _json(path: str | Path | None) -> dict[str, Any]:
    if not path:
        return {}
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}


REPORT_PLOTS = ("latency_vs_throughput.png", "quality_safety_vs_cost.png")
HEADLINE = (
    ("quality.policy.compliance", "policy compliance", "pct"),
    ("quality.capability.mean_answer_match", "capability (mean of tasks)", "pct"),
    ("quality.answer_tokens_mean", "tokens per answer", "num"),
    ("safety.attack_block_rate", "attacks stopped", "pct"),
    ("safety.overblock_rate", "benign over-blocked", "pct"),
    ("perf.ttft_p95_ms", "p95 TTFT at the workload's concurrency (ms)", "num"),
    ("perf.output_tokens_per_s", "output tok/s at the workload's concurrency", "num"),
    ("cost.usd_per_1m_output_tokens", "$ per 1M output tokens", "usd"),
)


def _fmt(value: Any, kind: str) -> str:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return "n/a"
    return {"pct": f"{value:.1%}", "usd": f"${value:.3f}"}.get(kind, f"{value:.4g}")


def release_view(release: Any) -> dict[str, Any]:
    """Everything the release page shows about ``release`` (a :class:`~serving.releases.records.Release`)."""
    source = dict(release.source or {})
    attached = _json(release.eval_report)
    run_dir = source.get("run_dir") or attached.get("run_dir")
    variant = source.get("variant") or attached.get("variant")
    gate = attached.get("gate") or {}
    view: dict[str, Any] = {
        "release": release,
        "source": source,
        "gate": gate,
        "decision": decision_word(gate) if gate.get("rules") else None,
        "rules": rule_rows(gate),
        "facts": decision_facts(gate),
        "gain_note": GAIN_NOTE,
        "gain_header": GAIN_HEADER,
        "approvable": approvable(release),
        "run_dir": run_dir,
        "variant": variant,
        "stages": [],
        "metrics": [],
        "plots": [],
        "samples": [],
        "summary": [],
        "baseline_release": None,
    }
    if not run_dir or not Path(run_dir).is_dir():
        return view
    run = Path(run_dir)
    for stage in sorted(p for p in run.iterdir() if (p / "result.json").is_file()):
        result = _json(stage / "result.json")
        view["stages"].append(
            {
                "name": stage.name,
                "finished": result.get("finished_at", ""),
                "facts": _stage_facts(result),
            }
        )
    report = _json(run / "report" / "report.json")
    variants = report.get("variants") or {}
    base = (variants.get("baseline") or {}).get("metrics", {})
    mine = (variants.get(variant) or {}).get("metrics", {}) if variant else {}
    view["metrics"] = [
        {"label": label, "live": _fmt(base.get(key), kind), "candidate": _fmt(mine.get(key), kind)}
        for key, label, kind in HEADLINE
        if key in base or key in mine
    ]
    view["summary"] = [line.replace("**", "") for line in report.get("summary") or []]  # markdown
    view["plots"] = [p for p in REPORT_PLOTS if (run / "report" / p).is_file()]
    view["baseline_release"] = _json(run / "evals-baseline" / "result.json").get("release_id")
    if variant:
        view["samples"] = side_by_side(run, variant)
    return view


def gate_word(release: Any) -> tuple[str, str]:
    """The release list's gate cell, (word, why): the decision words of the verdict the release
    store computed when the eval report was attached (``Release.gate``), so the list costs no
    gate computation and says ``keep: inconclusive`` where that is what was decided."""
    stored = getattr(release, "gate", None) or {}
    if stored.get("decision"):
        return decision_word(stored["decision"]), str(stored.get("why") or "")
    if stored:
        return "not verified", str(stored.get("why") or "")
    return ("-", "no eval report attached") if not release.eval_report else ("not verified", "")


def approvable(release: Any) -> tuple[bool, str]:
    """Whether approving ``release`` can lead anywhere, and why not: an approval is the last
    step before a promotion, so it is offered only on a staged release whose attached gate
    decision is promote (a retired, live or failed release, or one the gate kept out, is not)."""
    if release.status != "staged":
        return False, f"this release is {release.status or 'not started'}: only a staged release awaits approval"
    gate = _json(release.eval_report).get("gate") or {}
    if not gate.get("rules"):
        return False, "no gate decision is attached: nothing to approve yet"
    if verdict_of(gate) != "pass":
        return False, f"the gate decided {decision_word(gate)}: nothing to approve"
    return True, ""


def _stage_facts(result: dict[str, Any]) -> str:
    """A short line of a stage's scalar results (counts, sizes, times)."""
    facts = []
    for k, v in result.items():
        if isinstance(v, bool) or not isinstance(v, int | float | str) or k.endswith("_at"):
            continue
        if isinstance(v, str) and (len(v) > 60 or "/" in v):
            continue
        facts.append(f"{k}={v}")
    return ", ".join(facts[:8])
