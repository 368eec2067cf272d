"""decide(), its summary and the serving-choice glue (flows/steps.py), on stored eval folders.

No servers: the eval stage folders a loop run leaves (result.json + per-item outcomes) are
written here as plain files, and decide() reads them exactly as it does after real evals.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from evals.gate import GateConfig, evaluate
from flows.loop_config import load_loop_config
from flows.steps import decide, serving_choice, summarize_decision

SLO = {"perf.slo.ttft_ms": 1000.0, "perf.slo.tpot_ms": 100.0}


def _perf(levels: dict[int, tuple[float, float]], workload: int) -> dict[str, float]:
    """Perf metrics as the suite writes them: a grid, and the headline at the workload's level."""
    m: dict[str, float] = {**SLO, "perf.failed": 0.0}
    for c, (tok_s, ttft) in levels.items():
        m |= {f"perf.grid.c{c}.output_tokens_per_s": tok_s, f"perf.grid.c{c}.ttft_p95_ms": ttft,
              f"perf.grid.c{c}.tpot_p95_ms": 50.0, f"perf.grid.c{c}.failed": 0.0}
    tok_s, ttft = levels[workload]
    m |= {"perf.ttft_p95_ms": ttft, "perf.tpot_p95_ms": 50.0, "perf.output_tokens_per_s": tok_s,
          "cost.usd_per_1m_output_tokens": 0.1 / (tok_s * 3600) * 1e6}
    return m


