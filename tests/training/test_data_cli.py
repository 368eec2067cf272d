"""`alignloop data build|simulate` through typer (the commands of flows/cli_data.py)."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from typer.testing import CliRunner

from flows.cli_data import register
from flows.simulate import SimulateConfig
from ground.config import load_config
from ground.logstore import ExchangeRecord, LogStore

REPO = Path(__file__).resolve().parents[2]


def app() -> typer.Typer:
    root = typer.Typer()
    root.callback()(lambda: None)
    register(root)
    return root


def test_data_build_cli(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'logs.db'}"
    db = LogStore(url)
    db.log_exchange(
        ExchangeRecord(
            id="a",
            tenant="t",
            messages=[{"role": "user", "content": "Is it free?"}],
            response="Yes.",
        )
    )
    db.flush()
    db.add_feedback("a", "t", "rating", {"score": 5})
    db.close()
    runner = CliRunner()
    args = [
        "data",
        "build",
        "-c",
        str(REPO / "configs/data.yaml"),
        f"logstore.url={url}",
        f"run_dir={tmp_path / 'run'}",
        "governance.heldout_fraction=0",
        "trust.tenants=[t]",  # participation is per tenant
        f"ledger.path={tmp_path / 'ledger'}",
        "ledger.min_new_rows=1",
    ]
    res = runner.invoke(app(), args)
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["counts"]["sft"] == 1
    quiet = runner.invoke(app(), [
        "data", "build", f"logstore.url={url}", "logstore.since=2999-01-01T00:00:00Z",
        f"ledger.path={tmp_path / 'ledger-quiet'}", f"run_dir={tmp_path / 'quiet'}",
    ])
    assert quiet.exit_code == 0, quiet.output  # a quiet window is not an error
    assert json.loads(quiet.stdout)["skip_reason"].startswith("skipped: not enough new feedback")
    bad = runner.invoke(app(), ["data", "build", "governance.ngram=zero"])
    assert bad.exit_code == 1 and "governance.ngram" in bad.output


def test_shipped_demo_config_loads() -> None:
    cfg = load_config(SimulateConfig, REPO / "configs/demo.yaml")
    assert cfg.api_key == "sk-alignloop-demo" and cfg.max_tokens <= 96
