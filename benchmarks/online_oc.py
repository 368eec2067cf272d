"""The online rules' operating characteristics: a simulated canary checked every simulated minute.

    .venv/bin/python benchmarks/online_oc.py --seeds 400 --out benchmarks/results/online_oc.json

Seeded traffic: ``rpm`` requests a minute (Poisson) from a population of end users, each with
their own thumbs-down propensity (Beta, mean ``thumbs_down``); each user is routed to the canary
or to live once, by a coin of probability ``share`` (sticky, as serving.gateway.upstream.route_request
does by hash). Per request: rated with probability ``rated``, edited, blocked, failed, slow, and
a completion length, at rates that are the same for both releases unless the scenario changes
them. Every minute the rules of configs/online.yaml (evals/online.py, unchanged) look at the
cumulative counts and decide: rollback at the first look with a harm, promote at the first look
after the minimum duration with every rule not harmful, keep live at the maximum.

``--procedure fixed-n`` runs the same looks with a fixed-sample Wald interval per rule (at the
same per-rule alpha): what peeking every minute does to a test that is not anytime-valid.
The table goes to BENCHMARKS.md ("Online rules"); rates carry 95% Wilson intervals over seeds.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from scipy.stats import norm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evals.online import OnlineConfig, rule_state, worsening_bound  # noqa: E402
from ground.config import load_config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Traffic:
    """The simulated traffic in the canary's tenants (both releases together)."""

    rpm: float = 120.0  # requests a minute
    users: int = 20_000
    rated: float = 0.3  # share of answers a user rates
    thumbs_down: float = 0.10  # mean propensity to rate an answer down (live)
    user_concentration: float = 20.0  # Beta(a, b) with a + b = this: users differ (sd 0.065 at 0.10)
    edit: float = 0.03
    block: float = 0.02
    error: float = 0.005
    slow: float = 0.05  # share above live's p95 TTFT (5% by definition for live)
    tokens_mean: float = 200.0  # completion tokens, Beta-distributed below token_cap


@dataclass
class Scenario:
    name: str
    truth: str  # "equal" | "worse": which verdicts are wrong
    thumbs_down_delta: float = 0.0  # added to each user's propensity on the canary's answers
    changes: dict[str, float] = field(default_factory=dict)  # other rates of the canary


SCENARIOS = {
    "equal": Scenario("equal: canary = live", "equal"),
    "td+5": Scenario("thumbs-down +5 points", "worse", 0.05),
    "td+3": Scenario("thumbs-down +3 points (= margin)", "worse", 0.03),
    "errors+1": Scenario("errors +1 point", "worse", changes={"error": 0.015}),
}


def _minute_sums(rng: np.random.Generator, minutes: int, tr: Traffic, share: float, sc: Scenario,
                 cap: int) -> dict[str, dict[str, np.ndarray]]:
    """Per metric, per arm: cumulative (sum, count) after each minute."""
    n = rng.poisson(tr.rpm * minutes)
    minute = rng.integers(0, minutes, n)
    a = tr.thumbs_down * tr.user_concentration
    prop = rng.beta(a, tr.user_concentration - a, tr.users)
    on_canary = rng.random(tr.users) < share
    user = rng.integers(0, tr.users, n)
    canary = on_canary[user]

    def rate(name: str) -> np.ndarray:
        base = getattr(tr, name)
        return np.where(canary, sc.changes.get(name, base), base)

    blocked = rng.random(n) < rate("block")
    error = ~blocked & (rng.random(n) < rate("error"))
    ok = ~blocked & ~error
    p_down = np.clip(prop[user] + np.where(canary, sc.thumbs_down_delta, 0.0), 0, 1)
    rated = ok & (rng.random(n) < tr.rated)
    down = rng.random(n) < p_down
    edited = rng.random(n) < rate("edit")
    slow = rng.random(n) < rate("slow")
    m = tr.tokens_mean / cap * 4
    tokens = rng.beta(m, 4 - m, n)  # scaled completion length in [0, 1]
    values = {  # metric -> (value, counted?)
        "thumbs_down_rate": (down, rated),
        "edit_rate": (edited, ok),
        "block_rate": (blocked, np.ones(n, bool)),
        "error_rate": (error, np.ones(n, bool)),
        "slow_ttft_rate": (slow, ok),
        "answer_tokens": (tokens, ok),
    }
    out: dict[str, dict[str, np.ndarray]] = {}
    for metric, (v, counted) in values.items():
        out[metric] = {}
        for arm, sel in (("canary", canary), ("live", ~canary)):
            w = counted & sel
            s = np.bincount(minute[w], weights=v[w].astype(float), minlength=minutes).cumsum()
            c = np.bincount(minute[w], minlength=minutes).cumsum()
            out[metric][arm] = (s, c)
    return out


