"""`alignloop data build` (logs + feedback -> governed datasets) and `alignloop data simulate` (demo)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import typer

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
    from training.config import ConfigError, load_config
    from training.data import DataConfig, run
    from training.data_sources import DataError

    try:
        result = run(load_config(DataConfig, config, overrides or []))
    except (ConfigError, DataError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from None
    typer.echo(json.dumps(asdict(result), indent=2))


@data_app.command("simulate")
def simulate(config: Path | None = _CONFIG, overrides: list[str] | None = _OVERRIDES) -> None:
    """Send the demo prompt pool through the gateway and post SIMULATED users' feedback."""
    from training.config import ConfigError, load_config
    from training.simulate import SimulateConfig, run

    try:
        result = run(load_config(SimulateConfig, config, overrides or []))
    except (ConfigError, ValueError, RuntimeError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from None
    typer.echo(json.dumps(asdict(result), indent=2))


def register(app: typer.Typer) -> None:
    """Add the `data` command group to the `alignloop` app."""
    app.add_typer(data_app, name="data")
