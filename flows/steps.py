"""What the loop's tasks call beyond a stage's ``run(cfg)``: the gateway's admin API, evals of one
release behind a private gateway, and report + gate + choice of the candidate to promote.

No Prefect here: the flow module wraps these in tasks.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from evals import report, suites
from evals.config import Endpoint, EvalsConfig
from evals.gate import GateConfig, error_shares, evaluate_stage_dirs, spent_alpha, still_open
from evals.render import keep_summary
from evals.serving_choice import (
    Slo,
    Workload,
    choose,
    measurements_from_perf_metrics,
    workload_from_logs,
)
from flows.gpu import kernel_args, served_label
from flows.loop_config import LoopConfig, admin_client, resolve_path
from ground.config import ConfigError, load_config
from ground.platform import detect, serving_dtype
from ground.runs import StageDir

COST_METRIC = "cost.usd_per_1m_output_tokens"
POLICY_METRIC = "quality.policy.compliance"
TABLE_METRICS = (  # (row label, metric key, scale)
    ("policy compliance", POLICY_METRIC, 1),
    ("capability (mean of tasks)", "quality.capability.mean_answer_match", 1),
    ("preference accuracy (held-out)", "quality.preference.accuracy", 1),
    ("tokens per answer", "quality.answer_tokens_mean", 1),
    ("attack block rate", "safety.attack_block_rate", 1),
    ("over-block rate", "safety.overblock_rate", 1),
    ("p95 TTFT ms at the workload's concurrency", "perf.ttft_p95_ms", 1),
    ("output tok/s at the workload's concurrency", "perf.output_tokens_per_s", 1),
    ("$ per 1M output tokens", COST_METRIC, 1),
    ("$ per 1k answers", "cost.usd_per_1k_answers", 1),
    ("model size MB", "perf.model_size_bytes", 1e-6),
)


# -- the running gateway -------------------------------------------------------------------------
def live_release(cfg: LoopConfig) -> dict[str, Any]:
    """The live release as the admin API describes it (it must be warm: it serves users)."""
    with admin_client(cfg) as admin:
        for rel in admin.describe():
            if rel["status"] == "live" and rel.get("base_url"):
                return rel
    raise RuntimeError("no live release is serving; nothing to compare candidates against")


def stage_baseline(cfg: LoopConfig, live: dict[str, Any]) -> dict[str, Any]:
    """An idle copy of the live release, staged like a candidate: the evals never load-test the
    release that serves users, and the baseline carries what live really serves: the scheme of its
    checkpoint and the kernel its vLLM arguments select."""
    scheme, kernel = served_label(live)
    with admin_client(cfg) as admin:
        for rel in admin.describe():  # a copy staged by an earlier attempt of this run
            src = rel.get("source", {})
            if src.get("copy_of") == live["release_id"] and rel["status"] == "staged" and rel.get("warm"):
                return rel
        rel = admin.stage(live["model_dir"], kernel_args(cfg.candidate_args, kernel), source={
            "variant": "baseline", "copy_of": live["release_id"], "scheme": scheme, "kernel": kernel,
            "model_dir": live["model_dir"]})
        if rel.status != "staged":
            raise RuntimeError(f"baseline copy {rel.release_id} failed to start: {rel.history[-1].reason}")
        return next(r for r in admin.describe() if r["release_id"] == rel.release_id)


# -- evals of one release ------------------------------------------------------------------------
def evaluate(
    cfg: LoopConfig, variant: str, release: dict[str, Any], run_dir: Path, dataset_path: str,
    workload_concurrency: int | None = None,
) -> dict[str, float]:
    """Run every suite on ``release`` behind a private gateway with the product's guardrails.

    The private gateway has its own log store, so eval traffic never becomes training data.
    Results are stored in ``<run>/evals-<variant>/`` and reused while model and config are unchanged.
    """
    # lazy: serving.gateway.candidate loads aiohttp, fastapi, sqlalchemy, starlette, uvicorn
    from serving.gateway.candidate import candidate_gateway

    evals_cfg = load_config(EvalsConfig, resolve_path(cfg.evals_file))
    evals_cfg.quality.preference_dataset = dataset_path
    # Every release folder carries its tokenizer: count tokens with the served model's own.
    evals_cfg.quality.tokenizer = evals_cfg.quality.tokenizer or release["model_dir"]
    evals_cfg.perf.tokenizer = evals_cfg.perf.tokenizer or release["model_dir"]
    evals_cfg.perf.model_dir = release["model_dir"]
    evals_cfg.perf.vllm_root_url = release["base_url"].removesuffix("/v1")
    evals_cfg.perf.direct_base_url = release["base_url"]
    evals_cfg.perf.direct_model = release["release_id"]  # vLLM serves the release under its id
    if workload_concurrency is not None:
        evals_cfg.perf.workload_concurrency = workload_concurrency
    looks = gate_config(cfg).looks
    if len(looks) > 1:  # a sequential gate: the first look's share of each task's items
        evals_cfg = suites.look_config(evals_cfg, looks, 0)
    stage = StageDir(
        run_dir, f"evals-{variant}", evals_cfg,
        inputs={"model": release["model_dir"], "dataset": dataset_path, "release": release["release_id"]},
    )
    if (done := stage.cached_result()) is not None:
        return done["metrics"]
    stage.start()
    store_url = f"sqlite:///{(stage.out / 'eval-gateway-logs.db').resolve()}"
    with candidate_gateway(
        release["base_url"], release["release_id"], release["release_id"], store_url,
        gateway_config=resolve_path(cfg.gateway.config_file),
    ) as endpoint:
        direct = Endpoint(release["base_url"], "EMPTY", release["release_id"])
        result = suites.run(evals_cfg, endpoint, stage.out, variant, logprobs_endpoint=direct)
    # release_id and model_dir let the release manager check what these results are of.
    stage.save({"metrics": result.metrics, "metrics_path": result.metrics_path,
                "release_id": release["release_id"], "model_dir": release["model_dir"],
                "variant": variant, "seconds": result.seconds})
    return result.metrics


def gate_config(cfg: LoopConfig):
    """The loop's gate policy (``gate_file``)."""
    return load_config(GateConfig, resolve_path(cfg.gate_file))


