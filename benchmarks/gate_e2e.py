"""The gate on real evals of real models: a null candidate, a damaged one, and the same release
evaluated twice (issue 22, item 8).

    python benchmarks/gate_e2e.py --out OUT [--model MODEL_DIR] [--evals configs/evals-demo.yaml] \
        [--gate configs/gate-demo.yaml] [--noise 0.5]

Three models, each served by vLLM behind the product's private gateway and evaluated with the
quality and safety suites (``gate_oc.eval_model``, as the loop evaluates a staged release):

- ``baseline``: the model (default: the embedded SmolLM2-135M-Instruct), playing live;
- ``null``: an exact copy of its weights in another folder, which is what a LoRA trained with
  learning rate 0 merges into (its B matrices stay zero). Its per-item outcomes must equal the
  baseline's item for item (evaluation is deterministic: greedy decoding), and the gate must not
  promote it;
- ``damaged``: the weights with Gaussian noise of ``noise`` times each matrix's own standard
  deviation added to every linear layer (seeded). The gate must keep live and name a failing rule.

Each candidate is gated in a run folder of its own (``OUT/null``, ``OUT/damaged``, the baseline's
eval folder copied beside it) with every paired rule of the gate config; its threshold rules (perf
SLO, request errors) need the perf suite, which this check does not run, so they are left out and
the table says so. Prints a table and writes OUT/gate_e2e.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gate_oc import eval_model  # noqa: E402

from evals.gate import GateConfig, evaluate_stage_dirs, load_outcome_dir  # noqa: E402
from ground.config import load_config  # noqa: E402


def damage(model_dir: Path, out: Path, noise: float, seed: int = 0) -> Path:
    """A copy of ``model_dir`` whose linear layers carry Gaussian noise (``noise`` x each matrix's
    standard deviation)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name and "lm_head" not in name:
                p.add_(torch.randn_like(p) * p.std() * noise)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
    return out


def paired_only(cfg: GateConfig) -> GateConfig:
    return cfg.model_copy(update={"rules": [r for r in cfg.rules if r.test != "threshold"]})


def same_outcomes(a: Path, b: Path) -> tuple[int, int]:
    """(items compared, items whose outcome differs) between two eval folders."""
    x, y = load_outcome_dir(a / "output"), load_outcome_dir(b / "output")
    n = diff = 0
    for metric, items in x.items():
        for item, (value, _) in items.items():
            n += 1
            diff += item not in y.get(metric, {}) or y[metric][item][0] != value
    return n, diff


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default=None, help="Model folder (default: the embedded model).")
    ap.add_argument("--evals", default="configs/evals-demo.yaml")
    ap.add_argument("--gate", default="configs/gate-demo.yaml")
    ap.add_argument("--noise", type=float, default=0.5)
    args = ap.parse_args()
    from evals.config import EvalsConfig

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.model is None:
        from training.base_model import materialize

        args.model = str(materialize().path)
    model = Path(args.model).resolve()
    cfg = load_config(EvalsConfig, args.evals)
    gate = paired_only(load_config(GateConfig, args.gate))
    t0 = time.monotonic()
    base = out / "evals-baseline"
    if not (base / "result.json").is_file():
        eval_model(model, "baseline", base, cfg)
    null_model = out / "models" / "null"
    if not (null_model / "config.json").is_file():
        shutil.copytree(model, null_model, dirs_exist_ok=True)
    damaged_model = out / "models" / "damaged"
    if not (damaged_model / "config.json").is_file():
        damage(model, damaged_model, args.noise)
    doc: dict = {"model": str(model), "evals": args.evals, "gate": args.gate, "noise": args.noise,
                 "rules_left_out": "threshold rules (perf SLO, errors): the perf suite is not run", "runs": {}}
    for name, folder in (("null", null_model), ("damaged", damaged_model)):
        run = out / name
        if not (run / "evals-aligned" / "result.json").is_file():
            eval_model(folder, "aligned", run / "evals-aligned", cfg)
        if not (run / "evals-baseline").exists():
            shutil.copytree(base, run / "evals-baseline")
        d = evaluate_stage_dirs(gate, run / "evals-aligned", run / "evals-baseline")
        n, differ = same_outcomes(run / "evals-baseline", run / "evals-aligned")
        doc["runs"][name] = {"decision": "promote" if d.passed else "keep", "verdict": d.verdict,
                             "items": n, "items_differing_from_baseline": differ,
                             "rules": [{"rule": o.rule, "metric": o.metric, "verdict": o.verdict,
                                        "diff": o.diff, "low": o.low, "high": o.high, "n": o.n}
                                       for o in d.outcomes]}
        print(f"\n{name}: {doc['runs'][name]['decision']} ({d.verdict}); {differ} of {n} item outcomes "
              f"differ from the baseline's")
        for o in d.outcomes:
            diff = "" if o.diff is None else f" {100 * o.diff:+.1f} pts [{100 * o.low:+.1f}, {100 * o.high:+.1f}]"
            print(f"  {o.verdict:12s} {o.rule} ({o.metric}){diff}")
    doc["seconds"] = round(time.monotonic() - t0)
    (out / "gate_e2e.json").write_text(json.dumps(doc, indent=2) + "\n")
    ok_null = doc["runs"]["null"]["decision"] == "keep" and doc["runs"]["null"]["items_differing_from_baseline"] == 0
    ok_damaged = doc["runs"]["damaged"]["decision"] == "keep" and any(
        r["verdict"] == "fail" for r in doc["runs"]["damaged"]["rules"])
    print(f"\nnull kept with identical outcomes: {ok_null}; damaged kept with a failing rule: {ok_damaged}; "
          f"{doc['seconds']} s")
    sys.exit(0 if ok_null and ok_damaged else 1)


if __name__ == "__main__":
    main()
