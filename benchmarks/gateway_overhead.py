"""Gateway overhead: `vllm bench serve` against vLLM directly and through the gateway, same run.

    .venv/bin/python benchmarks/gateway_overhead.py --model .alignloop-test/models/tiny-llama-v2 \
        --concurrency 1 8 32 --input-len 128 --output-len 64 --out bench-gateway.json

Starts one vLLM server (serving env) for ``--model`` and the gateway (uvicorn, in a thread of this
process) in front of it with the guardrail chains of ``configs/gateway.yaml``. For each
concurrency level it runs the same random workload (fixed input/output lengths, ``--ignore-eos``)
first direct, then through the gateway, and reports TTFT p50/p99 deltas, the output-throughput
ratio, and the guardrail chain's own time per request (p50/p99, from the log store).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

BENCH_KEY = "sk-bench-tenant"


def bench_args(
    base_url: str,
    served: str,
    tokenizer: str,
    c: int,
    n: int,
    in_len: int,
    out_len: int,
    out_dir: Path,
    tag: str,
) -> list[str]:
    """Arguments of one `vllm bench serve` run (result saved as ``<tag>-c<c>.json``)."""
    return [
        "--backend",
        "openai-chat",
        "--base-url",
        base_url,
        "--endpoint",
        "/v1/chat/completions",
        "--model",
        served,
        "--tokenizer",
        tokenizer,
        "--dataset-name",
        "random",
        "--random-input-len",
        str(in_len),
        "--random-output-len",
        str(out_len),
        "--ignore-eos",
        "--num-prompts",
        str(n),
        "--max-concurrency",
        str(c),
        "--percentile-metrics",
        "ttft,tpot,itl,e2el",
        "--metric-percentiles",
        "50,99",
        "--save-result",
        "--result-dir",
        str(out_dir),
        "--result-filename",
        f"{tag}-c{c}.json",
        "--seed",
        "0",
        "--ready-check-timeout-sec",
        "60",
    ]


def run_bench_grid(runs: list[list[str]], work: Path) -> None:
    """All runs in one serving-env process (evals/_bench_serve.py: vLLM's own bench parser + main)."""
    from serving.vllm_server import serve_python

    runs_file = work / "runs.json"
    runs_file.write_text(json.dumps(runs))
    env = {**os.environ, "OPENAI_API_KEY": BENCH_KEY, "HF_HUB_OFFLINE": "1"}
    for var in ("PYTHONPATH", "VIRTUAL_ENV"):
        env.pop(var, None)
    proc = subprocess.run(
        [
            str(serve_python()),
            "-P",
            str(REPO / "evals" / "_bench_serve.py"),
            "--runs-file",
            str(runs_file),
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    (work / "bench.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(
            f"vllm bench serve failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )


def chain_cpu_ms(service, rows: list[dict]) -> list[float]:  # noqa: ANN001
    """Replay logged exchanges through the chains (input + streamed output in 4-char deltas),
    timing this thread's CPU only: the chains' cost without the rest of the box's load."""
    from guardrails.base import StreamGuard
    from serving.protocol import ChatCompletionRequest

    out = []
    for row in rows:
        req = ChatCompletionRequest(model="alignloop", messages=row["messages"])
        text = row["response"] or ""
        t0 = time.thread_time()
        service.input_chain.run(req)
        guard = StreamGuard(service.output_chain)
        for i in range(0, len(text), 4):
            guard.feed(text[i : i + 4])
        guard.finish()
        out.append((time.thread_time() - t0) * 1000)
    return out


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", required=True, help="HF model folder to serve with vLLM.")
    p.add_argument("--gateway-config", default=str(REPO / "configs" / "gateway.yaml"))
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument(
        "--prompts-per-level", type=int, default=4, help="num_prompts = max(16, this * concurrency)"
    )
    p.add_argument("--out", default="bench-gateway.json")
    args = p.parse_args()

    from serving.app import create_app, serve_in_thread
    from serving.gateway_config import GuardrailsConfig, TenantConfig, hash_key, load_gateway_config
    from serving.logstore import LogStore
    from serving.service import StaticUpstream, Upstream
    from serving.vllm_server import VLLMArgs, VLLMServer

    work = Path(tempfile.mkdtemp(prefix="bench-gateway-"))
    cfg = load_gateway_config(args.gateway_config)
    cfg = cfg.model_copy(
        update={
            "tenants": [
                TenantConfig(name="bench", key_sha256=hash_key(BENCH_KEY), max_in_flight=1024)
            ],
            "public_models": ["alignloop"],
        }
    )
    cfg.limits.max_in_flight = 1024
    rows = []
    # No prefix caching: direct and gateway runs send the same prompts (same seed), and a cache
    # warmed by the first run would make the second look faster.
    with VLLMServer(
        args.model,
        args=VLLMArgs(max_model_len=2048, extra_args=["--no-enable-prefix-caching"]),
        log_path=work / "vllm.log",
        served_name="bench-model",
    ) as server:
        store = LogStore(f"sqlite:///{work / 'logs.db'}")
        up = Upstream(base_url=server.base_url, release_id="bench", served_model="bench-model")
        app = create_app(cfg, StaticUpstream(up), store)
        # The same gateway with empty chains separates the proxy's cost from the guardrails'.
        bare_cfg = cfg.model_copy(update={"guardrails": GuardrailsConfig()})
        bare = create_app(
            bare_cfg, StaticUpstream(up), LogStore(f"sqlite:///{work / 'logs-bare.db'}")
        )
        with serve_in_thread(app) as gw, serve_in_thread(bare) as gw_bare:
            # Interleave direct and gateway runs per level, so drift (other load) hits both alike.
            runs = [
                bench_args(
                    server.root_url,
                    "bench-model",
                    args.model,
                    1,
                    8,
                    args.input_len,
                    args.output_len,
                    work,
                    "warmup",
                )
            ]
            for c in args.concurrency:
                n = max(16, args.prompts_per_level * c)
                for tag, url, name in (
                    ("direct", server.root_url, "bench-model"),
                    ("gateway", gw, "alignloop"),
                    ("bare", gw_bare, "alignloop"),
                ):
                    runs.append(
                        bench_args(
                            url, name, args.model, c, n, args.input_len, args.output_len, work, tag
                        )
                    )
            run_bench_grid(runs, work)
            store.flush()
            # The chain's own time per request, over every gateway request of the grid.
            logged = list(store.exchanges())
            guard_ms = [x["guardrail_ms"] for x in logged if x["guardrail_ms"] is not None]
            guard_cpu_ms = chain_cpu_ms(app.state.service, logged)
    for c in args.concurrency:
        d = json.loads((work / f"direct-c{c}.json").read_text())
        g = json.loads((work / f"gateway-c{c}.json").read_text())
        b = json.loads((work / f"bare-c{c}.json").read_text())
        row = {
            "concurrency": c,
            "num_prompts": d["num_prompts"],
            "direct_ttft_p50_ms": d["median_ttft_ms"],
            "gateway_ttft_p50_ms": g["median_ttft_ms"],
            "direct_ttft_p99_ms": d["p99_ttft_ms"],
            "gateway_ttft_p99_ms": g["p99_ttft_ms"],
            "ttft_p50_delta_ms": g["median_ttft_ms"] - d["median_ttft_ms"],
            "ttft_p99_delta_ms": g["p99_ttft_ms"] - d["p99_ttft_ms"],
            "direct_output_tok_s": d["output_throughput"],
            "gateway_output_tok_s": g["output_throughput"],
            "throughput_ratio": g["output_throughput"] / d["output_throughput"],
            "bare_ttft_p50_ms": b["median_ttft_ms"],
            "bare_output_tok_s": b["output_throughput"],
            "bare_throughput_ratio": b["output_throughput"] / d["output_throughput"],
            "gateway_failed": g.get("failed", 0),
            "direct_failed": d.get("failed", 0),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    guard = {
        "requests": len(guard_ms),
        "p50_ms": pct(guard_ms, 50),
        "p99_ms": pct(guard_ms, 99),
        "mean_ms": statistics.fmean(guard_ms) if guard_ms else float("nan"),
        "cpu_p50_ms": pct(guard_cpu_ms, 50),
        "cpu_p99_ms": pct(guard_cpu_ms, 99),
    }
    result = {
        "model": args.model,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "gateway_config": args.gateway_config,
        "rows": rows,
        "guardrail_chain": guard,
        "work_dir": str(work),
    }
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(
        "| conc | TTFT p50 direct/gw (Δ) ms | TTFT p99 direct/gw (Δ) ms | out tok/s direct/gw (ratio) "
        "| no-guardrail gw: TTFT p50 ms, tok/s (ratio) |"
    )
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['concurrency']} | {r['direct_ttft_p50_ms']:.1f}/{r['gateway_ttft_p50_ms']:.1f} ({r['ttft_p50_delta_ms']:+.1f}) "
            f"| {r['direct_ttft_p99_ms']:.1f}/{r['gateway_ttft_p99_ms']:.1f} ({r['ttft_p99_delta_ms']:+.1f}) "
            f"| {r['direct_output_tok_s']:.0f}/{r['gateway_output_tok_s']:.0f} ({r['throughput_ratio']:.3f}) "
            f"| {r['bare_ttft_p50_ms']:.1f}, {r['bare_output_tok_s']:.0f} ({r['bare_throughput_ratio']:.3f}) |"
        )
    print(
        f"guardrail chain per request ({guard['requests']} requests), wall in the gateway: p50 "
        f"{guard['p50_ms']:.3f} ms, p99 {guard['p99_ms']:.3f} ms, mean {guard['mean_ms']:.3f} ms; "
        f"CPU replayed alone: p50 {guard['cpu_p50_ms']:.3f} ms, p99 {guard['cpu_p99_ms']:.3f} ms"
    )


if __name__ == "__main__":
    main()
