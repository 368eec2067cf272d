"""The whole promotion decision's operating characteristics: how often a gate config promotes
candidates whose truth is set, at an eval profile's sizes and prompt families (evals/oc.py).

    # 0. (optional) evaluate two model folders on a profile, through the product's private gateway
    #    with its guardrails (as the loop does), into RUN_DIR/evals-baseline and RUN_DIR/evals-aligned
    python benchmarks/gate_oc.py pairs --baseline MODEL_DIR --candidate MODEL_DIR --evals EVALS.yaml --run RUN_DIR
    # 1. per-metric discordance and family correlation from real runs' eval folders
    python benchmarks/gate_oc.py estimate RUN_DIR [RUN_DIR ...] --out benchmarks/results/gate_oc_estimates.json
    # 2. the table: every scenario, items independent and families as measured
    python benchmarks/gate_oc.py table --gate configs/gate.yaml --evals configs/evals.yaml \
        --estimates benchmarks/results/gate_oc_estimates.json --seeds 200 --out benchmarks/results/gate_oc-default.json

The table goes to BENCHMARKS.md ("The whole decision"). Rates carry 95% Wilson intervals over seeds.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evals.gate import GateConfig  # noqa: E402
from evals.oc import (  # noqa: E402
    LOWER_IS_BETTER,
    Candidate,
    Scenario,
    estimate,
    pooled_models,
    profile_items,
    run_scenario,
    scenarios,
)
from ground.config import load_config  # noqa: E402


def cmd_estimate(args: argparse.Namespace) -> None:
    runs = {}
    for run in args.runs:
        run = Path(run)
        live = run / "evals-baseline"
        for cand in sorted(run.glob("evals-*")):
            if cand != live and (cand / "output").is_dir():
                runs[f"{run.name}/{cand.name}"] = estimate(live, cand)
    if not runs:
        raise SystemExit("no eval folders found (RUN_DIR/evals-baseline and RUN_DIR/evals-<candidate>)")
    doc = {"source": args.note, "pairs": runs}
    Path(args.out).write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    for name, est in runs.items():
        print(name)
        for metric, e in sorted(est.items()):
            print(f"  {metric}: n {e['n']} ({e['families']} families), live {e['live_mean']:.2f}, "
                  f"diff {e['mean_diff']:+.3f}, discordance {e['discordance']:.3f}, icc {e['icc']:.2f}")


def eval_model(model: str | Path, variant: str, out: Path, cfg) -> dict[str, float]:
    """Quality and safety suites of one model folder, served by vLLM behind the product's private
    gateway with its guardrails (as the loop evaluates a staged release), into ``out`` (an
    ``evals-<variant>`` folder: result.json and output/outcomes-*.jsonl, what the gate reads)."""
    from evals import suites
    from serving.engine.vllm_server import VLLMArgs, VLLMServer
    from serving.gateway.candidate import candidate_gateway

    (out / "output").mkdir(parents=True, exist_ok=True)
    t = time.monotonic()
    with VLLMServer(Path(model), args=VLLMArgs(max_model_len=2048, kv_cache_gib=2),
                    log_path=out / "vllm.log", served_name=variant) as server, \
            candidate_gateway(server.base_url, variant, variant,
                                     f"sqlite:///{(out / 'logs.db').resolve()}") as endpoint:
        res = suites.run(cfg, endpoint, out / "output", variant, suites=("quality", "safety"))
    (out / "result.json").write_text(json.dumps({"metrics": res.metrics, "model_dir": str(model)}, indent=2))
    print(f"{variant}: {time.monotonic() - t:.0f} s", flush=True)
    return res.metrics


def cmd_pairs(args: argparse.Namespace) -> None:
    """Quality and safety suites of two models, each served by vLLM behind the product's gateway."""
    from evals.config import EvalsConfig

    cfg = load_config(EvalsConfig, args.evals)
    for variant, model in (("baseline", args.baseline), ("aligned", args.candidate)):
        eval_model(model, variant, Path(args.run) / f"evals-{variant}", cfg)


def _pct(rates, count: int) -> str:
    share, low, high = rates.rate(count)
    return f"{100 * share:.1f}% [{100 * low:.1f}, {100 * high:.1f}]"


