"""The review page over plain HTTP: sessions, CSRF, tenant scope, the feedback rules, PII on
display, queue filters and sampling, and the approval rule of the release manager.

The gateway, its SQLite store and the release folder are real; the model servers are
``FakeUpstream`` scripts (review_support.py says why).
"""

from __future__ import annotations

import re
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from review_support import (  # noqa: E402
    ADMIN,
    ALICE,
    BOB,
    CAROL,
    KEY_A,
    FakeUpstream,
    chat,
    make_config,
    make_run,
    review_config,
    review_site,
    running_fake,
    running_gateway,
    staged_candidate,
    verifiable_decision,
)

from ground.config import ConfigError, load_config  # noqa: E402
from serving.gateway.config import GatewayConfig, hash_key  # noqa: E402
from serving.releases.records import ReleaseError  # noqa: E402
from serving.releases.store import ReleaseStore  # noqa: E402
from serving.review.data import read_eval_samples, stratified_sample  # noqa: E402
from serving.review.page import build_review_router  # noqa: E402


def signed_in(base: str, key: str) -> tuple[httpx.Client, str]:
    """A client with a review session and the session's CSRF token."""
    c = httpx.Client(base_url=base, timeout=30)
    r = c.post("/review/login", data={"key": key, "next": "/review"})
    assert r.status_code == 303, r.text
    page = c.get("/review")
    assert page.status_code == 200
    return c, re.search(r'"X-CSRF-Token": "([0-9a-f]{64})"', page.text).group(1)


def test_login_session_csrf_and_tenant_scope(tmp_path: Path, data_home: Path) -> None:
    with review_site(tmp_path) as site:
        anon = httpx.Client(base_url=site.base)
        assert anon.get("/review").status_code == 303  # to the login form
        assert anon.post("/review/login", data={"key": "nope"}).status_code == 401
        # A login posted from another site is refused (login CSRF).
        assert (
            anon.post(
                "/review/login", data={"key": ALICE}, headers={"origin": "http://evil.example"}
            ).status_code
            == 403
        )

        r = anon.post("/review/login", data={"key": ALICE, "next": "https://evil.example/"})
        assert r.headers["location"] == "/review"  # no open redirect
        cookie = r.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/review" in cookie

        alice, csrf = signed_in(site.base, ALICE)
        a_id, b_id = site.live_ids["a"][0], site.live_ids["b"][0]
        page = alice.get("/review").text
        assert a_id in page and b_id not in page  # alice reviews tenant a only

        # Action POSTs need the session's CSRF token.
        r = alice.post(f"/review/x/{a_id}/rate", data={"thumbs": "up"})
        assert r.status_code == 403
        r = alice.post(
            f"/review/x/{a_id}/rate", data={"thumbs": "up"}, headers={"X-CSRF-Token": "0" * 64}
        )
        assert r.status_code == 403
        assert list(site.store.feedback_events()) == []

        # Another tenant's exchange is "not found", as in the API, and nothing is stored.
        r = alice.post(
            f"/review/x/{b_id}/rate", data={"thumbs": "down"}, headers={"X-CSRF-Token": csrf}
        )
        assert r.status_code == 404
        assert list(site.store.feedback_events()) == []

        # The same rating twice is one row (the feedback service's idempotency).
        for note in ("saved", "already recorded"):
            r = alice.post(
                f"/review/x/{a_id}/rate", data={"thumbs": "up"}, headers={"X-CSRF-Token": csrf}
            )
            assert r.status_code == 200 and note in r.text
        rows = list(site.store.feedback_events())
        assert [(f["request_id"], f["tenant"], f["actor"], f["actor_role"]) for f in rows] == [
            (a_id, "a", "alice", "reviewer")
        ]
        # Bad input is a 4xx with the field named, and stores nothing.
        r = alice.post(
            f"/review/x/{a_id}/rate", data={"thumbs": "meh"}, headers={"X-CSRF-Token": csrf}
        )
        assert r.status_code == 400 and "thumbs" in r.text
        r = alice.post(
            f"/review/x/{a_id}/edit", data={"text": "  "}, headers={"X-CSRF-Token": csrf}
        )
        assert r.status_code == 400 and "text" in r.text
        assert len(list(site.store.feedback_events())) == 1

        # A tampered session cookie is no session.
        forged = httpx.Client(
            base_url=site.base, cookies={"alignloop_review": "eyJyIjoiY2Fyb2wifQ.x.y"}
        )
        assert forged.get("/review").status_code == 303

        # Bob (tenant b) sees b's exchange; a comparison token of alice's is no use to him.
        bob, bob_csrf = signed_in(site.base, BOB)
        assert b_id in bob.get("/review").text
        r = bob.post(
            f"/review/x/{b_id}/prefer",
            data={"choice": "a", "token": "x"},
            headers={"X-CSRF-Token": bob_csrf},
        )
        assert r.status_code == 400


