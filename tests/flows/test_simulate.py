"""Demo traffic + simulated users: determinism, decisions, and a real gateway over HTTP."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi import FastAPI, Request

from evals.policy import classify_prompt, compliance
from flows.simulate import (
    SimulateConfig,
    SimulationLabelError,
    decide_feedback,
    load_pool,
    plan_traffic,
)
from flows.simulate import run as simulate
from ground.logstore import LogStore
from serving.gateway.app import create_app, serve_in_thread
from serving.gateway.config import GatewayConfig, hash_key
from serving.gateway.upstream import StaticUpstream, Upstream
from training.data import DataConfig, GovernanceConfig
from training.data import run as build_data
from training.governance import EvalIndex, load_eval_prompts

REPO = Path(__file__).resolve().parents[2]
KEY = "sk-demo-tenant"
LONG = "Sure! " + "This answer rambles on about many things that nobody asked for. " * 5


def test_pool_is_policy_consistent_and_disjoint_from_evals() -> None:
    pool = load_pool()
    assert 40 <= len(pool) <= 100
    assert {i["category"] for i in pool} == {"faq", "advice", "personal_data", "general"}
    for item in pool:
        assert classify_prompt(item["prompt"]) == item["category"], item["prompt"]
        assert compliance(item["prompt"], item["reference"], item["category"]) == 1.0, item
    # No traffic prompt overlaps any shipped eval item (so decontamination drops nothing in the demo).
    gov = GovernanceConfig()
    index = EvalIndex(load_eval_prompts(gov.eval_globs, REPO), gov.ngram)
    assert [i["prompt"] for i in pool if index.overlap(i["prompt"])] == []
    policy_items = [
        json.loads(x)
        for x in (REPO / "evals/tasks/policy/policy_items.jsonl").read_text().splitlines()
    ]
    assert not {i["prompt"] for i in pool} & {i["prompt"] for i in policy_items}


def test_plan_is_seeded() -> None:
    pool = load_pool()
    cfg = SimulateConfig(seed=3, rounds=2)
    a, b = plan_traffic(pool, cfg), plan_traffic(pool, cfg)
    assert [(p.item["id"], p.sample_seeds) for p in a] == [
        (p.item["id"], p.sample_seeds) for p in b
    ]
    assert len(a) == 2 * len(pool) and any(len(p.sample_seeds) == 2 for p in a)
    other = plan_traffic(pool, SimulateConfig(seed=4, rounds=2))
    assert [p.item["id"] for p in other] != [p.item["id"] for p in a]


def test_simulated_user_decisions() -> None:
    faq = next(i for i in load_pool() if i["category"] == "faq")
    cfg = SimulateConfig(noise=0.0, edit_probability=1.0)
    acts, scores = decide_feedback(faq, [faq["reference"]], cfg)
    assert scores == [1.0] and [a.body["rating"] for a in acts] == [{"thumbs": "up"}]
    acts, _ = decide_feedback(faq, [LONG], cfg)
    assert [a.body["edit"] for a in acts] == [{"text": faq["reference"]}]
    assert acts[0].body["comment"].startswith("simulated user")
    acts, _ = decide_feedback(faq, [LONG, faq["reference"]], cfg)
    assert acts[0].body["preference"] == {"other_request_id": 1, "preferred": "other"}
    assert (acts[1].sample, "edit" in acts[1].body) == (0, True)  # the worse answer gets edited
    acts, _ = decide_feedback(faq, [LONG], SimulateConfig(noise=0.0, edit_probability=0.0))
    assert [a.body["rating"] for a in acts] == [{"thumbs": "down"}]
    # noise flips judgments: over many prompts, some compliant answers get thumbs down
    noisy = SimulateConfig(noise=0.5, edit_probability=0.0)
    votes = [
        decide_feedback({**faq, "id": f"x{i}"}, [faq["reference"]], noisy)[0][0].body["rating"][
            "thumbs"
        ]
        for i in range(40)
    ]
    assert 5 < votes.count("down") < 35


class ScriptedUpstream:
    """A mock of vLLM (the real one is in the integration test below): the answer depends only on
    the request's sampling seed, so the test controls compliance and can check determinism."""

    def __init__(self) -> None:
        self.app = FastAPI()
        self.app.post("/v1/chat/completions")(self.chat)
        self.app.get("/health")(lambda: {"ok": True})

    async def chat(self, request: Request) -> dict:
        body = await request.json()
        text = "Please consult a qualified professional." if body["seed"] % 2 == 0 else LONG
        return {
            "id": "up",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body["model"],
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 5, "completion_tokens": 9, "total_tokens": 14},
        }


