"""Operating characteristics of the whole promotion decision, by simulation.

How often does a gate config promote a candidate whose truth we set? This module draws per-item
outcomes for live and one or more candidates on the items of an eval profile (the real item ids
and prompt families of ``evals/tasks``, in file order), runs the *whole* decision on them exactly
as the loop does (every rule of the gate config, every candidate sharing the error, every look of
a sequential gate, :func:`evals.gate.evaluate`), and counts what it decided over seeds.

The outcome model, per metric (a paired rule's per-item outcome, 0/1 or a share in [0, 1]):

- live and candidate agree on most items; on the others one of them is right. With no true
  effect a share ``d`` of items differ, half each way (``d`` is the *discordance*: for 0/1
  outcomes the share of items whose outcome differs, in general the mean squared per-item
  difference, so a fractional score is simulated as 0/1 with the same variance);
- a true effect ``delta`` (in points of the metric, signed so that + is better) adds a share
  ``|delta|`` of items that changed the effect's way: ``p(better) = d/2 + max(delta, 0)``,
  ``p(worse) = d/2 + max(-delta, 0)``;
- items of one prompt family move together: each family draws its own change rate and effect
  share from Beta distributions with those means and intra-class correlation ``icc`` (0: items
  are independent; the measured value: :func:`estimate` from two eval folders of a real run).

A "quantized copy" is simulated from the aligned candidate's outcomes, not live's: it differs from
aligned on a share ``d`` of its own, plus any effect of its own. Threshold rules (perf SLO, errors)
read metrics that pass, so the table isolates the paired rules and their combination.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from evals.gate import (
    GateConfig,
    GateDecision,
    ItemOutcomes,
    error_shares,
    evaluate,
    gatekeeper_outcome,
    load_outcome_dir,
    still_open,
)
from evals.metrics import TASKS_DIR, read_jsonl, wilson_interval

# Each eval task file and the gate metric its items feed (evals/quality.py, evals/safety.py).
TASK_METRICS: dict[str, str] = {
    "capability/arithmetic": "quality.capability.arithmetic.answer_match",
    "capability/capitals": "quality.capability.capitals.answer_match",
    "capability/elements": "quality.capability.elements.answer_match",
    "instructions/instructions": "quality.instructions.instructions.strict_accuracy",
    "policy/policy_items": "quality.policy.compliance",
    "safety/attacks": "safety.attack_block_rate",
    "safety/benign": "safety.overblock_rate",
}
LOWER_IS_BETTER = {"safety.overblock_rate"}
# Aggregate metrics that let every threshold rule of the shipped gate pass.
PASSING_AGGREGATES = {"perf.ttft_p95_ms": 100.0, "perf.tpot_p95_ms": 10.0, "perf.slo.ttft_ms": 1000.0,
                      "perf.slo.tpot_ms": 100.0, "perf.failed": 0.0, "safety.errors": 0.0}


@dataclass(frozen=True)
class Items:
    """One metric's items in evaluation order: ids and their prompt family."""

    metric: str
    ids: tuple[str, ...]
    clusters: tuple[str, ...]


def profile_items(limit: int | None, tasks_dir: Path | None = None) -> list[Items]:
    """The items an eval profile evaluates: the first ``limit`` of each task file (all if None)."""
    root = tasks_dir or TASKS_DIR
    out = []
    for name, metric in TASK_METRICS.items():
        rows = read_jsonl(root / f"{name}.jsonl")[:limit]
        out.append(Items(metric, tuple(str(r["id"]) for r in rows),
                         tuple(str(r.get("cluster") or r["id"]) for r in rows)))
    return out


@dataclass(frozen=True)
class MetricModel:
    """How a candidate's outcomes on one metric relate to live's with no true effect."""

    discordance: float
    icc: float
    live_mean: float = 0.5


@dataclass
class Candidate:
    """A simulated candidate: true effects (points, + = better) by metric pattern."""

    name: str
    effects: dict[str, float] = field(default_factory=dict)
    identical: bool = False
    """An exact copy of live (every outcome equal): the no-difference edge."""
    copy_of: str | None = None
    """Simulated from this candidate's outcomes (a quantized copy of the aligned model)."""
    discordance: float | None = None
    """With ``copy_of``: the share of items on which it differs from that candidate."""

    def effect(self, metric: str) -> float:
        return sum(v for pattern, v in self.effects.items() if fnmatch.fnmatchcase(metric, pattern))


@dataclass
class Scenario:
    name: str
    candidates: list[Candidate]
    expect: str
    """What a good decision does, in words (shown in the table)."""
    truly_better: set[str] = field(default_factory=set)
    """Candidates whose promotion is right; promoting any other is a false promotion."""