def test_queue_shows_pii_redacted_even_when_the_store_holds_it(
    tmp_path: Path, data_home: Path
) -> None:
    # No guardrails in this gateway: the store keeps the planted email and phone verbatim, and
    # the page must still not show them.
    leak = "Sure: write to jane.doe@example.com or call +1 415-555-0132."
    cfg = review_config(guardrails={"input": [], "output": []})
    with (
        running_fake(FakeUpstream(reply=leak)) as up,
        running_gateway(tmp_path, up, cfg, extra_routers=[build_review_router()]) as (
            base,
            _,
            store,
        ),
    ):
        rid = chat(base, KEY_A, "I am bob@example.org, phone 415-555-0199. Help?")
        assert "jane.doe@example.com" in store.get_exchange(rid)["response"]
        alice, _ = signed_in(base, ALICE)
        page = alice.get("/review").text
        for value in ("jane.doe@example.com", "415-555-0132", "bob@example.org", "415-555-0199"):
            assert value not in page
        assert page.count("&lt;EMAIL_ADDRESS&gt;") >= 2 and "&lt;PHONE_NUMBER&gt;" in page


def test_queue_filters_by_verdict_feedback_release_and_tenant(
    tmp_path: Path, data_home: Path
) -> None:
    with review_site(tmp_path) as site:
        carol, csrf = signed_in(site.base, CAROL)  # every tenant

        def shown(**params) -> set[str]:  # noqa: ANN003
            r = carol.get("/review", params=params)
            assert r.status_code == 200, r.text
            return set(re.findall(r'data-id="([^"]+)"', r.text))

        everything = set(site.live_ids["a"]) | set(site.live_ids["b"])
        assert shown() == everything
        assert shown(tenant="b") == set(site.live_ids["b"])
        blocked = shown(verdict="block")
        assert len(blocked) == 1 and blocked < set(site.live_ids["a"])
        assert shown(verdict="redact") | shown(verdict="block") == shown(verdict="flagged")
        assert shown(verdict="allow") == everything - shown(verdict="flagged")
        assert shown(release="fake-r1") == everything - blocked  # blocked never reached a release

        rated = site.live_ids["a"][0]
        r = carol.post(
            f"/review/x/{rated}/rate", data={"thumbs": "down"}, headers={"X-CSRF-Token": csrf}
        )
        assert r.status_code == 200
        assert shown(feedback="reviewed") == {rated}
        assert shown(feedback="none") == everything - {rated}
        assert shown(feedback="user") == set()

        assert len(shown(n=2, seed=1)) == 2
        assert shown(n=2, seed=1) == shown(n=2, seed=1)  # the same seed, the same slice
        r = carol.get("/review", params={"verdict": "bogus"})
        assert r.status_code == 400 and "verdict" in r.text
        # Nothing older than the window.
        assert shown(hours=0.0001) <= everything


def test_stratified_sample_keeps_every_stratum_and_its_share() -> None:
    now = datetime.now(UTC)
    items = [
        {"release": "r1", "tenant": "big", "id": f"b{i}", "created_at": now} for i in range(90)
    ]
    items += [
        {"release": "r2", "tenant": "small", "id": f"s{i}", "created_at": now} for i in range(10)
    ]
    items += [{"release": "r1", "tenant": "tiny", "id": "t0", "created_at": now}]
    picked = stratified_sample(items, 20, seed=3)
    assert len(picked) == 20 and len({p["id"] for p in picked}) == 20
    counts = {t: sum(p["tenant"] == t for p in picked) for t in ("big", "small", "tiny")}
    assert counts["tiny"] == 1  # a small stratum is not sampled away
    assert 16 <= counts["big"] <= 18 and 1 <= counts["small"] <= 3
    assert [p["id"] for p in stratified_sample(items, 20, seed=3)] == [p["id"] for p in picked]
    assert [p["id"] for p in stratified_sample(items, 20, seed=4)] != [p["id"] for p in picked]
    assert stratified_sample(items, 500, seed=0) == items


