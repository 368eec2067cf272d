"""One rendering of a gate decision, shared by the eval report, the Prefect gate artifact and the
review page, so the three cannot disagree.

Input is the stored decision dict (:meth:`evals.gate.GateDecision.to_dict`, as saved in
``report/gate.json`` and attached to releases). Every page reads the same :class:`RuleRow`
cells: the verdict words (``promote`` / ``keep: failed`` / ``keep: inconclusive``), and per rule
the candidate, live, difference with its one-sided bounds, what passing needs, n, the verdict and
the reason. Fields that a newer gate adds (to a rule or to the decision) are shown as extra
facts when present; a missing optional field is shown as "–", never an error.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field
from typing import Any

DECISION_WORDS = {"pass": "promote", "fail": "keep: failed", "inconclusive": "keep: inconclusive"}
DASH = "–"
GAIN_HEADER = "gain, pts [bounds]"
GAIN_NOTE = ("Gain: candidate - live on the same items, in points (live - candidate where lower is "
             "better), with its one-sided bounds [low, high]; a paired rule passes when low clears "
             "what it needs, and fails when even high does not.")

# Rule fields the table's cells already show (or that only feed them); anything else a rule
# carries is an extra fact, shown under the row.
_RULE_CELLS = {
    "rule", "metric", "test", "verdict", "reason", "value", "reference", "op", "diff", "low", "high",
    "margin", "confidence", "n", "clusters", "passed", "threshold", "pattern", "description",
    # in the reason's words already ("detectable at this n", "items would resolve"):
    "mde", "items_needed", "mcnemar_p",
}
# Decision fields shown by the heading or the table; anything else is an extra fact.
_DECISION_CELLS = {"passed", "verdict", "decision", "rules", "config"}


@dataclass
class RuleRow:
    """One rule's cells, as text (the same on every page)."""

    title: str  # the rule's name, plus the task when one rule matched several metrics: "capability per task (arithmetic)"
    metric: str
    verdict: str  # pass | fail | inconclusive
    candidate: str
    live: str
    difference: str  # paired, the gain in points: "+4.2"; threshold: "–"
    bounds: str  # paired, one-sided bounds in points: "[-3.1, +11.0]"; threshold: "–"
    needs: str  # what passing needs: "low > -5.0" (the lower bound, points), "<= 1000"
    n: str
    reason: str
    extras: list[tuple[str, str]] = field(default_factory=list)

    @property
    def difference_and_bounds(self) -> str:
        return self.difference if self.bounds == DASH else f"{self.difference} {self.bounds}"

    @property
    def gain_compact(self) -> str:
        """"-4.2 [-16.7, +8.3] pts": the gain and its bounds, for one-line summaries."""
        return self.difference if self.bounds == DASH else f"{self.difference_and_bounds} pts"

    @property
    def note(self) -> str:
        """The reason and any extra facts, one line (what goes under the row)."""
        bits = [self.reason] if self.reason else []
        bits += [f"{k}: {v}" for k, v in self.extras]
        return "; ".join(bits)


# -- numbers -------------------------------------------------------------------------------------
def _number(x: Any) -> float | None:
    if isinstance(x, bool) or not isinstance(x, int | float) or math.isnan(x):
        return None
    return float(x) + 0.0  # + 0.0: -0.0 prints as "0", never "-0"


def fmt_value(x: Any) -> str:
    """A metric value: "777.3", "1000", "0"."""
    v = _number(x)
    if v is None:
        return DASH
    v = round(v, 9) + 0.0
    return f"{v:.4g}"


def fmt_share(x: Any) -> str:
    """A paired rule's mean: a share as a percentage (paired metrics are 0-1 scores)."""
    v = _number(x)
    if v is None:
        return DASH
    return f"{100 * v:.1f}%" if 0.0 <= v <= 1.0 else fmt_value(v)


def fmt_pts(x: Any, sign: bool = True) -> str:
    """A difference of shares in points: "+4.2", "-3.1", "0.0" (never "-0.0")."""
    v = _number(x)
    if v is None:
        return DASH
    v = round(100 * v, 1) + 0.0
    return f"{v:+.1f}" if sign and v != 0 else f"{v:.1f}"


