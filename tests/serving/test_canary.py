"""Canary releases end to end on the CPU: a real gateway (its admin API and log store), a real
release manager, external releases (scripted OpenAI-compatible servers: no vLLM), simulated end
users who rate what they are served, and the online rules (evals/online.py) checked by
`alignloop canary check` and serving.control.canary.run_check (what the CLI and the flow run).

A candidate made worse on purpose (its users thumb it down 60% of the time, live's 10%) is rolled
back automatically during its canary; a good one (the same answers as live) is promoted.
"""

from __future__ import annotations

import dataclasses
import json
import random
import sys
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
import yaml
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))
from test_gateway_support import ADMIN, KEY_A, KEY_B, FakeUpstream, make_config  # noqa: E402

from evals.online import OnlineConfig  # noqa: E402
from flows.cli import app as cli_app  # noqa: E402
from ground.config import build_config  # noqa: E402
from ground.logstore import LogStore  # noqa: E402
from serving.control.admin_api import AdminClient, build_admin_router  # noqa: E402
from serving.control.canary import run_check  # noqa: E402
from serving.gateway.app import create_app, serve_in_thread  # noqa: E402
from serving.gateway.upstream import Canary, Upstream, route_request  # noqa: E402
from serving.releases.manager import ReleaseManager  # noqa: E402
from serving.releases.store import ReleaseStore  # noqa: E402

# Margins wide enough to resolve on a few hundred answers (the shipped configs/online.yaml needs
# hours of traffic; benchmarks/online_oc.py measures it); every rule of the shipped set is here.
ONLINE = {
    "alpha": 0.05,
    "canary": {"share": 0.5, "min_duration_s": 0, "max_duration_s": 3600},
    "slow_ttft_ms": 5000,
    "monitor": {"holdback": 0.5},
    "rules": [
        {"name": "thumbs_down", "metric": "thumbs_down_rate", "margin": 0.25},
        {"name": "edits", "metric": "edit_rate", "margin": 0.2},
        {"name": "blocks", "metric": "block_rate", "margin": 0.2},
        {"name": "errors", "metric": "error_rate", "margin": 0.2},
        {"name": "slow_ttft", "metric": "slow_ttft_rate", "margin": 0.2},
        {"name": "tokens", "metric": "answer_tokens", "margin": 400, "harm_margin": 100},
    ],
}
H = {"Authorization": f"Bearer {ADMIN}"}


def _fake(reply: str) -> FakeUpstream:
    fake = FakeUpstream(reply=reply)
    fake.app.get("/v1/models")(lambda: {"object": "list", "data": [{"id": "fake-model"}]})
    return fake


def _users_rate(base: str, rng: random.Random, requests: int, p_down: dict[str, float]) -> dict[str, int]:
    """Simulated users (ids u0..u39 of tenant a) ask and rate each answer; an answer's thumbs-down
    probability is set by its text (p_down[text]). Returns answers seen per text."""
    seen: dict[str, int] = {}
    served_to: dict[str, set[str]] = {}
    ha = {"Authorization": f"Bearer {KEY_A}"}
    with httpx.Client(base_url=base, timeout=30) as c:
        for i in range(requests):
            user = f"u{rng.randrange(40)}"
            r = c.post("/v1/chat/completions", headers=ha, json={
                "model": "alignloop", "user": user, "messages": [{"role": "user", "content": f"question {i}"}],
            })
            assert r.status_code == 200, r.text
            text = r.json()["choices"][0]["message"]["content"]
            seen[text] = seen.get(text, 0) + 1
            served_to.setdefault(user, set()).add(text)
            thumbs = "down" if rng.random() < p_down[text] else "up"
            f = c.post("/v1/feedback", headers=ha, json={"request_id": r.json()["id"], "rating": {"thumbs": thumbs}})
            assert f.status_code == 200, f.text
    # sticky: while the canary runs, one person sees one release
    assert all(len(texts) == 1 for texts in served_to.values()), served_to
    return seen


def test_route_request_is_sticky_per_user_and_keeps_the_share() -> None:
    live = Upstream("http://live/v1", "live", "m")
    can = Upstream("http://can/v1", "cand", "m")
    up = Upstream("http://live/v1", "live", "m", canary=Canary(can, 0.25, ("a",)))
    users = [f"user{i}" for i in range(4000)]
    first = {u: route_request(up, "a", u, f"r{u}").release_id for u in users}
    assert all(route_request(up, "a", u, "other").release_id == first[u] for u in users[:200])
    share = sum(v == "cand" for v in first.values()) / len(users)
    assert 0.22 < share < 0.28, share
    assert all(route_request(up, "b", u, "r").release_id == "live" for u in users[:200])  # not its tenant
    assert route_request(live, "a", "user1", "r") is live
    assert Upstream.from_dict(up.to_dict()) == up  # what worker processes read from shared memory


