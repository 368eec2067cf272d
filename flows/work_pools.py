"""Prefect resources the flows share: the work pool, and one run per base model at a time.

Every run of the loop, scheduled or started by ``alignloop run``, takes the slot of a global
concurrency limit named after its base model (limit 1), so two runs that would train the same
model and stage into the same gateway never overlap: the second waits for the first. Prefect is
imported inside the functions (seconds at import; ``alignloop --help`` must stay quick).
"""

from __future__ import annotations

import contextlib
import hashlib
import re
from collections.abc import Callable, Iterator
from typing import Any

DEFAULT_POOL = "alignloop"


def _ensure(read: Callable[[Any], Any], create: Callable[[Any], Any]) -> Any:
    """``read`` the object, creating it first when it does not exist (or another process just did)."""
    # lazy: prefect, seconds; alignloop --help stays quick
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            return read(client)
        except ObjectNotFound:
            pass
        with contextlib.suppress(ObjectAlreadyExists):  # created meanwhile by another process
            create(client)
        return read(client)


def ensure_work_pool(pool: str = DEFAULT_POOL, pool_type: str = "process") -> str:
    """Create the work pool if it does not exist; return its type."""
    # lazy: prefect, seconds; alignloop --help stays quick
    from prefect.client.schemas.actions import WorkPoolCreate

    return _ensure(lambda c: c.read_work_pool(pool).type,
                   lambda c: c.create_work_pool(WorkPoolCreate(name=pool, type=pool_type)))


# -- one run per model ----------------------------------------------------------------------------
def model_limit_name(model: str) -> str:
    """The global concurrency limit of one base model: readable, and unique for a path."""
    slug = re.sub(r"[^a-z0-9]+", "-", model.lower().rstrip("/").rsplit("/", 1)[-1]).strip("-")[:40] or "model"
    if model != slug:
        slug += "-" + hashlib.sha256(model.encode()).hexdigest()[:8]
    return f"alignloop-model-{slug}"


def ensure_model_limit(name: str) -> None:
    """Create the limit (1 slot) if it does not exist."""
    # lazy: prefect, seconds; alignloop --help stays quick
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    _ensure(lambda c: c.read_global_concurrency_limit_by_name(name),
            lambda c: c.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1)))


@contextlib.contextmanager
def one_run_per_model(model: str, timeout_s: float | None = None) -> Iterator[str]:
    """Hold the model's slot for the body (waiting for a run of the same model to finish)."""
    # lazy: prefect, seconds; alignloop --help stays quick
    from prefect.concurrency.sync import concurrency

    name = model_limit_name(model)
    ensure_model_limit(name)
    with concurrency(name, occupy=1, timeout_seconds=timeout_s, strict=True):
        yield name
