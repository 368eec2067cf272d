"""Continual alignment on the CPU demo: N feedback windows per variant, each in its own data dir.

    .venv/bin/python benchmarks/continual_cpu.py --out DIR [--windows 3] [--variant NAME ...] \
        [--gate FILE] [--extra key=value ...]

Each variant runs ``alignloop demo --windows N`` with its overrides of the loop config:

- ``retrain-base-all``:  start_from=base, data.ledger.windows=all (retrain from the base model on
  every window to date);
- ``continue-live-new``: start_from=live, data.ledger.windows=new, replay_share=0.25 (continue from
  the live release's weights on the windows it has not learned from, a quarter replayed);
- ``retrain-base-all-kto``: the first, with preference_objective=dpo+kto (thumbs that never pair
  up train a KTO adapter after DPO).

Window k's simulated traffic uses seed k in every variant, so the variants see the same users
(their answers differ once the live model differs). Per window the table gives the decision, the
dataset version and size, the training time (SFT + DPO + KTO), each gate rule's paired difference
against live with its one-sided bounds, and forgetting: the window's aligned candidate against
window 1's baseline (the original base model) on the same eval items, by the shipped gate's rules.
The machine's load is sampled while each variant runs (the machine may be shared).

``--gate FILE`` makes both the loop and the demo's gateway (which verifies promotions) use that
policy instead of configs/gate.yaml. With the demo's 24-item eval profile the shipped gate keeps
live in most windows, and then "continue from live" has nothing to continue from;
``benchmarks/continual_gate.yaml`` widens the non-inferiority margins to what 24 items resolve,
so that promotions happen and the two starting points can differ. Say which gate a number used.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from training_cpu import LoadSampler  # noqa: E402  (the load average while a variant runs)

VARIANTS = {
    "retrain-base-all": ["start_from=base", "data.ledger.windows=all"],
    "continue-live-new": ["start_from=live", "data.ledger.windows=new", "data.ledger.replay_share=0.25"],
    "retrain-base-all-kto": ["start_from=base", "data.ledger.windows=all", "preference_objective=dpo+kto"],
}


def cpu_kind() -> str:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    return "AVX-512 (avx512_bf16)" if "avx512_bf16" in flags else ("AVX-512" if "avx512f" in flags else "AVX2")


def forgetting(home: Path, runs: list[dict]) -> dict[str, list[dict]]:
    """Each window's aligned candidate vs window 1's baseline (the base model), paired by item."""
    from evals.gate import GateConfig, evaluate_stage_dirs
    from ground.config import load_config

    gate = load_config(GateConfig, REPO / "configs" / "gate.yaml")  # forgetting: the shipped rules
    first = next((r for r in runs if (home / "runs" / r["run_id"] / "evals-baseline").is_dir()), None)
    if first is None:
        return {}
    base_dir = home / "runs" / first["run_id"] / "evals-baseline"
    out = {}
    for r in runs:
        cand = home / "runs" / r["run_id"] / "evals-aligned"
        if not cand.is_dir():
            continue
        out[r["run_id"]] = paired_rows(evaluate_stage_dirs(gate, cand, base_dir))
    return out


def paired_rows(decision) -> list[dict]:
    """The paired rules' outcomes of a gate decision as plain rows (threshold rules left out)."""
    return [{"rule": o.rule, "metric": o.metric, "diff": o.diff, "low": o.low, "high": o.high, "n": o.n,
             "verdict": o.verdict} for o in decision.outcomes if o.test != "threshold"]


def final_live_evals(home: Path, runs: list[dict]) -> Path | None:
    """The eval folder of the release live after the last window: the last promoted winner's, or
    window 1's baseline (the base model) when nothing was promoted."""
    for r in reversed(runs):
        if r.get("promoted") and r.get("winner"):
            return home / "runs" / r["run_id"] / f"evals-{r['winner']}"
    return home / "runs" / runs[0]["run_id"] / "evals-baseline" if runs else None


def head_to_head(out: Path, results: list[dict], gate: Path | None) -> list[dict]:
    """Each variant's final live release against the first variant's, paired on the same eval items
    (the eval sets and their limits are the same in every variant), by the rules of ``gate``
    (``--gate``, else configs/gate.yaml)."""
    from evals.gate import GateConfig, evaluate_stage_dirs
    from ground.config import load_config

    ref = final_live_evals(out / results[0]["variant"], results[0]["windows"])
    if ref is None:
        return []
    cfg = load_config(GateConfig, gate or REPO / "configs" / "gate.yaml")
    rows = []
    for res in results[1:]:
        cand = final_live_evals(out / res["variant"], res["windows"])
        if cand is not None:
            rows.append({"variant": res["variant"], "reference": results[0]["variant"],
                         "outcomes": paired_rows(evaluate_stage_dirs(cfg, cand, ref))})
    return rows