def _fixed_n_bound(c: tuple, lv: tuple, alpha: float, worse: str) -> tuple[np.ndarray, np.ndarray]:
    """A fixed-sample Wald interval on the difference (wrong when looked at repeatedly)."""
    (sc, nc), (sl, nl) = c, lv
    pc, pl = sc / np.maximum(nc, 1), sl / np.maximum(nl, 1)
    se = np.sqrt(pc * (1 - pc) / np.maximum(nc, 1) + pl * (1 - pl) / np.maximum(nl, 1))
    z = norm.ppf(1 - alpha / 2)
    d = pc - pl if worse == "higher" else pl - pc
    lo, hi = d - z * se, d + z * se
    empty = (nc < 2) | (nl < 2)
    return np.where(empty, -1.0, lo), np.where(empty, 1.0, hi)


def run_seed(cfg: OnlineConfig, tr: Traffic, sc: Scenario, seed: int, procedure: str = "anytime",
             minutes: int | None = None) -> tuple[str, float]:
    """(verdict, minutes until it) for one seeded canary, looked at every minute."""
    minutes = minutes or int(cfg.canary.max_duration_s // 60)
    rng = np.random.default_rng(seed)
    sums = _minute_sums(rng, minutes, tr, cfg.canary.share, sc, cfg.token_cap)
    a = cfg.alpha_rule()
    harm = np.zeros(minutes, bool)
    all_ok = np.ones(minutes, bool)
    for rule in cfg.rules:
        scale = float(cfg.token_cap) if rule.metric == "answer_tokens" else 1.0
        c, lv = sums[rule.metric]["canary"], sums[rule.metric]["live"]
        if procedure == "anytime":
            lo, hi = worsening_bound(c, lv, a, rule.worse)
        else:
            lo, hi = _fixed_n_bound(c, lv, a, rule.worse)
        states = np.array([rule_state(x, y, rule, scale) for x, y in zip(lo, hi, strict=True)])
        harm |= states == "harm"
        all_ok &= states == "not_harmful"
    look_s = (np.arange(minutes) + 1) * 60.0
    promote = all_ok & (look_s >= cfg.canary.min_duration_s)
    t_harm = int(np.argmax(harm)) if harm.any() else minutes
    t_promote = int(np.argmax(promote)) if promote.any() else minutes
    if t_harm < minutes and t_harm <= t_promote:
        return "rollback", t_harm + 1
    if t_promote < minutes:
        return "promote", t_promote + 1
    return "keep_live", minutes


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return 0.0, 1.0
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0.0, c - h), min(1.0, c + h)


def run_scenario(cfg: OnlineConfig, tr: Traffic, sc: Scenario, seeds: range, procedure: str = "anytime",
                 minutes: int | None = None) -> dict:
    """Counts of each verdict over ``seeds``, the wrong-verdict rate, and minutes to rollback."""
    verdicts, times = [], []
    for seed in seeds:
        v, t = run_seed(cfg, tr, sc, seed, procedure, minutes)
        verdicts.append(v)
        times.append(t)
    n = len(verdicts)
    counts = {k: verdicts.count(k) for k in ("rollback", "promote", "keep_live")}
    wrong = counts["rollback"] if sc.truth == "equal" else counts["promote"]
    rb = sorted(t for v, t in zip(verdicts, times, strict=True) if v == "rollback")
    pr = sorted(t for v, t in zip(verdicts, times, strict=True) if v == "promote")
    return {
        "scenario": sc.name, "truth": sc.truth, "procedure": procedure, "seeds": n,
        "counts": counts, "wrong": wrong, "wrong_rate": wrong / n, "wrong_ci95": wilson(wrong, n),
        "rollback_rate": counts["rollback"] / n, "rollback_ci95": wilson(counts["rollback"], n),
        "promote_rate": counts["promote"] / n,
        "rollback_minutes_median": float(np.median(rb)) if rb else None,
        "rollback_minutes_p90": float(np.quantile(rb, 0.9)) if rb else None,
        "promote_minutes_median": float(np.median(pr)) if pr else None,
    }


