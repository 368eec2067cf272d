"""`alignloop eval quality|safety|perf|all`, `alignloop report` and `alignloop gate`.

    alignloop eval all --endpoint http://127.0.0.1:8080/v1 --api-key sk-... --model live \\
        --variant baseline --out .alignloop/evals/baseline [key=value overrides of configs/evals.yaml]
    alignloop report --metrics baseline=.../metrics.json --metrics aligned=.../metrics.json --out DIR
    alignloop gate --candidate aligned/metrics.json --live baseline/metrics.json   # exit 1 unless promote
    alignloop gate --candidate .alignloop/runs/RUN/evals-aligned --live .alignloop/runs/RUN/evals-baseline
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

eval_app = typer.Typer(help="Run eval suites against an OpenAI-compatible endpoint.", no_args_is_help=True)


def _default(name: str) -> Path | None:
    # lazy: a command imports what it runs (alignloop --help stays quick)
    from ground.config import repo_root

    path = repo_root() / "configs" / name
    return path if path.is_file() else None


def _run_suites(
    suites: tuple[str, ...], endpoint: str, api_key: str, model: str, variant: str, out: Path,
    config: Path | None, overrides: list[str] | None, logprobs_endpoint: str | None,
    model_dir: Path | None,
) -> None:
    # lazy: a command imports what it runs (alignloop --help stays quick)
    from evals import suites as suites_mod
    from evals.config import Endpoint, EvalsConfig
    from ground.config import ConfigError, load_config

    try:
        cfg = load_config(EvalsConfig, config or _default("evals.yaml"), overrides or [])
        if model_dir is not None:
            cfg.perf.model_dir = str(model_dir)
        ep = Endpoint(endpoint, api_key, model)
        lp = Endpoint(logprobs_endpoint, api_key, model) if logprobs_endpoint else None
    except (ConfigError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    result = suites_mod.run(cfg, ep, out, variant, suites=suites, logprobs_endpoint=lp)
    typer.echo(json.dumps({"metrics_path": result.metrics_path, "seconds": result.seconds,
                           "metrics": result.metrics}, indent=2))


def _make_eval_command(suites: tuple[str, ...], help_text: str):
    def command(
        endpoint: str = typer.Option(..., help="OpenAI base URL ending in /v1 (the gateway, or vLLM)."),
        model: str = typer.Option(..., help="Model name to send in requests."),
        api_key: str = typer.Option("EMPTY", envvar="ALIGNLOOP_API_KEY", help="Bearer key."),
        variant: str = typer.Option("candidate", help="Variant label in the metrics file (baseline, aligned...)."),
        out: Path = typer.Option(Path(".alignloop/evals/candidate"), help="Folder for metrics.json and records."),
        config: Path | None = typer.Option(None, "--config", "-c", help="YAML (default configs/evals.yaml)."),
        logprobs_endpoint: str | None = typer.Option(
            None, help="vLLM's own /v1 for preference accuracy (prompt logprobs)."),
        model_dir: Path | None = typer.Option(None, help="Served model folder (size on disk)."),
        overrides: list[str] | None = typer.Argument(None, help="key=value overrides, e.g. perf.concurrency=[1,2]"),
    ) -> None:
        _run_suites(suites, endpoint, api_key, model, variant, out, config, overrides,
                    logprobs_endpoint, model_dir)

    command.__doc__ = help_text
    return command


def report(
    metrics: list[str] = typer.Option(..., "--metrics", "-m", help="name=path/metrics.json (reference first)."),
    out: Path = typer.Option(Path(".alignloop/report"), help="Output folder."),
    gate_config: Path | None = typer.Option(None, help="Gate YAML: include the decision of the last variant vs the first."),
) -> None:
    """Render report.md, report.json and PNG plots from stored metrics files."""
    # lazy: a command imports what it runs (alignloop --help stays quick)
    from evals import report as report_mod

    files = {}
    for item in metrics:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            typer.echo(f"error: --metrics {item!r}: expected name=path", err=True)
            raise typer.Exit(2)
        files[name] = path
    gate_dict = gate_md = None
    if gate_config is not None and len(files) >= 2:
        decision = _decide(gate_config, list(files.values())[-1], list(files.values())[0])
        gate_dict, gate_md = decision.to_dict(), decision.to_markdown()
    result = report_mod.run(files, out, gate=gate_dict, gate_markdown=gate_md)
    typer.echo(json.dumps(result.__dict__, indent=2))


def _decide(config: Path | None, candidate: str, live: str | None):
    """The decision for a candidate vs live, each given as an eval output folder's metrics.json
    (its per-item ``outcomes-*.jsonl`` beside it) or a loop run's ``evals-<variant>`` folder."""
    # lazy: a command imports what it runs (alignloop --help stays quick)
    from evals.gate import GateConfig, evaluate, load_outcome_dir
    from evals.suites import load_metrics_doc
    from ground.config import load_config

    def read(path: str) -> tuple[dict, dict]:
        p = Path(path)
        if p.is_dir() and (p / "result.json").is_file():  # runs/<run>/evals-<variant>/
            return json.loads((p / "result.json").read_text())["metrics"], load_outcome_dir(p / "output")
        return load_metrics_doc(p)["metrics"], load_outcome_dir(p.parent)

    cfg = load_config(GateConfig, config or _default("gate.yaml"))
    cand_metrics, cand_items = read(candidate)
    live_metrics, live_items = read(live) if live else (None, None)
    return evaluate(cfg, cand_metrics, live_metrics, cand_items, live_items)


def gate(
    candidate: Path = typer.Option(
        ..., help="Candidate's metrics.json (per-item outcomes beside it) or a run's evals-<variant> folder."),
    live: Path | None = typer.Option(None, help="Live's metrics.json or evals-baseline folder (paired rules)."),
    config: Path | None = typer.Option(None, "--config", "-c", help="Gate YAML (default configs/gate.yaml)."),
    out: Path | None = typer.Option(None, help="Write the decision JSON here."),
) -> None:
    """Check the candidate against the gate rules; print every rule; exit 1 unless every rule
    passes (a rule that is inconclusive keeps live too)."""
    # lazy: a command imports what it runs (alignloop --help stays quick)
    from ground.config import ConfigError

    try:
        decision = _decide(config, str(candidate), str(live) if live else None)
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(decision.to_markdown())
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(decision.to_dict(), indent=2))
    raise typer.Exit(0 if decision.passed else 1)


def register(app: typer.Typer) -> None:
    """Add `eval ...`, `report` and `gate` to the `alignloop` app."""
    for name, suites, help_text in (
        ("quality", ("quality",), "Capability, policy compliance, preference accuracy, answer length (lm-eval)."),
        ("safety", ("safety",), "Attack block rate and benign over-block rate, per category."),
        ("perf", ("perf",), "Latency/throughput with vllm bench serve, plus cost at the SLO."),
        ("all", ("quality", "safety", "perf"), "All suites, then cost; one metrics.json."),
    ):
        eval_app.command(name, help=help_text)(_make_eval_command(suites, help_text))
    app.add_typer(eval_app, name="eval")
    app.command("report")(report)
    app.command("gate")(gate)
