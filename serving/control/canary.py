"""One check of the running canary, or of a release just promoted: the online rules decide
(evals/online.py), the release manager executes (promote, end the canary, roll back), with the
reason and each rule's bound in the release history.

- A **canary** (status ``canary``) is compared with live: promoted when every rule is not harmful,
  ended at once on harm, ended with live kept when still open at its maximum duration. Promoting
  it keeps ``monitor.holdback`` of its tenants' users on the previous release while that is warm.
- A **release just promoted** with a holdback (its ``monitor`` record) is watched against the
  previous release until the grace period ends: a harm rolls it back; anything else waits.

``releases`` is a :class:`serving.releases.manager.ReleaseManager` (in the gateway's process, tests) or a
:class:`serving.control.admin_api.AdminClient` (the CLI, the Prefect flow): both have ``list``,
``promote``, ``end_canary`` and ``rollback``. No Prefect here (flows/canary.py wraps :func:`run_check`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from evals.online import OnlineConfig, OnlineDecision, check


@dataclass
class CanaryCheck:
    """What one check found and did."""

    canary: str | None  # the release judged (None: neither a canary nor a watched release)
    decision: OnlineDecision | None
    # promoted | rolled_back | ended_live_kept | continued (canary) | watching | monitor_rolled_back | none
    action: str
    stage: Literal["canary", "monitor", "none"] = "canary"

    def summary(self) -> str:
        if self.decision is None:
            return "no canary is running and no promoted release is watched"
        return f"{self.stage} {self.canary}: {self.decision.verdict} ({self.action}): {self.decision.reason}"


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
    """Decide on the running canary (or the release being watched after its promotion) and, with
    ``act``, have the release manager carry it out."""
    rel = running_canary(releases)
    if rel is None:
        return watch_live(cfg, log_store, releases, now, act)
    d = decide_canary(cfg, log_store, rel, now)
    action = "continued"
    if act and d.verdict == "promote":
        holdback = cfg.monitor.holdback or None
        releases.promote(rel.release_id, reason=history_reason(d), holdback=holdback,
                         holdback_tenants=(rel.canary or {}).get("tenants") or [])
        action = "promoted"
    elif act and d.verdict == "rollback":
        releases.end_canary("canary rolled back: " + history_reason(d))
        action = "rolled_back"
    elif act and d.verdict == "keep_live":
        releases.end_canary("canary ended, live kept: " + history_reason(d))
        action = "ended_live_kept"
    return CanaryCheck(rel.release_id, d, action)


def watch_live(
    cfg: OnlineConfig, log_store: Any, releases: Any, now: datetime | None = None, act: bool = True
) -> CanaryCheck:
    """The live release against the previous one, while its holdback lasts (``monitor``): roll
    back on a harm; otherwise keep watching (nothing to promote: it is live already)."""
    now = now or datetime.now(UTC)
    by_id = {r.release_id: r for r in releases.list()}
    live = next((r for r in by_id.values() if r.status == "live"), None)
    m = live.monitor if live is not None else None
    prev = by_id.get(m["previous"]) if m else None
    if not m or prev is None or prev.status != "previous" or now >= datetime.fromisoformat(m["until"]):
        return CanaryCheck(None, None, "none", "none")
    d = check(cfg, log_store, live.release_id, prev.release_id, datetime.fromisoformat(m["started_at"]), now,
              m.get("tenants") or [])
    if d.verdict == "rollback":
        if act:
            releases.rollback("monitor rolled back: " + history_reason(d))
        return CanaryCheck(live.release_id, d, "monitor_rolled_back" if act else "watching", "monitor")
    d.verdict, d.reason = "continue", f"watched against {prev.release_id} until {m['until'][:19]}: no harm resolved"
    return CanaryCheck(live.release_id, d, "watching", "monitor")
