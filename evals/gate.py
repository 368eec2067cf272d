"""The gate: declarative rules (configs/gate.yaml) over flat metric dicts -> promote or keep.

A rule compares one metric (or every metric a ``*`` pattern matches) with a threshold that is
either absolute (``value``) or computed from a reference: the live release's metric
(``relative_to: live``) or another metric of the candidate (``ref_metric``, e.g. the SLO the perf
run used), as ``reference * scale + offset``. A metric that is missing or not a number fails its
rule; so does a pattern that matches nothing. Every rule is listed in the decision with value,
threshold and pass/fail.
"""

from __future__ import annotations

import fnmatch
import math
import operator
from dataclasses import asdict, dataclass
from typing import Literal

from pydantic import Field, model_validator

from training.config import StrictModel

Op = Literal[">=", "<=", ">", "<", "=="]
_OPS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt, "==": operator.eq}


class GateRule(StrictModel):
    """One rule: ``metric op threshold``."""

    name: str | None = Field(None, description="Short label in the decision table (default: the metric).")
    metric: str = Field(..., description="Flat metric name; '*' matches any part (one rule per match).")
    op: Op = Field(..., description="Comparison: >=, <=, >, <, ==.")
    value: float | None = Field(None, description="Absolute threshold (exclusive with relative_to/ref_metric).")
    relative_to: Literal["live"] | None = Field(
        None, description="Take the reference from the live release's metrics."
    )
    ref_metric: str | None = Field(
        None, description="Reference metric name (default: the same metric); without relative_to, the candidate's."
    )
    scale: float = Field(1.0, description="Threshold = reference * scale + offset.")
    offset: float = Field(0.0, description="Threshold = reference * scale + offset (e.g. -0.02 = 2 points).")
    description: str = Field("", description="Why the rule exists (shown in the report).")

    @model_validator(mode="after")
    def _one_threshold(self) -> GateRule:
        relative = self.relative_to is not None or self.ref_metric is not None
        if self.value is not None and relative:
            raise ValueError(f"rule {self.metric!r}: give either `value` or `relative_to`/`ref_metric`, not both")
        if self.value is None and not relative:
            raise ValueError(f"rule {self.metric!r}: needs `value` or `relative_to`/`ref_metric`")
        if self.ref_metric and "*" in self.metric:
            raise ValueError(f"rule {self.metric!r}: a pattern rule cannot name a single ref_metric")
        return self


class GateConfig(StrictModel):
    """configs/gate.yaml: the rules a candidate must pass to be promoted."""

    rules: list[GateRule] = Field(..., min_length=1, description="Every rule must pass.")
    # Review approval: one switch, read by the loop (flows/steps.py) and enforced by the release
    # manager through the attached gate decision (serving/releases.py, approval_required).
    require_approval: bool = Field(
        False,
        description="A candidate that passes every rule is promoted only after a reviewer "
        "approved it on the review page (/review/releases); until then it stays staged.",
    )


@dataclass
class RuleOutcome:
    rule: str
    metric: str
    op: str
    value: float | None
    threshold: float | None
    passed: bool
    reason: str


@dataclass
class GateDecision:
    passed: bool
    outcomes: list[RuleOutcome]

    def to_dict(self) -> dict:
        return {"passed": self.passed, "decision": "promote" if self.passed else "keep",
                "rules": [asdict(o) for o in self.outcomes]}

    def to_markdown(self) -> str:
        lines = [f"**Gate: {'PASS (promote)' if self.passed else 'FAIL (keep live)'}**", "",
                 "| rule | metric | value | op | threshold | result | note |", "|---|---|---|---|---|---|---|"]
        for o in self.outcomes:
            lines.append(f"| {o.rule} | `{o.metric}` | {_fmt(o.value)} | {o.op} | {_fmt(o.threshold)} | "
                         f"{'pass' if o.passed else '**FAIL**'} | {o.reason} |")
        return "\n".join(lines)


def _fmt(x: float | None) -> str:
    return "missing" if x is None else f"{x:.4g}"


def _number(metrics: dict[str, float] | None, key: str) -> float | None:
    if metrics is None:
        return None
    v = metrics.get(key)
    if isinstance(v, bool) or not isinstance(v, int | float) or math.isnan(v):
        return None
    return float(v)


def _check(rule: GateRule, metric: str, candidate: dict[str, float], live: dict[str, float] | None) -> RuleOutcome:
    label = rule.name or rule.metric
    value = _number(candidate, metric)
    if rule.value is not None:
        threshold, ref_note = rule.value, "absolute"
    else:
        ref_key = rule.ref_metric or metric
        source = live if rule.relative_to == "live" else candidate
        where = "live" if rule.relative_to == "live" else "candidate"
        ref = _number(source, ref_key)
        if ref is None:
            why = "no live metrics" if source is None else f"reference {where}:{ref_key} missing"
            return RuleOutcome(label, metric, rule.op, value, None, False, why)
        # Rounded: 0.56 - 0.08 is 0.48000000000000004 in binary floating point, and a candidate
        # at exactly 0.48 (12 of 25 items) must pass a ">= live - 8 points" rule.
        threshold = round(ref * rule.scale + rule.offset, 9)
        ref_note = f"{where} {ref:.4g}" + (f" x{rule.scale:g}" if rule.scale != 1 else "") + (
            f" {rule.offset:+g}" if rule.offset else "")
    if value is None:
        return RuleOutcome(label, metric, rule.op, None, threshold, False, "metric missing")
    passed = bool(_OPS[rule.op](value, threshold))
    return RuleOutcome(label, metric, rule.op, value, threshold, passed, ref_note)


def evaluate(cfg: GateConfig, candidate: dict[str, float], live: dict[str, float] | None = None) -> GateDecision:
    """Check every rule; the gate passes only if all pass (pure: plain dicts in, decision out)."""
    outcomes: list[RuleOutcome] = []
    for rule in cfg.rules:
        if "*" in rule.metric:
            keys = set(candidate) | (set(live) if live and rule.relative_to == "live" else set())
            matched = sorted(k for k in keys if fnmatch.fnmatchcase(k, rule.metric))
            if not matched:
                outcomes.append(RuleOutcome(rule.name or rule.metric, rule.metric, rule.op, None, None,
                                            False, "no metric matches the pattern"))
            outcomes += [_check(rule, k, candidate, live) for k in matched]
        else:
            outcomes.append(_check(rule, rule.metric, candidate, live))
    return GateDecision(passed=all(o.passed for o in outcomes), outcomes=outcomes)
