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
from collections.abc import Iterator

DEFAULT_POOL = "alignloop"


def ensure_work_pool(pool: str = DEFAULT_POOL, pool_type: str = "process") -> str:
    """Create the work pool if it does not exist; return its type."""
    from prefect.client.orchestration import (
        get_client,  # lazy: prefect, seconds; alignloop --help stays quick
    )
    from prefect.client.schemas.actions import (
        WorkPoolCreate,  # lazy: prefect, seconds; alignloop --help stays quick
    )
    from prefect.exceptions import (  # lazy: prefect, seconds; alignloop --help stays quick
        ObjectAlreadyExists,
        ObjectNotFound,
    )

    with get_client(sync_client=True) as client:
        try:
            return client.read_work_pool(pool).type
        except ObjectNotFound:
            pass
        with contextlib.suppress(ObjectAlreadyExists):  # created meanwhile by another process
            client.create_work_pool(WorkPoolCreate(name=pool, type=pool_type))
        return client.read_work_pool(pool).type


# -- one run per model ----------------------------------------------------------------------------
def model_limit_name(model: str) -> str:
    """The global concurrency limit of one base model: readable, and unique for a path."""
    slug = re.sub(r"[^a-z0-9]+", "-", model.lower().rstrip("/").rsplit("/", 1)[-1]).strip("-")[:40] or "model"
    if model != slug:
        slug += "-" + hashlib.sha256(model.encode()).hexdigest()[:8]
    return f"alignloop-model-{slug}"


def ensure_model_limit(name: str) -> None:
    """Create the limit (1 slot) if it does not exist."""
    from prefect.client.orchestration import (
        get_client,  # lazy: prefect, seconds; alignloop --help stays quick
    )
    from prefect.client.schemas.actions import (
        GlobalConcurrencyLimitCreate,  # lazy: prefect, seconds; alignloop --help stays quick
    )
    from prefect.exceptions import (  # lazy: prefect, seconds; alignloop --help stays quick
        ObjectAlreadyExists,
        ObjectNotFound,
    )

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
    from prefect.concurrency.sync import (
        concurrency,  # lazy: prefect, seconds; alignloop --help stays quick
    )

    name = model_limit_name(model)
    ensure_model_limit(name)
    with concurrency(name, occupy=1, timeout_seconds=timeout_s, strict=True):
        yield name
