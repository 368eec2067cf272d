"""Choose the serving config (quantization scheme and kernel) from measured performance.

No single config is best: on an H100 with an 8B-class Llama (benchmarks/gpu/RESULTS.md), W4A16 with the Marlin
kernel decodes 1.93x faster than bf16 at concurrency 1 but 0.76x at 256, and vLLM's default int4
kernel (Machete) sits in between. So the choice follows the workload: at the concurrency the logs
show (or the config states), take the cheapest $ per 1M output tokens among the variants that
meet the SLO there and passed the quality gate. The decision comes back as a plain dict that the
report and the release record as they are: the table of candidates and, in words, why.

    >>> decision = choose(measurements, Workload(concurrency=8, usd_per_hour=3.0, slo=Slo(p95_ttft_ms=500)))
    >>> decision["chosen"]["variant"], decision["reason"]

Pure functions over plain data; the measurements come from ``vllm bench serve`` JSON (through
``evals/perf.py``) or any dict with the same keys.
"""

from __future__ import annotations

import bisect
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from ground.config import ConfigError, StrictModel

Scheme = Literal["bf16", "w4a16", "w8a8-int8", "fp8-dynamic"]
Kernel = Literal["default", "marlin"]

# vLLM picks Machete for W4A16 on Hopper when it can; disabling it makes vLLM fall back to Marlin.
KERNEL_ENV: dict[str, dict[str, str]] = {
    "default": {},
    "marlin": {"VLLM_DISABLED_KERNELS": "MacheteLinearKernel"},
}


class Slo(StrictModel):
    """Latency objectives at the 95th percentile; a field left out is not checked."""

    p95_ttft_ms: float | None = Field(None, gt=0, description="Time to first token, p95, ms.")
    p95_tpot_ms: float | None = Field(None, gt=0, description="Time per output token, p95, ms.")
    max_failed: int = Field(0, ge=0, description="Failed requests allowed in a benchmark run.")


class Workload(StrictModel):
    """What the serving config must handle and what the machine costs."""

    concurrency: int = Field(..., ge=1, description="Requests in flight the config must serve.")
    usd_per_hour: float = Field(..., gt=0, description="Price of the serving machine per hour.")
    slo: Slo = Field(default_factory=Slo, description="Latency objectives at that concurrency.")
    source: str = Field("config", description="Where the concurrency came from (config, logs).")


class Measurement(StrictModel):
    """One benchmark point: one served variant at one concurrency."""

    variant: str = Field(..., description="Name of the served variant, e.g. 'w4a16-marlin'.")
    scheme: Scheme = Field(..., description="Weight format served.")
    kernel: Kernel = Field("default", description="'marlin' = Machete disabled for W4A16.")
    concurrency: int = Field(..., ge=1, description="Max concurrency of the benchmark run.")
    output_tok_s: float = Field(..., ge=0, description="Output tokens per second, all requests.")
    p95_ttft_ms: float | None = Field(None, ge=0, description="p95 time to first token, ms.")
    p95_tpot_ms: float | None = Field(None, ge=0, description="p95 time per output token, ms.")
    failed: int = Field(0, ge=0, description="Failed requests in the run.")


def _pick(d: Mapping[str, Any], *keys: str) -> Any:
    for key in keys:
        if key in d and d[key] is not None:
            return d[key]
    return None


def measurement_from_dict(d: Mapping[str, Any]) -> Measurement:
    """Normalise a perf result (``vllm bench serve`` keys or our own) into a :class:`Measurement`.

    Accepts ``output_throughput`` or ``output_tok_s``; ``max_concurrency`` or ``concurrency``;
    ``p95_ttft_ms`` or a nested ``{"ttft_ms": {"p95": ...}}``. Raises :class:`ConfigError` naming
    the missing field.
    """

    def nested(metric: str) -> float | None:
        flat = _pick(d, f"p95_{metric}_ms")
        if flat is not None:
            return float(flat)
        sub = d.get(f"{metric}_ms")
        return float(sub["p95"]) if isinstance(sub, Mapping) and "p95" in sub else None

    fields = {
        "variant": _pick(d, "variant", "name"),
        "scheme": _pick(d, "scheme"),
        "kernel": _pick(d, "kernel") or "default",
        "concurrency": _pick(d, "concurrency", "max_concurrency"),
        "output_tok_s": _pick(d, "output_tok_s", "output_throughput"),
        "p95_ttft_ms": nested("ttft"),
        "p95_tpot_ms": nested("tpot"),
        "failed": _pick(d, "failed") or 0,
    }
    for name in ("variant", "scheme", "concurrency", "output_tok_s"):
        if fields[name] is None:
            raise ConfigError(f"perf result {dict(d)!r:.120}: missing field {name!r}")
    try:
        return Measurement(**fields)
    except Exception as exc:  # pydantic's message names the field and the allowed values
        raise ConfigError(f"perf result for {fields['variant']!r}: {exc}") from None


