"""The alignment loop as Prefect flows: thin tasks over each stage's ``run(cfg)``.

    live lineage -> export window -> datasets (ledger of every window) -> SFT -> DPO | KTO
      -> merge -> quantize -> stage releases
      -> evals (live + candidates, each behind a private gateway) -> report -> gate -> promote|keep

A window with too little new feedback ends after the data stage as "skipped: not enough new
feedback" (an artifact says so; live is untouched). Training starts from the base model or from
the live release's weights (``start_from``); docs/continual.md.

Rules kept here: retries only on I/O tasks (export, staging, promotion), never on training; every
stage writes ``runs/<run_id>/<stage>/`` and is skipped when its inputs are unchanged, so a rerun
of the same data window resumes where the last attempt stopped; promotion happens only through
the gate (``alignloop promote --force`` is the recorded emergency exit).
"""

from __future__ import annotations

import base64
import json
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run

from evals.report import embed_images
from flows import steps
from flows import window as windows
from flows.canary import DEPLOYMENT, schedule_check
from flows.gpu import KERNEL_VARIANT_SUFFIX, kernel_args, kernels_for, launch_training
from flows.loop_config import LoopConfig, admin_client, load_loop_config, resolve_path
from flows.steps import decide, evaluate, extend, gate_config, live_release, open_metrics, workload
from flows.timing import start_timings, task  # prefect's task, each call's seconds recorded
from flows.work_pools import one_run_per_model
from ground.config import data_dir, load_config
from serving.engine.probe import plan_scheme
from training import data as data_stage
from training import kto, merge, quantize
from training.lineage import describe_chain, release_lineage, resolve_start


# -- tasks: each loads its config, calls the stage, returns a plain dict --------------------------
@task(name="where training starts", retries=2, retry_delay_seconds=5)
def find_start(cfg: LoopConfig, live: dict) -> dict:
    """The live release's lineage (read from run folders) and the model this run trains on."""
    try:
        lineage = release_lineage(live["release_id"], live["model_dir"])
    except ValueError as exc:  # e.g. an int8 model no run of ours made: only start_from=live needs it
        if cfg.start_from == "live":
            raise
        start = resolve_start("base", cfg.model.name_or_path, None)
        return {**asdict(start), "live_release": live["release_id"], "describe": start.describe(),
                "trained_windows": [], "live_chain": f"unknown ({exc})"}
    start = resolve_start(cfg.start_from, cfg.model.name_or_path, lineage)
    return {**asdict(start), "describe": start.describe(), "trained_windows": lineage.trained_windows,
            "live_chain": describe_chain(lineage)}


@task(name="export + governance", retries=2, retry_delay_seconds=5)
def build_datasets(cfg: LoopConfig, run_dir: str, since: datetime | None, until: datetime, start: dict) -> dict:
    logstore = {**cfg.data.get("logstore", {}), "since": since, "until": until}
    # New windows are those the live lineage has not learned from; the mix follows start_from
    # unless the data config names one.
    ledger = {"windows": "new" if start["start_from"] == "live" else "all",
              **cfg.section("data").get("ledger", {}),
              "trained_windows": start["trained_windows"], "current_releases": [start["live_release"]]}
    return asdict(data_stage.run(cfg.stage_config("data", run_dir=run_dir, logstore=logstore, ledger=ledger)))


@task(name="sft")
def train_sft(cfg: LoopConfig, run_dir: str, dataset_path: str, model: str) -> dict:
    return launch_training(cfg, "sft", get_run_logger().info, run_dir=run_dir, dataset_path=dataset_path,
                           model={"name_or_path": model})


@task(name="dpo")
def train_dpo(cfg: LoopConfig, run_dir: str, dataset_path: str, sft_adapter: str) -> dict:
    return launch_training(cfg, "dpo", get_run_logger().info, run_dir=run_dir,
                           dataset_path=dataset_path, sft_adapter=sft_adapter)


@task(name="kto")
def train_kto(cfg: LoopConfig, run_dir: str, dataset_path: str, adapter: str) -> dict:
    wired = {"run_dir": run_dir, "dataset_path": dataset_path, "adapter": adapter}
    if cfg.preference_objective == "kto" and "pairs_split" not in cfg.kto:
        wired["pairs_split"] = "dpo"  # KTO replaces DPO: it learns the pairs too, unpaired
    return asdict(kto.run(cfg.stage_config("kto", **wired)))


