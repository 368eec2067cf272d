"""The gate: declarative rules (configs/gate.yaml) -> promote, or keep live.

Two kinds of rule:

- **Paired rules** (``test: non_inferiority`` or ``superiority``) compare candidate and live on
  the same items. They read per-item outcomes (``outcomes.jsonl`` of each release's eval folder:
  metric, item id, cluster, value), pair them by item id and bound the mean difference with
  :func:`evals.stats.paired_difference` (cluster bootstrap). With ``gain`` = candidate - live
  (live - candidate when lower is better) and its one-sided bounds [low, high] at ``confidence``:

  ==================  ============================  ===============================
  test                pass                          fail
  ==================  ============================  ===============================
  non_inferiority     low > -margin                 high < -margin
  superiority         low > margin                  high < margin
  ==================  ============================  ===============================

  and **inconclusive** otherwise: the data cannot tell, so live is kept, and the decision says the
  minimum detectable effect at this n and how many items would resolve it.
- **Threshold rules** (``test: threshold``, the default) compare one aggregate metric with a
  threshold: absolute (``value``), or ``reference * scale + offset`` where the reference is live's
  metric (``relative_to: live``) or another metric of the candidate (``ref_metric``, e.g. the SLO
  the perf run used). Perf rules are of this kind, read at the workload's concurrency.

A metric that is missing fails its rule; so does a pattern that matches nothing, and a paired
rule whose candidate did not answer every item live answered. The decision is ``promote`` only
when every rule passes. Pure: plain data in, a decision out.
"""

from __future__ import annotations

import fnmatch
import json
import math
import operator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from evals.render import decision_markdown
from evals.stats import families_to_resolve, paired_difference, resolution, sign_flip_p
from ground.config import StrictModel

Op = Literal[">=", "<=", ">", "<", "=="]
Test = Literal["threshold", "non_inferiority", "superiority"]
Verdict = Literal["pass", "fail", "inconclusive"]
_OPS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt, "==": operator.eq}
OUTCOMES_FILE = "outcomes.jsonl"

# metric -> item id -> (value, cluster)
ItemOutcomes = dict[str, dict[str, tuple[float, str]]]


class GateRule(StrictModel):
    """One rule: a paired test of candidate vs live, or ``metric op threshold``."""

    name: str | None = Field(None, description="Short label in the decision table (default: the metric).")
    metric: str = Field(..., description="Flat metric name; '*' matches any part (one rule per match).")
    test: Test = Field(
        "threshold",
        description="threshold (aggregate vs a number), non_inferiority or superiority (paired, per item).",
    )
    description: str = Field("", description="Why the rule exists (shown in the report).")
    # paired tests
    margin: float | None = Field(
        None, ge=0, le=1,
        description="Paired tests: the margin on the difference, in the metric's units (0.05 = 5 points).",
    )
    higher_is_better: bool = Field(True, description="Paired tests: direction of the metric.")
    confidence: float = Field(0.95, gt=0.5, lt=1, description="Paired tests: one-sided confidence of the bound.")
    power: float = Field(0.8, gt=0.5, lt=1, description="Paired tests: power used for 'items needed'.")
    min_pairs: int = Field(
        20, ge=1, description="Paired tests: fewer paired items than this is inconclusive (too few to bootstrap)."
    )
    # threshold tests
    op: Op | None = Field(None, description="Threshold tests: comparison >=, <=, >, <, ==.")
    value: float | None = Field(None, description="Threshold tests: absolute threshold.")
    relative_to: Literal["live"] | None = Field(
        None, description="Threshold tests: take the reference from the live release's metrics."
    )
    ref_metric: str | None = Field(
        None, description="Threshold tests: reference metric (default the same); without relative_to, the candidate's."
    )
    scale: float = Field(1.0, description="Threshold tests: threshold = reference * scale + offset.")
    offset: float = Field(0.0, description="Threshold tests: threshold = reference * scale + offset.")

    @model_validator(mode="after")
    def _consistent(self) -> GateRule:
        where = f"rule {self.name or self.metric!r}"
        if self.test == "threshold":
            if self.op is None:
                raise ValueError(f"{where}: a threshold rule needs `op`")
            if self.margin is not None:
                raise ValueError(f"{where}: `margin` is for paired tests (test: non_inferiority or superiority)")
            relative = self.relative_to is not None or self.ref_metric is not None
            if self.value is not None and relative:
                raise ValueError(f"{where}: give either `value` or `relative_to`/`ref_metric`, not both")
            if self.value is None and not relative:
                raise ValueError(f"{where}: needs `value` or `relative_to`/`ref_metric`")
            if self.ref_metric and "*" in self.metric:
                raise ValueError(f"{where}: a pattern rule cannot name a single ref_metric")
            return self
        threshold_keys = [k for k in ("op", "value", "relative_to", "ref_metric") if getattr(self, k) is not None]
        if threshold_keys or self.scale != 1.0 or self.offset != 0.0:
            raise ValueError(f"{where}: test {self.test} compares candidate and live per item; "
                             f"remove {threshold_keys or ['scale/offset']}")
        if self.margin is None:
            raise ValueError(f"{where}: test {self.test} needs `margin` (0 allowed for superiority)")
        return self

    @property
    def label(self) -> str:
        return self.name or self.metric


