"""Releases: blue/green vLLM deploys behind the gateway, with promotion, rollback and canaries.

:class:`ReleaseManager` owns the vLLM processes of one gateway process and implements the
gateway's ``UpstreamProvider``: the upstream is one attribute swapped in a single assignment, and
each request reads it once at its start, so a switch never breaks a request in flight.

Each start places the release on devices (:mod:`serving.releases.placement`: whole GPUs, or a
memory share when GPUs are fewer than releases; nothing on a CPU) and records that as
``placement``. An external OpenAI-compatible server is a release too
(:mod:`serving.releases.external`): never started or stopped, health-checked the same way.

What a release is and its statuses: :mod:`serving.releases.records`; the persisted state:
:mod:`serving.releases.store`; the gate checks a promotion passes: :mod:`serving.releases.verify`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
import threading
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from serving.engine.vllm_server import VLLMArgs, VLLMServer, VLLMStartError
from serving.gateway.upstream import Canary, Upstream
from serving.releases.external import ExternalServer
from serving.releases.placement import (
    Gpu,
    Placement,
    PlacementConfig,
    PlacementError,
    apply_placement,
    gpu_inventory,
    place_release,
)
from serving.releases.records import Release, ReleaseError, new_release_id, now_iso
from serving.releases.store import ReleaseStore
from serving.releases.verify import canary_forced, check_promotable, check_rollback

log = logging.getLogger(__name__)


def old_id(store: ReleaseStore) -> str:
    live = store.live()
    return live.release_id if live else "nothing"


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
            check_promotable(target, force, self.store, self.gate_file, self.grace_s)
            try:
                server = self._ensure_warm(target)
            except VLLMStartError as exc:
                self.store.set_status(release_id, "failed", _short(exc))
                raise ReleaseError(f"release {release_id} failed to start; live unchanged: {exc}") from None
            with self.store.locked():
                rel = self.store.get(release_id)
                rel.canary = {"share": share, "tenants": list(tenants), "started_at": now_iso(),
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
            check_promotable(target, force, self.store, self.gate_file, self.grace_s)
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
            check_rollback(prev, self.grace_s)
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