@task(name="merge")
def merge_adapters(cfg: LoopConfig, run_dir: str, adapter: str) -> dict:
    return asdict(merge.run(cfg.stage_config("merge", run_dir=run_dir, adapter=adapter)))


@task(name="plan quantization")
def plan_quantization(cfg: LoopConfig) -> dict:
    """The scheme the quantized candidate gets, or none when this target cannot serve one faster."""
    q = cfg.stage_config("quantize", model_dir="<merge stage>", dataset_path="<data stage>")
    scheme, why = plan_scheme(q.scheme, q.target)
    return {"scheme": scheme, "why": why}


@task(name="quantize")
def quantize_model(cfg: LoopConfig, run_dir: str, model_dir: str, dataset_path: str, scheme: str) -> dict:
    return asdict(quantize.run(cfg.stage_config(
        "quantize", run_dir=run_dir, model_dir=model_dir, dataset_path=dataset_path, scheme=scheme
    )))


@task(name="find live release", retries=2, retry_delay_seconds=5)
def find_live_release(cfg: LoopConfig) -> dict:
    return live_release(cfg)


@task(name="workload from the logs", retries=2, retry_delay_seconds=5)
def find_workload(cfg: LoopConfig, window: tuple) -> dict:
    return workload(cfg, window)


@task(name="stage baseline copy of live", retries=2, retry_delay_seconds=10)
def stage_baseline(cfg: LoopConfig, live: dict) -> dict:
    return steps.stage_baseline(cfg, live)  # the task shares the step's name


@task(name="retire release", retries=2, retry_delay_seconds=5)
def retire_release(cfg: LoopConfig, release_id: str, reason: str) -> None:
    with admin_client(cfg) as admin:
        if admin.get(release_id).status == "staged":
            admin.retire(release_id, reason=reason)


@task(name="stage release", retries=2, retry_delay_seconds=10)
def stage_release(cfg: LoopConfig, variant: str, model_dir: str, source: dict, kernel: str = "default") -> dict:
    """Stage a candidate in the running gateway (reusing one staged from the same run folder)."""
    # lazy: serving.control.admin_api loads fastapi
    from serving.control.admin_api import startup_progress

    with admin_client(cfg) as admin:
        for rel in admin.describe():
            src = rel.get("source", {})
            same = (src.get("model_dir") == model_dir and "copy_of" not in src
                    and src.get("kernel", "default") == kernel)
            if same and rel["status"] in ("staged", "live", "previous") and rel.get("warm"):
                return rel
        with startup_progress(admin, get_run_logger().info):  # vLLM's phase every 10 s
            rel = admin.stage(model_dir, kernel_args(cfg.candidate_args, kernel),
                              source={**source, "model_dir": model_dir, "kernel": kernel})
        if rel.status != "staged":
            raise RuntimeError(f"{variant} release {rel.release_id} failed to start: {rel.history[-1].reason}")
        return next(r for r in admin.describe() if r["release_id"] == rel.release_id)


@task(name="evaluate")
def evaluate_release(
    cfg: LoopConfig, variant: str, release: dict, run_dir: str, dataset_path: str, concurrency: int
) -> dict:
    return evaluate(cfg, variant, release, Path(run_dir), dataset_path, concurrency)


@task(name="evaluate more items (sequential gate)")
def extend_release(cfg: LoopConfig, variant: str, release: dict, run_dir: str, look: int, metrics: list[str]) -> dict:
    return extend(cfg, variant, release, Path(run_dir), look, set(metrics))


def sequential_looks(cfg: LoopConfig, run_dir: Path, releases: dict[str, dict], metrics: dict[str, dict]) -> None:
    """A sequential gate's later looks: while some candidate that can still be promoted has
    inconclusive rules, evaluate the next share of those rules' items on it and on live's copy
    (both still staged). Resolved rules stop; the gate's error is spent over the looks."""
    logger = get_run_logger()
    variants = [v for v in metrics if v != "baseline"]
    for look in range(1, len(gate_config(cfg).looks)):
        wanted = open_metrics(cfg, run_dir, variants, look - 1)
        if not wanted:
            logger.info("sequential gate: every candidate resolved after look %d", look - 1)
            return
        union = sorted(set().union(*wanted.values()))
        logger.info("sequential gate, look %d: more items of %s for %s", look, union, sorted(wanted))
        metrics["baseline"] = extend_release(cfg, "baseline", releases["baseline"], str(run_dir), look, union)
        for v, open_ in wanted.items():
            metrics[v] = extend_release(cfg, v, releases[v], str(run_dir), look, sorted(open_))