def test_bad_canary_is_rolled_back_and_good_canary_is_promoted(tmp_path, data_home) -> None:
    cfg = build_config(OnlineConfig, ONLINE, "test")
    rng = random.Random(7)
    store = LogStore(f"sqlite:///{tmp_path / 'logs.db'}")
    texts = {"live": "The live answer.", "bad": "A BAD answer.", "good": "The good answer."}
    p_down = {texts["live"]: 0.1, texts["bad"]: 0.6, texts["good"]: 0.1}
    fakes = {k: _fake(v) for k, v in texts.items()}
    with (serve_in_thread(fakes["live"].app) as live_url, serve_in_thread(fakes["bad"].app) as bad_url,
          serve_in_thread(fakes["good"].app) as good_url,
          ReleaseManager(ReleaseStore(), grace_s=600) as manager):
        manager.stage_external(live_url + "/v1", "fake-model", release_id="live")
        manager.promote("live", force=True, reason="first release: nothing to compare with")
        for rid, url in (("bad", bad_url), ("good", good_url)):
            manager.stage_external(url + "/v1", "fake-model", release_id=rid)
        # Guardrails light (the PII hooks' cost is not what is tested here).
        gw = make_config(guardrails={"input": [{"name": "injection"}], "output": []})
        app = create_app(gw, manager, store, extra_routers=[build_admin_router(manager)])
        with serve_in_thread(app) as base, AdminClient(base, ADMIN) as admin:
            # Entering a canary goes through the gate, as a promotion does: no evals, so 409.
            r = httpx.post(base + "/admin/releases/bad/canary", json={"share": 0.5}, headers=H)
            assert r.status_code == 409 and "gate" in r.json()["error"]["message"]
            r = httpx.post(base + "/admin/releases/bad/canary", json={"share": 1.5}, headers=H)
            assert r.status_code == 400 and r.json()["error"]["param"] == "share", r.text
            admin.start_canary("bad", 0.5, ["a"], force=True, reason="e2e: no offline evals")

            seen = _users_rate(base, rng, 160, p_down)
            assert seen.get(texts["bad"], 0) > 30 and seen.get(texts["live"], 0) > 30, seen
            # tenant b is not in the canary's tenants: live answers it
            hb = {"Authorization": f"Bearer {KEY_B}"}
            r = httpx.post(base + "/v1/chat/completions", headers=hb, json={
                "model": "alignloop", "user": "u1", "messages": [{"role": "user", "content": "hi"}]})
            assert r.json()["choices"][0]["message"]["content"] == texts["live"]

            # `alignloop canary check` against the running gateway, as an operator or the flow runs it
            cfg_file = tmp_path / "online.yaml"
            cfg_file.write_text(yaml.safe_dump(ONLINE))
            store.flush()
            cli = ["--config", str(cfg_file), "--log-store", store.url, "--url", base, "--admin-key", ADMIN]
            out = CliRunner().invoke(cli_app, ["canary", "check", *cli, "--json"])
            assert out.exit_code == 0, out.output
            result = json.loads(out.output)
            assert (result["action"], result["decision"]["verdict"]) == ("rolled_back", "rollback"), out.output
            bad = manager.get("bad")
            assert bad.status == "retired" and bad.history[-1].reason.startswith("canary rolled back: ")
            assert "thumbs_down harm" in bad.history[-1].reason
            assert manager.current().canary is None and manager.live().release_id == "live"
            seen = _users_rate(base, rng, 20, p_down)
            assert set(seen) == {texts["live"]}  # nobody sees the rolled-back canary

            out = CliRunner().invoke(cli_app, ["canary", "start", "good", "--share", "0.5", "--tenant", "a", "--force",
                                               "--reason", "e2e: no offline evals", *cli[:2], *cli[4:]])
            assert out.exit_code == 0 and out.output.startswith("good: canary (canary: 50% of a's users"), out.output
            checks = []
            for _ in range(6):  # check as the flow does, while traffic flows, until it resolves
                _users_rate(base, rng, 120, p_down)
                checks.append(run_check(cfg, store, admin, datetime.now(UTC)))
                if checks[-1].action != "continued":
                    break
            assert checks[-1].action == "promoted", checks[-1].decision.to_markdown()
            good = manager.get("good")
            assert good.status == "live" and good.history[-1].reason.startswith("online rules vs live")
            assert good.history[-1].forced  # it entered its canary forced: the promotion says so
            assert manager.get("live").status == "previous"
            assert manager.current().release_id == "good"
            out = CliRunner().invoke(cli_app, ["release", "list", "--url", base, "--admin-key", ADMIN])
            assert out.exit_code == 0, out.output
            assert "canary: 50% of a's users" in out.output and "canary rolled back: online rules" in out.output

            # After its promotion, half of tenant a's users stay on the previous release while it
            # is warm, and the same rules watch the new live release against it. The new release
            # turns bad (its answers now get thumbed down): rolled back automatically.
            assert manager.current().canary.upstream.release_id == "live"  # the holdback
            assert good.monitor["previous"] == "live" and good.monitor["share"] == 0.5
            assert run_check(cfg, store, admin).action == "watching"
            fakes["good"].reply = texts["bad"]
            _users_rate(base, rng, 200, p_down)
            result = run_check(cfg, store, admin, datetime.now(UTC))
            assert (result.stage, result.action) == ("monitor", "monitor_rolled_back"), result.decision.to_markdown()
            assert manager.live().release_id == "live" and manager.current().canary is None
            last = manager.get("live").history[-1]
            assert last.reason.startswith("monitor rolled back: online rules vs live") and "thumbs_down harm" in last.reason
            assert run_check(cfg, store, admin).action == "none"  # the rolled-back release is not watched