def open_metrics(cfg: LoopConfig, run_dir: Path, variants: list[str], look: int) -> dict[str, set[str]]:
    """After ``look`` of a sequential gate: per candidate that can still be promoted (no rule
    failed, some inconclusive), the metrics of its inconclusive paired rules: what the next look
    evaluates more items of, for it and for live's copy."""
    gate_cfg = gate_config(cfg)
    out = {}
    for v in variants:
        d = evaluate_stage_dirs(gate_cfg, run_dir / f"evals-{v}", run_dir / "evals-baseline", looks=look + 1)
        if d.verdict == "inconclusive":
            out[v] = still_open(d)
    return out


def extend(cfg: LoopConfig, variant: str, release: dict[str, Any], run_dir: Path, look: int,
           metrics: set[str]) -> dict[str, float]:
    """Look ``look`` of a sequential gate on one release: more items of ``metrics`` behind a
    private gateway (as :func:`evaluate`), added to its eval folder. Returns the updated metrics."""
    # lazy: serving.gateway.candidate loads aiohttp, fastapi, sqlalchemy, starlette, uvicorn
    from serving.gateway.candidate import candidate_gateway

    evals_cfg = suites.look_config(load_config(EvalsConfig, resolve_path(cfg.evals_file)),
                                   gate_config(cfg).looks, look, metrics)
    stage_out = run_dir / f"evals-{variant}" / "output"
    store_url = f"sqlite:///{(stage_out / 'eval-gateway-logs.db').resolve()}"
    with candidate_gateway(
        release["base_url"], release["release_id"], release["release_id"], store_url,
        gateway_config=resolve_path(cfg.gateway.config_file),
    ) as endpoint:
        changed = suites.extend(evals_cfg, endpoint, stage_out, variant, look)
    result = run_dir / f"evals-{variant}" / "result.json"
    doc = json.loads(result.read_text())
    doc["metrics"].update(changed)
    doc.setdefault("looks", {})[str(look)] = sorted(metrics)
    result.write_text(json.dumps(doc, indent=2))
    return doc["metrics"]


# -- report, gate, choice -----------------------------------------------------------------------
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


