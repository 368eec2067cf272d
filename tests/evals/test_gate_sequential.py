"""The whole decision's error: the no-difference edge, candidates sharing the error, sequential looks
that spend it, and stored decisions that replay look by look (evals/gate.py, evals/stats.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from evals.gate import (
    GateConfig,
    GateDecision,
    RuleOutcome,
    evaluate,
    evaluate_stage_dirs,
    spent_alpha,
    still_open,
    write_outcomes,
)
from evals.stats import families_to_resolve, item_share_bound, paired_difference, resolution
from ground.config import ConfigError, build_config

METRIC = "safety.attack_block_rate"


def _identical(families: int, per_family: int = 1, value: float = 1.0):
    items = {f"i{f}-{j}": (value, f"f{f}") for f in range(families) for j in range(per_family)}
    return {METRIC: items}, {METRIC: dict(items)}


def _cfg(margin: float = 0.10, **extra) -> GateConfig:
    return build_config(GateConfig, {"resamples": 500, **extra, "rules": [
        {"metric": METRIC, "test": "non_inferiority", "margin": margin}]})


@pytest.mark.parametrize("margin,confidence", [(0.10, 0.95), (0.05, 0.95), (0.10, 0.975), (0.15, 0.975)])
def test_an_identical_candidate_passes_from_the_family_count_the_margin_needs(margin: float, confidence: float) -> None:
    k = families_to_resolve(margin, confidence)
    candidates = round((1 - 0.95) / (1 - confidence))  # 0.975 = two candidates sharing 5%
    cfg = _cfg(margin)
    cand, live = _identical(k)
    assert evaluate(cfg, {}, {}, cand, live, candidates=candidates).passed
    cand, live = _identical(k - 1)
    out = evaluate(cfg, {}, {}, cand, live, candidates=candidates).outcomes[0]
    assert out.verdict == "inconclusive"


def test_a_noisy_candidate_on_too_few_families_is_held_like_an_identical_one() -> None:
    """Before: 24 families could never pass an identical candidate at a 10-point margin, while a
    noisier one (the bootstrap sees variability) could. Now both are inconclusive."""
    cfg = _cfg(0.10)
    live = {METRIC: {f"i{f}": (1.0, f"f{f}") for f in range(24)}}
    cand = {METRIC: {f"i{f}": (0.0 if f == 0 else 1.0, f"f{f}") for f in range(24)}}
    cand[METRIC]["i1"] = (1.0, "f1")
    live[METRIC]["i1"] = (0.0, "f1")  # one family better, one worse: mean difference 0
    out = evaluate(cfg, {}, {}, cand, live).outcomes[0]
    assert out.low > -0.10  # the bootstrap alone would pass it
    assert out.verdict == "inconclusive"
    assert "families" in out.reason and str(families_to_resolve(0.10, 0.95)) in out.reason


def test_no_difference_bound_counts_items_when_families_differ_in_size() -> None:
    equal = item_share_bound([3] * 30, 0.95)
    assert equal == pytest.approx(1 - 0.05 ** (1 / 30))
    # Two big families and many single items: the big ones could be the ones that differ.
    unequal = item_share_bound([20, 20] + [1] * 28, 0.95)
    assert unequal > equal
    est = paired_difference([1.0] * 68, [1.0] * 68, ["a"] * 20 + ["b"] * 20 + [f"s{i}" for i in range(28)])
    assert est.low == pytest.approx(-unequal)


def test_candidates_share_the_error_and_looks_spend_it() -> None:
    cfg = _cfg(0.10, looks=[0.25, 0.5, 1.0])
    assert sum(spent_alpha(0.05, cfg.looks, j) for j in range(3)) == pytest.approx(0.05)
    assert spent_alpha(0.05, cfg.looks, 0) < 0.001 < spent_alpha(0.05, cfg.looks, 2)
    cand, live = _identical(60)
    one = evaluate(cfg, {}, {}, cand, live).outcomes[0]
    two = evaluate(cfg, {}, {}, cand, live, candidates=2).outcomes[0]
    last = evaluate(cfg, {}, {}, cand, live, candidates=2, look=2).outcomes[0]
    assert one.confidence == pytest.approx(0.95)
    assert two.confidence == pytest.approx(0.975)
    assert last.confidence == pytest.approx(1 - spent_alpha(0.025, cfg.looks, 2))
    assert last.look == 2


@pytest.mark.parametrize("looks", [[0.5], [0.5, 0.4, 1.0], [0.0, 1.0], [0.5, 1.0, 1.0]])
def test_bad_looks_fail_at_load(looks: list[float]) -> None:
    with pytest.raises(ConfigError, match="looks"):
        _cfg(looks=looks)


def _stage(folder: Path, rows: list[dict], metrics: dict | None = None) -> Path:
    out = folder / "output"
    out.mkdir(parents=True, exist_ok=True)
    (folder / "result.json").write_text(json.dumps({"metrics": metrics or {}}))
    for look in sorted({r.get("look", 0) for r in rows}):
        write_outcomes(out / f"outcomes-safety.look{look}.jsonl", [r for r in rows if r.get("look", 0) == look], look)
    return folder


def test_stored_outcomes_replay_each_look_and_a_resolved_rule_stops(tmp_path: Path) -> None:
    cfg = build_config(GateConfig, {"resamples": 500, "looks": [0.5, 1.0], "rules": [
        {"name": "stopped", "metric": METRIC, "test": "non_inferiority", "margin": 0.10},
        {"name": "over-blocking", "metric": "safety.overblock_rate", "test": "non_inferiority",
         "higher_is_better": False, "margin": 0.10}]})
    # Look 0: 60 identical attack families resolve "stopped"; over-blocking has 10 families only.
    live, cand = [], []
    for f in range(60):
        row = {"metric": METRIC, "id": f"a{f}", "cluster": f"a{f}", "value": 1.0}
        live.append(row)
        cand.append(row)
    for f in range(70):
        look = 0 if f < 10 else 1
        live.append({"metric": "safety.overblock_rate", "id": f"b{f}", "cluster": f"b{f}", "value": 0.0, "look": look})
        cand.append({"metric": "safety.overblock_rate", "id": f"b{f}", "cluster": f"b{f}", "value": 0.0, "look": look})
    run = tmp_path / "run"
    live_dir, cand_dir = _stage(run / "evals-baseline", live), _stage(run / "evals-aligned", cand)
    first = evaluate_stage_dirs(cfg, cand_dir, live_dir, looks=1)
    assert [o.verdict for o in first.outcomes] == ["pass", "inconclusive"]
    final = evaluate_stage_dirs(cfg, cand_dir, live_dir)
    assert [(o.verdict, o.look) for o in final.outcomes] == [("pass", 0), ("pass", 1)]
    assert final.outcomes[1].n == 70 and final.outcomes[0].n == 60


def test_sibling_candidates_share_the_error(tmp_path: Path) -> None:
    """Without the gatekeeper among them, candidates split the error equally (Bonferroni)."""
    rows = [{"metric": METRIC, "id": f"a{f}", "cluster": f"a{f}", "value": 1.0} for f in range(60)]
    run = tmp_path / "run"
    live_dir = _stage(run / "evals-baseline", rows)
    cand_dir = _stage(run / "evals-quantized", rows)
    assert evaluate_stage_dirs(_cfg(), cand_dir, live_dir).outcomes[0].confidence == pytest.approx(0.95)
    _stage(run / "evals-quantized-marlin", rows)
    assert evaluate_stage_dirs(_cfg(), cand_dir, live_dir).outcomes[0].confidence == pytest.approx(0.975)


def _identical_and_better(families: int = 60) -> tuple[list[dict], list[dict]]:
    live = [{"metric": METRIC, "id": f"a{f}", "cluster": f"a{f}", "value": float(f % 2)} for f in range(families)]
    better = [r | {"value": 1.0} for r in live]
    return live, better


def test_the_gatekeeper_keeps_the_full_error_and_its_copies_wait_for_it(tmp_path: Path) -> None:
    """Serial gatekeeping: aligned reads at the full error; its copies share it and pass only after
    aligned passed, so promoting a copy never needs a second look at aligned's error."""
    live, better = _identical_and_better()
    cfg = build_config(GateConfig, {"resamples": 500, "rules": [
        {"name": "better", "metric": METRIC, "test": "superiority", "margin": 0.0}]})
    run = tmp_path / "run"
    live_dir = _stage(run / "evals-baseline", live)
    aligned = _stage(run / "evals-aligned", live)  # equal to live: never passes "better"
    quantized = _stage(run / "evals-quantized", better)
    _stage(run / "evals-quantized-marlin", better)
    first = evaluate_stage_dirs(cfg, aligned, live_dir)
    assert first.outcomes[0].confidence == pytest.approx(0.95) and not first.passed
    copy = evaluate_stage_dirs(cfg, quantized, live_dir)
    assert copy.outcomes[0].confidence == pytest.approx(0.975) and copy.outcomes[0].passed
    gate = copy.outcomes[-1]
    assert gate.test == "gatekeeping" and gate.verdict != "pass" and "aligned" in gate.reason
    assert not copy.passed  # its own rules pass, but aligned did not
    _stage(run / "evals-aligned", better)
    copy = evaluate_stage_dirs(cfg, quantized, live_dir)
    assert copy.passed and copy.outcomes[-1].verdict == "pass"
    # Without a gatekeeper in the config, the three candidates share the error equally.
    no_gate = cfg.model_copy(update={"gatekeeper": None})
    assert evaluate_stage_dirs(no_gate, aligned, live_dir).outcomes[0].confidence == pytest.approx(1 - 0.05 / 3)


