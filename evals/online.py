"""Online evidence: a canary compared with live on live traffic, with anytime-valid bounds.

The canary serves a share of a tenant's end users (serving.gateway.upstream.route_request); every logged
exchange names the release that answered it. Each rule of ``configs/online.yaml`` reads one
per-exchange signal of both releases over the same period (since the canary started) from the
log store and bounds the difference ``worsening`` (canary minus live, or live minus canary when
lower is worse) with a **confidence sequence**: a bound that holds at every look at once, so the
check may run every minute without inflating its error (docs/ONLINE.md).

The bound, per release and rule: every signal is a number in [0, 1] (an indicator, or tokens per
answer divided by a cap), and for such a stream with mean ``p`` the Bernoulli likelihood ratio
mixed over a Beta(1, 1) prior,

    M_t(p) = B(1 + S_t, 1 + t - S_t) / (p^S_t (1 - p)^(t - S_t)),   S_t = x_1 + ... + x_t,

is a nonnegative supermartingale with initial value 1 (for x in [0, 1] the likelihood ratio of
one observation is at most its linear interpolation, whose mean is 1; Hoeffding 1963, Robbins
1970). By Ville's inequality ``{p : M_t(p) < 1/a}`` covers the mean at every t with probability
at least 1 - a (Howard, Ramdas, McAuliffe, Sekhon 2021, "Time-uniform, nonparametric,
nonasymptotic confidence sequences", Ann. Statist. 49(2), section 3: conjugate mixtures). The
canary's and live's sequences at ``alpha_rule / 2`` each give the difference's bound; the rules
share ``alpha`` equally (Bonferroni), so with probability at least 1 - alpha no rule's bound is
ever wrong, at any look: the whole online decision errs with at most that probability.

No Prefect here (flows/canary.py wraps :func:`check`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

import numpy as np
from pydantic import Field, model_validator
from scipy.special import betaln

from ground.config import StrictModel

Metric = Literal[
    "thumbs_down_rate", "edit_rate", "block_rate", "error_rate", "slow_ttft_rate", "answer_tokens"
]
Verdict = Literal["promote", "rollback", "keep_live", "continue"]
RuleState = Literal["harm", "not_harmful", "open"]

METRIC_DOC: dict[str, str] = {
    "thumbs_down_rate": "share of rated answers whose latest user rating is a thumbs-down (or score <= 2)",
    "edit_rate": "share of answered requests a user sent an edit for",
    "block_rate": "share of requests a guardrail blocked (input or output)",
    "error_rate": "share of requests that ended in an upstream error",
    "slow_ttft_rate": "share of answers whose time to first token exceeds live's p95 before the canary",
    "answer_tokens": "completion tokens per answer (capped at token_cap)",
}


class OnlineRule(StrictModel):
    """One online rule: a per-exchange signal of canary and live, a direction and margins."""

    name: str = Field(..., min_length=1, description="Name shown in reports and the release history.")
    metric: Metric = Field(..., description="The signal read from the log store (docs/ONLINE.md).")
    worse: Literal["higher", "lower"] = Field("higher", description="Which direction is harm.")
    margin: float = Field(
        ..., ge=0, description="Worsening tolerated: not harmful once the bound's upper end is below it "
        "(a rate in [0, 1]; tokens for answer_tokens).",
    )
    harm_margin: float = Field(
        0.0, ge=0, description="Harm once the bound's lower end is above it (0: worse at all).",
    )

    @model_validator(mode="after")
    def _margins(self) -> OnlineRule:
        if self.harm_margin > self.margin:
            raise ValueError(f"rule {self.name!r}: harm_margin ({self.harm_margin}) above margin ({self.margin})")
        if self.metric != "answer_tokens" and self.margin > 1:
            raise ValueError(f"rule {self.name!r}: margin {self.margin} of a rate must be in [0, 1]")
        return self


class CanaryConfig(StrictModel):
    """How a canary runs: who sees it, for how long, how often it is checked."""

    share: float = Field(0.2, gt=0, lt=1, description="Share of the tenants' end users routed to the canary.")
    tenants: list[str] = Field(
        default_factory=list, description="Tenants whose users may see the canary; [] = every tenant.",
    )
    min_duration_s: float = Field(3600, ge=0, description="A canary is promoted no sooner than this.")
    max_duration_s: float = Field(
        86400, gt=0, description="Still inconclusive after this: the canary ends and live stays.",
    )
    check_every_s: float = Field(60, gt=0, description="Seconds between scheduled checks (Prefect flow).")

    @model_validator(mode="after")
    def _durations(self) -> CanaryConfig:
        if self.min_duration_s > self.max_duration_s:
            raise ValueError(f"min_duration_s ({self.min_duration_s}) above max_duration_s ({self.max_duration_s})")
        return self


class MonitorConfig(StrictModel):
    """After a promotion: the previous release keeps a share of users while it is warm (the
    gateway's grace period), and the same rules watch the new live release against it."""

    holdback: float = Field(
        0.2, ge=0, lt=1, description="Share of the canary's tenants' users kept on the previous release; 0 = not watched.",
    )


class OnlineConfig(StrictModel):
    """configs/online.yaml: the canary stage and its anytime-valid rules."""

    alpha: float = Field(0.05, gt=0, lt=0.5, description="Error of the whole online decision (all rules, all looks).")
    canary: CanaryConfig = Field(default_factory=CanaryConfig, description="Share, tenants, durations.")
    monitor: MonitorConfig = Field(default_factory=MonitorConfig, description="Watching a release after its promotion.")
    token_cap: int = Field(1024, ge=1, description="answer_tokens: tokens per answer are capped here and scaled to [0, 1].")
    slow_ttft_ms: float | None = Field(
        None, gt=0, description="slow_ttft_rate threshold; None = live's p95 TTFT over ttft_lookback_s before the canary.",
    )
    ttft_lookback_s: float = Field(3600, gt=0, description="Window before the canary that sets live's p95 TTFT.")
    rules: list[OnlineRule] = Field(..., min_length=1, description="Every rule must resolve as not harmful to promote.")

    @model_validator(mode="after")
    def _unique(self) -> OnlineConfig:
        names = [r.name for r in self.rules]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"rules: duplicate names {dup}")
        return self

    def alpha_rule(self) -> float:
        return self.alpha / len(self.rules)


