"""The online rules' operating characteristics (evals/online.py, configs/online.yaml), checked on
fewer seeds than benchmarks/online_oc.py runs for BENCHMARKS.md, with a look every simulated
minute.

A rate is checked by an exact binomial test at level 0.01 (as tests/evals/test_decision_oc.py
does): "<= 5%" fails a count above the 99th percentile of Bin(n, 0.05), ">= 90%" a count below
the 1st percentile of Bin(n, 0.9). :func:`test_the_rate_checks_catch_a_wrong_rate` shows that a
procedure that peeks with a fixed-sample test fails the same "<= 5%" check.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import binom

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))
from online_oc import SCENARIOS, Traffic, run_scenario  # noqa: E402

from evals.online import OnlineConfig, mean_cs  # noqa: E402
from ground.config import load_config  # noqa: E402

LEVEL = 0.01


def _cfg(**canary) -> OnlineConfig:
    cfg = load_config(OnlineConfig, REPO / "configs" / "online.yaml")
    for k, v in canary.items():
        setattr(cfg.canary, k, v)
    return cfg


def max_allowed(n: int, goal: float) -> int:
    return int(binom.ppf(1 - LEVEL, n, goal))


def min_allowed(n: int, goal: float) -> int:
    return int(binom.ppf(LEVEL, n, goal))


def test_mean_cs_covers_at_every_look() -> None:
    """The bound of one release's mean holds at all 2000 looks at once in >= 95% of sequences
    (Bernoulli and a continuous [0, 1] variable), and narrows as data comes in."""
    rng = np.random.default_rng(0)
    misses = 0
    for i in range(200):
        x = rng.random(2000) < 0.1 if i % 2 else rng.beta(2, 6, 2000)
        mean = 0.1 if i % 2 else 0.25
        lo, hi = mean_cs(np.cumsum(x), np.arange(1, 2001), 0.05)
        misses += bool(np.any((lo > mean) | (hi < mean)))
    assert misses <= max_allowed(200, 0.05), misses
    lo, hi = mean_cs([10, 100], [100, 1000], 0.05)
    assert hi[1] - lo[1] < (hi[0] - lo[0]) / 2


def test_equal_canary_is_rarely_rolled_back() -> None:
    """A canary equal to live, checked every minute for 4 h: rolled back <= 5%."""
    n = 80
    r = run_scenario(_cfg(), Traffic(), SCENARIOS["equal"], range(1000, 1000 + n), minutes=240)
    assert r["counts"]["rollback"] <= max_allowed(n, 0.05), r


def test_canary_5_points_worse_is_rolled_back_within_6_hours() -> None:
    """Thumbs-down 15% vs live's 10% at 120 requests/min, share 0.25, 30% rated: rolled back
    >= 90% within 6 h (the documented traffic: about 3,000 rated canary answers)."""
    n = 60
    r = run_scenario(_cfg(), Traffic(), SCENARIOS["td+5"], range(2000, 2000 + n), minutes=360)
    assert r["counts"]["rollback"] >= min_allowed(n, 0.90), r


def test_canary_at_the_margin_is_rarely_promoted() -> None:
    """Thumbs-down worse by exactly the rule's margin (3 points): promoted <= 5%."""
    n = 60
    r = run_scenario(_cfg(), Traffic(), SCENARIOS["td+3"], range(3000, 3000 + n), minutes=240)
    assert r["counts"]["promote"] <= max_allowed(n, 0.05), r


def _monitor(procedure: str, n: int) -> dict:
    """The harshest peeking: an equal release watched every minute for 12 h with no promotion
    to end it (the post-promotion monitor's case)."""
    cfg = _cfg(min_duration_s=12 * 3600, max_duration_s=12 * 3600)
    return run_scenario(cfg, dataclasses.replace(Traffic(), rpm=60), SCENARIOS["equal"],
                        range(4000, 4000 + n), procedure, minutes=720)


def test_watching_all_day_stays_within_alpha() -> None:
    n = 60
    r = _monitor("anytime", n)
    assert r["counts"]["rollback"] <= max_allowed(n, 0.05), r


def test_the_rate_checks_catch_a_wrong_rate() -> None:
    """The same check fails a procedure that peeks every minute with a fixed-sample interval at
    the same per-rule alpha (its false rollbacks pile up over the looks), and a true 20% rate
    fails it with high probability at these seed counts (93% at n = 60)."""
    n = 60
    r = _monitor("fixed-n", n)
    assert r["counts"]["rollback"] > max_allowed(n, 0.05), r
    assert binom.sf(max_allowed(n, 0.05), n, 0.20) > 0.9  # 93% at n = 60


@pytest.mark.parametrize("n", [60, 80])
def test_power_checks_catch_a_wrong_rate(n: int) -> None:
    """A true 70% rollback rate fails the ">= 90%" check with high probability at these seed
    counts (94% at n = 60, 98% at n = 80)."""
    assert binom.cdf(min_allowed(n, 0.90) - 1, n, 0.70) > 0.9
