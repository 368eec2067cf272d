"""Paired statistics for the gate: candidate and live scored on the same items.

The gate never compares two point estimates. For each paired rule it takes the per-item outcomes
of both releases (binary: answered right, stopped; or a score in [0, 1]), pairs them by item id
and estimates the mean difference with an interval:

- :func:`paired_difference`: the mean of ``candidate - live`` and its one-sided bounds at
  ``confidence`` from ``scipy.stats.bootstrap`` (BCa, paired). Items of one prompt family (a
  *cluster*: one FAQ entry asked six ways, one country asked in both directions) move together:
  the bootstrap resamples whole clusters and the statistic is the ratio of the resampled sums, so
  near-duplicate items do not count as independent evidence.
- When no cluster differs at all (every pair agrees), a bootstrap has no variability to resample
  and would claim certainty; the bound then comes from the exact (Clopper-Pearson) upper bound on
  the share of clusters that could differ, ``scipy.stats.binomtest(0, k)``.
- Binary outcomes also get the exact McNemar p-value (``scipy.stats.binomtest`` on the discordant
  pairs), shown beside the interval.
- :func:`resolution`: the minimum detectable effect at the current n and the items that would
  resolve an inconclusive rule, from the bootstrap standard error and normal quantiles (the usual
  ``n = ((z_conf + z_power) * sd / effect)^2`` planning formula, scaled from the n at hand).

Measured operating characteristics of the bootstrap bound (tests/evals/test_gate_stats.py and the
sizing notes in configs/gate.yaml): at 100-400 pairs its one-sided error is within about one
point of nominal; at 50 pairs with few discordant pairs it reached ~9%, which is one reason the
shipped eval sets are sized in the hundreds and small runs mostly end "inconclusive".
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class PairedEstimate:
    """Mean paired difference ``candidate - live`` with one-sided bounds at ``confidence``."""

    n: int
    """Paired items."""
    clusters: int
    """Independent units the interval resamples (prompt families; = n when items are unrelated)."""
    candidate_mean: float
    live_mean: float
    diff: float
    low: float
    """One-sided lower bound at ``confidence``."""
    high: float
    """One-sided upper bound at ``confidence``."""
    se: float
    """Standard error of ``diff`` (bootstrap over clusters)."""
    confidence: float
    method: str
    better: int | None = None
    """Binary outcomes: pairs where only the candidate succeeded."""
    worse: int | None = None
    """Binary outcomes: pairs where only live succeeded."""
    mcnemar_p: float | None = None
    """Binary outcomes: exact two-sided McNemar p-value (binomial test on the discordant pairs)."""

    def to_dict(self) -> dict:
        return asdict(self)


def _cluster_sums(
    diffs: Sequence[float], clusters: Sequence[str] | None
) -> tuple[list[float], list[int]]:
    if clusters is None:
        return list(diffs), [1] * len(diffs)
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for d, c in zip(diffs, clusters, strict=True):
        sums[c] = sums.get(c, 0.0) + d
        counts[c] = counts.get(c, 0) + 1
    return list(sums.values()), list(counts.values())


def paired_difference(
    candidate: Sequence[float],
    live: Sequence[float],
    clusters: Sequence[str] | None = None,
    confidence: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
) -> PairedEstimate:
    """Mean of ``candidate[i] - live[i]`` with one-sided bounds at ``confidence``.

    Args:
        candidate: per-item outcome of the candidate (0/1 or a score).
        live: the same items' outcomes for live, in the same order.
        clusters: per-item family label; items of one family are resampled together.
        confidence: one-sided confidence of each bound (0.95: the two bounds form a 90% interval).
        resamples: bootstrap resamples.
        seed: bootstrap seed (the decision is reproducible).
    """
    # lazy: numpy, the statistics only; scipy, the statistics only
    import numpy as np
    from scipy import stats

    if len(candidate) != len(live):
        raise ValueError(f"paired outcomes differ in length: {len(candidate)} vs {len(live)}")
    if not candidate:
        raise ValueError("no paired items")
    if not 0.5 < confidence < 1:
        raise ValueError(f"confidence must be in (0.5, 1), got {confidence}")
    cand = np.asarray(candidate, dtype=float)
    ref = np.asarray(live, dtype=float)
    diffs = cand - ref
    n = len(diffs)
    sums, counts = _cluster_sums(diffs.tolist(), clusters)
    d_c, n_c = np.asarray(sums), np.asarray(counts, dtype=float)
    k = len(d_c)
    diff = float(diffs.mean())

    binary = bool(np.isin(cand, (0.0, 1.0)).all() and np.isin(ref, (0.0, 1.0)).all())
    better = worse = None
    mcnemar_p = None
    if binary:
        better, worse = int((diffs > 0).sum()), int((diffs < 0).sum())
        if better + worse:
            mcnemar_p = float(stats.binomtest(better, better + worse, 0.5).pvalue)
        else:
            mcnemar_p = 1.0

    per_item = d_c / n_c
    if np.all(per_item == per_item[0]):
        # Every cluster moved by the same amount (usually: every pair agrees). The data show no
        # variability, not certainty: bound the share of items that could differ and let each of
        # them move by the largest possible step.
        u = item_share_bound(counts, confidence)
        step = 1.0 + abs(diff)
        return PairedEstimate(
            n, k, float(cand.mean()), float(ref.mean()), diff, max(-1.0, diff - u * step),
            min(1.0, diff + u * step), u * step / 2, confidence,
            f"no differing cluster: exact bound on the share of items that could differ (0 of {k} families)",
            better, worse, mcnemar_p,
        )

    def ratio(d, m, axis=-1):
        return d.sum(axis=axis) / m.sum(axis=axis)

    level = 1 - 2 * (1 - confidence)  # two-sided level whose ends are the one-sided bounds
    method = "BCa"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # degenerate resamples warn; handled below
        res = stats.bootstrap(
            (d_c, n_c), ratio, paired=True, vectorized=True, n_resamples=resamples,
            confidence_level=level, method="BCa", rng=np.random.default_rng(seed),
        )
        low, high = res.confidence_interval
        if not (math.isfinite(low) and math.isfinite(high)):
            method = "percentile"
            res = stats.bootstrap(
                (d_c, n_c), ratio, paired=True, vectorized=True, n_resamples=resamples,
                confidence_level=level, method="percentile", rng=np.random.default_rng(seed),
            )
            low, high = res.confidence_interval
    unit = "cluster" if k < n else "paired"
    return PairedEstimate(
        n, k, float(cand.mean()), float(ref.mean()), diff, float(low), float(high),
        float(res.standard_error), confidence, f"{unit} bootstrap ({method}, {resamples} resamples)",
        better, worse, mcnemar_p,
    )


def item_share_bound(cluster_sizes: Sequence[int], confidence: float) -> float:
    """Upper bound, at ``confidence``, on the share of *items* that could differ when none of
    ``len(cluster_sizes)`` families did.

    The exact (Clopper-Pearson) bound ``u`` on the share of families that could differ, 0 of k
    observed, becomes a bound on the item mean by letting the largest families be the ones that
    differ: with equal sizes that is ``u`` itself; with unequal sizes it is the item share of the
    ``u * k`` largest families (the worst case the observed sizes allow, no wider).
    """
    # lazy: scipy, the statistics only
    from scipy import stats

    sizes = sorted((int(s) for s in cluster_sizes), reverse=True)
    k = len(sizes)
    u = float(stats.binomtest(0, k, alternative="less").proportion_ci(confidence_level=confidence).high)
    whole, part = divmod(u * k, 1.0)
    covered = sum(sizes[: int(whole)]) + (part * sizes[int(whole)] if int(whole) < k else 0.0)
    return min(1.0, covered / sum(sizes))


def families_to_resolve(margin: float, confidence: float) -> int:
    """The fewest equal-sized families at which a candidate identical to live can pass a
    non-inferiority ``margin``: below it, the exact no-difference bound is wider than the margin."""
    if not 0 < margin < 1:
        raise ValueError(f"margin must be in (0, 1), got {margin}")
    return math.floor(math.log(1 - confidence) / math.log(1 - margin)) + 1


def sign_flip_p(
    candidate: Sequence[float], live: Sequence[float], clusters: Sequence[str] | None = None,
    resamples: int = 2000, seed: int = 0,
) -> float:
    """One-sided p-value that the candidate is better than live, by a paired randomization test.

    Under "no difference" the labels candidate/live are exchangeable within a pair, so flipping
    the sign of whole clusters' differences (``scipy.stats.permutation_test``, paired samples)
    gives the null distribution exactly: a superiority verdict at margin 0 that needs this
    p below ``1 - confidence`` is wrong at most that often, whatever n.
    """
    # lazy: numpy, the statistics only; scipy, the statistics only
    import numpy as np
    from scipy import stats

    diffs = (np.asarray(candidate, dtype=float) - np.asarray(live, dtype=float)).tolist()
    sums, counts = _cluster_sums(diffs, clusters)
    d = np.asarray(sums)
    if not np.any(d):
        return 1.0
    res = stats.permutation_test(
        (d, np.zeros_like(d)), lambda x, y, axis=-1: (x - y).mean(axis=axis),
        permutation_type="samples", vectorized=True, n_resamples=resamples, alternative="greater",
        rng=np.random.default_rng(seed),
    )
    return float(res.pvalue)


def z_sum(confidence: float, power: float) -> float:
    """``z_confidence + z_power``: how many standard errors an effect must be from a boundary."""
    # lazy: scipy, the statistics only
    from scipy.stats import norm

    return float(norm.ppf(confidence) + norm.ppf(power))


def items_needed(sd: float, effect: float, confidence: float = 0.95, power: float = 0.8) -> int:
    """Paired items (or clusters) for a one-sided test at ``confidence`` to detect ``effect``
    with ``power`` when one item's difference has standard deviation ``sd``."""
    if effect <= 0:
        raise ValueError("effect must be > 0")
    return math.ceil((z_sum(confidence, power) * sd / effect) ** 2)