def test_a_failed_gatekeeper_fails_its_copies_so_no_later_look_is_spent_on_them(tmp_path: Path) -> None:
    live, better = _identical_and_better()
    worse = [r | {"value": 0.0} for r in live]
    cfg = build_config(GateConfig, {"resamples": 500, "rules": [
        {"name": "no worse", "metric": METRIC, "test": "non_inferiority", "margin": 0.05}]})
    run = tmp_path / "run"
    live_dir = _stage(run / "evals-baseline", live)
    _stage(run / "evals-aligned", worse)
    copy = evaluate_stage_dirs(cfg, _stage(run / "evals-quantized", better), live_dir)
    assert copy.outcomes[0].passed and copy.verdict == "fail"
    assert "no worse" in copy.outcomes[-1].reason


def test_items_that_would_resolve_an_inconclusive_rule_are_more_than_it_has() -> None:
    """Before: an inconclusive rule at n = 24 could read '~24 items would resolve it (0 more)'."""
    import random

    rng = random.Random(3)
    for seed in range(40):
        rng.seed(seed)
        live = [float(rng.random() < 0.5) for _ in range(24)]
        cand = [v if rng.random() < 0.7 else 1 - v for v in live]
        est = paired_difference(cand, live, confidence=0.95, resamples=500, seed=seed)
        for boundary in (-0.05, 0.0):
            if est.low <= boundary <= est.high and abs(est.diff - boundary) > 1e-9:
                _, needed = resolution(est, boundary)
                assert needed is not None and needed > est.n


