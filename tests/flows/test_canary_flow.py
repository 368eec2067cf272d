"""The `canary-check` Prefect flow (flows/canary.py) under Prefect's test harness: one run looks
once at a canary behind a real gateway (external releases, simulated users: as
tests/serving/test_canary.py), carries out the verdict and publishes each rule's bound as an
artifact; a run that continues schedules the deployment's next run instead of waiting."""

from __future__ import annotations

import random
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "serving"))
from test_canary import ONLINE, _fake, _users_rate  # noqa: E402
from test_gateway_support import ADMIN, make_config  # noqa: E402

pytestmark = pytest.mark.integration


def test_canary_check_flow_rolls_back_and_schedules_follow_ups(prefect_harness, tmp_path, data_home) -> None:
    from prefect.client.orchestration import get_client

    from flows.canary import (
        DEPLOYMENT,
        artifact_key,
        canary_check,
        register_deployment,
        schedule_check,
    )
    from ground.logstore import LogStore
    from serving.control.admin_api import build_admin_router
    from serving.gateway.app import create_app, serve_in_thread
    from serving.releases.manager import ReleaseManager
    from serving.releases.store import ReleaseStore

    online = tmp_path / "online.yaml"
    online.write_text(yaml.safe_dump(ONLINE))
    db = f"sqlite:///{tmp_path / 'logs.db'}"
    store = LogStore(db)
    texts = {"live": "The live answer.", "bad": "A BAD answer."}
    p_down = {texts["live"]: 0.1, texts["bad"]: 0.6}
    fakes = {k: _fake(v) for k, v in texts.items()}
    with (serve_in_thread(fakes["live"].app) as live_url, serve_in_thread(fakes["bad"].app) as bad_url,
          ReleaseManager(ReleaseStore(), grace_s=600) as manager):
        manager.stage_external(live_url + "/v1", "fake-model", release_id="live")
        manager.promote("live", force=True, reason="first release")
        manager.stage_external(bad_url + "/v1", "fake-model", release_id="bad")
        gw = make_config(guardrails={"input": [], "output": []})
        app = create_app(gw, manager, store, extra_routers=[build_admin_router(manager)])
        with serve_in_thread(app) as base:
            loop = tmp_path / "loop.yaml"
            loop.write_text(yaml.safe_dump({"gateway": {"url": base, "admin_key": ADMIN},
                                            "data": {"logstore": {"url": db}}}))
            manager.start_canary("bad", 0.5, ["a"], force=True, reason="test: no offline evals")
            # Before any traffic: inconclusive, and not a deployment run, so nothing is scheduled.
            out = canary_check(config=str(online), loop_config=str(loop))
            assert (out["action"], out.get("next_check")) == ("continued", None), out
            _users_rate(base, random.Random(3), 240, p_down)
            store.flush()
            out = canary_check(config=str(online), loop_config=str(loop))
            assert out["action"] == "rolled_back", out["markdown"]
            assert manager.get("bad").status == "retired"

    with get_client(sync_client=True) as client:
        art = client.read_latest_artifacts()
        mine = [a for a in art if a.key == artifact_key("canary", "bad")]
        assert mine and "thumbs_down" in mine[0].data and "rolled_back" in mine[0].data
        # The loop's first check (and each continuing run's next one) is a scheduled flow run of
        # the deployment: nothing waits in a worker meanwhile.
        assert schedule_check(60, {}) is None  # no deployment registered yet: says so
        register_deployment(str(online), str(loop), pool="alignloop-test")
        run_id = schedule_check(600, {})
        run = client.read_flow_run(run_id)
        dep = client.read_deployment_by_name(DEPLOYMENT)
    assert run.deployment_id == dep.id and run.state.is_scheduled()
    assert (run.expected_start_time - datetime.now(UTC)).total_seconds() > 500
    assert run.parameters["config"] == str(online.resolve())
