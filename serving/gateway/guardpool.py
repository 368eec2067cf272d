"""Where guardrail chains run: on the event loop, or on a small thread pool for large texts."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any


class GuardrailPool:
    """Runs guardrail work inline when it is small, else on a bounded thread pool.

    A thread hop costs more than checking a chat-sized text (tens of microseconds, measured), so
    small texts stay on the event loop; large ones (up to ``max_body_bytes``) go to threads so the
    loop keeps relaying other streams meanwhile. Threads share the GIL: they keep the loop
    responsive, they do not add CPU; more CPU comes from more worker processes
    (``alignloop serve`` ``workers``).
    """

    def __init__(self, threads: int, inline_max_chars: int) -> None:
        self.inline_max_chars = inline_max_chars
        self.pool = (
            ThreadPoolExecutor(threads, thread_name_prefix="guardrails") if threads else None
        )

    async def call(self, size: int, fn: Callable[..., Any], *args: Any) -> Any:
        if self.pool is None or size <= self.inline_max_chars:
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)
