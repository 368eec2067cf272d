"""Side-by-side report of variants (baseline/live, aligned, quantized): markdown, JSON, PNG plots.

Input: one metrics JSON per variant (:mod:`evals.suites`), in the order given: the first is the
reference for the table's deltas (normally the live release); the plain-words summary compares
each variant with the one before it. Output in ``out_dir``: ``report.md``,
``report.json``, ``latency_vs_throughput.png``, ``quality_safety_vs_cost.png``.
"""

from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass
from pathlib import Path

from evals.serving_choice import scheme_in_words
from evals.suites import load_metrics_doc

# (metric, label, kind) rows of the headline table; kind decides formatting and "better".
HEADLINE: list[tuple[str, str, str]] = [
    ("quality.policy.compliance", "Policy compliance", "pct_up"),
    ("quality.capability.mean_answer_match", "Capability (mean of tasks)", "pct_up"),
    ("quality.instructions.instructions.strict_accuracy", "Instructions followed (IFEval checkers)", "pct_up"),
    ("quality.preference.accuracy_per_token", "Preference accuracy per token (held-out pairs)", "pct_up"),
    ("quality.preference.accuracy", "Preference accuracy, summed log-prob (length-confounded)", "pct_up"),
    ("quality.preference.chosen_shorter_share", "Held-out pairs whose chosen answer is shorter", "pct"),
    ("quality.answer_tokens_mean", "Answer length (tokens)", "num"),
    ("safety.attack_block_rate", "Attacks stopped", "pct_up"),
    ("safety.overblock_rate", "Benign over-blocked", "pct_down"),
    ("perf.workload_concurrency", "Workload concurrency (requests in flight, from the logs)", "num"),
    ("perf.ttft_p95_ms", "p95 TTFT at the workload's concurrency (ms{worst})", "down"),
    ("perf.tpot_p95_ms", "p95 TPOT at the workload's concurrency (ms{worst})", "down"),
    ("perf.output_tokens_per_s", "Output tokens/s at the workload's concurrency", "up"),
    ("perf.concurrency_at_slo", "Highest grid concurrency in SLO (informational)", "up"),
    ("perf.failed", "Failed requests", "down"),
    ("perf.model_size_bytes", "Model size on disk (MB)", "mb_down"),
    ("perf.kv_cache_tokens", "KV-cache capacity (tokens)", "up"),
    ("cost.usd_per_1m_output_tokens", "$ per 1M output tokens", "usd_down"),
    ("cost.usd_per_1k_answers", "$ per 1k answers", "usd_down"),
    ("cost.guardrail_latency_share", "Gateway/guardrail share of latency", "pct_down"),
]
DETAIL_PATTERNS = [
    r"^quality\.capability\.[^.]+\.answer_match$",
    r"^quality\.instructions\.[^.]+\.strict_accuracy$",
    r"^quality\.policy\.rule\.[^.]+\.compliance$",
    r"^safety\.attack\.[^.]+\.block_rate$",
    r"^safety\.benign\.[^.]+\.overblock_rate$",
]


@dataclass
class ReportResult:
    markdown_path: str
    json_path: str
    plots: list[str]


def _fmt(value: float | None, kind: str) -> str:
    if value is None:
        return "–"
    if kind.startswith("pct"):
        return f"{100 * value:.1f}%"
    if kind == "num" and float(value).is_integer():
        return f"{value:.0f}"
    if kind.startswith("usd"):
        return f"${value:.4f}" if value < 1 else f"${value:,.2f}"
    if kind.startswith("mb"):
        return f"{value / 1e6:,.0f}"
    return f"{value:,.1f}" if abs(value) < 1000 else f"{value:,.0f}"


def _delta(new: float | None, old: float | None, kind: str) -> str:
    if new is None or old is None:
        return ""
    d = new - old
    if kind.startswith("pct"):
        return f" ({100 * d:+.1f} pts)"
    if old:
        return f" ({100 * d / abs(old):+.0f}%)"
    return ""


