"""The persisted releases: :class:`ReleaseStore` reads and writes the records under
``<data dir>/releases`` (plain JSON files, written atomically under a file lock, so the CLI can
edit them while no gateway runs), and the offline verbs the CLI uses without a gateway.

Attaching an eval report stores the gate verdict recomputed from the decision files, and an
offline promotion goes through the same checks as the gateway's (:mod:`serving.releases.verify`).
"""

from __future__ import annotations

import contextlib
import fcntl
import getpass
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ground.config import data_dir
from serving.engine.vllm_server import VLLMArgs
from serving.releases.placement import Placement
from serving.releases.records import (
    RELEASE_ID_RE,
    Approval,
    Release,
    ReleaseError,
    ReleaseNotFound,
    Status,
    StatusEvent,
    new_release_id,
    now_iso,
)
from serving.releases.verify import (
    canary_forced,
    check_promotable,
    check_rollback,
    decision_fingerprint,
    gate_verdict,
)
from training.lineage import Lineage, release_lineage


class ReleaseStore:
    """The persisted releases under ``<root>`` (default ``<data dir>/releases``)."""

    def __init__(
        self, root: str | Path | None = None, gate_file: str | Path | None = None, grace_s: float = 600.0
    ) -> None:
        self.root = Path(root) if root else data_dir() / "releases"
        self.gate_file = gate_file
        """The gate policy offline promotions are verified with (None: configs/gate.yaml)."""
        self.grace_s = grace_s
        """How long after its demotion the previous release may go live again without the gate."""
        self.root.mkdir(parents=True, exist_ok=True)
        self._thread_lock = threading.RLock()
        self._depth = 0

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Exclusive across threads and processes (CLI and gateway share the folder); reentrant."""
        with self._thread_lock:
            if self._depth:  # flock on a second descriptor would wait for ourselves
                self._depth += 1
                try:
                    yield
                finally:
                    self._depth -= 1
                return
            with (self.root / ".lock").open("a") as fh:
                fcntl.flock(fh, fcntl.LOCK_EX)
                self._depth = 1
                try:
                    yield
                finally:
                    self._depth = 0
                    fcntl.flock(fh, fcntl.LOCK_UN)

    def folder(self, release_id: str) -> Path:
        return self.root / release_id

    def get(self, release_id: str) -> Release:
        path = self.folder(release_id) / "release.json"
        if not RELEASE_ID_RE.match(release_id) or not path.is_file():
            raise ReleaseNotFound(f"release {release_id!r} not found under {self.root}")
        return Release.from_dict(json.loads(path.read_text()))

    def save(self, release: Release) -> None:
        folder = self.folder(release.release_id)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / "release.json.tmp"
        tmp.write_text(json.dumps(release.to_dict(), indent=2))
        os.replace(tmp, folder / "release.json")  # atomic: a reader sees old or new, never half

    def list(self) -> list[Release]:
        """All releases, oldest first."""
        out = [self.get(p.parent.name) for p in self.root.glob("*/release.json")]
        return sorted(out, key=lambda r: (r.created_at, r.release_id))

    def with_status(self, status: Status) -> list[Release]:
        return [r for r in self.list() if r.status == status]

    def live(self) -> Release | None:
        found = self.with_status("live")
        return found[-1] if found else None

    def previous(self) -> Release | None:
        found = self.with_status("previous")
        return found[-1] if found else None

    def canary(self) -> Release | None:
        found = self.with_status("canary")
        return found[-1] if found else None

    def create(
        self,
        model_dir: str | Path,
        args: VLLMArgs,
        source: dict[str, Any] | None = None,
        release_id: str | None = None,
    ) -> Release:
        """A new release record with an empty history (the caller appends staged or failed)."""
        model = Path(model_dir).expanduser()
        model_s = str(model.resolve()) if model.exists() else str(model_dir)
        release_id = release_id or new_release_id(Path(model_s).name)
        if not RELEASE_ID_RE.match(release_id):
            raise ReleaseError(
                f"release_id {release_id!r}: use letters, digits, '.', '_' or '-' (max 128)"
            )
        with self.locked():
            if (self.folder(release_id) / "release.json").exists():
                raise ReleaseError(f"release_id {release_id!r} already exists")
            rel = Release(
                release_id=release_id,
                model_dir=model_s,
                vllm_args=args.model_dump(mode="json"),
                source=dict(source or {}),
                created_at=now_iso(),
            )
            self.save(rel)
            link = self.folder(release_id) / "model"
            if model.exists() and not link.exists():
                link.symlink_to(model.resolve(), target_is_directory=True)
        return rel

    def set_status(
        self, release_id: str, status: Status, reason: str = "", forced: bool = False, by: str = ""
    ) -> Release:
        with self.locked():
            rel = self.get(release_id)
            rel.history.append(StatusEvent(status, now_iso(), reason, forced, by))
            self.save(rel)
            return rel

    def set_placement(self, release_id: str, placement: Placement) -> Release:
        """Record where the release's vLLM runs (its last start)."""
        with self.locked():
            rel = self.get(release_id)
            rel.placement = placement.to_dict()
            self.save(rel)
            return rel

    def attach_eval(
        self, release_id: str, report: dict[str, Any] | str | Path, gate_file: str | Path | None = None
    ) -> Release:
        """Store an eval report (a dict, or a JSON file's path) as ``eval_report.json``, void the
        approvals of an earlier report, and store the gate verdict recomputed from the decision
        files under ``gate_file`` (default: this store's policy). Blocks for the gate's
        computation (about a second at default eval sizes): call it off an event loop."""
        if not isinstance(report, dict):
            report = json.loads(Path(report).read_text())
        with self.locked():
            rel = self.get(release_id)
            path = self.folder(release_id) / "eval_report.json"
            path.write_text(json.dumps(report, indent=2, default=str))
            rel.eval_report = str(path)
            rel.gate = None
            self.save(rel)
            rel = self._void_stale_approvals(rel)
        # The verdict is computed outside the lock (it reads every per-item outcome) and stored
        # only if the decision files are still those it was computed from.
        verdict = gate_verdict(rel, self, gate_file or self.gate_file)
        with self.locked():
            rel = self.get(release_id)
            if decision_fingerprint(rel, self) == verdict["report"]:
                rel.gate = verdict
                self.save(rel)
            return rel

    def refresh_gate_verdicts(self) -> list[str]:
        """Recompute the stored verdicts that compared against another model than the live one
        (after a promotion or rollback), so a page never shows a pass against a model that no
        longer serves; returns the release ids refreshed. Mostly cheap: a verdict against a
        model that is not live is decided without reading the outcomes."""
        live = self.live()
        now_live = live.model_dir if live else None
        refreshed = []
        for rel in self.list():
            if rel.gate is None or rel.status == "live" or rel.gate.get("live_model_dir") == now_live:
                continue
            verdict = gate_verdict(rel, self, rel.gate.get("gate_file"))
            with self.locked():
                current = self.get(rel.release_id)
                if current.gate == rel.gate:  # not replaced by an attach meanwhile
                    current.gate = verdict
                    self.save(current)
                    refreshed.append(rel.release_id)
        return refreshed

    def _void_stale_approvals(self, rel: Release) -> Release:
        """Move approvals of other decision files than the current ones to ``void_approvals``."""
        current = decision_fingerprint(rel, self)
        stale = [a for a in rel.approvals if a.report != current]
        if stale:
            rel.approvals = [a for a in rel.approvals if a.report == current]
            rel.void_approvals.extend(stale)
            self.save(rel)
        return rel

    def approve(self, release_id: str, by: str, role: str = "reviewer", note: str = "") -> Release:
        """Record reviewer ``by``'s approval of the release's current eval report; approving the
        same report twice is a no-op.

        Only a reviewer approves (the review page checks the reviewer's ``can_approve``): the
        admin key is held by the loop itself, the automation ``require_approval`` is there to check.
        """
        if role != "reviewer":
            raise ReleaseError(
                f"only a reviewer can approve a release, not {role!r}: approvals check the "
                "automation that holds the admin key (approve on the review page, /review/releases)"
            )
        with self.locked():
            rel = self.get(release_id)
            if rel.status in ("live", "failed", None):
                raise ReleaseError(
                    f"release {release_id} is {rel.status or 'not started'}: only a staged, "
                    "previous or retired release can be approved for promotion"
                )
            if not rel.eval_report:
                raise ReleaseError(
                    f"release {release_id} has no eval report attached: there is nothing to approve"
                )
            rel = self._void_stale_approvals(rel)
            report = decision_fingerprint(rel, self)
            if not any(a.by == by for a in rel.approvals):
                rel.approvals.append(Approval(by, role, now_iso(), note, report))
                self.save(rel)
            return rel

    def promote_offline(
        self, release_id: str, force: bool = False, reason: str = "", gate_file: str | Path | None = None,
        by: str = "",
    ) -> Release:
        """Mark a release live in the files only (no gateway runs): it starts on the next serve.
        ``by`` (default: the OS user) is recorded in the status history."""
        if force and not reason:
            raise ReleaseError("a forced promotion needs a reason")
        by = by or offline_actor()
        with self.locked():
            target = self.get(release_id)
            check_promotable(target, force, self, gate_file or self.gate_file, self.grace_s)
            force = force or canary_forced(target)
            old = self.live()
            for prev in self.with_status("previous"):
                if prev.release_id != release_id:
                    self.set_status(prev.release_id, "retired", f"replaced as previous by {release_id}", by=by)
            if old is not None and old.release_id != release_id:
                self.set_status(old.release_id, "previous", f"{release_id} promoted (offline)", by=by)
            rel = self.set_status(release_id, "live", reason or "promoted (offline)", force, by)
        self.refresh_gate_verdicts()
        return rel

    def rollback_offline(self, reason: str = "", by: str = "") -> Release:
        """Swap live and previous in the files only (no gateway runs); only within the grace
        period of the previous release's demotion (after it, promote it through the gate or with
        ``--force``)."""
        by = by or offline_actor()
        with self.locked():
            prev, live = self.previous(), self.live()
            if prev is None:
                raise ReleaseError("nothing to roll back to: no release has status 'previous'")
            check_rollback(prev, self.grace_s)
            if live is not None:
                self.set_status(live.release_id, "previous", f"rolled back to {prev.release_id}", by=by)
            rel = self.set_status(prev.release_id, "live", reason or "rollback (offline)", by=by)
        self.refresh_gate_verdicts()
        return rel


def offline_actor() -> str:
    """Who runs a CLI command on the files (no gateway, so no key names them): the OS user."""
    try:
        return f"{getpass.getuser()} (offline)"
    except (KeyError, OSError):
        return "unknown (offline)"


def live_lineage(releases_root: str | Path | None = None) -> Lineage | None:
    """The live release's lineage, or None when no release is live."""
    root = Path(releases_root) if releases_root else data_dir() / "releases"
    if not root.is_dir():  # reading must not create the folder (ReleaseStore would)
        return None
    live = ReleaseStore(root).live()
    return release_lineage(live.release_id, live.model_dir) if live is not None else None
