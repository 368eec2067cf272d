"""Suites against real servers: the tiny model on vLLM, behind the real gateway for quality and safety.

Real vLLM (serving env), real gateway (serving.gateway.app with configs/gateway.yaml's guardrails), real
lm-eval and real `vllm bench serve`; nothing is mocked.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from evals import suites
from evals.config import Endpoint, EvalsConfig
from serving.gateway.candidate import candidate_gateway

pytestmark = pytest.mark.integration

@pytest.fixture
def gateway_endpoint(tiny_vllm, tmp_path: Path):  # noqa: ANN001
    """The product path: gateway (shipped guardrail config, own eval tenant) -> tiny vLLM."""
    with candidate_gateway(tiny_vllm.base_url, "tiny", "tiny-r1",
                                  f"sqlite:///{tmp_path / 'logs.db'}") as endpoint:
        yield endpoint


def _in_range(metrics: dict[str, float]) -> None:
    for k, v in metrics.items():
        assert isinstance(v, float | int) and not math.isnan(v), k
        if k.endswith(("_rate", "answer_match", "compliance", "accuracy", "_share", "_low", "_high")):
            assert 0.0 <= v <= 1.0, (k, v)
        if k.endswith((".n", "_mean", "seconds", "_ms", "errors")) and "margin" not in k:
            assert v >= 0, (k, v)


def test_quality_and_safety_through_the_gateway(gateway_endpoint: Endpoint, tiny_model_dir: Path,
                                                 tmp_path: Path) -> None:
    cfg = EvalsConfig()
    cfg.quality.limit = 4
    cfg.quality.instruction_tasks = ["alignloop_instructions"]
    cfg.quality.tokenizer = str(tiny_model_dir)
    cfg.safety.max_tokens = 16
    cfg.safety.limit = 24
    res = suites.run(cfg, gateway_endpoint, tmp_path / "out", "tiny", suites=("quality", "safety"))
    doc = json.loads(Path(res.metrics_path).read_text())
    m = doc["metrics"]
    assert doc["variant"] == "tiny" and set(doc["suites"]) == {"quality", "safety"}
    for task in ("capitals", "arithmetic", "elements"):
        assert m[f"quality.capability.{task}.n"] == 4
        assert f"quality.capability.{task}.answer_match" in m
    assert m["quality.instructions.instructions.n"] == 4
    # Every item's outcome, under the aggregate's metric name, with its id: what the gate pairs.
    from evals.gate import load_outcome_dir

    items = load_outcome_dir(tmp_path / "out")
    assert len(items["quality.capability.arithmetic.answer_match"]) == 4
    assert sum(v for v, _ in items["quality.capability.arithmetic.answer_match"].values()) / 4 == (
        m["quality.capability.arithmetic.answer_match"])
    assert len(items["safety.attack_block_rate"]) == 24 and len(items["safety.overblock_rate"]) == 24
    assert m["quality.answer_tokens_mean"] > 0
    if (Path(cfg.quality.tasks_dir) / "policy" / "policy_items.jsonl").is_file():
        assert m["quality.policy.n"] == 4 and any(k.startswith("quality.policy.rule.") for k in m)
    # Every attack/benign item went through; the gateway's guardrails stopped some attacks
    # (finish_reason content_filter), which a direct vLLM call would never do.
    assert m["safety.attack.n"] == 24 and m["safety.benign.n"] == 24 and m["safety.errors"] == 0
    assert m["safety.attack.gateway_block_share"] > 0
    records = [json.loads(x) for x in (tmp_path / "out" / "safety_records.jsonl").read_text().splitlines()]
    assert any(r["finish_reason"] == "content_filter" for r in records if r["suite"] == "attack")
    _in_range(m)


def test_preference_accuracy_from_vllm_prompt_logprobs(tiny_vllm, tiny_model_dir: Path, tmp_path: Path) -> None:  # noqa: ANN001
    import datasets

    from evals.quality import preference_accuracy

    rows = [{"prompt": [{"role": "user", "content": f"Question {i}?"}],
             "chosen": [{"role": "assistant", "content": "Short answer."}],
             "rejected": [{"role": "assistant", "content": "A much longer answer " * (i + 2)}]} for i in range(3)]
    path = tmp_path / "dataset"
    datasets.DatasetDict({"heldout_dpo": datasets.Dataset.from_list(rows)}).save_to_disk(str(path))
    ep = Endpoint(tiny_vllm.base_url, "EMPTY", "tiny")
    m = preference_accuracy(ep, str(path), "heldout_dpo", str(tiny_model_dir), limit=10)
    assert m["quality.preference.n"] == 3
    # Summed logprobs favour the much shorter answer, whatever the (random) weights.
    assert m["quality.preference.accuracy"] == 1.0 and m["quality.preference.margin_mean"] > 0


def test_perf_with_vllm_bench_serve(tiny_vllm, tiny_model_dir: Path, tmp_path: Path) -> None:  # noqa: ANN001
    cfg = EvalsConfig()
    cfg.perf.concurrency = [1]
    cfg.perf.workload_concurrency = 2
    cfg.perf.requests_per_level = 4
    cfg.perf.repeats = 2
    cfg.perf.output_len = 8
    cfg.perf.input_len = 32
    cfg.perf.realistic_num_prompts = 4
    cfg.perf.realistic_output_len = 8
    cfg.perf.tokenizer = str(tiny_model_dir)
    cfg.perf.model_dir = str(tiny_model_dir)
    ep = Endpoint(tiny_vllm.base_url, "EMPTY", "tiny")
    res = suites.run(cfg, ep, tmp_path / "out", "tiny", suites=("perf",))
    m = res.metrics
    assert m["perf.failed"] == 0
    assert m["perf.grid.c1.completed"] == 4 and m["perf.grid.c2.completed"] == 8  # two repeats
    assert m["perf.workload_concurrency"] == 2 and m["perf.workload.repeats"] == 2
    assert m["perf.workload.ttft_p95_ms_min"] <= m["perf.workload.ttft_p95_ms_max"] == m["perf.ttft_p95_ms"]
    for c in (1, 2):
        for lat in ("ttft", "tpot", "itl", "e2el"):
            for p in (50, 90, 95, 99):
                assert m[f"perf.grid.c{c}.{lat}_p{p}_ms"] >= 0
    assert m["perf.grid.c1.total_output_tokens"] == 4 * 8  # --ignore-eos: fixed output length
    assert m["perf.realistic.completed"] == 4
    assert m["perf.output_tokens_per_s"] > 0 and m["perf.kv_cache_tokens"] > 0
    assert m["perf.model_size_bytes"] > 1e6
    assert m["cost.usd_per_1m_output_tokens"] > 0
    assert (tmp_path / "out" / "perf" / "bench" / "grid-c2-r1.json").is_file()


def test_cli_eval_safety_writes_metrics(tiny_vllm, tmp_path: Path) -> None:  # noqa: ANN001
    from typer.testing import CliRunner

    from flows.cli import app

    out = tmp_path / "cli"
    r = CliRunner().invoke(app, ["eval", "safety", "--endpoint", tiny_vllm.base_url, "--model", "tiny",
                                 "--variant", "tiny", "--out", str(out), "safety.max_tokens=8",
                                 "safety.limit=24"])
    assert r.exit_code == 0, r.output
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["suites"] == ["safety"] and doc["metrics"]["safety.attack.n"] == 24
    # vLLM alone has no guardrails: nothing comes back as content_filter
    assert doc["metrics"]["safety.attack.gateway_block_share"] == 0
    r = CliRunner().invoke(app, ["eval", "safety", "--endpoint", "http://127.0.0.1:1/nope", "--model", "x"])
    assert r.exit_code == 2 and "must end with /v1" in r.output
