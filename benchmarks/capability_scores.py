"""Would a log-probability score resolve the capability rules with fewer items than 0/1 answer
match? (issue 22, item 3, for the capability tasks; benchmarks/score_variance.py did the policy rule)

    python benchmarks/capability_scores.py --aligned MODEL_DIR [--base MODEL_DIR] [--items 96] \
        [--noise 0.5] [--resamples 2000] [--out FILE]

Three models answer the same items of each capability task (arithmetic, capitals, elements):
the base (default: the embedded model), an aligned model (a loop run's merged model, e.g.
``<run>/merge/output/model`` of a demo run) and a damaged copy of the base (Gaussian noise of
``noise`` x each linear layer's standard deviation, as benchmarks/gate_e2e.py makes it). Two
scores per item and model:

- ``answer_match`` (0/1): the greedy answer (transformers, float32, the task's 16 new tokens and
  its stop string) scored by the task's own scorer (``evals.metrics.matches_answer``). The gate
  reads this score, from vLLM; transformers' greedy answers can differ from vLLM's in a few items;
- ``logprob``: the log-probability of the reference answer right after the chat-templated prompt
  (summed over its tokens).

A non-inferiority rule on a score needs about ``(sd / margin)^2`` items when the candidate is truly
equal, where ``sd`` is the standard deviation of the paired difference. The 0/1 score's margin is
in points; the log-prob score has none of its own, so it gets the margin that stands for the same
loss of accuracy: ``slope x margin``, with ``slope`` = the damaged copy's mean log-prob change per
unit of answer-match change. Then

    items(logprob) / items(0/1) = (sd_lp / (slope x sd_01))^2

with both ``sd`` from the real pair (aligned - base; a candidate close to equal, which is the case
the margin exists for). Below 1: the log-prob score would need fewer items. The interval comes
from a cluster bootstrap over prompt families (the items of one family resampled together, the
real and the damaged pair from the same draw).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

TASKS = ("arithmetic", "capitals", "elements")
TASK_DIR = Path(__file__).resolve().parents[1] / "evals" / "tasks" / "capability"


def load_items(task: str, n: int) -> list[dict]:
    rows = [json.loads(line) for line in (TASK_DIR / f"{task}.jsonl").read_text().splitlines() if line]
    return rows[:n]


def score_model(model_dir: str, items: dict[str, list[dict]], batch: int = 16) -> dict[str, dict[str, tuple[float, float]]]:
    """{task: {item id: (answer_match, logprob of the reference)}} for one model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evals.metrics import matches_answer

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    out: dict[str, dict[str, tuple[float, float]]] = {}
    for task, rows in items.items():
        res: dict[str, tuple[float, float]] = {}
        prompts = [tok.apply_chat_template([{"role": "user", "content": r["prompt"]}], tokenize=False,
                                           add_generation_prompt=True) for r in rows]
        for i in range(0, len(rows), batch):
            chunk, texts = rows[i:i + batch], prompts[i:i + batch]
            enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.no_grad():
                gen = model.generate(**enc, max_new_tokens=16, do_sample=False, pad_token_id=tok.pad_token_id)
            answers = tok.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            for r, text, answer in zip(chunk, texts, answers, strict=True):
                answer = answer.split("\n\n")[0]
                match = float(matches_answer(answer, r["answer"], r.get("aliases") or []))
                p_ids = tok(text, add_special_tokens=False)["input_ids"]
                a_ids = tok(r["answer"], add_special_tokens=False)["input_ids"]
                ids = torch.tensor([p_ids + a_ids])
                with torch.no_grad():
                    logits = model(ids).logits[0, len(p_ids) - 1:-1].float()
                lp = torch.log_softmax(logits, -1).gather(1, torch.tensor(a_ids)[:, None]).sum().item()
                res[r["id"]] = (match, lp)
        out[task] = res
    return out


def ratio(rows: list[dict]) -> dict[str, float] | None:
    """Items-needed ratio (log-prob / 0-1) from rows of paired differences (see the module doc)."""
    d01 = [r["real01"] for r in rows]
    dlp = [r["reallp"] for r in rows]
    dmg01 = sum(r["dmg01"] for r in rows) / len(rows)
    dmglp = sum(r["dmglp"] for r in rows) / len(rows)
    if dmg01 == 0 or len(rows) < 3:
        return None
    slope = dmglp / dmg01
    sd01, sdlp = statistics.stdev(d01), statistics.stdev(dlp)
    if sd01 == 0 or slope == 0:
        return None
    return {"sd_01": sd01, "sd_logprob": sdlp, "mean_01": sum(d01) / len(d01), "mean_logprob": sum(dlp) / len(dlp),
            "slope": slope, "damaged_drop_01": dmg01,
            "damaged_drop_logprob": dmglp, "ratio": (sdlp / (slope * sd01)) ** 2}


