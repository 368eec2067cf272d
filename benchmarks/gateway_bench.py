"""The gateway's cost: `vllm bench serve` direct to an upstream vs through the gateway (guardrails
on, then off), same run, interleaved per concurrency level.

    # CPU, no GPU: a SYNTHETIC upstream (benchmarks/synthetic_upstream.py: no model, tokens at a set pace)
    .venv/bin/python benchmarks/gateway_bench.py --synthetic --ttft-ms 20 --itl-ms 10 \
        --tokenizer .alignloop-test/models/base --concurrency 1 64 256 --out gateway-cpu.json

    # any OpenAI-compatible server you already run (a vLLM)
    .venv/bin/python benchmarks/gateway_bench.py --upstream http://127.0.0.1:8000/v1 \
        --served-model NAME --tokenizer MODEL_DIR --concurrency 1 256

    # GPU: the script starts vLLM itself (here an 8B-class config-only model, random weights)
    python3 benchmarks/gateway_bench.py --model /tmp/b/models/llama8b/bf16 --gpu \
        --vllm-arg=--load-format --vllm-arg=dummy --concurrency 1 256 --out $OUT/gateway-gpu.json

The gateway runs as `alignloop serve` runs it (serving.control.server.run_serve in its own process:
control plane + ``--workers`` worker processes, an external-upstream release), with the shipped
configs/gateway.yaml chains ("guardrails") or none ("noguard"); the tenant and global in-flight
limits are raised to 4096 so the benchmark measures the proxy, not its 429 backpressure. Per
level it reports output tok/s (and the ratio to direct), TTFT p50/p95/p99, and from the
gateway's own log rows: its overhead per request (x-alignloop-overhead-ms) and the guardrails'
share of it. Prompts are random token ids (vLLM's random dataset), answers are forced to
``--output-len`` tokens (ignore_eos). Ratios within one run are what this measures; on a small
machine the client, the gateway and the upstream share the cores (the JSON records the CPU).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

BENCH_KEY = "sk-bench-tenant"
BENCH_SECRET = "alignloop-benchmark-key-secret-loopback-only"  # the gateway's key secret (>= 32 chars)
MODES = ("direct", "guardrails", "noguard")


def bench_args(base_url: str, model: str, tokenizer: str, c: int, n: int, a: argparse.Namespace,
               out_dir: Path, tag: str, seed: int = 0) -> list[str]:
    """One `vllm bench serve` run (result: ``<tag>-c<c>.json``). Every run against one upstream
    needs a seed of its own: with one seed, each mode after the first replays the same random
    prompts and a real vLLM's prefix cache serves their prefills from memory (evals/perf.py)."""
    return [
        "--backend", "openai-chat", "--base-url", base_url, "--endpoint", "/v1/chat/completions",
        "--model", model, "--tokenizer", tokenizer, "--dataset-name", "random",
        "--random-input-len", str(a.input_len), "--random-output-len", str(a.output_len),
        "--ignore-eos", "--num-prompts", str(n), "--max-concurrency", str(c),
        "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,95,99",
        "--save-result", "--result-dir", str(out_dir), "--result-filename", f"{tag}-c{c}.json",
        "--seed", str(seed), "--request-rate", "inf", "--random-range-ratio", "0", "--temperature", "0",
        "--disable-tqdm",  # the flags evals/perf.py uses: known to work with vLLM 0.26 (GPU) and 0.32
    ]


def run_bench_grid(runs: list[list[str]], work: Path) -> None:
    """All runs in one serving-env process (evals/_bench_serve.py: vLLM's own bench)."""
    from ground.platform import serve_python

    (work / "runs.json").write_text(json.dumps(runs))
    env = {**os.environ, "OPENAI_API_KEY": BENCH_KEY, "HF_HUB_OFFLINE": "1"}
    for var in ("PYTHONPATH", "VIRTUAL_ENV"):
        env.pop(var, None)
    with (work / "bench.log").open("w") as logf:
        proc = subprocess.run(
            [str(serve_python()), "-P", str(REPO / "evals" / "_bench_serve.py"),
             "--runs-file", str(work / "runs.json")],
            env=env, stdout=logf, stderr=subprocess.STDOUT,
        )
    if proc.returncode != 0:
        raise RuntimeError(f"vllm bench serve failed: {(work / 'bench.log').read_text()[-3000:]}")


