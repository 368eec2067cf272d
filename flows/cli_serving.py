"""`alignloop serve`, `alignloop stop` and `alignloop release list|stage|promote|rollback|retire|attach-eval`.

Release commands talk to the running gateway's admin API when one runs (its URL comes from
``--url``/``$ALIGNLOOP_GATEWAY_URL`` or the ``server.json`` it writes in the data dir; the key from
``--admin-key``/``$ALIGNLOOP_ADMIN_KEY``, else, for a gateway on loopback, the published demo admin
key, which such a gateway accepts while ``demo_keys`` is on: docs/SECURITY.md): the gateway owns
the vLLM processes. With no gateway running they work on the persisted state and say so:
- ``stage`` starts the candidate, health-checks it, records it ``staged`` and stops it again;
- ``promote`` marks it live for the next ``alignloop serve`` (which starts it and, if it fails,
  falls back to the previous release);
- ``rollback`` swaps live and previous in the files.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from urllib.parse import urlsplit

import typer

from flows.cli_admin import ADMIN_KEY, URL, admin_or_offline, run_or_exit, show_release

release_app = typer.Typer(
    help="Blue/green releases: list, stage, promote, rollback.", no_args_is_help=True
)

def _address(row: dict) -> str | None:
    """host:port where the release answers: its external server, or its running vLLM."""
    url = row.get("upstream_url") or row.get("base_url")
    if not url:
        return None
    u = urlsplit(url)
    return f"{u.hostname}:{u.port or (443 if u.scheme == 'https' else 80)}"


def _placement(row: dict) -> str:
    """Where the release's vLLM runs: cpu, or its GPUs and memory share (its last start)."""
    if row.get("upstream_url"):
        return "external"
    p = row.get("placement")
    if not p:
        return "not started"
    if not p.get("devices"):
        return "cpu"
    share = f", {p['share']:.0%} of memory each" if p.get("share") else ""
    return "gpu " + ",".join(str(d) for d in p["devices"]) + share


def _served_dtype(row: dict) -> str:
    """The dtype its running vLLM was started with (its command line), else the release's arg."""
    if row.get("pid"):
        try:
            argv = Path(f"/proc/{row['pid']}/cmdline").read_bytes().decode().split("\0")
            return argv[argv.index("--dtype") + 1]
        except (OSError, ValueError, IndexError):
            pass
    return str((row.get("vllm_args") or {}).get("dtype", "auto"))


def _scheme(row: dict) -> str:
    """The weight format it serves (w8a8-int8, w4a16, fp8-dynamic, or unquantized), the vLLM
    kernel when not the default one (GPU W4A16 candidates), and the dtype."""
    # lazy: a command imports what it runs (alignloop --help stays quick)
    from evals.serving_choice import scheme_in_words
    from flows.gpu import served_label
    from ground.config import ConfigError

    if row.get("upstream_url"):
        return "external (its own)"
    try:
        scheme, kernel = served_label(row)
    except (OSError, ValueError, KeyError, ConfigError):
        scheme, kernel = "unknown", "default"
    name = scheme_in_words(scheme)  # the dtype follows, from the running vLLM
    kernel = "" if kernel == "default" else f", kernel {kernel}"
    return f"{name}{kernel}, dtype {_served_dtype(row)}"


@release_app.command("list")
def release_list(
    as_json: bool = typer.Option(False, "--json", help="Print the records as JSON."),  # noqa: B008
    url: str | None = URL,
    admin_key: str | None = ADMIN_KEY,
) -> None:
    """List releases: status, where each is served (host:port), placement, scheme, lineage."""
    # lazy: a command imports what it runs (alignloop --help stays quick)
    from flows.cli_canary import describe_canary
    from serving.releases.store import ReleaseStore
    from training.lineage import describe_chain, release_lineage

    client = admin_or_offline(url, admin_key)
    rows = run_or_exit(client.describe) if client else [r.to_dict() for r in ReleaseStore().list()]
    for r in rows:
        r["address"], r["placement_text"], r["scheme"] = _address(r), _placement(r), _scheme(r)
    chains: dict[str, str] = {}
    for r in rows:  # window -> dataset version -> adapters -> release, read from the run folders
        try:
            lineage = release_lineage(r["release_id"], r["model_dir"])
        except (OSError, ValueError, KeyError) as exc:
            r["lineage"] = {"error": str(exc)}
            chains[r["release_id"]] = f"unknown ({exc})"
            continue
        r["lineage"] = lineage.to_dict()
        if lineage.steps:
            chains[r["release_id"]] = describe_chain(lineage)
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    if client is None:
        typer.echo("(no gateway running: persisted state)")
    for r in rows:
        flags = " serving" if r.get("serving") else (" warm" if r.get("warm") else "")
        src = r.get("source") or {}
        where = src.get("run_dir", src.get("kind", ""))
        origin = f" from {where}:{src['stage']}" if "stage" in src else (
            f" from {where} {src.get('name', '')}".rstrip() if src else "")
        # A release whose first start is under way has no status yet: say what vLLM is doing.
        starting = r.get("starting") or {}
        status = r["status"] or ("starting" if starting else "-")
        typer.echo(f"{r['release_id']:<48} {status:<9}{flags:<8} {r['model_dir']}{origin}")
        address = r["address"] or (
            f"not yet ({starting['phase']}, {starting['elapsed_s']:.0f}s)" if starting else "not running")
        typer.echo(f"    at {address}   placement: {r['placement_text']}   scheme: {r['scheme']}")
        if r["release_id"] in chains:
            typer.echo(f"    lineage: {chains[r['release_id']]}")
        if canary := describe_canary(r):
            typer.echo(f"    {canary}")


