"""API keys: who a bearer key is (a tenant, the admin, a metrics scraper), rotation, demo keys.

Keys are stored as HMAC-SHA256 digests under the server's key secret
(:func:`serving.gateway.config.hash_key`). A presented key is hashed the same way and looked up;
the attacker does not know the secret, so they cannot choose which digest a guess lands on, and
the match is confirmed with :func:`hmac.compare_digest` (constant time).

Keys come from the gateway config (``tenants[].key_hash``, ``admin_key_hash``, the demo keys) and
from the keys file (``keys_file``, default ``<data dir>/keys.yaml``, written by
``alignloop keys new``). The keys file is re-read when it changes (checked at most once a second
on a request), on SIGHUP, and on ``POST /admin/keys/reload``: adding a key and revoking the old
one rotates it without a restart. A keys file that does not validate is refused as a whole and
the previous keys stay in force.

FastAPI dependencies for routers (the releases helper's admin router uses ``require_admin``)::

    @router.post("/admin/promote")
    def promote(admin: str = Depends(require_admin)): ...
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import yaml
from fastapi import APIRouter, Depends, Request
from pydantic import Field, field_validator, model_validator

from ground.config import ConfigError, StrictModel, build_config, data_dir
from serving.gateway.config import (
    DEMO_ADMIN_KEY,
    DEMO_REVIEWER,
    DEMO_REVIEWER_KEY,
    DEMO_TENANT,
    DEMO_TENANT_KEY,
    GatewayConfig,
    check_key_hash,
    load_key_secret,
    secret_id,
)
from serving.gateway.wire import GatewayError

log = logging.getLogger(__name__)

KeyRole = Literal["tenant", "admin", "metrics", "reviewer"]


class KeyEntry(StrictModel):
    """One key in the keys file."""

    id: str = Field(..., pattern=r"^[A-Za-z0-9._-]{1,64}$", description="Name of the key (logs, revoke).")
    role: KeyRole = Field(
        ..., description="tenant | admin | metrics (/metrics only) | reviewer (/review only)."
    )
    tenant: str | None = Field(None, description="The tenant of a tenant key.")
    reviewer: str | None = Field(None, description="The reviewer (gateway config) of a reviewer key.")
    hash: str = Field(..., description="`alignloop keys hash` of the key.")
    created: str | None = Field(None, description="When it was made (ISO 8601).")
    note: str | None = Field(None, max_length=500, description="Who holds it, what for.")

    @field_validator("hash")
    @classmethod
    def _hash(cls, v: str) -> str:
        return check_key_hash(v)

    @model_validator(mode="after")
    def _tenant(self) -> KeyEntry:
        if (self.role == "tenant") != (self.tenant is not None):
            raise ValueError("a tenant key names its tenant; other keys do not")
        if (self.role == "reviewer") != (self.reviewer is not None):
            raise ValueError("a reviewer key names its reviewer; other keys do not")
        return self


class KeysFile(StrictModel):
    """The keys file (``alignloop keys new`` writes it)."""

    keys: list[KeyEntry] = Field(default_factory=list, description="The accepted keys.")

    @model_validator(mode="after")
    def _unique(self) -> KeysFile:
        ids = [k.id for k in self.keys]
        if len(set(ids)) != len(ids):
            raise ValueError("keys: ids must be unique")
        return self


@dataclass(frozen=True)
class Principal:
    """Who a key belongs to."""

    role: KeyRole
    tenant: str | None
    key_id: str
    demo: bool = False  # one of the published demo keys
    reviewer: str | None = None  # the reviewer (gateway config ``reviewers``) of a reviewer key


def keys_file_path(config: GatewayConfig) -> Path:
    return Path(config.keys_file).expanduser() if config.keys_file else data_dir() / "keys.yaml"


def read_keys_file(path: Path) -> KeysFile:
    """The keys file at ``path`` (an empty one if there is none)."""
    if not path.exists():
        return KeysFile()
    return build_config(KeysFile, yaml.safe_load(path.read_text()) or {}, str(path))


class KeyRing:
    """Maps key digests to principals; re-reads the keys file when it changes."""

    def __init__(self, config: GatewayConfig, secret: bytes | None = None) -> None:
        self.config = config
        self.secret = secret if secret is not None else load_key_secret(config.key_secret_file, create=True)
        self.sid = secret_id(self.secret)
        self.path = keys_file_path(config)
        self._lock = threading.Lock()
        self._checked = 0.0
        self._stamp: tuple[int, int, int] | None = None
        self._by_digest: dict[str, tuple[str, Principal]] = {}
        self._listeners: list[Callable[[], None]] = []
        self.reload()

    def on_reload(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` after every successful reload (the control plane tells its workers)."""
        self._listeners.append(listener)

    def digest(self, key: str) -> str:
        return hmac.new(self.secret, key.encode(), hashlib.sha256).hexdigest()

    def _stored(self, h: str, where: str) -> str:
        _, sid, digest = h.split(":")
        if sid != self.sid:
            raise ConfigError(
                f"{where}: this key was hashed with key secret {sid}, but this server's secret is "
                f"{self.sid}; set the secret the keys were made with (ALIGNLOOP_KEY_SECRET or "
                "key_secret_file), or make new keys with `alignloop keys new`"
            )
        return digest

    def _build(self, keys_file: KeysFile) -> dict[str, tuple[str, Principal]]:
        cfg = self.config
        entries: dict[str, Principal] = {}

        def add(digest: str, p: Principal, where: str) -> None:
            if digest in entries:
                raise ConfigError(f"{where}: the same key is given twice")
            entries[digest] = p

        for t in cfg.tenants:
            if t.key_hash:
                add(self._stored(t.key_hash, f"tenants.{t.name}"), Principal("tenant", t.name, t.name), t.name)
        if cfg.admin_key_hash:
            add(self._stored(cfg.admin_key_hash, "admin_key_hash"), Principal("admin", None, "admin"), "admin")
        for r in cfg.reviewers:
            if r.key_hash:
                where = f"reviewers.{r.name}"
                add(self._stored(r.key_hash, where), Principal("reviewer", None, r.name, reviewer=r.name), where)
        names = {t.name for t in cfg.tenants}
        reviewers = {r.name for r in cfg.reviewers}
        for k in keys_file.keys:
            where = f"{self.path}: key {k.id}"
            if k.role == "tenant" and k.tenant not in names:
                raise ConfigError(f"{where} names tenant {k.tenant!r}, which the gateway config does not have")
            if k.role == "reviewer" and k.reviewer not in reviewers:
                raise ConfigError(f"{where} names reviewer {k.reviewer!r}, which the gateway config does not have")
            add(self._stored(k.hash, where), Principal(k.role, k.tenant, k.id, reviewer=k.reviewer), where)
        demo = {self.digest(DEMO_TENANT_KEY): Principal("tenant", DEMO_TENANT, "demo", demo=True),
                self.digest(DEMO_ADMIN_KEY): Principal("admin", None, "demo-admin", demo=True)}
        if DEMO_REVIEWER in reviewers:
            demo[self.digest(DEMO_REVIEWER_KEY)] = Principal(
                "reviewer", None, DEMO_REVIEWER, demo=True, reviewer=DEMO_REVIEWER)
        for digest, p in demo.items():
            if digest in entries:  # someone hashed a published key into their config
                q = entries[digest]
                entries[digest] = Principal(q.role, q.tenant, q.key_id, demo=True, reviewer=q.reviewer)
            elif cfg.demo_keys:
                entries[digest] = p
        return {d: (d, p) for d, p in entries.items()}

    def _file_stamp(self) -> tuple[int, int, int] | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def reload(self) -> dict[str, int]:
        """Re-read the keys file; raise ``ConfigError`` (keeping the old keys) if it is invalid."""
        with self._lock:
            stamp = self._file_stamp()
            entries = self._build(read_keys_file(self.path))
            self._by_digest, self._stamp = entries, stamp
        counts: dict[str, int] = {}
        for _, p in entries.values():
            counts[p.role] = counts.get(p.role, 0) + 1
        log.info("keys loaded (%s): %s", self.path, counts)
        for listener in list(self._listeners):
            listener()
        return counts

    def reload_if_changed(self) -> None:
        """Re-read the keys file if it changed since it was read (at most once a second)."""
        now = time.monotonic()
        if now - self._checked < 1.0:
            return
        self._checked = now
        if self._file_stamp() != self._stamp:
            try:
                self.reload()
            except (ConfigError, OSError, yaml.YAMLError) as exc:
                self._stamp = self._file_stamp()  # do not retry a bad file on every request
                log.error("keys file %s not reloaded, previous keys stay: %s", self.path, exc)

    def authenticate(self, key: str | None) -> Principal | None:
        """The principal of ``key``, or None."""
        if not key:
            return None
        self.reload_if_changed()
        digest = self.digest(key)
        # The lookup goes by an HMAC the caller cannot steer without the secret, so its timing
        # says nothing about stored keys; the match itself is confirmed in constant time.
        found = self._by_digest.get(digest)
        if found is None:
            return None
        stored, p = found
        return p if hmac.compare_digest(stored, digest) else None

    def tenant(self, key: str | None) -> str | None:
        p = self.authenticate(key)
        return p.tenant if p and p.role == "tenant" else None

    def is_admin(self, key: str | None) -> bool:
        p = self.authenticate(key)
        return p is not None and p.role == "admin"

    def demo_principals(self) -> list[Principal]:
        """The published demo keys this gateway would accept."""
        return [p for _, p in self._by_digest.values() if p.demo]


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable only from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


