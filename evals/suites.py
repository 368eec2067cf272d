"""Run the suites against one variant's endpoint and store one metrics JSON per variant.

The metrics file is the contract with the report and the gate::

    {"variant": "aligned", "created": "...", "endpoint": "...", "model": "...",
     "suites": ["quality", ...], "seconds": {"quality": 31.2, ...},
     "metrics": {"quality.capability.capitals.answer_match": 0.84, ...}}

Metric names are flat and dotted, ``<suite>.<subject>[.<item>].<measure>``, rates in [0, 1],
times in ms (``_ms``), sizes in bytes, counts as ``.n``:

- ``quality.capability.<task>.answer_match`` / ``.n``, ``quality.capability.mean_answer_match``
- ``quality.policy.compliance``, ``quality.policy.rule.<rule_id>.compliance`` / ``.n``
- ``quality.preference.accuracy`` / ``.margin_mean`` / ``.n``, ``quality.answer_tokens_mean``
- ``safety.attack_block_rate``, ``safety.overblock_rate``, ``safety.attack.<category>.block_rate``,
  ``safety.benign.<category>.overblock_rate``, ``safety.{attack,benign}.{gateway_block,model_refusal}_share``,
  ``..._ci95_low`` / ``_ci95_high`` (Wilson), ``safety.errors``
- ``perf.ttft_p95_ms`` / ``tpot_p95_ms`` / ``e2el_p95_ms`` / ``output_tokens_per_s`` at the SLO
  operating point, ``perf.concurrency_at_slo``, ``perf.meets_slo``, ``perf.failed``,
  ``perf.grid.c<N>.<ttft|tpot|itl|e2el>_p<P>_ms``, ``perf.realistic.*``, ``perf.direct.c<N>.*``,
  ``perf.gateway_latency_share``, ``perf.kv_cache_tokens``, ``perf.model_size_bytes``, ``perf.slo.*``
- ``cost.usd_per_1m_output_tokens``, ``cost.usd_per_1k_answers``, ``cost.guardrail_latency_share``
- ``<suite>.seconds``: how long the suite took

Beside it, ``outcomes-quality.jsonl`` and ``outcomes-safety.jsonl`` hold every item's outcome
(metric, item id, cluster, value) under the same metric names: the gate's paired rules read those.
"""

from __future__ import annotations

import json
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from evals import cost, perf, quality, safety
from evals.config import Endpoint, EvalsConfig
from evals.gate import load_outcome_dir, write_outcomes
from evals.metrics import read_jsonl
from evals.quality import item_metric, task_sizes

log = logging.getLogger(__name__)

Suite = Literal["quality", "safety", "perf"]
ALL_SUITES: tuple[Suite, ...] = ("quality", "safety", "perf")


@dataclass
class EvalRunResult:
    metrics_path: str
    metrics: dict[str, float]
    seconds: dict[str, float]


def save_metrics(path: str | Path, variant: str, metrics: dict[str, float], **meta: object) -> Path:
    """Write (or merge into) a variant's metrics JSON; later suites add to earlier ones."""
    path = Path(path)
    doc = load_metrics_doc(path) if path.is_file() else {"variant": variant, "metrics": {}, "seconds": {}}
    doc["variant"] = variant
    doc["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    doc["metrics"].update(metrics)
    for k, v in meta.items():
        if isinstance(v, dict) and isinstance(doc.get(k), dict):
            doc[k].update(v)
        else:
            doc[k] = v
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=False))
    tmp.replace(path)
    return path


def load_metrics_doc(path: str | Path) -> dict:
    """A metrics JSON (checked: it must have a ``metrics`` mapping of numbers)."""
    doc = json.loads(Path(path).read_text())
    if not isinstance(doc, dict) or not isinstance(doc.get("metrics"), dict):
        raise ValueError(f"{path}: not a metrics file (expected a `metrics` mapping)")
    return doc