class GateConfig(StrictModel):
    """configs/gate.yaml: the rules a candidate must pass to be promoted."""

    rules: list[GateRule] = Field(..., min_length=1, description="Every rule must pass.")
    resamples: int = Field(2000, ge=200, description="Bootstrap resamples of each paired rule.")
    seed: int = Field(0, description="Bootstrap seed (a decision is reproducible from its files).")
    looks: list[float] = Field(
        [1.0], min_length=1,
        description="Sequential gate: the shares of each task's item budget at which the gate "
        "looks (ascending, ending at 1.0). A rule resolved at a look stops there; an inconclusive "
        "one is extended with the next look's items. Each look spends part of the error "
        "(O'Brien-Fleming-shaped spending, added up over looks), so looking more often does not "
        "raise it.",
    )
    gatekeeper: str | None = Field(
        "aligned",
        description="The candidate tested first, at the whole decision's error; the other "
        "candidates of a run (its quantized copies, one per kernel) share the same error among "
        "them and can pass only once it passed (serial gatekeeping). None, or a run without this "
        "candidate: every candidate gets an equal share (Bonferroni).",
    )
    # Review approval: one switch, read by the loop (flows/steps.py) and enforced by the release
    # manager with its own gate policy (serving/releases/verify.py, check_promotable).
    require_approval: bool = Field(
        False,
        description="A candidate that passes every rule is promoted only after a reviewer "
        "approved it on the review page (/review/releases); until then it stays staged.",
    )


    @model_validator(mode="after")
    def _looks_ascend(self) -> GateConfig:
        if any(not 0 < t <= 1 for t in self.looks) or self.looks != sorted(set(self.looks)) \
                or self.looks[-1] != 1.0:
            raise ValueError(f"looks: ascending shares in (0, 1] ending at 1.0, got {self.looks}")
        return self


def error_shares(cfg: GateConfig, names: list[str]) -> dict[str, float]:
    """Each candidate's share of the whole decision's error (docs/GATE.md, "The whole decision").

    Serial gatekeeping: the gatekeeper (the aligned model) is tested at the full error; its copies
    share the full error equally and can pass only once the gatekeeper passed
    (:func:`gatekeeper_outcome`). A false promotion needs a true null rejected in the first family
    (at most the error) or, with the gatekeeper truly better, one of the copies' (at most their
    share, which adds up to the error), so the decision over all candidates stays within it.
    Without a gatekeeper among ``names``: Bonferroni, an equal share each."""
    names = list(dict.fromkeys(names))
    if not names:
        return {}
    if cfg.gatekeeper in names and len(names) > 1:
        return {n: 1.0 if n == cfg.gatekeeper else 1 / (len(names) - 1) for n in names}
    return {n: 1 / len(names) for n in names}


