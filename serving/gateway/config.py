"""Typed gateway configuration: tenants, keys, limits, timeouts, guardrails, what is public.

API keys are never stored. The config (and the keys file, see :mod:`serving.gateway.auth`) holds
``hmac-sha256:<secret id>:<digest>`` values: an HMAC-SHA256 of the key under this server's *key
secret*, which lives outside the config (``$ALIGNLOOP_KEY_SECRET``, ``key_secret_file`` or
``<data dir>/key-secret``, created with mode 0600 on first use). A leaked config therefore does not
let anyone test guesses of a weak key offline; the secret id (8 hex digits of a hash of the secret)
only tells which secret a digest belongs to. Make keys with ``alignloop keys new``.

The published demo keys (``demo_keys: true``) are for a gateway on loopback only; see
:func:`serving.gateway.auth.check_demo_keys`.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from pathlib import Path
from typing import Any

from pydantic import AliasChoices, Field, field_validator, model_validator

from ground.config import StrictModel, data_dir, load_config

KEY_SECRET_ENV = "ALIGNLOOP_KEY_SECRET"
DEMO_TENANT = "demo"
DEMO_TENANT_KEY = "sk-alignloop-demo"
DEMO_ADMIN_KEY = "sk-alignloop-admin"
DEMO_REVIEWER = "demo-reviewer"
DEMO_REVIEWER_KEY = "sk-alignloop-reviewer"
_DIGEST = re.compile(r"^hmac-sha256:[0-9a-f]{8}:[0-9a-f]{64}$")
_PLAIN_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class KeySecretError(RuntimeError):
    """The key secret is missing, too short or unreadable (the message says how to fix it)."""


def key_secret_path(path: str | Path | None = None) -> Path:
    """Where the key secret file is: ``path``, else ``<data dir>/key-secret``."""
    return Path(path).expanduser() if path else data_dir() / "key-secret"


def load_key_secret(path: str | Path | None = None, create: bool = False) -> bytes:
    """The server's key secret: ``$ALIGNLOOP_KEY_SECRET``, else the file (made when ``create``)."""
    env = os.environ.get(KEY_SECRET_ENV)
    if env:
        if len(env) < 32:
            raise KeySecretError(f"{KEY_SECRET_ENV} is shorter than 32 characters")
        return env.encode()
    p = key_secret_path(path)
    if not p.exists():
        if not create:
            raise KeySecretError(
                f"no key secret: set {KEY_SECRET_ENV} or create keys with `alignloop keys new` "
                f"(which writes {p})"
            )
        p.parent.mkdir(parents=True, exist_ok=True)
        try:  # O_EXCL: two processes creating it at once agree on the first one's secret
            fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32) + "\n")
        except FileExistsError:
            pass
    secret = p.read_text().strip().encode()
    if len(secret) < 32:
        raise KeySecretError(f"key secret {p} is shorter than 32 characters")
    return secret


def secret_id(secret: bytes) -> str:
    """8 hex digits naming a secret (safe to show: a hash, not the secret)."""
    return hashlib.sha256(b"alignloop-key-secret-id:" + secret).hexdigest()[:8]


def hash_key(key: str, secret: bytes | None = None) -> str:
    """The stored form of an API key: ``hmac-sha256:<secret id>:<HMAC-SHA256(secret, key)>``.

    Without ``secret``, the server's default secret (created if there is none yet).
    """
    secret = secret if secret is not None else load_key_secret(create=True)
    digest = hmac.new(secret, key.encode(), hashlib.sha256).hexdigest()
    return f"hmac-sha256:{secret_id(secret)}:{digest}"


def check_key_hash(v: str) -> str:
    """Validate a stored key hash (config and keys file)."""
    if _PLAIN_SHA256.match(v):
        raise ValueError(
            "plain SHA-256 key digests are no longer accepted (a leaked config would let anyone "
            "test guesses of a weak key); make the key again with `alignloop keys new`, or hash "
            "an existing one with `alignloop keys hash`"
        )
    if not _DIGEST.match(v):
        raise ValueError(
            "must be 'hmac-sha256:<8 hex>:<64 hex>' as `alignloop keys hash` prints it"
        )
    return v