@pytest.mark.parametrize("field,value", [("canary.share", 1.5), ("rules.0.margin", 2.0)])
def test_online_config_names_the_bad_field(field: str, value: float) -> None:
    from ground.config import ConfigError

    data = {**ONLINE, "canary": dict(ONLINE["canary"]), "rules": [dict(r) for r in ONLINE["rules"]]}
    if field == "canary.share":
        data["canary"]["share"] = value
    else:
        data["rules"][0]["margin"] = value
    with pytest.raises((ConfigError, ValueError), match=field.split(".")[-1]):
        build_config(OnlineConfig, data, "test")


def test_loop_starts_the_gates_winner_as_a_canary(tmp_path, data_home) -> None:
    """The loop's last step (flows/steps.apply_decision) with ``canary: true``: the winner, whose
    gate decision the release manager recomputes from the run folder, becomes a canary (not
    forced) with the share and tenants of the online config; the loser is retired."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "review"))
    from review_support import verifiable_decision

    from flows.loop_config import LoopConfig
    from flows.steps import apply_decision

    online = tmp_path / "online.yaml"
    online.write_text(yaml.safe_dump({**ONLINE, "canary": {**ONLINE["canary"], "share": 0.3, "tenants": ["a"]}}))
    run = data_home / "runs" / "r1"
    (run / "report").mkdir(parents=True)
    with (serve_in_thread(_fake("live answer").app) as live_url, serve_in_thread(_fake("new answer").app) as new_url,
          ReleaseManager(ReleaseStore(), grace_s=600) as manager):
        manager.stage_external(live_url + "/v1", "fake-model", release_id="rel-live")
        manager.promote("rel-live", force=True, reason="first release")
        for rid in ("rel-aligned", "rel-quantized"):
            manager.stage_external(new_url + "/v1", "fake-model", release_id=rid)
        verifiable_decision(manager.store, run, "aligned", "rel-aligned", require_approval=False)
        manager.gate_file = manager.store.gate_file
        report_json = run / "report" / "decision.json"
        gate = {v: {"passed": v == "aligned", "require_approval": False, "rules": []} for v in ("aligned", "quantized")}
        report_json.write_text(json.dumps({"gate": gate | {"serving_choice": {}}}))
        decision = {"winner": "aligned", "summary": "promote aligned", "report_json": str(report_json),
                    "report_md": str(run / "report" / "report.md")}
        releases = {"aligned": {"release_id": "rel-aligned"}, "quantized": {"release_id": "rel-quantized"}}
        app = create_app(make_config(guardrails={"input": [], "output": []}), manager, LogStore(
            f"sqlite:///{tmp_path / 'logs.db'}"), extra_routers=[build_admin_router(manager)])
        with serve_in_thread(app) as base:
            cfg = LoopConfig.model_validate({"gateway": {"url": base, "admin_key": ADMIN}, "canary": True,
                                             "online_file": str(online)})
            promotion = apply_decision(cfg, releases, decision, str(run))
            canary = manager.get("rel-aligned")
            assert promotion["canary"] and not promotion["promoted"], promotion
            assert canary.status == "canary" and not canary.history[-1].forced
            assert canary.canary["share"] == 0.3 and canary.canary["tenants"] == ["a"]
            assert canary.canary["live"] == "rel-live" and manager.live().release_id == "rel-live"
            assert manager.get("rel-quantized").status == "retired"
            assert manager.current().canary.upstream.release_id == "rel-aligned"


@pytest.mark.integration
def test_worker_processes_route_the_canary_sticky_per_user(tmp_path) -> None:
    """`alignloop serve` with worker processes: the canary travels with the live upstream through
    shared memory, and every worker assigns a user to the same release."""
    from test_dataplane import _rows, control_plane

    with control_plane(tmp_path, make_config(guardrails={"input": [], "output": []})) as (
        base, manager, releases, _ups, store, _plane,
    ):
        live = dataclasses.replace(releases[0], canary=Canary(releases[1], 0.5, ("a",)))
        manager.set(live)
        users = [f"u{i}" for i in range(20)]
        with httpx.Client(base_url=base, timeout=30) as c:
            for _ in range(3):  # each user three times, over whichever worker the kernel picks
                for u in users:
                    r = c.post("/v1/chat/completions", headers={"Authorization": f"Bearer {KEY_A}"}, json={
                        "model": "alignloop", "user": u, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]})
                    assert r.status_code == 200, r.text
        rows = _rows(store, 3 * len(users))
        by_user: dict[str, set[str]] = {}
        for row in rows:
            by_user.setdefault(row["params"]["user"], set()).add(row["release"])
        assert len(rows) == 3 * len(users)
        assert all(len(v) == 1 for v in by_user.values()), by_user
        expected = {u: route_request(live, "a", u, "").release_id for u in users}
        assert {u: next(iter(v)) for u, v in by_user.items()} == expected
        assert set(expected.values()) == {"r0", "r1"}


def test_canary_check_without_a_gateway_decides_on_the_files(tmp_path, data_home) -> None:
    """`alignloop canary status|check` with no gateway running read the persisted releases and
    the log store, and record the outcome in the data dir (it takes effect at the next serve)."""
    from ground.logstore import ExchangeRecord
    from serving.engine.vllm_server import VLLMArgs

    releases = ReleaseStore()
    for rid in ("live", "cand"):
        releases.create(tmp_path / rid, VLLMArgs(), release_id=rid)
        releases.set_status(rid, "staged", "healthy (test)")
    releases.promote_offline("live", force=True, reason="first release")
    with releases.locked():
        rel = releases.get("cand")
        rel.canary = {"share": 0.5, "tenants": ["a"], "started_at": "2026-12-07T00:00:00.000+00:00", "live": "live"}
        releases.save(rel)
    releases.set_status("cand", "canary", "canary (test)", forced=True, by="test")
    logs = LogStore(f"sqlite:///{tmp_path / 'logs.db'}")
    rng = random.Random(1)
    for i in range(300):
        rid = "cand" if i % 2 else "live"
        logs.log_exchange(ExchangeRecord(id=f"r{i}", tenant="a", release=rid, response="x", latency_ms=10.0,
                                         usage={"completion_tokens": 5}, messages=[{"role": "user", "content": "q"}]))
        logs.flush()
        down = rng.random() < (0.6 if rid == "cand" else 0.1)
        logs.add_feedback(f"r{i}", "a", "rating", {"thumbs": "down" if down else "up"})
    logs.close()
    cfg_file = tmp_path / "online.yaml"
    cfg_file.write_text(yaml.safe_dump(ONLINE))
    cli = ["--config", str(cfg_file), "--log-store", f"sqlite:///{tmp_path / 'logs.db'}"]
    out = CliRunner().invoke(cli_app, ["canary", "status", *cli])
    assert out.exit_code == 0 and "**rollback**" in out.output and "action: continued" in out.output, out.output
    assert releases.get("cand").status == "canary"  # status only looks
    out = CliRunner().invoke(cli_app, ["canary", "check", *cli])
    assert out.exit_code == 0 and "action: rolled_back" in out.output and "no gateway running" in out.output, out.output
    last = releases.get("cand").history[-1]
    assert last.status == "retired" and last.reason.startswith("canary rolled back:") and "(offline)" in last.by
    out = CliRunner().invoke(cli_app, ["canary", "check", *cli, "alpha=0.7"])
    assert out.exit_code == 1 and "alpha" in out.output, out.output  # a bad override names the field