@task(name="report + gate")
def report_and_gate(
    cfg: LoopConfig, run_dir: str, metrics: dict[str, dict], schemes: dict[str, str], workload: dict,
    kernels: dict[str, str] | None = None,
) -> dict:
    return decide(cfg, Path(run_dir), metrics, schemes, workload, kernels)


@task(name="attach evals + promote or keep", retries=2, retry_delay_seconds=5)
def apply_decision(cfg: LoopConfig, releases: dict[str, dict], decision: dict, run_dir: str) -> dict | None:
    return steps.apply_decision(cfg, releases, decision, run_dir)  # the task shares its name


def schedule_canary_check(cfg: LoopConfig) -> str:
    """The first ``canary-check`` run, one check interval from now (flows/canary.py)."""
    # lazy: evals.online loads numpy, scipy
    from evals.online import OnlineConfig

    every = load_config(OnlineConfig, resolve_path(cfg.online_file)).canary.check_every_s
    run = schedule_check(every, {})
    return run or f"no {DEPLOYMENT} deployment: run `alignloop canary check` every {every:g} s (or register it)"


# -- artifacts -----------------------------------------------------------------------------------
def _image_markdown(path: Path, title: str) -> str:
    """A PNG inlined as a data URI (the Prefect UI renders it without a file server)."""
    data = base64.b64encode(path.read_bytes()).decode()
    return f"### {title}\n\n![{title}](data:image/png;base64,{data})\n\n`{path}`\n"


def publish_artifacts(run_dir: Path, data: dict, decision: dict, promotion: dict | None) -> None:
    """What someone who only opens the Prefect UI needs: what changed, what it cost, why (not)."""
    key = windows.artifact_key(run_dir.name)

    report_md = Path(decision["report_md"])
    create_markdown_artifact(
        embed_images(report_md.read_text(), report_md.parent), key=f"report-{key}",
        description="Baseline vs aligned vs quantized: quality, safety, latency, $ at the SLO",
    )
    create_table_artifact(decision["table"], key=f"comparison-{key}", description="Side-by-side metrics")
    gate_md = [f"## Gate\n\n**{decision['summary']}**\n"]
    if promotion:
        gate_md.append(f"**Promotion:** {promotion['release_id']} ({promotion['why']})\n")
    gate_md.append(decision["gate_md"])
    create_markdown_artifact("\n".join(gate_md), key=f"gate-{key}", description="Every rule, value, threshold")
    counts = data.get("counts", {})
    create_table_artifact(
        [{"count": k, "value": v} for k, v in counts.items()], key=f"dataset-{key}",
        description=f"Dataset manifest counts ({data.get('manifest_path')})",
    )
    plots = [_image_markdown(Path(p), Path(p).stem) for p in decision.get("plots", []) if Path(p).is_file()]
    if plots:
        create_markdown_artifact("\n".join(plots), key=f"plots-{key}", description="Report plots")
    create_link_artifact(run_dir.resolve().as_uri(), link_text=f"run folder {run_dir}", key=f"run-{key}")
    create_link_artifact((data_dir() / "releases").as_uri(), link_text="release folders", key=f"releases-{key}")


def publish_continual(run_dir: Path, data: dict, start: dict, outcome: dict) -> None:
    """The continual view: this run's lineage, and the trend of every window so far."""
    key = windows.artifact_key(run_dir.name)
    promoted = (outcome.get("promotion") or {}).get("release_id")
    lines = [
        f"## Lineage of run {run_dir.name}",
        "",
        f"- window: {outcome['window'][0]} -> {outcome['window'][1]}",
        f"- dataset version: {data.get('dataset_version')} ({data.get('new_examples')} new examples; "
        f"manifest `{data.get('manifest_path')}`)",
        f"- training: {start['describe']}",
        f"- decision: {outcome['decision']}" + (f" (now live: {promoted})" if promoted else ""),
        f"- live release's lineage before this run: {start['live_chain']}",
    ]
    create_markdown_artifact("\n".join(lines), key=f"lineage-{key}",
                             description="window -> dataset version -> adapters -> release")
    create_table_artifact(windows.trend_rows(windows.history()), key="continual-trend",
                          description="Every window so far: decision, dataset, the gate's rules vs live")


