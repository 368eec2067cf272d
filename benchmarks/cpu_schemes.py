"""Serve one merged model as bf16 and its quantized variants and measure each with the perf eval.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/cpu_schemes.py \\
        --variant bf16=.alignloop/runs/<run>/merge/output/model \\
        --variant w8a8-int8=<quantize run w8a8>/output/model \\
        --variant w4a16=.alignloop/runs/<run>/quantize/output/model --out bench-schemes.json

Each variant gets its own `VLLMServer` (serving env) and `evals.perf.run` (`vllm bench serve`,
configs/evals.yaml's grid, no realistic run), one after the other, so the numbers compare.
"""

from __future__ import annotations

import argparse
import json

from evals import perf
from evals.config import Endpoint, EvalsConfig
from ground.config import load_config, repo_root
from serving.engine.vllm_server import VLLMServer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", action="append", required=True, help="name=model_dir (repeat)")
    ap.add_argument("--out", default="bench-schemes.json")
    args = ap.parse_args()
    results: dict[str, dict[str, float]] = {}
    for spec in args.variant:
        name, path = spec.split("=", 1)
        with VLLMServer(path, log_path=f"bench-schemes-{name}.log", served_name=name) as server:
            cfg = load_config(EvalsConfig, repo_root() / "configs" / "evals.yaml").perf
            cfg.realistic_prompts, cfg.tokenizer = None, path
            metrics = perf.run(cfg, Endpoint(server.base_url, "EMPTY", name), f"bench-schemes-{name}").metrics
        results[name] = {
            k: round(v, 1) for k, v in metrics.items()
            if k.startswith("perf.grid") and k.endswith(("output_tokens_per_s", "ttft_p95_ms"))
        }
        print(name, json.dumps(results[name]), flush=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":  # vLLM-side processes are separate; the guard keeps imports side-effect free
    main()
