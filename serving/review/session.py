"""Who is signed in to the review page: reviewers by key, the signed session cookie and its CSRF
token, signed one-off tokens (a blind comparison's order), and reading an action's form."""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from fastapi import Request
from itsdangerous import BadSignature, URLSafeTimedSerializer

from ground.config import data_dir
from serving.gateway.auth import KeyRing
from serving.gateway.config import GatewayConfig, ReviewerConfig
from serving.gateway.wire import GatewayError

COOKIE = "alignloop_review"
FORM_LIMIT = 256_000  # bytes: an edited answer, not an upload


# -- who is signed in ----------------------------------------------------------------------------
def reviewer_for_key(
    config: GatewayConfig, key: str, keys: KeyRing | None = None
) -> ReviewerConfig | None:
    """The reviewer whose key this is, else None.

    The one place that checks a reviewer key: it asks the gateway's key ring (keyed HMACs,
    constant-time match, the keys file, the demo reviewer key on loopback; serving/gateway/auth.py).
    """
    p = (keys or KeyRing(config)).authenticate(key)
    if p is None or p.role != "reviewer":
        return None
    return next((r for r in config.reviewers if r.name == p.reviewer), None)


def session_secret(config: GatewayConfig) -> bytes:
    """The key that signs session cookies, shared by every gateway process through a file."""
    path = Path(config.review.secret_file or data_dir() / "review-session.key")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_bytes().strip()
    with os.fdopen(fd, "w") as fh:
        fh.write(secrets.token_hex(32))
    return path.read_bytes().strip()


class Session:
    """A signed-in reviewer: who, and the CSRF token of this login."""

    def __init__(self, reviewer: ReviewerConfig, nonce: str, secret: bytes) -> None:
        self.reviewer = reviewer
        self.csrf = hmac.new(secret, b"csrf:" + nonce.encode(), hashlib.sha256).hexdigest()

    @property
    def tenants(self) -> list[str] | None:
        """The tenants this reviewer may see (None = all)."""
        return None if "*" in self.reviewer.tenants else list(self.reviewer.tenants)


class ReviewAuth:
    """Signs and reads the session cookie and one-off tokens with the gateway's session secret."""

    def __init__(self) -> None:
        self._signers: dict[int, tuple[URLSafeTimedSerializer, bytes]] = {}

    def signer(self, config: GatewayConfig) -> tuple[URLSafeTimedSerializer, bytes]:
        got = self._signers.get(id(config))
        if got is None:
            secret = session_secret(config)
            got = (URLSafeTimedSerializer(secret, salt="alignloop-review"), secret)
            self._signers[id(config)] = got
        return got

    def session(self, request: Request) -> Session | None:
        config: GatewayConfig = request.app.state.config
        signer, secret = self.signer(config)
        raw = request.cookies.get(COOKIE)
        if not raw:
            return None
        try:
            data = signer.loads(raw, max_age=config.review.session_ttl_s)
        except BadSignature:
            return None
        # The reviewer must still be in the config: removing them ends their sessions.
        reviewer = next((r for r in config.reviewers if r.name == data.get("r")), None)
        return Session(reviewer, data["n"], secret) if reviewer else None

    def cookie(self, request: Request, reviewer: ReviewerConfig) -> str:
        signer, _ = self.signer(request.app.state.config)
        return signer.dumps({"r": reviewer.name, "n": secrets.token_hex(16)})

    def token(self, request: Request, payload: dict[str, Any], salt: str) -> str:
        signer, _ = self.signer(request.app.state.config)
        return signer.dumps(payload, salt=salt)

    def order(self, request: Request, this: str, other: str, nonce: str) -> list[str]:
        """The A/B order of a blind comparison: a coin keyed by the server secret."""
        _, secret = self.signer(request.app.state.config)
        coin = hmac.new(secret, b"order:" + nonce.encode(), hashlib.sha256).digest()[0] & 1
        return [other, this] if coin else [this, other]

    def untoken(self, request: Request, token: str, salt: str) -> dict[str, Any] | None:
        signer, _ = self.signer(request.app.state.config)
        try:
            return signer.loads(token, salt=salt, max_age=24 * 3600)
        except BadSignature:
            return None


async def read_form(request: Request) -> dict[str, str]:
    """An urlencoded form body (htmx's default), at most ``FORM_LIMIT`` bytes."""
    # lazy: serving.gateway.app loads uvicorn
    from serving.gateway.app import read_body

    body = await read_body(request, FORM_LIMIT)
    try:
        return dict(parse_qsl(body.decode(), keep_blank_values=True, strict_parsing=False))
    except UnicodeDecodeError:
        raise GatewayError(400, "form body is not UTF-8") from None