def measurements_from_perf_metrics(
    variant: str, scheme: str, kernel: str, metrics: Mapping[str, float]
) -> list[Measurement]:
    """The grid points of one variant from the perf suite's flat metrics (``metrics.json``:
    ``perf.grid.c{N}.output_tokens_per_s``, ``.ttft_p95_ms``, ``.tpot_p95_ms``, ``.failed``)."""
    levels = sorted(
        {
            int(k.split(".")[2][1:])
            for k in metrics
            if k.startswith("perf.grid.c") and k.endswith(".output_tokens_per_s")
        }
    )
    if not levels:
        raise ConfigError(
            f"variant {variant!r}: no perf.grid.c*.output_tokens_per_s in its metrics"
        )
    return [
        measurement_from_dict(
            {
                "variant": variant,
                "scheme": scheme,
                "kernel": kernel,
                "concurrency": c,
                "output_tok_s": metrics[f"perf.grid.c{c}.output_tokens_per_s"],
                "p95_ttft_ms": metrics.get(f"perf.grid.c{c}.ttft_p95_ms"),
                "p95_tpot_ms": metrics.get(f"perf.grid.c{c}.tpot_p95_ms"),
                "failed": int(metrics.get(f"perf.grid.c{c}.failed", 0)),
            }
        )
        for c in levels
    ]


def usd_per_1m_tokens(usd_per_hour: float, tok_s: float) -> float:
    """Dollars per million output tokens for a machine at ``usd_per_hour`` producing ``tok_s``."""
    return math.inf if tok_s <= 0 else usd_per_hour / (tok_s * 3600.0) * 1e6


def serving_config(scheme: str, kernel: str) -> dict[str, Any]:
    """What a release needs to serve this choice: the scheme to quantize to and vLLM's env."""
    return {"scheme": scheme, "kernel": kernel, "env": dict(KERNEL_ENV[kernel])}


def _at_concurrency(points: Sequence[Measurement], want: int) -> tuple[Measurement, str]:
    """The point that stands for ``want``: exact, else the next measured above (conservative:
    more load means higher latency, so the SLO check errs on the safe side), else the highest."""
    by_c = sorted(points, key=lambda m: m.concurrency)
    cs = [m.concurrency for m in by_c]
    i = bisect.bisect_left(cs, want)
    if i < len(cs) and cs[i] == want:
        return by_c[i], "measured"
    if i < len(cs):
        return by_c[i], f"next measured above ({cs[i]})"
    return by_c[-1], f"above the highest measured ({cs[-1]}): extrapolated, re-measure"


def _slo_failures(m: Measurement, slo: Slo) -> list[str]:
    out = []
    if m.failed > slo.max_failed:
        out.append(f"{m.failed} failed requests > {slo.max_failed}")
    for metric in ("ttft", "tpot"):
        limit = getattr(slo, f"p95_{metric}_ms")
        value = getattr(m, f"p95_{metric}_ms")
        if limit is None:
            continue
        if value is None:
            out.append(f"p95 {metric.upper()} not measured (SLO {limit:g} ms)")
        elif value > limit:
            out.append(f"p95 {metric.upper()} {value:.1f} ms > SLO {limit:g} ms")
    return out


