"""SFT -> DPO -> merge -> AWQ w4a16 (+ FP8 dynamic) of the embedded model, then quality per variant.

    python3 benchmarks/gpu/train_quality.py --dataset DIR --out DIR [--stages train,quality]

Every step is the project's own stage ``run(cfg)`` (training.sft/dpo/merge/quantize), with the
shipped YAML from configs/ when there is one and only the paths overridden; wall times are
recorded per stage. Then each variant (base bf16, aligned bf16, aligned w4a16, aligned fp8) is
served by VLLMServer behind the gateway (benchmarks/gpu/gateway_proc.py, guardrails on) and the
quality and safety suites run through it (evals.suites.run). Results: ``OUT/train_quality.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, is_dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
HERE = Path(__file__).resolve().parent
log = logging.getLogger("train_quality")


def _cfg(cls: type, name: str, overrides: list[str]) -> object:
    from training.config import load_config

    path = ROOT / "configs" / f"{name}.yaml"
    return load_config(cls, path if path.is_file() else None, overrides)


def _res(r: object) -> dict:
    return asdict(r) if is_dataclass(r) else dict(r)  # type: ignore[arg-type]


def train(
    dataset: Path,
    run_dir: Path,
    summary: dict,
    save,
    base_dir: str | None,  # noqa: ANN001
    extra: dict[str, list[str]],
) -> dict[str, str]:
    """Run the stages; return variant name -> served model folder."""
    from training import dpo, merge, quantize, sft
    from training.base_model import materialize

    t = time.monotonic()
    base = base_dir or materialize().path
    summary["materialize_s"] = round(time.monotonic() - t, 1)
    summary["base_model"] = base
    variants = {"base": base}
    stages = summary.setdefault("stages", {})

    def stage(name: str, fn, cfg) -> object:  # noqa: ANN001
        t0 = time.monotonic()
        try:
            res = fn(cfg)
        except Exception:
            stages[name] = {
                "error": traceback.format_exc()[-2500:],
                "wall_s": round(time.monotonic() - t0, 1),
            }
            save()
            raise
        stages[name] = {"wall_s": round(time.monotonic() - t0, 1), "result": _res(res)}
        save()
        print(f"STAGE {name}: {stages[name]['wall_s']}s", flush=True)
        return res

    rd = f"run_dir={run_dir}"
    s = stage(
        "sft",
        sft.run,
        _cfg(
            sft.SFTStageConfig,
            "sft",
            [f"dataset_path={dataset}", rd, f"model.name_or_path={base}", *extra.get("sft", [])],
        ),
    )
    d = stage(
        "dpo",
        dpo.run,
        _cfg(
            dpo.DPOStageConfig,
            "dpo",
            [f"dataset_path={dataset}", f"sft_adapter={s.adapter_dir}", rd, *extra.get("dpo", [])],
        ),
    )
    m = stage(
        "merge",
        merge.run,
        _cfg(merge.MergeConfig, "merge", [f"adapter={d.adapter_dir}", rd, *extra.get("merge", [])]),
    )
    variants["aligned"] = m.model_dir
    for scheme in ("w4a16", "fp8-dynamic"):
        try:
            q = stage(
                f"quantize-{scheme}",
                quantize.run,
                _cfg(
                    quantize.QuantizeConfig,
                    "quantize",
                    [
                        f"model_dir={m.model_dir}",
                        f"dataset_path={dataset}",
                        f"scheme={scheme}",
                        "target=gpu",
                        f"run_dir={run_dir}/{scheme}",
                        *extra.get("quantize", []),
                    ],
                ),
            )
            variants[f"aligned-{scheme}"] = q.model_dir
        except Exception:  # one scheme failing must not cost the other's numbers
            log.exception("quantize %s failed", scheme)
    core = [
        stages[k]["wall_s"]
        for k in ("sft", "dpo", "merge", "quantize-w4a16")
        if "wall_s" in stages.get(k, {})
    ]
    summary["sft_dpo_merge_awq_s"] = round(sum(core), 1)
    return variants


def quality(variants: dict[str, str], dataset: Path, out: Path, summary: dict, save) -> None:  # noqa: ANN001
    from evals.config import Endpoint, EvalsConfig
    from evals.suites import run as run_suites
    from serving.vllm_server import VLLMArgs, VLLMServer, free_port

    cfg = EvalsConfig()
    cfg.quality.preference_dataset = str(dataset)
    cfg.quality.num_concurrent = 16
    cfg.safety.num_concurrent = 16
    cfg.quality.tokenizer = summary.get("base_model") or variants.get("base")
    results = summary.setdefault("quality", {})
    for name, model_dir in variants.items():
        work = out / "work" / f"q-{name}"
        work.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        entry: dict = {"model_dir": model_dir}
        args = VLLMArgs(
            max_model_len=2048,
            gpu_memory_utilization=0.30,
            enforce_eager=True,
            env={"VLLM_USE_FLASHINFER_SAMPLER": "0"},
            startup_timeout_s=300,
        )
        gw = None
        try:
            with VLLMServer(
                model_dir, args=args, log_path=work / "vllm.log", served_name=name
            ) as srv:
                entry["startup_s"] = round(srv.startup_s or 0, 1)
                port = free_port()
                with open(work / "gateway.log", "w") as glog:
                    gw = subprocess.Popen(
                        [
                            sys.executable,
                            str(HERE / "gateway_proc.py"),
                            "--upstream",
                            srv.base_url,
                            "--served",
                            name,
                            "--port",
                            str(port),
                            "--guardrails",
                            "guardrails",
                            "--db",
                            str(work / "gateway.db"),
                        ],
                        stdout=glog,
                        stderr=subprocess.STDOUT,
                    )
                _wait(f"http://127.0.0.1:{port}/healthz", gw)
                ep = Endpoint(f"http://127.0.0.1:{port}/v1", "sk-alignloop-demo", "alignloop")
                r = run_suites(
                    cfg,
                    ep,
                    work,
                    name,
                    suites=("quality", "safety"),
                    logprobs_endpoint=Endpoint(srv.base_url, "EMPTY", name),
                )
                entry["metrics"] = r.metrics
                entry["seconds"] = r.seconds
        except Exception:
            entry["error"] = traceback.format_exc()[-2500:]
            log.exception("quality of %s failed", name)
        finally:
            if gw is not None:
                gw.terminate()
                gw.wait(timeout=20)
        entry["wall_s"] = round(time.monotonic() - t0, 1)
        results[name] = entry
        save()
        m = entry.get("metrics", {})
        keys = sorted(
            k
            for k in m
            if k.startswith(
                (
                    "quality.capability.",
                    "quality.policy",
                    "quality.pref",
                    "safety.attack_block_rate",
                    "safety.overblock_rate",
                )
            )
        )
        print(
            f"QUALITY {name}: wall {entry['wall_s']}s "
            + " ".join(f"{k.split('.', 1)[1]}={m[k]:.3f}" for k in keys if not k.endswith(".n"))
            + (f" ERROR {entry['error'][-400:]}" if "error" in entry else ""),
            flush=True,
        )


def _wait(url: str, proc: subprocess.Popen, timeout_s: float = 90) -> None:
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
    raise RuntimeError("gateway did not come up")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--run-dir", type=Path, default=Path("/tmp/alrun"))
    ap.add_argument("--stages", default="train,quality")
    ap.add_argument("--base", default=None, help="base model folder (default: the embedded model)")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="STAGE:KEY=VALUE",
        help="config override for one stage (sft, dpo, merge, quantize); smoke tests",
    )
    ap.add_argument("--quality-variants", default=None, help="comma list (default: all trained)")
    a = ap.parse_args()
    extra: dict[str, list[str]] = {}
    for item in a.set:
        st, kv = item.split(":", 1)
        extra.setdefault(st, []).append(kv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    a.out.mkdir(parents=True, exist_ok=True)
    summary_file = a.out / "train_quality.json"
    summary: dict = json.loads(summary_file.read_text()) if summary_file.is_file() else {}

    def save() -> None:
        summary_file.write_text(json.dumps(summary, indent=2, default=str))

    stages = a.stages.split(",")
    variants = summary.get("variants", {})
    if "train" in stages:
        t0 = time.monotonic()
        try:
            variants = train(a.dataset, a.run_dir, summary, save, a.base, extra)
        except Exception:
            log.exception("training failed")
        summary["train_wall_s"] = round(time.monotonic() - t0, 1)
        summary["variants"] = variants
        save()
        print(
            f"TRAIN total {summary['train_wall_s']}s; sft+dpo+merge+awq "
            f"{summary.get('sft_dpo_merge_awq_s')}s; variants {list(variants)}",
            flush=True,
        )
    if "quality" in stages and variants:
        wanted = a.quality_variants.split(",") if a.quality_variants else list(variants)
        quality({k: v for k, v in variants.items() if k in wanted}, a.dataset, a.out, summary, save)
    save()


if __name__ == "__main__":
    main()
