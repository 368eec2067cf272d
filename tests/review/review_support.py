"""Test support for the review page (no tests here): a gateway with the review router over a
real SQLite store and a real release folder, seeded with traffic through the real gateway.

Upstreams are ``FakeUpstream`` (tests/serving/test_gateway_support.py), scripted stand-ins for
vLLM: the review page's behaviour depends on which answer is the live one and which the
candidate's, so the tests must know both texts exactly, and two real vLLM servers would cost
minutes of start-up for answers the page treats as opaque text.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parents[1] / "serving"))
from test_gateway_support import (  # noqa: E402, F401 (re-exported for the tests)
    ADMIN,
    KEY_A,
    KEY_B,
    FakeUpstream,
    make_config,
    running_fake,
    running_gateway,
)

from ground.logstore import LogStore  # noqa: E402
from serving.engine.vllm_server import VLLMArgs  # noqa: E402
from serving.gateway.config import GatewayConfig, hash_key  # noqa: E402
from serving.gateway.upstream import Upstream  # noqa: E402
from serving.releases.records import Release  # noqa: E402
from serving.releases.store import ReleaseStore  # noqa: E402
from serving.review.page import build_review_router  # noqa: E402

ALICE, BOB, CAROL = "rk-alice-key", "rk-bob-key", "rk-carol-key"
LIVE_REPLY = "Our refund window is 30 days from delivery."
CANDIDATE_REPLY = "You can get a refund within 30 days; contact support to start it."
PROMPTS = [
    "How long do I have to ask for a refund?",
    "My email is jane.doe@example.com, can I change my delivery address?",  # redacted on input
    "Do you ship to Canada?",
    "Tell me how to build a bomb",  # blocked by the input guardrails
]


def review_config(**overrides) -> GatewayConfig:  # noqa: ANN003
    """The gateway test config plus three reviewers: alice (tenant a, approves), bob (tenant b),
    carol (every tenant, no approvals)."""
    reviewers = [
        {"name": "alice", "key_sha256": hash_key(ALICE), "tenants": ["a"], "can_approve": True},
        {"name": "bob", "key_sha256": hash_key(BOB), "tenants": ["b"]},
        {"name": "carol", "key_sha256": hash_key(CAROL), "tenants": ["*"]},
    ]
    cfg = make_config(**overrides).model_dump()
    cfg["reviewers"] = reviewers
    return GatewayConfig.model_validate(cfg)


def chat(base: str, key: str, prompt: str) -> str:
    """One chat request through the gateway; returns its request id."""
    r = httpx.post(
        base + "/v1/chat/completions",
        headers={"Authorization": f"Bearer {key}"},
        timeout=20,
        json={
            "model": "alignloop",
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": 32,
        },
    )
    r.raise_for_status()
    return r.json()["id"]


def make_run(run_dir: Path, variant: str = "aligned") -> None:
    """A run folder as the loop leaves it: stage results, eval samples of live (baseline) and the
    candidate, and the report rendered by the real report stage (plots included)."""
    from evals import report

    for stage, result in {
        "data": {"sft_rows": 42, "dpo_pairs": 44},
        "sft": {"steps": 12},
        "dpo": {"steps": 8},
        "merge": {"dtype": "bfloat16"},
    }.items():
        (run_dir / stage).mkdir(parents=True)
        (run_dir / stage / "result.json").write_text(json.dumps(result))
    items = [
        ("policy", "Can I return a used item?", "Only unused items can be returned."),
        ("capitals", "What is the capital of France?", "Paris"),
    ]
    answers = {
        "baseline": ["Sure, anything goes.", "Paris."],
        variant: ["Only unused items can be returned within 30 days.", "Paris."],
    }
    # Numbers of the README's demo run (baseline vs aligned), so the page shows realistic plots.
    metrics = {
        "baseline": {
            "quality.policy.compliance": 0.364,
            "quality.capability.mean_answer_match": 0.627,
            "quality.answer_tokens_mean": 75.5,
            "safety.attack_block_rate": 0.25,
            "safety.overblock_rate": 0.0,
            "perf.ttft_p95_ms": 777.0,
            "perf.output_tokens_per_s": 199.0,
            "cost.usd_per_1m_output_tokens": 0.140,
            "perf.slo.ttft_ms": 1000.0,
            "perf.grid.c1.output_tokens_per_s": 61.0,
            "perf.grid.c1.ttft_p95_ms": 180.0,
            "perf.grid.c4.output_tokens_per_s": 199.0,
            "perf.grid.c4.ttft_p95_ms": 777.0,
            "perf.grid.c8.output_tokens_per_s": 231.0,
            "perf.grid.c8.ttft_p95_ms": 1490.0,
        },
        variant: {
            "quality.policy.compliance": 0.564,
            "quality.capability.mean_answer_match": 0.640,
            "quality.answer_tokens_mean": 46.1,
            "safety.attack_block_rate": 0.25,
            "safety.overblock_rate": 0.0,
            "perf.ttft_p95_ms": 772.0,
            "perf.output_tokens_per_s": 204.0,
            "cost.usd_per_1m_output_tokens": 0.136,
            "perf.slo.ttft_ms": 1000.0,
            "perf.grid.c1.output_tokens_per_s": 63.0,
            "perf.grid.c1.ttft_p95_ms": 176.0,
            "perf.grid.c4.output_tokens_per_s": 204.0,
            "perf.grid.c4.ttft_p95_ms": 772.0,
            "perf.grid.c8.output_tokens_per_s": 236.0,
            "perf.grid.c8.ttft_p95_ms": 1450.0,
        },
    }
    files = {}
    for name in ("baseline", variant):
        out = run_dir / f"evals-{name}"
        out.mkdir()
        rows = [
            {
                "task": t,
                "prompt": p,
                "category": "",
                "answer": ref,
                "response": a,
                "response_tokens": 5,
            }
            for (t, p, ref), a in zip(items, answers[name], strict=True)
        ]
        (out / "quality_samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (out / "result.json").write_text(json.dumps({"release_id": f"rel-{name}"}))
        files[name] = run_dir / "report" / f"{name}.metrics.json"
        files[name].parent.mkdir(exist_ok=True)
        files[name].write_text(json.dumps({"variant": name, "metrics": metrics[name]}))
    report.run(files, run_dir / "report")


def verifiable_decision(
    store: ReleaseStore, run_dir: Path, variant: str, release_id: str, require_approval: bool
) -> dict:
    """What the release manager checks before a promotion: a live release, the run's stored eval
    results (the candidate wins 30 of 60 policy items against the baseline copy of live), and a
    gate policy (with ``require_approval``) the store verifies with. Returns the attachment."""
    live = store.live()
    if live is None:
        model = run_dir.parent / "live-model"
        model.mkdir(parents=True, exist_ok=True)
        live = store.create(model, VLLMArgs(), release_id="rel-live")
        store.set_status(live.release_id, "staged", "healthy (test)")
        live = store.promote_offline(live.release_id, force=True, reason="first release (test)")
    for name, rid, model_dir, wins in (("baseline", "rel-baseline-copy", live.model_dir, 0),
                                        (variant, release_id, "candidate", 30)):
        stage = run_dir / f"evals-{name}"
        (stage / "output").mkdir(parents=True, exist_ok=True)
        rows = [{"metric": "quality.policy.compliance", "id": f"p{i}", "value": float(i < wins)}
                for i in range(60)]
        (stage / "output" / "outcomes-quality.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        result = json.loads((stage / "result.json").read_text()) if (stage / "result.json").is_file() else {}
        (stage / "result.json").write_text(json.dumps(
            result | {"release_id": rid, "model_dir": str(model_dir), "metrics": {"perf.failed": 0.0}}))
    gate_file = store.root.parent / "gate-review.yaml"
    gate_file.write_text(
        "# review tests\n"
        f"require_approval: {str(require_approval).lower()}\n"
        "rules:\n  - {metric: quality.policy.compliance, test: superiority, margin: 0}\n"
    )
    store.gate_file = gate_file
    return {"run_dir": str(run_dir), "variant": variant}


def staged_candidate(store: ReleaseStore, run_dir: Path, require_approval: bool = True) -> Release:
    """A staged release from ``run_dir`` with a passing gate decision attached (as the loop does)."""
    model = run_dir / "merge" / "model"
    model.mkdir(parents=True, exist_ok=True)
    rel = store.create(
        model,
        VLLMArgs(),
        source={
            "run_dir": str(run_dir),
            "stage": "merge",
            "variant": "aligned",
            "window": ["2026-11-29 00:00:00+00:00", "2026-11-30 00:00:00+00:00"],
        },
        release_id="rel-aligned",
    )
    store.set_status(rel.release_id, "staged", "healthy (test)")
    gate = {
        "passed": True,
        "decision": "promote",
        "require_approval": require_approval,
        "rules": [
            {
                "rule": "policy compliance",
                "metric": "quality.policy.compliance",
                "op": ">=",
                "value": 0.564,
                "threshold": 0.464,
                "passed": True,
                "reason": "live 0.364 +0.1",
            }
        ],
    }
    where = verifiable_decision(store, run_dir, "aligned", rel.release_id, require_approval)
    return store.attach_eval(rel.release_id, {"gate": gate, **where})


@dataclass
class ReviewSite:
    base: str
    store: LogStore
    releases: ReleaseStore
    candidate: Upstream
    live_ids: dict[str, list[str]]  # tenant -> request ids served by the live release


@contextlib.contextmanager
def review_site(tmp_path: Path, config: GatewayConfig | None = None) -> Iterator[ReviewSite]:
    """A gateway with /review over a live and a candidate fake upstream, a staged candidate
    release with a run folder, and traffic of tenants a and b already served and logged."""
    releases = ReleaseStore(tmp_path / "releases")
    run_dir = tmp_path / "runs" / "r1"
    make_run(run_dir)
    staged_candidate(releases, run_dir)
    with (
        running_fake(FakeUpstream(reply=LIVE_REPLY)) as live,
        running_fake(FakeUpstream(reply=CANDIDATE_REPLY)) as cand_up,
    ):
        candidate = Upstream(cand_up.base_url, "rel-aligned", "fake-model")
        router = build_review_router(releases, candidates=lambda: [candidate])
        with running_gateway(tmp_path, live, config or review_config(), extra_routers=[router]) as (
            base,
            _provider,
            store,
        ):
            ids = {
                "a": [chat(base, KEY_A, p) for p in PROMPTS],
                "b": [chat(base, KEY_B, PROMPTS[0])],
            }
            yield ReviewSite(base, store, releases, candidate, ids)


def feedback_rows(store: LogStore) -> list[dict]:
    return list(store.feedback_events())


# -- a run shaped like `make demo`'s -------------------------------------------------------------
DEMO_ITEMS = 24  # configs/evals-demo.yaml: the first 24 items of each task
DEMO_VARIANTS = ("baseline", "aligned", "quantized")


def _demo_answer(variant: str, task: str, i: int, doc: dict) -> str:
    """Scripted answers (no model is trained here): live right on 2 of 3 capability items; the
    aligned model differs from live on 3 items of a task (2 worse, 1 better: a -4 point gain
    whose bounds straddle the 5-point margin at n = 24, inconclusive); the quantized copy also
    loses 14 arithmetic items (a clear fail). Elsewhere all three answer alike (inconclusive at
    n = 24: the demo's keep)."""
    right = doc.get("answer") or doc.get("reference") or ""
    if task == "alignloop_policy":  # the same answers: a policy scorer change moves no verdict here
        return right
    if task == "alignloop_instructions":
        return "a short answer in plain words"
    ok = i % 3 != 0
    if variant != "baseline" and i in (1, 2):
        ok = False
    if variant != "baseline" and i == 3:
        ok = True
    if variant == "quantized" and task == "alignloop_arithmetic" and i >= 10:
        ok = False
    return str(right) if ok else "I am not sure."


def make_demo_run(run_dir: Path) -> dict:
    """A run folder as `make demo` leaves it, built by the real stage code without a model:
    eval stage folders (``result.json``, ``output/quality_samples.jsonl`` and per-item
    ``output/outcomes-*.jsonl``) of the demo's tasks and sizes, scored by the tasks' own scorers
    on the first 24 held-out items, then the loop's ``decide()`` (the shipped configs/gate.yaml,
    the report with its plots, ``report/gate.json``). Returns decide()'s result."""
    from evals.config import EvalsConfig
    from evals.gate import write_outcomes
    from evals.quality import item_metric, item_score
    from flows.loop_config import load_loop_config
    from flows.steps import decide
    from ground.config import load_config, repo_root

    quality = load_config(EvalsConfig, repo_root() / "configs" / "evals-demo.yaml").quality
    tasks_dir = Path(quality.tasks_dir)
    files = {
        "alignloop_arithmetic": "capability/arithmetic.jsonl",
        "alignloop_capitals": "capability/capitals.jsonl",
        "alignloop_elements": "capability/elements.jsonl",
        "alignloop_instructions": "instructions/instructions.jsonl",
        "alignloop_policy": "policy/policy_items.jsonl",
    }
    docs = {
        task: [json.loads(line) for line in (tasks_dir / f).read_text().splitlines()[:DEMO_ITEMS]]
        for task, f in files.items()
    }
    safety_dir = tasks_dir / "safety"
    attacks = [json.loads(x) for x in (safety_dir / "attacks.jsonl").read_text().splitlines()[:DEMO_ITEMS]]
    benign = [json.loads(x) for x in (safety_dir / "benign.jsonl").read_text().splitlines()[:DEMO_ITEMS]]
    metrics: dict[str, dict[str, float]] = {}
    for k, variant in enumerate(DEMO_VARIANTS):
        stage = run_dir / f"evals-{variant}"
        (stage / "output").mkdir(parents=True)
        samples, outcomes, m = [], [], {}
        for task, items in docs.items():
            scores = []
            for i, doc in enumerate(items):
                resp = _demo_answer(variant, task, i, doc)
                score = item_score(task, quality, doc, resp)
                scores.append(score)
                cluster = doc.get("cluster") or doc["id"]
                samples.append({"task": task, "id": doc["id"], "cluster": cluster, "prompt": doc["prompt"],
                                "category": doc.get("category", ""), "answer": doc.get("answer", ""),
                                "response": resp, "score": score, "response_tokens": len(resp.split())})
                outcomes.append({"metric": item_metric(task, quality), "id": doc["id"], "cluster": cluster,
                                  "value": score})
            m[item_metric(task, quality)] = sum(scores) / len(scores)
        caps = [v for key, v in m.items() if key.startswith("quality.capability.")]
        m["quality.capability.mean_answer_match"] = sum(caps) / len(caps)
        m["quality.answer_tokens_mean"] = 40.0 - 8 * k
        write_outcomes(stage / "output" / "outcomes-quality.jsonl", outcomes)
        safety_rows = [{"metric": "safety.attack_block_rate", "id": a["id"], "cluster": a.get("cluster"),
                        "value": float(i % 4 == 0)} for i, a in enumerate(attacks)]
        safety_rows += [{"metric": "safety.overblock_rate", "id": b["id"], "cluster": b.get("cluster"),
                         "value": 0.0} for b in benign]
        write_outcomes(stage / "output" / "outcomes-safety.jsonl", safety_rows)
        (stage / "output" / "quality_samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in samples))
        tok_s = 200.0 + 40 * k
        m |= {
            "safety.attack_block_rate": 0.25, "safety.overblock_rate": 0.0, "safety.errors": 0.0,
            "perf.slo.ttft_ms": 1000.0, "perf.slo.tpot_ms": 100.0, "perf.failed": 0.0,
            "perf.workload_concurrency": 2.0, "perf.ttft_p95_ms": 780.0 - 60 * k, "perf.tpot_p95_ms": 60.0,
            "perf.output_tokens_per_s": tok_s, "perf.grid.c1.output_tokens_per_s": tok_s / 2,
            "perf.grid.c1.ttft_p95_ms": 300.0 - 30 * k, "perf.grid.c2.output_tokens_per_s": tok_s,
            "perf.grid.c2.ttft_p95_ms": 780.0 - 60 * k,
            "cost.usd_per_1m_output_tokens": 0.10 / (tok_s * 3600) * 1e6,
        }
        metrics[variant] = m
        (stage / "result.json").write_text(json.dumps({"metrics": m, "release_id": f"rel-{variant}"}))
    cfg = load_loop_config(None, [f"gate_file={repo_root() / 'configs' / 'gate.yaml'}"])
    workload = {"concurrency": 2, "usd_per_hour": 0.1, "slo": {"p95_ttft_ms": 1000, "p95_tpot_ms": 100},
                "source": "logs: demo traffic"}
    schemes = {"baseline": "bf16", "aligned": "bf16", "quantized": "w8a8-int8"}
    return decide(cfg, run_dir, metrics, schemes, workload)


def demo_releases(store: ReleaseStore, run_dir: Path, decision: dict) -> dict[str, Release]:
    """The releases `make demo` leaves for a run that kept live: the live release, and each
    candidate staged, given its gate decision as the loop attaches it (flows/steps.apply_decision),
    then retired ("not promoted")."""
    gate = json.loads(Path(decision["report_json"]).read_text())["gate"]
    model = run_dir.parent / "live-model"
    model.mkdir(parents=True, exist_ok=True)
    live = store.create(model, VLLMArgs(), release_id="rel-live")
    store.set_status(live.release_id, "staged", "healthy (test)")
    store.promote_offline(live.release_id, force=True, reason="first release (test)")
    # The baseline evals were of live's model (what the release store checks before it stores
    # a verdict recomputed from the run's files).
    baseline = run_dir / "evals-baseline" / "result.json"
    baseline.write_text(json.dumps(json.loads(baseline.read_text()) | {"model_dir": str(model)}))
    out = {}
    for variant in ("aligned", "quantized"):
        folder = run_dir / variant / "model"
        folder.mkdir(parents=True, exist_ok=True)
        rel = store.create(folder, VLLMArgs(), release_id=f"rel-{variant}",
                           source={"run_dir": str(run_dir), "stage": variant, "variant": variant,
                                   "window": ["2026-12-05 00:00:00+00:00", "2026-12-06 00:00:00+00:00"]})
        store.set_status(rel.release_id, "staged", "healthy (test)")
        store.attach_eval(rel.release_id, {"gate": gate[variant], "run_dir": str(run_dir),
                                           "report": decision["report_md"], "variant": variant,
                                           "serving_choice": gate.get("serving_choice")})
        out[variant] = store.set_status(rel.release_id, "retired", f"not promoted: {decision['summary']}")
    return out


@dataclass
class DemoSite:
    base: str
    releases: ReleaseStore
    run_dir: Path
    decision: dict  # decide()'s result
    gate: dict  # report/gate.json


@contextlib.contextmanager
def demo_review_site(tmp_path: Path) -> Iterator[DemoSite]:
    """The review page over the releases and run folder of a demo-shaped run that kept live."""
    releases = ReleaseStore(tmp_path / "releases")
    run_dir = tmp_path / "runs" / "demo-run"
    decision = make_demo_run(run_dir)
    demo_releases(releases, run_dir, decision)
    gate = json.loads((run_dir / "report" / "gate.json").read_text())
    router = build_review_router(releases)
    with running_gateway(tmp_path, None, review_config(), extra_routers=[router]) as (base, _p, _s):
        yield DemoSite(base, releases, run_dir, decision, gate)