# -- the bound -------------------------------------------------------------------------------------
def _log_mixture(s: np.ndarray, n: np.ndarray, p: np.ndarray, log_b: np.ndarray) -> np.ndarray:
    """log M_t(p) of the Beta(1, 1)-mixed Bernoulli likelihood ratio (module docstring);
    ``log_b`` is ``betaln(1 + s, 1 + n - s)``, which does not depend on p."""
    return log_b - s * np.log(p) - (n - s) * np.log1p(-p)


def mean_cs(s: Any, n: Any, alpha: float, iters: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """Anytime-valid confidence sequence for the mean of [0, 1] values, from their sum ``s`` and
    count ``n`` (arrays broadcast): ``(lower, upper)``. With n = 0 it is [0, 1].

    Found by bisection on the convex ``log M(p)`` on each side of ``s / n`` (vectorized, so the
    benchmark evaluates thousands of looks at once).
    """
    s = np.asarray(s, dtype=float)
    n = np.asarray(n, dtype=float)
    s, n = np.broadcast_arrays(s, n)
    thr = math.log(1 / alpha)
    phat = np.where(n > 0, s / np.maximum(n, 1), 0.5)
    eps = 1e-12
    log_b = betaln(1 + s, 1 + n - s)
    out = []
    for side in (0, 1):
        # inside = towards phat; outside = towards 0 or 1
        inside = np.clip(phat, eps, 1 - eps)
        outside = np.full_like(phat, eps if side == 0 else 1 - eps)
        beyond = _log_mixture(s, n, outside, log_b) < thr  # the bound reaches the edge
        for _ in range(iters):
            mid = (inside + outside) / 2
            crossed = _log_mixture(s, n, mid, log_b) >= thr
            outside = np.where(crossed, mid, outside)
            inside = np.where(crossed, inside, mid)
        edge = 0.0 if side == 0 else 1.0
        bound = np.where(beyond | (n == 0), edge, (inside + outside) / 2)
        out.append(bound)
    return out[0], out[1]


def worsening_bound(
    canary: tuple[Any, Any], live: tuple[Any, Any], alpha: float, worse: str = "higher"
) -> tuple[np.ndarray, np.ndarray]:
    """Anytime-valid bound at level ``alpha`` on the worsening (canary's mean minus live's, or
    the reverse when lower is worse) from each release's (sum, count) of [0, 1] values."""
    lc, hc = mean_cs(*canary, alpha / 2)
    ll, hl = mean_cs(*live, alpha / 2)
    if worse == "higher":
        return lc - hl, hc - ll
    return ll - hc, hl - lc


def rule_state(lower: float, upper: float, rule: OnlineRule, scale: float = 1.0) -> RuleState:
    """harm once the worsening is surely above ``harm_margin``; not harmful once surely below
    ``margin``; open otherwise (harm wins if both: roll back as soon as one resolves as harm)."""
    if lower * scale > rule.harm_margin:
        return "harm"
    if upper * scale < rule.margin:
        return "not_harmful"
    return "open"


# -- reading the log store ---------------------------------------------------------------------------
@dataclass
class Signals:
    """Per metric, per release: (sum, count) of the [0, 1] values, plus what was read."""

    sums: dict[str, dict[str, tuple[float, int]]] = field(default_factory=dict)
    exchanges: dict[str, int] = field(default_factory=dict)
    slow_ttft_ms: float | None = None


SIGNAL_COLUMNS = ["id", "release", "status", "verdicts", "usage", "ttft_ms", "latency_ms"]
"""What the rules read of a logged exchange (not its messages or answer)."""


def _is_down(payload: dict[str, Any]) -> bool:
    thumbs = payload.get("thumbs")
    if thumbs is not None:
        return thumbs == "down"
    score = payload.get("score")
    return score is not None and float(score) <= 2


def _ttft_ms(ex: dict[str, Any]) -> float | None:
    """Time to first token as the client saw it: a stream's first token, or a whole answer's
    latency (it arrives at once)."""
    return ex.get("ttft_ms") if ex.get("ttft_ms") is not None else ex.get("latency_ms")


def exchange_values(
    ex: dict[str, Any], ratings: dict[str, bool], edited: set[str], cfg: OnlineConfig, slow_ms: float | None
) -> dict[str, float]:
    """The [0, 1] value of each metric this exchange contributes to (absent: not counted)."""
    status = ex["status"]
    if status in ("client_error", "cancelled"):  # the client's doing, not the release's
        return {}
    blocked = status == "blocked" or any(v.get("action") == "block" for v in ex.get("verdicts") or [])
    out: dict[str, float] = {
        "block_rate": float(blocked),
        "error_rate": float(status == "upstream_error"),
    }
    if status == "ok":
        out["edit_rate"] = float(ex["id"] in edited)
        if ex["id"] in ratings:
            out["thumbs_down_rate"] = float(ratings[ex["id"]])
        if slow_ms is not None and (ttft := _ttft_ms(ex)) is not None:
            out["slow_ttft_rate"] = float(ttft > slow_ms)
        tokens = (ex.get("usage") or {}).get("completion_tokens")
        if tokens is not None:
            out["answer_tokens"] = min(float(tokens), cfg.token_cap) / cfg.token_cap
    return out


def read_signals(
    store: Any, canary_id: str, live_id: str, since: datetime, until: datetime,
    tenants: list[str] | None, cfg: OnlineConfig,
) -> Signals:
    """Both releases' signals over ``[since, until)`` (the canary's period) in ``tenants``.

    Feedback counts when given by end users (``user`` or ``simulated``), not reviewers; an
    exchange's rating is its latest one.
    """
    tenants = tenants or None
    slow = cfg.slow_ttft_ms
    if slow is None:
        before = [
            t for e in store.exchanges(since - timedelta(seconds=cfg.ttft_lookback_s), since, tenants, [live_id],
                                       columns=SIGNAL_COLUMNS)
            if e["status"] == "ok" and (t := _ttft_ms(e)) is not None
        ]
        slow = float(np.quantile(before, 0.95)) if len(before) >= 20 else None
    ratings: dict[str, bool] = {}
    edited: set[str] = set()
    for fb in store.feedback_events(since, None, tenants):
        if fb.get("actor_role", "user") not in ("user", "simulated"):
            continue
        if fb["kind"] == "rating":
            ratings[fb["request_id"]] = _is_down(fb["payload"] or {})
        elif fb["kind"] == "edit":
            edited.add(fb["request_id"])
    sig = Signals(slow_ttft_ms=slow)
    acc = {m: {canary_id: [0.0, 0], live_id: [0.0, 0]} for m in METRIC_DOC}
    counts = {canary_id: 0, live_id: 0}
    for ex in store.exchanges(since, until, tenants, [canary_id, live_id], columns=SIGNAL_COLUMNS):
        rid = ex["release"]
        counts[rid] += 1
        for metric, value in exchange_values(ex, ratings, edited, cfg, slow).items():
            acc[metric][rid][0] += value
            acc[metric][rid][1] += 1
    sig.sums = {m: {r: (v[0], v[1]) for r, v in per.items()} for m, per in acc.items()}
    sig.exchanges = counts
    return sig


# -- the decision --------------------------------------------------------------------------------------
@dataclass
class RuleResult:
    rule: str
    metric: str
    worse: str
    canary: float | None  # the canary's mean (metric units), None without data
    live: float | None
    n_canary: int
    n_live: int
    lower: float  # bound on the worsening, metric units
    upper: float
    margin: float
    harm_margin: float
    alpha: float
    state: RuleState


@dataclass
class OnlineDecision:
    """One check of a canary: each rule's bound and state, and the verdict."""

    canary: str
    live: str
    verdict: Verdict
    reason: str
    elapsed_s: float
    alpha: float
    rules: list[RuleResult]
    exchanges: dict[str, int]
    slow_ttft_ms: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_markdown(self) -> str:
        """Each rule's bound and state, then the verdict (the Prefect artifact, the CLI)."""
        lines = [
            f"## Canary {self.canary} vs live {self.live}: **{self.verdict}**", "",
            self.reason, "",
            f"{_dur(self.elapsed_s)} in; exchanges canary {self.exchanges.get(self.canary, 0)}, "
            f"live {self.exchanges.get(self.live, 0)}; whole decision alpha {self.alpha:g} "
            f"({self.rules[0].alpha:g} per rule, every look)", "",
            "| rule | harm is | canary | live | n canary / live | worsening bound | not harmful below | harm above | state |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in self.rules:
            fmt = _fmt(r.metric)
            lines.append(
                f"| {r.rule} | {r.worse} {r.metric} | {fmt(r.canary)} | {fmt(r.live)} | {r.n_canary} / {r.n_live} "
                f"| [{fmt(r.lower)}, {fmt(r.upper)}] | {fmt(r.margin)} | {fmt(r.harm_margin)} | {r.state} |"
            )
        return "\n".join(lines) + "\n"


def _fmt(metric: str):
    def f(v: float | None) -> str:
        if v is None:
            return "-"
        return f"{v:.1f}" if metric == "answer_tokens" else f"{100 * v:.2f}%"
    return f


def _dur(s: float) -> str:
    return f"{s / 3600:.2f} h" if s >= 3600 else f"{s / 60:.1f} min"


def decide(
    cfg: OnlineConfig, sig: Signals, canary_id: str, live_id: str, elapsed_s: float
) -> OnlineDecision:
    """Each rule's bound and state from the signals; the verdict by the canary's rules:
    rollback as soon as one rule is harm; promote when every rule is not harmful and the minimum
    duration has passed; keep live once the maximum has passed; continue otherwise."""
    a = cfg.alpha_rule()
    results = []
    for rule in cfg.rules:
        scale = float(cfg.token_cap) if rule.metric == "answer_tokens" else 1.0
        c, lv = sig.sums.get(rule.metric, {}).get(canary_id, (0.0, 0)), sig.sums.get(rule.metric, {}).get(live_id, (0.0, 0))
        if rule.metric == "slow_ttft_rate" and sig.slow_ttft_ms is None:
            c, lv = (0.0, 0), (0.0, 0)  # no threshold: the rule cannot resolve
        lo, hi = worsening_bound(c, lv, a, rule.worse)
        lo, hi = float(lo), float(hi)
        results.append(RuleResult(
            rule.name, rule.metric, rule.worse,
            c[0] / c[1] * scale if c[1] else None, lv[0] / lv[1] * scale if lv[1] else None,
            c[1], lv[1], lo * scale, hi * scale, rule.margin, rule.harm_margin, a,
            rule_state(lo, hi, rule, scale),
        ))
    harm = [r.rule for r in results if r.state == "harm"]
    open_ = [r.rule for r in results if r.state == "open"]
    if harm:
        verdict, reason = "rollback", f"harm resolved on {', '.join(harm)}"
    elif not open_ and elapsed_s >= cfg.canary.min_duration_s:
        verdict, reason = "promote", f"every rule resolved as not harmful ({', '.join(r.rule for r in results)})"
    elif elapsed_s >= cfg.canary.max_duration_s:
        verdict, reason = "keep_live", (f"inconclusive at the maximum duration ({_dur(cfg.canary.max_duration_s)}): "
                                        f"{', '.join(open_)} still open")
    elif not open_:
        verdict, reason = "continue", f"every rule not harmful; promotion after the minimum duration ({_dur(cfg.canary.min_duration_s)})"
    else:
        verdict, reason = "continue", f"open: {', '.join(open_)}"
    if rule_missing := [r.rule for r in results if r.metric == "slow_ttft_rate" and sig.slow_ttft_ms is None]:
        reason += f" (no TTFT threshold for {', '.join(rule_missing)}: live served too few answers before the canary)"
    return OnlineDecision(canary_id, live_id, verdict, reason, elapsed_s, cfg.alpha, results, sig.exchanges,
                          sig.slow_ttft_ms)


def check(
    cfg: OnlineConfig, store: Any, canary_id: str, live_id: str, started_at: datetime, now: datetime,
    tenants: Iterable[str] | None = None,
) -> OnlineDecision:
    """One look at a running canary: read both releases' signals since it started, decide."""
    tenants = list(tenants if tenants is not None else cfg.canary.tenants)
    sig = read_signals(store, canary_id, live_id, started_at, now, tenants, cfg)
    return decide(cfg, sig, canary_id, live_id, (now - started_at).total_seconds())
