"""The gate's operating characteristics, on seeded simulated per-item outcomes (pure Python, fast).

Each scenario draws paired 0/1 outcomes for live and a candidate whose true difference is known,
runs the shipped rule kinds through :func:`evals.gate.evaluate`, and counts decisions over seeds:
- a candidate truly worse by the margin is kept (rule not passed) in >= 95% of seeds;
- a candidate truly better by twice the margin is promoted in >= 80% of seeds;
- a candidate equal to live is promoted by a superiority rule in <= 5% of seeds.
Sizes are those of the default eval profile (400 items, clusters of two like the capitals set).

A rule tested at exactly its boundary is wrong about 1 - confidence of the time *by design*, so
the share seen over a finite set of seeds scatters around 5% (200 seeds: +-1.5 points). Each
check therefore asks whether the observed count is consistent with the goal: an exact binomial
test must not reject "promoted in <= 5%" (or "promoted in >= 80%") at level 0.01. A gate whose
true rate were 10% (or whose power were 65%) fails these checks. Measured with 1,000 seeds
(`python` on this file's helpers): non-inferiority at the margin promoted 5.5%, superiority on an
equal candidate 4.8%, superiority on a candidate better by twice the margin 86.4%.
"""

from __future__ import annotations

import random

import pytest

from evals.gate import GateConfig, evaluate
from ground.config import load_config, repo_root

N = 400
SEEDS = 200
MARGIN = 0.05


def _paired(seed: int, n: int, p_live: float, disc: float, delta: float, cluster_size: int = 2):
    """Live ~ Bernoulli(p_live); the candidate differs on a share ``disc`` of items, with mean
    difference ``delta`` (p10 - p01 = delta, p10 + p01 = disc). Pairs of items share a cluster
    and a common shock, so clusters are not independent noise."""
    rng = random.Random(seed)
    p10, p01 = (disc + delta) / 2, (disc - delta) / 2
    assert p10 >= 0 and p01 >= 0
    live, cand, clusters = {}, {}, {}
    for i in range(n):
        c = i // cluster_size
        u = rng.random()
        lv = float(rng.random() < p_live)
        if u < p10:  # candidate right, live wrong
            lv, cv = 0.0, 1.0
        elif u < p10 + p01:  # candidate wrong, live right
            lv, cv = 1.0, 0.0
        else:
            cv = lv
        item = f"item-{i:04d}"
        live[item], cand[item], clusters[item] = lv, cv, f"c{c}"
    metric = "quality.capability.sim.answer_match"
    return ({metric: {k: (v, clusters[k]) for k, v in cand.items()}},
            {metric: {k: (v, clusters[k]) for k, v in live.items()}})


def _rule(test: str, margin: float) -> GateConfig:
    return GateConfig.model_validate({"resamples": 1000, "rules": [
        {"metric": "quality.capability.sim.answer_match", "test": test, "margin": margin}]})


def _share_passed(cfg: GateConfig, disc: float, delta: float, n: int = N) -> float:
    passed = 0
    for seed in range(SEEDS):
        cand, live = _paired(seed, n, 0.6, disc, delta)
        passed += evaluate(cfg, {}, {}, cand, live).passed
    return passed / SEEDS


def _consistent_with_at_most(share: float, goal: float) -> bool:
    from scipy.stats import binomtest

    return binomtest(round(share * SEEDS), SEEDS, goal, alternative="greater").pvalue > 0.01


def _consistent_with_at_least(share: float, goal: float) -> bool:
    from scipy.stats import binomtest

    return binomtest(round(share * SEEDS), SEEDS, goal, alternative="less").pvalue > 0.01


def test_non_inferiority_keeps_a_candidate_worse_by_the_margin() -> None:
    promoted = _share_passed(_rule("non_inferiority", MARGIN), disc=0.15, delta=-MARGIN)
    assert _consistent_with_at_most(promoted, 0.05), f"kept {1 - promoted:.1%}"