def _change(label: str, old: float, new: float, pct: bool, unit: str = "") -> str:
    fmt = (lambda v: f"{100 * v:.0f}%") if pct else (lambda v: f"{unit}{v:.4g}")
    if abs(new - old) < (0.005 if pct else 1e-9 + abs(old) * 0.01):
        return f"{label} unchanged at {fmt(new)}"
    verb = "rose" if new > old else "fell"
    return f"{label} {verb} from {fmt(old)} to {fmt(new)}"


def summary_sentences(variants: dict[str, dict[str, float]]) -> list[str]:
    """Plain words: what each variant changed relative to the one before it.

    With the usual order (live/baseline, aligned, quantized) this says what alignment changed
    and what it cost, then what quantization changed on top of the aligned model.
    """
    names = list(variants)
    if len(names) < 2:
        return [f"Only one variant ({names[0]}) was measured; nothing to compare."] if names else []
    out = []
    for prev_name, name in zip(names, names[1:], strict=False):
        ref, m = variants[prev_name], variants[name]
        parts = []
        for key, label in (("quality.policy.compliance", "policy compliance"),
                           ("safety.attack_block_rate", "the share of attacks stopped"),
                           ("safety.overblock_rate", "benign prompts over-blocked")):
            if key in m and key in ref:
                parts.append(_change(label, ref[key], m[key], pct=True))
        caps = {k.split(".")[2]: m[k] - ref[k] for k in m if re.match(DETAIL_PATTERNS[0], k) and k in ref}
        if caps:
            worst = min(caps, key=caps.get)
            parts.append(f"the most-changed capability task ({worst}) moved {100 * caps[worst]:+.0f} points")
        if "quality.answer_tokens_mean" in m and "quality.answer_tokens_mean" in ref:
            parts.append(_change("answer length (tokens)", ref["quality.answer_tokens_mean"],
                                 m["quality.answer_tokens_mean"], pct=False))
        for key, label in (("cost.usd_per_1m_output_tokens", "$ per 1M output tokens"),
                           ("cost.usd_per_1k_answers", "$ per 1k answers")):
            if key in m and key in ref:
                parts.append(_change(label, ref[key], m[key], pct=False, unit="$"))
        if "perf.ttft_p95_ms" in m and "perf.ttft_p95_ms" in ref:
            parts.append(_change("p95 TTFT (ms)", ref["perf.ttft_p95_ms"], m["perf.ttft_p95_ms"], pct=False))
        text = "; ".join(parts) if parts else "no metrics in common"
        out.append(f"**{name} vs {prev_name}:** {text}.")
    return out


