"""What a release is on disk: its record, status history and approvals, and the errors of the
release operations.

A release is a model folder + :class:`VLLMArgs` + a status history + (later) an eval report, kept
in ``<data dir>/releases/<release_id>/release.json`` (with a ``model`` link to the folder, the
vLLM log and ``eval_report.json``). Statuses:

- ``staged``: started on its own port and health-checked (``/health`` + one real generation);
  users are not routed to it.
- ``live``: the gateway's upstream. At most one.
- ``canary``: serves a share of some tenants' end users beside live (sticky per user), until the
  online rules (evals/online.py) promote it or end it (``retired``, with the reason). At most one;
  it enters through the gate like a promotion (or forced, recorded), since users see it.
- ``previous``: the release that was live before; its vLLM stays warm for ``grace_s`` so a
  rollback is instant, then stops (a later rollback restarts it). At most one.
- ``retired``: out of rotation. ``failed``: did not start or did not answer; never promoted.

The store (:mod:`serving.releases.store`), the gate checks (:mod:`serving.releases.verify`) and
the manager (:mod:`serving.releases.manager`) all read and write these records.
"""

from __future__ import annotations

import re
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from serving.engine.vllm_server import VLLMArgs

Status = Literal["staged", "canary", "live", "previous", "retired", "failed"]
RELEASE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
"""What a release id (and an eval variant named by a report) may look like: safe as a folder name."""


class ReleaseError(RuntimeError):
    """An operation that the releases' state does not allow (the message says why)."""


class ReleaseNotFound(ReleaseError):
    """No release with that id."""


@dataclass
class StatusEvent:
    """One entry of a release's status history."""

    status: Status
    at: str
    reason: str = ""
    forced: bool = False
    by: str = ""  # who did it: the admin key's id through the API, the OS user offline


@dataclass
class Approval:
    """A reviewer's approval of a release for promotion (the gate's ``require_approval``), bound
    to the eval report it approved: a new report voids it (see
    :func:`serving.releases.verify.valid_approvals`)."""

    by: str  # reviewer id (gateway config ``reviewers``)
    role: str  # always "reviewer" for new approvals (old records may say "admin": never valid)
    at: str
    note: str = ""
    report: str = ""  # decision_fingerprint() of the eval report and decision files approved


@dataclass
class Release:
    """One release as persisted in ``releases/<release_id>/release.json``."""

    release_id: str
    model_dir: str
    vllm_args: dict[str, Any]
    source: dict[str, Any] = field(default_factory=dict)
    created_at: str = ""
    history: list[StatusEvent] = field(default_factory=list)
    eval_report: str | None = None  # path of eval_report.json once evals attached one
    approvals: list[Approval] = field(default_factory=list)
    # Approvals of an earlier eval report, voided when a new one was attached (kept for the record).
    void_approvals: list[Approval] = field(default_factory=list)
    # The gate verdict this store computed when the eval report was attached (gate_verdict()),
    # so pages read it instead of recomputing the gate: passed, why, decision, gate_file, report.
    gate: dict[str, Any] | None = None
    placement: dict[str, Any] | None = None  # devices + memory share of its last start
    # An external OpenAI-compatible server instead of a model folder we serve ourselves:
    upstream_url: str | None = None  # its base URL, e.g. http://10.0.0.5:8000/v1
    upstream_model: str | None = None  # the model name it answers to
    api_key_env: str | None = None  # environment variable holding its API key (never the key)
    # Its canary stage: share, tenants, started_at, live (the release it is compared with); kept
    # after the canary ends, for the record (the online checks' verdicts are in the history).
    canary: dict[str, Any] | None = None
    # Watched after its promotion: the previous release keeps a share of users (a holdback) for
    # the grace period, so the online rules compare both on the same period (serving/control/canary.py).
    monitor: dict[str, Any] | None = None

    @property
    def status(self) -> Status | None:
        return self.history[-1].status if self.history else None

    @property
    def served_name(self) -> str:
        """The model name the upstream answers to: the release id for our vLLMs (so logs name
        the release), the configured name for an external server."""
        return self.upstream_model or self.release_id

    def args(self) -> VLLMArgs:
        return VLLMArgs.model_validate(self.vllm_args)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "status": self.status}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Release:
        d = {k: v for k, v in d.items() if k != "status"}
        d["history"] = [StatusEvent(**e) for e in d.get("history", [])]
        d["approvals"] = [Approval(**a) for a in d.get("approvals", [])]
        d["void_approvals"] = [Approval(**a) for a in d.get("void_approvals", [])]
        return cls(**d)


def now_iso() -> str:
    """The current UTC time as the records write it (ISO 8601, milliseconds)."""
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def new_release_id(label: str = "") -> str:
    """A sortable, unique id: UTC timestamp + optional label + 4 random hex digits."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    label = re.sub(r"[^A-Za-z0-9._-]+", "-", label).strip("-.")[:40]
    return "-".join(p for p in (stamp, label, uuid.uuid4().hex[:4]) if p)