@contextlib.contextmanager
def gateway(
    tmp_path: Path, upstream_url: str, served: str, simulated: bool = True
) -> Iterator[tuple[str, str]]:
    """A real gateway (PII input hook, real SQLite) in a thread; yields (base_url, log store url).

    The tenant is flagged ``simulated`` as the demo's is: the server labels its feedback."""
    url = f"sqlite:///{tmp_path / 'logs.db'}"
    cfg = GatewayConfig.model_validate(
        {
            "tenants": [{"name": "demo", "key_hash": hash_key(KEY), "simulated": simulated}],
            "guardrails": {"input": [{"name": "pii"}]},
        }
    )
    app = create_app(cfg, StaticUpstream(Upstream(upstream_url, "r1", served)), LogStore(url))
    with serve_in_thread(app) as base:
        yield base + "/v1", url


def signature(traffic: Path) -> list:
    """The traffic log without request ids (the gateway mints new ones each run)."""
    rows = [json.loads(x) for x in traffic.read_text().splitlines()]
    for r in rows:
        r.pop("request_ids")
    return rows


def test_simulate_through_gateway_is_deterministic_and_feeds_the_data_stage(tmp_path: Path) -> None:
    up = ScriptedUpstream()
    sigs, results = [], []
    with serve_in_thread(up.app) as up_base:
        for run_no in range(2):
            d = tmp_path / f"run{run_no}"
            d.mkdir()
            with gateway(d, up_base + "/v1", "scripted") as (base, store_url):
                cfg = SimulateConfig(
                    base_url=base,
                    api_key=KEY,
                    seed=7,
                    limit=20,
                    concurrency=3,
                    two_sample_fraction=0.5,
                    out=str(d / "traffic.jsonl"),
                )
                results.append(simulate(cfg))
            sigs.append(signature(d / "traffic.jsonl"))
    assert sigs[0] == sigs[1]
    res = results[0]
    assert (
        res.failed == 0
        and res.requests > 20
        and set(res.feedback) == {"rating", "preference", "edit"}
    )

    store = LogStore(store_url)
    fb = list(store.feedback_events())
    assert len(fb) == sum(res.feedback.values())
    assert all(f["actor_role"] == "simulated" for f in fb)  # recorded by the server
    assert {f["actor"] for f in fb} <= {f"simulated-user-{i}" for i in range(16)} and len({f["actor"] for f in fb}) > 1
    # The gateway redacted the PII prompts before logging them.
    assert not any("@example." in m["content"] for e in store.exchanges() for m in e["messages"])
    store.close()

    data = build_data(
        DataConfig.model_validate(
            {
                "run_dir": str(tmp_path / "data"),
                "logstore": {"url": store_url},
                "trust": {"tenants": ["demo"], "trusted_roles": ["reviewer", "simulated"]},
                "ledger": {"path": str(tmp_path / "ledger")},
            }
        )
    )
    manifest = json.loads(Path(data.manifest_path).read_text())
    assert manifest["feedback"]["simulated"] == manifest["feedback"]["total"] == len(fb)
    assert data.counts["sft"] > 0 and data.counts["dpo"] > 0
    assert manifest["governance"]["decontamination"]["dropped"] == {"sft": 0, "dpo": 0, "kto": 0}


def test_simulated_users_refuse_a_tenant_the_server_does_not_label_simulated(tmp_path: Path) -> None:
    """The label comes from the server's tenant flag; a key of an unflagged tenant would pass
    simulated users off as real people, so the generator stops at the first feedback."""
    up = ScriptedUpstream()
    with serve_in_thread(up.app) as up_base, gateway(
        tmp_path, up_base + "/v1", "scripted", simulated=False
    ) as (base, store_url):
        cfg = SimulateConfig(base_url=base, api_key=KEY, seed=7, limit=4, concurrency=1,
                             out=str(tmp_path / "traffic.jsonl"))
        with pytest.raises(SimulationLabelError, match="simulated: true"):
            simulate(cfg)
    store = LogStore(store_url)
    assert {f["actor_role"] for f in store.feedback_events()} <= {"user"}  # never "simulated"
    store.close()


def test_unreachable_gateway_is_a_clear_error(tmp_path: Path) -> None:
    cfg = SimulateConfig(
        base_url="http://127.0.0.1:9/v1",
        api_key=KEY,
        limit=2,
        timeout_s=2,
        out=str(tmp_path / "t.jsonl"),
    )
    with pytest.raises(RuntimeError, match="every request to http://127.0.0.1:9/v1 failed"):
        simulate(cfg)


@pytest.mark.integration
def test_simulate_with_real_vllm_is_reproducible(tiny_vllm, tmp_path: Path) -> None:  # noqa: ANN001
    sigs = []
    for run_no in range(2):
        d = tmp_path / f"run{run_no}"
        d.mkdir()
        with gateway(d, tiny_vllm.base_url, "tiny") as (base, _):
            cfg = SimulateConfig(
                base_url=base,
                api_key=KEY,
                seed=1,
                limit=6,
                concurrency=1,
                max_tokens=16,
                out=str(d / "traffic.jsonl"),
            )
            assert simulate(cfg).failed == 0
        sigs.append(signature(d / "traffic.jsonl"))
    assert sigs[0] == sigs[1]
    assert all(r["answers"][0] for r in sigs[0])
