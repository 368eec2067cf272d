"""The windows so far, read back from run folders: the trend artifact's rows and the demo's table.

The gate documents are made with evals.gate's own ``GateDecision.to_dict`` (what the report step
writes), so a renamed field there breaks this test. No Prefect, no model.
"""

from __future__ import annotations

import json
from pathlib import Path

from evals.gate import GateDecision, RuleOutcome
from flows.demo import windows_table
from flows.window import history, trend_rows


def a_run(runs: Path, name: str, until: str, *, skipped: bool = False, promoted: str | None = None) -> None:
    run = runs / name
    (run / "data").mkdir(parents=True)
    (run / "data" / "result.json").write_text(json.dumps(
        {"dataset_version": f"ds-{name}", "new_examples": 0 if skipped else 12, "counts": {"sft": 9, "heldout_sft": 2}}))
    outcome = {"window": ["2026-11-01 00:00:00+00:00", until], "skipped": skipped,
               "decision": "skipped: not enough new feedback (0 new < 8)" if skipped else "promote aligned",
               "winner": None if skipped else "aligned", "start": "retrain from the base model embedded",
               "promotion": {"release_id": promoted} if promoted else None}
    (run / "loop-result.json").write_text(json.dumps(outcome))
    if skipped:
        return
    decision = GateDecision([
        RuleOutcome("capability per task", f"quality.capability.{task}.answer_match", "non_inferiority",
                    "pass", "", value=0.5, reference=0.45, diff=0.05, low=-0.02, high=0.12, n=24)
        for task in ("arith", "facts")
    ] + [RuleOutcome("no failed requests", "perf.failed", "threshold", "pass", "", value=-0.0, reference=0.0)])
    (run / "report").mkdir()
    (run / "report" / "gate.json").write_text(json.dumps({"aligned": decision.to_dict(), "winner": "aligned"}))


def test_history_is_in_window_order_and_the_trend_names_pattern_rules_apart(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    a_run(runs, "w-b", "2026-11-03 00:00:00+00:00", skipped=True)
    a_run(runs, "w-a", "2026-11-02 00:00:00+00:00", promoted="rel-a")
    (runs / "w-c" / "data").mkdir(parents=True)  # started, never finished: not in the history

    done = history(runs)
    assert [r["run_id"] for r in done] == ["w-a", "w-b"]
    assert done[0]["rows"] == {"sft": 9} and done[1]["skipped"] and done[1]["rules"] == []

    rows = trend_rows(done)
    assert rows[0]["now live"] == "rel-a" and rows[1]["now live"] == "(unchanged)"
    assert rows[0]["capability per task: quality.capability.arith.answer_match"].startswith("0.5 vs 0.45 (+0.050) pass")
    assert "capability per task: quality.capability.facts.answer_match" in rows[0]
    assert rows[0]["no failed requests"] == "0 vs 0 pass"  # one outcome: the rule's name; -0.0 prints as 0
    assert rows[1]["decision"].startswith("skipped: not enough new feedback")

    table = windows_table(done).splitlines()
    assert len(table) == 4 and table[0].startswith("| window | decision |") and "| w-b |" in table[3]