MAKE_KEYS = (
    "make your own keys: `alignloop keys new --tenant NAME` (once per tenant) and "
    "`alignloop keys new --admin`, then set demo_keys: false in the gateway config"
)


def check_demo_keys(keys: KeyRing, host: str, insecure_demo_keys: bool = False) -> None:
    """Refuse to serve the published demo keys on an address other machines can reach."""
    demo = keys.demo_principals()
    if not demo or is_loopback(host) or insecure_demo_keys:
        if demo and not is_loopback(host):
            log.warning("serving the PUBLISHED demo keys on %s (--insecure-demo-keys)", host)
        return
    which = ", ".join(sorted(p.key_id for p in demo))
    raise ConfigError(
        f"the gateway would listen on {host}, reachable from other machines, and it accepts the "
        f"published demo keys ({which}): anyone could use them. {MAKE_KEYS}; or listen on "
        "127.0.0.1; or pass --insecure-demo-keys to accept the risk."
    )


def new_key_entry(
    role: KeyRole, tenant: str | None, secret: bytes, note: str | None = None,
    reviewer: str | None = None,
) -> tuple[str, KeyEntry]:
    """A fresh random key and its keys-file entry (the key itself is shown once, never stored)."""
    key = "sk-al-" + secrets.token_urlsafe(32)
    digest = hmac.new(secret, key.encode(), hashlib.sha256).hexdigest()
    who = tenant or reviewer
    entry = KeyEntry(
        id=f"{role}-{who + '-' if who else ''}{secrets.token_hex(3)}",
        role=role,
        tenant=tenant,
        reviewer=reviewer,
        hash=f"hmac-sha256:{secret_id(secret)}:{digest}",
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        note=note,
    )
    return key, entry