def test_approval_rule_and_who_may_approve(tmp_path: Path, data_home: Path) -> None:
    with review_site(tmp_path) as site:
        rel = site.releases.get("rel-aligned")
        with pytest.raises(ReleaseError, match="approval"):
            site.releases.promote_offline(rel.release_id)
        assert site.releases.get(rel.release_id).status == "staged"

        bob, bob_csrf = signed_in(site.base, BOB)  # a reviewer without can_approve
        r = bob.post(
            "/review/releases/rel-aligned/approve",
            data={"note": "lgtm"},
            headers={"X-CSRF-Token": bob_csrf},
        )
        assert r.status_code == 403 and site.releases.get("rel-aligned").approvals == []

        alice, csrf = signed_in(site.base, ALICE)
        assert "require" in alice.get("/review/releases/rel-aligned").text
        for _ in range(2):  # approving twice records one approval
            r = alice.post(
                "/review/releases/rel-aligned/approve",
                data={"note": "ok"},
                headers={"X-CSRF-Token": csrf},
            )
            assert r.status_code == 200 and "approved by" in r.text
        approvals = site.releases.get("rel-aligned").approvals
        assert [(a.by, a.role) for a in approvals] == [("alice", "reviewer")]
        assert site.releases.promote_offline("rel-aligned").status == "live"
        # A live release is not approved again; an unknown one is a 404.
        r = alice.post("/review/releases/rel-aligned/approve", headers={"X-CSRF-Token": csrf})
        assert r.status_code == 409
        r = alice.post("/review/releases/nope/approve", headers={"X-CSRF-Token": csrf})
        assert r.status_code == 404


def test_without_require_approval_promotion_needs_none(tmp_path: Path) -> None:
    store = ReleaseStore(tmp_path / "releases")
    run = tmp_path / "runs" / "r1"
    make_run(run)
    staged_candidate(store, run, require_approval=False)
    assert store.promote_offline("rel-aligned").status == "live"


def test_the_admin_api_records_no_approval(tmp_path: Path, data_home: Path) -> None:
    """The admin key is held by the loop itself: only a reviewer's approval counts (issue 23)."""
    from serving.control.admin_api import build_admin_router
    from serving.releases.manager import ReleaseManager

    store = ReleaseStore(tmp_path / "releases")
    run = tmp_path / "run"
    make_run(run)
    staged_candidate(store, run)
    manager = ReleaseManager(store)  # no vLLM is started: approval only touches the files
    try:
        with running_gateway(
            tmp_path, None, make_config(), extra_routers=[build_admin_router(manager)]
        ) as (base, _, _store):
            headers = {"Authorization": f"Bearer {ADMIN}"}
            r = httpx.post(
                base + "/admin/releases/rel-aligned/approve", json={"note": "ci"}, headers=headers
            )
            assert r.status_code == 403 and r.json()["error"]["code"] == "approval_needs_reviewer"
    finally:
        manager.shutdown()
    assert store.get("rel-aligned").approvals == []


def test_reviewer_config_is_checked_at_load(tmp_path: Path) -> None:
    base = make_config().model_dump()
    bad = {**base, "reviewers": [{"name": "x", "key_sha256": hash_key("k"), "tenants": ["zz"]}]}
    with pytest.raises(ValueError, match="unknown tenants"):
        GatewayConfig.model_validate(bad)
    same_key = {
        **base,
        "reviewers": [{"name": "x", "key_sha256": hash_key(KEY_A), "tenants": ["a"]}],
    }
    with pytest.raises(ValueError, match="distinct"):
        GatewayConfig.model_validate(same_key)
    path = tmp_path / "gw.yaml"
    path.write_text("reviewers:\n  - {name: x, key_sha256: abc, tenants: ['*']}\n")
    with pytest.raises(ConfigError, match="reviewers.0.key_sha256"):
        load_config(GatewayConfig, path)


def test_eval_samples_are_keyed_by_item_id_when_present(tmp_path: Path) -> None:
    (tmp_path / "evals-x").mkdir()
    (tmp_path / "evals-x" / "quality_samples.jsonl").write_text(
        '{"item_id": "cap-7", "task": "t", "prompt": "p", "response": "r"}\n'
        '{"task": "t", "prompt": "q", "response": "s"}\n'
    )
    rows = read_eval_samples(tmp_path, "x")
    assert set(rows) == {"t\x1fcap-7", "t\x1fq"}
    assert read_eval_samples(tmp_path, "missing") == {}


def test_eval_samples_are_read_from_the_eval_stages_output_folder(tmp_path: Path) -> None:
    """Where the eval stage writes them (evals/suites.py: ``<stage>/output/``), keyed by the
    quality suite's ``id`` within its task (a demo run's page said "no eval samples found")."""
    out = tmp_path / "evals-aligned" / "output"
    out.mkdir(parents=True)
    (out / "quality_samples.jsonl").write_text(
        '{"task": "alignloop_arithmetic", "id": "arithmetic-000", "prompt": "p", "response": "85"}\n'
        '{"task": "alignloop_capitals", "id": "capitals-000", "prompt": "q", "response": "Paris"}\n'
    )
    rows = read_eval_samples(tmp_path, "aligned")
    assert set(rows) == {"alignloop_arithmetic\x1farithmetic-000", "alignloop_capitals\x1fcapitals-000"}