@release_app.command("stage")
def release_stage(
    model_dir: str = typer.Argument(..., help="Model folder (or 'embedded') to serve."),  # noqa: B008
    overrides: list[str] = typer.Argument(
        None, help="vLLM args as key=value (dtype=float32 max_model_len=1024)."
    ),  # noqa: B008
    args_file: Path | None = typer.Option(None, help="YAML with vLLM args (VLLMArgs)."),  # noqa: B008
    release_id: str | None = typer.Option(
        None, "--id", help="Release id (default: time + model name)."
    ),  # noqa: B008
    source_run: str | None = typer.Option(
        None, help="Run folder that produced the model (lineage)."
    ),  # noqa: B008
    source_stage: str | None = typer.Option(None, help="Stage inside that run (lineage)."),  # noqa: B008
    url: str | None = URL,
    admin_key: str | None = ADMIN_KEY,
) -> None:
    """Start a candidate on its own port and health-check it; users are not routed to it."""
    # lazy: a command imports what it runs (alignloop --help stays quick)
    from ground.config import load_config
    from serving.engine.vllm_server import VLLMArgs
    from training.base_model import resolve_base_model

    # No args given: None, so the gateway applies its own releases.default_args.
    args = (
        run_or_exit(lambda: load_config(VLLMArgs, args_file, overrides or []))
        if (args_file or overrides)
        else None
    )
    try:
        model = resolve_base_model(model_dir)
    except FileNotFoundError:
        model = model_dir  # recorded as failed below, with vLLM's reason
    source = {k: v for k, v in (("run_dir", source_run), ("stage", source_stage)) if v}
    client = admin_or_offline(url, admin_key)
    if client is not None:
        rel = run_or_exit(lambda: client.stage(model, args, source, release_id))
        note = ""
    else:
        # lazy: a command imports what it runs (alignloop --help stays quick)
        from ground.config import repo_root
        from serving.control.server import ServeConfig
        from serving.releases.manager import ReleaseManager

        serve_yaml = repo_root() / "configs/serve.yaml"
        defaults = load_config(
            ServeConfig, serve_yaml if serve_yaml.is_file() else None
        ).releases.default_args
        with ReleaseManager(default_args=defaults) as manager:
            rel = run_or_exit(lambda: manager.stage(model, args, source, release_id))
        note = (
            "no gateway running: it started, answered and was stopped again; it starts when "
            "promoted in a running gateway, or at the next `alignloop serve` if promoted now."
        )
    show_release(rel, note if rel.status == "staged" else "")
    if rel.status != "staged":
        raise typer.Exit(1)


@release_app.command("promote")
def release_promote(
    release_id: str = typer.Argument(..., help="Release to make live."),  # noqa: B008
    force: bool = typer.Option(False, help="Promote against a gate decision (needs --reason)."),  # noqa: B008
    reason: str | None = typer.Option(None, help="Why (kept in the status history)."),  # noqa: B008
    url: str | None = URL,
    admin_key: str | None = ADMIN_KEY,
) -> None:
    """Switch the gateway to a release (health-checked first); the live one becomes previous."""
    # lazy: a command imports what it runs (alignloop --help stays quick)
    from serving.releases.store import ReleaseStore

    if force and not reason:
        raise typer.BadParameter("--force needs --reason", param_hint="--reason")
    client = admin_or_offline(url, admin_key)
    if client is not None:
        show_release(run_or_exit(lambda: client.promote(release_id, force, reason)))
        return

    show_release(
        run_or_exit(lambda: ReleaseStore().promote_offline(release_id, force, reason or "")),
        "no gateway running: marked live in the data dir; the next "
        "`alignloop serve` starts it (and falls back to the previous release if it fails).",
    )