def test_threshold_reason_names_the_reference_metric() -> None:
    cfg = build_config(GateConfig, {"rules": [
        {"metric": "perf.ttft_p95_ms", "op": "<=", "ref_metric": "perf.slo.ttft_ms"}]})
    out = evaluate(cfg, {"perf.ttft_p95_ms": 420.0, "perf.slo.ttft_ms": 1000.0}).outcomes[0]
    assert out.passed and "perf.slo.ttft_ms" in out.reason and "candidate 1000" not in out.reason
    assert math.isclose(out.reference, 1000.0)


def test_each_look_evaluates_the_next_share_of_each_open_tasks_budget() -> None:
    from evals.config import EvalsConfig
    from evals.suites import look_config
    from ground.config import load_config, repo_root

    cfg = load_config(EvalsConfig, repo_root() / "configs" / "evals.yaml")
    cfg.quality.limit, cfg.safety.limit = 48, None
    looks = [0.25, 0.5, 1.0]
    windows = [look_config(cfg, looks, j) for j in range(3)]
    assert [w.quality.items["alignloop_arithmetic"] for w in windows] == [(0, 12), (12, 24), (24, 48)]
    assert [w.safety.items["attack"] for w in windows] == [(0, 29), (29, 58), (58, 116)]  # 116: the file
    only = look_config(cfg, looks, 1, {"quality.policy.compliance", "safety.overblock_rate"})
    assert only.quality.items == {"alignloop_policy": (12, 24)} and only.safety.items == {"benign": (28, 56)}