def test_window_excludes_old_exchanges(tmp_path: Path) -> None:
    from ground.logstore import ExchangeRecord, LogStore
    from serving.review.data import QueueQuery, load_queue

    store = LogStore(f"sqlite:///{tmp_path / 'logs.db'}")
    try:
        now = datetime.now(UTC)
        for rid, age_h in (("old", 30), ("new", 1)):
            store.log_exchange(
                ExchangeRecord(
                    id=rid,
                    tenant="a",
                    messages=[{"role": "user", "content": "hi"}],
                    response="hello",
                    release="r1",
                    created_at=now - timedelta(hours=age_h),
                )
            )
        q = load_queue(store, QueueQuery(hours=24), ["a"], now=now)
        assert [ex["id"] for ex in q.items] == ["new"] and q.total == 1
        assert load_queue(store, QueueQuery(hours=48), ["b"], now=now).total == 0  # not her tenant
        assert load_queue(store, QueueQuery(hours=48, tenant="a"), ["b"], now=now).total == 0
    finally:
        store.close()


def test_loop_leaves_the_winner_staged_until_a_reviewer_approves(
    tmp_path: Path, data_home: Path
) -> None:
    """The loop's last step (flows/steps.apply_decision) against a real gateway's admin API:
    with require_approval the winner is not promoted (which the release manager would refuse)
    and stays staged for the review page; the losing candidate is retired as before."""
    import json

    from flows.loop_config import LoopConfig
    from flows.steps import apply_decision
    from serving.control.admin_api import build_admin_router
    from serving.engine.vllm_server import VLLMArgs
    from serving.releases.manager import ReleaseManager

    store = ReleaseStore(tmp_path / "releases")
    run = tmp_path / "runs" / "r1"
    make_run(run)
    releases = {}
    for variant in ("aligned", "quantized"):
        model = run / variant
        model.mkdir()
        rel = store.create(model, VLLMArgs(), release_id=f"rel-{variant}")
        store.set_status(rel.release_id, "staged", "healthy (test)")
        releases[variant] = {"release_id": rel.release_id}
    # The stored results the release manager recomputes the decision from (require_approval on).
    verifiable_decision(store, run, "aligned", "rel-aligned", require_approval=True)
    gate = {v: {"passed": v == "aligned", "require_approval": True, "rules": []} for v in releases}
    report_json = run / "report" / "decision.json"
    report_json.write_text(json.dumps({"gate": gate | {"serving_choice": {}}}))
    decision = {
        "winner": "aligned",
        "summary": "promote aligned",
        "report_json": str(report_json),
        "report_md": str(run / "report" / "report.md"),
    }
    manager = ReleaseManager(store)  # no vLLM starts: nothing is promoted
    try:
        with running_gateway(
            tmp_path, None, make_config(), extra_routers=[build_admin_router(manager)]
        ) as (base, _, _store):
            cfg = LoopConfig.model_validate({"gateway": {"url": base, "admin_key": ADMIN}})
            promotion = apply_decision(cfg, releases, decision, str(run))
    finally:
        manager.shutdown()
    assert promotion["promoted"] is False and "awaiting" in promotion["why"]
    assert store.get("rel-aligned").status == "staged"
    assert store.get("rel-quantized").status == "retired"
    with pytest.raises(ReleaseError, match="approval"):
        store.promote_offline("rel-aligned")
    store.approve("rel-aligned", "alice")
    assert store.promote_offline("rel-aligned").status == "live"


def test_templates_and_static_files_ship_in_the_package() -> None:
    import fnmatch
    import tomllib

    root = Path(__file__).parents[2]
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"
    ]["serving.review"]
    for folder in ("templates", "static"):
        for f in (root / "serving" / "review" / folder).iterdir():
            rel = f"{folder}/{f.name}"
            assert any(fnmatch.fnmatch(rel, p) for p in patterns), f"{rel} would not be packaged"


def test_approval_is_offered_only_where_it_can_lead_to_a_promotion(tmp_path: Path, data_home: Path) -> None:
    """A staged release the gate would promote: offered. The same release once retired, or one
    the gate kept out (keep: inconclusive): not, with the reason the page shows."""
    import json

    from serving.review.data import approvable

    store = ReleaseStore(tmp_path / "releases")
    run = tmp_path / "runs" / "r1"
    make_run(run)
    rel = staged_candidate(store, run)
    assert approvable(rel) == (True, "")
    keep = json.loads(Path(rel.eval_report).read_text())
    keep["gate"] |= {"passed": False, "verdict": "inconclusive"}
    Path(rel.eval_report).write_text(json.dumps(keep))
    assert approvable(store.get(rel.release_id)) == (
        False, "the gate decided keep: inconclusive: nothing to approve")
    retired = store.set_status(rel.release_id, "retired", "not promoted (test)")
    can, why = approvable(retired)
    assert not can and "retired" in why
