"""Typed gateway configuration: tenants (hashed API keys), admin key, limits, timeouts, guardrails.

API keys are never stored: the config holds their SHA-256 hex digests (``hash_key``), so a leaked
config file does not leak credentials. Generate one with
``python -c "from serving.gateway_config import hash_key; print(hash_key('sk-...'))"``.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator, model_validator

from training.config import StrictModel, load_config

_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def hash_key(key: str) -> str:
    """SHA-256 hex digest of an API key (what the config stores)."""
    return hashlib.sha256(key.encode()).hexdigest()


def _check_hash(v: str) -> str:
    if not _HEX64.match(v):
        raise ValueError("must be a lowercase SHA-256 hex digest (64 chars); use hash_key(key)")
    return v


class TenantConfig(StrictModel):
    """One tenant: a name the logs use and the hash of its API key."""

    name: str = Field(..., min_length=1, max_length=128, description="Tenant name (log store key).")
    key_sha256: str = Field(..., description="SHA-256 hex digest of the tenant's API key.")
    max_in_flight: int = Field(
        64, ge=1, description="Concurrent chat requests for this tenant; more get 429."
    )

    _v = field_validator("key_sha256")(_check_hash)


class HookSpec(StrictModel):
    """One guardrail hook in a chain: a registered name or a ``module:Class`` import path."""

    name: str = Field(
        ..., description="Hook name in guardrails.registry (e.g. 'pii') or 'pkg.mod:Factory'."
    )
    params: dict[str, Any] = Field(
        default_factory=dict, description="Keyword arguments for the hook."
    )


class GuardrailsConfig(StrictModel):
    """The input and output hook chains, in order."""

    input: list[HookSpec] = Field(
        default_factory=list, description="Hooks run on each request before the upstream call."
    )
    output: list[HookSpec] = Field(
        default_factory=list, description="Hooks run on each answer (streams: incrementally)."
    )
    refusal: str = Field(
        "Sorry, I can't help with that request.",
        description="Answer text sent when a hook blocks (finish_reason 'content_filter').",
    )
    # How the chains run (serving.service): see docs/GATEWAY.md for the measurements behind these.
    stream_window_chars: int = Field(
        128, ge=1, description="Streams: output hooks run once per this many new characters "
        "(the first text is checked at once), not per chunk."
    )
    stream_window_ms: float = Field(
        250.0, ge=0, description="Streams: ...or once text has been held this long."
    )
    pool_threads: int = Field(
        2, ge=0, description="Threads that run guardrail work on texts over inline_max_chars "
        "(off the event loop); 0 = always inline."
    )
    inline_max_chars: int = Field(
        4000, ge=0, description="Texts up to this size are checked on the event loop (tens of "
        "microseconds: cheaper than a thread hop); larger ones go to the pool."
    )


class LimitsConfig(StrictModel):
    """Backpressure and request-size limits."""

    max_in_flight: int = Field(
        256, ge=1, description="Concurrent chat requests over all tenants; more get 429."
    )
    retry_after_s: int = Field(1, ge=0, description="Retry-After header value on 429 and 503.")
    max_body_bytes: int = Field(
        1_000_000, ge=1024, description="Largest request body; larger gets 413."
    )
    header_timeout_s: float = Field(
        10.0, gt=0, description="A client must send a request's headers within this; else closed."
    )
    body_timeout_s: float = Field(
        30.0, gt=0, description="A client must send a request's body within this; else 408."
    )
    write_timeout_s: float = Field(
        30.0, gt=0, description="A stream whose client reads nothing for this long is cut "
        "(upstream request closed, slot freed)."
    )


class UpstreamConfig(StrictModel):
    """How the gateway talks to the live vLLM release."""

    connect_timeout_s: float = Field(
        2.0, gt=0, description="TCP connect timeout; a down upstream answers 503 this fast."
    )
    read_timeout_s: float = Field(
        120.0, gt=0, description="Longest wait for the next bytes from upstream before 503."
    )
    max_connections: int = Field(512, ge=1, description="Connection pool size towards upstream.")
    keepalive_s: float = Field(
        10.0, gt=0, description="While a stream waits for its first token, an SSE comment is "
        "sent this often so clients and proxies keep the connection."
    )


class ReviewerConfig(StrictModel):
    """One person who may use the review page (``/review``): an id, a hashed key, their tenants."""

    name: str = Field(
        ..., pattern=r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,127}$",
        description="Reviewer id, recorded as the actor of their feedback and approvals.",
    )
    key_sha256: str = Field(..., description="SHA-256 hex digest of the reviewer's key.")
    tenants: list[str] = Field(
        ..., min_length=1, description="Tenants whose exchanges they may review; ['*'] = all."
    )
    can_approve: bool = Field(
        False, description="May approve releases for promotion (the gate's require_approval)."
    )

    _v = field_validator("key_sha256")(_check_hash)

    def may_review(self, tenant: str) -> bool:
        return "*" in self.tenants or tenant in self.tenants


class ReviewConfig(StrictModel):
    """The review page's sessions and queue defaults."""

    session_ttl_s: int = Field(
        8 * 3600, ge=60, description="A login lasts this long (signed session cookie)."
    )
    secret_file: str | None = Field(
        None,
        description="File holding the key that signs session cookies (created 0600 when "
        "missing); None = <data dir>/review-session.key. Every gateway process must share it.",
    )
    page_size: int = Field(25, ge=1, le=500, description="Exchanges the queue shows by default.")
    window_hours: float = Field(
        24.0, gt=0, description="Default queue window: the last this many hours."
    )


