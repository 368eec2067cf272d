"""API-key authentication: tenants and the admin, by SHA-256 of the bearer key.

FastAPI dependencies for routers (the releases helper's admin router uses ``require_admin``)::

    @router.post("/admin/promote")
    def promote(admin: str = Depends(require_admin)): ...
"""

from __future__ import annotations

from fastapi import Request

from serving.gateway_config import GatewayConfig, hash_key
from serving.protocol import GatewayError


class KeyRing:
    """Maps key hashes to tenants; knows the admin key hash."""

    def __init__(self, config: GatewayConfig) -> None:
        self.tenant_by_hash = {t.key_sha256: t.name for t in config.tenants}
        self.admin_hash = config.admin_key_sha256

    def tenant(self, key: str | None) -> str | None:
        return self.tenant_by_hash.get(hash_key(key)) if key else None

    def is_admin(self, key: str | None) -> bool:
        return bool(key) and self.admin_hash is not None and hash_key(key) == self.admin_hash


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


def require_tenant(request: Request) -> str:
    """FastAPI dependency: the tenant name of the request's API key, else 401."""
    keys: KeyRing = request.app.state.keyring
    key = bearer_key(request)
    if key is None:
        raise _unauthorized("missing API key: send 'Authorization: Bearer <key>'")
    tenant = keys.tenant(key)
    if tenant is None:
        raise _unauthorized("invalid API key")
    request.state.tenant = tenant  # for the error handler's metrics
    return tenant


def require_admin(request: Request) -> str:
    """FastAPI dependency for admin endpoints: 401 without a valid key, 403 for tenant keys."""
    keys: KeyRing = request.app.state.keyring
    key = bearer_key(request)
    if key is None:
        raise _unauthorized("missing API key: send 'Authorization: Bearer <admin key>'")
    if keys.is_admin(key):
        return "admin"
    if keys.tenant(key) is not None:
        raise GatewayError(
            403, "this endpoint needs the admin key", "permission_error", code="forbidden"
        )
    raise _unauthorized("invalid API key")
