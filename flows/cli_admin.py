"""What the release and canary commands share: the gateway options, its admin client, errors.

Release commands talk to the running gateway's admin API when one runs; see flows/cli_serving.py.
"""

from __future__ import annotations

from urllib.parse import urlsplit

import typer

URL = typer.Option(
    None,
    "--url",
    envvar="ALIGNLOOP_GATEWAY_URL",
    help="Running gateway (default: from server.json).",
)
ADMIN_KEY = typer.Option(
    None, "--admin-key", envvar="ALIGNLOOP_ADMIN_KEY", help="Admin key of the running gateway."
)


def admin_or_offline(url: str | None, admin_key: str | None):
    """An AdminClient for the running gateway, or None when none runs (offline mode).

    Without a key, a gateway on loopback is asked with the published demo admin key: it accepts
    that key only on loopback and only while ``demo_keys`` is on (serving/gateway/auth.py), so this opens
    nothing that was closed; a gateway that refuses it gets the usual "pass --admin-key".
    """
    # lazy: a command imports what it runs (alignloop --help stays quick)
    from serving.control.admin_api import AdminClient, AdminError
    from serving.control.server import running_server
    from serving.gateway.auth import is_loopback
    from serving.gateway.config import DEMO_ADMIN_KEY

    if url is None:
        info = running_server()
        url = info["url"] if info else None
    if url is None:
        return None
    if admin_key:
        return AdminClient(url, admin_key)
    need_key = f"a gateway runs at {url}: pass --admin-key or set ALIGNLOOP_ADMIN_KEY"
    if not is_loopback(urlsplit(url).hostname or ""):
        raise typer.BadParameter(need_key, param_hint="--admin-key")
    # lazy: a command imports what it runs (alignloop --help stays quick)
    import httpx

    client = AdminClient(url, DEMO_ADMIN_KEY)
    try:
        client.describe()
    except AdminError as exc:
        if exc.status in (401, 403):
            raise typer.BadParameter(
                f"{need_key} (it refused the demo admin key: demo_keys is off)",
                param_hint="--admin-key",
            ) from None
        raise
    except httpx.HTTPError as exc:  # server.json names a live pid, but nothing answers there
        raise typer.BadParameter(
            f"{need_key} (asked with the demo admin key, it did not answer: {type(exc).__name__})",
            param_hint="--admin-key",
        ) from None
    return client


def run_or_exit(fn):
    # lazy: a command imports what it runs (alignloop --help stays quick)
    from ground.config import ConfigError
    from serving.control.admin_api import AdminError
    from serving.releases.records import ReleaseError

    try:
        return fn()
    except (AdminError, ReleaseError, ConfigError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None


def show_release(rel, note: str = "") -> None:
    last = rel.history[-1] if rel.history else None
    typer.echo(
        f"{rel.release_id}: {rel.status}"
        + (f" ({last.reason.splitlines()[0][:200]})" if last and last.reason else "")
    )
    if note:
        typer.echo(note)