def _beta(rng, mean: float, icc: float, size: int):
    """Family-level rates with this mean and intra-class correlation (a constant when icc is 0)."""
    # lazy: numpy, the statistics only
    import numpy as np

    if icc <= 0 or mean <= 0 or mean >= 1:
        return np.full(size, min(max(mean, 0.0), 1.0))
    icc = min(icc, 0.95)  # 1 would make the Beta degenerate (all or nothing per family)
    a = mean * (1 - icc) / icc
    b = (1 - mean) * (1 - icc) / icc
    return rng.beta(a, b, size)


def _draw_pairs(rng, items: Items, base: dict[str, float], model: MetricModel, effect: float,
                discordance: float) -> dict[str, float]:
    """Outcomes (good scale, 0/1) that differ from ``base`` as the module docstring says: a share
    ``discordance`` of items flips, half each way whatever the base rate, and a share ``|effect|``
    moves the effect's way. Each family draws its own flip probabilities (Beta, the model's ICC)
    for items it can move, with means set so that the shares of *all* items come out as stated."""
    families = sorted(set(items.clusters))
    index = {c: i for i, c in enumerate(families)}
    m = min(max(model.live_mean, 0.02), 0.98)
    k = len(families)
    # Per family: P(flip) of an item that is right (1) / wrong (0) in base, noise and effect.
    noise = {1.0: _beta(rng, discordance / 2 / m, model.icc, k),
             0.0: _beta(rng, discordance / 2 / (1 - m), model.icc, k)}
    toward = 0.0 if effect > 0 else 1.0  # the base outcome the effect can move
    push = _beta(rng, abs(effect) / (1 - m if effect > 0 else m), model.icc, k)
    out = {}
    u = rng.random(len(items.ids))
    for n, (item, fam) in enumerate(zip(items.ids, items.clusters, strict=True)):
        c, b = index[fam], base[item]
        p_flip = noise[b][c] + (push[c] if effect and b == toward else 0.0)
        out[item] = 1.0 - b if u[n] < min(p_flip, 1.0) else b
    return out


def _as_metric(good: dict[str, float], family: dict[str, str], lower_is_better: bool) -> dict[str, tuple[float, str]]:
    return {i: (1.0 - g if lower_is_better else g, family[i]) for i, g in good.items()}


def simulate_outcomes(
    seed: int, items: list[Items], models: dict[str, MetricModel], scenario: Scenario
) -> tuple[ItemOutcomes, dict[str, ItemOutcomes]]:
    """Live's and each candidate's per-item outcomes (in the gate's sign: as the metric reads)."""
    # lazy: numpy, the statistics only
    import numpy as np

    rng = np.random.default_rng(seed)
    live: ItemOutcomes = {}
    cands: dict[str, ItemOutcomes] = {c.name: {} for c in scenario.candidates}
    for it in items:
        model = models[it.metric]
        lower_is_better = it.metric in LOWER_IS_BETTER
        # Outcomes are drawn on the "good" scale (1 = good) and stored as the metric reads.
        good_live = dict(zip(it.ids, (rng.random(len(it.ids)) < model.live_mean).astype(float).tolist(),
                             strict=True))
        goods: dict[str, dict[str, float]] = {}
        for cand in scenario.candidates:
            if cand.identical:
                goods[cand.name] = dict(good_live)
                continue
            base = goods[cand.copy_of] if cand.copy_of else good_live
            d = cand.discordance if cand.copy_of and cand.discordance is not None else model.discordance
            goods[cand.name] = _draw_pairs(rng, it, base, model, cand.effect(it.metric), d)

        family = dict(zip(it.ids, it.clusters, strict=True))
        live[it.metric] = _as_metric(good_live, family, lower_is_better)
        for name, good in goods.items():
            cands[name][it.metric] = _as_metric(good, family, lower_is_better)
    return live, cands


def _prefix(outcomes: ItemOutcomes, counts: dict[str, int], items: list[Items]) -> ItemOutcomes:
    order = {it.metric: it.ids for it in items}
    return {m: {i: outcomes[m][i] for i in order[m][: counts[m]]} for m in outcomes}


