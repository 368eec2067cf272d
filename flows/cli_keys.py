"""`alignloop keys new|list|revoke|hash`: API keys of the gateway, without restarting it.

Keys live in the keys file named by the gateway config (``keys_file``, default
``<data dir>/keys.yaml``) as HMAC digests under the server's key secret; a running gateway re-reads
the file when it changes. A new key is printed once and never stored. Rotation: ``keys new`` for
the same tenant, move the clients over, ``keys revoke`` the old id.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer

keys_app = typer.Typer(help="API keys: make, list, revoke (a running gateway picks them up).",
                       no_args_is_help=True)

_CONFIG = typer.Option(None, "--config", help="Gateway config YAML (default: <repo>/configs/gateway.yaml).")


def _gateway(config: Path | None):
    # lazy: a command imports what it runs (alignloop --help stays quick)
    from ground.config import ConfigError, repo_root
    from serving.gateway.config import load_gateway_config

    try:
        return load_gateway_config(config or repo_root() / "configs" / "gateway.yaml")
    except ConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


@keys_app.command("new")
def keys_new(
    tenant: str | None = typer.Option(None, help="Make a key for this tenant (of the gateway config)."),
    admin: bool = typer.Option(False, "--admin", help="Make an admin key."),
    metrics: bool = typer.Option(False, "--metrics", help="Make a key that may read /metrics only."),
    reviewer: str | None = typer.Option(None, help="Make a review-page key for this reviewer (of the gateway config)."),
    note: str | None = typer.Option(None, help="Who holds it, what for (kept in the keys file)."),
    config: Path | None = _CONFIG,
) -> None:
    """Make a key, add its hash to the keys file and print the key (shown this once)."""
    # lazy: a command imports what it runs (alignloop --help stays quick)
    from serving.gateway.auth import keys_file_path, new_key_entry, read_keys_file, write_keys_file
    from serving.gateway.config import load_key_secret

    if sum([tenant is not None, admin, metrics, reviewer is not None]) != 1:
        raise typer.BadParameter("give exactly one of --tenant NAME, --admin, --metrics, --reviewer NAME")
    gw = _gateway(config)
    if tenant is not None and gw.tenant(tenant) is None:
        raise typer.BadParameter(
            f"no tenant {tenant!r} in the gateway config (tenants: {[t.name for t in gw.tenants]})",
            param_hint="--tenant",
        )
    if reviewer is not None and reviewer not in {r.name for r in gw.reviewers}:
        raise typer.BadParameter(
            f"no reviewer {reviewer!r} in the gateway config (reviewers: {[r.name for r in gw.reviewers]})",
            param_hint="--reviewer",
        )
    role = ("tenant" if tenant is not None else "reviewer" if reviewer is not None
            else "admin" if admin else "metrics")
    path = keys_file_path(gw)
    keys = read_keys_file(path)
    key, entry = new_key_entry(role, tenant, load_key_secret(gw.key_secret_file, create=True), note,
                               reviewer)
    keys.keys.append(entry)
    write_keys_file(path, keys)
    who = tenant or reviewer
    typer.echo(f"{entry.id} ({role}{' ' + who if who else ''}) added to {path}", err=True)
    typer.echo("the key (shown once; a running gateway accepts it within a second):", err=True)
    typer.echo(key)


@keys_app.command("list")
def keys_list(config: Path | None = _CONFIG) -> None:
    """The keys in the keys file (ids, roles, tenants; never the keys)."""
    # lazy: a command imports what it runs (alignloop --help stays quick)
    from serving.gateway.auth import keys_file_path, read_keys_file

    gw = _gateway(config)
    path = keys_file_path(gw)
    typer.echo(f"# {path}" + ("" if path.exists() else " (none yet)"))
    for k in read_keys_file(path).keys:
        who = k.tenant or k.reviewer or "-"
        typer.echo(f"{k.id:<28} {k.role:<8} {who:<16} {k.created or '-':<26} {k.note or ''}")
    if gw.demo_keys:
        typer.echo("demo keys ON (demo_keys: true): the published sk-alignloop-* keys, loopback only")


@keys_app.command("revoke")
def keys_revoke(key_id: str = typer.Argument(..., help="The id `keys list` shows."),
                config: Path | None = _CONFIG) -> None:
    """Remove a key from the keys file (a running gateway refuses it within a second)."""
    # lazy: a command imports what it runs (alignloop --help stays quick)
    from serving.gateway.auth import keys_file_path, read_keys_file, write_keys_file

    gw = _gateway(config)
    path = keys_file_path(gw)
    keys = read_keys_file(path)
    left = [k for k in keys.keys if k.id != key_id]
    if len(left) == len(keys.keys):
        typer.echo(f"error: no key {key_id!r} in {path}", err=True)
        raise typer.Exit(1)
    keys.keys = left
    write_keys_file(path, keys)
    typer.echo(f"{key_id} revoked")


@keys_app.command("hash")
def keys_hash(config: Path | None = _CONFIG) -> None:
    """Hash a key read from stdin (for `key_hash` / `admin_key_hash` in the gateway config)."""
    # lazy: a command imports what it runs (alignloop --help stays quick)
    from serving.gateway.config import hash_key, load_key_secret

    gw = _gateway(config)
    key = sys.stdin.readline().strip() if not sys.stdin.isatty() else typer.prompt("key", hide_input=True)
    if not key:
        raise typer.BadParameter("empty key")
    typer.echo(hash_key(key, load_key_secret(gw.key_secret_file, create=True)))


def register(app: typer.Typer) -> None:
    app.add_typer(keys_app, name="keys")
