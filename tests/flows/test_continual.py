"""The continual loop over several windows on the tiny model, under Prefect's test harness.

One gateway (a real `alignloop serve` child process), every stage real and small:
1. window A (simulated traffic): trained from the live release (the tiny base), promoted;
2. window B (no traffic): skipped as "not enough new feedback", live untouched, the window moves on;
3. window C (new traffic): continues from A's weights on new windows only (SFT -> DPO -> KTO); the
   first attempt fails at the merge and a run with no window given resumes it, skipping the
   finished stages; the lineage reads C <- A <- base;
4. a candidate whose stored per-item results lose more than a non-inferiority margin against the
   live release is refused by the release manager, and passes under a wider margin.
"""

from __future__ import annotations

import json
import shutil
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ADMIN_KEY = "sk-alignloop-admin"
TENANT_KEY = "sk-alignloop-demo"
TINY = [
    "sft.train.max_steps=3", "sft.train.batch_size=2", "sft.train.max_length=128", "sft.min_rows=2",
    "dpo.train.max_steps=2", "dpo.train.batch_size=2", "dpo.train.max_length=128", "dpo.min_rows=2",
    "kto.train.max_steps=2", "kto.train.batch_size=2", "kto.train.max_length=128", "kto.min_rows=2",
    "candidates=[aligned]", "candidate_args.max_model_len=1024", "data.ledger.min_new_rows=4",
    "start_from=live",
]


def traffic(url: str, home: Path, seed: int) -> None:
    """Simulated users through the real gateway (the tiny model answers noise, so most get edits)."""
    from flows.simulate import SimulateConfig
    from flows.simulate import run as simulate
    from ground.config import build_config

    result = simulate(build_config(SimulateConfig, {
        "base_url": url + "/v1", "api_key": TENANT_KEY, "limit": 16, "max_tokens": 12, "seed": seed,
        "two_sample_fraction": 0.5, "out": str(home / f"traffic-{seed}.jsonl"),
    }))
    assert result.requests > 0 and sum(result.feedback.values()) > 0
    # Windows end on whole seconds: wait for this second to close so the next window's end is
    # after the last feedback event (events in the current second belong to the window after).
    time.sleep(1.05 - time.time() % 1)


def read(path: Path) -> dict:
    return json.loads(path.read_text())


def outcomes(folder: Path, live_right: list[bool]) -> None:
    """Per-item results of one synthetic capability task (200 items), as the eval suites store them."""
    from evals.gate import write_outcomes

    write_outcomes(folder / "output" / "outcomes-synthetic.jsonl", [
        {"metric": "quality.capability.synthetic.answer_match", "id": f"q{i}", "value": float(ok)}
        for i, ok in enumerate(live_right)
    ])


