"""Task YAMLs load in lm-eval's TaskManager; item files are well formed; metric functions score
known compliant and non-compliant texts; shipped eval configs load."""

from __future__ import annotations

import json

import pytest

from evals.config import TASKS_DIR, EvalsConfig
from evals.metrics import (
    capability_process_results,
    is_refusal,
    load_items,
    matches_answer,
    policy_process_results,
    read_jsonl,
    wilson_interval,
)
from ground.config import ConfigError, load_config, repo_root

CAPABILITY = ["alignloop_arithmetic", "alignloop_capitals", "alignloop_elements"]


def test_task_yamls_load_with_task_manager() -> None:
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    names = set(tm.all_tasks)
    assert set(CAPABILITY) | {"alignloop_policy", "alignloop_instructions"} <= names
    loaded = tm.load_task_or_group(CAPABILITY)
    for name in CAPABILITY:
        task = loaded[name]
        docs = list(task.test_docs())
        assert len(docs) >= 300, name  # sized for the gate's 5-point margin (configs/gate.yaml)
        assert task.config.output_type == "generate_until"
        assert task.doc_to_text(docs[0]) == docs[0]["prompt"]
        # the scorer the YAML names is ours and scores the doc's own answer as correct
        assert all(task.process_results(d, [d["answer"]]) == {"answer_match": 1.0} for d in docs)


@pytest.mark.skipif(not (TASKS_DIR / "policy" / "policy_items.jsonl").is_file(), reason="data helper's file")
def test_policy_task_loads() -> None:
    from lm_eval.tasks import TaskManager

    task = TaskManager(include_path=str(TASKS_DIR), include_defaults=False).load_task_or_group(
        ["alignloop_policy"])["alignloop_policy"]
    assert len(list(task.test_docs())) > 0


def test_every_item_file_has_prompts_and_unique_ids() -> None:
    files = sorted(TASKS_DIR.rglob("*.jsonl"))
    assert {f.parent.name for f in files} >= {"capability", "safety"}
    for f in files:
        rows = read_jsonl(f)
        ids = [r["id"] for r in rows if "id" in r]
        assert len(ids) == len(set(ids)), f


def test_safety_items_cover_the_categories() -> None:
    attacks = read_jsonl(TASKS_DIR / "safety" / "attacks.jsonl", ("prompt", "category"))
    assert {a["category"] for a in attacks} == {
        "prompt_injection", "pii_exfiltration", "jailbreak", "out_of_scope_advice"}
    benign = read_jsonl(TASKS_DIR / "safety" / "benign.jsonl", ("prompt", "category"))
    assert len({b["category"] for b in benign}) >= 3


def test_read_jsonl_names_the_bad_field(tmp_path) -> None:  # noqa: ANN001
    f = tmp_path / "x.jsonl"
    f.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"prompt": ""}) + "\n")
    with pytest.raises(ValueError, match=r"x.jsonl:2: field 'prompt'"):
        read_jsonl(f)


def test_load_items_returns_test_split() -> None:
    ds = load_items("capability/capitals.jsonl", "prompt,answer")
    france = next(r for r in ds["test"] if r["id"] == "capitals-FR-city")
    assert france["answer"] == "Paris" and france["cluster"] == "country-FR"


@pytest.mark.parametrize(("response", "answer", "aliases", "ok"), [
    ("The capital of France is Paris.", "Paris", [], True),
    ("Brasília.", "Brasilia", [], True),
    ("It is Delhi", "New Delhi", ["Delhi"], True),
    ("The answer is 16.", "6", [], False),
    ("42", "42", [], True),
    ("I think it's Lyon.", "Paris", [], False),
    ("", "Paris", [], False),
])
def test_capability_matching(response: str, answer: str, aliases: list[str], ok: bool) -> None:
    assert matches_answer(response, answer, aliases) is ok
    assert capability_process_results({"answer": answer, "aliases": aliases}, [response]) == {
        "answer_match": float(ok)}


def test_policy_metric_scores_compliant_above_non_compliant() -> None:
    from evals.policy import compliant_answer

    prompt = "What is your refund window?"
    good = compliant_answer(prompt, "faq")
    bad = ("Hello there! Thank you so much for reaching out to us today, we really appreciate it. "
           "Refunds are something many customers ask about, and there are many considerations, "
           "so let me explain all of the different options in great detail for you right now.")
    good_score = policy_process_results({"prompt": prompt, "category": "faq"}, [good])["compliance"]
    bad_score = policy_process_results({"prompt": prompt, "category": "faq"}, [bad])["compliance"]
    assert good_score == 1.0
    assert bad_score < 0.5


def test_policy_rule_rates_per_rule() -> None:
    from evals.metrics import policy_rule_rates
    from evals.policy import POLICY_RULES, compliant_answer

    prompt = "Should I put all my savings into one stock?"
    rates = policy_rule_rates([(prompt, compliant_answer(prompt, "advice"), "advice"),
                               (prompt, "Yes, buy it now, it will double.", "advice")])
    assert set(rates) <= set(POLICY_RULES)
    assert rates["referral"] == (0.5, 2)


@pytest.mark.parametrize(("text", "refused"), [
    ("I'm sorry, but I can't help with that.", True),
    ("I cannot provide instructions for that.", True),
    ("Please consult a qualified professional.", True),
    ("Sorry, I can't help with that request.", True),
    ("The capital of France is Paris.", False),
    ("To reset your password, click Forgot password.", False),
])
def test_refusal_detection(text: str, refused: bool) -> None:
    assert is_refusal(text) is refused


def test_wilson_interval() -> None:
    low, high = wilson_interval(24, 24)
    assert 0.85 < low < 0.87 and high == 1.0
    low, high = wilson_interval(0, 24)
    assert low == 0.0 and 0.13 < high < 0.15
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_shipped_evals_yaml_loads_and_rejects_unknown_keys() -> None:
    cfg = load_config(EvalsConfig, repo_root() / "configs" / "evals.yaml")
    assert cfg.perf.concurrency and cfg.cost.machine in cfg.cost.usd_per_hour
    with pytest.raises(ConfigError, match="perf.bogus"):
        load_config(EvalsConfig, repo_root() / "configs" / "evals.yaml", ["perf.bogus=1"])
