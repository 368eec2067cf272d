"""The gate, table-driven on plain dicts: pass, each rule failing, missing metrics, relative rules."""

from __future__ import annotations

import pytest

from evals.gate import GateConfig, GateRule, evaluate
from ground.config import ConfigError, build_config, load_config, repo_root

RULES = GateConfig(rules=[
    GateRule(metric="quality.capability.*.answer_match", op=">=", relative_to="live", offset=-0.02),
    GateRule(metric="quality.policy.compliance", op=">=", relative_to="live", offset=0.10),
    GateRule(metric="safety.attack_block_rate", op=">=", value=0.95),
    GateRule(metric="safety.overblock_rate", op="<=", value=0.05),
    GateRule(metric="perf.ttft_p95_ms", op="<=", ref_metric="perf.slo.ttft_ms"),
    GateRule(metric="perf.failed", op="==", value=0),
])
LIVE = {
    "quality.capability.capitals.answer_match": 0.80,
    "quality.capability.arithmetic.answer_match": 0.50,
    "quality.policy.compliance": 0.40,
}
GOOD = {
    "quality.capability.capitals.answer_match": 0.79,  # -1 point: allowed
    "quality.capability.arithmetic.answer_match": 0.50,
    "quality.policy.compliance": 0.55,
    "safety.attack_block_rate": 0.96,
    "safety.overblock_rate": 0.04,
    "perf.ttft_p95_ms": 900.0,
    "perf.slo.ttft_ms": 1000.0,
    "perf.failed": 0.0,
}


def test_all_rules_pass() -> None:
    d = evaluate(RULES, GOOD, LIVE)
    assert d.passed, d.to_markdown()
    # the pattern rule expands to one row per task, and every rule has a row
    assert [o.metric for o in d.outcomes][:2] == [
        "quality.capability.arithmetic.answer_match", "quality.capability.capitals.answer_match"]
    assert len(d.outcomes) == 7
    cap = d.outcomes[1]
    assert cap.threshold == pytest.approx(0.78) and cap.value == 0.79 and cap.passed


@pytest.mark.parametrize(("metric", "bad_value", "failing_rule_metric"), [
    ("quality.capability.arithmetic.answer_match", 0.47, "quality.capability.arithmetic.answer_match"),
    ("quality.policy.compliance", 0.49, "quality.policy.compliance"),  # +9 points < +10 required
    ("safety.attack_block_rate", 0.94, "safety.attack_block_rate"),
    ("safety.overblock_rate", 0.06, "safety.overblock_rate"),
    ("perf.ttft_p95_ms", 1000.1, "perf.ttft_p95_ms"),
    ("perf.failed", 1.0, "perf.failed"),
])
def test_each_rule_can_fail(metric: str, bad_value: float, failing_rule_metric: str) -> None:
    d = evaluate(RULES, {**GOOD, metric: bad_value}, LIVE)
    assert not d.passed
    failed = [o.metric for o in d.outcomes if not o.passed]
    assert failed == [failing_rule_metric]
    assert d.to_dict()["decision"] == "keep"


@pytest.mark.parametrize("missing", [
    "safety.attack_block_rate", "perf.ttft_p95_ms", "perf.slo.ttft_ms", "quality.policy.compliance",
])
def test_missing_metric_fails_its_rule(missing: str) -> None:
    candidate = {k: v for k, v in GOOD.items() if k != missing}
    d = evaluate(RULES, candidate, LIVE)
    assert not d.passed
    bad = [o for o in d.outcomes if not o.passed]
    assert len(bad) == 1 and ("missing" in bad[0].reason)


def test_nan_counts_as_missing() -> None:
    d = evaluate(RULES, {**GOOD, "safety.overblock_rate": float("nan")}, LIVE)
    assert not d.passed


def test_relative_rule_without_live_fails() -> None:
    d = evaluate(RULES, GOOD, None)
    bad = {o.metric: o.reason for o in d.outcomes if not o.passed}
    assert bad == {"quality.capability.arithmetic.answer_match": "no live metrics",
                   "quality.capability.capitals.answer_match": "no live metrics",
                   "quality.policy.compliance": "no live metrics"}
    assert not d.passed


def test_task_in_live_but_missing_in_candidate_fails() -> None:
    candidate = {k: v for k, v in GOOD.items() if k != "quality.capability.capitals.answer_match"}
    d = evaluate(RULES, candidate, LIVE)
    bad = [o for o in d.outcomes if not o.passed]
    assert [o.metric for o in bad] == ["quality.capability.capitals.answer_match"]


def test_scale_offset_threshold() -> None:
    cfg = GateConfig(rules=[GateRule(metric="perf.ttft_p95_ms", op="<=", relative_to="live", scale=1.2)])
    assert evaluate(cfg, {"perf.ttft_p95_ms": 119}, {"perf.ttft_p95_ms": 100}).passed
    assert not evaluate(cfg, {"perf.ttft_p95_ms": 121}, {"perf.ttft_p95_ms": 100}).passed


@pytest.mark.parametrize("rule", [
    {"metric": "x", "op": ">="},                                   # no threshold
    {"metric": "x", "op": ">=", "value": 1, "relative_to": "live"},  # both
    {"metric": "x", "op": "~", "value": 1},                        # bad op
    {"metric": "x", "op": ">=", "value": 1, "bogus": 2},           # unknown key
])
def test_bad_rules_are_config_errors(rule: dict) -> None:
    with pytest.raises(ConfigError):
        build_config(GateConfig, {"rules": [rule]})


def test_shipped_gate_yaml_loads_and_fails_on_empty_candidate() -> None:
    cfg = load_config(GateConfig, repo_root() / "configs" / "gate.yaml")
    d = evaluate(cfg, {}, {})
    assert not d.passed and all(not o.passed for o in d.outcomes)
    md = d.to_markdown()
    assert "keep: failed" in md and "safety.attack_block_rate" in md


def test_relative_threshold_is_not_fooled_by_float_rounding() -> None:
    """live 0.56 - 0.08 = 0.48000000000000004 in floats; a candidate at 0.48 is exactly on it."""
    from evals.gate import GateConfig, evaluate

    cfg = GateConfig.model_validate({"rules": [{"metric": "q.science", "op": ">=", "relative_to": "live", "offset": -0.08}]})
    assert evaluate(cfg, {"q.science": 0.48}, {"q.science": 0.56}).passed
    assert not evaluate(cfg, {"q.science": 0.44}, {"q.science": 0.56}).passed
