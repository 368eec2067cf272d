"""Releases: blue/green vLLM deploys behind the gateway, with promotion, rollback and persisted state.

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

Each start places the release on devices (:mod:`serving.releases.placement`: whole GPUs, or a memory share
when GPUs are fewer than releases; nothing on a CPU) and records that as ``placement``.

A release may also be an **external** OpenAI-compatible server (``upstream_url``: a vLLM a team
already runs, or a benchmark's synthetic upstream): no process is started or stopped for it; it
is health-checked the same way (``/v1/models`` answers and one real generation works) and
switched to atomically like any other (:class:`ExternalServer`).

:class:`ReleaseStore` is the persisted state (plain JSON files, written atomically under a file
lock, so the CLI can edit it while no gateway runs). :class:`ReleaseManager` owns the vLLM
processes of one gateway process and implements the gateway's ``UpstreamProvider``: the upstream
is one attribute swapped in a single assignment, and each request reads it once at its start, so
a switch never breaks a request in flight.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import re
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from ground.config import StrictModel, data_dir
from serving.engine.vllm_server import VLLMArgs, VLLMServer, VLLMStartError
from serving.gateway.service import EXTERNAL_TOOLS, Canary, Upstream
from serving.releases.placement import (
    Gpu,
    Placement,
    PlacementConfig,
    PlacementError,
    apply_placement,
    gpu_inventory,
    place_release,
)
from training.lineage import Lineage, release_lineage

log = logging.getLogger(__name__)

Status = Literal["staged", "canary", "live", "previous", "retired", "failed"]
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


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
    to the eval report it approved: a new report voids it (see :func:`valid_approvals`)."""

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


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def new_release_id(label: str = "") -> str:
    """A sortable, unique id: UTC timestamp + optional label + 4 random hex digits."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    label = re.sub(r"[^A-Za-z0-9._-]+", "-", label).strip("-.")[:40]
    return "-".join(p for p in (stamp, label, uuid.uuid4().hex[:4]) if p)


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
        if not _ID_RE.match(release_id) or not path.is_file():
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
        if not _ID_RE.match(release_id):
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
                created_at=_now(),
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
            rel.history.append(StatusEvent(status, _now(), reason, forced, by))
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
                rel.approvals.append(Approval(by, role, _now(), note, report))
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
            _check_promotable(target, force, self, gate_file or self.gate_file, self.grace_s)
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
            _check_rollback(prev, self.grace_s)
            if live is not None:
                self.set_status(live.release_id, "previous", f"rolled back to {prev.release_id}", by=by)
            rel = self.set_status(prev.release_id, "live", reason or "rollback (offline)", by=by)
        self.refresh_gate_verdicts()
        return rel


def old_id(store: ReleaseStore) -> str:
    live = store.live()
    return live.release_id if live else "nothing"


def offline_actor() -> str:
    """Who runs a CLI command on the files (no gateway, so no key names them): the OS user."""
    import getpass

    try:
        return f"{getpass.getuser()} (offline)"
    except (KeyError, OSError):
        return "unknown (offline)"


class ExternalServer:
    """An external OpenAI-compatible server, with the part of :class:`VLLMServer`'s interface
    the manager uses: readiness is ``/v1/models`` answering plus one real generation; there is
    no process to start or stop."""

    proc = None
    tool_parser = EXTERNAL_TOOLS  # tools are the external server's business: requests pass

    def __init__(self, rel: Release) -> None:
        self.base_url = rel.upstream_url.rstrip("/")
        self.served_name = rel.served_name
        self.api_key = os.environ.get(rel.api_key_env) if rel.api_key_env else None
        self.timeout_s = rel.args().startup_timeout_s
        self.startup_s: float | None = None

    def _headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def start(self, wait: bool = True) -> ExternalServer:
        return self

    def alive(self) -> bool:
        return True

    def stop(self) -> None:
        pass

    def wait_ready(self) -> float:
        import httpx

        t0 = time.monotonic()
        last = ""
        while time.monotonic() - t0 < self.timeout_s:
            try:
                r = httpx.get(self.base_url + "/models", headers=self._headers(), timeout=5)
                if r.status_code == 200:
                    break
                last = f"/v1/models answered {r.status_code}"
            except httpx.HTTPError as e:
                last = f"{type(e).__name__}: {e}"
            time.sleep(0.5)
        else:
            raise VLLMStartError(f"external upstream {self.base_url} not ready: {last}")
        try:
            self.check_generation()
        except Exception as e:  # noqa: BLE001 - any failure: not promotable
            raise VLLMStartError(
                f"external upstream {self.base_url} failed a real generation with model "
                f"{self.served_name!r}: {e}"
            ) from None
        self.startup_s = time.monotonic() - t0
        return self.startup_s

    def check_generation(self, client: Any = None, timeout_s: float = 60) -> str:
        import httpx

        r = httpx.post(
            self.base_url + "/chat/completions",
            headers=self._headers(),
            json={
                "model": self.served_name,
                "messages": [{"role": "user", "content": "Say OK."}],
                "max_tokens": 2,
                "temperature": 0,
            },
            timeout=timeout_s,
        )
        r.raise_for_status()
        return r.json()["choices"][0]["message"]["content"] or ""


# VLLMArgs fields the admin API may set by default (placement and size, not what runs): anything
# else must equal the server's own default_args. A test keeps this list and VLLMArgs in step.
DEFAULT_ALLOWED_ARGS = (
    "dtype",
    "max_model_len",
    "kv_cache_gib",
    "gpu_memory_utilization",
    "enforce_eager",
    "max_num_seqs",
    "tensor_parallel_size",
    "data_parallel_size",
    "startup_timeout_s",
    "startup_quiet_s",
    "tool_call_parser",
)
SERVER_ONLY_ARGS = ("extra_args", "env")
"""Fields only the server's config sets; a request may narrow them via allowed_flags/allowed_env."""
# Flags and variables that make vLLM load code or libraries named by whoever sets them: the admin
# API never accepts them, whatever the config lists (set them in the server's default_args).
_CODE_FLAGS = ("--trust-remote-code", "--tool-parser-plugin", "--reasoning-parser-plugin",
               "--worker-extension-cls", "--middleware", "--logits-processors", "--chat-template",
               "--allowed-local-media-path")
