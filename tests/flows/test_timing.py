"""A loop run records where its time went: every timed task's seconds, per variant (real Prefect)."""

from __future__ import annotations

import time

import pytest

pytestmark = pytest.mark.integration  # Prefect's test harness (a temporary API + database)


def test_timed_tasks_record_seconds_per_task_and_variant(prefect_harness) -> None:
    from prefect import flow

    from flows.timing import start_timings, task

    @task(name="slow step", retries=1, retry_delay_seconds=0)
    def slow_step(seconds: float) -> float:
        time.sleep(seconds)
        return seconds

    @task(name="evaluate")
    def evaluate(cfg: dict, variant: str) -> str:
        time.sleep(0.2 if variant == "aligned" else 0.0)
        return variant

    @flow(name="timing-check")
    def timed_flow() -> dict[str, float]:
        timings = start_timings()
        slow_step(0.5)
        for variant in ("baseline", "aligned"):
            evaluate({}, variant)
        return timings

    seconds = timed_flow()
    assert list(seconds) == ["slow step", "evaluate (baseline)", "evaluate (aligned)"]
    assert 0.5 <= seconds["slow step"] < 5
    assert seconds["evaluate (aligned)"] >= 0.2 > seconds["evaluate (baseline)"]
