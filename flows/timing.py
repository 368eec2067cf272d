"""Where a loop run's time goes: Prefect's ``task``, with each call's wall seconds recorded.

The flow calls :func:`start_timings` once; every task defined with this module's :func:`task`
then adds its seconds under its name (plus the ``variant`` argument, for per-variant tasks such as
staging and evals), and the flow writes the dict into its result (``loop-result.json``). Retries
add up under one name; a stage skipped because its inputs are unchanged shows its few seconds.
"""

from __future__ import annotations

import functools
import inspect
import time
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

from prefect import task as prefect_task

_TIMINGS: ContextVar[dict[str, float] | None] = ContextVar("alignloop_task_seconds", default=None)


def start_timings() -> dict[str, float]:
    """A fresh ``{task label: seconds}`` that the tasks of this flow run fill in, in call order."""
    timings: dict[str, float] = {}
    _TIMINGS.set(timings)
    return timings


def task(fn: Callable | None = None, **options: Any) -> Any:
    """``prefect.task`` (same options), timing each call into the running flow's timings."""

    def decorate(fn: Callable) -> Any:
        sig = inspect.signature(fn)
        name = options.get("name") or fn.__name__

        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.monotonic()
            try:
                return fn(*args, **kwargs)
            finally:
                timings = _TIMINGS.get()
                if timings is not None:
                    variant = sig.bind_partial(*args, **kwargs).arguments.get("variant")
                    label = f"{name} ({variant})" if variant else name
                    timings[label] = round(timings.get(label, 0.0) + time.monotonic() - t0, 1)

        return prefect_task(**options)(timed)

    return decorate(fn) if fn is not None else decorate