def still_open(decision: GateDecision) -> set[str]:
    """The metrics a sequential gate's next look evaluates more items of for this candidate: those
    of its paired rules still inconclusive, while no rule has failed (a failed candidate is done).
    The loop (flows.steps) and its simulation (evals.oc) both ask this."""
    if decision.verdict != "inconclusive":
        return set()
    return {o.metric for o in decision.outcomes
            if o.verdict == "inconclusive" and o.test in ("non_inferiority", "superiority")}


def gatekeeper_outcome(cfg: GateConfig, first: GateDecision) -> RuleOutcome:
    """The rule a copy adds under serial gatekeeping: the gatekeeper's own verdict."""
    verdict = first.verdict
    who = cfg.gatekeeper
    if verdict == "pass":
        reason = f"{who}, tested first, passed every rule"
    elif verdict == "fail":
        failed = ", ".join(sorted({o.rule for o in first.outcomes if o.verdict == "fail"}))
        reason = f"{who}, tested first, failed ({failed}): its copies cannot be promoted in this run"
    else:
        reason = f"{who}, tested first, is inconclusive: its copies wait for it"
    return RuleOutcome(f"tested after {who}", f"gate.{who}", "gatekeeping", verdict, reason)


def spent_alpha(alpha: float, looks: list[float], index: int) -> float:
    """The error look ``index`` may spend: an O'Brien-Fleming-shaped spending function
    ``a(t) = 2 - 2 Phi(z_{1 - alpha/2} / sqrt(t))`` (Lan-DeMets), ``a(t_j) - a(t_{j-1})``. The
    shares add up to ``alpha`` over the plan, so by the union bound a rule that stops at its first
    resolved look is wrongly passed at most ``alpha`` of the time, however the looks correlate;
    early looks spend little, the last nearly all."""
    # lazy: scipy, the statistics only
    from scipy.stats import norm

    def spend(t: float) -> float:
        return 0.0 if t <= 0 else float(2 - 2 * norm.cdf(norm.ppf(1 - alpha / 2) / math.sqrt(t)))

    previous = looks[index - 1] if index > 0 else 0.0
    return spend(looks[index]) - spend(previous)


@dataclass
class RuleOutcome:
    rule: str
    metric: str
    test: str
    verdict: Verdict
    reason: str
    value: float | None = None
    """Threshold: the candidate's metric. Paired: the candidate's mean on the paired items."""
    reference: float | None = None
    """Threshold: the threshold. Paired: live's mean on the same items."""
    op: str | None = None
    diff: float | None = None
    low: float | None = None
    high: float | None = None
    margin: float | None = None
    confidence: float | None = None
    n: int | None = None
    clusters: int | None = None
    mde: float | None = None
    items_needed: int | None = None
    mcnemar_p: float | None = None
    look: int | None = None
    """Sequential gate: the look (0-based) at which this verdict was reached."""

    @property
    def passed(self) -> bool:
        return self.verdict == "pass"

    @property
    def threshold(self) -> float | None:  # the name older reports and tests use
        return self.reference if self.test == "threshold" else None


@dataclass
class GateDecision:
    outcomes: list[RuleOutcome]
    config: dict = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(o.passed for o in self.outcomes)

    @property
    def verdict(self) -> Verdict:
        """fail if any rule failed, else inconclusive if any was, else pass."""
        verdicts = {o.verdict for o in self.outcomes}
        return "fail" if "fail" in verdicts else "inconclusive" if "inconclusive" in verdicts else "pass"

    def to_dict(self) -> dict:
        return {"passed": self.passed, "verdict": self.verdict,
                "decision": "promote" if self.passed else "keep",
                "rules": [asdict(o) | {"passed": o.passed} for o in self.outcomes]}

    def to_markdown(self) -> str:
        """The decision as markdown: the one rendering every page shares (evals/render.py)."""
        return decision_markdown(self.to_dict())


def _pts(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:+.1f} pts"