# -- a decision ----------------------------------------------------------------------------------
def verdict_of(decision: dict[str, Any]) -> str:
    """pass | fail | inconclusive, from the stored verdict (or, in older dicts, the rules)."""
    if decision.get("verdict") in DECISION_WORDS:
        return decision["verdict"]
    verdicts = {_rule_verdict(r) for r in decision.get("rules") or []}
    if "fail" in verdicts or (not verdicts and not decision.get("passed")):
        return "fail"
    return "inconclusive" if "inconclusive" in verdicts else "pass"


def decision_word(decision: dict[str, Any]) -> str:
    """``promote``, ``keep: failed`` or ``keep: inconclusive``."""
    return DECISION_WORDS[verdict_of(decision)]


def _rule_verdict(rule: dict[str, Any]) -> str:
    v = rule.get("verdict")
    if v in DECISION_WORDS:
        return v
    return "pass" if rule.get("passed") else "fail"


def _titles(rules: list[dict[str, Any]]) -> list[str]:
    """Each rule's title: its name, plus the metric's distinguishing part (the task) when the
    rule is a pattern or its name is shared with another row."""
    labels = [str(r.get("rule") or r.get("metric") or "?") for r in rules]
    groups: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        groups.setdefault(label, []).append(i)
    titles = list(labels)
    for label, idx in groups.items():
        metrics = [str(rules[i].get("metric") or "") for i in idx]
        pattern = next((str(rules[i]["pattern"]) for i in idx if "*" in str(rules[i].get("pattern") or "")), None)
        if pattern is None and "*" in label:
            pattern = label
        if len(idx) == 1 and pattern is None:
            continue
        for i, metric in zip(idx, metrics, strict=True):
            part = _distinguishing(metric, metrics, pattern)
            if part and part != label:
                titles[i] = metric if "*" in label else f"{label} ({part})"
    return titles


def _distinguishing(metric: str, metrics: list[str], pattern: str | None) -> str:
    """The part of ``metric`` that the pattern's '*' matched, else the parts where it differs
    from the other metrics of its rule ("arithmetic" of quality.capability.arithmetic.answer_match)."""
    parts = metric.split(".")
    if pattern and fnmatch.fnmatchcase(metric, pattern):
        pparts = pattern.split(".")
        if len(pparts) == len(parts):
            picked = [p for p, q in zip(parts, pparts, strict=True) if "*" in q]
            if picked:
                return ".".join(picked)
    others = [m.split(".") for m in metrics if m != metric and len(m.split(".")) == len(parts)]
    if not others:
        return metric
    picked = [p for i, p in enumerate(parts) if any(o[i] != p for o in others)]
    return ".".join(picked) or metric


def _extras(item: dict[str, Any], known: set[str]) -> list[tuple[str, str]]:
    """Fields a newer gate added: shown as "name: value" when they have a value."""
    out = []
    for key, value in item.items():
        if key in known or value is None or value == "" or value == [] or value == {}:
            continue
        out.append((key.replace("_", " "), _plain(value)))
    return out


def _plain(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int | float):
        return fmt_value(value)
    if isinstance(value, dict):
        return ", ".join(f"{k} {_plain(v)}" for k, v in value.items())
    if isinstance(value, list | tuple):
        return ", ".join(_plain(v) for v in value)
    return str(value)


