"""`alignloop data build` (logs + feedback -> governed datasets) and `alignloop data simulate` (demo)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import typer

if TYPE_CHECKING:
    from training.data import DataConfig

data_app = typer.Typer(
    help="Datasets from served logs and feedback; demo traffic.", no_args_is_help=True
)

_CONFIG = typer.Option(None, "--config", "-c", help="YAML config file.")
_OVERRIDES = typer.Argument(
    None, help="key=value overrides, e.g. governance.ngram=13 logstore.last_hours=24"
)


@data_app.command("build")
def build(config: Path | None = _CONFIG, overrides: list[str] | None = _OVERRIDES) -> None:
    """Export a window of the log store (and JSONL files) into SFT/DPO datasets with a manifest."""
    # lazy: a command imports what it runs (alignloop --help stays quick)
    from ground.config import ConfigError, load_config
    from training.data import DataConfig, run
    from training.data_sources import DataError

    try:
        result = run(with_live_view(load_config(DataConfig, config, overrides or [])))
    except (ConfigError, DataError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from None
    typer.echo(json.dumps(asdict(result), indent=2))


@data_app.command("simulate")
def simulate(config: Path | None = _CONFIG, overrides: list[str] | None = _OVERRIDES) -> None:
    """Send the demo prompt pool through the gateway and post SIMULATED users' feedback."""
    # lazy: a command imports what it runs (alignloop --help stays quick)
    from flows.simulate import SimulateConfig, run
    from ground.config import ConfigError, load_config

    try:
        result = run(load_config(SimulateConfig, config, overrides or []))
    except (ConfigError, ValueError, RuntimeError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from None
    typer.echo(json.dumps(asdict(result), indent=2))


def with_live_view(cfg: DataConfig) -> DataConfig:
    """Fill what the config leaves unset of the live view (windows learned, current releases)
    from the live release's lineage: training/ reads no release records (docs/DESIGN.md)."""
    # lazy: a command imports what it runs (alignloop --help stays quick)
    from serving.releases.store import live_lineage

    ledger = cfg.ledger
    if ledger.trained_windows is not None and ledger.current_releases is not None:
        return cfg
    live = live_lineage()
    update = {}
    if ledger.trained_windows is None:
        update["trained_windows"] = live.trained_windows if live else []
    if ledger.current_releases is None:
        update["current_releases"] = [live.release_id] if live and live.release_id else []
    return cfg.model_copy(update={"ledger": ledger.model_copy(update=update)})


def register(app: typer.Typer) -> None:
    """Add the `data` command group to the `alignloop` app."""
    app.add_typer(data_app, name="data")