def markdown(rows: list[dict], tr: Traffic, cfg: OnlineConfig) -> str:
    lines = [
        f"Traffic: {tr.rpm:g} requests/min in the canary's tenants, canary share {cfg.canary.share:g} "
        f"(sticky per user, {tr.users} users), {tr.rated:.0%} of answers rated, live thumbs-down "
        f"{tr.thumbs_down:.0%}; looks every minute for {cfg.canary.max_duration_s / 3600:g} h; "
        f"min duration {cfg.canary.min_duration_s / 3600:g} h; alpha {cfg.alpha:g} over {len(cfg.rules)} rules.",
        "",
        "| scenario | procedure | seeds | rolled back | promoted | kept live | wrong (95% CI) | rollback minute median / p90 | promotion minute median |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        c, lo_hi = r["counts"], r["wrong_ci95"]
        wrong = "rolled back" if r["truth"] == "equal" else "promoted"
        med = r["rollback_minutes_median"]
        lines.append(
            f"| {r['scenario']} | {r['procedure']} | {r['seeds']} | {c['rollback'] / r['seeds']:.1%} | "
            f"{c['promote'] / r['seeds']:.1%} | {c['keep_live'] / r['seeds']:.1%} | {wrong} {r['wrong_rate']:.1%} "
            f"({lo_hi[0]:.1%}-{lo_hi[1]:.1%}) | "
            + (f"{med:.0f} / {r['rollback_minutes_p90']:.0f} |" if med is not None else "- |")
            + (f" {r['promote_minutes_median']:.0f} |" if r["promote_minutes_median"] is not None else " - |")
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(REPO / "configs" / "online.yaml"))
    ap.add_argument("--seeds", type=int, default=400)
    ap.add_argument("--scenarios", nargs="+", default=list(SCENARIOS))
    ap.add_argument("--procedures", nargs="+", default=["anytime", "fixed-n"])
    ap.add_argument("--rpm", type=float, default=Traffic.rpm)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "online_oc.json"))
    args = ap.parse_args()
    cfg = load_config(OnlineConfig, args.config)
    tr = Traffic(rpm=args.rpm)
    rows = []
    t0 = time.time()
    for proc in args.procedures:
        for key in args.scenarios:
            if proc != "anytime" and key not in ("equal", "td+5"):
                continue
            rows.append(run_scenario(cfg, tr, SCENARIOS[key], range(args.seeds), proc))
            print(json.dumps(rows[-1]), flush=True)
    # The harshest peeking: an equal release watched every minute for the whole maximum with no
    # promotion to end it (what the post-promotion monitor does).
    watch = cfg.model_copy(deep=True)
    watch.canary.min_duration_s = watch.canary.max_duration_s
    for proc in args.procedures:
        sc = Scenario(f"equal, watched {watch.canary.max_duration_s / 3600:g} h without promotion", "equal")
        rows.append(run_scenario(watch, tr, sc, range(args.seeds), proc))
        print(json.dumps(rows[-1]), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"command": " ".join(sys.argv), "traffic": asdict(tr), "config": cfg.model_dump(mode="json"),
            "seconds": round(time.time() - t0, 1)}
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    out.with_suffix(".md").write_text(markdown(rows, tr, cfg))
    print(markdown(rows, tr, cfg))


if __name__ == "__main__":
    main()
