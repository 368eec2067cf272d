"""Checking a release against the gate before it goes live: the decision recomputed from the
stored per-item results, reviewers' approvals bound to those results, and the rollback grace.

A promotion (or a canary, which users see too) is never unlocked by a verdict someone attached:
the candidate's and the live model's evals named by the attached report are read back from this
data dir's ``runs/`` and the decision is recomputed with this side's own gate policy
(:mod:`evals.gate`). The one exception is a rollback: the previous release within its grace period.

The checks read a release store through :class:`StoreView` (its folder and its live release):
:class:`serving.releases.store.ReleaseStore` calls them, so this module does not import it.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from evals.gate import GateConfig, evaluate_stage_dirs
from ground.config import load_config, repo_root
from serving.releases.records import RELEASE_ID_RE, Approval, Release, ReleaseError, now_iso


class StoreView(Protocol):
    """What the checks read of a release store: where it lies and which release is live."""

    root: Path

    def live(self) -> Release | None: ...


def default_gate_file() -> Path:
    """The gate policy a release manager verifies promotions with unless told otherwise."""
    return repo_root() / "configs" / "gate.yaml"


def _decision_dirs(rel: Release, store: StoreView) -> tuple[Path, Path] | str:
    """The candidate's and baseline's eval stage folders named by ``rel``'s eval report, or why
    there are none. The run folder must be under this data dir's ``runs/`` (the admin API cannot
    write there)."""
    if not rel.eval_report:
        return "no eval report attached"
    try:
        report = json.loads(Path(rel.eval_report).read_text())
    except (OSError, ValueError) as exc:
        return f"eval report unreadable ({exc})"
    run_dir, variant = report.get("run_dir"), report.get("variant")
    if not isinstance(run_dir, str) or not isinstance(variant, str) or not RELEASE_ID_RE.match(variant):
        return "the eval report does not name the run folder and variant of the loop's evals"
    runs_root = (store.root.parent / "runs").resolve()
    run = Path(run_dir).resolve()
    if not run.is_relative_to(runs_root) or variant == "baseline":
        return f"the evals must be a loop run under {runs_root}"
    return run / f"evals-{variant}", run / "evals-baseline"


def decision_fingerprint(rel: Release, store: StoreView) -> str:
    """A content hash of what a decision about ``rel`` is made from: the attached eval report and,
    where it names them, both eval stages' ``result.json`` and per-item outcome files. An approval
    records it; a new report (or re-run evals) changes it and so voids the approval. "" = none."""
    if not rel.eval_report:
        return ""
    files = [Path(rel.eval_report)]
    dirs = _decision_dirs(rel, store)
    if not isinstance(dirs, str):
        for d in dirs:
            files += [d / "result.json", *sorted((d / "output").glob("outcomes-*.jsonl"))]
    h = hashlib.sha256()
    for f in files:
        h.update(str(f).encode() + b"\0")
        try:
            h.update(hashlib.sha256(f.read_bytes()).digest())
        except OSError:
            h.update(b"missing")
    return "sha256:" + h.hexdigest()


def gate_verdict(rel: Release, store: StoreView, gate_file: str | Path | None = None) -> dict[str, Any]:
    """The gate decision for ``rel`` recomputed from its stored per-item results, never trusting
    the attached dict's verdict; the form stored as ``Release.gate``.

    The candidate evals must be of this release and the baseline evals of the model that is live
    now; the decision is computed with this manager's own gate policy (``gate_file``).

    Returns:
        ``passed``, ``why`` (what is missing, or the verdict), ``decision`` (``GateDecision.to_dict()``,
        None when none could be computed), ``gate_file``, ``live_model_dir`` (compared against),
        ``report`` (:func:`decision_fingerprint`) and ``at``.
    """
    policy = Path(gate_file or default_gate_file())
    live = store.live()
    out: dict[str, Any] = {"passed": False, "why": "", "decision": None, "gate_file": str(policy),
                           "live_model_dir": live.model_dir if live else None,
                           "report": decision_fingerprint(rel, store), "at": now_iso()}
    dirs = _decision_dirs(rel, store)
    if isinstance(dirs, str):
        return out | {"why": dirs}
    cand_dir, live_dir = dirs
    try:
        cand_meta = json.loads((cand_dir / "result.json").read_text())
        live_meta = json.loads((live_dir / "result.json").read_text())
    except (OSError, ValueError):
        return out | {"why": f"no finished evals of {cand_dir.name} and baseline in {cand_dir.parent}"}
    if cand_meta.get("release_id") != rel.release_id:
        return out | {"why": f"the evals in {cand_dir} are of release {cand_meta.get('release_id')!r}, not this one"}
    compared = live_meta.get("model_dir")
    if live is None or not compared or Path(compared).resolve() != Path(live.model_dir).resolve():
        return out | {"why": f"the decision compared against {compared!r}, but live now serves "
                             f"{live.model_dir if live else 'nothing'}: evaluate again"}
    try:
        decision = evaluate_stage_dirs(load_config(GateConfig, policy), cand_dir, live_dir)
    except (OSError, ValueError) as exc:
        return out | {"why": f"the stored results could not be checked ({exc})"}
    run = cand_dir.parent.name
    if not decision.passed:
        bad = [o.rule for o in decision.outcomes if not o.passed]
        why = f"the gate, recomputed from {run}, says {decision.verdict} ({', '.join(bad)})"
    else:
        why = f"gate recomputed from {run}: pass"
    return out | {"passed": decision.passed, "why": why, "decision": decision.to_dict()}


def verify_gate(rel: Release, store: StoreView, gate_file: str | Path | None = None) -> tuple[bool, str]:
    """(passed, why) of :func:`gate_verdict`: the check every unforced promotion makes."""
    v = gate_verdict(rel, store, gate_file)
    return v["passed"], v["why"]


def stored_gate_passed(rel: Release) -> bool | None:
    """The verdict stored when ``rel``'s eval report was attached (None: none stored). For pages:
    it costs no gate computation; a promotion still recomputes the gate."""
    return None if rel.gate is None else bool(rel.gate.get("passed"))


# -- the review-approval rule (gate config ``require_approval``) ---------------------------------
def approval_required(rel: Release) -> bool:
    """Whether the gate decision attached to ``rel`` asks for a reviewer's approval (shown on the
    review page; the release manager enforces its own gate policy's ``require_approval``)."""
    if not rel.eval_report:
        return False
    try:
        report = json.loads(Path(rel.eval_report).read_text())
    except (OSError, ValueError):
        return False
    return bool(report.get("gate", {}).get("require_approval"))