_CODE_ENV_PREFIXES = ("LD_", "DYLD_", "PYTHON", "VLLM_PLUGINS")
_CODE_ENV = ("PATH", "HOME", "BASH_ENV", "ENV", "SHELL")


class StagingError(ReleaseError):
    """A stage request outside what the server's staging policy allows (names the field)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class StagingPolicy(StrictModel):
    """What the admin API may stage: the server's own config, which the admin key cannot widen.

    An admin key stages and promotes models; it must not run code on the host. So a staged
    model folder must lie under ``model_roots`` (after resolving links), and the vLLM arguments
    of a request may differ from the server's ``default_args`` only in ``allowed_args``, in
    ``extra_args`` flags listed in ``allowed_flags`` and in ``env`` names listed in ``allowed_env``.
    """

    model_roots: list[str] = Field(
        default_factory=lambda: ["runs", "models", "releases"],
        description="Folders a staged model must be inside (relative = under the data dir).",
    )
    allow_hub_ids: bool = Field(False, description="Accept hub ids (org/name) as model_dir.")
    allowed_args: list[str] = Field(
        default_factory=lambda: list(DEFAULT_ALLOWED_ARGS),
        description="VLLMArgs fields a request may set to other values than default_args.",
    )
    allowed_flags: list[str] = Field(
        default_factory=list,
        description="`vllm serve` flags a request may add in extra_args (e.g. --enable-prefix-caching).",
    )
    allowed_env: list[str] = Field(
        # Which of vLLM's own kernels not to use: how the loop stages a W4A16 candidate per
        # kernel (Marlin vs the default) on GPUs. It chooses among vLLM's built-in kernels only.
        default_factory=lambda: ["VLLM_DISABLED_KERNELS"],
        description="Environment variables a request may set.",
    )

    @field_validator("allowed_args")
    @classmethod
    def _args(cls, v: list[str]) -> list[str]:
        unknown = sorted(set(v) - set(VLLMArgs.model_fields))
        if unknown:
            raise ValueError(f"not VLLMArgs fields: {unknown}")
        held = sorted(set(v) & set(SERVER_ONLY_ARGS))
        if held:
            raise ValueError(f"{held} are governed by allowed_flags / allowed_env, not listed here")
        return v

    @field_validator("allowed_flags")
    @classmethod
    def _flags(cls, v: list[str]) -> list[str]:
        for flag in v:
            if not flag.startswith("--"):
                raise ValueError(f"{flag!r}: flags start with '--'")
            if flag.split("=")[0] in _CODE_FLAGS:
                raise ValueError(f"{flag!r} loads code: set it in the server's default_args instead")
        return v

    @field_validator("allowed_env")
    @classmethod
    def _env(cls, v: list[str]) -> list[str]:
        for name in v:
            if name in _CODE_ENV or name.startswith(_CODE_ENV_PREFIXES):
                raise ValueError(f"{name!r} can load code: set it in the server's default_args instead")
        return v

    def roots(self) -> list[Path]:
        return [(Path(r) if Path(r).is_absolute() else data_dir() / r).resolve() for r in self.model_roots]

    def check(
        self, model_dir: str, args: VLLMArgs | None, defaults: VLLMArgs, known: Iterable[str] = ()
    ) -> str:
        """The model folder to stage (resolved); raise :class:`StagingError` naming what is not allowed.

        ``known`` are model folders of releases this server already has (its initial model, what
        was staged before): staging one of them again (a baseline copy of live) adds nothing new.
        """
        path = Path(model_dir).expanduser()
        if not path.is_absolute() and not path.exists() and model_dir.count("/") == 1:
            if not self.allow_hub_ids:
                raise StagingError("model_dir", "hub ids are not allowed (releases.staging.allow_hub_ids)")
        else:
            real = path.resolve()
            already = {Path(k).resolve() for k in known}
            if real not in already and not any(real.is_relative_to(r) for r in self.roots()):
                raise StagingError(
                    "model_dir",
                    f"{real} is not inside the folders this server stages from "
                    f"({', '.join(map(str, self.roots()))}; releases.staging.model_roots)",
                )
            model_dir = str(real)
        if args is None:
            return model_dir
        for name in VLLMArgs.model_fields:
            mine, theirs = getattr(defaults, name), getattr(args, name)
            if mine == theirs or name in self.allowed_args:
                continue
            if name == "extra_args":
                self._check_flags(theirs)
            elif name == "env":
                bad = sorted(k for k, v in theirs.items() if k not in self.allowed_env and defaults.env.get(k) != v)
                if bad:
                    raise StagingError("args.env", f"{bad} not in releases.staging.allowed_env")
            else:
                raise StagingError(
                    f"args.{name}",
                    f"this server does not let the admin API set it ({theirs!r}; its default is "
                    f"{mine!r}); add it to releases.staging.allowed_args in the server's config",
                )
        return model_dir

    def _check_flags(self, extra: list[str]) -> None:
        expect_value = False
        for tok in extra:
            if tok.startswith("--"):
                name = tok.split("=")[0]
                if name in _CODE_FLAGS or name not in {f.split("=")[0] for f in self.allowed_flags}:
                    raise StagingError(
                        "args.extra_args", f"{name} is not in releases.staging.allowed_flags"
                    )
                expect_value = "=" not in tok
            elif not expect_value:
                raise StagingError("args.extra_args", f"{tok!r} is not a value of an allowed flag")
            else:
                expect_value = False


def default_gate_file() -> Path:
    """The gate policy a release manager verifies promotions with unless told otherwise."""
    from ground.config import repo_root

    return repo_root() / "configs" / "gate.yaml"


def _decision_dirs(rel: Release, store: ReleaseStore) -> tuple[Path, Path] | str:
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
    if not isinstance(run_dir, str) or not isinstance(variant, str) or not _ID_RE.match(variant):
        return "the eval report does not name the run folder and variant of the loop's evals"
    runs_root = (store.root.parent / "runs").resolve()
    run = Path(run_dir).resolve()
    if not run.is_relative_to(runs_root) or variant == "baseline":
        return f"the evals must be a loop run under {runs_root}"
    return run / f"evals-{variant}", run / "evals-baseline"


def decision_fingerprint(rel: Release, store: ReleaseStore) -> str:
    """A content hash of what a decision about ``rel`` is made from: the attached eval report and,
    where it names them, both eval stages' ``result.json`` and per-item outcome files. An approval
    records it; a new report (or re-run evals) changes it and so voids the approval. "" = none."""
    import hashlib

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


def gate_verdict(rel: Release, store: ReleaseStore, gate_file: str | Path | None = None) -> dict[str, Any]:
    """The gate decision for ``rel`` recomputed from its stored per-item results, never trusting
    the attached dict's verdict; the form stored as ``Release.gate``.

    The candidate evals must be of this release and the baseline evals of the model that is live
    now; the decision is computed with this manager's own gate policy (``gate_file``).

    Returns:
        ``passed``, ``why`` (what is missing, or the verdict), ``decision`` (``GateDecision.to_dict()``,
        None when none could be computed), ``gate_file``, ``live_model_dir`` (compared against),
        ``report`` (:func:`decision_fingerprint`) and ``at``.
    """
    from evals.gate import GateConfig, evaluate_stage_dirs
    from ground.config import load_config

    policy = Path(gate_file or default_gate_file())
    live = store.live()
    out: dict[str, Any] = {"passed": False, "why": "", "decision": None, "gate_file": str(policy),
                           "live_model_dir": live.model_dir if live else None,
                           "report": decision_fingerprint(rel, store), "at": _now()}
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


def verify_gate(rel: Release, store: ReleaseStore, gate_file: str | Path | None = None) -> tuple[bool, str]:
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


def gate_passed(rel: Release, store: ReleaseStore | None = None, gate_file: str | Path | None = None) -> bool:
    """Whether ``rel`` passes the gate as recomputed from its stored results (see verify_gate)."""
    return verify_gate(rel, store or ReleaseStore(), gate_file)[0]


def valid_approvals(rel: Release, store: ReleaseStore) -> list[Approval]:
    """The approvals that count: by a reviewer, of the decision files as they are now."""
    current = decision_fingerprint(rel, store)
    return [a for a in rel.approvals if a.role == "reviewer" and current and a.report == current]


def _check_approval(rel: Release, store: ReleaseStore, gate_file: str | Path | None) -> None:
    from evals.gate import GateConfig
    from ground.config import load_config

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


def _check_rollback(prev: Release, grace_s: float) -> None:
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


def _check_promotable(
    rel: Release, force: bool = False, store: ReleaseStore | None = None, gate_file: str | Path | None = None,
    grace_s: float = 0.0,
) -> None:
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
    store = store or ReleaseStore()
    ok, why = verify_gate(rel, store, gate_file)
    if not ok:
        raise ReleaseError(
            f"release {rel.release_id} has no passing gate decision ({why}); promotion goes "
            "through the gate (`alignloop run`), or use `alignloop promote --force --reason ...`"
        )
    _check_approval(rel, store, gate_file)


class ReleaseManager:
    """The vLLM processes of one gateway and its current upstream (``UpstreamProvider``).

    Args:
        store: persisted state (default: ``<data dir>/releases``).
        grace_s: how long the previous release stays warm after a promotion or rollback; set it
            above the longest request you serve, since a request still running on the previous
            release when its server stops fails.
        default_args: vLLM arguments for a release staged without its own.
        gate_file: the gate policy promotions are verified with (default configs/gate.yaml).
        placement: how releases share the GPUs (serving/releases/placement.py).
        gpus: the GPUs to place on; None = what ``nvidia-smi`` shows (none on a CPU machine).
    """

    def __init__(
        self,
        store: ReleaseStore | None = None,
        grace_s: float = 600.0,
        default_args: VLLMArgs | None = None,
        gate_file: str | Path | None = None,
        placement: PlacementConfig | None = None,
        gpus: tuple[Gpu, ...] | None = None,
    ) -> None:
        self.store = store or ReleaseStore()
        self.gate_file = gate_file or self.store.gate_file
        self.grace_s = grace_s
        self.default_args = default_args or VLLMArgs()
        self.placement = placement or PlacementConfig()
        self.gpus = gpu_inventory(self.placement) if gpus is None else gpus
        self._servers: dict[str, VLLMServer] = {}
        self._starting: dict[str, VLLMServer] = {}  # release id -> a vLLM still starting
        self._held: dict[str, Placement] = {}  # release id -> devices of a warm or starting vLLM
        self._timers: dict[str, threading.Timer] = {}
        self._upstream: Upstream | None = None
        self._canary: Canary | None = None  # the canary beside live (carried by _upstream)
        # Called with the new upstream after every switch (worker processes learn it this way).
        self._listeners: list = []
        # Promote/rollback are serialised; readers (current()) never take this lock.
        self._ops = threading.RLock()
        self._placing = threading.Lock()
        # GPU starts one at a time: vLLM sizes its KV cache from the memory it sees free.
        self._gpu_start = threading.Lock()
        self._closed = False

    # -- UpstreamProvider ---------------------------------------------------------------------
    def current(self) -> Upstream | None:
        """The live release's endpoint, or None when nothing is serving."""
        return self._upstream

    # -- queries ------------------------------------------------------------------------------
    def list(self) -> list[Release]:
        return self.store.list()

    def live(self) -> Release | None:
        return self.store.live()

    def get(self, release_id: str) -> Release:
        return self.store.get(release_id)

    def warm(self) -> dict[str, dict[str, Any]]:
        """Release id -> {base_url, pid} of every vLLM this manager runs now."""
        return {
            rid: {"base_url": s.base_url, "pid": s.proc.pid if s.proc else None}
            for rid, s in list(self._servers.items())
            if s.alive()
        }

    def describe(self) -> list[dict[str, Any]]:
        """Releases as dicts, with whether each is warm here, the current upstream marked, and
        the start-up phase of a release whose vLLM is starting (``starting``: phase, seconds)."""
        warm = self.warm()
        cur = self._upstream.release_id if self._upstream else None
        starting = {rid: s.startup_progress() for rid, s in list(self._starting.items())}
        return [
            {
                **r.to_dict(),
                "starting": starting.get(r.release_id),
                "warm": r.release_id in warm,
                "base_url": warm.get(r.release_id, {}).get("base_url"),
                "pid": warm.get(r.release_id, {}).get("pid"),
                "serving": r.release_id == cur,
            }
            for r in self.list()
        ]

    def attach_eval(self, release_id: str, report: dict[str, Any] | str | Path) -> Release:
        """Attach an eval report; the stored gate verdict uses this manager's gate policy."""
        return self.store.attach_eval(release_id, report, self.gate_file)

    # -- process handling ---------------------------------------------------------------------
    def _place(self, rel: Release) -> Placement:
        """Devices for the release beside the warm ones (reserved until it stops or fails)."""
        with self._placing:
            # A server that died on its own no longer holds its share; one still starting does.
            others = {rid: p for rid, p in self._held.items() if rid != rel.release_id
                      and (rid not in self._servers or self._servers[rid].alive())}
            try:
                placement = place_release(rel.args(), self.gpus, others, self.placement)
            except PlacementError as exc:  # reported like any other failed start
                raise VLLMStartError(f"no devices for release {rel.release_id}: {exc}") from None
            self._held[rel.release_id] = placement
        self.store.set_placement(rel.release_id, placement)
        return placement

    def _launch(self, rel: Release) -> VLLMServer:
        """Place, start and health-check the release's vLLM; raise VLLMStartError on failure."""
        if self._closed:
            raise ReleaseError("release manager is shut down")
        if rel.upstream_url:
            server = ExternalServer(rel)
            server.wait_ready()
            self._servers[rel.release_id] = server
            return server
        placement = self._place(rel)
        for attempt in (1, 2):  # a hung start-up gets one more try; any other failure none
            server = VLLMServer(
                rel.model_dir,
                args=apply_placement(rel.args(), placement),
                served_name=rel.served_name,
                log_path=self.store.folder(rel.release_id) / "vllm.log",
            )
            self._starting[rel.release_id] = server
            try:
                with self._gpu_start if not placement.on_cpu else contextlib.nullcontext():
                    server.start(wait=False)
                    server.wait_ready()  # stops the process itself if it does not become ready
                break
            except BaseException as exc:
                failed = isinstance(exc, VLLMStartError)
                if failed and exc.hung and attempt == 1 and not self._closed:
                    log.warning("release %s: vLLM start-up hung; starting it once more", rel.release_id)
                    continue
                self._held.pop(rel.release_id, None)
                if failed and self._closed:  # shutdown() killed it mid-start
                    raise ReleaseError("release manager shut down during start-up") from None
                raise
            finally:
                self._starting.pop(rel.release_id, None)
        if self._closed:
            server.stop()
            raise ReleaseError("release manager shut down during start-up")
        self._servers[rel.release_id] = server
        return server

    def _ensure_warm(self, rel: Release) -> VLLMServer:
        server = self._servers.get(rel.release_id)
        if server is not None and server.alive():
            try:  # it may have died or wedged since it was staged: one real generation again
                server.check_generation(timeout_s=60)
                return server
            except Exception as exc:  # noqa: BLE001 - any failure means "restart it"
                log.warning("release %s stopped answering (%s); restarting", rel.release_id, exc)
                server.stop()
        return self._launch(rel)

    def _stop(self, release_id: str) -> None:
        if self._canary is not None and self._canary.upstream.release_id == release_id:
            self._set_canary(None)  # never route users to a stopped server (a holdback's grace ends)
        timer = self._timers.pop(release_id, None)
        if timer:
            timer.cancel()
        server = self._servers.pop(release_id, None)
        if server:
            server.stop()
        self._held.pop(release_id, None)

    def _stop_after_grace(self, release_id: str) -> None:
        timer = self._timers.pop(release_id, None)
        if timer:
            timer.cancel()
        if self.grace_s <= 0:
            self._stop(release_id)
            return
        timer = threading.Timer(self.grace_s, self._grace_expired, args=(release_id,))
        timer.daemon = True
        self._timers[release_id] = timer
        timer.start()

    def _grace_expired(self, release_id: str) -> None:
        with self._ops:
            cur = self._upstream.release_id if self._upstream else None
            if release_id != cur:  # it may have become live again by a rollback meanwhile
                log.info("grace period over: stopping previous release %s", release_id)
                self._stop(release_id)

    def _switch(self, server: VLLMServer, rel: Release) -> None:
        timer = self._timers.pop(rel.release_id, None)
        if timer:  # it was counting down as 'previous'; it is live now
            timer.cancel()
        if self._canary is not None and self._canary.upstream.release_id == rel.release_id:
            self._canary = None  # the canary goes live: it no longer has a share of its own
        # One reference assignment: a request reads current() once, so it never sees half a switch.
        self._upstream = Upstream(
            server.base_url, rel.release_id, rel.served_name, getattr(server, "api_key", None),
            server.tool_parser, self._canary,
        )
        for listener in list(self._listeners):
            listener(self._upstream)

    def _set_canary(self, canary: Canary | None) -> None:
        """Add or remove the canary beside the live upstream (one assignment, as a switch)."""
        self._canary = canary
        if self._upstream is not None:
            self._upstream = dataclasses.replace(self._upstream, canary=canary)
            for listener in list(self._listeners):
                listener(self._upstream)

    # -- verbs ----------------------------------------------------------------------------------
    def start(self) -> Release | None:
        """Bring up the persisted live release (gateway start). If it fails, fall back to previous.

        Returns the release that serves, or None (nothing live, or nothing would start).
        """
        with self._ops:
            for rel in (self.store.live(), self.store.previous()):
                if rel is None:
                    continue
                try:
                    server = self._launch(rel)
                except VLLMStartError as exc:  # (ReleaseError on shutdown propagates)
                    log.error("release %s did not start: %s", rel.release_id, exc)
                    self.store.set_status(rel.release_id, "failed", _short(exc))
                    continue
                if rel.status != "live":
                    self.store.set_status(rel.release_id, "live", "live release failed at start")
                self._switch(server, rel)
                log.info("serving release %s at %s", rel.release_id, server.base_url)
                self._resume_canary()
                return rel
            return None

    def _resume_canary(self) -> None:
        """At gateway start: the persisted canary serves its share again (or is marked failed)."""
        rel = self.store.canary()
        if rel is None:
            return
        try:
            server = self._launch(rel)
        except VLLMStartError as exc:
            self.store.set_status(rel.release_id, "failed", f"canary did not start: {_short(exc)}")
            return
        self._set_canary(self._canary_of(rel, server))

    @classmethod
    def _canary_of(cls, rel: Release, server: VLLMServer) -> Canary:
        c = rel.canary or {}
        return cls._routed(rel, server, float(c.get("share", 0.0)), c.get("tenants") or ())

    @staticmethod
    def _routed(rel: Release, server: VLLMServer, share: float, tenants: Iterable[str]) -> Canary:
        """``rel`` served to ``share`` of ``tenants``' users beside live (a canary or a holdback)."""
        return Canary(
            Upstream(server.base_url, rel.release_id, rel.served_name, getattr(server, "api_key", None),
                     server.tool_parser),
            share, tuple(tenants),
        )

    def start_canary(
        self, release_id: str, share: float, tenants: Iterable[str] = (), force: bool = False,
        reason: str | None = None, by: str = "",
    ) -> Release:
        """Route ``share`` of ``tenants``' end users (every tenant when empty) to a staged release,
        sticky per user, beside live. It enters through the gate as a promotion does (or forced,
        with a reason, recorded); the online rules later promote it or end it."""
        if not 0 < share < 1:
            raise ReleaseError(f"canary share {share}: must be between 0 and 1")
        if force and not reason:
            raise ReleaseError("a forced canary needs a reason")
        with self._ops:
            target = self.store.get(release_id)
            if target.status != "staged":
                raise ReleaseError(f"release {release_id} is {target.status}: only a staged release can be a canary")
            if (other := self.store.canary()) is not None:
                raise ReleaseError(f"release {other.release_id} is the canary already: end it first")
            live = self.store.live()
            if live is None or self._upstream is None:
                raise ReleaseError("no live release serves: a canary is compared with live; promote instead")
            _check_promotable(target, force, self.store, self.gate_file, self.grace_s)
            try:
                server = self._ensure_warm(target)
            except VLLMStartError as exc:
                self.store.set_status(release_id, "failed", _short(exc))
                raise ReleaseError(f"release {release_id} failed to start; live unchanged: {exc}") from None
            with self.store.locked():
                rel = self.store.get(release_id)
                rel.canary = {"share": share, "tenants": list(tenants), "started_at": _now(),
                              "live": live.release_id}
                self.store.save(rel)
            why = f"canary: {share:.0%} of {', '.join(tenants) or 'every tenant'}'s users, beside {live.release_id}"
            rel = self.store.set_status(release_id, "canary", f"{why}; {reason}" if reason else why, force, by)
            self._set_canary(self._canary_of(rel, server))
            return rel

    def end_canary(self, reason: str, by: str = "") -> Release:
        """Stop routing users to the canary and retire it (the online rules found harm, or were
        still inconclusive at its maximum duration); live keeps every user."""
        with self._ops:
            rel = self.store.canary()
            if rel is None:
                raise ReleaseError("no release is a canary")
            self._set_canary(None)
            self._stop(rel.release_id)
            return self.store.set_status(rel.release_id, "retired", reason, by=by)

    def on_switch(self, listener) -> None:  # noqa: ANN001 - Callable[[Upstream | None], None]
        """Call ``listener(upstream)`` after every switch (and at shutdown, with None)."""
        self._listeners.append(listener)

    def stage_external(
        self,
        url: str,
        model: str,
        api_key_env: str | None = None,
        source: dict[str, Any] | None = None,
        release_id: str | None = None,
    ) -> Release:
        """Stage an external OpenAI-compatible server (``url`` ends in /v1) answering to
        ``model``; health-checked like a vLLM release, never started or stopped by us."""
        if not re.match(r"^https?://[^\s/]+(/\S*)?$", url):
            raise ReleaseError(f"upstream_url {url!r}: expected http(s)://host[:port]/v1")
        rel = self.store.create(
            url, self.default_args, {"kind": "external", **(source or {})},
            release_id or new_release_id("external"),
        )
        with self.store.locked():
            rel = self.store.get(rel.release_id)
            rel.upstream_url, rel.upstream_model, rel.api_key_env = url, model, api_key_env
            self.store.save(rel)
        try:
            server = self._launch(rel)
        except VLLMStartError as exc:
            log.error("staging %s failed: %s", rel.release_id, exc)
            return self.store.set_status(rel.release_id, "failed", _short(exc))
        return self.store.set_status(
            rel.release_id, "staged", f"external upstream healthy at {server.base_url}"
        )

    def stage(
        self,
        model_dir: str | Path,
        args: VLLMArgs | None = None,
        source: dict[str, Any] | None = None,
        release_id: str | None = None,
    ) -> Release:
        """Start a candidate on its own port and health-check it; users are not routed to it.

        Returns the release with status ``staged``, or ``failed`` (with the reason) when it did
        not start or answer: a failed release stays on record and can never be promoted.
        """
        rel = self.store.create(model_dir, args or self.default_args, source, release_id)
        try:
            server = self._launch(rel)
        except VLLMStartError as exc:
            log.error("staging %s failed: %s", rel.release_id, exc)
            return self.store.set_status(rel.release_id, "failed", _short(exc))
        tools = f"tool-call parser {server.tool_parser}" if server.tool_parser else "tools off"
        return self.store.set_status(
            rel.release_id, "staged",
            f"healthy at {server.base_url} after {server.startup_s:.0f}s; {tools}",
        )

    def promote(
        self, release_id: str, force: bool = False, reason: str | None = None, by: str = "",
        holdback: float | None = None, holdback_tenants: Iterable[str] = (),
    ) -> Release:
        """Make a release live. It is started (if cold) and health-checked first; on failure the
        live release keeps serving and this raises :class:`ReleaseError`.

        Args:
            force: the promotion overrides a gate decision; recorded with ``reason``.
            by: who asks (the admin key's id); recorded in the status history.
            holdback: a share of ``holdback_tenants``' users (all tenants when empty) kept on the
                previous release while it is warm (the grace period), so the online rules can
                watch the new live release against it (``monitor`` on the release record).
        """
        if holdback is not None and not 0 < holdback < 1:
            raise ReleaseError(f"holdback {holdback}: must be between 0 and 1")
        if force and not reason:
            raise ReleaseError("a forced promotion needs a reason")
        with self._ops:
            target = self.store.get(release_id)
            _check_promotable(target, force, self.store, self.gate_file, self.grace_s)
            force = force or canary_forced(target)  # recorded as forced, as its canary was
            try:
                server = self._ensure_warm(target)
            except VLLMStartError as exc:
                self.store.set_status(release_id, "failed", _short(exc))
                raise ReleaseError(
                    f"release {release_id} failed to start; live unchanged: {exc}"
                ) from None
            canary = self.store.canary()
            if canary is not None and canary.release_id != release_id:
                self.end_canary(f"canary ended: {release_id} promoted over {old_id(self.store)}", by)
            old = self.store.live()
            self._switch(server, target)
            self._demote_after_switch(old, release_id, f"{release_id} promoted", by)
            rel = self.store.set_status(release_id, "live", reason or "promoted", force, by)
            old_server = self._servers.get(old.release_id) if old is not None else None
            if holdback and old_server is not None and self.grace_s > 0:
                tenants = list(holdback_tenants)
                with self.store.locked():
                    rel = self.store.get(release_id)
                    now = datetime.now(UTC)
                    rel.monitor = {"previous": old.release_id, "share": holdback, "tenants": tenants,
                                   "started_at": now.isoformat(timespec="milliseconds"),
                                   "until": (now + timedelta(seconds=self.grace_s)).isoformat(timespec="milliseconds")}
                    self.store.save(rel)
                self._set_canary(self._routed(old, old_server, holdback, tenants))
        self.store.refresh_gate_verdicts()  # after the switch: users are on the new release already
        return rel

    def rollback(self, reason: str | None = None, by: str = "") -> Release:
        """Make the previous release live again (instant while warm; restarted otherwise), within
        its grace period; after it, promote it through the gate or with force."""
        with self._ops:
            prev = self.store.previous()
            if prev is None:
                raise ReleaseError("nothing to roll back to: no release has status 'previous'")
            _check_rollback(prev, self.grace_s)
            if self.store.canary() is not None:  # it was compared with the live being rolled back
                self.end_canary(f"canary ended: live rolled back to {prev.release_id}", by)
            try:
                server = self._ensure_warm(prev)
            except VLLMStartError as exc:
                raise ReleaseError(
                    f"previous release {prev.release_id} failed to restart; live unchanged: {exc}"
                ) from None
            old = self.store.live()
            self._switch(server, prev)
            # The rolled-back release becomes 'previous' (warm for the grace period), so a second
            # rollback undoes the first.
            self._demote_after_switch(old, prev.release_id, f"rolled back to {prev.release_id}", by)
            rel = self.store.set_status(prev.release_id, "live", reason or "rollback", by=by)
        self.store.refresh_gate_verdicts()
        return rel

    def _demote_after_switch(self, old: Release | None, new_id: str, why: str, by: str = "") -> None:
        for p in self.store.with_status("previous"):
            if p.release_id != new_id:
                self._stop(p.release_id)
                self.store.set_status(p.release_id, "retired", f"replaced as previous: {why}", by=by)
        if old is not None and old.release_id != new_id:
            self.store.set_status(old.release_id, "previous", why, by=by)
            self._stop_after_grace(old.release_id)

    def retire(self, release_id: str, reason: str = "", by: str = "") -> Release:
        """Stop a staged or previous release and take it out of rotation (not the live one)."""
        with self._ops:
            rel = self.store.get(release_id)
            if rel.status == "live":
                raise ReleaseError(f"release {release_id} is live: promote or roll back first")
            if rel.status == "canary":
                self._set_canary(None)
            self._stop(release_id)
            return self.store.set_status(release_id, "retired", reason or "retired", by=by)

    def shutdown(self) -> None:
        """Stop every vLLM this manager started (statuses stay as they are for the next start)."""
        self._closed = True
        for server in list(self._starting.values()):  # do not wait out a start-up in progress
            server.stop()
        with self._ops:
            self._upstream = None
            for listener in list(self._listeners):
                listener(None)
            for rid in list(self._timers):
                self._timers.pop(rid).cancel()
            for rid in list(self._servers):
                self._servers.pop(rid).stop()
            self._held.clear()

    def __enter__(self) -> ReleaseManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def _short(exc: BaseException, limit: int = 2000) -> str:
    text = str(exc)
    return text if len(text) <= limit else text[: limit // 2] + "\n...\n" + text[-limit // 2 :]


def live_lineage(releases_root: str | Path | None = None) -> Lineage | None:
    """The live release's lineage, or None when no release is live."""
    root = Path(releases_root) if releases_root else data_dir() / "releases"
    if not root.is_dir():  # reading must not create the folder (ReleaseStore would)
        return None
    live = ReleaseStore(root).live()
    return release_lineage(live.release_id, live.model_dir) if live is not None else None
