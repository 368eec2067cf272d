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

from serving.admin_api import build_admin_router
from serving.releases import ReleaseError, ReleaseManager, ReleaseNotFound, ReleaseStore
from serving.server import ServeConfig
from serving.vllm_server import VLLMArgs
from training.config import ConfigError, load_config, repo_root

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
    from serving.server import server_file

    monkeypatch.delenv("ALIGNLOOP_GATEWAY_URL", raising=False)
    monkeypatch.delenv("ALIGNLOOP_ADMIN_KEY", raising=False)
    # This test process stands in for a running gateway (its pid is alive).
    server_file().write_text(json.dumps({"url": "http://127.0.0.1:9", "pid": os.getpid()}))
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