def _number(metrics: dict[str, float] | None, key: str) -> float | None:
    if metrics is None:
        return None
    v = metrics.get(key)
    if isinstance(v, bool) or not isinstance(v, int | float) or math.isnan(v):
        return None
    return float(v)


# -- threshold rules ---------------------------------------------------------------------------
def _check_threshold(
    rule: GateRule, metric: str, candidate: dict[str, float], live: dict[str, float] | None
) -> RuleOutcome:
    value = _number(candidate, metric)
    base = {"rule": rule.label, "metric": metric, "test": "threshold", "op": rule.op, "value": value}
    if rule.value is not None:
        threshold, note = rule.value, "absolute"
    else:
        ref_key = rule.ref_metric or metric
        source = live if rule.relative_to == "live" else candidate
        where = "live" if rule.relative_to == "live" else "candidate"
        ref = _number(source, ref_key)
        if ref is None:
            why = "no live metrics" if source is None else f"reference {where}:{ref_key} missing"
            return RuleOutcome(**base, verdict="fail", reason=why)
        # Rounded: 0.56 - 0.08 is 0.48000000000000004 in binary floating point, and a candidate
        # at exactly 0.48 must pass a ">= live - 8 points" rule.
        threshold = round(ref * rule.scale + rule.offset, 9)
        note = f"threshold = {ref_key} of {where} ({ref:.4g})" + (
            f" x{rule.scale:g}" if rule.scale != 1 else "") + (f" {rule.offset:+g}" if rule.offset else "")
    if value is None:
        return RuleOutcome(**base, reference=threshold, verdict="fail", reason="metric missing")
    ok = bool(_OPS[rule.op](value, threshold))
    return RuleOutcome(**base, reference=threshold, verdict="pass" if ok else "fail", reason=note)


# -- paired rules ------------------------------------------------------------------------------
def _check_paired(
    rule: GateRule, metric: str, cand_items: ItemOutcomes | None, live_items: ItemOutcomes | None,
    cfg: GateConfig, alpha_share: float = 1.0,
) -> RuleOutcome:
    confidence = 1 - (1 - rule.confidence) * alpha_share
    base = {"rule": rule.label, "metric": metric, "test": rule.test, "margin": rule.margin,
            "confidence": confidence}
    cand = (cand_items or {}).get(metric)
    ref = (live_items or {}).get(metric)
    if not cand or not ref:
        who = "candidate" if not cand else "live"
        return RuleOutcome(**base, verdict="fail", reason=f"no per-item outcomes for {who}")
    missing = sorted(set(ref) - set(cand))
    if missing:
        return RuleOutcome(**base, verdict="fail", n=len(ref),
                           reason=f"candidate has no outcome for {len(missing)} of live's {len(ref)} items "
                                  f"(first: {missing[0]})")
    ids = sorted(set(ref))
    if len(ids) < rule.min_pairs:
        return RuleOutcome(**base, verdict="inconclusive", n=len(ids),
                           reason=f"{len(ids)} paired items < min_pairs {rule.min_pairs}")
    sign = 1.0 if rule.higher_is_better else -1.0
    cand_v, live_v = [sign * cand[i][0] for i in ids], [sign * ref[i][0] for i in ids]
    clusters = [ref[i][1] for i in ids]
    est = paired_difference(cand_v, live_v, clusters, confidence, cfg.resamples, cfg.seed)
    boundary = -rule.margin if rule.test == "non_inferiority" else rule.margin
    exact_p = None
    if rule.test == "superiority" and rule.margin == 0 and est.low > 0:
        # "Better than live at all": confirmed by the exact randomization test, so a candidate
        # equal to live passes at most 1 - confidence of the time (the bootstrap alone can
        # slightly exceed that at small n).
        exact_p = sign_flip_p(cand_v, live_v, clusters, cfg.resamples, cfg.seed)
    # Below this many families even a candidate identical to live could not pass the margin
    # (the exact no-difference bound is wider), so a noisier one may not pass either.
    min_families = families_to_resolve(rule.margin, confidence) if rule.test == "non_inferiority" else 1
    held_by_families = est.clusters < min_families
    if est.low > boundary and (exact_p is None or exact_p < 1 - confidence) and not held_by_families:
        verdict: Verdict = "pass"
    elif est.high < boundary:
        verdict = "fail"
    else:
        verdict = "inconclusive"
    mde, needed = resolution(est, boundary, rule.power, exact_p)
    side = "at least" if rule.test == "superiority" else "no worse than"
    goal = f"gain {side} {_pts(boundary if rule.test == 'superiority' else -rule.margin)}"
    reason = f"{goal} at {confidence:.2%} one-sided; {est.method}"
    if exact_p is not None:
        reason += f"; sign-flip randomization p = {exact_p:.3g}"
    if verdict == "inconclusive":
        if est.low > boundary and held_by_families and (exact_p is None or exact_p < 1 - confidence):
            why = (f"the bound clears it, but {est.clusters} families are fewer than the "
                   f"{min_families} at which a candidate identical to live could pass this margin")
            more = f"~{min_families} families would resolve it"
        else:
            why = ("the bootstrap bound clears it but the exact sign-flip randomization test does not "
                   f"(p = {exact_p:.3g})" if est.low > boundary else "bounds straddle it")
            more = ("the observed difference sits on the boundary: no realistic n resolves it"
                    if needed is None else f"~{needed} items would resolve the observed difference "
                                           f"({needed - est.n} more)")
        reason = f"{goal}: {why}; detectable at this n: {100 * mde:.1f} pts; {more}"
    return RuleOutcome(
        **base, verdict=verdict, reason=reason,
        value=sign * est.candidate_mean, reference=sign * est.live_mean, diff=est.diff,
        low=est.low, high=est.high, n=est.n, clusters=est.clusters, mde=mde, items_needed=needed,
        mcnemar_p=est.mcnemar_p,
    )