def write_keys_file(path: Path, keys_file: KeysFile) -> None:
    """Write the keys file atomically (mode 0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    body = (
        "# API key hashes of an alignloop gateway (HMAC-SHA256 under its key secret), re-read on\n"
        "# change. Made by `alignloop keys new`; revoke with `alignloop keys revoke ID`.\n"
        + yaml.safe_dump(keys_file.model_dump(mode="json", exclude_none=True), sort_keys=False)
    )
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(body)
    os.replace(tmp, path)


# -- FastAPI dependencies ----------------------------------------------------------------------
def bearer_key(request: Request) -> str | None:
    """The key from ``Authorization: Bearer <key>`` (or ``api-key`` header), if any."""
    auth = request.headers.get("authorization", "")
    scheme, _, key = auth.partition(" ")
    if scheme.lower() == "bearer" and key.strip():
        return key.strip()
    return request.headers.get("api-key") or None


def _unauthorized(msg: str) -> GatewayError:
    return GatewayError(
        401,
        msg,
        "authentication_error",
        code="invalid_api_key",
        headers={"WWW-Authenticate": "Bearer"},
    )


def _keyring(request: Request) -> KeyRing:
    # A gateway worker (serving.gateway.dataplane) first looks whether the control plane re-read the keys
    # (one shared-memory integer): a SIGHUP or /admin/keys/reload reaches it at once.
    sync = getattr(request.app.state, "keys_sync", None)
    if sync is not None:
        sync()
    return request.app.state.keyring


def _principal(request: Request, what: str) -> Principal:
    keys = _keyring(request)
    key = bearer_key(request)
    if key is None:
        raise _unauthorized(f"missing API key: send 'Authorization: Bearer <{what}>'")
    p = keys.authenticate(key)
    if p is None:
        raise _unauthorized("invalid API key")
    return p


def _forbidden(msg: str) -> GatewayError:
    return GatewayError(403, msg, "permission_error", code="forbidden")


def require_tenant(request: Request) -> str:
    """FastAPI dependency: the tenant name of the request's API key, else 401/403."""
    p = _principal(request, "key")
    if p.role != "tenant":
        if p.role in ("metrics", "reviewer"):
            raise _forbidden(f"a {p.role} key may use {'/metrics' if p.role == 'metrics' else '/review'} only")
        raise _unauthorized("invalid API key")  # the admin key is not a tenant key
    request.state.tenant = p.tenant  # for the error handler's metrics
    return p.tenant


def require_admin(request: Request) -> str:
    """FastAPI dependency for admin endpoints: 401 without a valid key, 403 for other keys."""
    p = _principal(request, "admin key")
    if p.role != "admin":
        raise _forbidden("this endpoint needs the admin key")
    request.state.admin_key_id = p.key_id  # recorded as who promoted or rolled back
    return "admin"


def require_metrics(request: Request) -> None:
    """FastAPI dependency of /metrics: public if configured, else the admin or a metrics key."""
    if request.app.state.config.public_metrics:
        return
    p = _principal(request, "admin or metrics key")
    if p.role not in ("admin", "metrics"):
        raise _forbidden("/metrics needs the admin key or a metrics key")


def is_admin_request(request: Request) -> bool:
    """Whether the request carries the admin key (no error either way)."""
    p = _keyring(request).authenticate(bearer_key(request))
    return p is not None and p.role == "admin"


def keys_router() -> APIRouter:
    """``POST /admin/keys/reload``: re-read the keys file now (admin key)."""
    router = APIRouter(prefix="/admin/keys", tags=["admin"], dependencies=[Depends(require_admin)])

    @router.post("/reload")
    def reload(request: Request) -> dict:
        keys: KeyRing = request.app.state.keyring
        try:
            counts = keys.reload()
        except (ConfigError, OSError, yaml.YAMLError) as exc:
            raise GatewayError(400, f"keys file not reloaded, previous keys stay: {exc}",
                               code="invalid_keys_file") from None
        return {"object": "keys", "file": str(keys.path), "keys": counts}

    return router
