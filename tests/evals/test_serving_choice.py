"""evals.serving_choice on plain dicts: the H100 table from docs/PLATFORM.md is the fixture data."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest

from evals.serving_choice import (
    Slo,
    Workload,
    choose,
    concurrency_from_logs,
    measurement_from_dict,
    usd_per_1m_tokens,
    workload_from_logs,
)
from ground.config import ConfigError

# Output tok/s, 8B-class Llama, dummy weights, vLLM 0.26.0 on one H100 (docs/PLATFORM.md).
H100_TABLE = {
    1: {"bf16": 155.8, "w4a16": 243.6, "w4a16-marlin": 301.2},
    8: {"bf16": 1178, "w4a16": 1807, "w4a16-marlin": 2258},
    64: {"bf16": 8113, "w4a16": 9589, "w4a16-marlin": 9462},
    256: {"bf16": 20009, "w4a16": 19518, "w4a16-marlin": 15143},
}
META = {
    "bf16": ("bf16", "default"),
    "w4a16": ("w4a16", "default"),
    "w4a16-marlin": ("w4a16", "marlin"),
}


def bench_rows(ttft: dict[str, float] | None = None) -> list[dict]:
    """The table as `vllm bench serve`-style result dicts (its key names)."""
    rows = []
    for conc, per in H100_TABLE.items():
        for variant, tok_s in per.items():
            scheme, kernel = META[variant]
            rows.append(
                {
                    "variant": variant,
                    "scheme": scheme,
                    "kernel": kernel,
                    "max_concurrency": conc,
                    "output_throughput": tok_s,
                    "p95_ttft_ms": (ttft or {}).get(variant, 50.0) * (1 + conc / 64),
                    "p95_tpot_ms": 256 * conc / tok_s * 1000 / 256,  # per-stream ms per token
                    "failed": 0,
                }
            )
    return rows


@pytest.mark.parametrize(
    ("concurrency", "expected"),
    [(1, "w4a16-marlin"), (8, "w4a16-marlin"), (64, "w4a16"), (256, "bf16")],
)
def test_cheapest_variant_follows_the_workload(concurrency: int, expected: str) -> None:
    d = choose(bench_rows(), Workload(concurrency=concurrency, usd_per_hour=3.0))
    assert d["chosen"]["variant"] == expected
    assert d["chosen"]["concurrency_used"] == concurrency
    assert expected in d["reason"] and f"concurrency {concurrency}" in d["reason"]
    costs = [r["usd_per_1m_output_tokens"] for r in d["candidates"]]
    assert costs == sorted(costs) and d["candidates"][0]["variant"] == expected
    # every rejected candidate says why
    assert all(r["why_not"] for r in d["candidates"][1:])


def test_marlin_choice_sets_the_kernel_env_and_the_speedup() -> None:
    d = choose(bench_rows(), Workload(concurrency=1, usd_per_hour=3.0))
    assert d["serving_config"] == {
        "scheme": "w4a16",
        "kernel": "marlin",
        "env": {"VLLM_DISABLED_KERNELS": "MacheteLinearKernel"},
    }
    assert d["chosen"]["speedup_vs_baseline"] == pytest.approx(301.2 / 155.8, abs=1e-3)
    assert d["baseline_variant"] == "bf16"
    assert d["table"]["bf16"] == {1: 155.8, 8: 1178, 64: 8113, 256: 20009}


def test_cost_is_price_over_throughput() -> None:
    assert usd_per_1m_tokens(3.6, 1000.0) == pytest.approx(1.0)
    d = choose(bench_rows(), Workload(concurrency=256, usd_per_hour=3.6))
    assert d["chosen"]["usd_per_1m_output_tokens"] == pytest.approx(
        1e6 * 3.6 / 3600 / 20009, rel=1e-3
    )


def test_slo_excludes_the_cheapest_when_it_is_too_slow() -> None:
    # Marlin's TTFT made bad: the next cheapest that meets the SLO (Machete) wins at c=8.
    rows = bench_rows(ttft={"w4a16-marlin": 900.0})
    d = choose(rows, Workload(concurrency=8, usd_per_hour=3.0, slo=Slo(p95_ttft_ms=500)))
    assert d["chosen"]["variant"] == "w4a16"
    marlin = next(r for r in d["candidates"] if r["variant"] == "w4a16-marlin")
    assert not marlin["meets_slo"] and "TTFT" in marlin["why_not"][0]


def test_no_variant_meets_the_slo() -> None:
    d = choose(bench_rows(), Workload(concurrency=256, usd_per_hour=3.0, slo=Slo(p95_ttft_ms=1)))
    assert d["chosen"] is None and d["serving_config"] is None
    assert "no variant meets the SLO" in d["reason"]


def test_failed_requests_break_the_slo() -> None:
    rows = bench_rows()
    for r in rows:
        if r["variant"] == "bf16" and r["max_concurrency"] == 256:
            r["failed"] = 3
    d = choose(rows, Workload(concurrency=256, usd_per_hour=3.0))
    assert d["chosen"]["variant"] == "w4a16"


def test_quality_gate_excludes_variants() -> None:
    d = choose(
        bench_rows(), Workload(concurrency=1, usd_per_hour=3.0), allowed_variants=["bf16", "w4a16"]
    )
    assert d["chosen"]["variant"] == "w4a16"
    marlin = next(r for r in d["candidates"] if r["variant"] == "w4a16-marlin")
    assert marlin["why_not"] == ["did not pass the quality gate"]


def test_the_live_reference_is_not_said_to_have_failed_the_gate() -> None:
    """The baseline is live's copy, gated against by the candidates, never a candidate itself."""
    d = choose(bench_rows(), Workload(concurrency=1, usd_per_hour=3.0), allowed_variants=["w4a16"],
               baseline_variant="bf16")
    live = next(r for r in d["candidates"] if r["variant"] == "bf16")
    assert live["why_not"] == ["live release (the reference, not a candidate)"]
    marlin = next(r for r in d["candidates"] if r["variant"] == "w4a16-marlin")
    assert marlin["why_not"] == ["did not pass the quality gate"]


