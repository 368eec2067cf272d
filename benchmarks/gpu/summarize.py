"""Turn the device calls' JSON into the BENCHMARKS-GPU markdown, on the CPU machine.

    python benchmarks/gpu/summarize.py RESULTS_DIR [RESULTS_DIR ...] > benchmarks/gpu/RESULTS.md

Reads perf_8b.json, bw.json, vllm.json, nvidia-smi.txt and train_quality.json (the last file of
each name wins), adds the decode roofline (bytes per output token over the measured copy
bandwidth) and the serving choice of :func:`evals.serving_choice.choose` for each concurrency.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from make_llama8b import LLAMA_8B, parameter_bytes  # noqa: E402

from evals.serving_choice import Slo, Workload, choose, measurements_from_perf_metrics  # noqa: E402

CONC = [1, 8, 64, 256]
ORDER = ["bf16", "w4a16", "w4a16-marlin", "fp8-dynamic"]
USD_PER_HOUR = 3.00  # evals.config CostConfig default for one H100
SLO = Slo(p95_ttft_ms=1000, p95_tpot_ms=50)


def load(dirs: list[Path]) -> dict:
    got: dict = {}
    for d in dirs:
        for name in ("perf_8b.json", "bw.json", "vllm.json", "train_quality.json", "env.json"):
            if (d / name).is_file():
                doc = json.loads((d / name).read_text())
                if name == "perf_8b.json" and "perf_8b.json" in got:
                    got[name]["variants"].update(doc.get("variants", {}))
                else:
                    got[name] = doc
        if (d / "nvidia-smi.txt").is_file():
            got["nvidia-smi"] = (d / "nvidia-smi.txt").read_text().strip().splitlines()[-1]
    return got


def kv_bytes_per_token(cfg: dict = LLAMA_8B) -> int:
    return 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * cfg["head_dim"] * 2


def roofline_tok_s(scheme: str, batch: int, bw: float, ctx: int = 128 + 128) -> float:
    """Memory roofline of decode: weights read once per step for the batch, plus each sequence's
    KV cache (bf16) at the mean context (prompt + half the answer)."""
    w = parameter_bytes(scheme)["bytes_per_token"]
    return bw / (w / batch + ctx * kv_bytes_per_token())


def measurements(perf: dict) -> list:
    """Grid points of every measured variant, read from the perf suite's flat metrics."""
    return [
        p
        for name, v in perf.get("variants", {}).items()
        if v.get("metrics")
        for p in measurements_from_perf_metrics(name, v["scheme"], v["kernel"], v["metrics"])
    ]


def perf_md(got: dict) -> list[str]:
    perf = got.get("perf_8b.json", {"variants": {}})
    bw = got.get("bw.json", {}).get("copy_bw_bytes_s")
    var = perf["variants"]
    names = [n for n in ORDER if n in var] + [n for n in var if n not in ORDER]
    out = [
        "| variant | start-up s | " + " | ".join(f"c={c} tok/s (x bf16)" for c in CONC) + " |",
        "|---|---|" + "---|" * len(CONC),
    ]
    base = var.get("bf16", {}).get("metrics", {})
    for n in names:
        m = var[n].get("metrics", {})
        cells = []
        for c in CONC:
            t = m.get(f"perf.grid.c{c}.output_tokens_per_s")
            b = base.get(f"perf.grid.c{c}.output_tokens_per_s")
            cells.append(
                "-"
                if t is None
                else f"{t:,.0f}" + (f" ({t / b:.2f}x)" if b and n != "bf16" else "")
            )
        err = f" ERROR: {var[n]['error'][-200:]}" if "error" in var[n] else ""
        out.append(f"| {n} | {var[n].get('startup_s', '-')} | " + " | ".join(cells) + f" |{err}")
    out += [
        "",
        "p95 TTFT / p95 TPOT (ms):",
        "",
        "| variant | " + " | ".join(f"c={c}" for c in CONC) + " |",
        "|---|" + "---|" * len(CONC),
    ]
    for n in names:
        m = var[n].get("metrics", {})
        out.append(
            f"| {n} | "
            + " | ".join(
                f"{m.get(f'perf.grid.c{c}.ttft_p95_ms', float('nan')):.0f} / {m.get(f'perf.grid.c{c}.tpot_p95_ms', float('nan')):.1f}"
                for c in CONC
            )
            + " |"
        )
    if bw:
        out += [
            "",
            f"Roofline (memory): measured device-to-device copy {bw / 1e12:.2f} TB/s (read+write). "
            "Decode reads the weights once per step for the whole batch plus each sequence's bf16 KV "
            f"cache ({kv_bytes_per_token() // 1024} KiB/token, mean context 256):",
            "",
            "| variant | bytes/token at c=1 | roofline c=1 | measured c=1 | roofline c=256 | measured c=256 |",
            "|---|---|---|---|---|---|",
        ]
        for n in names:
            scheme = var[n]["scheme"]
            m = var[n].get("metrics", {})
            r1, r256 = roofline_tok_s(scheme, 1, bw), roofline_tok_s(scheme, 256, bw)
            t1, t256 = (
                m.get("perf.grid.c1.output_tokens_per_s"),
                m.get("perf.grid.c256.output_tokens_per_s"),
            )
            out.append(
                f"| {n} | {parameter_bytes(scheme)['bytes_per_token'] / 1e9:.2f} GB | {r1:,.0f} | "
                + (f"{t1:,.0f} ({t1 / r1:.0%})" if t1 else "-")
                + f" | {r256:,.0f} | "
                + (f"{t256:,.0f} ({t256 / r256:.0%})" if t256 else "-")
                + " |"
            )
    gw = next((v["gateway"] for v in var.values() if "gateway" in v), None)
    if gw:
        out += [
            "",
            f"Gateway at c={max(CONC)} (same vLLM, one `vllm bench serve` process, back to back):",
            "",
            "| path | output tok/s | vs direct | p95 TTFT ms | p95 TPOT ms |",
            "|---|---|---|---|---|",
        ]
        for label, r in gw.items():
            if "error" in r:
                out.append(f"| {label} | ERROR {r['error'][-200:]} | | | |")
                continue
            out.append(
                f"| {label} | {r['output_tokens_per_s']:,.0f} | {r.get('vs_direct', 1.0):.3f} | "
                f"{r.get('ttft_p95_ms', float('nan')):.0f} | {r.get('tpot_p95_ms', float('nan')):.1f} |"
            )
    return out


