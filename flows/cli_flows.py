"""`alignloop run|schedule|ui|promote|demo`: the loop as Prefect flows, from one CLI."""

from __future__ import annotations

import json
import logging
import os
import shlex
from datetime import datetime

import typer

_CONFIG = typer.Option("configs/loop.yaml", "--config", "-c", help="Loop config YAML.")
_OVERRIDES = typer.Argument(None, help="key=value overrides, e.g. sft.train.epochs=2")


def _parse_time(value: str | None, name: str) -> datetime | None:
    if value is None:
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        raise typer.BadParameter(f"expected an ISO 8601 time, got {value!r}", param_hint=name) from None


def _check_config(config: str, overrides: list[str]) -> None:
    """Fail before Prefect starts: a bad config names its field and exits 2."""
    # lazy: a command imports what it runs (alignloop --help stays quick)
    from flows.loop_config import load_loop_config
    from ground.config import ConfigError

    try:
        load_loop_config(config, overrides)
    except ConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


def run(
    config: str = _CONFIG,
    since: str | None = typer.Option(None, help="Window start (ISO 8601); default: end of the last successful run."),
    until: str | None = typer.Option(None, help="Window end (ISO 8601); default: now."),
    overrides: list[str] = _OVERRIDES,
) -> None:
    """Run the whole loop once on a feedback window: align, evaluate, gate, promote or keep."""
    # lazy: a command imports what it runs (alignloop --help stays quick)
    from flows import prefect_env

    _check_config(config, overrides or [])
    typer.echo(f"reporting to {prefect_env.configure()}")
    # lazy: a command imports what it runs (alignloop --help stays quick)
    from flows.loop import run_loop

    outcome = run_loop(config, overrides or [], _parse_time(since, "--since"), _parse_time(until, "--until"))
    typer.echo(json.dumps(outcome, indent=2, default=str))


def schedule(
    cron: str = typer.Option(..., help='Cron schedule, e.g. "0 3 * * *" (daily at 03:00).'),
    name: str = typer.Option("scheduled", help="Deployment name."),
    config: str = _CONFIG,
    pool: str = typer.Option("alignloop", help="Prefect work pool the deployment goes to (created if missing)."),
    pool_type: str = typer.Option("process", help="Type of a pool that does not exist yet (process, docker, kubernetes, ...)."),
    register_only: bool = typer.Option(
        False, help="Create/update the deployment and exit; a worker of the pool runs it "
        "(`prefect worker start --pool alignloop`, e.g. on the GPU machine).",
    ),
    overrides: list[str] = _OVERRIDES,
) -> None:
    """Put the loop on a cron schedule in a work pool, then run a worker for it here.

    Each run takes the window since the last successful one; runs of the same base model never
    overlap (a global concurrency limit of one slot per model).
    """
    # lazy: a command imports what it runs (alignloop --help stays quick)
    from flows import prefect_env

    _check_config(config, overrides or [])
    where = prefect_env.configure()
    if "ephemeral" in where:  # schedules need a server whose scheduler creates the runs
        state = prefect_env.start_ui()
        os.environ["PREFECT_API_URL"] = state["api_url"]
        where = f"local Prefect UI at {state['ui_url']}"
    # lazy: a command imports what it runs (alignloop --help stays quick)
    from flows.schedule import register_deployment, worker_command

    deployment_id = register_deployment(name, cron, config, overrides or [], pool, pool_type)
    typer.echo(f"deployment alignment-loop/{name} ({deployment_id}) with cron {cron!r} in work pool {pool!r} on {where}")
    cmd = worker_command(pool)
    if register_only:
        typer.echo(f"start a worker where the loop should run (same checkout path): {shlex.join(cmd)}")
        return
    typer.echo(f"starting a worker for pool {pool!r} here (Ctrl-C stops it)")
    os.execv(cmd[0], cmd)  # the worker replaces this process: its signals, its exit code


def ui(
    port: int = typer.Option(4200, help="Port of the local Prefect server."),
) -> None:
    """Start a local Prefect server (SQLite) in the background and print its URL."""
    # lazy: a command imports what it runs (alignloop --help stays quick)
    from flows import prefect_env

    state = prefect_env.start_ui(port=port)
    typer.echo(f"Prefect UI: {state['ui_url']}  (API {state['api_url']}, pid {state['pid']})")
    typer.echo("alignloop commands run from now on report there; stop it with: kill " + str(state["pid"]))


def promote(
    release_id: str = typer.Argument(..., help="Release to make live without a passing gate."),
    force: bool = typer.Option(False, "--force", help="Required: this bypasses the eval gate."),
    reason: str = typer.Option(..., help="Why (recorded in the release history and the log)."),
    url: str | None = typer.Option(None, envvar="ALIGNLOOP_GATEWAY_URL", help="Running gateway URL."),
    admin_key: str | None = typer.Option(None, envvar="ALIGNLOOP_ADMIN_KEY", help="Admin key."),
) -> None:
    """Emergency promotion that bypasses the gate (normal promotion happens only in the loop)."""
    if not force:
        typer.echo(
            "error: promotion goes through the gate (`alignloop run`); "
            "pass --force --reason '...' for an emergency promotion",
            err=True,
        )
        raise typer.Exit(2)
    # lazy: a command imports what it runs (alignloop --help stays quick)
    from flows.cli_serving import release_promote

    logging.getLogger("alignloop.promote").warning("FORCED promotion of %s: %s", release_id, reason)
    release_promote(release_id, force=True, reason=f"forced: {reason}", url=url, admin_key=admin_key)


def demo(
    overrides: list[str] = _OVERRIDES,
    keep_serving: bool = typer.Option(False, help="Leave the gateway running after the demo."),
    windows: int = typer.Option(1, min=1, help="Feedback windows in a row (each one a scheduled run)."),
    serve: list[str] = typer.Option(  # noqa: B008
        [], "--serve", help="key=value for the demo's `alignloop serve` (e.g. releases.gate_file=...)."
    ),
) -> None:
    """The whole loop on the embedded SmolLM2 on this machine, with simulated users (labeled as such)."""
    # lazy: a command imports what it runs (alignloop --help stays quick)
    from flows.demo import run_demo

    raise typer.Exit(run_demo(overrides or [], keep_serving=keep_serving, windows=windows, serve_overrides=serve))


def register(app: typer.Typer) -> None:
    app.command("run")(run)
    app.command("schedule")(schedule)
    app.command("ui")(ui)
    app.command("promote")(promote)
    app.command("demo")(demo)