def rule_rows(decision: dict[str, Any]) -> list[RuleRow]:
    """Every rule of a stored decision, as the pages show it."""
    rules = [r for r in decision.get("rules") or [] if isinstance(r, dict)]
    rows = []
    for rule, title in zip(rules, _titles(rules), strict=True):
        test = rule.get("test") or ("threshold" if rule.get("op") else "")
        verdict = _rule_verdict(rule)
        if test in ("non_inferiority", "superiority"):
            margin = _number(rule.get("margin"))
            boundary = None if margin is None else (-margin if test == "non_inferiority" else margin)
            conf = _number(rule.get("confidence"))
            low, high = rule.get("low"), rule.get("high")
            bounds = (f"[{fmt_pts(low)}, {fmt_pts(high)}]"
                      if _number(low) is not None and _number(high) is not None else DASH)
            extras = _extras(rule, _RULE_CELLS)
            if conf is not None and bounds != DASH:
                extras.insert(0, ("bounds", f"one-sided {100 * conf:.4g}%"))
            n = _number(rule.get("n"))
            clusters = _number(rule.get("clusters"))
            n_text = DASH if n is None else f"{n:.0f}" + (
                f" ({clusters:.0f} clusters)" if clusters is not None and clusters != n else "")
            diff = rule.get("diff")
            rows.append(RuleRow(
                title=title, metric=str(rule.get("metric") or ""), verdict=verdict,
                candidate=fmt_share(rule.get("value")), live=fmt_share(rule.get("reference")),
                difference=DASH if _number(diff) is None else fmt_pts(diff),
                bounds=bounds,
                needs=DASH if boundary is None else f"low > {fmt_pts(boundary)}",
                n=n_text, reason=str(rule.get("reason") or ""), extras=extras,
            ))
        elif test == "gatekeeping":  # a copy waits for the candidate tested first (evals.gate)
            rows.append(RuleRow(
                title=title, metric=str(rule.get("metric") or ""), verdict=verdict,
                candidate=DASH, live=DASH, difference=DASH, bounds=DASH,
                needs=f"{str(rule.get('metric') or '').removeprefix('gate.')} passes every rule",
                n=DASH, reason=str(rule.get("reason") or ""), extras=_extras(rule, _RULE_CELLS),
            ))
        else:
            reference = rule.get("reference", rule.get("threshold"))
            op = rule.get("op")
            rows.append(RuleRow(
                title=title, metric=str(rule.get("metric") or ""), verdict=verdict,
                candidate=fmt_value(rule.get("value")) if _number(rule.get("value")) is not None else "missing",
                live=DASH, difference=DASH, bounds=DASH,
                needs=f"{op} {fmt_value(reference)}" if op and _number(reference) is not None else DASH,
                n=DASH, reason=str(rule.get("reason") or ""), extras=_extras(rule, _RULE_CELLS),
            ))
    return rows


def decision_facts(decision: dict[str, Any]) -> list[tuple[str, str]]:
    """The decision's own extra fields (e.g. which candidate was tested and why, its error
    budget), as (name, text) pairs."""
    return _extras(decision, _DECISION_CELLS | {"require_approval", "summary", "winner"})


# -- markdown (the report and the Prefect gate artifact) -----------------------------------------
_MD_VERDICT = {"pass": "pass", "fail": "**fail**", "inconclusive": "*inconclusive*"}


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def decision_markdown(decision: dict[str, Any]) -> str:
    """The decision as markdown: the verdict words, a table of five short columns (it fits the
    content pane of a Prefect artifact at a 1400-px window), then per rule what passing needs, n,
    the metric and the reason, keyed by the same rule titles."""
    rows = rule_rows(decision)
    lines = [f"**Gate decision: {decision_word(decision)}**", ""]
    lines += [f"- {k}: {_cell(v)}" for k, v in decision_facts(decision)]
    if lines[-1] != "":
        lines.append("")
    lines += [f"| rule | verdict | candidate | live | {GAIN_HEADER} |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {_cell(r.title)} | {_MD_VERDICT.get(r.verdict, r.verdict)} | {r.candidate} | "
                     f"{r.live} | {_cell(r.difference_and_bounds)} |")
    lines += ["", GAIN_NOTE, "", "Per rule:", ""]
    lines += [f"- **{_cell(r.title)}** ({r.verdict}): pass needs {r.needs}; n {r.n}; `{r.metric}`. "
              f"{r.note or DASH}" for r in rows]
    return "\n".join(lines)


# -- the one-line summary of a run's decision ----------------------------------------------------
def not_passed(decision: dict[str, Any]) -> str:
    """The rules that kept a candidate, named with their task and numbers, e.g.
    ``capability per task (arithmetic) fail (-8.3 [-14.0, -2.1] pts)``."""
    words = []
    # Failed rules first: they decide the keep whatever the inconclusive ones would show.
    for r in sorted(rule_rows(decision), key=lambda r: r.verdict != "fail"):
        if r.verdict == "pass":
            continue
        numbers = r.gain_compact if r.difference != DASH else (
            f"{r.candidate}, needs {r.needs}" if r.needs != DASH else r.reason)
        words.append(f"{r.title} {r.verdict}" + (f" ({numbers})" if numbers else ""))
    return ", ".join(words) or "no rule failed"


def keep_summary(decisions: dict[str, dict[str, Any]]) -> str:
    """Why live is kept: per candidate, its rules that did not pass (names, tasks, numbers)."""
    return "keep the live release: " + "; ".join(f"{v}: {not_passed(d)}" for v, d in decisions.items())