def _skipped(run_dir: Path, win: windows.Window, data: dict, start: dict, timings: dict) -> dict[str, Any]:
    """A quiet window: nothing to train; say so, keep live, and move the window on."""
    logger = get_run_logger()
    key = windows.artifact_key(run_dir.name)
    create_markdown_artifact(
        f"## {data['skip_reason']}\n\nWindow {win.since} -> {win.until}. The live release "
        f"({start['live_release']}) is untouched. This window's rows stay in the ledger and count as "
        f"new feedback in the next window.\n\nManifest: `{data['manifest_path']}`",
        key=f"skipped-{key}", description="Not enough new feedback: nothing trained",
    )
    windows.mark_success(win)
    outcome = {
        "run_dir": str(run_dir), "window": [str(win.since), str(win.until)],
        "decision": data["skip_reason"], "winner": None, "promotion": None, "report": None,
        "releases": {}, "skipped": True, "start": start["describe"], "start_from": start["start_from"],
        "dataset_version": data["dataset_version"], "seconds": timings,
    }
    (run_dir / "loop-result.json").write_text(json.dumps(outcome, indent=2, default=str))
    publish_continual(run_dir, data, start, outcome)
    logger.info("decision: %s", data["skip_reason"])
    return outcome


# -- the flow ------------------------------------------------------------------------------------
def _run_name() -> str:
    p = flow_run.parameters
    win = windows.resolve(_as_datetime(p.get("since")), _as_datetime(p.get("until")))
    windows.mark_pending(win)  # the flow body resolves the same window from it
    return "align-" + win.label


def _as_datetime(value: Any) -> datetime | None:
    return datetime.fromisoformat(value) if isinstance(value, str) else value