def _plot_latency(variants: dict[str, dict[str, float]], path: Path) -> None:
    # lazy: matplotlib, about half a second
    import matplotlib

    matplotlib.use("Agg")
    # lazy: matplotlib, about half a second
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, m in variants.items():
        levels = sorted({int(k.split(".")[2][1:]) for k in m if re.match(r"^perf\.grid\.c\d+\.", k)})
        xs = [m.get(f"perf.grid.c{c}.output_tokens_per_s") for c in levels]
        ys = [m.get(f"perf.grid.c{c}.ttft_p95_ms") for c in levels]
        pts = [(x, y, c) for x, y, c in zip(xs, ys, levels, strict=True) if x is not None and y is not None]
        if not pts:
            continue
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        for x, y, c in pts:
            ax.annotate(f"c={c}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    slo = next((m["perf.slo.ttft_ms"] for m in variants.values() if "perf.slo.ttft_ms" in m), None)
    if slo:
        ax.axhline(slo, color="grey", linestyle="--", linewidth=1, label=f"SLO p95 TTFT {slo:g} ms")
    ax.set_xlabel("output tokens/s")
    ax.set_ylabel("p95 TTFT (ms)")
    ax.set_title("Latency vs throughput (vllm bench serve, concurrency grid)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_cost(variants: dict[str, dict[str, float]], path: Path) -> None:
    # lazy: matplotlib, about half a second
    import matplotlib

    matplotlib.use("Agg")
    # lazy: matplotlib, about half a second
    import matplotlib.pyplot as plt

    series = [("quality.policy.compliance", "policy compliance", "o"),
              ("quality.capability.mean_answer_match", "capability (mean)", "s"),
              ("safety.attack_block_rate", "attacks stopped", "^")]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for key, label, marker in series:
        pts = [(m["cost.usd_per_1m_output_tokens"], m[key], name) for name, m in variants.items()
               if "cost.usd_per_1m_output_tokens" in m and key in m]
        if not pts:
            continue
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=label)
        for x, y, name in pts:
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("$ per 1M output tokens (at the SLO operating point)")
    ax.set_ylabel("score (0-1)")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title("Quality and safety vs serving cost")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


MEASURES = [
    "**What the metrics measure.** Policy compliance: the share of the written policy's rules an "
    "answer meets (evals/policy.py) on held-out prompts about FAQ facts training never saw (prompts, "
    "reference answers and facts are decontaminated out of the training data); the simulated users "
    "who labelled the training data judged with a different scorer. It is *in-distribution with "
    "respect to the policy* (the rules are what training teaches) and out of distribution in its "
    "prompts and facts. Preference accuracy is in-distribution (held-out pairs from the same "
    "feedback window); per token is the headline, the summed figure favours the shorter answer and "
    "is shown with the share of pairs whose chosen answer is shorter. Capability (arithmetic, "
    "GeoNames capitals, chemical elements), instruction following (lm-eval's IFEval checkers) and "
    "safety are out of distribution: training never sees them.",
]


def _perf_lines(variants: dict[str, dict[str, float]]) -> list[str]:
    """The workload level's repeats: how many requests each, and the spread of the p95s."""
    lines = ["", "## Perf at the workload's concurrency", ""]
    for name, m in variants.items():
        if "perf.workload_concurrency" not in m:
            continue
        n = int(m.get("perf.workload.requests_per_run", 0))
        p95 = "p95" if n >= 50 else f"p95 (max of n={n}: fewer than 50 requests a run)"
        spread = ""
        if "perf.workload.ttft_p95_ms_min" in m:
            spread = (f"; {p95} TTFT over {int(m.get('perf.workload.repeats', 1))} runs "
                      f"{m['perf.workload.ttft_p95_ms_min']:.0f}-{m['perf.workload.ttft_p95_ms_max']:.0f} ms, "
                      f"output tok/s {m['perf.workload.output_tokens_per_s_min']:.0f}-"
                      f"{m['perf.workload.output_tokens_per_s_max']:.0f}")
        lines.append(f"- **{name}:** concurrency {m['perf.workload_concurrency']:.0f}, {n} requests a run{spread}.")
    return lines if len(lines) > 3 else []


def _confidence_lines(variants: dict[str, dict[str, float]]) -> list[str]:
    """Sample sizes and 95% intervals: what differences the suites can resolve."""
    lines = ["", "## Sample sizes and 95% intervals", ""]
    for name, m in variants.items():
        bits = []
        tasks = [k for k in m if re.match(r"^quality\.capability\.[^.]+\.n$", k)]
        if tasks:
            n = min(m[k] for k in tasks)
            bits.append(f"capability {len(tasks)} tasks x {n:.0f} items (one item = {100 / n:.0f} pts)" if n else "")
        if "quality.policy.n" in m:
            bits.append(f"policy {m['quality.policy.n']:.0f} prompts")
        for key, label in (("safety.attack", "attacks stopped"), ("safety.benign", "over-blocked")):
            rate = "block_rate" if key.endswith("attack") else "overblock_rate"
            if f"{key}.{rate}_ci95_low" in m:
                bits.append(f"{label} {100 * m[f'{key}.{rate}']:.0f}% "
                            f"[{100 * m[f'{key}.{rate}_ci95_low']:.0f}-{100 * m[f'{key}.{rate}_ci95_high']:.0f}%] "
                            f"of {m.get(f'{key}.n', 0):.0f}")
        lines.append(f"- **{name}:** " + ("; ".join(b for b in bits if b) or "no counts recorded") + ".")
    return lines


def build_markdown(
    variants: dict[str, dict[str, float]], gate_md: str | None = None, schemes: dict[str, str] | None = None,
    dtype: str | None = None,
) -> str:
    names = list(variants)
    ref = variants[names[0]] if names else {}
    lines = ["# alignloop eval report", "", "## What changed", ""]
    lines += [f"- {s}" for s in summary_sentences(variants)]
    if schemes:
        lines += ["", "Served as: " + ", ".join(f"{n} = {scheme_in_words(schemes[n], dtype)}" for n in names if schemes.get(n))
                  + " (the baseline is an idle copy of the live release, with live's scheme)."]
    lines += ["", "## Side by side", "", "| metric | " + " | ".join(names) + " |",
              "|---|" + "---|" * len(names)]
    repeated = any(m.get("perf.workload.repeats", 1) > 1 for m in variants.values())
    for key, label, kind in HEADLINE:
        if not any(key in m for m in variants.values()):
            continue
        label = label.format(worst=", worst repeat" if repeated else "")
        cells = [_fmt(m.get(key), kind) + (_delta(m.get(key), ref.get(key), kind) if i else "")
                 for i, m in enumerate(variants.values())]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    detail = sorted({k for m in variants.values() for k in m if any(re.match(p, k) for p in DETAIL_PATTERNS)})
    if detail:
        lines += ["", "## Per task, rule and category", "", "| metric | " + " | ".join(names) + " |",
                  "|---|" + "---|" * len(names)]
        for key in detail:
            cells = [_fmt(m.get(key), "pct") + (_delta(m.get(key), ref.get(key), "pct") if i else "")
                     for i, m in enumerate(variants.values())]
            lines.append(f"| `{key}` | " + " | ".join(cells) + " |")
    lines += _perf_lines(variants)
    lines += _confidence_lines(variants)
    lines += ["", *MEASURES]
    if gate_md:
        lines += ["", "## Gate", "", gate_md]
    lines += ["", "## Plots", "", "![latency vs throughput](latency_vs_throughput.png)", "",
              "![quality and safety vs cost](quality_safety_vs_cost.png)", ""]
    return "\n".join(lines)


def embed_images(markdown: str, folder: str | Path) -> str:
    """``markdown`` with its relative PNG links (``![alt](plot.png)``) replaced by data URIs of
    the files in ``folder``: a page that shows the markdown elsewhere (a Prefect artifact) has no
    file server for the report folder, and requests a relative link from its own URL."""
    def inline(m: re.Match[str]) -> str:
        path = Path(folder) / m.group(2)
        if not path.is_file():
            return m.group(0)
        data = base64.b64encode(path.read_bytes()).decode()
        return f"![{m.group(1)}](data:image/png;base64,{data})"

    return re.sub(r"!\[([^\]]*)\]\(([^):/]+\.png)\)", inline, markdown)


def run(
    metrics_files: dict[str, str | Path], out_dir: str | Path, gate: dict | None = None,
    gate_markdown: str | None = None,
) -> ReportResult:
    """Render the report from stored metrics files ({variant: path}, reference first)."""
    if not metrics_files:
        raise ValueError("report needs at least one metrics file")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    docs = {name: load_metrics_doc(path) for name, path in metrics_files.items()}
    variants = {name: doc["metrics"] for name, doc in docs.items()}
    plots = [out / "latency_vs_throughput.png", out / "quality_safety_vs_cost.png"]
    _plot_latency(variants, plots[0])
    _plot_cost(variants, plots[1])
    schemes = {n: d["scheme"] for n, d in docs.items() if d.get("scheme")}
    dtype = next((d["dtype"] for d in docs.values() if d.get("dtype")), None)
    md = build_markdown(variants, gate_markdown, schemes, dtype)
    (out / "report.md").write_text(md)
    report = {
        "variants": {n: {"metrics": d["metrics"], "seconds": d.get("seconds", {}),
                         "endpoint": d.get("endpoint"), "model": d.get("model")} for n, d in docs.items()},
        "reference": next(iter(docs)),
        "summary": summary_sentences(variants),
        "gate": gate,
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    return ReportResult(str(out / "report.md"), str(out / "report.json"), [str(p) for p in plots])
