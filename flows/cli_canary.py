"""`alignloop canary start|status|check|deploy`: a release serving a share of users beside live, decided
by the online rules (configs/online.yaml, evals/online.py; docs/ONLINE.md).

Like the release commands, these talk to the running gateway's admin API when one runs (it owns
the routing); ``check`` with no gateway running decides on the persisted state and log store and
records the outcome in the data dir (it takes effect at the next ``alignloop serve``).
"""

from __future__ import annotations

import json

import typer

from flows.cli_admin import ADMIN_KEY, URL, admin_or_offline, run_or_exit, show_release

canary_app = typer.Typer(help="Canary releases: start, status, check (promote or roll back).", no_args_is_help=True)

_CONFIG = typer.Option("configs/online.yaml", "--config", help="Online rules and canary settings.")
_LOGS = typer.Option(None, "--log-store", help="Log store URL (default: the data dir's logs.db).")


class _OfflineReleases:
    """The persisted releases with the verbs run_check uses (no gateway runs)."""

    def __init__(self) -> None:
        # lazy: a command imports what it runs (alignloop --help stays quick)
        from serving.releases.store import ReleaseStore, offline_actor

        self.store, self.by = ReleaseStore(), offline_actor()

    def list(self):  # noqa: ANN201
        return self.store.list()

    def promote(self, release_id: str, reason: str, **_holdback):  # noqa: ANN003, ANN201
        return self.store.promote_offline(release_id, reason=reason, by=self.by)  # no users: no holdback

    def rollback(self, reason: str):  # noqa: ANN201
        return self.store.rollback_offline(reason, by=self.by)

    def end_canary(self, reason: str):  # noqa: ANN201
        rel = next(r for r in self.store.list() if r.status == "canary")
        return self.store.set_status(rel.release_id, "retired", reason, by=self.by)


def _setup(config: str, overrides: list[str], log_store: str | None, url: str | None, admin_key: str | None):
    # lazy: a command imports what it runs (alignloop --help stays quick)
    from evals.online import OnlineConfig
    from flows.loop_config import resolve_path
    from ground.config import load_config
    from ground.logstore import LogStore, default_url

    cfg = run_or_exit(lambda: load_config(OnlineConfig, resolve_path(config), overrides))
    client = admin_or_offline(url, admin_key)
    return cfg, LogStore(log_store or default_url()), client or _OfflineReleases(), client is None


@canary_app.command("start")
def canary_start(
    release_id: str = typer.Argument(..., help="A staged release."),  # noqa: B008
    config: str = _CONFIG,
    share: float | None = typer.Option(None, help="Share of users (default: the config's canary.share)."),  # noqa: B008
    tenant: list[str] = typer.Option([], help="A tenant whose users may see it (repeat; default: the config's)."),  # noqa: B008
    force: bool = typer.Option(False, help="Start it without a passing gate decision (needs --reason)."),  # noqa: B008
    reason: str | None = typer.Option(None, help="Why (kept in the status history)."),  # noqa: B008
    url: str | None = URL,
    admin_key: str | None = ADMIN_KEY,
) -> None:
    """Route a share of users to a staged release (sticky per user), beside live."""
    # lazy: a command imports what it runs (alignloop --help stays quick)
    from evals.online import OnlineConfig
    from flows.loop_config import resolve_path
    from ground.config import load_config

    if force and not reason:
        raise typer.BadParameter("--force needs --reason", param_hint="--reason")
    cfg = run_or_exit(lambda: load_config(OnlineConfig, resolve_path(config)))
    client = admin_or_offline(url, admin_key)
    if client is None:
        typer.echo("error: no gateway running: a canary needs the gateway that routes users to it", err=True)
        raise typer.Exit(1)
    show_release(run_or_exit(lambda: client.start_canary(
        release_id, share or cfg.canary.share, tenant or cfg.canary.tenants, force, reason)))