@flow(name="alignment-loop", flow_run_name=_run_name)
def alignment_loop(
    config: str = "configs/loop.yaml",
    overrides: list[str] | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> dict[str, Any]:
    """Align on the feedback window [since, until), evaluate, gate, and promote or keep the live model.

    Args:
        config: Loop config YAML (configs/loop.yaml).
        overrides: key=value overrides of the config, e.g. ``sft.train.epochs=2``.
        since: Window start; None = where the last successful run ended (or a pending window).
        until: Window end; None = now.
    """
    cfg = load_loop_config(config, overrides or [])
    with one_run_per_model(cfg.model.name_or_path):  # never two runs of one model at once
        return _align(cfg, since, until)


def _align(cfg: LoopConfig, since: datetime | None, until: datetime | None) -> dict[str, Any]:
    logger = get_run_logger()
    timings = start_timings()
    win = windows.resolve(since, until)
    run_dir = data_dir() / "runs" / win.run_id
    windows.mark_pending(win)  # a failed run is resumed on the same window (flows/window.py)
    logger.info("window %s -> %s, run folder %s", win.since, win.until, run_dir)

    live = find_live_release(cfg)
    start = find_start(cfg, live)
    data = build_datasets(cfg, str(run_dir), win.since, win.until, start)
    if data["skip_reason"]:
        return _skipped(run_dir, win, data, start, timings)
    logger.info("training: %s", start["describe"])
    sft = train_sft(cfg, str(run_dir), data["dataset_path"], start["model"])
    adapter = sft["adapter_dir"]
    if cfg.preference_objective in ("dpo", "dpo+kto"):
        adapter = train_dpo(cfg, str(run_dir), data["dataset_path"], adapter)["adapter_dir"]
    if cfg.preference_objective in ("kto", "dpo+kto"):
        kto_min = cfg.stage_config("kto", adapter="-", dataset_path="-").min_rows
        if cfg.preference_objective == "dpo+kto" and data["counts"]["kto"] < kto_min:
            logger.warning("kto: %d thumbs-only rows (< kto.min_rows %d); this run trains SFT + DPO only",
                           data["counts"]["kto"], kto_min)
        else:
            adapter = train_kto(cfg, str(run_dir), data["dataset_path"], adapter)["adapter_dir"]
    merged = merge_adapters(cfg, str(run_dir), adapter)
    models = {"aligned": merged["model_dir"]}
    schemes = {"aligned": "bf16"}  # unquantized (bf16 or fp32 per platform)
    candidates = list(cfg.candidates)
    if "quantized" in candidates:
        plan = plan_quantization(cfg)  # a scheme this target serves slower cannot win: skip it
        if plan["scheme"] is None:
            logger.info("no quantized candidate: %s", plan["why"])
            candidates.remove("quantized")
        else:
            quant = quantize_model(cfg, str(run_dir), merged["model_dir"], data["dataset_path"], plan["scheme"])
            models["quantized"] = quant["model_dir"]
            schemes["quantized"] = quant["scheme"]

    # The baseline is an idle copy of live (the release this run's training started from), staged
    # like a candidate and labelled with what live really serves (scheme and kernel). It is
    # evaluated and stopped before the candidates start, so no more vLLMs run at once than live +
    # the candidates (its results stay in the run folder, which is what the gate reads); with a
    # sequential gate it stays staged until the decision, to answer the later looks' items.
    workload = find_workload(cfg, (win.since, win.until))
    baseline = stage_baseline(cfg, live)
    releases = {"baseline": baseline}
    schemes = {"baseline": baseline["source"]["scheme"], **schemes}
    kernels = {"baseline": baseline["source"].get("kernel", "default")}
    metrics = {"baseline": evaluate_release(
        cfg, "baseline", baseline, str(run_dir), data["dataset_path"], workload["concurrency"])}

    sequential = len(gate_config(cfg).looks) > 1
    if not sequential:  # else live's copy answers the later looks' items too, and stays staged
        retire_release(cfg, baseline["release_id"], "baseline copy evaluated")
    for variant in candidates:
        source = {"run_dir": str(run_dir), "stage": "merge" if variant == "aligned" else "quantize",
                  "variant": variant, "scheme": schemes[variant], "window": [str(win.since), str(win.until)]}
        for kernel in kernels_for(cfg, schemes[variant], live):  # W4A16 on a GPU: Machete, Marlin
            name = variant + KERNEL_VARIANT_SUFFIX[kernel]
            releases[name] = stage_release(cfg, name, models[variant], {**source, "variant": name}, kernel)
            schemes[name], kernels[name] = schemes[variant], kernel
            metrics[name] = evaluate_release(
                cfg, name, releases[name], str(run_dir), data["dataset_path"], workload["concurrency"])
    if sequential:
        sequential_looks(cfg, run_dir, releases, metrics)
    decision = report_and_gate(cfg, str(run_dir), metrics, schemes, workload, kernels)

    winner = decision.get("winner")
    promotion = apply_decision(cfg, releases, decision, str(run_dir))
    if promotion and promotion.get("canary"):  # its checks run as flow runs of their own
        promotion["first_check"] = schedule_canary_check(cfg)
    publish_artifacts(run_dir, data, decision, promotion)
    windows.mark_success(win)
    outcome = {
        "run_dir": str(run_dir), "window": [str(win.since), str(win.until)],
        "decision": decision["summary"], "winner": winner, "promotion": promotion,
        "served": {v: {"scheme": schemes[v], "kernel": kernels[v]} for v in releases},
        "report": decision["report_md"], "releases": {k: v["release_id"] for k, v in releases.items()},
        "seconds": timings,  # per task, in call order: where this run's time went
        "skipped": False, "start": start["describe"], "start_from": start["start_from"],
        "objective": cfg.preference_objective, "dataset_version": data["dataset_version"],
    }
    (run_dir / "loop-result.json").write_text(json.dumps(outcome, indent=2, default=str))
    publish_continual(run_dir, data, start, outcome)
    logger.info("comparison:\n%s", decision["table_md"])
    logger.info("decision: %s", decision["summary"])
    logger.info("seconds per task: %s", ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
    return outcome


def run_loop(config: str, overrides: list[str], since: datetime | None, until: datetime | None) -> dict:
    """Entry for the CLI and the demo (they call ``prefect_env.configure()`` first)."""
    return alignment_loop(config=str(resolve_path(config)), overrides=overrides, since=since, until=until)
