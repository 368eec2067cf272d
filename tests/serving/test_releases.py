"""Releases without vLLM: persisted state, status rules, the admin API's shape, offline CLI, config.

Releases here are written straight into the store (they never start a server); the tests with
real vLLM processes are in test_releases_integration.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from ground.config import ConfigError, load_config, repo_root
from serving.control.admin_api import build_admin_router
from serving.control.server import ServeConfig
from serving.engine.vllm_server import VLLMArgs
from serving.releases.manager import ReleaseManager
from serving.releases.records import Approval, ReleaseError, ReleaseNotFound
from serving.releases.store import ReleaseStore
from serving.releases.verify import decision_fingerprint, stored_gate_passed

HAND_MADE = {"gate": {"passed": True, "decision": "promote"}}  # what once unlocked a promotion


def _staged(store: ReleaseStore, model: Path, rid: str) -> str:
    store.create(model, VLLMArgs(), {"run_dir": "runs/x", "stage": "quantize"}, rid)
    store.set_status(rid, "staged", "test fixture (not started)")
    return rid


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text("{}")
    return d


def test_store_persists_record_link_and_lineage(data_home: Path, model_dir: Path) -> None:
    store = ReleaseStore()
    rid = _staged(store, model_dir, "r1")
    again = ReleaseStore().get(rid)  # a fresh store reads the files
    assert again.status == "staged"
    assert again.source == {"run_dir": "runs/x", "stage": "quantize"}
    assert again.args() == VLLMArgs()
    assert (data_home / "releases" / "r1" / "model").resolve() == model_dir.resolve()
    with pytest.raises(ReleaseError, match="already exists"):
        store.create(model_dir, VLLMArgs(), release_id="r1")
    with pytest.raises(ReleaseError, match="release_id"):
        store.create(model_dir, VLLMArgs(), release_id="../escape")
    with pytest.raises(ReleaseNotFound):
        store.get("nope")


def test_offline_promote_and_rollback_walk_the_statuses(
    data_home: Path, model_dir: Path, write_decision_files, simple_gate: Path
) -> None:
    store = ReleaseStore()
    a, b, c = (_staged(store, model_dir, r) for r in ("a", "b", "c"))
    store.promote_offline(a, force=True, reason="first release: nothing live to compare with")
    store.attach_eval(b, write_decision_files(data_home, "r1", "aligned", b, model_dir))
    store.promote_offline(b, gate_file=simple_gate)
    assert [r.status for r in store.list()] == ["previous", "live", "staged"]
    store.promote_offline(c, force=True, reason="gate said keep; owner overrode")
    assert {r.release_id: r.status for r in store.list()} == {
        a: "retired",
        b: "previous",
        c: "live",
    }
    last = store.get(c).history[-1]
    assert last.forced and "overrode" in last.reason
    store.rollback_offline("bad answers")
    assert store.live().release_id == b and store.previous().release_id == c
    with pytest.raises(ReleaseError, match="already live"):
        store.promote_offline(b)


def test_failed_or_unchecked_release_is_never_promoted(data_home: Path, model_dir: Path) -> None:
    store = ReleaseStore()
    store.create(model_dir, VLLMArgs(), release_id="bad")
    with pytest.raises(ReleaseError, match="never health-checked"):
        store.promote_offline("bad")
    store.set_status("bad", "failed", "did not answer")
    with pytest.raises(ReleaseError, match="failed its start/health check"):
        store.promote_offline("bad", force=True, reason="try anyway")
    with ReleaseManager(store) as manager, pytest.raises(ReleaseError, match="failed"):
        manager.promote("bad", force=True, reason="try anyway")
    assert store.live() is None and store.get("bad").status == "failed"


def test_stage_of_missing_model_is_failed_and_nothing_serves(data_home: Path) -> None:
    with ReleaseManager(grace_s=0) as manager:
        rel = manager.stage(data_home / "no-such-model", release_id="missing")
        assert rel.status == "failed"
        assert "not found" in rel.history[-1].reason
        assert manager.current() is None and manager.warm() == {}
        with pytest.raises(ReleaseError, match="needs a reason"):
            manager.promote("missing", force=True)
        with pytest.raises(ReleaseError, match="nothing to roll back"):
            manager.rollback()


def test_attach_eval_report(data_home: Path, model_dir: Path, tmp_path: Path) -> None:
    store = ReleaseStore()
    _staged(store, model_dir, "r1")
    report = tmp_path / "metrics.json"
    report.write_text(json.dumps({"quality": {"acc": 0.5}}))
    rel = store.attach_eval("r1", report)
    assert json.loads(Path(rel.eval_report).read_text()) == {"quality": {"acc": 0.5}}
    assert store.get("r1").eval_report == rel.eval_report


def test_admin_router_errors_use_openai_shape(data_home: Path, model_dir: Path) -> None:
    store = ReleaseStore()
    _staged(store, model_dir, "ok")
    store.create(model_dir, VLLMArgs(), release_id="bad")
    store.set_status("bad", "failed", "no")
    app = FastAPI()
    with ReleaseManager(store) as manager:
        app.include_router(
            build_admin_router(manager, dependencies=[])
        )  # auth tested with the gateway
        client = TestClient(app)
        listed = client.get("/admin/releases").json()
        assert {r["release_id"]: r["status"] for r in listed["data"]} == {
            "ok": "staged",
            "bad": "failed",
        }
        assert listed["current"] is None
        r = client.post("/admin/releases/nope/promote", json={})
        assert r.status_code == 404 and r.json()["error"]["code"] == "release_not_found"
        r = client.post("/admin/releases/bad/promote", json={"force": True, "reason": "x"})
        assert r.status_code == 409 and "failed" in r.json()["error"]["message"]
        assert client.post("/admin/releases/rollback", json={}).status_code == 409
        assert (
            client.post("/admin/releases", json={"model_dir": "x", "bogus": 1}).status_code == 422
        )
        r = client.post("/admin/releases/ok/eval", json={"report": {"acc": 1}})
        assert r.status_code == 200 and r.json()["eval_report"].endswith("eval_report.json")


def test_cli_offline_promote_and_list(data_home: Path, model_dir: Path, monkeypatch) -> None:
    from flows.cli import app

    monkeypatch.delenv("ALIGNLOOP_GATEWAY_URL", raising=False)
    store = ReleaseStore()
    _staged(store, model_dir, "r1")
    runner = CliRunner()
    res = runner.invoke(app, ["release", "promote", "r1"])
    assert res.exit_code == 1 and "no passing gate decision" in res.output  # the gate decides
    store.attach_eval("r1", HAND_MADE)
    res = runner.invoke(app, ["release", "promote", "r1"])
    assert res.exit_code == 1 and "no passing gate decision" in res.output  # a dict is no decision
    res = runner.invoke(app, ["release", "promote", "r1", "--force", "--reason", "first release"])
    assert res.exit_code == 0, res.output
    assert "no gateway running" in res.output and store.get("r1").status == "live"
    res = runner.invoke(app, ["release", "list"])
    assert "r1" in res.output and "live" in res.output
    res = runner.invoke(app, ["release", "promote", "r1", "--force"])
    assert res.exit_code != 0 and "--reason" in res.output
    res = runner.invoke(app, ["release", "rollback"])
    assert res.exit_code == 1 and "nothing to roll back" in res.output


def test_shipped_serve_config_loads_and_bad_field_is_named(tmp_path: Path) -> None:
    cfg = load_config(ServeConfig, repo_root() / "configs/serve.yaml")
    assert cfg.releases.grace_s > 0 and cfg.releases.default_args.max_model_len > 0
    with pytest.raises(ConfigError, match="releases.grace_s"):
        load_config(ServeConfig, repo_root() / "configs/serve.yaml", ["releases.grace_s=-1"])
    with pytest.raises(ConfigError, match="releases.default_args.dtyp"):
        load_config(ServeConfig, None, ["releases.default_args.dtyp=float32"])


def test_cli_offline_stage_of_missing_model_fails_clearly(data_home: Path, monkeypatch) -> None:
    from flows.cli import app

    monkeypatch.delenv("ALIGNLOOP_GATEWAY_URL", raising=False)
    res = CliRunner().invoke(app, ["release", "stage", str(data_home / "nope"), "--id", "x"])
    assert res.exit_code == 1 and "x: failed" in res.output and "not found" in res.output
    assert ReleaseStore().get("x").status == "failed"


def test_cli_talks_to_running_gateway_and_needs_admin_key(data_home: Path, monkeypatch) -> None:
    import os

    from flows.cli import app
    from serving.control.server import server_file

    monkeypatch.delenv("ALIGNLOOP_GATEWAY_URL", raising=False)
    monkeypatch.delenv("ALIGNLOOP_ADMIN_KEY", raising=False)
    # This test process stands in for a running gateway (its pid is alive), on an address other
    # machines reach (TEST-NET-1: the CLI sends no key there, so no request is made): on loopback
    # the CLI would try the published demo admin key first (tests/flows/test_cli.py).
    server_file().write_text(json.dumps({"url": "http://192.0.2.7:9", "pid": os.getpid()}))
    runner = CliRunner()
    res = runner.invoke(app, ["release", "rollback"])
    assert res.exit_code != 0 and "ALIGNLOOP_ADMIN_KEY" in res.output
    res = runner.invoke(app, ["serve", "--config", str(repo_root() / "configs/serve.yaml")])
    assert res.exit_code == 1 and "already runs" in res.output


def test_promotion_goes_through_the_gate(data_home: Path, model_dir: Path) -> None:
    """A never-live release needs a passing gate decision, or force with a reason."""
    store = ReleaseStore()
    rid = _staged(store, model_dir, "cand")
    with pytest.raises(ReleaseError, match="no passing gate decision"):
        store.promote_offline(rid)
    store.attach_eval(rid, {"gate": {"passed": False}})
    with pytest.raises(ReleaseError, match="no passing gate decision"):
        store.promote_offline(rid)
    forced = store.promote_offline(rid, force=True, reason="incident 42: the live model leaks")
    assert forced.status == "live" and forced.history[-1].forced


def test_hand_made_report_does_not_unlock_promotion(
    data_home: Path, model_dir: Path, tmp_path: Path, write_decision_files, simple_gate: Path
) -> None:
    """The manager recomputes the decision from the run folder's stored per-item results with its
    own gate policy: an attached verdict, a run folder outside the data dir, evals of another
    release or against a model that is no longer live, and results that fail all stay refused."""
    store = ReleaseStore()
    live = _staged(store, model_dir, "live")
    store.promote_offline(live, force=True, reason="first release")
    cand = _staged(store, tmp_path, "cand")

    def refused(report: dict, why: str) -> None:
        store.attach_eval(cand, report)
        with pytest.raises(ReleaseError, match=why):
            store.promote_offline(cand, gate_file=simple_gate)
        with ReleaseManager(store, gate_file=simple_gate) as manager, pytest.raises(ReleaseError, match=why):
            manager.promote(cand)  # the running gateway's path: refused before anything starts
        assert store.live().release_id == live

    refused(HAND_MADE, "does not name the run folder")
    elsewhere = tmp_path / "runs"
    outside = write_decision_files(tmp_path, "r0", "aligned", cand, model_dir)  # not under the data dir
    assert Path(outside["run_dir"]).is_relative_to(elsewhere)
    refused(outside, "must be a loop run under")
    refused(write_decision_files(data_home, "r1", "aligned", "someone-else", model_dir), "of release 'someone-else'")
    refused(write_decision_files(data_home, "r2", "aligned", cand, tmp_path / "old-live"), "live now serves")
    refused(write_decision_files(data_home, "r3", "aligned", cand, model_dir, better=0, worse=20), "says fail")
    refused(write_decision_files(data_home, "r4", "aligned", cand, model_dir, better=2, n=60), "inconclusive")

    store.attach_eval(cand, write_decision_files(data_home, "r5", "aligned", cand, model_dir))
    assert store.promote_offline(cand, gate_file=simple_gate).status == "live"
    assert store.get(cand).history[-1].forced is False


@pytest.fixture
def approval_gate(simple_gate: Path) -> Path:
    """simple_gate with ``require_approval: true``."""
    path = simple_gate.with_name("gate-approval.yaml")
    path.write_text(simple_gate.read_text() + "require_approval: true\n")
    return path


def _live_and_candidate(store: ReleaseStore, model_dir: Path) -> None:
    _staged(store, model_dir, "live")
    store.promote_offline("live", force=True, reason="first release: nothing live to compare with")
    _staged(store, model_dir, "cand")


def test_only_a_reviewer_approves_and_only_the_report_they_saw(
    data_home: Path, model_dir: Path, write_decision_files, approval_gate: Path
) -> None:
    store = ReleaseStore(gate_file=approval_gate)
    _live_and_candidate(store, model_dir)
    with pytest.raises(ReleaseError, match="no eval report"):
        store.approve("cand", "alice")  # nothing to approve yet
    store.attach_eval("cand", write_decision_files(data_home, "r1", "aligned", "cand", model_dir))
    # The admin key is the loop's own: it cannot satisfy the rule that checks the loop.
    with pytest.raises(ReleaseError, match="only a reviewer"):
        store.approve("cand", "admin", "admin")
    with pytest.raises(ReleaseError, match="approval"):
        store.promote_offline("cand")
    # An approval the admin API once recorded (no report bound to it) does not count either.
    rel = store.get("cand")
    rel.approvals.append(Approval("admin", "admin", "2026-12-01T00:00:00+00:00", "ci"))
    store.save(rel)
    with pytest.raises(ReleaseError, match="approval"):
        store.promote_offline("cand")

    rel = store.approve("cand", "alice", note="read the report")
    assert [a.by for a in rel.approvals] == ["alice"] and [a.by for a in rel.void_approvals] == ["admin"]
    assert rel.approvals[0].report == decision_fingerprint(rel, store) != ""
    # A new report voids the approval; so do evals re-run into the same run folder.
    store.attach_eval("cand", write_decision_files(data_home, "r2", "aligned", "cand", model_dir, better=31))
    rel = store.get("cand")
    assert rel.approvals == [] and [a.by for a in rel.void_approvals] == ["admin", "alice"]
    with pytest.raises(ReleaseError, match="earlier eval report"):
        store.promote_offline("cand")
    store.approve("cand", "alice")
    write_decision_files(data_home, "r2", "aligned", "cand", model_dir, better=32)  # not re-attached
    with pytest.raises(ReleaseError, match="approval"):
        store.promote_offline("cand")
    store.approve("cand", "alice")
    assert store.promote_offline("cand").status == "live"


def test_without_the_gate_only_the_previous_release_within_its_grace_period(
    data_home: Path, model_dir: Path
) -> None:
    store = ReleaseStore(grace_s=600)
    a, b, c = (_staged(store, model_dir, r) for r in ("a", "b", "c"))
    store.promote_offline(a, force=True, reason="first release", by="ops-1")
    store.promote_offline(b, force=True, reason="second", by="ops-1")
    # Undoing the last promotion soon after is a rollback: no gate, not forced.
    back = store.promote_offline(a)
    assert back.status == "live" and not back.history[-1].forced
    assert back.history[-1].by.endswith("(offline)")  # the OS user, where no key names anyone
    store.rollback_offline("a was better after all")
    store.promote_offline(c, force=True, reason="third", by="ops-2")
    assert (store.get(a).status, store.get(b).status) == ("retired", "previous")
    # A release that was live once, long ago, is a candidate like any other.
    with pytest.raises(ReleaseError, match="no passing gate decision"):
        store.promote_offline(a)
    # Past the grace period the previous release is no exception either, by rollback or promotion.
    store.grace_s = 0
    with pytest.raises(ReleaseError, match="grace period"):
        store.rollback_offline()
    with pytest.raises(ReleaseError, match="no passing gate decision"):
        store.promote_offline(b)
    with pytest.raises(ReleaseError, match="needs a reason"):
        store.promote_offline(b, force=True)
    forced = store.promote_offline(b, force=True, reason="incident 42: c breaks checkout", by="oncall")
    assert forced.history[-1].forced and forced.history[-1].by == "oncall"
    assert store.get(c).history[-1].by == "oncall"  # demoted by the same person
    # The gateway's manager applies its own grace period to rollbacks.
    with ReleaseManager(store, grace_s=0) as manager, pytest.raises(ReleaseError, match="grace period"):
        manager.rollback()
    assert store.live().release_id == b


def test_the_gate_verdict_is_stored_with_the_managers_policy(
    data_home: Path, model_dir: Path, write_decision_files, simple_gate: Path
) -> None:
    store = ReleaseStore()
    _live_and_candidate(store, model_dir)
    report = write_decision_files(data_home, "r1", "aligned", "cand", model_dir)
    strict = simple_gate.with_name("gate-strict.yaml")  # a policy this candidate does not meet
    strict.write_text(simple_gate.read_text().replace("margin: 0.0", "margin: 0.9"))
    with ReleaseManager(store, gate_file=simple_gate) as manager:
        rel = manager.attach_eval("cand", report)
        assert rel.gate["passed"] is True and stored_gate_passed(rel) is True
        assert rel.gate["gate_file"] == str(simple_gate) and rel.gate["decision"]["verdict"] == "pass"
        assert rel.gate["report"] == decision_fingerprint(rel, store)
        app = FastAPI()
        app.include_router(build_admin_router(manager, dependencies=[]))
        (listed,) = [r for r in TestClient(app).get("/admin/releases").json()["data"] if r["release_id"] == "cand"]
        assert listed["gate"]["passed"] is True
    rel = ReleaseStore(gate_file=strict).attach_eval("cand", report)
    assert rel.gate["passed"] is False and "fail" in rel.gate["why"]
    assert stored_gate_passed(ReleaseStore().get("cand")) is False
    assert stored_gate_passed(store.get("live")) is None  # nothing attached: no verdict


def test_a_stored_verdict_against_a_model_no_longer_live_is_refreshed(
    data_home: Path, model_dir: Path, tmp_path: Path, write_decision_files, simple_gate: Path
) -> None:
    store = ReleaseStore(gate_file=simple_gate)
    _live_and_candidate(store, model_dir)
    _staged(store, model_dir, "cand2")
    store.attach_eval("cand2", write_decision_files(data_home, "r2", "aligned", "cand2", model_dir))
    assert stored_gate_passed(store.get("cand2")) is True
    other = tmp_path / "other-model"
    other.mkdir()
    store.create(other, VLLMArgs(), release_id="other")
    store.set_status("other", "staged", "test fixture (not started)")
    store.promote_offline("other", force=True, reason="a different model goes live")
    stale = store.get("cand2")  # its evals compared against a model that no longer serves
    assert stored_gate_passed(stale) is False and "evaluate again" in stale.gate["why"]