def test_non_inferiority_promotes_a_candidate_better_by_twice_the_margin() -> None:
    promoted = _share_passed(_rule("non_inferiority", MARGIN), disc=0.15, delta=2 * MARGIN)
    assert promoted >= 0.80, promoted


def test_superiority_promotes_a_candidate_better_by_twice_the_margin() -> None:
    promoted = _share_passed(_rule("superiority", MARGIN), disc=0.15, delta=2 * MARGIN)
    assert _consistent_with_at_least(promoted, 0.80), promoted


def test_superiority_rarely_promotes_a_candidate_equal_to_live() -> None:
    promoted = _share_passed(_rule("superiority", 0.0), disc=0.15, delta=0.0)
    assert _consistent_with_at_most(promoted, 0.05), promoted


def test_equal_candidate_on_few_items_is_inconclusive_not_promoted() -> None:
    """24 items (the CPU demo's profile) cannot resolve a 5-point margin: inconclusive, and the
    decision says how many items would."""
    cand, live = _paired(3, 24, 0.6, 0.15, 0.0)
    d = evaluate(_rule("non_inferiority", MARGIN), {}, {}, cand, live)
    (o,) = d.outcomes
    assert o.verdict == "inconclusive" and d.verdict == "inconclusive" and not d.passed
    assert o.mde > MARGIN and "detectable at this n" in o.reason


def test_clearly_worse_candidate_fails() -> None:
    cand, live = _paired(1, N, 0.6, 0.3, -0.25)
    (o,) = evaluate(_rule("non_inferiority", MARGIN), {}, {}, cand, live).outcomes
    assert o.verdict == "fail" and o.high < -MARGIN


def test_shipped_gate_rules_are_paired_where_they_compare_quality_and_safety() -> None:
    cfg = load_config(GateConfig, repo_root() / "configs" / "gate.yaml")
    kinds = {r.metric: r.test for r in cfg.rules}
    for metric, test in kinds.items():
        if metric.startswith(("quality.", "safety.")) and metric != "safety.errors":
            assert test in ("non_inferiority", "superiority"), metric
    assert kinds["quality.policy.compliance"] == "superiority"


@pytest.mark.parametrize("rule", [
    {"metric": "x", "test": "non_inferiority"},                                 # no margin
    {"metric": "x", "test": "superiority", "margin": 0.1, "op": ">="},          # threshold key
    {"metric": "x", "test": "non_inferiority", "margin": 0.1, "confidence": 1.5},
    {"metric": "x", "test": "paired", "margin": 0.1},                           # unknown test
    {"metric": "x", "op": ">=", "value": 1, "margin": 0.1},                     # margin on threshold
])
def test_bad_paired_rules_fail_at_load(rule: dict) -> None:
    from ground.config import ConfigError, build_config

    with pytest.raises(ConfigError):
        build_config(GateConfig, {"rules": [rule]})


def test_superiority_the_randomization_test_holds_back_says_so() -> None:
    """Better on 3 of 24 single-item clusters and equal elsewhere: the bootstrap's lower bound
    clears 0 (a resample without any of the 3 is rarer than 5%), but the exact sign-flip test
    cannot go below p = 1/8. The verdict is inconclusive, and the reason names the test that held
    it back instead of claiming the bounds straddle the boundary."""
    metric = "quality.capability.sim.answer_match"
    live = {f"i{k:02d}": (float(k % 2), f"c{k}") for k in range(24)}
    cand = {k: ((1.0 if k in ("i00", "i02", "i04") else v), c) for k, (v, c) in live.items()}
    (o,) = evaluate(_rule("superiority", 0.0), {}, {}, {metric: cand}, {metric: live}).outcomes
    assert o.low > 0, o  # the bootstrap alone would have passed it
    assert o.verdict == "inconclusive"
    assert "sign-flip randomization test does not" in o.reason and "straddle" not in o.reason
