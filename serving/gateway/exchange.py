"""One admitted chat request as the gateway tracks it, and the log row it becomes.

Every admitted request (past parsing and the 429 check) becomes exactly one log row, whatever
happens next (blocked, upstream error, client gone, client stalled): :meth:`Exchange.record`,
written once by the service (serving.gateway.service.GatewayService._finish).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

from ground.logstore import ExchangeRecord
from ground.protocol import ChatCompletionRequest
from guardrails.base import ChainResult, Verdict
from serving.gateway.upstream import Upstream

OVERHEAD_HEADER = "x-alignloop-overhead-ms"  # the gateway's own time, guardrails included
GUARDRAIL_HEADER = "x-alignloop-guardrail-ms"  # of which guardrail hooks


def new_request_id() -> str:
    """A fresh chat completion id (OpenAI's ``chatcmpl-`` form)."""
    return "chatcmpl-" + uuid.uuid4().hex


@dataclass
class Exchange:
    """Mutable state of one admitted request, turned into its log row at the end."""

    id: str
    tenant: str
    request: ChatCompletionRequest
    public_model: str
    t0: float
    upstream: Upstream | None = None
    verdicts: list[Verdict] = field(default_factory=list)
    guardrail_s: float = 0.0
    own_s: float = 0.0  # the gateway's own time: all but waiting on upstream and client
    response: str = ""  # the first choice's text (the answer feedback refers to)
    choices: list[dict[str, Any]] | None = None  # every choice, when n > 1 or tools were called
    finish_reason: str | None = None
    usage: dict[str, int] | None = None
    ttft_s: float | None = None
    status: str = "ok"
    http_status: int = 200
    stream_done: bool = False  # the relay saw the upstream's [DONE] or ended the stream itself
    relay_closed: bool = False
    logged: bool = False

    def add_chain(self, res: ChainResult) -> bool:
        """Record an input chain's verdicts; True when it blocked."""
        self.verdicts += res.verdicts
        self.guardrail_s += res.seconds
        return res.blocked

    def overhead_headers(self) -> dict[str, str]:
        """The gateway's own time so far, as response headers."""
        return {
            OVERHEAD_HEADER: f"{self.own_s * 1000:.3f}",
            GUARDRAIL_HEADER: f"{self.guardrail_s * 1000:.3f}",
        }

    def record(self, now: float) -> ExchangeRecord:
        """The exchange's log row, ended at ``now`` (``time.perf_counter()``)."""
        return ExchangeRecord(
            id=self.id,
            tenant=self.tenant,
            messages=[msg.model_dump(exclude_none=True) for msg in self.request.messages],
            params=self.request.params(),
            response=self.response,
            choices=self.choices,
            finish_reason=self.finish_reason,
            usage=self.usage,
            ttft_ms=None if self.ttft_s is None else self.ttft_s * 1000,
            latency_ms=(now - self.t0) * 1000,
            guardrail_ms=self.guardrail_s * 1000,
            overhead_ms=self.own_s * 1000,
            verdicts=[v.as_dict() for v in self.verdicts],
            status=self.status,
            http_status=self.http_status,
            stream=self.request.stream,
            release=self.upstream.release_id if self.upstream else None,
            model=self.upstream.served_model if self.upstream else None,
        )


def logged_choice(
    index: int, content: str, finish_reason: str | None, tool_calls: list[dict[str, Any]] | None
) -> dict[str, Any]:
    """One choice of the answer as the log keeps it."""
    out: dict[str, Any] = {"index": index, "content": content, "finish_reason": finish_reason}
    if tool_calls:
        out["tool_calls"] = tool_calls
    return out
