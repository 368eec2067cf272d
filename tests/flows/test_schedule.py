"""`alignloop schedule` registers a deployment with the cron given (checked through Prefect's API)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.integration


def test_deployment_has_the_cron(prefect_harness) -> None:
    from prefect.client.orchestration import get_client

    from flows.schedule import register_deployment

    deployment_id = register_deployment("nightly", "15 3 * * *", "configs/loop.yaml", ["sft.train.epochs=2"])
    with get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name("alignment-loop/nightly")
    assert str(dep.id) == deployment_id
    assert [s.schedule.cron for s in dep.schedules] == ["15 3 * * *"]
    assert dep.parameters["overrides"] == ["sft.train.epochs=2"]
    assert dep.parameters["config"].endswith("configs/loop.yaml")
