"""Perf of an 8B-class Llama (dummy weights) per serving variant, with the project's own code.

    python3 benchmarks/gpu/perf_8b.py --models DIR --out DIR --variants bf16,w4a16 [--gateway]

Each variant is served by :class:`serving.vllm_server.VLLMServer` (``--load-format dummy`` via
``extra_args``; the Marlin variant disables Machete through ``VLLMArgs.env``) and measured by
:func:`evals.perf.run` (``vllm bench serve``: 128-token prompts, 256 output tokens, EOS ignored,
concurrency 1/8/64/256). With ``--gateway``, the last variant is also measured at concurrency
256 through the gateway (serving.app.create_app in its own process, benchmarks/gpu/gateway_proc.py),
with and without guardrails, next to a direct run. Results go to ``OUT/perf_8b.json``
(merged with an existing file, so two device calls add up) and a short table to stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from evals.config import SLO, Endpoint, PerfConfig  # noqa: E402
from evals.perf import bench_args, run_benches, summarize  # noqa: E402
from evals.perf import run as perf_run  # noqa: E402
from evals.serving_choice import KERNEL_ENV  # noqa: E402
from serving.vllm_server import VLLMArgs, VLLMServer, free_port  # noqa: E402

log = logging.getLogger("perf_8b")
HERE = Path(__file__).resolve().parent

# name -> (model folder under --models, scheme, kernel)
VARIANTS = {
    "bf16": ("bf16", "bf16", "default"),
    "w4a16": ("w4a16", "w4a16", "default"),
    "w4a16-marlin": ("w4a16", "w4a16", "marlin"),
    "fp8-dynamic": ("fp8-dynamic", "fp8-dynamic", "default"),
}
CONCURRENCY = [1, 8, 64, 256]
SERVED = "llama8b"


def perf_config(model_dir: Path, prompts_per_level: int, output_len: int = 256) -> PerfConfig:
    return PerfConfig(
        concurrency=CONCURRENCY,
        requests_per_level=prompts_per_level * max(CONCURRENCY),
        input_len=128,
        output_len=output_len,
        slo=SLO(ttft_ms=2000, tpot_ms=100),
        percentiles=[50, 95, 99],
        tokenizer=str(model_dir),
        realistic_num_prompts=4,
        realistic_concurrency=4,
        realistic_output_len=32,
        model_dir=None,
        timeout_s=300,
    )


def vllm_args(kernel: str) -> VLLMArgs:
    env = {"VLLM_USE_FLASHINFER_SAMPLER": "0", **KERNEL_ENV[kernel]}
    return VLLMArgs(
        max_model_len=2048,
        gpu_memory_utilization=0.90,
        max_num_seqs=256,
        extra_args=["--load-format", "dummy"],
        env=env,
        startup_timeout_s=420,
    )


def gateway_runs(srv: VLLMServer, cfg: PerfConfig, work: Path, model_dir: Path) -> dict:
    """Direct vs gateway (guardrails on, then off) at the highest concurrency, back to back in
    one ``vllm bench serve`` process (evals.perf.run_benches)."""
    c = max(CONCURRENCY)
    procs: list[subprocess.Popen] = []
    out: dict[str, dict] = {}
    plan: dict[str, list[str]] = {}
    try:
        endpoints = {"direct": Endpoint(srv.base_url, "EMPTY", SERVED)}
        for guard in ("guardrails", "noguard"):
            port = free_port()
            with open(work / f"gateway-{guard}.log", "w") as glog:
                proc = subprocess.Popen(
                    [
                        sys.executable,
                        str(HERE / "gateway_proc.py"),
                        "--upstream",
                        srv.base_url,
                        "--served",
                        SERVED,
                        "--port",
                        str(port),
                        "--guardrails",
                        guard,
                        "--db",
                        str(work / f"gateway-{guard}.db"),
                    ],
                    stdout=glog,
                    stderr=subprocess.STDOUT,
                )
            procs.append(proc)
            _wait_http(f"http://127.0.0.1:{port}/healthz", proc, 90)
            endpoints[f"gateway-{guard}"] = Endpoint(
                f"http://127.0.0.1:{port}/v1", "sk-alignloop-demo", "alignloop"
            )
        gdir = work / "gateway"
        gdir.mkdir(exist_ok=True)
        for label, ep in endpoints.items():
            plan[label] = bench_args(
                ep,
                cfg,
                str(model_dir),
                gdir / f"{label}.json",
                concurrency=c,
                num_prompts=cfg.requests_per_level * c // max(CONCURRENCY),  # prompts per level x c
            )
        # the gateway takes the demo tenant's key; the direct vLLM ignores it
        run_benches(list(plan.values()), "sk-alignloop-demo", cfg.timeout_s, gdir)
        for label in plan:
            out[label] = summarize(
                json.loads((gdir / f"{label}.json").read_text()), cfg.percentiles
            )
    except Exception as exc:  # keep the variant's other numbers
        out["error"] = {"error": str(exc)[-2000:]}
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=20)
    d = out.get("direct", {}).get("output_tokens_per_s")
    for label, run in out.items():
        g = run.get("output_tokens_per_s")
        if d and g and label != "direct":
            run["vs_direct"] = round(g / d, 4)
    return out


def _wait_http(url: str, proc: subprocess.Popen, timeout_s: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"gateway exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"gateway not up after {timeout_s}s")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--prompts-per-level", type=int, default=3)
    ap.add_argument("--gateway", action="store_true")
    ap.add_argument(
        "--concurrency", default=",".join(map(str, CONCURRENCY)), help="smoke tests only"
    )
    ap.add_argument("--output-len", type=int, default=256, help="smoke tests only")
    a = ap.parse_args()
    CONCURRENCY[:] = [int(c) for c in a.concurrency.split(",")]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    a.out.mkdir(parents=True, exist_ok=True)
    summary_file = a.out / "perf_8b.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {"variants": {}}
    names = [v for v in a.variants.split(",") if v]
    for i, name in enumerate(names):
        folder, scheme, kernel = VARIANTS[name]
        model_dir = a.models / folder
        work = a.out / "work" / name
        work.mkdir(parents=True, exist_ok=True)
        cfg = perf_config(model_dir, a.prompts_per_level, a.output_len)
        entry: dict = {"scheme": scheme, "kernel": kernel, "model": str(model_dir)}
        t0 = time.monotonic()
        try:
            with VLLMServer(
                model_dir, args=vllm_args(kernel), log_path=work / "vllm.log", served_name=SERVED
            ) as srv:
                entry["startup_s"] = round(srv.startup_s or 0, 1)
                res = perf_run(cfg, Endpoint(srv.base_url, "EMPTY", SERVED), out_dir=work)
                entry["metrics"] = res.metrics
                entry["perf_seconds"] = round(res.seconds, 1)
                if a.gateway and i == len(names) - 1:
                    entry["gateway"] = gateway_runs(srv, cfg, work, model_dir)
        except Exception as exc:
            entry["error"] = str(exc)[-3000:]
            log.exception("variant %s failed", name)
        entry["wall_s"] = round(time.monotonic() - t0, 1)
        summary["variants"][name] = entry
        summary_file.write_text(json.dumps(summary, indent=2))
        _print_row(name, entry)
    summary["env"] = _env()
    summary_file.write_text(json.dumps(summary, indent=2))


def _print_row(name: str, e: dict) -> None:
    m = e.get("metrics", {})
    tps = [m.get(f"perf.grid.c{c}.output_tokens_per_s") for c in CONCURRENCY]
    cells = " ".join(f"{t:8.1f}" if t else "       -" for t in tps)
    print(
        f"RESULT {name:13s} start {e.get('startup_s', '-')}s  tok/s c1,8,64,256: {cells}  "
        f"wall {e['wall_s']}s {('ERROR ' + e['error'][-300:]) if 'error' in e else ''}",
        flush=True,
    )
    for label, g in e.get("gateway", {}).items():
        print(
            f"RESULT gateway {label}: {g.get('output_tokens_per_s')} tok/s vs_direct {g.get('vs_direct')} "
            f"{g.get('error', '')[-300:]}",
            flush=True,
        )


def _env() -> dict:
    out = {"ALIGNLOOP_SERVE_PYTHON": os.environ.get("ALIGNLOOP_SERVE_PYTHON")}
    try:
        out["nvidia_smi"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        ).stdout.strip()
    except Exception as exc:  # noqa: BLE001
        out["nvidia_smi"] = str(exc)
    return out


if __name__ == "__main__":
    main()