def evaluate(
    cfg: GateConfig,
    candidate: dict[str, float],
    live: dict[str, float] | None = None,
    candidate_items: ItemOutcomes | None = None,
    live_items: ItemOutcomes | None = None,
    candidates: int = 1,
    look: int | None = None,
    resolved: dict[tuple[str, str], RuleOutcome] | None = None,
    share: float | None = None,
) -> GateDecision:
    """Check every rule; promote only if all pass (pure: plain data in, decision out).

    Args:
        cfg: the rules.
        candidate: the candidate's aggregate metrics (threshold rules).
        live: live's aggregate metrics (threshold rules relative to live).
        candidate_items: the candidate's per-item outcomes (paired rules).
        live_items: live's per-item outcomes on the same items (paired rules).
        candidates: how many candidates the whole decision may promote from; each gets an equal
            share of every paired rule's error (Bonferroni), so the decision, not each candidate,
            is wrong at most ``1 - confidence`` of the time.
        look: sequential gate: the look (index into ``cfg.looks``) these outcomes are read at;
            None reads them once at the full error (a single look).
        resolved: outcomes of an earlier look, by (rule label, metric): the paired rules among them
            that resolved stay as they are (a rule stops at the look that resolves it).
        share: this candidate's share of the error (:func:`error_shares`); overrides
            ``1 / candidates``.
    """
    if candidates < 1:
        raise ValueError(f"candidates must be >= 1, got {candidates}")
    if share is None:
        share = 1 / candidates
    if not 0 < share <= 1:
        raise ValueError(f"share must be in (0, 1], got {share}")
    outcomes: list[RuleOutcome] = []
    for rule in cfg.rules:
        paired = rule.test != "threshold"
        if "*" in rule.metric:
            if paired:
                keys = set(candidate_items or {}) | set(live_items or {})
            else:
                keys = set(candidate) | (set(live) if live and rule.relative_to == "live" else set())
            matched = sorted(k for k in keys if fnmatch.fnmatchcase(k, rule.metric))
            if not matched:
                outcomes.append(RuleOutcome(rule.label, rule.metric, rule.test, "fail",
                                            "no metric matches the pattern"))
        else:
            matched = [rule.metric]
        for key in matched:
            if not paired:
                outcomes.append(_check_threshold(rule, key, candidate, live))
            elif resolved and (earlier := resolved.get((rule.label, key))) and earlier.verdict != "inconclusive":
                outcomes.append(earlier)  # stopped at the look that resolved it
            else:
                rule_share = share
                if look is not None:
                    alpha = (1 - rule.confidence) * share
                    rule_share = spent_alpha(alpha, cfg.looks, look) / (1 - rule.confidence)
                outcome = _check_paired(rule, key, candidate_items, live_items, cfg, rule_share)
                outcome.look = look
                outcomes.append(outcome)
    return GateDecision(outcomes=outcomes, config=cfg.model_dump(mode="json"))