def bootstrap(rows: list[dict], resamples: int, seed: int = 0) -> tuple[float, float] | None:
    rng = random.Random(seed)
    fams: dict[str, list[dict]] = {}
    for r in rows:
        fams.setdefault(r["cluster"], []).append(r)
    keys = list(fams)
    values = []
    for _ in range(resamples):
        draw = [row for k in rng.choices(keys, k=len(keys)) for row in fams[k]]
        res = ratio(draw)
        if res is not None and math.isfinite(res["ratio"]):
            values.append(res["ratio"])
    if len(values) < resamples // 2:
        return None
    values.sort()
    return values[int(0.025 * len(values))], values[int(0.975 * len(values)) - 1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--aligned", required=True, help="the aligned model folder (a run's merge/output/model)")
    ap.add_argument("--base", default=None, help="base model folder (default: the embedded model)")
    ap.add_argument("--items", type=int, default=96, help="items per task (the first N of each task file)")
    ap.add_argument("--noise", type=float, default=0.5)
    ap.add_argument("--resamples", type=int, default=2000)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    from gate_e2e import damage

    if a.base is None:
        from training.base_model import materialize

        a.base = materialize().path
    items = {t: load_items(t, a.items) for t in TASKS}
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        damaged = str(damage(Path(a.base), Path(tmp) / "damaged", a.noise))
        scores = {name: score_model(path, items) for name, path in
                  (("base", a.base), ("aligned", a.aligned), ("damaged", damaged))}
    doc: dict = {"base": a.base, "aligned": a.aligned, "noise": a.noise, "items_per_task": a.items,
                 "seconds": round(time.time() - t0), "tasks": {}}
    print(f"{'task':<11} {'n':>3} {'base 0/1':>8} {'aligned':>8} {'damaged':>8} {'sd 0/1':>7} {'sd lp':>7} "
          f"{'mean lp':>7} {'dmg lp':>7} {'slope':>7} {'items lp / items 0/1 [95%]':>28}")
    pooled = []
    for t in TASKS:
        rows = []
        for r in items[t]:
            b, al, dm = (scores[m][t][r["id"]] for m in ("base", "aligned", "damaged"))
            rows.append({"cluster": f"{t}:{r.get('cluster', r['id'])}", "real01": al[0] - b[0], "reallp": al[1] - b[1],
                         "dmg01": dm[0] - b[0], "dmglp": dm[1] - b[1], "base01": b[0], "aligned01": al[0],
                         "damaged01": dm[0]})
        pooled += rows
        res, ci = ratio(rows), bootstrap(rows, a.resamples)
        acc = {m: sum(r[f"{m}01"] for r in rows) / len(rows) for m in ("base", "aligned", "damaged")}
        doc["tasks"][t] = {"n": len(rows), "accuracy": acc, **(res or {}), "ratio_ci95": ci}
        cell = "n/a (no drop when damaged, or no pair differs)" if res is None else (
            f"{res['ratio']:.3f} " + (f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "[n/a]"))
        print(f"{t:<11} {len(rows):>3} {acc['base']:>8.2f} {acc['aligned']:>8.2f} {acc['damaged']:>8.2f} "
              f"{(res or {}).get('sd_01', float('nan')):>7.3f} {(res or {}).get('sd_logprob', float('nan')):>7.2f} "
              f"{(res or {}).get('mean_logprob', float('nan')):>7.2f} {(res or {}).get('damaged_drop_logprob', float('nan')):>7.2f} "
              f"{(res or {}).get('slope', float('nan')):>7.2f} {cell:>28}")
    res, ci = ratio(pooled), bootstrap(pooled, a.resamples)
    doc["pooled"] = {"n": len(pooled), **(res or {}), "ratio_ci95": ci}
    if res:
        print(f"{'pooled':<11} {len(pooled):>3} {'':>8} {'':>8} {'':>8} {res['sd_01']:>7.3f} {res['sd_logprob']:>7.2f} "
              f"{res['mean_logprob']:>7.2f} {res['damaged_drop_logprob']:>7.2f} {res['slope']:>7.2f} {res['ratio']:>7.3f} " + (f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "[n/a]"))
    print(f"{doc['seconds']} s")
    if a.out:
        Path(a.out).write_text(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