def cmd_table(args: argparse.Namespace) -> None:
    from evals.config import EvalsConfig

    cfg = load_config(GateConfig, args.gate)
    if args.resamples:
        cfg.resamples = args.resamples
    evals_cfg = load_config(EvalsConfig, args.evals)
    items = profile_items(evals_cfg.quality.limit)
    estimates = list(json.loads(Path(args.estimates).read_text())["pairs"].values())
    settings = {"items independent (icc 0)": pooled_models(estimates, icc=0.0),
                "families as measured": pooled_models(estimates)}
    if args.icc is not None:
        settings[f"families, icc {args.icc}"] = pooled_models(estimates, icc=args.icc)
    out = {"gate": args.gate, "evals": args.evals, "seeds": args.seeds, "resamples": cfg.resamples,
           "looks": cfg.looks, "models": {}, "rows": []}
    lines = ["| scenario | correlation | promoted (any) | promoted, each | false promotions | resolved | items / release |",
             "|---|---|---|---|---|---|---|"]
    extra = []
    if args.measured:
        # A candidate whose true effects are what a real run measured (its mean paired differences).
        pair = json.loads(Path(args.estimates).read_text())["pairs"][args.measured]
        effects = {m: e["mean_diff"] * (-1 if m in LOWER_IS_BETTER else 1) for m, e in pair.items()}
        extra.append(Scenario(f"effects as {args.measured} measured", [Candidate("aligned", effects)],
                              "resolve (promote, or a rule that fails)", truly_better={"aligned"}))
    out["measured"] = args.measured
    t0 = time.monotonic()
    for setting, models in settings.items():
        out["models"][setting] = {m: vars(v) for m, v in models.items()}
        for sc in scenarios(cfg, gain=args.gain) + extra:
            if args.only and args.only not in sc.name:
                continue
            r = run_scenario(cfg, sc, items, models, range(args.seeds))
            each = ", ".join(f"{n} {100 * c / r.seeds:.1f}%" for n, c in r.promoted.items())
            lines.append(f"| {sc.name} (want: {sc.expect}) | {setting} | {_pct(r, r.any_promoted)} | {each} | "
                         f"{_pct(r, r.false_promotions)} | {100 * r.resolved / r.seeds:.0f}% | {r.items:.0f} |")
            out["rows"].append({"setting": setting, **r.to_dict()})
            print(lines[-1], flush=True)
    out["seconds"] = round(time.monotonic() - t0)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    Path(args.out).with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"{out['seconds']} s; {args.out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("estimate", help="Discordance and family ICC per metric from real runs.")
    e.add_argument("runs", nargs="+")
    e.add_argument("--out", required=True)
    e.add_argument("--note", default="", help="Where the runs came from (machine, date, command).")
    p = sub.add_parser("pairs", help="Evaluate two model folders into a run folder (for estimate).")
    p.add_argument("--baseline", required=True)
    p.add_argument("--candidate", required=True)
    p.add_argument("--evals", required=True)
    p.add_argument("--run", required=True)
    t = sub.add_parser("table", help="Promote rates per scenario.")
    t.add_argument("--gate", default="configs/gate.yaml")
    t.add_argument("--evals", default="configs/evals.yaml")
    t.add_argument("--estimates", default="benchmarks/results/gate_oc_estimates.json")
    t.add_argument("--seeds", type=int, default=200)
    t.add_argument("--resamples", type=int, default=None, help="Override the gate's bootstrap resamples.")
    t.add_argument("--icc", type=float, default=None, help="Add a column with this family ICC.")
    t.add_argument("--gain", type=float, default=0.10, help="The better candidate's true policy gain.")
    t.add_argument("--measured", default=None,
                   help="Add a scenario whose effects are this estimates pair's mean differences "
                   "(e.g. demo/evals-aligned).")
    t.add_argument("--only", default=None, help="Run only the scenarios whose name contains this.")
    t.add_argument("--out", required=True)
    args = ap.parse_args()
    {"estimate": cmd_estimate, "pairs": cmd_pairs, "table": cmd_table}[args.cmd](args)


if __name__ == "__main__":
    main()
