"""An 8B-class Llama (dummy weights) served per (scheme, kernel), direct and through the gateway.

    .venv/bin/python benchmarks/gpu/perf_8b.py --models DIR --out DIR [--variants bf16,fp8-dynamic]
        [--concurrency 1,256] [--tensor-parallel 1] [--data-parallel 1]

Each variant is a release of the product's :class:`serving.releases.manager.ReleaseManager` (placed on
the GPUs by serving/releases/placement.py; ``--load-format dummy``; the Marlin variant carries the kernel's
environment exactly as the loop stages it, flows/gpu.py), with the product's gateway in front of it
(benchmarks/gpu/gateway_proc.py: configs/gateway.yaml, guardrails on, in-flight limits raised so
a c=256 run measures the proxy rather than its 429s). One ``vllm bench serve`` process
(evals.perf.run_benches) then runs, back to back, every concurrency direct and through the
gateway: 128-token prompts, 256 output tokens, EOS ignored, 3 x c prompts (at least 4).
``--tensor-parallel``/``--data-parallel`` make the release span GPUs (the TP/DP comparison).
Results merge into OUT/perf_8b.json (two device calls add up); summarize.py makes the tables and
applies the serving choice the loop would make. ``--cpu-dry-run`` runs the same path on a CPU with
a 2-layer model of the same family (bf16 only, a few short requests).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: gateway_bench
sys.path.insert(0, str(Path(__file__).resolve().parent))

from evals.config import SLO, Endpoint, PerfConfig  # noqa: E402
from evals.perf import bench_args, run_benches, summarize  # noqa: E402
from serving.engine.vllm_server import VLLMArgs, free_port  # noqa: E402

log = logging.getLogger("perf_8b")
HERE = Path(__file__).resolve().parent
GATEWAY_KEY = "sk-alignloop-demo"  # the demo tenant of configs/gateway.yaml

# name -> (model folder under --models, scheme, kernel)
VARIANTS = {
    "bf16": ("bf16", "bf16", "default"),
    "w4a16": ("w4a16", "w4a16", "default"),
    "w4a16-marlin": ("w4a16", "w4a16", "marlin"),
    "fp8-dynamic": ("fp8-dynamic", "fp8-dynamic", "default"),
}


def perf_config(model_dir: Path, concurrency: list[int], output_len: int) -> PerfConfig:
    return PerfConfig(
        concurrency=concurrency, requests_per_level=max(4, 3 * max(concurrency)), input_len=128, output_len=output_len,
        slo=SLO(ttft_ms=2000, tpot_ms=100), percentiles=[50, 95, 99], tokenizer=str(model_dir),
        realistic_num_prompts=4, realistic_concurrency=4, realistic_output_len=32, model_dir=None,
        timeout_s=300,
    )


def release_args(kernel: str, tp: int, dp: int) -> VLLMArgs:
    from flows.gpu import kernel_args

    base = VLLMArgs(max_model_len=2048, max_num_seqs=256, tensor_parallel_size=tp, data_parallel_size=dp,
                    extra_args=["--load-format", "dummy"], startup_timeout_s=540)
    return kernel_args(base, kernel)


def with_seed(args: list[str], seed: int) -> list[str]:
    """``args`` with ``--seed`` set: every run against one server gets its own random prompts, or
    vLLM's prefix cache would serve a repeated prompt's prefill from memory."""
    out = list(args)
    if "--seed" in out:
        out[out.index("--seed") + 1] = str(seed)
    else:
        out += ["--seed", str(seed)]
    return out


def start_gateway(upstream: str, served: str, work: Path) -> tuple[subprocess.Popen, str]:
    """The single-process gateway of gateway_proc.py (``--gateway single``: earlier sessions' numbers)."""
    from ground.procs import owned_popen

    port = free_port()
    with open(work / "gateway.log", "w") as glog:
        proc = owned_popen([sys.executable, str(HERE / "gateway_proc.py"), "--upstream", upstream,
                            "--served", served, "--port", str(port), "--db", str(work / "gateway.db")],
                           stdout=glog, stderr=subprocess.STDOUT)
    import httpx

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"gateway exited with {proc.returncode}: {(work / 'gateway.log').read_text()[-1500:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code < 500:
                return proc, f"http://127.0.0.1:{port}/v1"
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError("gateway not up after 120 s")


def measure(name: str, models: Path, out: Path, conc: list[int], tp: int, dp: int, output_len: int,
            gateway_kind: str = "workers", noguard: bool = False) -> dict:
    from ground.procs import stop_group
    from serving.releases.manager import ReleaseManager
    from serving.releases.placement import PlacementConfig
    from serving.releases.store import ReleaseStore

    folder, scheme, kernel = VARIANTS[name]
    model_dir = models / folder
    label = name + (f"-tp{tp}" if tp > 1 else "") + (f"-dp{dp}" if dp > 1 else "")
    work = out / "work" / label
    work.mkdir(parents=True, exist_ok=True)
    entry: dict = {"variant": name, "scheme": scheme, "kernel": kernel, "tensor_parallel": tp,
                   "data_parallel": dp, "model": str(model_dir)}
    cfg = perf_config(model_dir, conc, output_len)
    # One release at a time: it gets whole GPUs (0.9 of their memory), as a dedicated server would.
    manager = ReleaseManager(ReleaseStore(work / "releases"), grace_s=0, placement=PlacementConfig(max_releases=1))
    gateway = None
    t0 = time.monotonic()
    try:
        with contextlib.ExitStack() as stack:
            rel = manager.stage(model_dir, release_args(kernel, tp, dp), source={"benchmark": label})
            entry["placement"] = rel.placement
            if rel.status != "staged":
                raise RuntimeError(rel.history[-1].reason)
            server = manager._servers[rel.release_id]
            entry["startup_s"] = round(server.startup_s or 0, 1)
            endpoints = {"direct": Endpoint(server.base_url, "EMPTY", rel.served_name)}
            if gateway_kind == "single":
                key = GATEWAY_KEY
                gateway, gw_url = start_gateway(server.base_url, rel.served_name, work)
                endpoints["gateway"] = Endpoint(gw_url, key, "alignloop")
            else:  # as `alignloop serve` runs it: control plane + worker processes (gateway_bench.py)
                import gateway_bench

                key = gateway_bench.BENCH_KEY
                modes = ["guardrails"] + (["noguard"] if noguard else [])
                t_gw = time.monotonic()
                for mode in modes:
                    base, _db, _proc = stack.enter_context(
                        gateway_bench.running_gateway(mode, server.base_url, rel.served_name, "auto", work))
                    path = "gateway" if mode == "guardrails" else "gateway-noguard"
                    endpoints[path] = Endpoint(base + "/v1", key, "alignloop")
                entry["gateway_startup_s"] = round(time.monotonic() - t_gw, 1)
            entry["gateway_kind"] = gateway_kind
            # Each level: direct then each gateway path, back to back; each run its own prompts.
            plan = {f"{path}-c{c}": with_seed(bench_args(ep, cfg, str(model_dir), work / f"{path}-c{c}.json",
                                                         concurrency=c, num_prompts=max(4, 3 * c)), seed)
                    for seed, (c, (path, ep)) in enumerate((c, pe) for c in conc for pe in endpoints.items())}
            run_benches(list(plan.values()), key, cfg.timeout_s, work)
        for run in plan:
            path, c = run.rsplit("-c", 1)
            entry.setdefault(path, {})[c] = summarize(json.loads((work / f"{run}.json").read_text()),
                                                      cfg.percentiles)
    except Exception as exc:  # keep the other variants' numbers
        entry["error"] = str(exc)[-3000:]
        log.exception("variant %s failed", label)
    finally:
        if gateway is not None:
            stop_group(gateway)
        manager.shutdown()
    entry["wall_s"] = round(time.monotonic() - t0, 1)
    return {label: entry}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", required=True, type=Path, help="make_llama8b.py output")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--concurrency", default="1,256")
    ap.add_argument("--tensor-parallel", type=int, default=1)
    ap.add_argument("--data-parallel", type=int, default=1)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--gateway", choices=["workers", "single"], default="workers",
                    help="workers: as `alignloop serve` runs it (control plane + worker processes); "
                    "single: one uvicorn process (gateway_proc.py)")
    ap.add_argument("--noguard-variants", default="bf16",
                    help="variants also measured through a gateway with no guardrail chains (the proxy's own cost)")
    ap.add_argument("--cpu-dry-run", action="store_true")
    a = ap.parse_args()
    if a.cpu_dry_run:
        a.models, a.variants, a.concurrency, a.output_len = _tiny_models(a.out), "bf16", "1,2", 8
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    a.out.mkdir(parents=True, exist_ok=True)
    summary_file = a.out / "perf_8b.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {"variants": {}}
    conc = [int(c) for c in a.concurrency.split(",")]
    for name in [v for v in a.variants.split(",") if v]:
        got = measure(name, a.models, a.out, conc, a.tensor_parallel, a.data_parallel, a.output_len,
                      a.gateway, a.gateway == "workers" and name in a.noguard_variants.split(","))
        summary["variants"].update(got)
        summary_file.write_text(json.dumps(summary, indent=1))
        for label, e in got.items():
            cells = " ".join(f"{p} c{c} {e.get(p, {}).get(str(c), {}).get('output_tokens_per_s', '-')}"
                             for p in ("direct", "gateway", "gateway-noguard") if p in e for c in conc)
            print(f"RESULT {label}: start {e.get('startup_s')}s {cells} wall {e['wall_s']}s"
                  + (f" ERROR {e['error'][-300:]}" if "error" in e else ""), flush=True)
    summary["env"] = {"nvidia_smi": _smi(), "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}
    summary_file.write_text(json.dumps(summary, indent=1))


def _tiny_models(out: Path) -> Path:
    """A config-only 2-layer Llama with the embedded model's tokenizer (CPU attention needs head 64)."""
    from make_llama8b import LLAMA_8B, TOKENIZER_FILES

    from training.base_model import materialize

    folder = out / "tiny-models" / "bf16"
    folder.mkdir(parents=True, exist_ok=True)
    tiny = {**LLAMA_8B, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
            "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 64, "torch_dtype": "float32"}
    (folder / "config.json").write_text(json.dumps(tiny))
    base = Path(materialize().path)
    for name in TOKENIZER_FILES:
        if (base / name).is_file():
            (folder / name).write_bytes((base / name).read_bytes())
    return folder.parent


def _smi() -> str:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20).stdout.strip()
    except OSError as exc:
        return str(exc)


if __name__ == "__main__":
    main()
