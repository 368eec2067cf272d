"""What the loop's tasks call beyond a stage's ``run(cfg)``: the gateway's admin API, evals of one
release behind a private gateway, and report + gate + choice of the candidate to promote.

No Prefect here: the flow module wraps these in tasks.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from flows.loop_config import LoopConfig, resolve_path
from training.config import load_config
from training.runs import StageDir

COST_METRIC = "cost.usd_per_1m_output_tokens"
POLICY_METRIC = "quality.policy.compliance"
TABLE_METRICS = (  # (row label, metric key, scale)
    ("policy compliance", POLICY_METRIC, 1),
    ("capability (mean of tasks)", "quality.capability.mean_answer_match", 1),
    ("preference accuracy (held-out)", "quality.preference.accuracy", 1),
    ("tokens per answer", "quality.answer_tokens_mean", 1),
    ("attack block rate", "safety.attack_block_rate", 1),
    ("over-block rate", "safety.overblock_rate", 1),
    ("TTFT p95 ms", "perf.ttft_p95_ms", 1),
    ("output tok/s at the SLO point", "perf.output_tokens_per_s", 1),
    ("$ per 1M output tokens", COST_METRIC, 1),
    ("$ per 1k answers", "cost.usd_per_1k_answers", 1),
    ("model size MB", "perf.model_size_bytes", 1e-6),
)


# -- the running gateway -------------------------------------------------------------------------
@contextlib.contextmanager
def admin_client(cfg: LoopConfig) -> Iterator[Any]:
    """An admin client for the running gateway named by the config (or ``server.json``)."""
    from serving.admin_api import AdminClient
    from serving.server import running_server

    url = cfg.gateway.url
    if url is None:
        info = running_server()
        if info is None:
            raise RuntimeError(
                "no running gateway: start one with `alignloop serve` or set gateway.url in the loop config"
            )
        url = info["url"]
    key = cfg.gateway.admin_key or os.environ.get(cfg.gateway.admin_key_env)
    if not key:
        raise RuntimeError(f"no admin key: set gateway.admin_key or ${cfg.gateway.admin_key_env}")
    client = AdminClient(url, key)
    try:
        yield client
    finally:
        client.close()


def live_release(cfg: LoopConfig) -> dict[str, Any]:
    """The live release as the admin API describes it (it must be warm: it serves users)."""
    with admin_client(cfg) as admin:
        for rel in admin.describe():
            if rel["status"] == "live" and rel.get("base_url"):
                return rel
    raise RuntimeError("no live release is serving; nothing to compare candidates against")


# -- evals of one release ------------------------------------------------------------------------
def evaluate(
    cfg: LoopConfig, variant: str, release: dict[str, Any], run_dir: Path, dataset_path: str
) -> dict[str, float]:
    """Run every suite on ``release`` behind a private gateway with the product's guardrails.

    The private gateway has its own log store, so eval traffic never becomes training data.
    Results are stored in ``<run>/evals-<variant>/`` and reused while model and config are unchanged.
    """
    from evals import suites
    from evals.config import Endpoint, EvalsConfig

    evals_cfg = load_config(EvalsConfig, resolve_path(cfg.evals_file))
    evals_cfg.quality.preference_dataset = dataset_path
    # Every release folder carries its tokenizer: count tokens with the served model's own.
    evals_cfg.quality.tokenizer = evals_cfg.quality.tokenizer or release["model_dir"]
    evals_cfg.perf.tokenizer = evals_cfg.perf.tokenizer or release["model_dir"]
    evals_cfg.perf.model_dir = release["model_dir"]
    evals_cfg.perf.vllm_root_url = release["base_url"].removesuffix("/v1")
    evals_cfg.perf.direct_base_url = release["base_url"]
    evals_cfg.perf.direct_model = release["release_id"]  # vLLM serves the release under its id
    stage = StageDir(
        run_dir, f"evals-{variant}", evals_cfg,
        inputs={"model": release["model_dir"], "dataset": dataset_path},
    )
    if (done := stage.cached_result()) is not None:
        return done["metrics"]
    stage.start()
    store_url = f"sqlite:///{(stage.out / 'eval-gateway-logs.db').resolve()}"
    with suites.candidate_gateway(
        release["base_url"], release["release_id"], release["release_id"], store_url,
        gateway_config=resolve_path(cfg.gateway.config_file),
    ) as endpoint:
        direct = Endpoint(release["base_url"], "EMPTY", release["release_id"])
        result = suites.run(evals_cfg, endpoint, stage.out, variant, logprobs_endpoint=direct)
    stage.save({"metrics": result.metrics, "metrics_path": result.metrics_path,
                "release_id": release["release_id"], "seconds": result.seconds})
    return result.metrics


# -- report, gate, choice -----------------------------------------------------------------------
def choose_winner(passing: dict[str, dict[str, float]]) -> str | None:
    """The passing candidate that is cheapest at the SLO; ties go to higher policy compliance."""
    if not passing:
        return None

    def key(item: tuple[str, dict[str, float]]) -> tuple[float, float]:
        m = item[1]
        return (m.get(COST_METRIC, float("inf")), -m.get(POLICY_METRIC, 0.0))

    return min(passing.items(), key=key)[0]


def comparison_table(metrics: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    rows = []
    for label, key, scale in TABLE_METRICS:
        row: dict[str, Any] = {"metric": label}
        for variant, m in metrics.items():
            v = m.get(key)
            row[variant] = None if v is None else round(float(v) * scale, 4)
        rows.append(row)
    return rows


def table_markdown(rows: list[dict[str, Any]]) -> str:
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join("n/a" if r[c] is None else str(r[c]) for c in cols) + " |")
    return "\n".join(lines)


def serving_choice(
    cfg: LoopConfig, metrics: dict[str, dict[str, float]], schemes: dict[str, str],
    passing: list[str], window: tuple[Any, Any], kernels: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Among the candidates that passed the gate, the cheapest $/1M at the SLO for the workload
    the window's logs show (or ``workload_concurrency`` from the config)."""
    from evals.config import EvalsConfig
    from evals.serving_choice import (
        Slo,
        Workload,
        choose,
        measurements_from_perf_metrics,
        workload_from_logs,
    )
    from serving.logstore import LogStore, default_url

    evals_cfg = load_config(EvalsConfig, resolve_path(cfg.evals_file))
    usd = evals_cfg.cost.usd_per_hour[evals_cfg.cost.machine]
    slo = Slo(p95_ttft_ms=evals_cfg.perf.slo.ttft_ms, p95_tpot_ms=evals_cfg.perf.slo.tpot_ms)
    if cfg.workload_concurrency is not None:
        workload = Workload(concurrency=cfg.workload_concurrency, usd_per_hour=usd, slo=slo)
    else:
        store = LogStore(cfg.data.get("logstore", {}).get("url") or default_url())
        try:
            exchanges = list(store.exchanges(since=window[0], until=window[1]))
        finally:
            store.close()
        workload = workload_from_logs(exchanges, usd, slo)
    points = [
        m for v in metrics
        for m in measurements_from_perf_metrics(
            v, schemes.get(v, "bf16"), (kernels or {}).get(v, "default"), metrics[v])
    ]
    return choose(points, workload, allowed_variants=passing, baseline_variant="baseline")