# -- per-item outcome files --------------------------------------------------------------------
def _outcome_rows(path: Path):
    """(lineno, metric, id, value, cluster, look) per row of an outcomes file."""
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            metric, item, value = row["metric"], str(row["id"]), float(row["value"])
            cluster = str(row.get("cluster") or item)
            look = int(row.get("look") or 0)
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}:{lineno}: not an outcome row ({exc})") from None
        if not math.isfinite(value):
            raise ValueError(f"{path}:{lineno}: value is not a finite number")
        yield lineno, metric, item, value, cluster, look


def load_outcomes(path: str | Path, max_look: int | None = None) -> ItemOutcomes:
    """An ``outcomes.jsonl`` (rows: metric, id, cluster, value[, look]) as
    {metric: {id: (value, cluster)}}; with ``max_look``, only items evaluated up to that look.

    Raises:
        ValueError: a malformed row (file and line named) or an item listed twice for a metric.
    """
    out: ItemOutcomes = {}
    path = Path(path)
    for lineno, metric, item, value, cluster, look in _outcome_rows(path):
        items = out.setdefault(metric, {})
        if item in items:
            raise ValueError(f"{path}:{lineno}: item {item!r} appears twice for {metric}")
        if max_look is None or look <= max_look:
            items[item] = (value, cluster)
    return out