def workload(cfg: LoopConfig, window: tuple[Any, Any]) -> dict[str, Any]:
    """The workload the perf suite and the serving choice plan for: ``workload_concurrency`` from
    the config, else the requests in flight the window's logs show (p95)."""
    # lazy: ground.logstore loads sqlalchemy
    from ground.logstore import LogStore, default_url

    evals_cfg = load_config(EvalsConfig, resolve_path(cfg.evals_file))
    usd = evals_cfg.cost.usd_per_hour[evals_cfg.cost.machine]
    slo = Slo(p95_ttft_ms=evals_cfg.perf.slo.ttft_ms, p95_tpot_ms=evals_cfg.perf.slo.tpot_ms)
    if cfg.workload_concurrency is not None:
        return Workload(concurrency=cfg.workload_concurrency, usd_per_hour=usd, slo=slo).model_dump()
    store = LogStore(cfg.data.get("logstore", {}).get("url") or default_url())
    try:
        exchanges = list(store.exchanges(since=window[0], until=window[1]))
    finally:
        store.close()
    return workload_from_logs(exchanges, usd, slo).model_dump()


def serving_choice(
    metrics: dict[str, dict[str, float]], schemes: dict[str, str], passing: list[str], workload: dict[str, Any],
    kernels: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Among the candidates that passed the gate, the cheapest $/1M meeting the SLO at the
    workload's concurrency (speed-ups relative to the baseline copy of live, by its real scheme)."""
    points = [
        m for v in metrics
        for m in measurements_from_perf_metrics(
            v, schemes.get(v, "bf16"), (kernels or {}).get(v, "default"), metrics[v])
    ]
    return choose(points, Workload(**workload), allowed_variants=passing, baseline_variant="baseline")


def summarize_decision(
    decisions: dict[str, Any], passing: list[str], choice: dict[str, Any], costs: dict[str, float]
) -> tuple[str | None, str]:
    """The winner and the one-line summary (pure: tested on plain data).

    The serving choice picks among gate-passing candidates the cheapest meeting the SLO at the
    workload's concurrency. When none meets it there, the summary says so and the cheapest passing
    candidate is named as what $ alone would pick: never "cheapest at the SLO".
    """
    if not passing:
        # The same rule titles (task named) and numbers as the gate table: one renderer.
        return None, keep_summary({v: d.to_dict() for v, d in decisions.items()})
    chosen = (choice.get("chosen") or {}).get("variant")
    workload = choice.get("workload") or {}
    at = f"concurrency {workload['concurrency']}" if workload else "the workload's concurrency"
    if chosen in passing:
        if len(passing) == 1:
            return chosen, f"promote {chosen} (passed every rule; meets the SLO at {at})"
        return chosen, (f"promote {chosen} (passed every rule; of {sorted(passing)} the cheapest "
                        f"meeting the SLO at {at})")
    winner = min(passing, key=lambda v: (costs.get(v, float("inf")), v))
    why = choice.get("reason") or "no serving choice"
    return winner, (f"promote {winner} (passed every rule; no variant meets the SLO at {at}, so "
                    f"chosen by $ per 1M output tokens alone: {why})")


def error_budget(gate_cfg, candidates: list[str]) -> dict[str, Any]:
    """How the whole decision's error is split (pure): over the candidates (serial gatekeeping or
    equal shares, evals.gate.error_shares), then over the looks."""
    alpha = 1 - min((r.confidence for r in gate_cfg.rules if r.test != "threshold"), default=0.95)
    shares = {v: alpha * s for v, s in error_shares(gate_cfg, candidates).items()}
    spend = {v: [round(spent_alpha(a, gate_cfg.looks, j), 5) for j in range(len(gate_cfg.looks))]
             for v, a in shares.items()}
    first = gate_cfg.gatekeeper if gate_cfg.gatekeeper in shares and len(shares) > 1 else None
    if first:
        copies = [v for v in shares if v != first]
        split = (f"{first} is tested first at all of it; {', '.join(copies)} "
                 f"{'share it' if len(copies) > 1 else 'gets it'} ({100 * shares[copies[0]]:.2g}% each) "
                 f"and can pass only once {first} passed (serial gatekeeping)")
    else:
        split = (f"{len(shares)} candidate(s) ({', '.join(shares)}) share it, "
                 f"{100 * alpha / max(1, len(shares)):.2g}% each")
    looks = "" if len(gate_cfg.looks) == 1 else (
        f"; sequential: looks at {', '.join(f'{100 * t:.0f}%' for t in gate_cfg.looks)} of each task's "
        f"items spend " + "; ".join(f"{v} {', '.join(f'{100 * a:.2g}%' for a in s)}" for v, s in spend.items()))
    text = (f"Error of the whole decision: at most {100 * alpha:.0f}% that any candidate is promoted "
            f"without being better; {split}{looks}.")
    per = {v: round(a, 6) for v, a in shares.items()}
    return {"alpha": alpha, "candidates": list(shares), "gatekeeper": first, "per_candidate": per,
            "looks": gate_cfg.looks, "spent_per_look": spend, "text": text}


def decide(
    cfg: LoopConfig, run_dir: Path, metrics: dict[str, dict[str, float]],
    schemes: dict[str, str], workload: dict[str, Any], kernels: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Gate every candidate against the baseline copy of live on the same items, render the
    report, pick what to promote. Decided from the stored eval folders (the per-item outcomes),
    exactly as the release manager will recompute it."""
    gate_cfg = gate_config(cfg)
    live_dir = run_dir / "evals-baseline"
    decisions = {v: evaluate_stage_dirs(gate_cfg, run_dir / f"evals-{v}", live_dir)
                 for v in metrics if v != "baseline"}
    passing = [v for v, d in decisions.items() if d.passed]
    choice: dict[str, Any] = {}
    if passing:
        try:
            choice = serving_choice(metrics, schemes, passing, workload, kernels)
        except (ConfigError, ValueError, KeyError) as exc:  # no perf grid: fall back to $ alone
            choice = {"chosen": None, "reason": f"serving choice unavailable ({exc})"}
    costs = {v: metrics[v].get(COST_METRIC, float("inf")) for v in passing}
    winner, summary = summarize_decision(decisions, passing, choice, costs)
    gate_md = "\n\n".join(f"### {v}\n\n{d.to_markdown()}" for v, d in decisions.items())
    if choice:
        gate_md += f"\n\n### Serving choice\n\n{choice.get('reason', '')}\n"
    out = run_dir / "report"
    metrics_files = {}
    # What vLLM computes unquantized models in here (float32 on most CPUs), for "Served as".

    dtype = serving_dtype(detect())
    for variant, m in metrics.items():
        path = out / f"{variant}.metrics.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"variant": variant, "metrics": m, "scheme": schemes.get(variant),
                                    "dtype": dtype}, indent=2))
        metrics_files[variant] = path
    gate_doc = {
        v: d.to_dict() | {"require_approval": gate_cfg.require_approval}
        for v, d in decisions.items()
    } | {
        "winner": winner, "summary": summary, "serving_choice": choice, "workload": workload,
        "schemes": schemes, "error_budget": error_budget(gate_cfg, list(decisions)),
    }
    gate_md += f"\n\n{gate_doc['error_budget']['text']}\n"
    rendered = report.run(metrics_files, out, gate=gate_doc, gate_markdown=f"**Decision: {summary}**\n\n{gate_md}")
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
    """Attach each candidate's evals to its release, promote the winner (the release manager
    recomputes the decision from the run folder named in the attachment and refuses when it does
    not pass) or, with ``canary: true``, start it as a canary that the online rules decide
    (flows/canary.py), and retire what stays staged (candidates, the baseline copy) so their vLLMs
    stop."""
    # lazy: evals.online loads numpy, scipy
    from evals.online import OnlineConfig

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
            elif cfg.canary:  # online evidence first: a share of users, decided by flows/canary.py
                online = load_config(OnlineConfig, resolve_path(cfg.online_file)).canary
                admin.start_canary(rid, online.share, online.tenants,
                                   reason=f"gate passed: {decision['summary']} (run {Path(run_dir).name})")
                promotion = {"release_id": rid, "promoted": False, "canary": True,
                             "why": f"canary: {online.share:.0%} of users until the online rules decide"}
            else:
                admin.promote(rid, reason=f"gate passed: {decision['summary']} (run {Path(run_dir).name})")
                promotion = {"release_id": rid, "promoted": True, "why": decision["summary"]}
        for rel in releases.values():
            promoted = promotion and rel["release_id"] == promotion["release_id"]  # or awaiting approval
            if not promoted and admin.get(rel["release_id"]).status == "staged":
                admin.retire(rel["release_id"], reason=f"not promoted: {decision['summary']}")
    return promotion