class GatewayConfig(StrictModel):
    """Everything the gateway needs (``configs/gateway.yaml``)."""

    tenants: list[TenantConfig] = Field(
        default_factory=list, description="Tenants and their hashed API keys."
    )
    admin_key_sha256: str | None = Field(
        None, description="SHA-256 of the admin key; None disables admin endpoints."
    )
    public_models: list[str] = Field(
        default_factory=lambda: ["alignloop"],
        min_length=1,
        description="Model names clients may send; all map to the live release's served model.",
    )
    limits: LimitsConfig = Field(
        default_factory=LimitsConfig, description="Backpressure and size limits."
    )
    upstream: UpstreamConfig = Field(
        default_factory=UpstreamConfig, description="Upstream timeouts and pool."
    )
    guardrails: GuardrailsConfig = Field(
        default_factory=GuardrailsConfig, description="Input/output hook chains."
    )
    log_store_url: str | None = Field(
        None, description="SQLAlchemy URL of the log store; None = <data dir>/logs.db."
    )
    reviewers: list[ReviewerConfig] = Field(
        default_factory=list, description="People who may sign in to the review page (/review)."
    )
    review: ReviewConfig = Field(
        default_factory=ReviewConfig, description="Review page sessions and queue defaults."
    )

    @field_validator("admin_key_sha256")
    @classmethod
    def _admin_hash(cls, v: str | None) -> str | None:
        return None if v is None else _check_hash(v)

    @model_validator(mode="after")
    def _unique(self) -> GatewayConfig:
        names = [t.name for t in self.tenants]
        if len(set(names)) != len(names):
            raise ValueError("tenants: names must be unique")
        hashes = [t.key_sha256 for t in self.tenants]
        if len(set(hashes)) != len(hashes) or (self.admin_key_sha256 in hashes):
            raise ValueError("tenants: each API key (and the admin key) must be distinct")
        reviewer_names = [r.name for r in self.reviewers]
        if len(set(reviewer_names)) != len(reviewer_names):
            raise ValueError("reviewers: names must be unique")
        reviewer_hashes = {r.key_sha256 for r in self.reviewers}
        if len(reviewer_hashes) != len(self.reviewers) or reviewer_hashes & (
            set(hashes) | {self.admin_key_sha256}
        ):
            raise ValueError("reviewers: each key must be distinct from every other key")
        for r in self.reviewers:
            unknown = sorted(set(r.tenants) - set(names) - {"*"})
            if unknown:
                raise ValueError(f"reviewers.{r.name}.tenants: unknown tenants {unknown}")
        return self


def load_gateway_config(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> GatewayConfig:
    """Load and validate a gateway config (``ConfigError`` names a bad field)."""
    return load_config(GatewayConfig, path, overrides)
