"""One check of the running canary: the online rules decide (evals/online.py), the release manager
executes (promote, or end the canary with the reason in the release history).

``releases`` is a :class:`serving.releases.ReleaseManager` (in the gateway's process, tests) or a
:class:`serving.admin_api.AdminClient` (the CLI, the Prefect flow): both have ``list``,
``promote`` and ``end_canary``. No Prefect here (flows/canary.py wraps :func:`run_check`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from evals.online import OnlineConfig, OnlineDecision, check


@dataclass
class CanaryCheck:
    """What one check found and did."""

    canary: str | None  # the canary's release id (None: no canary runs)
    decision: OnlineDecision | None
    action: str  # promoted | rolled_back | ended_live_kept | continued | none

    def summary(self) -> str:
        if self.decision is None:
            return "no canary is running"
        return f"{self.canary}: {self.decision.verdict} ({self.action}): {self.decision.reason}"


def running_canary(releases: Any) -> Any | None:
    """The release whose status is ``canary`` (None if none)."""
    found = [r for r in releases.list() if r.status == "canary"]
    return found[-1] if found else None


def history_reason(d: OnlineDecision) -> str:
    """The decision in one line for the release history: verdict, why, each rule's bound."""
    rules = "; ".join(
        f"{r.rule} {r.state} [{r.lower:.4g}, {r.upper:.4g}] (n {r.n_canary}/{r.n_live})" for r in d.rules
    )
    return f"online rules vs {d.live}, alpha {d.alpha:g} over every rule and look: {d.verdict}: {d.reason}. {rules}"


def decide_canary(cfg: OnlineConfig, log_store: Any, rel: Any, now: datetime | None = None) -> OnlineDecision:
    """The online decision for canary ``rel`` (a Release) from the log store, without acting."""
    c = rel.canary or {}
    started = datetime.fromisoformat(c["started_at"])
    return check(cfg, log_store, rel.release_id, c["live"], started, now or datetime.now(UTC), c.get("tenants") or [])


def run_check(
    cfg: OnlineConfig, log_store: Any, releases: Any, now: datetime | None = None, act: bool = True
) -> CanaryCheck:
    """Decide on the running canary and, with ``act``, have the release manager carry it out:
    promote it, or end it (rolled back on harm; live kept when inconclusive at the maximum)."""
    rel = running_canary(releases)
    if rel is None:
        return CanaryCheck(None, None, "none")
    d = decide_canary(cfg, log_store, rel, now)
    action = "continued"
    if act and d.verdict == "promote":
        releases.promote(rel.release_id, reason=history_reason(d))
        action = "promoted"
    elif act and d.verdict == "rollback":
        releases.end_canary("canary rolled back: " + history_reason(d))
        action = "rolled_back"
    elif act and d.verdict == "keep_live":
        releases.end_canary("canary ended, live kept: " + history_reason(d))
        action = "ended_live_kept"
    return CanaryCheck(rel.release_id, d, action)