def test_unmeasured_concurrency_uses_the_next_measured_above() -> None:
    d = choose(bench_rows(), Workload(concurrency=100, usd_per_hour=3.0))
    assert d["chosen"]["concurrency_used"] == 256 and d["chosen"]["variant"] == "bf16"
    assert "next measured above" in d["reason"]
    d = choose(bench_rows(), Workload(concurrency=1000, usd_per_hour=3.0))
    assert "above the highest measured" in d["chosen"]["point"]


def test_missing_slo_metric_fails_that_rule() -> None:
    rows = [r | {"p95_tpot_ms": None} for r in bench_rows()]
    d = choose(rows, Workload(concurrency=1, usd_per_hour=3.0, slo=Slo(p95_tpot_ms=50)))
    assert d["chosen"] is None and "not measured" in d["reason"]


def test_bad_input_names_the_field() -> None:
    with pytest.raises(ConfigError, match="output_tok_s"):
        measurement_from_dict({"variant": "x", "scheme": "bf16", "concurrency": 1})
    with pytest.raises(ConfigError, match="scheme"):
        measurement_from_dict(
            {"variant": "x", "scheme": "int3", "concurrency": 1, "output_tok_s": 1}
        )
    with pytest.raises(ConfigError, match="empty"):
        choose([], Workload(concurrency=1, usd_per_hour=1))
    with pytest.raises(ConfigError, match="baseline_variant"):
        choose(bench_rows(), Workload(concurrency=1, usd_per_hour=1), baseline_variant="nope")


def test_nested_percentiles_are_read() -> None:
    m = measurement_from_dict(
        {
            "variant": "fp8",
            "scheme": "fp8-dynamic",
            "concurrency": 8,
            "output_tok_s": 2000,
            "ttft_ms": {"p50": 10, "p95": 20, "p99": 30},
            "tpot_ms": {"p95": 5},
        }
    )
    assert (m.p95_ttft_ms, m.p95_tpot_ms, m.kernel) == (20, 5, "default")


def _log(start: datetime, offset_s: float, latency_s: float) -> dict:
    end = start + timedelta(seconds=offset_s + latency_s)
    return {"created_at": end, "latency_ms": latency_s * 1000}


def test_concurrency_from_logs_counts_overlaps() -> None:
    t0 = datetime(2026, 11, 27, 8, 0, 0)
    # 8 requests of 10 s arriving together, then a lone request much later.
    logs = [_log(t0, 0.1 * i, 10) for i in range(8)] + [_log(t0, 100, 1)]
    conc, stats = concurrency_from_logs(logs, quantile=1.0)
    assert conc == 8 and stats["peak"] == 8 and stats["exchanges"] == 9
    # serial traffic: never more than one in flight
    serial = [_log(t0, 2 * i, 1) for i in range(20)]
    assert concurrency_from_logs(serial)[0] == 1
    # the same spans given as start times
    starts = [
        {"created_at": (t0 + timedelta(seconds=0.1 * i)).isoformat(), "latency_ms": 10_000}
        for i in range(8)
    ]
    assert concurrency_from_logs(starts, quantile=1.0, timestamp="start")[0] == 8


def test_workload_from_logs_drives_the_choice() -> None:
    t0 = datetime(2026, 11, 27, 8, 0, 0)
    logs = [_log(t0, 0.01 * i, 30) for i in range(256)]
    w = workload_from_logs(logs, usd_per_hour=3.0)
    assert w.concurrency >= 200 and w.source.startswith("logs:")
    assert choose(bench_rows(), w)["chosen"]["variant"] == "bf16"
    with pytest.raises(ConfigError, match="latency_ms"):
        concurrency_from_logs([{"created_at": t0}])


def test_perf_suite_metrics_feed_the_choice() -> None:
    """The flat metrics the perf suite writes (metrics.json) are read per grid level."""
    from evals.serving_choice import measurements_from_perf_metrics

    def metrics(per_c: dict[int, float]) -> dict[str, float]:
        out = {"perf.output_tokens_per_s": 1.0}
        for c, tok in per_c.items():
            out |= {
                f"perf.grid.c{c}.output_tokens_per_s": tok,
                f"perf.grid.c{c}.ttft_p95_ms": 100.0,
                f"perf.grid.c{c}.tpot_p95_ms": 10.0,
                f"perf.grid.c{c}.failed": 0.0,
            }
        return out

    pts = measurements_from_perf_metrics(
        "bf16", "bf16", "default", metrics({c: r["bf16"] for c, r in H100_TABLE.items()})
    )
    pts += measurements_from_perf_metrics(
        "w4a16-marlin",
        "w4a16",
        "marlin",
        metrics({c: r["w4a16-marlin"] for c, r in H100_TABLE.items()}),
    )
    assert [p.concurrency for p in pts[:4]] == [1, 8, 64, 256]
    assert (
        choose(pts, Workload(concurrency=1, usd_per_hour=3))["chosen"]["variant"] == "w4a16-marlin"
    )
    assert choose(pts, Workload(concurrency=256, usd_per_hour=3))["chosen"]["variant"] == "bf16"
    with pytest.raises(ConfigError, match="no perf.grid"):
        measurements_from_perf_metrics("x", "bf16", "default", {"perf.output_tokens_per_s": 1.0})
