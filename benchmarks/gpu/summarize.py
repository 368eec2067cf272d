"""Turn the GPU benchmarks' JSON into the markdown tables of BENCHMARKS.md.

    .venv/bin/python benchmarks/gpu/summarize.py RESULTS_DIR [RESULTS_DIR ...]

Reads perf_8b.json (merged across directories), bw.json, train_scaling.json and loop_gpu.json.
For the 8B grid it applies the serving choice the loop makes (:func:`evals.serving_choice.choose`
over the measurements through the gateway, as the loop measures its candidates) at each measured
concurrency and sets the chosen (scheme, kernel) against bf16 through the same gateway, with each
variant's fraction of its memory roofline (bytes read per output token over the measured copy
bandwidth).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from loop_report import markdown as loop_markdown  # noqa: E402
from make_llama8b import LLAMA_8B, parameter_bytes  # noqa: E402

from evals.serving_choice import Slo, Workload, choose, measurement_from_dict  # noqa: E402

ORDER = ["bf16", "w4a16", "w4a16-marlin", "fp8-dynamic"]
USD_PER_HOUR = 3.50  # configs/evals-gpu.yaml, h200
SLO = Slo(p95_ttft_ms=1000, p95_tpot_ms=50)
GOALS = {1: 2.0, 256: 1.3}  # chosen vs bf16 through the gateway (issue goals)


def load(dirs: list[Path]) -> dict:
    got: dict = {"perf": {}, "train": {}}
    for d in dirs:
        if (f := d / "perf_8b.json").is_file():
            got["perf"].update(json.loads(f.read_text()).get("variants", {}))
        if (f := d / "train_scaling.json").is_file():
            got["train"].update(json.loads(f.read_text()))
        for name in ("bw.json", "loop_gpu.json"):
            if (f := d / name).is_file():
                got[name] = json.loads(f.read_text())
        if (f := d / "nvidia-smi.txt").is_file():
            got["smi"] = f.read_text().strip().splitlines()[-1]
    return got


def kv_bytes_per_token(cfg: dict = LLAMA_8B) -> int:
    return 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * cfg["head_dim"] * 2


def roofline_tok_s(scheme: str, batch: int, bw: float, ctx: int = 128 + 128) -> float:
    """Memory roofline of decode: weights read once per step for the batch, plus each sequence's
    bf16 KV cache at the mean context (prompt + half the answer)."""
    return bw / (parameter_bytes(scheme)["bytes_per_token"] / batch + ctx * kv_bytes_per_token())


def _tok(v: dict, path: str, c: int) -> float | None:
    return v.get(path, {}).get(str(c), {}).get("output_tokens_per_s")


def _levels(perf: dict) -> list[int]:
    return sorted({int(c) for v in perf.values() for c in v.get("gateway", {})})


def perf_md(got: dict) -> list[str]:
    perf = {k: v for k, v in got["perf"].items() if k in ORDER}
    conc = _levels(perf)
    if not perf:
        return ["(no 8B perf results)"]
    base = perf.get("bf16", {})
    head = [f"{p} c={c}" for p in ("direct", "gateway") for c in conc]
    out = ["| variant (scheme, kernel) | start-up s | " + " | ".join(f"{h} tok/s (x bf16)" for h in head)
           + " | gateway p95 TTFT ms |", "|---|---|" + "---|" * (len(head) + 1)]
    for name in [n for n in ORDER if n in perf]:
        v = perf[name]
        cells = []
        for p in ("direct", "gateway"):
            for c in conc:
                t, b = _tok(v, p, c), _tok(base, p, c)
                cells.append("-" if t is None else f"{t:,.0f}" + (f" ({t / b:.2f}x)" if b and name != "bf16" else ""))
        ttft = " / ".join(f"{v.get('gateway', {}).get(str(c), {}).get('ttft_p95_ms', float('nan')):.0f}" for c in conc)
        err = f" ERROR {v['error'][-200:]}" if "error" in v else ""
        out.append(f"| {name} ({v['scheme']}, {v['kernel']}) | {v.get('startup_s', '-')} | " + " | ".join(cells)
                   + f" | {ttft} |{err}")
    bw = got.get("bw.json", {}).get("copy_bw_bytes_s")
    if bw:
        out += ["", f"Memory roofline (copy bandwidth {bw / 1e12:.2f} TB/s measured): measured tok/s direct, its "
                "roofline, the fraction direct reaches and (after the slash) the fraction through the gateway",
                "", "| variant | " + " | ".join(f"c={c}" for c in conc) + " |", "|---|" + "---|" * len(conc)]
        for name in [n for n in ORDER if n in perf]:
            v = perf[name]
            cells = []
            for c in conc:
                roof = roofline_tok_s(v["scheme"], c, bw)
                t, g = _tok(v, "direct", c), _tok(v, "gateway", c)
                cells.append("-" if not t else f"{t:,.0f} / {roof:,.0f} ({t / roof:.0%}"
                             + (f" / {g / roof:.0%})" if g else ")"))
            out.append(f"| {name} | " + " | ".join(cells) + " |")
    return out


def choice_md(got: dict) -> list[str]:
    perf = {k: v for k, v in got["perf"].items() if k in ORDER and "gateway" in v}
    if not perf:
        return ["(no gateway measurements)"]
    points = [
        measurement_from_dict({"variant": n, "scheme": v["scheme"], "kernel": v["kernel"], "concurrency": int(c),
                               "output_tok_s": s["output_tokens_per_s"], "p95_ttft_ms": s.get("ttft_p95_ms"),
                               "p95_tpot_ms": s.get("tpot_p95_ms"), "failed": int(s.get("failed", 0))})
        for n, v in perf.items() for c, s in v["gateway"].items()
    ]
    out = [f"Serving choice (`evals.serving_choice.choose`, ${USD_PER_HOUR:.2f}/h, SLO p95 TTFT <= "
           f"{SLO.p95_ttft_ms:g} ms, p95 TPOT <= {SLO.p95_tpot_ms:g} ms) over the gateway measurements:", "",
           "| workload c | chosen (scheme, kernel) | x bf16 through the gateway | goal | reason |", "|---|---|---|---|---|"]
    for c in _levels(perf):
        d = choose(points, Workload(concurrency=c, usd_per_hour=USD_PER_HOUR, slo=SLO))
        ch = d["chosen"]
        if ch is None:
            out.append(f"| {c} | none | - | {GOALS.get(c, '-')} | {d['reason']} |")
            continue
        t, b = _tok(perf[ch["variant"]], "gateway", c), _tok(perf.get("bf16", {}), "gateway", c)
        ratio = f"{t / b:.2f}x" if t and b else "-"
        goal = GOALS.get(c)
        verdict = "-" if goal is None or not (t and b) else f">= {goal}x: {'met' if t / b >= goal else 'NOT met'}"
        out.append(f"| {c} | {ch['variant']} ({ch['scheme']}, {ch['kernel']}) | {ratio} | {verdict} | {d['reason']} |")
    return out


def parallel_md(got: dict) -> list[str]:
    perf = got["perf"]
    rows = [k for k in ("bf16", "bf16-tp2", "bf16-dp2") if k in perf]
    if len(rows) < 2:
        return ["(no TP/DP results)"]
    conc = sorted({int(c) for k in rows for c in perf[k].get("direct", {})})
    out = ["| release (bf16) | GPUs (share) | start-up s | " + " | ".join(f"direct c={c} tok/s (x 1 GPU)" for c in conc)
           + " | p95 TPOT ms |", "|---|---|---|" + "---|" * (len(conc) + 1)]
    for k in rows:
        v = perf[k]
        p = v.get("placement") or {}
        cells = [f"{t:,.0f}" + (f" ({t / b:.2f}x)" if (b := _tok(perf['bf16'], 'direct', c)) and k != "bf16" else "")
                 if (t := _tok(v, "direct", c)) else "-" for c in conc]
        tpot = " / ".join(f"{v.get('direct', {}).get(str(c), {}).get('tpot_p95_ms', float('nan')):.1f}" for c in conc)
        out.append(f"| {k} | {p.get('devices')} ({p.get('share')}) | {v.get('startup_s', '-')} | "
                   + " | ".join(cells) + f" | {tpot} |" + (f" ERROR {v['error'][-200:]}" if "error" in v else ""))
    return out


def train_md(got: dict) -> list[str]:
    t = got["train"]
    runs = {k: v for k, v in t.items() if isinstance(v, dict)}
    if not runs:
        return ["(no training results)"]
    out = ["| run | method | GPUs | rows x tokens per GPU step | LoRA r / dropout | Liger | packing (padding-free) | "
           "padding share | tokens/s | MFU (989 TFLOP/s per GPU) | peak memory GiB | wall s |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for k, v in runs.items():
        if "error" in v:
            out.append(f"| {k} | | | | | | | | ERROR {v['error']} | | | {v.get('wall_s')} |")
            continue
        lora = v.get("lora") or {}
        rank = lora.get("rank", v.get("lora_rank", "-"))
        drop = lora.get("dropout", "-")
        if v.get("method") == "dpo":
            drop = f"{drop} (TRL disables it)"
        rows = f"{v['batch_per_process']}{' pairs' if v.get('method') == 'dpo' else ''} x {v['seq']}"
        if v.get("lengths") == "varied":
            rows += " (varied lengths)"
        pack = "-" if v.get("packing") is None else (f"{'yes' if v['packing'] else 'no'}"
                                                     + (" (yes)" if v.get("padding_free") else ""))
        attn = v.get("attn_implementation")
        if attn and attn != "sdpa":
            pack += f", {attn}"
        liger = {True: "yes", False: "no"}.get(v.get("use_liger_kernel"), "-")
        pad = f"{v['padding_share']:.0%}" if v.get("padding_share") is not None else "-"
        out.append(f"| {k} | {v.get('method', 'sft')} | {v['processes']} | {rows} | {rank} / {drop} | {liger} | {pack} | "
                   f"{pad} | {v['tokens_per_s']:,.0f} | {v['mfu']:.1%} | {v.get('max_memory_gib')} | {v.get('wall_s')} |")
    for k, v in t.items():
        if k.endswith("scaling-2v1"):
            out.append(f"\nScaling 2 vs 1 GPU ({k.split('-')[0]}): **{v:.2f}x** (goal >= 1.8x: {'met' if v >= 1.8 else 'NOT met'})")
    return out


def main(dirs: list[Path]) -> None:
    got = load(dirs)
    print(f"Card: {got.get('smi', '?')}\n")
    for title, lines in (("8B-class Llama per (scheme, kernel)", perf_md(got)), ("Serving choice", choice_md(got)),
                         ("vLLM parallelism", parallel_md(got)), ("LoRA training scaling and MFU", train_md(got))):
        print(f"### {title}\n\n" + "\n".join(lines) + "\n")
    if "loop_gpu.json" in got:
        print("### alignloop run\n\n" + loop_markdown(got["loop_gpu.json"]))


if __name__ == "__main__":
    main([Path(p) for p in sys.argv[1:]])