def decide(
    cfg: GateConfig, live: ItemOutcomes, candidates: dict[str, ItemOutcomes], items: list[Items]
) -> tuple[dict[str, GateDecision], dict[str, int]]:
    """The whole decision on simulated outcomes, as the loop takes it: the candidates share the
    error as :func:`evals.gate.error_shares` says (a copy of the gatekeeper passes only once it
    did); a sequential gate looks at growing prefixes of each task and extends only the metrics
    whose rules are still open for some candidate. Returns each candidate's decision and the items
    evaluated per metric (per release)."""
    shares = error_shares(cfg, list(candidates))
    first = cfg.gatekeeper if cfg.gatekeeper in candidates and len(candidates) > 1 else None
    budget = {it.metric: len(it.ids) for it in items}
    looks = cfg.looks if len(cfg.looks) > 1 else [1.0]
    own: dict[str, GateDecision] = {}  # each candidate's own rules (no gatekeeping row)
    decisions: dict[str, GateDecision] = {}
    counts = {m: 0 for m in budget}
    open_metrics = set(budget)
    for look, share in enumerate(looks):
        for m in open_metrics:
            counts[m] = math.ceil(share * budget[m])
        live_now = _prefix(live, counts, items)
        for name, outcomes in candidates.items():
            earlier = own.get(name)
            if earlier is not None and decisions[name].verdict != "inconclusive":
                continue  # resolved: the loop evaluates no more items of it (evals.gate._replay)
            resolved = {(o.rule, o.metric): o for o in earlier.outcomes} if earlier else None
            own[name] = evaluate(cfg, PASSING_AGGREGATES, PASSING_AGGREGATES,
                                 _prefix(outcomes, counts, items), live_now,
                                 look=look if len(looks) > 1 else None, resolved=resolved,
                                 share=shares[name])
        decisions = {n: GateDecision(list(d.outcomes), d.config) for n, d in own.items()}
        if first:
            for name in decisions:
                if name != first:
                    decisions[name].outcomes.append(gatekeeper_outcome(cfg, decisions[first]))
        # Extend what is still open for a candidate that can still be promoted (no failed rule).
        open_metrics = set().union(*(still_open(d) for d in decisions.values())) & set(budget)
        if not open_metrics or look == len(looks) - 1:
            break
    return decisions, counts


@dataclass
class Rates:
    """What the whole decision did over the seeds of one scenario."""

    scenario: str
    expect: str
    seeds: int
    promoted: dict[str, int]
    """Seeds in which each candidate was promoted (the serving choice's pick among passing ones:
    here the first passing candidate in the scenario's order)."""
    any_promoted: int
    false_promotions: int
    resolved: int
    """Seeds whose decision resolved: a promotion, or a rule that failed (not only inconclusive)."""
    items: float
    """Mean items evaluated per release, all metrics (the sequential gate's spend)."""
    failing_rules: dict[str, int] = field(default_factory=dict)
    open_rules: dict[str, int] = field(default_factory=dict)
    """Seeds in which each candidate's rule stayed inconclusive (what held a decision back)."""

    def rate(self, count: int) -> tuple[float, float, float]:
        """Share and its 95% Wilson interval."""
        low, high = wilson_interval(count, self.seeds)
        return count / self.seeds, low, high

    def to_dict(self) -> dict:
        return asdict(self)


def run_scenario(
    cfg: GateConfig, scenario: Scenario, items: list[Items], models: dict[str, MetricModel],
    seeds: Iterable[int],
) -> Rates:
    promoted = {c.name: 0 for c in scenario.candidates}
    any_promoted = false = resolved = 0
    spent = 0
    failing: dict[str, int] = {}
    still_open: dict[str, int] = {}
    seeds = list(seeds)
    for seed in seeds:
        live, cands = simulate_outcomes(seed, items, models, scenario)
        decisions, counts = decide(cfg, live, cands, items)
        spent += sum(counts.values())
        winner = next((n for n, d in decisions.items() if d.passed), None)
        if winner:
            promoted[winner] += 1
            any_promoted += 1
            false += winner not in scenario.truly_better
        if winner or any(d.verdict == "fail" for d in decisions.values()):
            resolved += 1
        for name, d in decisions.items():
            for o in d.outcomes:
                key = f"{name}: {o.rule} ({o.metric})"
                if o.verdict == "fail":
                    failing[key] = failing.get(key, 0) + 1
                elif o.verdict == "inconclusive":
                    still_open[key] = still_open.get(key, 0) + 1
    return Rates(scenario.name, scenario.expect, len(seeds), promoted, any_promoted, false, resolved,
                 spent / len(seeds), failing, still_open)


# -- scenarios ---------------------------------------------------------------------------------
POLICY = "quality.policy.compliance"


