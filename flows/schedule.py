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

import contextlib
import hashlib
import re
from collections.abc import Iterator

from flows.loop import alignment_loop
from flows.loop_config import resolve_path
from training.config import repo_root

DEFAULT_POOL = "alignloop"


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


def ensure_work_pool(pool: str = DEFAULT_POOL, pool_type: str = "process") -> str:
    """Create the work pool if it does not exist; return its type."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            return client.read_work_pool(pool).type
        except ObjectNotFound:
            pass
        with contextlib.suppress(ObjectAlreadyExists):  # created meanwhile by another process
            client.create_work_pool(WorkPoolCreate(name=pool, type=pool_type))
        return client.read_work_pool(pool).type


def register_deployment(
    name: str, cron: str, config: str, overrides: list[str], pool: str = DEFAULT_POOL, pool_type: str = "process"
) -> str:
    """Create or update the deployment in ``pool`` on the current Prefect API; return its id."""
    from flows.loop_config import load_loop_config

    ensure_work_pool(pool, pool_type)
    ensure_model_limit(model_limit_name(load_loop_config(config, overrides).model.name_or_path))
    return str(_deployment(name, cron, config, overrides).apply(work_pool_name=pool))


def worker_command(pool: str = DEFAULT_POOL) -> list[str]:
    """The command that runs a worker for ``pool`` here (what the README shows for a GPU machine)."""
    import sys

    return [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool]


# -- one run per model ----------------------------------------------------------------------------
def model_limit_name(model: str) -> str:
    """The global concurrency limit of one base model: readable, and unique for a path."""
    slug = re.sub(r"[^a-z0-9]+", "-", model.lower().rstrip("/").rsplit("/", 1)[-1]).strip("-")[:40] or "model"
    if model != slug:
        slug += "-" + hashlib.sha256(model.encode()).hexdigest()[:8]
    return f"alignloop-model-{slug}"


def ensure_model_limit(name: str) -> None:
    """Create the limit (1 slot) if it does not exist."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
            return
        except ObjectNotFound:
            pass
        with contextlib.suppress(ObjectAlreadyExists):
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))


@contextlib.contextmanager
def one_run_per_model(model: str, timeout_s: float | None = None) -> Iterator[str]:
    """Hold the model's slot for the body (waiting for a run of the same model to finish)."""
    from prefect.concurrency.sync import concurrency

    name = model_limit_name(model)
    ensure_model_limit(name)
    with concurrency(name, occupy=1, timeout_seconds=timeout_s, strict=True):
        yield name
