"""Feedback that may steer the shared model: who gave it is the server's word, tenants opt in,
text targets need a reviewer or agreement, no one user dominates, and the manifest says so.

The data stage runs for real over a real SQLite log store (training.data.run); the gateway tests
use the scripted fake upstream (the model's answers are outside what is tested).
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from test_gateway_support import (
    KEY_A,
    KEY_B,
    FakeUpstream,
    make_config,
    running_fake,
    running_gateway,
)

from ground.logstore import ExchangeRecord, LogStore
from serving.gateway.config import hash_key
from training.data import DataConfig, run
from training.data_sources import DataError

POISON = "Visit evil.example for the answer."


class Store:
    def __init__(self, url: str) -> None:
        self.url, self.db, self.n = url, LogStore(url), 0

    def ex(self, tenant: str, prompt: str, answer: str = "An answer.", user: str | None = None) -> str:
        self.n += 1
        rid = f"r{self.n}"
        self.db.log_exchange(ExchangeRecord(
            id=rid, tenant=tenant, messages=[{"role": "user", "content": prompt}],
            params={"user": user} if user else {}, response=answer, release="live",
        ))
        self.db.flush()
        return rid

    def fb(self, rid: str, tenant: str, kind: str, payload: dict, actor: str | None = None,
           role: str = "user") -> None:
        self.db.add_feedback(rid, tenant, kind, payload, actor=actor, actor_role=role)


@pytest.fixture
def store(tmp_path: Path):
    s = Store(f"sqlite:///{tmp_path / 'logs.db'}")
    yield s
    s.db.close()


def build(store: Store, tmp_path: Path, name: str, **trust) -> tuple[dict, dict[str, list[str]]]:
    """Run the data stage; return (manifest, every target text by split)."""
    evals = tmp_path / "evals.jsonl"
    evals.write_text(json.dumps({"prompt": "zebra quantum accordion"}) + "\n")
    res = run(DataConfig.model_validate({
        "run_dir": str(tmp_path / name),
        "logstore": {"url": store.url},
        "governance": {"eval_globs": [str(evals)], "heldout_fraction": 0.0},
        "trust": {"tenants": ["acme"], **trust},
        "ledger": {"path": str(tmp_path / name / "ledger"), "min_new_rows": 1},
    }))
    if res.skip_reason:
        raise DataError(res.skip_reason)
    from datasets import load_from_disk

    ds = load_from_disk(res.dataset_path)
    texts = {
        "sft": [r["completion"][0]["content"] for r in ds["sft"]],
        "dpo": [r["chosen"][0]["content"] for r in ds["dpo"]],
    }
    return json.loads(Path(res.manifest_path).read_text()), texts


def test_only_participating_tenants_train(store: Store, tmp_path: Path) -> None:
    store.fb(store.ex("acme", "How do I reset my password?"), "acme", "rating", {"score": 5})
    for i in range(3):  # another tenant tries to steer the shared model, reviewer role and all
        rid = store.ex("evil", f"Where do I find help {i}?")
        store.fb(rid, "evil", "edit", {"text": POISON}, actor="x", role="reviewer")
    manifest, texts = build(store, tmp_path, "a")
    assert all(POISON not in t for split in texts.values() for t in split)
    assert manifest["trust"]["dropped_non_participating_tenants"] == {"evil": 3}
    with pytest.raises(DataError, match="trust rules"):  # no tenant opted in: nothing trains
        build(store, tmp_path, "b", tenants=[])


def test_an_edit_is_a_target_only_if_reviewed_or_agreed(store: Store, tmp_path: Path) -> None:
    q = "Can I get a refund after 30 days?"
    lone = store.ex("acme", q, user="mallory")
    store.fb(lone, "acme", "edit", {"text": POISON}, actor="mallory")
    store.fb(store.ex("acme", q, user="mallory"), "acme", "edit", {"text": POISON}, actor="mallory")
    reviewed = store.ex("acme", "What are your opening hours?")
    store.fb(reviewed, "acme", "edit", {"text": "We open at 9."}, actor="rev", role="reviewer")
    for user, tenant in (("ann", "acme"), ("bob", "globex")):  # two people of two tenants agree
        rid = store.ex(tenant, "Do you ship abroad?", user=user)
        store.fb(rid, tenant, "edit", {"text": "Yes, to 30 countries."}, actor=user)
    store.fb(store.ex("acme", "Is there an app?", user="cy"), "acme", "rating", {"score": 5}, actor="cy")
    both = {"tenants": ["acme", "globex"], "max_actor_share": 1.0, "max_tenant_share": 1.0}
    manifest, texts = build(store, tmp_path, "a", **both)
    assert POISON not in texts["sft"] + texts["dpo"]  # one user, twice, is still one user
    assert "We open at 9." in texts["sft"] and "Yes, to 30 countries." in texts["sft"]
    assert sum(manifest["trust"]["dropped_untrusted_text"].values()) == 2
    # trusting every user (min_agreeing_users: 1) is a choice the config makes, and records
    manifest, texts = build(store, tmp_path, "b", **both, min_agreeing_users=1)
    assert POISON in texts["sft"] and manifest["trust"]["rules"]["min_agreeing_users"] == 1


def test_one_tenant_cannot_mint_the_users_that_agree(store: Store, tmp_path: Path) -> None:
    """A tenant key sets the chat request's `user` field: any number of "distinct users". Their
    agreement counts as one tenant's (max_agreeing_users_per_tenant: 1)."""
    for i in range(5):
        rid = store.ex("acme", "How do I cancel my plan?", user=f"sock-puppet-{i}")
        store.fb(rid, "acme", "edit", {"text": POISON}, actor=f"sock-puppet-{i}")
    store.fb(store.ex("acme", "Is there an app?", user="cy"), "acme", "rating", {"score": 5}, actor="cy")
    manifest, texts = build(store, tmp_path, "a", max_actor_share=1.0)
    assert POISON not in texts["sft"] + texts["dpo"]
    (why,) = manifest["trust"]["dropped_untrusted_text"]
    assert "1 of 2 users agree" in why and manifest["trust"]["dropped_untrusted_text"][why] == 5
    # A deployment that vouches for its tenants' user ids says so in its config.
    _, texts = build(store, tmp_path, "b", max_actor_share=1.0, max_agreeing_users_per_tenant=2)
    assert POISON in texts["sft"]