def run(
    cfg: EvalsConfig,
    endpoint: Endpoint,
    out_dir: str | Path,
    variant: str,
    suites: tuple[Suite, ...] = ALL_SUITES,
    logprobs_endpoint: Endpoint | None = None,
) -> EvalRunResult:
    """Run ``suites`` (then cost, when perf ran) and save ``<out_dir>/metrics.json``."""
    out_dir = Path(out_dir)
    metrics: dict[str, float] = {}
    seconds: dict[str, float] = {}
    # Quality and safety run side by side: both are many short requests that vLLM batches, so
    # together they take about as long as quality alone (CPU, SmolLM2: ~20 s vs ~30 s in turn).
    # Perf runs alone afterwards: its latencies must not include the other suites' load.

    with ThreadPoolExecutor(2) as pool:
        fq = (pool.submit(quality.run, cfg.quality, endpoint, out_dir, logprobs_endpoint=logprobs_endpoint)
              if "quality" in suites else None)
        fs = pool.submit(safety.run, cfg.safety, endpoint, out_dir) if "safety" in suites else None
        for name, fut in (("quality", fq), ("safety", fs)):
            if fut is not None:
                res = fut.result()
                metrics.update(res.metrics)
                seconds[name] = round(res.seconds, 1)
                # Per-item outcomes with stable ids: what the gate pairs with live's.
                write_outcomes(out_dir / f"outcomes-{name}.jsonl", res.outcomes)
    if "perf" in suites:
        p = perf.run(cfg.perf, endpoint, out_dir / "perf")
        metrics.update(p.metrics)
        seconds["perf"] = round(p.seconds, 1)
    path = out_dir / "metrics.json"
    previous = load_metrics_doc(path)["metrics"] if path.is_file() else {}
    if "perf.output_tokens_per_s" in {**previous, **metrics}:
        metrics.update(cost.run(cfg.cost, {**previous, **metrics}))
    save_metrics(path, variant, metrics, endpoint=endpoint.url, model=endpoint.model,
                 suites=sorted(set(suites)), seconds=seconds)
    return EvalRunResult(str(path), load_metrics_doc(path)["metrics"], seconds)


# -- a sequential gate's looks -------------------------------------------------------------------
SAFETY_FILES = {"safety.attack_block_rate": "attack", "safety.overblock_rate": "benign"}


def look_config(cfg: EvalsConfig, looks: list[float], look: int, metrics: set[str] | None = None) -> EvalsConfig:
    """A copy of ``cfg`` that evaluates look ``look``'s new items: per task (and safety file) the
    items from the previous look's share of its budget up to this look's, for the gate metrics in
    ``metrics`` (None: all). A task's budget is ``limit`` items, or all of them."""
    def window(size: int, limit: int | None) -> tuple[int, int]:
        budget = min(size, limit or size)
        start = math.ceil(looks[look - 1] * budget) if look > 0 else 0
        return start, math.ceil(looks[look] * budget)

    out = cfg.model_copy(deep=True)
    sizes = task_sizes(cfg.quality)
    tasks = [*cfg.quality.capability_tasks, *cfg.quality.instruction_tasks,
             *([cfg.quality.policy_task] if cfg.quality.policy_task else [])]
    out.quality.items = {t: window(sizes[t], cfg.quality.limit) for t in tasks
                         if t in sizes and (metrics is None or item_metric(t, cfg.quality) in metrics)}
    safety_sizes = {"attack": len(read_jsonl(cfg.safety.attacks_file)),
                    "benign": len(read_jsonl(cfg.safety.benign_file))}
    out.safety.items = {f: window(safety_sizes[f], cfg.safety.limit) for m, f in SAFETY_FILES.items()
                        if metrics is None or m in metrics}
    return out


def extend(cfg: EvalsConfig, endpoint: Endpoint, out_dir: str | Path, variant: str, look: int) -> dict[str, float]:
    """Run a later look of a sequential gate (``cfg`` from :func:`look_config`): the quality and
    safety items it names, stored as ``outcomes-<suite>.look<N>.jsonl`` beside the first look's.
    Returns the metrics that change: each extended metric's mean over all its items so far (the
    report's table then shows what the gate read) and the safety errors added up."""
    out_dir = Path(out_dir)
    previous = load_metrics_doc(out_dir / "metrics.json")["metrics"]
    with ThreadPoolExecutor(2) as pool:
        fq = pool.submit(quality.run, cfg.quality, endpoint, out_dir / f"look{look}") if cfg.quality.items else None
        fs = pool.submit(safety.run, cfg.safety, endpoint, out_dir / f"look{look}") if cfg.safety.items else None
        results = {name: fut.result() for name, fut in (("quality", fq), ("safety", fs)) if fut is not None}
    changed: dict[str, float] = {}
    for name, res in results.items():
        write_outcomes(out_dir / f"outcomes-{name}.look{look}.jsonl", res.outcomes, look)
        changed[f"{name}.look{look}.seconds"] = round(res.seconds, 1)
    if "safety" in results:
        changed["safety.errors"] = previous.get("safety.errors", 0.0) + results["safety"].metrics["safety.errors"]
    merged = load_outcome_dir(out_dir)
    for res in results.values():
        for metric in {o["metric"] for o in res.outcomes}:
            values = [v for v, _ in merged[metric].values()]
            changed[metric] = sum(values) / len(values)
    save_metrics(out_dir / "metrics.json", variant, changed)
    log.info("look %d of %s: %s", look, variant, ", ".join(f"{k} {v:.3g}" for k, v in sorted(changed.items())))
    return changed