def test_windows_quiet_resume_lineage_and_margin(
    prefect_harness, running_gateway: str, loop_home: Path, tiny_evals: Path, tiny_model_dir: Path,
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    from prefect.client.orchestration import get_client
    from typer.testing import CliRunner

    from flows import window as windows
    from flows.cli_serving import release_app
    from flows.loop import alignment_loop
    from serving.control.admin_api import AdminClient
    from serving.releases.records import ReleaseError
    from serving.releases.store import ReleaseStore

    monkeypatch.setenv("ALIGNLOOP_HOME", str(loop_home))
    monkeypatch.setenv("ALIGNLOOP_ADMIN_KEY", ADMIN_KEY)
    admin = AdminClient(running_gateway, ADMIN_KEY)
    common = [*TINY, f"evals_file={tiny_evals}", f"model.name_or_path={tiny_model_dir}",
              f"gate_file={loop_home / 'gate-pass.yaml'}"]

    # 1. Window A: trained from live (the tiny base, no earlier run), promoted.
    a0 = datetime.now(UTC) - timedelta(seconds=1)
    traffic(running_gateway, loop_home, seed=0)
    out_a = alignment_loop(overrides=common, since=a0, until=datetime.now(UTC))
    run_a = Path(out_a["run_dir"])
    assert out_a["winner"] == "aligned" and admin.live().release_id == out_a["releases"]["aligned"]
    assert out_a["start"].startswith("continue from live release") and "0 earlier runs" in out_a["start"]
    model_a = read(run_a / "merge" / "result.json")["model_dir"]

    # 2. Window B, nothing new: skipped, live untouched, the next window starts after it.
    out_b = alignment_loop(overrides=common)
    run_b = Path(out_b["run_dir"])
    assert out_b["skipped"] and out_b["decision"].startswith("skipped: not enough new feedback (0 new")
    assert admin.live().release_id == out_a["releases"]["aligned"]
    assert not (run_b / "sft").exists() and read(run_b / "data" / "result.json")["dataset_path"] == ""
    assert read(windows.state_file())["last_until"] == out_b["window"][1].replace(" ", "T")
    assert "pending" not in read(windows.state_file())

    # 3. Window C: the first attempt fails at the merge; a run with no window given resumes it.
    traffic(running_gateway, loop_home, seed=1)
    c_args = [*common, "preference_objective=dpo+kto"]
    state = alignment_loop(overrides=[*c_args, "merge.tolerance=1e-30"], return_state=True)
    assert state.is_failed()
    assert admin.live().release_id == out_a["releases"]["aligned"]
    run_c = max((loop_home / "runs").iterdir(), key=lambda p: p.stat().st_mtime)
    assert run_c.name not in (run_a.name, run_b.name) and (run_c / "dpo" / "result.json").is_file()
    assert not (run_c / "merge" / "result.json").is_file()
    sft_mtime = (run_c / "sft" / "result.json").stat().st_mtime_ns
    out_c = alignment_loop(overrides=c_args)
    assert out_c["run_dir"] == str(run_c)  # the pending window, resumed
    assert (run_c / "sft" / "result.json").stat().st_mtime_ns == sft_mtime  # not retrained
    assert read(run_c / "sft" / "result.json")["base_model"] == model_a  # continued from A's weights
    merged_c = read(run_c / "merge" / "result.json")
    counts = read(run_c / "data" / "result.json")["counts"]
    assert [Path(a).parent.parent.name for a in merged_c["adapters"]] == (
        ["sft", "dpo", "kto"] if counts["kto"] >= 2 else ["sft", "dpo"])
    ledger = read(run_c / "data" / "output" / "manifest.json")["ledger"]
    assert [(w["id"], w["new"]) for w in ledger["windows"]] == [
        (run_a.name, False), (run_b.name, True), (run_c.name, True)]
    assert ledger["train_windows"] == [run_c.name]  # new windows only: A is in live's lineage
    assert out_c["winner"] == "aligned" and admin.live().release_id == out_c["releases"]["aligned"]

    listing = CliRunner().invoke(release_app, ["list", "--admin-key", ADMIN_KEY])
    assert listing.exit_code == 0, listing.output
    assert f"lineage: {run_c.name} (" in listing.output and f"<- {run_a.name} (" in listing.output
    assert f"<- base {tiny_model_dir.resolve()}" in listing.output
    with get_client(sync_client=True) as client:
        arts = [a for a in client.read_artifacts() if a.key]
    keys = {a.key for a in arts}
    assert any(k.startswith("skipped-") for k in keys) and any(k.startswith("lineage-") for k in keys)
    trend = max((a for a in arts if a.key == "continual-trend"), key=lambda a: a.created).data
    trend = json.loads(trend) if isinstance(trend, str) else trend
    assert [r["window"] for r in trend] == [run_a.name, run_b.name, run_c.name]

    # 4. A promotion that would lower a gated metric past its margin is refused. The stored
    # results of window C, copied into a data dir where A's model is live, plus one capability
    # task: live right on 160 of 200 items, the candidate on 120 (20 points worse).
    home = tmp_path / "verify"
    store = ReleaseStore(home / "releases")
    live = store.create(model_a, admin.get(out_a["releases"]["aligned"]).args())
    store.set_status(live.release_id, "live", "window A")
    cand = store.create(merged_c["model_dir"], live.args())
    store.set_status(cand.release_id, "staged", "window C")
    run = home / "runs" / run_c.name
    shutil.copytree(run_c / "evals-baseline", run / "evals-baseline")
    shutil.copytree(run_c / "evals-aligned", run / "evals-aligned")
    meta = read(run / "evals-aligned" / "result.json")
    (run / "evals-aligned" / "result.json").write_text(json.dumps({**meta, "release_id": cand.release_id}))
    outcomes(run / "evals-baseline", [i % 5 != 0 for i in range(200)])
    outcomes(run / "evals-aligned", [i % 5 != 0 and i % 4 != 1 for i in range(200)])
    store.attach_eval(cand.release_id, {"run_dir": str(run), "variant": "aligned"})
    rule = {"name": "capability", "metric": "quality.capability.synthetic.answer_match",
            "test": "non_inferiority", "margin": 0.05}
    strict, wide = home / "strict.yaml", home / "wide.yaml"
    strict.write_text(yaml.safe_dump({"rules": [rule]}))
    wide.write_text(yaml.safe_dump({"rules": [{**rule, "margin": 0.30}]}))
    from evals.gate import GateConfig, evaluate_stage_dirs
    from ground.config import load_config

    (verdict,) = evaluate_stage_dirs(load_config(GateConfig, strict), run / "evals-aligned",
                                     run / "evals-baseline").outcomes
    assert verdict.diff == pytest.approx(-0.20) and verdict.high < -0.05  # surely worse than the margin
    with pytest.raises(ReleaseError, match=r"says fail \(capability\)"):
        store.promote_offline(cand.release_id, gate_file=strict)
    assert store.live().release_id == live.release_id
    assert store.promote_offline(cand.release_id, gate_file=wide).status == "live"
    admin.close()