def choose(
    measurements: Iterable[Measurement | Mapping[str, Any]],
    workload: Workload,
    allowed_variants: Iterable[str] | None = None,
    baseline_variant: str | None = None,
) -> dict[str, Any]:
    """Pick the variant with the lowest $/1M output tokens that meets the SLO at the workload.

    Args:
        measurements: perf points, several concurrencies per variant.
        workload: concurrency, $/hour and SLO.
        allowed_variants: variants that passed the quality gate; None = all measured.
        baseline_variant: variant the speed-ups are relative to; default the bf16 one.

    Returns:
        ``{"chosen": {...} | None, "serving_config": {...} | None, "reason": str,
        "workload": {...}, "candidates": [row, ...], "table": {variant: {concurrency: tok/s}}}``.
        Each candidate row has the point used, $/1M, speed-up over the baseline, whether it
        meets the SLO and, if it was not chosen, why not. With no candidate meeting the SLO,
        ``chosen`` is None and ``reason`` says what failed.
    """
    points = [m if isinstance(m, Measurement) else measurement_from_dict(m) for m in measurements]
    if not points:
        raise ConfigError("measurements: empty; run the perf eval for at least one variant")
    variants: dict[str, list[Measurement]] = {}
    for m in points:
        variants.setdefault(m.variant, []).append(m)
    for name, pts in variants.items():
        if len({(p.scheme, p.kernel) for p in pts}) > 1:
            raise ConfigError(f"variant {name!r}: points disagree on scheme/kernel")
    allowed = set(variants) if allowed_variants is None else set(allowed_variants)
    if baseline_variant is None:
        baseline_variant = next((v for v, p in variants.items() if p[0].scheme == "bf16"), None)
    elif baseline_variant not in variants:
        raise ConfigError(f"baseline_variant {baseline_variant!r}: not among {sorted(variants)}")

    base_tok_s = None
    if baseline_variant is not None:
        base_tok_s = _at_concurrency(variants[baseline_variant], workload.concurrency)[
            0
        ].output_tok_s

    rows = []
    for name, pts in variants.items():
        m, how = _at_concurrency(pts, workload.concurrency)
        failures = _slo_failures(m, workload.slo)
        if name not in allowed:
            # The live release's copy is the reference the candidates were gated against, not a
            # candidate itself: it is kept unless one is chosen.
            failures.insert(0, "live release (the reference, not a candidate)" if name == baseline_variant
                            else "did not pass the quality gate")
        rows.append(
            {
                "variant": name,
                "scheme": m.scheme,
                "kernel": m.kernel,
                "concurrency_used": m.concurrency,
                "point": how,
                "output_tok_s": round(m.output_tok_s, 1),
                "p95_ttft_ms": m.p95_ttft_ms,
                "p95_tpot_ms": m.p95_tpot_ms,
                "usd_per_1m_output_tokens": round(
                    usd_per_1m_tokens(workload.usd_per_hour, m.output_tok_s), 4
                ),
                "speedup_vs_baseline": round(m.output_tok_s / base_tok_s, 3)
                if base_tok_s
                else None,
                "meets_slo": not failures,
                "why_not": failures,
            }
        )
    rows.sort(key=lambda r: (r["usd_per_1m_output_tokens"], r["variant"]))
    ok = [r for r in rows if r["meets_slo"]]
    table = {
        name: {
            p.concurrency: round(p.output_tok_s, 1)
            for p in sorted(pts, key=lambda p: p.concurrency)
        }
        for name, pts in variants.items()
    }
    decision: dict[str, Any] = {
        "workload": workload.model_dump(),
        "baseline_variant": baseline_variant,
        "candidates": rows,
        "table": table,
    }
    if not ok:
        decision |= {
            "chosen": None,
            "serving_config": None,
            "reason": f"no variant meets the SLO at concurrency {workload.concurrency}: "
            + "; ".join(f"{r['variant']}: {', '.join(r['why_not'])}" for r in rows),
        }
        return decision
    best = ok[0]
    for r in rows:
        if r is not best and r["meets_slo"]:
            r["why_not"] = [
                f"${r['usd_per_1m_output_tokens']:.4f}/1M > ${best['usd_per_1m_output_tokens']:.4f}/1M "
                f"({best['output_tok_s'] / r['output_tok_s']:.2f}x fewer tok/s)"
                if r["output_tok_s"]
                else "no throughput"
            ]
    reason = (
        f"{best['variant']} ({best['scheme']}, kernel {best['kernel']}) is the cheapest variant "
        f"meeting the SLO at concurrency {workload.concurrency} ({workload.source}): "
        f"{best['output_tok_s']:.0f} output tok/s = ${best['usd_per_1m_output_tokens']:.4f} per 1M "
        f"output tokens at ${workload.usd_per_hour:g}/h"
    )
    if best["speedup_vs_baseline"] is not None and best["variant"] != baseline_variant:
        reason += f", {best['speedup_vs_baseline']:.2f}x {baseline_variant}"
    if best["point"] != "measured":
        reason += f"; point used: {best['point']}"
    runner_up = next((r for r in ok if r is not best), None)
    if runner_up:
        reason += (
            f"; next: {runner_up['variant']} at ${runner_up['usd_per_1m_output_tokens']:.4f}/1M"
        )
    decision |= {
        "chosen": best,
        "serving_config": serving_config(best["scheme"], best["kernel"]),
        "reason": reason,
    }
    return decision