def gateway_serve_config(mode: str, upstream: str, served: str, port: int, workers: str,
                         db: Path) -> dict:
    """The serve config of one gateway under test (shipped chains, or none)."""
    import yaml

    from serving.gateway.config import hash_key

    gw = yaml.safe_load((REPO / "configs" / "gateway.yaml").read_text())
    gw["tenants"] = [{"name": "bench", "key_sha256": hash_key(BENCH_KEY, BENCH_SECRET.encode()),
                      "max_in_flight": 4096}]
    gw["demo_keys"] = False  # its own tenant and key, not the published demo ones
    gw["limits"]["max_in_flight"] = 4096
    gw["upstream"]["max_connections"] = 4096
    gw["log_store_url"] = f"sqlite:///{db}"
    if mode == "noguard":
        gw["guardrails"]["input"], gw["guardrails"]["output"] = [], []
    return {
        "host": "127.0.0.1", "port": port, "log_level": "warning",
        "workers": workers if workers == "auto" else int(workers),
        "gateway": gw,
        "releases": {"upstream_url": upstream, "upstream_model": served, "initial_model": None,
                     "grace_s": 0},
    }


@contextlib.contextmanager
def running_gateway(mode: str, upstream: str, served: str, workers: str, work: Path) -> Iterator[tuple[str, Path, subprocess.Popen]]:
    """A gateway process (this script with --serve-config: serving.control.server.run_serve)."""
    import httpx
    import yaml

    from serving.engine.vllm_server import free_port

    port = free_port()
    db = work / f"gateway-{mode}.db"
    cfg_file = work / f"serve-{mode}.yaml"
    cfg_file.write_text(yaml.safe_dump(gateway_serve_config(mode, upstream, served, port, workers, db)))
    home = work / f"home-{mode}"
    home.mkdir(exist_ok=True)
    env = {**os.environ, "ALIGNLOOP_HOME": str(home), "ALIGNLOOP_KEY_SECRET": BENCH_SECRET, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    logf = (work / f"gateway-{mode}.log").open("w")
    proc = subprocess.Popen([sys.executable, __file__, "--serve-config", str(cfg_file)],
                            env=env, stdout=logf, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"gateway exited: {(work / f'gateway-{mode}.log').read_text()[-2000:]}")
            try:
                if httpx.get(base + "/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("gateway not ready after 300 s")
            time.sleep(0.3)
        yield base, db, proc
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        logf.close()


@contextlib.contextmanager
def running_upstream(a: argparse.Namespace, work: Path) -> Iterator[tuple[str, str]]:
    """(base URL ending in /v1, served model name) of the upstream under test."""
    import httpx

    if a.upstream:
        yield a.upstream.rstrip("/"), a.served_model
        return
    if a.synthetic:
        from serving.engine.vllm_server import free_port

        port = free_port()
        cmd = [sys.executable, str(REPO / "benchmarks" / "synthetic_upstream.py"), "--port", str(port),
               "--ttft-ms", str(a.ttft_ms), "--itl-ms", str(a.itl_ms)]
        if a.tokenizer:
            cmd += ["--tokenizer", a.tokenizer]
        with (work / "upstream.log").open("w") as logf:
            proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT)
        try:
            for _ in range(300):
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                        break
                time.sleep(0.2)
            yield f"http://127.0.0.1:{port}/v1", "synthetic"
        finally:
            proc.terminate()
            proc.wait(30)
        return
    from serving.engine.vllm_server import VLLMArgs, VLLMServer

    args = VLLMArgs(
        max_model_len=a.max_model_len, gpu_memory_utilization=a.gpu_memory_utilization,
        max_num_seqs=a.max_num_seqs, extra_args=["--no-enable-prefix-caching", *a.vllm_arg],
        env={"VLLM_USE_FLASHINFER_SAMPLER": "0"} if a.gpu else {}, startup_timeout_s=600,
    )
    with VLLMServer(a.model, args=args, log_path=work / "vllm.log", served_name="bench-model") as srv:
        yield srv.base_url, "bench-model"


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def gateway_rows(db: Path, since: datetime, until: datetime) -> list[tuple[float, float, float]]:
    """(overhead_ms, guardrail_ms, latency_ms) of the gateway's rows logged in [since, until]."""
    con = sqlite3.connect(db)
    try:
        rows = con.execute(
            "SELECT overhead_ms, guardrail_ms, latency_ms, created_at FROM requests WHERE status = 'ok'"
        ).fetchall()
    finally:
        con.close()
    out = []
    for o, g, lat, ts in rows:
        t = datetime.fromisoformat(str(ts)).replace(tzinfo=UTC)
        if since <= t <= until and o is not None:
            out.append((o, g or 0.0, lat or 0.0))
    return out


def summarize(result: dict, rows: list[tuple[float, float, float]] | None) -> dict:
    s = {
        "completed": result.get("completed"), "failed": result.get("failed", 0),
        "output_tok_s": result["output_throughput"],
        "ttft_p50_ms": result["median_ttft_ms"], "ttft_p95_ms": result["p95_ttft_ms"],
        "ttft_p99_ms": result["p99_ttft_ms"], "tpot_p50_ms": result["median_tpot_ms"],
    }
    if rows:
        over = [r[0] for r in rows]
        guard = [r[1] for r in rows]
        s.update({
            "requests_logged": len(rows),
            "overhead_p50_ms": _pct(over, 50), "overhead_p95_ms": _pct(over, 95),
            "overhead_p99_ms": _pct(over, 99),
            "guardrail_p50_ms": _pct(guard, 50), "guardrail_p95_ms": _pct(guard, 95),
            "guardrail_share_of_overhead": sum(guard) / sum(over) if sum(over) else None,
            "overhead_share_of_latency": sum(over) / sum(r[2] for r in rows),
        })
    return s


def cpu_flags() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.machine()
    flags = next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), [])
    return "AVX-512" if "avx512f" in flags else ("AVX2" if "avx2" in flags else "other")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--synthetic", action="store_true", help="start the synthetic upstream")
    src.add_argument("--upstream", help="an OpenAI-compatible base URL (…/v1) to front")
    src.add_argument("--model", help="a model folder: start vLLM for it")
    p.add_argument("--served-model", default="bench-model", help="model name at --upstream")
    p.add_argument("--tokenizer", help="tokenizer folder for the prompts (default: --model)")
    p.add_argument("--ttft-ms", type=float, default=20.0, help="synthetic: time to first token")
    p.add_argument("--itl-ms", type=float, default=10.0, help="synthetic: time between tokens")
    p.add_argument("--gpu", action="store_true", help="vLLM on a GPU (CUDA sampler settings)")
    p.add_argument("--vllm-arg", action="append", default=[], help="extra `vllm serve` flag (repeat)")
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--workers", default="auto", help="gateway worker processes (or 'auto')")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 64, 256])
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--prompts-per-level", type=int, default=2, help="num_prompts = max(--min-prompts, this * c)")
    p.add_argument("--min-prompts", type=int, default=24)
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--out", default="gateway-bench.json")
    p.add_argument("--serve-config", help=argparse.SUPPRESS)  # internal: run one gateway
    a = p.parse_args()
    if a.serve_config:
        from ground.config import load_config
        from serving.control.server import ServeConfig, run_serve

        run_serve(load_config(ServeConfig, a.serve_config))
        return
    if not (a.synthetic or a.upstream or a.model):
        p.error("give --synthetic, --upstream URL or --model DIR")
    tokenizer = a.tokenizer or a.model
    if not tokenizer:
        p.error("--tokenizer is needed for the prompts")
    work = Path(tempfile.mkdtemp(prefix="gateway-bench-"))
    t_start = time.time()
    with running_upstream(a, work) as (up_url, served), contextlib.ExitStack() as stack:
        gateways = {m: stack.enter_context(running_gateway(m, up_url, served, a.workers, work))
                    for m in a.modes if m != "direct"}
        direct_root = up_url.removesuffix("/v1")
        runs, plan = [bench_args(direct_root, served, tokenizer, 1, 4, a, work, "warmup")], []
        for c in a.concurrency:
            n = max(a.min_prompts, a.prompts_per_level * c)
            for m in a.modes:
                url, model = (direct_root, served) if m == "direct" else (gateways[m][0], "alignloop")
                runs.append(bench_args(url, model, tokenizer, c, n, a, work, m, seed=len(runs)))
                plan.append((c, m))
        run_bench_grid(runs, work)
        time.sleep(1.0)  # the last rows reach the writer
        dbs = {m: g[1] for m, g in gateways.items()}
        levels: dict[int, dict] = {}
        for c, m in plan:
            path = work / f"{m}-c{c}.json"
            res = json.loads(path.read_text())
            rows = None
            if m in dbs:  # the gateway's rows of this run: written while it ran
                until = datetime.fromtimestamp(path.stat().st_mtime, UTC)
                rows = gateway_rows(dbs[m], until - timedelta(seconds=res["duration"] + 1), until)
            levels.setdefault(c, {})[m] = summarize(res, rows)
    for row in levels.values():
        d = row.get("direct")
        for m, s in row.items():
            if d and m != "direct":
                s["tok_s_vs_direct"] = s["output_tok_s"] / d["output_tok_s"]
                s["ttft_p95_vs_direct"] = s["ttft_p95_ms"] / d["ttft_p95_ms"]
                s["ttft_p50_delta_ms"] = s["ttft_p50_ms"] - d["ttft_p50_ms"]
    result = {
        "command": " ".join(sys.argv), "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpu": cpu_flags(), "cpu_count": os.cpu_count(), "load_avg_at_start": os.getloadavg(),
        "upstream": "synthetic" if a.synthetic else (a.upstream or a.model),
        "workers": a.workers, "input_len": a.input_len, "output_len": a.output_len,
        "levels": {str(c): v for c, v in levels.items()}, "wall_s": round(time.time() - t_start, 1),
        "work_dir": str(work),
    }
    Path(a.out).write_text(json.dumps(result, indent=2))
    print(table(result))