@release_app.command("rollback")
def release_rollback(
    reason: str | None = typer.Option(None, help="Why (kept in the status history)."),  # noqa: B008
    url: str | None = URL,
    admin_key: str | None = ADMIN_KEY,
) -> None:
    """Make the previous release live again (instant while it is warm)."""
    # lazy: a command imports what it runs (alignloop --help stays quick)
    from serving.releases.store import ReleaseStore

    client = admin_or_offline(url, admin_key)
    if client is not None:
        show_release(run_or_exit(lambda: client.rollback(reason)))
        return
    show_release(
        run_or_exit(lambda: ReleaseStore().rollback_offline(reason or "")),
        "no gateway running: swapped live and previous in the data dir (takes effect at the next serve).",
    )


@release_app.command("retire")
def release_retire(
    release_id: str = typer.Argument(..., help="Staged or previous release to stop."),  # noqa: B008
    reason: str | None = typer.Option(None, help="Why."),  # noqa: B008
    url: str | None = URL,
    admin_key: str | None = ADMIN_KEY,
) -> None:
    """Stop a staged/previous release and take it out of rotation."""
    # lazy: a command imports what it runs (alignloop --help stays quick)
    from serving.releases.records import ReleaseError
    from serving.releases.store import ReleaseStore

    client = admin_or_offline(url, admin_key)
    if client is not None:
        show_release(run_or_exit(lambda: client.retire(release_id, reason)))
        return

    def offline():
        store = ReleaseStore()
        if store.get(release_id).status == "live":
            raise ReleaseError(f"release {release_id} is live: promote or roll back first")
        return store.set_status(release_id, "retired", reason or "retired (offline)")

    show_release(run_or_exit(offline))


@release_app.command("attach-eval")
def release_attach_eval(
    release_id: str = typer.Argument(...),
    report: Path = typer.Argument(..., exists=True, help="Report JSON."),  # noqa: B008
    url: str | None = URL,
    admin_key: str | None = ADMIN_KEY,
) -> None:
    """Attach an eval report (JSON) to a release."""
    # lazy: a command imports what it runs (alignloop --help stays quick)
    from serving.releases.store import ReleaseStore

    client = admin_or_offline(url, admin_key)
    data = json.loads(report.read_text())
    rel = (
        run_or_exit(lambda: client.attach_eval(release_id, data))
        if client
        else run_or_exit(lambda: ReleaseStore().attach_eval(release_id, data))
    )
    show_release(rel)


def serve(
    config: Path | None = typer.Option(
        None, help="Serve config YAML (default: <repo>/configs/serve.yaml)."
    ),  # noqa: B008
    overrides: list[str] = typer.Argument(None, help="Config overrides as key=value (port=8001)."),  # noqa: B008
    insecure_demo_keys: bool = typer.Option(
        False, help="Serve the published demo keys on a non-loopback address anyway."
    ),  # noqa: B008
) -> None:
    """Run the gateway with the live release (vLLM), admin API included, until Ctrl-C."""
    # lazy: a command imports what it runs (alignloop --help stays quick)
    from ground.config import ConfigError, load_config, repo_root
    from serving.control.server import ServeConfig, run_serve, running_server

    try:
        cfg = load_config(
            ServeConfig, config or repo_root() / "configs/serve.yaml", overrides or []
        )
    except ConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    if (info := running_server()) is not None:
        typer.echo(
            f"error: a gateway already runs for this data dir ({info['url']}, pid {info['pid']}); "
            "`alignloop stop` stops it",
            err=True,
        )
        raise typer.Exit(1)
    if insecure_demo_keys:
        cfg.insecure_demo_keys = True
    try:
        run_serve(cfg)
    except ConfigError as exc:  # e.g. demo keys on a public address, a bad keys file
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


def stop(
    timeout_s: float = typer.Option(
        120, "--timeout", help="Seconds to wait for it to stop its vLLM servers and exit."
    ),  # noqa: B008
) -> None:
    """Stop the gateway running for this data dir (e.g. kept by `alignloop demo --keep-serving`).

    SIGTERM, as Ctrl-C: it stops its vLLM servers, then exits and removes its server.json.
    """
    # lazy: a command imports what it runs (alignloop --help stays quick)
    from serving.control.server import running_server

    info = running_server()
    if info is None:
        typer.echo("no gateway runs for this data dir")
        return
    os.kill(int(info["pid"]), signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while running_server() is not None:  # it removes server.json as it exits
        if time.monotonic() > deadline:
            typer.echo(f"error: the gateway (pid {info['pid']}) still runs after {timeout_s:.0f}s",
                       err=True)
            raise typer.Exit(1)
        time.sleep(0.5)
    typer.echo(f"stopped the gateway at {info['url']} (pid {info['pid']})")


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)
    app.command("stop")(stop)
    app.add_typer(release_app, name="release")
