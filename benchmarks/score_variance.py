"""Which per-item policy score resolves the gate's paired rule with fewer items? (issue 22, item 3)

    python benchmarks/score_variance.py RUN_DIR [--resamples 2000]

RUN_DIR holds two eval folders of real models (``evals-baseline``, ``evals-aligned``, e.g. from
``benchmarks/gate_oc.py pairs``). From the stored answers (``output/quality_samples.jsonl``) each
policy item is scored again in several ways, and for each the paired difference (aligned -
baseline) gives its standardized effect ``mean / sd``: the items a paired rule needs scale with
``1 / (mean / sd)^2``, so the higher it is, the fewer items resolve the same true difference.

Scores compared: the share of the written policy's rules met (what the gate reads), "every rule
met" (0/1), and each rule alone. The interval of each score's items-needed ratio to the shipped
score comes from a cluster bootstrap over prompt families (both scores resampled together).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evals.policy import POLICY_RULES, score_answer  # noqa: E402


def _samples(folder: Path) -> dict[str, dict]:
    rows = (json.loads(line) for line in (folder / "output" / "quality_samples.jsonl").read_text().splitlines() if line)
    return {r["id"]: r for r in rows if r.get("task") == "alignloop_policy"}


def scores(row: dict) -> dict[str, float | None]:
    """Every candidate score of one answer (None: the rule does not apply to this prompt)."""
    rules = score_answer(row["prompt"], row["response"] or "", row.get("category") or None)
    met = [v for v in rules.values() if v is not None]
    out: dict[str, float | None] = {"share of rules met (shipped)": sum(met) / len(met),
                                    "every rule met (0/1)": float(all(met))}
    out.update({f"rule {k} alone": None if v is None else float(v) for k, v in rules.items()})
    return out


def efficiency(diffs: list[float]) -> float:
    """(mean / sd)^2 of paired differences: items needed scale with its inverse."""
    n = len(diffs)
    m = sum(diffs) / n
    var = sum((d - m) ** 2 for d in diffs) / (n - 1)
    return m * m / var if var > 0 else float("inf")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("--resamples", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    run = Path(args.run)
    cand, live = _samples(run / "evals-aligned"), _samples(run / "evals-baseline")
    ids = sorted(set(cand) & set(live))
    if len(ids) < 20:
        raise SystemExit(f"{run}: {len(ids)} paired policy items, need 20")
    per = {i: (scores(cand[i]), scores(live[i]), live[i].get("cluster") or i) for i in ids}
    names = list(next(iter(per.values()))[0])
    shipped = names[0]

    def diffs(name: str, items: list[str]) -> list[float]:
        return [c[name] - lv[name] for c, lv, _ in (per[i] for i in items) if c[name] is not None and lv[name] is not None]

    families: dict[str, list[str]] = {}
    for i in ids:
        families.setdefault(per[i][2], []).append(i)
    keys = sorted(families)
    rng = random.Random(args.seed)
    boots = []
    for _ in range(args.resamples):
        items = [i for k in (rng.choice(keys) for _ in keys) for i in families[k]]
        boots.append(items)
    print(f"{run}: {len(ids)} paired policy items in {len(keys)} families; items needed relative to the "
          f"shipped score (< 1: fewer), 95% cluster-bootstrap interval")
    print("| score | n | mean diff | sd | (mean/sd)^2 | items needed vs shipped |")
    print("|---|---|---|---|---|---|")
    base = efficiency(diffs(shipped, ids))
    for name in names:
        d = diffs(name, ids)
        if len(d) < 20 or not any(d):
            print(f"| {name} | {len(d)} | – | – | – | too few items or no difference |")
            continue
        m = sum(d) / len(d)
        sd = math.sqrt(sum((x - m) ** 2 for x in d) / (len(d) - 1))
        eff = efficiency(d)
        ratios = sorted(efficiency(diffs(shipped, b)) / max(efficiency(diffs(name, b)), 1e-12) for b in boots)
        low, high = ratios[int(0.025 * len(ratios))], ratios[int(0.975 * len(ratios)) - 1]
        point = f"{base / eff:.2f}" if eff else "unbounded (no mean difference)"
        upper = f"{high:.2f}" if high < 100 else "> 100"
        print(f"| {name} | {len(d)} | {100 * m:+.1f} pts | {sd:.3f} | {eff:.3f} | {point} [{low:.2f}, {upper}] |")
    print(f"\nrules: {', '.join(POLICY_RULES)}")


if __name__ == "__main__":
    main()