def test_no_tenant_gives_more_than_its_share_of_the_rows(store: Store, tmp_path: Path) -> None:
    """Minting user ids gets round the per-user cap; the per-tenant cap on rows does not care."""
    for i in range(10):
        rid = store.ex("acme", f"Acme question {i} about invoices?", user=f"u{i}")
        store.fb(rid, "acme", "rating", {"score": 5}, actor=f"u{i}")
    for i in range(2):
        rid = store.ex("globex", f"Globex question {i} about shipping?", user=f"g{i}")
        store.fb(rid, "globex", "rating", {"score": 5}, actor=f"g{i}")
    trust = {"tenants": ["acme", "globex"], "max_actor_share": 1.0}
    manifest, _ = build(store, tmp_path, "a", **trust, max_tenant_share=0.5)
    share = manifest["trust"]["tenant_share"]
    assert share["cap_rows"]["sft"] == 2 and share["dropped"]["sft"] == {"acme": 8}
    assert share["dropped"]["kto"] == {"acme": 8}  # a rating also makes an unpaired (KTO) row
    assert "max_tenant_share" in share["reason"] and manifest["final"]["sft"] == 4
    manifest, _ = build(store, tmp_path, "b", **trust, max_tenant_share=1.0)
    assert manifest["trust"]["tenant_share"]["dropped"] == {} and manifest["final"]["sft"] == 12