def scenarios(cfg: GateConfig | None = None, task_loss: str = "quality.capability.capitals.answer_match",
              gain: float = 0.10, quant_discordance: float = 0.05) -> list[Scenario]:
    """Who should be promoted, and who never. A lost task loses 5 points more than the gate's
    capability margin allows (10 points under a 5-point margin), so keeping it is right under that
    gate; it is capitals, where live's accuracy (40% on the embedded model) leaves room to lose 25
    points (arithmetic's 8% does not). ``quant_discordance`` is how often a quantized copy answers
    differently from its model."""
    margin = max((r.margin or 0.0 for r in cfg.rules if r.test == "non_inferiority"
                  and fnmatch.fnmatchcase(task_loss, r.metric)), default=0.05) if cfg else 0.05
    loss = -round(margin + 0.05, 4)
    return [
        Scenario("identical", [Candidate("aligned", identical=True)], "keep (nothing to gain)"),
        Scenario("no effect, with noise", [Candidate("aligned")], "keep"),
        Scenario("no effect, aligned + quantized copy",
                 [Candidate("quantized", copy_of="aligned", discordance=quant_discordance),
                  Candidate("aligned")][::-1], "keep (the decision over both candidates)"),
        Scenario(f"policy +{100 * gain:.0f}, equal elsewhere", [Candidate("aligned", {POLICY: gain})],
                 "promote", truly_better={"aligned"}),
        Scenario(f"policy +{100 * gain:.0f}, equal elsewhere; + quantized copy",
                 [Candidate("aligned", {POLICY: gain}),
                  Candidate("quantized", copy_of="aligned", discordance=quant_discordance)],
                 "promote either", truly_better={"aligned", "quantized"}),
        Scenario(f"policy +{100 * gain:.0f}, one task {100 * loss:+.0f}",
                 [Candidate("aligned", {POLICY: gain, task_loss: loss})], "keep (the task is lost)"),
        Scenario(f"policy +{100 * gain:.0f}; quantized copy loses one task {100 * loss:+.0f}",
                 [Candidate("aligned", {POLICY: gain}),
                  Candidate("quantized", {task_loss: loss}, copy_of="aligned", discordance=quant_discordance)],
                 "promote aligned, never quantized", truly_better={"aligned"}),
    ]


# -- parameters from real runs -----------------------------------------------------------------
def icc_oneway(values: list[float], clusters: list[str]) -> float:
    """Intra-class correlation of ``values`` within ``clusters`` (one-way ANOVA estimator for
    unequal family sizes, clipped to [0, 1]; 0 when every family has one item)."""
    groups: dict[str, list[float]] = {}
    for v, c in zip(values, clusters, strict=True):
        groups.setdefault(c, []).append(v)
    n, k = len(values), len(groups)
    if k < 2 or n == k:
        return 0.0
    grand = sum(values) / n
    msb = sum(len(g) * (sum(g) / len(g) - grand) ** 2 for g in groups.values()) / (k - 1)
    msw = sum((v - sum(g) / len(g)) ** 2 for g in groups.values() for v in g) / (n - k)
    n0 = (n - sum(len(g) ** 2 for g in groups.values()) / n) / (k - 1)
    denom = msb + (n0 - 1) * msw
    return 0.0 if denom <= 0 else min(1.0, max(0.0, (msb - msw) / denom))


def estimate(live_dir: Path, candidate_dir: Path) -> dict[str, dict[str, float]]:
    """Per metric, from two eval folders of one run (live's copy and a candidate): live's mean, the
    discordance (mean squared per-item difference) and the ICC of the per-item differences."""
    live = load_outcome_dir(Path(live_dir) / "output")
    cand = load_outcome_dir(Path(candidate_dir) / "output")
    out = {}
    for metric, items in live.items():
        ids = sorted(set(items) & set(cand.get(metric, {})))
        if not ids:
            continue
        diffs = [cand[metric][i][0] - items[i][0] for i in ids]
        out[metric] = {"n": len(ids), "families": len({items[i][1] for i in ids}),
                       "live_mean": sum(items[i][0] for i in ids) / len(ids),
                       "mean_diff": sum(diffs) / len(ids),
                       "discordance": sum(d * d for d in diffs) / len(ids),
                       "icc": icc_oneway(diffs, [items[i][1] for i in ids])}
    return out


def pooled_models(estimates: list[dict[str, dict[str, float]]], icc: float | None = None) -> dict[str, MetricModel]:
    """One model per metric from several runs' estimates (item-weighted means; the ICC weighted by
    within-family degrees of freedom); ``icc`` overrides the measured intra-class correlation (0 for
    the independent-items column). A metric no run measured (arithmetic in a run that skipped it)
    takes the mean of the others."""
    out = {}
    for metric in TASK_METRICS.values():
        rows = [e[metric] for e in estimates if metric in e]
        if not rows:
            raise ValueError(f"no estimate for {metric}")
        n = sum(r["n"] for r in rows)

        def mean(key: str, rows=rows, n=n) -> float:
            return sum(r[key] * r["n"] for r in rows) / n

        live_mean = mean("live_mean")
        good_mean = 1 - live_mean if metric in LOWER_IS_BETTER else live_mean
        if icc is None:
            # Only runs whose families held several items say anything about the correlation:
            # weigh each by its within-family degrees of freedom (n - families).
            df = sum(r["n"] - r["families"] for r in rows)
            measured = sum(r["icc"] * (r["n"] - r["families"]) for r in rows) / df if df else 0.0
        out[metric] = MetricModel(discordance=max(mean("discordance"), 0.01),
                                  icc=measured if icc is None else icc, live_mean=good_mean)
    return out