def decide(
    cfg: LoopConfig, run_dir: Path, metrics: dict[str, dict[str, float]],
    schemes: dict[str, str], window: tuple[Any, Any], kernels: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Gate every candidate against the live baseline, render the report, pick what to promote."""
    from evals import report
    from evals.gate import GateConfig, evaluate
    from training.config import ConfigError

    gate_cfg = load_config(GateConfig, resolve_path(cfg.gate_file))
    live = metrics["baseline"]
    decisions = {v: evaluate(gate_cfg, m, live) for v, m in metrics.items() if v != "baseline"}
    passing = {v: metrics[v] for v, d in decisions.items() if d.passed}
    choice: dict[str, Any] = {}
    if passing:
        try:
            choice = serving_choice(cfg, metrics, schemes, list(passing), window, kernels)
        except (ConfigError, ValueError, KeyError) as exc:  # no perf grid: fall back to $ alone
            choice = {"chosen": None, "reason": f"serving choice unavailable ({exc})"}
    chosen = (choice.get("chosen") or {}).get("variant")
    winner = chosen if chosen in passing else choose_winner(passing)
    if winner:
        summary = f"promote {winner} (passed every rule" + (
            f"; of {sorted(passing)} the cheapest at the SLO for the workload)" if len(passing) > 1 else ")"
        )
    else:
        failed = {v: [o.rule for o in d.outcomes if not o.passed] for v, d in decisions.items()}
        summary = "keep the live release: " + "; ".join(
            f"{v} failed {', '.join(rules)}" for v, rules in failed.items()
        )
    gate_md = "\n\n".join(f"### {v}\n\n{d.to_markdown()}" for v, d in decisions.items())
    if choice:
        gate_md += f"\n\n### Serving choice\n\n{choice.get('reason', '')}\n"
    out = run_dir / "report"
    metrics_files = {}
    for variant, m in metrics.items():
        path = out / f"{variant}.metrics.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"variant": variant, "metrics": m}, indent=2))
        metrics_files[variant] = path
    gate_doc = {
        v: d.to_dict() | {"require_approval": gate_cfg.require_approval}
        for v, d in decisions.items()
    } | {
        "winner": winner, "summary": summary, "serving_choice": choice,
    }
    rendered = report.run(metrics_files, out, gate=gate_doc, gate_markdown=f"## Gate: {summary}\n\n{gate_md}")
    (out / "gate.json").write_text(json.dumps(gate_doc, indent=2))
    rows = comparison_table(metrics)
    return {
        "winner": winner, "summary": summary, "gate_md": gate_md, "table": rows,
        "table_md": table_markdown(rows), "report_md": rendered.markdown_path,
        "report_json": rendered.json_path, "plots": rendered.plots,
    }


def apply_decision(
    cfg: LoopConfig, releases: dict[str, dict], decision: dict[str, Any], run_dir: str
) -> dict[str, Any] | None:
    """Attach each candidate's evals + gate decision to its release, promote the winner (the
    release manager refuses a never-live release without a passing gate attached), and retire
    the candidates that stay staged so their vLLMs stop."""
    gate = json.loads(Path(decision["report_json"]).read_text())["gate"]
    winner = decision.get("winner")
    promotion = None
    with admin_client(cfg) as admin:
        live = admin.live()
        for variant, rel in releases.items():
            if variant == "baseline" or (live is not None and rel["release_id"] == live.release_id):
                continue  # the live release keeps the report it was promoted with
            admin.attach_eval(rel["release_id"], {
                "gate": gate[variant], "run_dir": run_dir, "report": decision["report_md"],
                "variant": variant, "serving_choice": gate.get("serving_choice"),
            })
        if winner and cfg.promote:
            rid = releases[winner]["release_id"]
            if live is not None and live.release_id == rid:
                promotion = {"release_id": rid, "promoted": False, "why": "already live (rerun)"}
            elif gate[winner].get("require_approval") and not admin.get(rid).approvals:
                # Stays staged (and warm) until a reviewer approves it on the review page.
                promotion = {"release_id": rid, "promoted": False,
                             "why": f"awaiting a reviewer's approval: {decision['summary']}"}
            else:
                admin.promote(rid, reason=f"gate passed: {decision['summary']} (run {Path(run_dir).name})")
                promotion = {"release_id": rid, "promoted": True, "why": decision["summary"]}
        for variant, rel in releases.items():
            promoted = promotion and rel["release_id"] == promotion["release_id"]  # or awaiting approval
            if variant != "baseline" and not promoted and admin.get(rel["release_id"]).status == "staged":
                admin.retire(rel["release_id"], reason=f"not promoted: {decision['summary']}")
    return promotion