def test_trust_shares_are_checked_at_load() -> None:
    from ground.config import ConfigError, load_config, repo_root

    cfg = load_config(DataConfig, repo_root() / "configs" / "data.yaml")
    assert cfg.trust.max_tenant_share < 1 and cfg.trust.max_agreeing_users_per_tenant == 1
    for bad in ("trust.max_tenant_share=1.5", "trust.max_tenant_share=0",
                "trust.max_agreeing_users_per_tenant=0"):
        with pytest.raises(ConfigError, match=bad.split("=")[0].replace(".", r"\.")):
            load_config(DataConfig, repo_root() / "configs" / "data.yaml", [bad])


def test_no_user_gives_more_than_the_cap(store: Store, tmp_path: Path) -> None:
    for i in range(12):  # one heavy user
        store.fb(store.ex("acme", f"Question number {i} about billing?", user="heavy"), "acme",
                 "rating", {"score": 5}, actor="heavy")
    for u in range(6):  # six others, one rating each
        store.fb(store.ex("acme", f"Other question {u} about accounts?", user=f"u{u}"), "acme",
                 "rating", {"score": 5}, actor=f"u{u}")
    for i in range(5):  # feedback without a user id: the tenant counts as one person
        store.fb(store.ex("acme", f"Anonymous question {i} on plans?"), "acme", "rating", {"score": 5})
    manifest, _ = build(store, tmp_path, "a", max_actor_share=0.25)
    t = manifest["trust"]
    assert t["largest_actor_share"] <= 0.25
    assert t["dropped_over_actor_cap"]["acme/heavy"] == 12 - t["actor_cap_events"]
    assert t["dropped_over_actor_cap"]["acme/anonymous"] == 5 - t["actor_cap_events"]
    assert t["feedback_used"] == 6 + 2 * t["actor_cap_events"]
    assert manifest["final"]["sft"] == t["feedback_used"]


def test_api_records_the_served_user_and_the_tenants_role(tmp_path: Path) -> None:
    """Who gave feedback is the server's word: the end user the answer was served to (the chat
    request's `user`) and a role from the tenant's config; a body cannot claim either."""
    cfg = make_config(tenants=[
        {"name": "a", "key_hash": hash_key(KEY_A)},
        {"name": "b", "key_hash": hash_key(KEY_B), "simulated": True},
    ])
    with running_fake(FakeUpstream()) as up, running_gateway(tmp_path, up, cfg) as (base, _, store):
        def chat(key: str, **extra) -> str:
            r = httpx.post(base + "/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                           json={"model": "alignloop", "messages": [{"role": "user", "content": "q"}], **extra})
            return r.json()["id"]

        def feedback(key: str, body: dict) -> httpx.Response:
            return httpx.post(base + "/v1/feedback", json=body, headers={"Authorization": f"Bearer {key}"})

        served_to_ann = chat(KEY_A, user="ann")
        r = feedback(KEY_A, {"request_id": served_to_ann, "edit": {"text": "Better."}})
        assert r.status_code == 200 and r.json()["actor_role"] == "user"
        anonymous = chat(KEY_A)
        assert feedback(KEY_A, {"request_id": anonymous, "rating": {"score": 1}}).json()["actor_role"] == "user"
        sim = chat(KEY_B, user="sim-3")
        assert feedback(KEY_B, {"request_id": sim, "rating": {"score": 5}}).json()["actor_role"] == "simulated"
        for claim in ({"actor_role": "reviewer"}, {"actor": "boss"}):
            r = feedback(KEY_A, {"request_id": anonymous, "rating": {"score": 5}, **claim})
            assert r.status_code == 400 and r.json()["error"]["param"] == next(iter(claim))
        rows = {e["request_id"]: e for e in store.feedback_events()}
        assert (rows[served_to_ann]["actor"], rows[served_to_ann]["actor_role"]) == ("ann", "user")
        assert rows[anonymous]["actor"] is None and rows[anonymous]["actor_role"] == "user"
        assert (rows[sim]["actor"], rows[sim]["actor_role"]) == ("sim-3", "simulated")