def write_outcomes(path: str | Path, rows: list[dict], look: int | None = None) -> Path:
    """Write per-item outcome rows (metric, id, cluster, value) as JSONL; ``look`` marks rows that a
    sequential gate's later look added (the gate replays its looks from these marks)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for r in rows:
            row = {"metric": r["metric"], "id": str(r["id"]), "cluster": str(r.get("cluster") or r["id"]),
                   "value": float(r["value"])}
            f.write(json.dumps(row | ({"look": look} if look else {})) + "\n")
    return path


def load_outcome_dir(folder: str | Path, max_look: int | None = None) -> ItemOutcomes:
    """Every ``outcomes-*.jsonl`` of an eval folder, merged: a metric may span several files (a
    sequential gate's later looks add files) as long as no item appears twice."""
    merged: ItemOutcomes = {}
    for path in sorted(Path(folder).glob("outcomes-*.jsonl")):
        for metric, items in load_outcomes(path, max_look).items():
            have = merged.setdefault(metric, {})
            if twice := set(have) & set(items):
                raise ValueError(f"{path}: item {sorted(twice)[0]!r} of {metric} also appears in another outcomes file")
            have.update(items)
    return merged


def looks_taken(folder: str | Path) -> int:
    """How many looks of a sequential gate the outcome files of an eval folder hold (>= 1)."""
    last = 0
    for path in Path(folder).glob("outcomes-*.jsonl"):
        last = max([last, *(row[-1] for row in _outcome_rows(path))])
    return last + 1


def candidate_folders(run_dir: str | Path, live: str = "baseline") -> list[Path]:
    """The candidates' eval folders of a run (``evals-<variant>``, live's copy excluded): how many
    candidates the whole decision chose among."""
    return sorted(p for p in Path(run_dir).glob("evals-*")
                  if p.is_dir() and p.name != f"evals-{live}" and (p / "result.json").is_file())


def read_stage_dir(folder: str | Path) -> dict[str, float]:
    """An eval folder's aggregate metrics (``result.json``)."""
    result = Path(folder) / "result.json"
    if not result.is_file():
        raise FileNotFoundError(f"{folder}: no result.json (the eval stage did not finish)")
    metrics = json.loads(result.read_text()).get("metrics")
    if not isinstance(metrics, dict):
        raise ValueError(f"{result}: no metrics mapping")
    return metrics


def evaluate_stage_dirs(
    cfg: GateConfig, candidate_dir: str | Path, live_dir: str | Path, candidates: int | None = None,
    looks: int | None = None,
) -> GateDecision:
    """The decision from two finished eval stage folders (``runs/<run>/evals-<variant>/``).

    Each folder's ``result.json`` holds its aggregate metrics, ``output/outcomes-*.jsonl`` the
    per-item outcomes (each marked with the look that added it): the same files the loop decided
    from, so anyone holding them (the release manager, a reviewer) recomputes the same decision,
    look by look. The candidate folders beside ``candidate_dir`` are the candidates that share the
    decision's error (:func:`error_shares`); a copy of the gatekeeper also carries the gatekeeper's
    verdict, recomputed from its folder. ``candidates`` (an int) instead splits the error equally
    over that many, with no gatekeeping; ``looks`` (default: as many as the files hold) is how many
    looks to replay.
    """
    cand_dir, live_dir = Path(candidate_dir), Path(live_dir)
    gatekeeper: tuple[Path, float] | None = None
    if candidates is None:
        names = [p.name.removeprefix("evals-") for p in
                 candidate_folders(cand_dir.parent, live_dir.name.removeprefix("evals-"))]
        name = cand_dir.name.removeprefix("evals-")
        shares = error_shares(cfg, sorted(set(names) | {name}))
        if cfg.gatekeeper in names and name != cfg.gatekeeper:
            gatekeeper = (cand_dir.parent / f"evals-{cfg.gatekeeper}", shares[cfg.gatekeeper])
        share = shares[name]
    else:
        share = 1 / max(1, candidates)
    return _replay(cfg, cand_dir, live_dir, share, looks, gatekeeper)


def _replay(cfg: GateConfig, cand_dir: Path, live_dir: Path, share: float, looks: int | None,
            gatekeeper: tuple[Path, float] | None = None) -> GateDecision:
    """Replay the looks of one candidate; a copy also carries the gatekeeper's verdict at each look
    (``gatekeeper``: its eval folder and share of the error)."""

    def gated(decision: GateDecision, through: int | None) -> GateDecision:
        if gatekeeper is None:
            return decision
        first = _replay(cfg, gatekeeper[0], live_dir, gatekeeper[1], through)
        return GateDecision([*decision.outcomes, gatekeeper_outcome(cfg, first)], decision.config)

    cand, live = read_stage_dir(cand_dir), read_stage_dir(live_dir)
    if len(cfg.looks) == 1:
        return gated(evaluate(cfg, cand, live, load_outcome_dir(cand_dir / "output"),
                              load_outcome_dir(live_dir / "output"), share=share), None)
    taken = looks if looks is not None else max(looks_taken(cand_dir / "output"), looks_taken(live_dir / "output"))
    if taken > len(cfg.looks):
        raise ValueError(f"{cand_dir}: outcomes of {taken} looks, the gate plans {len(cfg.looks)}")
    own: GateDecision | None = None
    decision: GateDecision | None = None
    for look in range(taken):
        if decision is not None and decision.verdict != "inconclusive":
            # Resolved (a rule failed, its gatekeeper's included, or every rule passed): the loop
            # asks such a candidate for no more items, so live's later items have no partner here.
            break
        resolved = {(o.rule, o.metric): o for o in own.outcomes} if own else None
        own = evaluate(cfg, cand, live, load_outcome_dir(cand_dir / "output", look),
                       load_outcome_dir(live_dir / "output", look), look=look, resolved=resolved,
                       share=share)
        decision = gated(own, look + 1)
    assert decision is not None
    return decision
