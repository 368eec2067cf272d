"""The data stage on a real SQLite log store and real JSONL files (no mocks)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from ground.config import ConfigError, load_config
from ground.logstore import ExchangeRecord, LogStore
from training.data import DataConfig, run
from training.data_sources import DataError, load_logstore
from training.preferences import build_rows, prompt_key

REPO = Path(__file__).resolve().parents[2]


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


class Store:
    """A real log store in a temp folder with helpers to write exchanges and feedback."""

    def __init__(self, path: Path) -> None:
        self.url = f"sqlite:///{path / 'logs.db'}"
        self.db = LogStore(self.url)

    def ex(self, rid: str, prompt: str, answer: str, release_id: str = "r1", **kw) -> str:
        self.db.log_exchange(
            ExchangeRecord(
                id=rid,
                tenant="acme",
                messages=user(prompt),
                response=answer,
                release=release_id,
                **kw,
            )
        )
        self.db.flush()  # the stage reads through its own LogStore: the row must be written
        return rid

    def fb(
        self, rid: str, kind: str, payload: dict, comment: str | None = None, role: str = "user"
    ) -> str:
        return self.db.add_feedback(rid, "acme", kind, payload, comment, actor_role=role)[0]

    def close(self) -> None:
        self.db.close()


@pytest.fixture
def store(tmp_path: Path):
    s = Store(tmp_path)
    yield s
    s.close()


@pytest.fixture
def no_evals(tmp_path: Path) -> str:
    """An eval glob that matches one harmless item, so the real eval files do not interfere."""
    f = tmp_path / "evals" / "x.jsonl"
    f.parent.mkdir()
    f.write_text(json.dumps({"prompt": "zebra quantum accordion marmalade"}) + "\n")
    return str(tmp_path / "evals" / "*.jsonl")


# acme takes part and every user is trusted: one user's edit is a target, no share cap.
PERMISSIVE_TRUST = {"tenants": ["acme"], "min_agreeing_users": 1, "max_actor_share": 1.0}


def cfg_for(store: Store, tmp_path: Path, evals: str, **gov) -> DataConfig:
    return DataConfig.model_validate(
        {
            "run_dir": str(tmp_path / "run"),
            "logstore": {"url": store.url},
            "governance": {"eval_globs": [evals], "heldout_fraction": 0.0, **gov},
            "trust": PERMISSIVE_TRUST,  # these tests are about rows; tests/security: the rules
            "ledger": {"path": str(tmp_path / "ledger"), "min_new_rows": 1},
        }
    )


def load(result):
    from datasets import load_from_disk

    return load_from_disk(result.dataset_path)


def test_each_feedback_kind_gives_exactly_its_rows(store: Store) -> None:
    a = store.ex("a", "How do I reset my password?", "Click Forgot password.")
    b = store.ex("b", "how do I reset my password", "I don't know, sorry, ask someone else.")
    c = store.ex(
        "c", "What is the refund window?", "Refunds are complicated and depend on many things."
    )
    d = store.ex("d", "Is there a free plan?", "Yes, 5 GB free.")
    e = store.ex(
        "e", "Is there a free plan?", "Maybe. Plans change often, check the website later."
    )
    f = store.ex("f", "Can I share a folder?", "Sharing is a feature many services have.")
    g = store.ex("g", "Does it run on Linux?", "Yes.")
    h = store.ex("h", "What about offline use?", "It depends.")
    fa = store.fb(a, "rating", {"thumbs": "up", "score": 5})
    fb_ = store.fb(b, "rating", {"score": 1})
    fc = store.fb(c, "edit", {"text": "You can get a refund within 30 days."})
    fd = store.fb(d, "preference", {"other_request_id": e, "preferred": "this"})
    ff = store.fb(f, "preference", {"better_text": "Right-click a folder and choose Share."})
    store.fb(g, "rating", {"score": 5})
    store.fb(g, "rating", {"score": 2})  # conflicting: used by no row
    store.fb(h, "rating", {"score": 3})  # neutral: no row

    batch = load_logstore(store.url, None, None)
    sft, dpo, kto, stats = build_rows(batch)

    assert sorted(
        (r["source"], r["request_ids"], r["feedback_ids"], r["completion"][0]["content"])
        for r in sft
    ) == [
        ("edit", [c], [fc], "You can get a refund within 30 days."),
        ("rating", [a], [fa], "Click Forgot password."),
    ]
    got = sorted(
        (
            r["source"],
            r["request_ids"],
            r["feedback_ids"],
            r["chosen"][0]["content"],
            r["rejected"][0]["content"],
        )
        for r in dpo
    )
    assert got == sorted(
        [
            (
                "edit",
                [c],
                [fc],
                "You can get a refund within 30 days.",
                "Refunds are complicated and depend on many things.",
            ),
            (
                "rating_pair",
                [a, b],
                [fa, fb_],
                "Click Forgot password.",
                "I don't know, sorry, ask someone else.",
            ),
            (
                "preference",
                [d, e],
                [fd],
                "Yes, 5 GB free.",
                "Maybe. Plans change often, check the website later.",
            ),
            (
                "preference_text",
                [f],
                [ff],
                "Right-click a folder and choose Share.",
                "Sharing is a feature many services have.",
            ),
        ]
    )
    for r in sft + dpo:
        assert r["prompt"][-1]["role"] == "user"
    assert stats["conflicts"] == {"ratings_positive_and_negative": 1}
    # Unpaired (KTO) rows: every rated answer, thumbs up or down; the conflicting one is not used.
    assert sorted((r["request_ids"][0], r["label"], r["feedback_ids"]) for r in kto) == [
        (a, True, [fa]),
        (b, False, [fb_]),
    ]


def test_conflicting_preferences_cancel_and_latest_edit_wins(store: Store) -> None:
    x = store.ex("x", "Is there a free plan?", "Yes, 5 GB.")
    y = store.ex("y", "Is there a free plan?", "No idea, really.")
    store.fb(x, "preference", {"other_request_id": y, "preferred": "this"})
    store.fb(y, "preference", {"other_request_id": x, "preferred": "this"})
    store.fb(x, "edit", {"text": "First edit."})
    last = store.fb(x, "edit", {"text": "The free plan includes 5 GB of storage."})
    sft, dpo, _, stats = build_rows(load_logstore(store.url, None, None))
    assert stats["conflicts"] == {"preferences_disagree": 1, "superseded_edits": 1}
    assert [(r["source"], r["feedback_ids"]) for r in sft] == [("edit", [last])]
    assert [r["source"] for r in dpo] == ["edit"]


def test_empty_window_is_skipped_not_failed(store: Store, tmp_path: Path, no_evals: str) -> None:
    store.ex("a", "Hello?", "Hi.")
    store.fb("a", "rating", {"score": 5})
    store.ex("later", "Hello again?", "Hi.", created_at=datetime.now(UTC) + timedelta(hours=2))
    cfg = cfg_for(store, tmp_path, no_evals)
    cfg.logstore.since = datetime.now(UTC) + timedelta(hours=1)
    res = run(cfg)
    assert res.skip_reason.startswith("skipped: not enough new feedback (0 new examples")
    assert res.dataset_path == "" and not (Path(res.stage_path) / "output" / "dataset").exists()
    manifest = json.loads(Path(res.manifest_path).read_text())
    assert manifest["skipped"] == res.skip_reason
    assert manifest["sources"]["logstore"]["exchanges_in_window"] == 1
    assert "no feedback in window" in manifest["sources"]["logstore"]["note"]


def test_window_and_release_filters(store: Store) -> None:
    store.ex("a", "Q one?", "A one.")
    store.ex("b", "Q two?", "A two.", release_id="r2")
    store.fb("a", "rating", {"score": 5})
    store.fb("b", "rating", {"score": 5})
    sft, _, _, stats = build_rows(load_logstore(store.url, None, None, releases=["r2"]))
    assert [r["request_ids"] for r in sft] == [["b"]]
    assert stats["feedback_unusable"] == {"request not found (or filtered out)": 1}


def test_planted_pii_never_in_any_split(store: Store, tmp_path: Path, no_evals: str) -> None:
    email, card, phone = "jane.doe@example.com", "4111 1111 1111 1111", "415-555-0132"
    for i in range(8):  # enough prompts that the held-out split is not empty
        rid = store.ex(
            f"p{i}",
            f"Question {i} about storage {email} and plans",
            f"Call {phone} about topic {i} now.",
        )
        store.fb(rid, "edit", {"text": f"Answer {i}: your card {card} is on file."})
    jl = tmp_path / "in.jsonl"
    jl.write_text(
        json.dumps(
            {
                "messages": user(f"My card is {card}, mail {email}")
                + [{"role": "assistant", "content": f"Noted {email}, I will call {phone}."}]
            }
        )
        + "\n"
    )
    cfg = cfg_for(store, tmp_path, no_evals, heldout_fraction=0.3)
    cfg.jsonl = [str(jl)]
    res = run(cfg)
    ds = load(res)
    assert res.counts["heldout_sft"] > 0 and res.counts["sft"] > 0
    dump = json.dumps({s: ds[s].to_list() for s in ds})
    for value in (email, card, phone, "4111111111111111", "555-0132"):
        assert value not in dump
    assert "<EMAIL_ADDRESS>" in dump and "<CREDIT_CARD>" in dump and "<PHONE_NUMBER>" in dump
    manifest = json.loads(Path(res.manifest_path).read_text())
    assert manifest["governance"]["pii_scrub"]["sft"]["entities"]["CREDIT_CARD"] >= 8


def test_near_duplicate_and_eval_overlap_removed_and_counted(store: Store, tmp_path: Path) -> None:
    evals = tmp_path / "evals" / "suite.jsonl"
    evals.parent.mkdir()
    evals.write_text(
        json.dumps({"prompt": "Explain the water cycle in three short sentences for a child."})
        + "\n"
    )
    store.ex("a", "How do I reset my password on the website?", "Use Forgot password.")
    store.ex("b", "how do I reset my password on the website please", "Use the reset link.")
    store.ex(
        "c",
        "Please explain the water cycle in three short sentences for a child, thanks",
        "Water evaporates, forms clouds and falls as rain.",
    )
    store.ex("d", "What is the largest file I can upload?", "50 GB.")
    for rid in "abcd":
        store.fb(rid, "rating", {"score": 5})
    res = run(cfg_for(store, tmp_path, str(evals)))
    m = json.loads(Path(res.manifest_path).read_text())
    ds = load(res)
    assert sorted(r["request_ids"][0] for r in ds["sft"]) == ["a", "d"]
    assert m["governance"]["dedup"]["dropped_sft"] == {"near_duplicate_prompt": 1}
    assert m["governance"]["decontamination"]["dropped"] == {"sft": 1, "dpo": 0, "kto": 1}
    assert list(m["governance"]["decontamination"]["dropped_by_eval_file"].values()) == [2]
    assert [(s["step"], s["sft"]) for s in m["governance"]["steps"]] == [
        ("ledger", 4),
        ("decontamination", 3),
        ("conflicts across windows", 3),
        ("answers of older releases", 3),
        ("selection", 3),
        ("dedup", 2),
        ("split", 2),
    ]


def test_short_prompt_inside_eval_item_is_contamination(store: Store, tmp_path: Path) -> None:
    evals = tmp_path / "evals" / "suite.jsonl"
    evals.parent.mkdir()
    evals.write_text(
        json.dumps(
            {"prompt": "What gas do plants absorb from the air for photosynthesis? Answer briefly."}
        )
        + "\n"
    )
    store.ex("a", "What gas do plants absorb from the air?", "Carbon dioxide.")
    store.ex("b", "What is the opposite of hot?", "Cold.")
    for rid in "ab":
        store.fb(rid, "rating", {"score": 5})
    res = run(cfg_for(store, tmp_path, str(evals)))
    assert [r["request_ids"] for r in load(res)["sft"]] == [["b"]]


def test_no_prompt_in_both_train_and_heldout(store: Store, tmp_path: Path, no_evals: str) -> None:
    topics = [
        "storage",
        "billing",
        "sharing",
        "offline",
        "security",
        "versions",
        "trash",
        "linux",
        "android",
        "support",
        "refunds",
        "uploads",
    ]
    for i, t in enumerate(topics):
        for j in range(2):  # the same prompt twice (one edited, one rated): both must go one way
            rid = store.ex(f"{t}{j}", f"Tell me about {t} in Nimbus.", f"Answer {j} about {t}.")
            store.fb(
                rid,
                "edit" if j else "rating",
                {"text": f"Short {t} answer {i}."} if j else {"score": 5},
            )
    res = run(cfg_for(store, tmp_path, no_evals, heldout_fraction=0.25))
    ds = load(res)
    train = {prompt_key(r["prompt"]) for s in ("sft", "dpo") for r in ds[s]}
    held = {prompt_key(r["prompt"]) for s in ("heldout_sft", "heldout_dpo") for r in ds[s]}
    assert held and train and not train & held
    assert res.counts["heldout_sft"] == 3  # round(0.25 * 12) clusters


def test_bad_jsonl_lines_skipped_with_line_numbers(tmp_path: Path, no_evals: str) -> None:
    good = {"messages": user("What is Nimbus?") + [{"role": "assistant", "content": "A drive."}]}
    req_resp = {
        "request": {"body": {"model": "m", "messages": user("Is it free?")}},
        "response": {
            "body": {
                "id": "chatcmpl-1",
                "choices": [{"message": {"role": "assistant", "content": "5 GB are free."}}],
            }
        },
        "feedback": [{"rating": {"thumbs": "up"}}],
    }
    lines = [
        json.dumps(good),
        "{not json",
        json.dumps({"messages": user("no answer")}),
        json.dumps(req_resp),
        json.dumps({"messages": [{"role": "wizard", "content": "x"}]}),
        json.dumps({**good, "id": "z", "feedback": [{"rating": {"score": 9}}]}),
    ]
    f = tmp_path / "mixed.jsonl"
    f.write_text("\n".join(lines) + "\n")
    cfg = DataConfig.model_validate(
        {
            "run_dir": str(tmp_path / "run"),
            "logstore": {"enabled": False},
            "jsonl": [str(f)],
            "governance": {"eval_globs": [no_evals], "heldout_fraction": 0},
            "ledger": {"path": str(tmp_path / "ledger"), "min_new_rows": 1},
        }
    )
    res = run(cfg)
    m = json.loads(Path(res.manifest_path).read_text())
    assert [(b["line"], b["reason"].split(":")[0]) for b in m["bad_lines"]] == [
        (2, "invalid JSON"),
        (3, "messages"),
        (5, "messages[0].role"),
        (6, "feedback[0].rating.score"),
    ]
    rows = load(res)["sft"].to_list()
    assert sorted((r["source"], r["request_ids"][0]) for r in rows) == [
        ("curated", "mixed.jsonl:1"),
        ("rating", "chatcmpl-1"),
    ]


def test_unreadable_jsonl_file_is_an_error(tmp_path: Path) -> None:
    f = tmp_path / "bad.jsonl"
    f.write_text("nope\n[1, 2]\n")
    cfg = DataConfig.model_validate({"logstore": {"enabled": False}, "jsonl": [str(f)]})
    with pytest.raises(
        DataError, match=r"bad.jsonl: no readable line \(2 bad; first: line 1: invalid JSON"
    ):
        run(cfg)


def test_same_inputs_are_skipped(store: Store, tmp_path: Path, no_evals: str) -> None:
    store.ex("a", "Q?", "A.")
    store.fb("a", "rating", {"score": 5}, role="simulated")  # the server's label
    store.ex("b", "R?", "B.")
    store.fb("b", "rating", {"score": 5}, comment="simulated user (seed=0)")  # a client's words
    cfg = cfg_for(store, tmp_path, no_evals)
    first = run(cfg)
    assert first.simulated_feedback == 1
    mtime = Path(first.manifest_path).stat().st_mtime_ns
    assert run(cfg) == first and Path(first.manifest_path).stat().st_mtime_ns == mtime
    card = Path(first.card_path).read_text()
    assert "simulated users" in card


def test_bad_config_names_the_field(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="governance.ngram"):
        load_config(DataConfig, None, ["governance.ngram=0"])
    with pytest.raises(ConfigError, match="since or last_hours"):
        load_config(
            DataConfig, None, ["logstore.since=2026-01-01T00:00:00Z", "logstore.last_hours=2"]
        )


def test_shipped_config_loads() -> None:
    cfg = load_config(DataConfig, REPO / "configs" / "data.yaml")
    assert cfg.governance.ngram >= 1