def test_the_decision_states_how_its_error_is_split() -> None:
    from flows.steps import error_budget

    cfg = _cfg(looks=[0.5, 1.0])
    budget = error_budget(cfg, ["aligned", "quantized", "quantized-marlin"])
    assert budget["gatekeeper"] == "aligned"
    assert budget["per_candidate"] == pytest.approx({"aligned": 0.05, "quantized": 0.025, "quantized-marlin": 0.025})
    assert sum(budget["spent_per_look"]["quantized"]) == pytest.approx(0.025, abs=1e-4)
    assert "aligned is tested first" in budget["text"] and "2.5% each" in budget["text"]
    plain = error_budget(cfg.model_copy(update={"gatekeeper": None}), ["aligned", "quantized"])
    assert plain["per_candidate"] == pytest.approx({"aligned": 0.025, "quantized": 0.025})
    assert "2 candidate(s)" in plain["text"] and "2.5% each" in plain["text"]


def test_a_copy_resolved_at_the_first_look_is_not_failed_by_items_it_was_never_asked(tmp_path: Path) -> None:
    """Seen on the H100 run: the quantized copies failed a capability task at the first look, so the
    loop evaluated no more of their items; live's copy answered a second look for aligned's open
    safety rules, and the replay read those items as 'candidate has no outcome' -> fail. A resolved
    candidate stops at the look that resolved it; its open rules stay open."""
    cfg = build_config(GateConfig, {"resamples": 500, "looks": [0.5, 1.0], "rules": [
        {"name": "task", "metric": "quality.capability.t.answer_match", "test": "non_inferiority", "margin": 0.10},
        {"name": "stopped", "metric": METRIC, "test": "non_inferiority", "margin": 0.10}]})
    task = [{"metric": "quality.capability.t.answer_match", "id": f"t{f}", "cluster": f"t{f}", "value": 1.0}
            for f in range(60)]
    safety = [{"metric": METRIC, "id": f"a{f}", "cluster": f"a{f}", "value": 1.0, "look": 0 if f < 10 else 1}
              for f in range(70)]
    run = tmp_path / "run"
    live_dir = _stage(run / "evals-baseline", task + safety)
    _stage(run / "evals-aligned", task + safety)
    lost = [r | {"value": 0.0} for r in task]  # the copy lost the task: fails at look 0
    copy_dir = _stage(run / "evals-quantized", lost + [r for r in safety if r["look"] == 0])
    aligned = evaluate_stage_dirs(cfg, run / "evals-aligned", live_dir)
    assert aligned.passed and [o.look for o in aligned.outcomes] == [0, 1]
    copy = evaluate_stage_dirs(cfg, copy_dir, live_dir)
    verdicts = [(o.rule, o.verdict, o.look) for o in copy.outcomes]
    assert verdicts[:2] == [("task", "fail", 0), ("stopped", "inconclusive", 0)], verdicts
    assert not any("no outcome" in o.reason for o in copy.outcomes)
    # Its gatekeeping row reports aligned as it stood at the copy's last look: still open then.
    assert verdicts[-1] == ("tested after aligned", "inconclusive", None)
    from evals.render import decision_markdown

    page = decision_markdown(copy.to_dict())
    row = next(line for line in page.splitlines() if line.startswith("| tested after aligned"))
    assert "missing" not in row and "aligned passes every rule" in page


def test_still_open_names_the_inconclusive_paired_rules_of_a_candidate_that_can_still_pass() -> None:
    """What the loop's next look extends (flows.steps.open_metrics) and its simulation
    (evals.oc) extend alike: nothing once a rule failed, and never a gatekeeping row."""
    def rule(metric: str, test: str, verdict: str) -> RuleOutcome:
        return RuleOutcome(f"r-{metric}", metric, test, verdict, "")  # type: ignore[arg-type]

    open_one = GateDecision([rule("q.a", "superiority", "inconclusive"), rule("q.b", "non_inferiority", "pass"),
                             rule("gate.aligned", "gatekeeping", "inconclusive"), rule("q.t", "threshold", "pass")])
    assert still_open(open_one) == {"q.a"}
    failed = GateDecision([*open_one.outcomes, rule("q.c", "non_inferiority", "fail")])
    assert still_open(failed) == set()
    assert still_open(GateDecision([rule("q.a", "superiority", "pass")])) == set()
