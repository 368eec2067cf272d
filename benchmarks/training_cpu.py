"""Training stages on the real embedded model on this CPU, at the demo's sizes.

SFT (LoRA) -> DPO (LoRA on the SFT model) -> merge -> AWQ, each through its stage's ``run(cfg)``,
with wall time, tokens/s and model sizes, plus the machine's load while it ran (the machine is
shared). Rows come from ``training/demo/prompts.jsonl`` (prompt -> reference answer; DPO pairs
prefer the reference over a vague answer), so lengths match the demo's short answers.

    .venv/bin/python benchmarks/training_cpu.py [--out DIR] [--sft-rows 60] [--pairs 40] \
        [--variant name key=value ...]

A variant runs SFT only with overrides (e.g. ``--variant packed packing=true``) to compare
batching choices; the chain (DPO, merge, quantize) runs on the default SFT result.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VAGUE = [
    "I'm not sure, you could check the website.",
    "Hmm, that depends. Maybe try asking someone else?",
    "Sure! Here is everything you need to know about that topic and more.",
]


class LoadSampler:
    """Samples the 1-minute load average every ``every_s`` while a stage runs (the machine is
    shared); benchmarks/continual_cpu.py uses it too."""

    def __init__(self, every_s: float = 5.0) -> None:
        self.every_s = every_s
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            self.samples.append(os.getloadavg()[0])

    def __enter__(self) -> LoadSampler:
        self.samples.append(os.getloadavg()[0])
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()

    def summary(self) -> dict[str, float]:
        s = self.samples or [0.0]
        return {"load_mean": round(sum(s) / len(s), 2), "load_max": round(max(s), 2)}


def build_dataset(path: Path, sft_rows: int, pairs: int) -> Path:
    from datasets import Dataset, DatasetDict

    pool = [json.loads(line) for line in (REPO / "training/demo/prompts.jsonl").read_text().splitlines() if line]
    rows = [pool[i % len(pool)] for i in range(max(sft_rows, pairs) + 8)]

    def sft(r: dict) -> dict:
        return {"prompt": [{"role": "user", "content": r["prompt"]}],
                "completion": [{"role": "assistant", "content": r["reference"]}],
                "request_ids": [r["id"]], "feedback_ids": [], "source": "benchmark"}

    def dpo(i: int, r: dict) -> dict:
        return {"prompt": [{"role": "user", "content": r["prompt"]}],
                "chosen": [{"role": "assistant", "content": r["reference"]}],
                "rejected": [{"role": "assistant", "content": VAGUE[i % len(VAGUE)]}],
                "request_ids": [r["id"]], "feedback_ids": [], "source": "benchmark"}

    held = rows[-8:]
    DatasetDict(
        sft=Dataset.from_list([sft(r) for r in rows[:sft_rows]]),
        dpo=Dataset.from_list([dpo(i, r) for i, r in enumerate(rows[:pairs])]),
        heldout_sft=Dataset.from_list([sft(r) for r in held]),
        heldout_dpo=Dataset.from_list([dpo(i, r) for i, r in enumerate(held)]),
    ).save_to_disk(str(path))
    return path


def timed(name: str, fn, results: dict) -> object:
    """Run a stage; record wall time, this process's CPU time and the machine's load.

    On a shared machine wall time mostly measures the neighbours; CPU seconds / cores is what
    the stage would take on an idle machine of this size (a lower bound: perfect threading).
    """
    t0, c0 = time.monotonic(), time.process_time()
    with LoadSampler() as load:
        out = fn()
    wall, cpu = time.monotonic() - t0, time.process_time() - c0
    cores = os.cpu_count() or 1
    results[name] = {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
                     "idle_estimate_s": round(cpu / cores, 1), **load.summary(), "result": out}
    print(f"== {name}: wall {wall:.0f} s, cpu {cpu:.0f} s (idle estimate {cpu / cores:.0f} s), "
          f"load {load.summary()}", flush=True)
    return out


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="/tmp/alignloop-bench-training")
    ap.add_argument("--base", default=str(REPO / ".alignloop-test/models/base"))
    ap.add_argument("--sft-rows", type=int, default=60)
    ap.add_argument("--pairs", type=int, default=40)
    ap.add_argument("--variant", nargs="+", action="append", default=[], metavar="NAME KEY=VALUE",
                    help="an extra SFT run with overrides, e.g. --variant packed packing=true")
    ap.add_argument("--skip-chain", action="store_true", help="only SFT (and variants)")
    ap.add_argument("--sft", nargs="*", default=[], help="overrides for the main SFT run")
    ap.add_argument("--dpo", nargs="*", default=[], help="overrides for DPO")
    ap.add_argument("--quantize", nargs="*", default=[], help="overrides for quantize")
    args = ap.parse_args()

    from dataclasses import asdict

    from ground.config import load_config
    from training.base_model import materialize
    from training.dpo import DPOStageConfig
    from training.dpo import run as run_dpo
    from training.merge import MergeConfig
    from training.merge import run as run_merge
    from training.quantize import QuantizeConfig
    from training.quantize import run as run_quantize
    from training.sft import SFTStageConfig
    from training.sft import run as run_sft

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = materialize(args.base).path
    ds = build_dataset(out / f"dataset-{args.sft_rows}-{args.pairs}", args.sft_rows, args.pairs)
    configs = REPO / "configs"
    common = [f"dataset_path={ds}"]
    results: dict[str, dict] = {"cpu_count": os.cpu_count(), "load_at_start": os.getloadavg()}

    def sft(name: str, overrides: list[str]) -> object:
        cfg = load_config(SFTStageConfig, configs / "sft.yaml",
                          [f"model.name_or_path={base}", *common, f"run_dir={out / name}", *overrides])
        return timed(f"sft[{name}]", lambda: asdict(run_sft(cfg)), results)

    main_sft = sft("main", args.sft)
    for name, *overrides in args.variant:
        sft(name, overrides)
    if not args.skip_chain:
        dpo_cfg = load_config(DPOStageConfig, configs / "dpo.yaml",
                              [f"sft_adapter={main_sft['adapter_dir']}", *common, *args.dpo])
        dpo = timed("dpo", lambda: asdict(run_dpo(dpo_cfg)), results)
        merge_cfg = load_config(MergeConfig, configs / "merge.yaml", [f"adapter={dpo['adapter_dir']}"])
        merged = timed("merge", lambda: asdict(run_merge(merge_cfg)), results)
        q_cfg = load_config(QuantizeConfig, configs / "quantize.yaml",
                            [f"model_dir={merged['model_dir']}", *common, *args.quantize])
        timed("quantize", lambda: asdict(run_quantize(q_cfg)), results)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    print(summary_table(results))


def summary_table(results: dict) -> str:
    lines = ["| stage | wall s | CPU s | idle est. s | tokens/s (wall) | load mean/max | notes |",
             "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        if not isinstance(r, dict) or "result" not in r:
            continue
        res = r["result"]
        tps = res.get("tokens_per_s", "")
        if name.startswith("sft"):
            note = f"{res['train_rows']} rows, {res['steps']} steps, loss {res['loss_curve'][0]['loss']}->{res['final_loss']}, held-out {res['heldout_loss']}"
        elif name == "dpo":
            note = f"{res['train_pairs']} pairs, {res['steps']} steps, rewards {res['reward_metrics']}"
        elif name == "merge":
            note = f"{res['dtype']}, {res['model_bytes'] / 1e6:.0f} MB, max logit diff {res['max_logit_diff']} (fp32) / {res['max_logit_diff_saved_dtype']} (saved), delta rounding {res['delta_rounding_error']}"
        else:
            note = f"{res['scheme']} g{res['group_size']}, {res['calibration_rows']} rows/{res['calibration_tokens']} tok, {res['size_before_bytes'] / 1e6:.0f} MB -> {res['size_after_bytes'] / 1e6:.0f} MB"
        lines.append(f"| {name} | {r['wall_s']} | {r['cpu_s']} | {r['idle_estimate_s']} | {tps} | "
                     f"{r['load_mean']}/{r['load_max']} | {note} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