def run_variant(name: str, overrides: list[str], windows: int, out: Path, gate: Path | None = None) -> dict:
    home = out / name
    home.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "ALIGNLOOP_HOME": str(home)}
    cmd = [sys.executable, "-m", "flows.cli", "demo", "--windows", str(windows), *overrides]
    if gate is not None:
        cmd += [f"gate_file={gate.resolve()}", "--serve", f"releases.gate_file={gate.resolve()}"]
    log = home / "demo.log"
    t0 = time.monotonic()
    with LoadSampler(every_s=10) as load, log.open("w") as f:
        rc = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    wall = time.monotonic() - t0
    summary = json.loads((home / "demo-windows.json").read_text()) if (home / "demo-windows.json").is_file() else {}
    runs = summary.get("windows", [])
    result = {"variant": name, "overrides": overrides, "rc": rc, "wall_s": round(wall, 1),
              "gate": str(gate) if gate else None,
              **load.summary(), "windows": runs, "timings": summary.get("timings", {})}
    try:
        result["forgetting"] = forgetting(home, runs)
    except Exception as exc:  # noqa: BLE001 - a benchmark reports what it could not compute
        result["forgetting_error"] = f"{type(exc).__name__}: {exc}"
    (home / "benchmark.json").write_text(json.dumps(result, indent=2, default=str))
    return result


def _pts(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:+.1f}"


def _label(rule: dict) -> str:
    """A pattern rule gives one outcome per metric: name the metric (``arithmetic``, ...)."""
    metric = str(rule.get("metric") or "")
    return f"{rule['rule']} ({metric.split('.')[-2]})" if metric.startswith("quality.capability.") else rule["rule"]


def markdown(results: list[dict], windows: int, head_to_head_rows: list[dict] = ()) -> str:
    lines = [f"CPU: {cpu_kind()}, {os.cpu_count()} cores; {windows} windows per variant; gate "
             f"{results[0].get('gate') or 'configs/gate.yaml'}.", ""]
    for res in results:
        lines += [f"### {res['variant']} (`{' '.join(res['overrides'])}`)", "",
                  f"exit {res['rc']}, wall {res['wall_s'] / 60:.1f} min, load mean {res['load_mean']} "
                  f"(max {res['load_max']})", "",
                  "| window | decision | dataset (new examples) | train s | gate vs live: diff [bounds] n verdict |"
                  " forgetting vs base model: diff [bounds] |",
                  "|---|---|---|---|---|---|"]
        for w in res["windows"]:
            train_s = sum((t.get("train_s") or 0) for t in w.get("training", {}).values())
            rules = "; ".join(
                f"{_label(r)}: {_pts(r.get('diff'))} [{_pts(r.get('low'))}, {_pts(r.get('high'))}] "
                f"n={r.get('n')} {r.get('verdict')}" for r in w.get("rules", []) if r.get("diff") is not None
            ) or "–"
            forgot = "; ".join(
                f"{_label(r)}: {_pts(r['diff'])} [{_pts(r['low'])}, {_pts(r['high'])}] n={r.get('n')}"
                for r in res.get("forgetting", {}).get(w["run_id"], [])
            ) or "–"
            lines.append(f"| {w['run_id']} | {(w.get('decision') or '')[:90]} | {w.get('dataset_version')} "
                         f"({w.get('new_examples')}) | {train_s:.0f} | {rules} | {forgot} |")
        lines.append("")
    for h in head_to_head_rows:
        lines += [f"### final live release: {h['variant']} vs {h['reference']} (paired, same eval items)", "",
                  "; ".join(f"{_label(r)}: {_pts(r['diff'])} [{_pts(r['low'])}, {_pts(r['high'])}] n={r['n']} "
                            f"{r['verdict']}" for r in h["outcomes"] if r.get("diff") is not None) or "–", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--windows", type=int, default=3)
    ap.add_argument("--variant", action="append", choices=sorted(VARIANTS))
    ap.add_argument("--extra", action="append", default=[], help="key=value added to every variant")
    ap.add_argument("--summarize", action="store_true",
                    help="no runs: rebuild summary.md and the head-to-head from the variants' benchmark.json")
    ap.add_argument("--gate", type=Path, help="gate policy for the loop and the gateway (default configs/gate.yaml)")
    args = ap.parse_args()
    results = []
    for name in args.variant or list(VARIANTS):
        if args.summarize:
            results.append(json.loads((args.out / name / "benchmark.json").read_text()))
            continue
        print(f"[continual] {name} ...", flush=True)
        results.append(run_variant(name, [*VARIANTS[name], *args.extra], args.windows, args.out, args.gate))
        (args.out / "summary.md").write_text(markdown(results, args.windows))
        print(f"[continual] {name}: rc {results[-1]['rc']}, {results[-1]['wall_s'] / 60:.1f} min", flush=True)
    rows = head_to_head(args.out, results, args.gate) if len(results) > 1 else []
    (args.out / "head-to-head.json").write_text(json.dumps(rows, indent=2, default=str))
    (args.out / "summary.md").write_text(markdown(results, args.windows, rows))
    print((args.out / "summary.md").read_text())


if __name__ == "__main__":
    main()
