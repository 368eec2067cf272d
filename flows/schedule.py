"""Scheduled runs: the loop as a Prefect deployment in a work pool, one run per model at a time.

``alignloop schedule`` creates (or updates) the deployment ``alignment-loop/<name>`` with its cron
schedule in a work pool (``alignloop``, a *process* pool by default) and then starts a worker for
that pool in this process; with ``--register-only`` it stops after registering, and a worker
started elsewhere (``prefect worker start --pool alignloop`` on the GPU machine) runs the flows.
The Prefect server and UI can live on another machine (``PREFECT_API_URL``).

Every run of the loop, scheduled or started by ``alignloop run``, takes the slot of a global
concurrency limit named after its base model (limit 1), so two runs that would train the same
model and stage into the same gateway never overlap: the second waits for the first.
"""

from __future__ import annotations

import sys

from flows.loop import alignment_loop
from flows.loop_config import load_loop_config, resolve_path
from flows.work_pools import DEFAULT_POOL, ensure_model_limit, ensure_work_pool, model_limit_name
from ground.config import repo_root


def _deployment(name: str, cron: str, config: str, overrides: list[str]):
    return alignment_loop.to_deployment(
        name=name,
        cron=cron,
        parameters={"config": str(resolve_path(config).resolve()), "overrides": overrides},
        description="alignloop: align on the feedback since the last successful run; gate; promote or keep.",
        tags=["alignloop"],
        # A process worker runs the flow from the checkout (the same path on the worker's machine).
        job_variables={"working_dir": str(repo_root())},
    )


def register_deployment(
    name: str, cron: str, config: str, overrides: list[str], pool: str = DEFAULT_POOL, pool_type: str = "process"
) -> str:
    """Create or update the deployment in ``pool`` on the current Prefect API; return its id."""
    ensure_work_pool(pool, pool_type)
    ensure_model_limit(model_limit_name(load_loop_config(config, overrides).model.name_or_path))
    return str(_deployment(name, cron, config, overrides).apply(work_pool_name=pool))


def worker_command(pool: str = DEFAULT_POOL) -> list[str]:
    """The command that runs a worker for ``pool`` here (what the README shows for a GPU machine)."""
    return [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool]