def concurrency_from_logs(
    exchanges: Iterable[Mapping[str, Any]],
    quantile: float = 0.95,
    timestamp: Literal["start", "end"] = "end",
) -> tuple[int, dict[str, Any]]:
    """Requests in flight at the given quantile, from logged exchanges.

    Each exchange needs ``created_at`` (datetime or ISO string) and ``latency_ms``; ``timestamp``
    says whether ``created_at`` marks the request's arrival or its completion. The in-flight count
    is sampled at every arrival (what a new request finds), so idle gaps don't dilute it.

    Returns:
        ``(concurrency, stats)`` with the number of exchanges used, the window and the peak.
    """
    if not 0 < quantile <= 1:
        raise ConfigError(f"quantile: must be in (0, 1], got {quantile}")
    spans: list[tuple[datetime, datetime]] = []
    for ex in exchanges:
        t, lat = ex.get("created_at"), ex.get("latency_ms")
        if t is None or lat is None:
            continue
        t = datetime.fromisoformat(t) if isinstance(t, str) else t
        dur = timedelta(milliseconds=float(lat))
        spans.append((t, t + dur) if timestamp == "start" else (t - dur, t))
    if not spans:
        raise ConfigError("logs: no exchange with created_at and latency_ms in the window")
    starts = sorted(s for s, _ in spans)
    ends = sorted(e for _, e in spans)
    in_flight = []
    for s in starts:
        # started at or before s, minus those already finished (ends strictly before s)
        in_flight.append(bisect.bisect_right(starts, s) - bisect.bisect_left(ends, s))
    in_flight.sort()
    k = min(len(in_flight) - 1, max(0, math.ceil(quantile * len(in_flight)) - 1))
    conc = max(1, in_flight[k])
    return conc, {
        "exchanges": len(spans),
        "from": starts[0].isoformat(),
        "to": ends[-1].isoformat(),
        "peak": in_flight[-1],
        f"p{round(quantile * 100)}": conc,
    }


def workload_from_logs(
    exchanges: Iterable[Mapping[str, Any]],
    usd_per_hour: float,
    slo: Slo | None = None,
    quantile: float = 0.95,
    timestamp: Literal["start", "end"] = "end",
) -> Workload:
    """A :class:`Workload` whose concurrency is what the logs show (see :func:`concurrency_from_logs`)."""
    conc, stats = concurrency_from_logs(exchanges, quantile, timestamp)
    return Workload(
        concurrency=conc,
        usd_per_hour=usd_per_hour,
        slo=slo or Slo(),
        source=f"logs: p{round(quantile * 100)} in flight over {stats['exchanges']} exchanges, "
        f"peak {stats['peak']}",
    )


def scheme_in_words(scheme: str, dtype: str | None = None) -> str:
    """A scheme label for people: "bf16" is the label of every unquantized model (see
    :func:`scheme_of_model`), which vLLM serves in the platform's dtype, so it reads "unquantized"
    (with the dtype when given: "unquantized (float32)"); other schemes read as they are."""
    if scheme != "bf16":
        return scheme
    return f"unquantized ({dtype})" if dtype else "unquantized"


def scheme_of_model(model_dir: str | Path) -> Scheme:
    """The weight format a model folder holds, read from its ``config.json``.

    No ``quantization_config``: unquantized ("bf16", the label of every unquantized variant,
    served in bf16 or fp32 per platform). compressed-tensors configs: 4-bit weights without
    activation quantization = "w4a16"; 8-bit int weights and activations = "w8a8-int8"; 8-bit float
    = "fp8-dynamic". Raises :class:`ConfigError` for a format this project does not serve.
    """
    config = json.loads((Path(model_dir) / "config.json").read_text())
    quant = config.get("quantization_config")
    if not quant:
        return "bf16"
    for group in (quant.get("config_groups") or {}).values():
        weights, acts = group.get("weights") or {}, group.get("input_activations")
        bits, kind = weights.get("num_bits"), weights.get("type")
        if bits == 4 and not acts:
            return "w4a16"
        if bits == 8 and kind == "int" and acts:
            return "w8a8-int8"
        if bits == 8 and kind == "float":
            return "fp8-dynamic"
    raise ConfigError(f"{model_dir}: quantization_config {str(quant)[:120]} is not a scheme alignloop serves")
