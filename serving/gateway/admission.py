"""Admission: how many chat requests may be in flight, globally and per tenant (fair share).

One process counts with :class:`LocalAdmission`; worker processes share counters in shared memory
(serving.gateway.dataplane.SharedAdmission) and apply the same rule, :func:`fair_share_refusal`.
"""

from __future__ import annotations

from typing import Protocol

from serving.gateway.config import GatewayConfig


class Admission(Protocol):
    """Concurrent-request accounting, global and per tenant (in one process or shared)."""

    def admit(self, tenant: str) -> str | None:
        """Take a slot; None when admitted, else why not (the 429's message)."""

    def release(self, tenant: str) -> None: ...

    def in_flight(self) -> int: ...


def fair_share_refusal(
    tenant: str, counts: dict[str, int], total: int, caps: dict[str, int], global_cap: int
) -> str | None:
    """Why ``tenant`` may not take one more slot now, or None.

    Every tenant is guaranteed ``min(its cap, global cap / number of tenants)`` slots: capacity
    another tenant is not using up to its guarantee stays free for it, so a tenant at its limit
    cannot starve the others (a trade: that reserve is idle while its owner is). Plus the tenant's
    own cap and the global cap.
    """
    if counts.get(tenant, 0) >= caps.get(tenant, global_cap):
        return f"tenant {tenant!r} has too many requests in flight; retry later"
    share = global_cap // max(1, len(caps))
    reserved = sum(
        max(0, min(cap, share) - counts.get(t, 0)) for t, cap in caps.items() if t != tenant
    )
    if total >= global_cap - reserved:
        return "gateway is at capacity; retry later"
    return None


class LocalAdmission:
    """Admission counters of one process (the event loop is single-threaded: no lock needed)."""

    def __init__(self, config: GatewayConfig) -> None:
        self.caps = {t.name: t.max_in_flight for t in config.tenants}
        self.global_cap = config.limits.max_in_flight
        self.counts: dict[str, int] = {}
        self.total = 0

    def admit(self, tenant: str) -> str | None:
        why = fair_share_refusal(tenant, self.counts, self.total, self.caps, self.global_cap)
        if why is None:
            self.total += 1
            self.counts[tenant] = self.counts.get(tenant, 0) + 1
        return why

    def release(self, tenant: str) -> None:
        self.total -= 1
        self.counts[tenant] -= 1

    def in_flight(self) -> int:
        return self.total