def select_md(got: dict) -> tuple[list[str], dict]:
    rows = measurements(got.get("perf_8b.json", {"variants": {}}))
    if not rows:
        return ["(no perf results)"], {}
    out = [
        f"Chosen by `evals.serving_choice.choose` (${USD_PER_HOUR:.2f}/h, SLO p95 TTFT <= "
        f"{SLO.p95_ttft_ms:g} ms, p95 TPOT <= {SLO.p95_tpot_ms:g} ms):",
        "",
        "| workload concurrency | chosen | $/1M output tokens | x bf16 | reason |",
        "|---|---|---|---|---|",
    ]
    decisions = {}
    for c in CONC:
        d = choose(rows, Workload(concurrency=c, usd_per_hour=USD_PER_HOUR, slo=SLO))
        decisions[c] = d
        ch = d["chosen"]
        if ch is None:
            out.append(f"| {c} | none | - | - | {d['reason']} |")
            continue
        out.append(
            f"| {c} | {ch['variant']} | {ch['usd_per_1m_output_tokens']:.3f} | "
            f"{ch['speedup_vs_baseline'] or 1:.2f} | {d['reason']} |"
        )
    return out, decisions


def train_md(got: dict) -> list[str]:
    tq = got.get("train_quality.json")
    if not tq:
        return ["(no training results)"]
    out = ["| stage | wall s | notes |", "|---|---|---|"]
    for name, s in tq.get("stages", {}).items():
        r = s.get("result", {})
        note = (
            "ERROR " + s["error"][-200:].replace("\n", " ")
            if "error" in s
            else ", ".join(
                f"{k}={r[k]}"
                for k in (
                    "steps",
                    "final_loss",
                    "tokens_per_s",
                    "scheme",
                    "group_size",
                    "size_before_bytes",
                    "size_after_bytes",
                    "quantize_s",
                    "train_s",
                )
                if k in r
            )
        )
        out.append(f"| {name} | {s.get('wall_s')} | {note} |")
    out.append(
        f"| **sft+dpo+merge+awq** | **{tq.get('sft_dpo_merge_awq_s')}** | materialize (GGUF -> HF) "
        f"{tq.get('materialize_s')} s not included |"
    )
    q = tq.get("quality", {})
    if q:
        keys = sorted(
            {
                k
                for v in q.values()
                for k in v.get("metrics", {})
                if (k.startswith("quality.capability.") and k.endswith("answer_match"))
                or k
                in (
                    "quality.policy.compliance",
                    "quality.preference.accuracy",
                    "quality.answer_tokens_mean",
                    "safety.attack_block_rate",
                    "safety.overblock_rate",
                )
            }
        )
        names = list(q)
        out += ["", "| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for k in keys:
            out.append(
                f"| {k} | "
                + " | ".join(
                    f"{q[n]['metrics'][k]:.3f}" if k in q[n].get("metrics", {}) else "-"
                    for n in names
                )
                + " |"
            )
        out.append(
            "| serve start-up s / suite wall s | "
            + " | ".join(f"{q[n].get('startup_s', '-')} / {q[n].get('wall_s', '-')}" for n in names)
            + " |"
        )
        for n in names:
            if "error" in q[n]:
                out.append(f"\n{n}: ERROR {q[n]['error'][-300:]}")
    return out


def main(dirs: list[Path]) -> None:
    got = load(dirs)
    card = got.get("nvidia-smi") or got.get("perf_8b.json", {}).get("env", {}).get(
        "nvidia_smi", "?"
    )
    vllm = got.get("vllm.json", {}).get("vllm", "?")
    print(
        f"Card: {card}; vLLM {vllm}; torch {got.get('env.json', {}).get('versions', {}).get('torch', '?')}\n"
    )
    print("\n".join(perf_md(got)))
    print()
    lines, _ = select_md(got)
    print("\n".join(lines))
    print()
    print("\n".join(train_md(got)))


if __name__ == "__main__":
    main([Path(p) for p in sys.argv[1:]])
