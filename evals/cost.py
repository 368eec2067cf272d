"""Cost: $ per 1M output tokens at the highest load meeting the SLO, and $ per 1k answers.

A machine serving at ``perf.output_tokens_per_s`` (throughput at the SLO operating point, see
:mod:`evals.perf`) for an hour produces ``3600 * tok/s`` tokens for ``usd_per_hour``; an answer
costs its mean token count (``quality.answer_tokens_mean``) at that price, so alignment that
makes answers shorter makes them cheaper even at equal throughput. Pure arithmetic over the
other suites' metrics.
"""

from __future__ import annotations

from evals.config import CostConfig


def run(cfg: CostConfig, metrics: dict[str, float]) -> dict[str, float]:
    """Cost metrics from perf (and quality) metrics; raises naming a missing input."""
    if cfg.machine not in cfg.usd_per_hour:
        raise ValueError(f"cost.machine {cfg.machine!r} has no price in cost.usd_per_hour "
                         f"(known: {sorted(cfg.usd_per_hour)})")
    usd_per_hour = cfg.usd_per_hour[cfg.machine]
    out: dict[str, float] = {"cost.usd_per_hour": usd_per_hour}
    tok_s = metrics.get("perf.output_tokens_per_s")
    if tok_s is None:
        raise KeyError("cost needs perf.output_tokens_per_s (run the perf suite first)")
    if tok_s <= 0:
        return out  # nothing served: no price (the gate's missing-metric rule catches it)
    usd_per_1m = usd_per_hour / (tok_s * 3600) * 1e6
    out["cost.usd_per_1m_output_tokens"] = usd_per_1m
    # Meeting the SLO or not, the price is at the operating point; say which one it is.
    out["cost.at_slo"] = float(metrics.get("perf.meets_slo", 0.0))
    answer_tokens = metrics.get("quality.answer_tokens_mean", metrics.get("safety.benign.answer_tokens_mean"))
    if answer_tokens is not None:
        out["cost.answer_tokens_mean"] = answer_tokens
        out["cost.usd_per_1k_answers"] = usd_per_1m * answer_tokens * 1000 / 1e6
    if "perf.gateway_latency_share" in metrics:
        out["cost.guardrail_latency_share"] = metrics["perf.gateway_latency_share"]
    return out
