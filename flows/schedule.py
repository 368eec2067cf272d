"""Scheduled runs: the loop as a Prefect deployment with a cron schedule."""

from __future__ import annotations

from flows.loop import alignment_loop
from flows.loop_config import resolve_path


def _deployment(name: str, cron: str, config: str, overrides: list[str]):
    return alignment_loop.to_deployment(
        name=name,
        cron=cron,
        parameters={"config": str(resolve_path(config).resolve()), "overrides": overrides},
        description="alignloop: align on the feedback since the last successful run; gate; promote or keep.",
        tags=["alignloop"],
    )


def register_deployment(name: str, cron: str, config: str, overrides: list[str]) -> str:
    """Create or update the deployment on the current Prefect API; return its id."""
    return str(_deployment(name, cron, config, overrides).apply())


def serve_deployment(name: str, cron: str, config: str, overrides: list[str]) -> None:
    """Run a Prefect runner for the deployment in this process until Ctrl-C."""
    from prefect import serve

    serve(_deployment(name, cron, config, overrides))
