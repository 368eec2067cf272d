"""The dataset ledger across windows, on a real SQLite log store: dedup, conflicts, older
releases, selection with replay, quiet windows, and resume of a window (no mocks)."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from ground.logstore import ExchangeRecord, LogStore
from training.data import DataConfig, run


class Windows:
    """A real log store plus the data stage run once per time window, like scheduled runs."""

    def __init__(self, tmp: Path, evals: str, **ledger) -> None:
        self.tmp = tmp
        self.url = f"sqlite:///{tmp / 'logs.db'}"
        self.db = LogStore(self.url)
        self.evals = evals
        self.ledger = {"path": str(tmp / "ledger"), "min_new_rows": 1, "trained_windows": [],
                       "current_releases": [], **ledger}
        self.start = datetime.now(UTC)
        self.n = 0
        self.cfgs: dict[str, DataConfig] = {}

    def ex(self, rid: str, prompt: str, answer: str, release: str = "r1") -> str:
        self.db.log_exchange(ExchangeRecord(
            id=rid, tenant="acme", messages=[{"role": "user", "content": prompt}],
            response=answer, release=release,
        ))
        self.db.flush()
        return rid

    def fb(self, rid: str, kind: str, payload: dict) -> str:
        return self.db.add_feedback(rid, "acme", kind, payload)[0]

    def close_window(self, **ledger):
        """Build the data stage on [last end, now) as window w<k>; returns its result."""
        time.sleep(0.02)
        until = datetime.now(UTC)
        self.n += 1
        name = f"w{self.n}"
        self.cfgs[name] = DataConfig.model_validate({
            "run_dir": str(self.tmp / "runs" / name),
            "logstore": {"url": self.url, "since": self.start.isoformat(), "until": until.isoformat()},
            "governance": {"eval_globs": [self.evals], "heldout_fraction": 0.0},
            # These tests are about windows; the trust rules have their own (tests/security).
            "trust": {"tenants": ["acme"], "min_agreeing_users": 1, "max_actor_share": 1.0},
            "ledger": {**self.ledger, **ledger},
        })
        self.start = until
        time.sleep(0.02)
        return run(self.cfgs[name])


@pytest.fixture
def windows(tmp_path: Path):
    evals = tmp_path / "evals" / "x.jsonl"
    evals.parent.mkdir()
    evals.write_text(json.dumps({"prompt": "zebra quantum accordion marmalade"}) + "\n")
    w = Windows(tmp_path, str(evals))
    yield w
    w.db.close()


def rows(result, split: str) -> list[dict]:
    from datasets import load_from_disk

    return load_from_disk(result.dataset_path)[split].to_list()


def manifest(result) -> dict:
    return json.loads(Path(result.manifest_path).read_text())


def test_all_windows_dedup_newest_first_and_manifest_lists_windows_and_rows(windows: Windows) -> None:
    for i in (1, 2, 3):
        windows.fb(windows.ex(f"a{i}", f"Plan question {i}?", "Dunno."), "edit", {"text": f"Plan {i}: old."})
    w1 = windows.close_window()
    windows.fb(windows.ex("b1", "Plan question 1?", "Maybe."), "edit", {"text": "Plan 1: new."})
    windows.fb(windows.ex("b4", "Plan question 4?", "Hmm."), "edit", {"text": "Plan 4: new."})
    w2 = windows.close_window()

    assert sorted(r["completion"][0]["content"] for r in rows(w1, "sft")) == [
        "Plan 1: old.", "Plan 2: old.", "Plan 3: old."]
    sft = {r["prompt"][0]["content"]: r for r in rows(w2, "sft")}
    # Window 2 trains on every window to date; the same prompt keeps its newest edit only.
    assert {p: r["completion"][0]["content"] for p, r in sft.items()} == {
        "Plan question 1?": "Plan 1: new.", "Plan question 2?": "Plan 2: old.",
        "Plan question 3?": "Plan 3: old.", "Plan question 4?": "Plan 4: new.",
    }
    assert sft["Plan question 1?"]["window"] == "w2" and sft["Plan question 2?"]["window"] == "w1"
    assert sft["Plan question 1?"]["releases"] == ["r1"]
    m = manifest(w2)
    assert m["governance"]["dedup"]["dropped_sft"] == {"same_prompt": 1}
    led = m["ledger"]
    assert [(w["id"], w["new"], w["in_splits"].get("sft", 0)) for w in led["windows"]] == [
        ("w1", True, 2), ("w2", True, 2)]
    assert led["train_windows"] == ["w1", "w2"]
    assert len(led["rows"]["sft"]) == 4 and len(set(led["rows"]["sft"])) == 4
    assert led["dataset_version"] == w2.dataset_version != w1.dataset_version
    # New examples: the feedback behind training rows of windows the live model has not learned
    # from (all of them here): a1 (its pair; its SFT row lost to the newer edit), a2, a3, b1, b4.
    assert w2.new_examples == 5
    assert "| w1 | 6 | yes | 5 |" in Path(w2.card_path).read_text()  # 3 SFT rows + 3 pairs recorded


@pytest.mark.parametrize("share", [0.0, 0.5])
def test_new_windows_with_replay(windows: Windows, share: float) -> None:
    for i in range(6):
        windows.fb(windows.ex(f"a{i}", f"Old topic {i}?", "Dunno."), "edit", {"text": f"Old {i}."})
    windows.close_window()
    for i in range(2):
        windows.fb(windows.ex(f"b{i}", f"New topic {i}?", "Dunno."), "edit", {"text": f"New {i}."})
    res = windows.close_window(windows="new", trained_windows=["w1"], replay_share=share)
    got = sorted(r["window"] for r in rows(res, "sft"))
    # share 0.5: as many rows replayed from w1 (a seeded sample) as w2 brings.
    assert got == (["w2", "w2"] if share == 0 else ["w1", "w1", "w2", "w2"])
    assert manifest(res)["governance"]["selection"]["replayed"]["sft"] == (0 if share == 0 else 2)
    assert res.new_examples == 2
    assert run(windows.cfgs["w2"]) == res  # a rerun draws the same sample (and is skipped)


def conflicting_windows(windows: Windows, rule: str):
    windows.fb(windows.ex("a", "Is there a free plan?", "Yes, 5 GB."), "rating", {"score": 5})
    x = windows.ex("x", "Which is faster?", "Plan A.")
    y = windows.ex("y", "Which is faster?", "Plan B.")
    windows.fb(x, "preference", {"other_request_id": y, "preferred": "this"})
    w1 = windows.close_window(conflicts=rule)
    # A later window judges the same answers the other way.
    windows.fb(windows.ex("b", "Is there a free plan?", "Yes, 5 GB."), "rating", {"score": 1})
    x2 = windows.ex("x2", "Which is faster?", "Plan A.")
    y2 = windows.ex("y2", "Which is faster?", "Plan B.")
    windows.fb(y2, "preference", {"other_request_id": x2, "preferred": "this"})
    windows.fb(windows.ex("c", "Unrelated?", "Fine."), "rating", {"score": 5})
    return w1, windows.close_window(conflicts=rule)


def test_conflicts_across_windows_newest_wins(windows: Windows) -> None:
    w1, w2 = conflicting_windows(windows, "newest_wins")
    assert [r["request_ids"] for r in rows(w1, "sft")] == [["a"]]
    assert [r["request_ids"] for r in rows(w2, "sft")] == [["c"]]
    assert sorted((r["request_ids"][0], r["label"]) for r in rows(w2, "kto")) == [
        ("b", False), ("c", True)]
    assert [(r["chosen"][0]["content"], r["window"]) for r in rows(w2, "dpo")] == [("Plan B.", "w2")]
    # Three answers judged both ways: "Yes, 5 GB.", "Plan A.", "Plan B."; w1's SFT + KTO rows
    # for "Yes, 5 GB." and its pair lose to the newer window.
    assert manifest(w2)["governance"]["conflicts_across_windows"] == {
        "answers_in_conflict": 3, "rows_dropped": 3}


def test_conflicts_across_windows_drop_both(windows: Windows) -> None:
    _, w2 = conflicting_windows(windows, "drop_both")
    kept = {(s, r["request_ids"][0]) for s in ("sft", "dpo", "kto") for r in rows(w2, s)}
    assert kept == {("sft", "c"), ("kto", "c")}
    assert manifest(w2)["governance"]["conflicts_across_windows"]["rows_dropped"] == 5


@pytest.mark.parametrize("policy", ["keep", "downweight", "drop"])
def test_answers_of_older_releases(windows: Windows, policy: str) -> None:
    older = {f"q{i}" for i in range(20) if i % 2}
    for i in range(20):
        rid = windows.ex(f"q{i}", f"Question {i}?", "Unclear.", release="old" if f"q{i}" in older else "r1")
        windows.fb(rid, "edit", {"text": f"Answer {i}."})
    res = windows.close_window(older_release=policy, older_release_weight=0.5, current_releases=["r1"])
    got = {r["request_ids"][0] for r in rows(res, "sft")}
    current = {f"q{i}" for i in range(20)} - older
    if policy == "keep":
        assert got == current | older
    elif policy == "drop":
        assert got == current
    else:  # a seeded half of the older rows, the same ones on every run
        assert got >= current and 0 < len(got & older) < len(older)
    report = manifest(res)["governance"]["older_releases"]
    assert report["older"] == 20  # 10 SFT rows + 10 pairs answered by release "old"
    assert report.get("dropped", 0) == {"keep": 0, "drop": 20}.get(policy, report.get("dropped"))


def test_quiet_windows_accumulate_and_resume_is_stable(windows: Windows) -> None:
    windows.fb(windows.ex("a", "First?", "Eh."), "edit", {"text": "First answer."})
    quiet = windows.close_window(min_new_rows=3)
    assert quiet.skip_reason == (
        "skipped: not enough new feedback (1 new examples in 1 window(s) the live model has not "
        "learned from; ledger.min_new_rows is 3)"
    )
    assert quiet.dataset_path == ""
    windows.fb(windows.ex("b", "Second?", "Eh."), "edit", {"text": "Second answer."})
    windows.fb(windows.ex("c", "Third?", "Eh."), "rating", {"score": 5})
    enough = windows.close_window(min_new_rows=3)
    assert enough.skip_reason is None and enough.new_examples == 3
    assert sorted(r["window"] for r in rows(enough, "sft")) == ["w1", "w2", "w2"]
    # Once the live model has learned from both windows, an empty third one is quiet.
    empty = windows.close_window(min_new_rows=3, trained_windows=["w1", "w2"])
    assert empty.skip_reason.startswith("skipped: not enough new feedback (0 new examples")
    # Resume: rerunning window 2 after window 3 was recorded reuses its result (the mix of a
    # window holds only the windows up to its own end).
    result_file = Path(enough.stage_path) / "result.json"
    mtime = result_file.stat().st_mtime_ns
    assert run(windows.cfgs["w2"]) == enough and result_file.stat().st_mtime_ns == mtime
