"""The whole decision's operating characteristics (evals/oc.py), pinned per scenario.

Each test simulates per-item outcomes on an eval profile's real items and prompt families, with
the per-metric discordance and family correlation measured on real runs
(benchmarks/results/gate_oc_estimates.json), runs every rule of a shipped gate config for every
candidate (and every look of a sequential gate), and counts promotions over seeds. A rate is
checked by an exact binomial test at level 0.01 whose threshold is set so that a wrong rate fails:
``_at_most(count, n, 0.05)`` rejects a true 10% rate with the probability printed by
:func:`test_the_rate_checks_catch_a_wrong_rate` (and the power checks a true 70%). The bootstrap
runs 500 resamples here instead of the config's 2000 (speed); benchmarks/gate_oc.py runs the
shipped configs unchanged and BENCHMARKS.md has its table.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from scipy.stats import binom

from evals.gate import GateConfig
from evals.oc import Scenario, pooled_models, profile_items, run_scenario, scenarios
from ground.config import load_config

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
ESTIMATES = REPO / "benchmarks" / "results" / "gate_oc_estimates.json"
LEVEL = 0.01


def _gate(name: str, resamples: int = 500) -> GateConfig:
    cfg = load_config(GateConfig, REPO / "configs" / name)
    cfg.resamples = resamples
    return cfg


def _models(icc: float | None = None):
    return pooled_models(list(json.loads(ESTIMATES.read_text())["pairs"].values()), icc=icc)


def _scenario(name: str, cfg: GateConfig) -> Scenario:
    """The scenario named ``name`` exactly, else the one it begins."""
    found = scenarios(cfg)
    return next((s for s in found if s.name == name), None) or next(s for s in found if s.name.startswith(name))


def max_allowed(n: int, goal: float) -> int:
    """The largest count consistent with "rate <= goal": P(Bin(n, goal) > it) <= LEVEL."""
    return int(binom.ppf(1 - LEVEL, n, goal))


def min_allowed(n: int, goal: float) -> int:
    """The smallest count consistent with "rate >= goal": P(Bin(n, goal) < it) <= LEVEL."""
    return int(binom.ppf(LEVEL, n, goal))


def test_the_rate_checks_catch_a_wrong_rate() -> None:
    """With the seeds used below, a true 10% false-promotion rate fails the "<= 5%" check with
    probability over 0.6 at 200 seeds and 0.8 at 300, and a true 70% power fails the ">= 80%" one
    with probability over 0.6 at 200 seeds and 0.5 at 150."""
    assert binom.sf(max_allowed(300, 0.05), 300, 0.10) > 0.8
    assert binom.sf(max_allowed(200, 0.05), 200, 0.10) > 0.6
    assert binom.cdf(min_allowed(200, 0.80) - 1, 200, 0.70) > 0.6
    assert binom.cdf(min_allowed(150, 0.80) - 1, 150, 0.70) > 0.5


def test_a_lax_gate_fails_the_error_check() -> None:
    """The check is not a formality: a demo gate whose policy rule asks only "no worse" (a plausible
    misconfiguration) promotes a candidate with no true effect far more often than 5%, and the
    check says so."""
    cfg = _gate("gate-demo.yaml")
    for rule in cfg.rules:
        if rule.metric == "quality.policy.compliance":
            rule.test, rule.margin = "non_inferiority", 0.20
    items = profile_items(load_config_limit("evals-demo.yaml"))
    r = run_scenario(cfg, _scenario("no effect, with noise", cfg), items, _models(), range(200))
    assert r.false_promotions > max_allowed(200, 0.05), r


def load_config_limit(name: str) -> int | None:
    from evals.config import EvalsConfig

    return load_config(EvalsConfig, REPO / "configs" / name).quality.limit


@pytest.mark.parametrize("scenario,seeds", [
    ("identical", 100),  # an exact copy cannot pass policy superiority at all: few seeds suffice
    ("no effect, aligned + quantized", 300),
    ("policy +10; quantized copy", 300),  # it loses a task by more than the demo's margin
])
def test_demo_gate_rarely_promotes_what_is_not_better(scenario: str, seeds: int) -> None:
    items, cfg = profile_items(load_config_limit("evals-demo.yaml")), _gate("gate-demo.yaml")
    r = run_scenario(cfg, _scenario(scenario, cfg), items, _models(), range(seeds))
    assert r.false_promotions <= max_allowed(seeds, 0.05), r


def test_default_gate_rarely_promotes_either_of_two_candidates_with_no_effect() -> None:
    items = profile_items(load_config_limit("evals.yaml"))
    cfg = _gate("gate.yaml")
    r = run_scenario(cfg, _scenario("no effect, aligned + quantized", cfg), items, _models(), range(200))
    assert r.false_promotions <= max_allowed(200, 0.05), r


def test_default_gate_promotes_a_candidate_better_on_policy_and_equal_elsewhere() -> None:
    """Issue 22's goal: >= 80% with the families as measured (BENCHMARKS.md, "The whole decision",
    about 82%). A true rate of 70% fails this check (test_the_rate_checks_catch_a_wrong_rate)."""
    items = profile_items(load_config_limit("evals.yaml"))
    cfg = _gate("gate.yaml")
    r = run_scenario(cfg, _scenario("policy +10, equal elsewhere", cfg), items, _models(), range(200))
    assert r.promoted["aligned"] >= min_allowed(200, 0.80), r


def test_a_quantized_copy_in_the_run_costs_the_better_candidate_no_power() -> None:
    """Serial gatekeeping: aligned is tested at the whole error, so a quantized copy beside it
    leaves the decision's power at the single-candidate level (it was 52% under an equal split)."""
    items = profile_items(load_config_limit("evals.yaml"))
    cfg = _gate("gate.yaml")
    r = run_scenario(cfg, _scenario("policy +10, equal elsewhere; + quantized copy", cfg), items,
                     _models(), range(150))
    assert r.any_promoted >= min_allowed(150, 0.80), r
    assert r.false_promotions == 0, r