def valid_approvals(rel: Release, store: StoreView) -> list[Approval]:
    """The approvals that count: by a reviewer, of the decision files as they are now."""
    current = decision_fingerprint(rel, store)
    return [a for a in rel.approvals if a.role == "reviewer" and current and a.report == current]


def _check_approval(rel: Release, store: StoreView, gate_file: str | Path | None) -> None:
    if not load_config(GateConfig, gate_file or default_gate_file()).require_approval:
        return
    if not valid_approvals(rel, store):
        void = " (its approvals were of an earlier eval report)" if rel.approvals or rel.void_approvals else ""
        raise ReleaseError(
            f"release {rel.release_id} needs a reviewer's approval of its current eval report "
            f"before promotion{void} (the gate config sets require_approval): approve it on the "
            "review page (/review/releases), or use `alignloop promote --force --reason ...`"
        )


# -- the rollback exception: the previous release, within its grace period ----------------------
def _demoted_at(rel: Release) -> datetime | None:
    """When ``rel`` last became ``previous`` (None if it is not previous now)."""
    if rel.status != "previous":
        return None
    return datetime.fromisoformat(rel.history[-1].at)


def within_grace(rel: Release, grace_s: float) -> bool:
    """Whether ``rel`` is the previous release and was demoted at most ``grace_s`` seconds ago:
    the only release that may go live again without the gate (a rollback)."""
    at = _demoted_at(rel)
    return at is not None and (datetime.now(UTC) - at).total_seconds() <= grace_s


def check_rollback(prev: Release, grace_s: float) -> None:
    """Raise unless ``prev`` may go live again without the gate (see :func:`within_grace`)."""
    if not within_grace(prev, grace_s):
        at = _demoted_at(prev)
        ago = f"{(datetime.now(UTC) - at).total_seconds():.0f} s ago" if at else "at an unknown time"
        raise ReleaseError(
            f"release {prev.release_id} was demoted {ago}, past the grace period ({grace_s:g} s): "
            "a rollback without the gate is only for undoing a recent promotion; promote it "
            f"through the gate, or `alignloop release promote {prev.release_id} --force --reason ...`"
        )


def canary_forced(rel: Release) -> bool:
    """Whether ``rel``'s current canary stage was started forced, past the gate."""
    return rel.status == "canary" and rel.history[-1].forced


def check_promotable(
    rel: Release, force: bool, store: StoreView, gate_file: str | Path | None, grace_s: float
) -> None:
    """Raise :class:`ReleaseError` unless ``rel`` may go live (or become the canary) now.

    Args:
        force: override the gate decision (never the health check: a failed release stays out).
        store: where the decision files and the live release are read.
        gate_file: the gate policy the decision is recomputed with (None: configs/gate.yaml).
        grace_s: how long after its demotion the previous release may go live without the gate.
    """
    # A release that failed to start or answer is never promoted, not even with force: force
    # overrides the eval gate, not the health check.
    if rel.status == "failed":
        raise ReleaseError(
            f"release {rel.release_id} failed its start/health check; not promotable"
        )
    if rel.status == "live":
        raise ReleaseError(f"release {rel.release_id} is already live")
    if rel.status not in ("staged", "previous", "retired", "canary"):
        raise ReleaseError(f"release {rel.release_id} was never health-checked; stage it again")
    if rel.status == "canary" and not force and canary_forced(rel):
        return  # it entered its canary forced (recorded, by a named person): the promotion says so
    # Promotion goes through the gate (a decision this process verifies from the stored results)
    # unless forced with a reason. The one exception is a rollback: the previous release within
    # its grace period. A release that was live once, long ago, is judged like any candidate.
    if force or within_grace(rel, grace_s):
        return
    ok, why = verify_gate(rel, store, gate_file)
    if not ok:
        raise ReleaseError(
            f"release {rel.release_id} has no passing gate decision ({why}); promotion goes "
            "through the gate (`alignloop run`), or use `alignloop promote --force --reason ...`"
        )
    _check_approval(rel, store, gate_file)