class TenantConfig(StrictModel):
    """One tenant: a name the logs use, its key (or keys in the keys file) and its settings."""

    name: str = Field(
        ..., min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="Tenant name (log store key).",
    )
    key_hash: str | None = Field(
        None,
        validation_alias=AliasChoices("key_hash", "key_sha256"),
        description="The tenant key's hash (`alignloop keys hash`); None = keys come from the keys file.",
    )
    max_in_flight: int = Field(
        64, ge=1, description="Concurrent chat requests for this tenant; more get 429."
    )
    simulated: bool = Field(
        False,
        description="Every feedback event of this tenant is recorded as from simulated users "
        "(actor_role 'simulated'): the demo's traffic generator, never people.",
    )

    @field_validator("key_hash")
    @classmethod
    def _hash(cls, v: str | None) -> str | None:
        return None if v is None else check_key_hash(v)


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
    # How the chains run (serving.gateway.guardpool, serving.gateway.relay): see docs/GATEWAY.md for the measurements behind these.
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
    """Backpressure and request limits. Over a limit is a 4xx naming it, never a refusal."""

    max_in_flight: int = Field(
        256, ge=1, description="Concurrent chat requests over all tenants; more get 429."
    )
    retry_after_s: int = Field(1, ge=0, description="Retry-After header value on 429 and 503.")
    max_body_bytes: int = Field(
        1_000_000, ge=1024, description="Largest chat/feedback request body; larger gets 413."
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
    max_admin_body_bytes: int = Field(
        4_000_000, ge=1024,
        description="Largest admin request body (stage, eval report); larger gets 413.",
    )
    max_messages: int = Field(64, ge=1, description="Messages per chat request; more is a 400.")
    max_prompt_chars: int = Field(
        32_000, ge=1, description="Characters of message text per chat request; more is a 400."
    )
    max_tokens: int = Field(
        4096, ge=1, description="Largest max_tokens / max_completion_tokens; more is a 400."
    )
    max_n: int = Field(8, ge=1, le=128, description="Largest n (choices per request); more is a 400.")


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
    key_hash: str | None = Field(
        None,
        validation_alias=AliasChoices("key_hash", "key_sha256"),
        description="The reviewer key's hash (`alignloop keys hash`); None = keys come from the "
        "keys file (or, for 'demo-reviewer' with demo_keys, the published demo key).",
    )
    tenants: list[str] = Field(
        ..., min_length=1, description="Tenants whose exchanges they may review; ['*'] = all."
    )
    can_approve: bool = Field(
        False, description="May approve releases for promotion (the gate's require_approval)."
    )

    @field_validator("key_hash")
    @classmethod
    def _hash(cls, v: str | None) -> str | None:
        return None if v is None else check_key_hash(v)

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
        default_factory=list, description="Tenants (names, limits, flags; keys inline or in keys_file)."
    )
    admin_key_hash: str | None = Field(
        None,
        validation_alias=AliasChoices("admin_key_hash", "admin_key_sha256"),
        description="Hash of an admin key (`alignloop keys hash`); more admin keys in keys_file.",
    )
    demo_keys: bool = Field(
        False,
        description="Accept the published demo keys (sk-alignloop-demo for tenant 'demo', "
        "sk-alignloop-admin, sk-alignloop-reviewer for reviewer 'demo-reviewer' if listed): only "
        "on loopback, or with --insecure-demo-keys.",
    )
    keys_file: str | None = Field(
        None,
        description="YAML of key hashes, re-read when it changes, on SIGHUP and on "
        "POST /admin/keys/reload (rotation without restart); None = <data dir>/keys.yaml if present.",
    )
    key_secret_file: str | None = Field(
        None,
        description=f"File holding the key secret; None = ${KEY_SECRET_ENV}, else <data dir>/key-secret.",
    )
    public_metrics: bool = Field(
        False,
        description="Serve /metrics without a key (its series carry tenant names); false = the "
        "admin key or a metrics key.",
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

    @field_validator("admin_key_hash")
    @classmethod
    def _admin_hash(cls, v: str | None) -> str | None:
        return None if v is None else check_key_hash(v)

    @model_validator(mode="after")
    def _unique(self) -> GatewayConfig:
        names = [t.name for t in self.tenants]
        if len(set(names)) != len(names):
            raise ValueError("tenants: names must be unique")
        hashes = [h for h in [t.key_hash for t in self.tenants] + [self.admin_key_hash] if h]
        if len(set(hashes)) != len(hashes):
            raise ValueError("tenants: each API key (and the admin key) must be distinct")
        if self.demo_keys and DEMO_TENANT not in names:
            raise ValueError(f"demo_keys: true needs a tenant named {DEMO_TENANT!r}")
        reviewer_names = [r.name for r in self.reviewers]
        if len(set(reviewer_names)) != len(reviewer_names):
            raise ValueError("reviewers: names must be unique")
        reviewer_hashes = [r.key_hash for r in self.reviewers if r.key_hash]
        if len(set(reviewer_hashes)) != len(reviewer_hashes) or set(reviewer_hashes) & set(hashes):
            raise ValueError("reviewers: each key must be distinct from every other key")
        for r in self.reviewers:
            unknown = sorted(set(r.tenants) - set(names) - {"*"})
            if unknown:
                raise ValueError(f"reviewers.{r.name}.tenants: unknown tenants {unknown}")
        return self

    def tenant(self, name: str) -> TenantConfig | None:
        return next((t for t in self.tenants if t.name == name), None)


def load_gateway_config(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> GatewayConfig:
    """Load and validate a gateway config (``ConfigError`` names a bad field)."""
    return load_config(GatewayConfig, path, overrides)