def resolution(
    est: PairedEstimate, boundary: float, power: float = 0.8, exact_p: float | None = None
) -> tuple[float, int | None]:
    """What this n can resolve around ``boundary`` (the rule's threshold on the difference).

    Returns:
        (minimum detectable effect: the distance from the boundary that the current n detects
        with ``power``; items needed to resolve the observed difference, or None when it sits on
        the boundary, where no n resolves it). The items needed come from the bound that decides:
        the lower bound when the difference lies on the passing side, the upper one otherwise,
        whose distance from the difference shrinks as 1/sqrt(n); when the exact sign-flip test
        (``exact_p``) held a cleared bound back, from that test's z at this n. So whenever the rule
        is inconclusive, the number is more than the items it already has.
    """
    # lazy: scipy, the statistics only
    from scipy.stats import norm

    z = z_sum(est.confidence, power)
    mde = z * est.se
    distance = est.diff - boundary
    if est.se <= 0 or abs(distance) < 1e-9:
        return mde, None
    width = est.diff - est.low if distance > 0 else est.high - est.diff
    scale = (width / abs(distance)) ** 2 if width > 0 else 0.0
    if exact_p is not None and distance > 0 and exact_p >= 1 - est.confidence and exact_p < 0.5:
        scale = max(scale, (norm.ppf(est.confidence) / norm.ppf(1 - exact_p)) ** 2)
    needed = max(est.n, math.ceil(est.n * scale))
    if scale >= 1:  # the deciding bound has not cleared the boundary: at least one more item
        needed = max(needed, est.n + 1)
    return mde, needed
