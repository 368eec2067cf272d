"""`alignloop schedule`: a deployment in a process work pool with the cron given, and one run per
model at a time (a global concurrency limit), checked through Prefect's API (test harness)."""

from __future__ import annotations

import threading
import time

import pytest

pytestmark = pytest.mark.integration


def test_deployment_goes_to_a_process_work_pool(prefect_harness) -> None:
    from prefect.client.orchestration import get_client

    from flows.schedule import register_deployment
    from flows.work_pools import model_limit_name
    from ground.config import repo_root

    deployment_id = register_deployment("nightly", "15 3 * * *", "configs/loop.yaml", ["sft.train.epochs=2"])
    with get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name("alignment-loop/nightly")
        pool = client.read_work_pool("alignloop")
        limit = client.read_global_concurrency_limit_by_name(model_limit_name("embedded"))
    assert str(dep.id) == deployment_id
    assert [s.schedule.cron for s in dep.schedules] == ["15 3 * * *"]
    assert dep.parameters["overrides"] == ["sft.train.epochs=2"]
    assert dep.parameters["config"].endswith("configs/loop.yaml")
    assert dep.work_pool_name == "alignloop" and pool.type == "process"
    assert dep.job_variables["working_dir"] == str(repo_root())
    assert dep.entrypoint.endswith("flows/loop.py:alignment_loop")
    assert limit.limit == 1 and limit.active
    # Registering again updates the same deployment, pool and limit.
    assert register_deployment("nightly", "0 4 * * *", "configs/loop.yaml", []) == deployment_id


def test_one_run_per_model_at_a_time(prefect_harness) -> None:
    from flows.work_pools import model_limit_name, one_run_per_model

    assert model_limit_name("embedded") == "alignloop-model-embedded"
    assert model_limit_name("/models/a/llama") != model_limit_name("/models/b/llama")
    held, release = threading.Event(), threading.Event()

    def first_run() -> None:
        with one_run_per_model("embedded"):
            held.set()
            release.wait(30)

    t = threading.Thread(target=first_run)
    t.start()
    assert held.wait(60)
    try:
        with pytest.raises(TimeoutError), one_run_per_model("embedded", timeout_s=2):
            pass  # a second run of the same model waits (here: gives up after 2 s)
        with one_run_per_model("/models/other", timeout_s=10):
            pass  # another model runs meanwhile
    finally:
        release.set()
        t.join(30)
    start = time.monotonic()
    with one_run_per_model("embedded", timeout_s=20):
        assert time.monotonic() - start < 20  # free again once the first run ended