def _write_stage(run_dir: Path, variant: str, metrics: dict[str, float], wins: int, n: int = 80) -> None:
    """An eval stage folder: policy compliance per item (the candidate wins ``wins`` items)."""
    stage = run_dir / f"evals-{variant}"
    (stage / "output").mkdir(parents=True)
    rows = [{"metric": "quality.policy.compliance", "id": f"p{i}", "cluster": f"f{i // 2}",
             "value": 1.0 if i < wins else 0.0} for i in range(n)]
    (stage / "output" / "outcomes-quality.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (stage / "result.json").write_text(json.dumps({"metrics": metrics, "release_id": variant}))


@pytest.fixture
def gate_file(tmp_path: Path) -> Path:
    path = tmp_path / "gate.yaml"
    path.write_text("# test\nrules:\n"
                    "  - {name: policy, metric: quality.policy.compliance, test: superiority, margin: 0}\n"
                    "  - {name: ttft, metric: perf.ttft_p95_ms, op: '<=', ref_metric: perf.slo.ttft_ms}\n")
    return path


def _workload(c: int) -> dict:
    return {"concurrency": c, "usd_per_hour": 0.1, "slo": {"p95_ttft_ms": 1000, "p95_tpot_ms": 100},
            "source": "logs: test"}


def test_decide_promotes_the_cheapest_candidate_meeting_the_slo_at_the_workload(
    tmp_path: Path, gate_file: Path
) -> None:
    run = tmp_path / "runs" / "r"
    metrics = {
        "baseline": _perf({1: (30, 300), 8: (150, 800)}, 8),
        "aligned": _perf({1: (30, 300), 8: (160, 700)}, 8),
        "quantized": _perf({1: (60, 100), 8: (260, 600)}, 8),
    }
    _write_stage(run, "baseline", metrics["baseline"], wins=0)
    _write_stage(run, "aligned", metrics["aligned"], wins=40)
    _write_stage(run, "quantized", metrics["quantized"], wins=40)
    cfg = load_loop_config(None, [f"gate_file={gate_file}"])
    out = decide(cfg, run, metrics, {"baseline": "w8a8-int8", "aligned": "bf16", "quantized": "w8a8-int8"},
                 _workload(8))
    assert out["winner"] == "quantized"
    assert "cheapest meeting the SLO at concurrency 8" in out["summary"]
    gate = json.loads((run / "report" / "gate.json").read_text())
    assert gate["aligned"]["verdict"] == "pass" and gate["schemes"]["baseline"] == "w8a8-int8"
    assert "inconclusive" not in out["gate_md"] and Path(out["report_md"]).is_file()


def test_decide_keeps_live_when_a_rule_is_inconclusive(tmp_path: Path, gate_file: Path) -> None:
    run = tmp_path / "runs" / "r"
    metrics = {"baseline": _perf({4: (100, 500)}, 4), "aligned": _perf({4: (100, 500)}, 4)}
    _write_stage(run, "baseline", metrics["baseline"], wins=0)
    _write_stage(run, "aligned", metrics["aligned"], wins=3)  # 3 of 80 better: not enough
    cfg = load_loop_config(None, [f"gate_file={gate_file}"])
    out = decide(cfg, run, metrics, {"baseline": "bf16", "aligned": "bf16"}, _workload(4))
    assert out["winner"] is None
    assert out["summary"].startswith("keep the live release: aligned: policy inconclusive")
    assert "items would resolve" in out["gate_md"]


def test_slo_met_only_at_c1_does_not_pass_at_the_workloads_concurrency() -> None:
    """Live meets the SLO at c=8 (the workload); a candidate that meets it only at c=1 is not
    chosen by the serving choice, and fails the gate's SLO rule read at the workload's level."""
    live = _perf({1: (30, 300), 8: (150, 800)}, 8)
    cand = _perf({1: (40, 200), 8: (200, 1500)}, 8)
    choice = serving_choice({"baseline": live, "quantized": cand}, {"baseline": "bf16", "quantized": "w8a8-int8"},
                            ["quantized"], _workload(8))
    assert choice["chosen"] is None and "quantized" in choice["reason"] and "TTFT" in choice["reason"]
    rules = GateConfig.model_validate({"rules": [
        {"metric": "perf.ttft_p95_ms", "op": "<=", "ref_metric": "perf.slo.ttft_ms"}]})
    assert not evaluate(rules, cand, live).passed
    assert evaluate(rules, live, live).passed


def test_summary_never_says_cheapest_at_the_slo_when_no_variant_meets_it() -> None:
    choice = {"chosen": None, "workload": _workload(8),
              "reason": "no variant meets the SLO at concurrency 8: aligned: p95 TTFT 1500.0 ms > SLO 1000 ms"}
    winner, summary = summarize_decision({}, ["aligned", "quantized"], choice,
                                         {"aligned": 0.2, "quantized": 0.1})
    assert winner == "quantized"
    assert "no variant meets the SLO at concurrency 8" in summary
    assert "cheapest meeting the SLO" not in summary and "cheapest at the SLO" not in summary


def test_summary_with_one_passing_candidate_names_the_slo_it_met() -> None:
    choice = {"chosen": {"variant": "aligned"}, "workload": _workload(2), "reason": "..."}
    winner, summary = summarize_decision({}, ["aligned"], choice, {"aligned": 0.2})
    assert winner == "aligned" and summary == "promote aligned (passed every rule; meets the SLO at concurrency 2)"


@pytest.mark.parametrize(("override", "field"), [
    ("gate_file={bad_gate}", "gate_file"),
    ("evals_file={bad_evals}", "evals_file"),
    ("gate_file=nope.yaml", "gate_file"),
])
def test_run_validates_every_config_before_the_first_stage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, override: str, field: str
) -> None:
    """`alignloop run` loads the gate and eval configs up front: exit 2 naming the field, no run."""
    from flows.cli import app

    bad_gate = tmp_path / "gate.yaml"
    bad_gate.write_text("# bad\nrules:\n  - {metric: x, test: non_inferiority, margn: 0.05}\n")
    bad_evals = tmp_path / "evals.yaml"
    bad_evals.write_text("# bad\nperf:\n  repeats: 0\n")
    monkeypatch.setenv("ALIGNLOOP_HOME", str(tmp_path / "home"))
    res = CliRunner().invoke(app, ["run", override.format(bad_gate=bad_gate, bad_evals=bad_evals)])
    assert res.exit_code == 2, res.output
    assert field in res.output
    assert "margn" in res.output or "repeats" in res.output or "not found" in res.output
    assert not (tmp_path / "home" / "runs").exists()
