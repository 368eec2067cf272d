"""The release a request goes to: the live upstream, its canary, and who provides them.

The upstream is injected into the gateway (:class:`UpstreamProvider`), so the releases manager
can switch blue/green upstreams atomically, worker processes can read the control plane's one
(serving.gateway.dataplane) and tests can use a fake (:class:`StaticUpstream`).
:func:`route_request` picks, per request, the live release or its canary.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True)
class Upstream:
    """One live release the gateway forwards to (a vLLM it runs, or an external server)."""

    base_url: str  # e.g. http://127.0.0.1:PORT/v1
    release_id: str
    served_model: str  # the model name the upstream answers to
    api_key: str | None = None  # sent as a bearer key (external upstreams that need one)
    # vLLM's tool-call parser; None = tools not enabled (requests with tools get a 400);
    # EXTERNAL_TOOLS = an external server, which decides for itself
    tool_parser: str | None = None
    # A canary beside this live release: a share of some tenants' end users go to it instead.
    canary: Canary | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain data (the control plane publishes it to worker processes)."""
        d = dict(self.__dict__)
        if self.canary is not None:
            d["canary"] = {**self.canary.__dict__, "upstream": self.canary.upstream.to_dict(),
                           "tenants": list(self.canary.tenants)}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Upstream:
        d = dict(d)
        if d.get("canary") is not None:
            c = dict(d["canary"])
            d["canary"] = Canary(Upstream.from_dict(c["upstream"]), c["share"], tuple(c["tenants"]))
        return cls(**d)


@dataclass(frozen=True)
class Canary:
    """A release that serves ``share`` of ``tenants``' end users (every tenant when empty)."""

    upstream: Upstream
    share: float
    tenants: tuple[str, ...] = ()


def route_request(live: Upstream | None, tenant: str, user: str | None, request_id: str) -> Upstream | None:
    """The release that answers this request: live, or its canary for a ``share`` of the
    canary's tenants' end users. Sticky: the choice hashes the canary's release id with the
    tenant and the request's ``user``, so one person sees one release for the canary's whole
    life; a request without ``user`` is assigned by its own id (a coin per request)."""
    if live is None or live.canary is None:
        return live
    c = live.canary
    if c.tenants and tenant not in c.tenants:
        return live
    key = f"{c.upstream.release_id}\0{tenant}\0" + (f"u:{user}" if user else f"r:{request_id}")
    draw = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64
    return c.upstream if draw < c.share else live


EXTERNAL_TOOLS = "external"


class UpstreamProvider(Protocol):
    """Whatever holds the current upstream (None: no live release)."""

    def current(self) -> Upstream | None: ...


class StaticUpstream:
    """A provider holding one upstream (tests, single-release setups); ``set`` swaps it atomically."""

    def __init__(self, upstream: Upstream | None = None) -> None:
        self._upstream = upstream

    def current(self) -> Upstream | None:
        return self._upstream

    def set(self, upstream: Upstream | None) -> None:
        self._upstream = upstream