def table(result: dict) -> str:
    """The BENCHMARKS.md table of a result."""
    lines = [
        f"cpu {result['cpu']} x{result['cpu_count']}, load avg at start {result['load_avg_at_start'][0]:.1f}, "
        f"workers {result['workers']}, upstream {result['upstream']}",
        "| c | path | out tok/s (x direct) | TTFT p50 / p95 / p99 ms | p95 TTFT x direct | "
        "gateway overhead p50 / p95 ms | guardrail share of overhead |",
        "|---|---|---|---|---|---|---|",
    ]
    for c, row in result["levels"].items():
        for m, s in row.items():
            ratio = f" ({s['tok_s_vs_direct']:.3f})" if "tok_s_vs_direct" in s else ""
            p95x = f"{s['ttft_p95_vs_direct']:.2f}" if "ttft_p95_vs_direct" in s else "-"
            over = (f"{s['overhead_p50_ms']:.2f} / {s['overhead_p95_ms']:.2f}"
                    if s.get("overhead_p50_ms") is not None else "-")
            share = (f"{100 * s['guardrail_share_of_overhead']:.0f}%"
                     if s.get("guardrail_share_of_overhead") is not None else "-")
            lines.append(
                f"| {c} | {m} | {s['output_tok_s']:.0f}{ratio} | {s['ttft_p50_ms']:.1f} / "
                f"{s['ttft_p95_ms']:.1f} / {s['ttft_p99_ms']:.1f} | {p95x} | {over} | {share} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