@canary_app.command("status")
def canary_status(
    config: str = _CONFIG,
    overrides: list[str] = typer.Argument(None, help="key=value overrides of the config."),  # noqa: B008
    log_store: str | None = _LOGS,
    as_json: bool = typer.Option(False, "--json", help="Print the decision as JSON."),  # noqa: B008
    url: str | None = URL,
    admin_key: str | None = ADMIN_KEY,
) -> None:
    """The running canary: share, tenants, each online rule's bound and the verdict now (no action)."""
    _look(config, overrides, log_store, as_json, url, admin_key, act=False)


@canary_app.command("check")
def canary_check(
    config: str = _CONFIG,
    overrides: list[str] = typer.Argument(None, help="key=value overrides of the config."),  # noqa: B008
    log_store: str | None = _LOGS,
    as_json: bool = typer.Option(False, "--json", help="Print the decision as JSON."),  # noqa: B008
    url: str | None = URL,
    admin_key: str | None = ADMIN_KEY,
) -> None:
    """Decide on the running canary and carry it out: promote, roll back, end (live kept) or wait.

    The reason, with each rule's bound, goes to the release history."""
    _look(config, overrides, log_store, as_json, url, admin_key, act=True)


def _look(config: str, overrides: list[str] | None, log_store: str | None, as_json: bool,
          url: str | None, admin_key: str | None, act: bool) -> None:
    """One look at the running canary (``status``: no action; ``check``: carry out the verdict)."""
    # lazy: a command imports what it runs (alignloop --help stays quick)
    from serving.control.canary import run_check

    cfg, store, releases, offline = _setup(config, overrides or [], log_store, url, admin_key)
    try:
        result = run_or_exit(lambda: run_check(cfg, store, releases, act=act))
    finally:
        store.close()
    _print(result, as_json)
    if act and offline and result.action not in ("continued", "watching", "none"):
        typer.echo("no gateway running: recorded in the data dir (takes effect at the next serve)")


@canary_app.command("deploy")
def canary_deploy(
    config: str = _CONFIG,
    loop_config: str = typer.Option("configs/loop.yaml", help="Loop config: the gateway and log store to use."),  # noqa: B008
    pool: str = typer.Option("alignloop", help="Prefect work pool."),  # noqa: B008
) -> None:
    """Register the Prefect deployment canary-check/canary: the loop schedules its first run when
    it starts a canary, and each run schedules the next while the rules are inconclusive."""
    # lazy: a command imports what it runs (alignloop --help stays quick)
    from flows import prefect_env

    prefect_env.configure()
    # lazy: a command imports what it runs (alignloop --help stays quick)
    from flows.canary import DEPLOYMENT, register_deployment

    dep = register_deployment(config, loop_config, pool)
    typer.echo(f"deployment {DEPLOYMENT} ({dep}) in work pool {pool}: start a worker with "
               f"`prefect worker start --pool {pool}`")


def _print(result, as_json: bool) -> None:  # noqa: ANN001
    if as_json:
        typer.echo(json.dumps({"canary": result.canary, "stage": result.stage, "action": result.action,
                               "decision": result.decision.to_dict() if result.decision else None}, indent=2))
        return
    if result.decision is None:
        typer.echo(result.summary())
        return
    typer.echo(result.decision.to_markdown())
    typer.echo(f"action: {result.action}")


def register(app: typer.Typer) -> None:
    app.add_typer(canary_app, name="canary")


def describe_canary(row: dict) -> str | None:
    """One line for `alignloop release list`: the canary's share and who sees it, and how it ended."""
    c = row.get("canary")
    if not c:
        return None
    who = ", ".join(c.get("tenants") or []) or "every tenant"
    line = f"canary: {c.get('share', 0):.0%} of {who}'s users from {c.get('started_at', '?')[:19]}, vs {c.get('live')}"
    history = row.get("history") or []
    last = history[-1] if history else {}
    reason = last.get("reason", "") if isinstance(last, dict) else getattr(last, "reason", "")
    if row.get("status") != "canary" and reason.startswith(("canary", "online rules")):
        line += f"; {reason[:240]}"
    return line
