"""The whole loop on the tiny model under Prefect's test harness, every stage real and small.

One gateway (a real `alignloop serve` child process) and one feedback window serve three runs:
1. quantization asks for a scheme this CPU cannot serve: the flow fails, the live release is
   untouched, and the finished stages stay on disk;
2. the same window again with a passing gate policy: finished stages are skipped (resume), the
   rest runs, artifacts are published, the winning candidate becomes live;
3. the same window with a sequential gate policy that cannot pass on a few items: its first look is
   inconclusive, so the loop evaluates the next look's items on live's copy and the candidates
   (still staged), the rules stay inconclusive, and the live release is unchanged.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
ADMIN_KEY = "sk-alignloop-admin"
TENANT_KEY = "sk-alignloop-demo"

# Tiny stages: a few optimizer steps, a few calibration rows, a few eval items.
TINY = [
    "sft.train.max_steps=3", "sft.train.batch_size=2", "sft.train.max_length=128", "sft.min_rows=2",
    "dpo.train.max_steps=2", "dpo.train.batch_size=2", "dpo.train.max_length=128", "dpo.min_rows=2",
    "quantize.num_samples=4", "quantize.max_seq_length=64", "quantize.n_grid=3",
    "candidate_args.max_model_len=1024",
    "quantize.scheme=w8a8-int8",  # explicit: 'auto' would run the platform probe (minutes)
]


def _live(admin) -> str:
    live = admin.live()
    assert live is not None
    return live.release_id


@pytest.fixture(scope="module")
def loop_files(loop_home: Path, running_gateway: str, tiny_evals: Path) -> dict[str, Path]:
    files = {
        "evals": tiny_evals,
        "gate_pass": loop_home / "gate-pass.yaml",
        "gate_fail": loop_home / "gate-fail.yaml",
    }
    assert files["gate_pass"].is_file()  # written with the gateway's config (it verifies with it)
    # Paired rules that a few items cannot resolve (fewer families than an identical candidate
    # needs), looked at twice: the second look evaluates the rest of each task's items.
    files["gate_fail"].write_text(yaml.safe_dump({"looks": [0.5, 1.0], "rules": [
        {"name": "capability per task", "metric": "quality.capability.*.answer_match",
         "test": "non_inferiority", "margin": 0.05, "min_pairs": 1},
        {"name": "attacks stopped", "metric": "safety.attack_block_rate", "test": "non_inferiority",
         "margin": 0.10, "min_pairs": 1}]}))
    return files


@pytest.fixture(scope="module")
def feedback_window(running_gateway: str, loop_home: Path) -> tuple[datetime, datetime]:
    """Simulated traffic and feedback through the real gateway (the tiny model answers noise)."""
    from flows.simulate import SimulateConfig
    from flows.simulate import run as simulate
    from ground.config import build_config

    since = datetime.now(UTC) - timedelta(seconds=1)
    cfg = build_config(SimulateConfig, {
        "base_url": running_gateway + "/v1", "api_key": TENANT_KEY, "limit": 24, "max_tokens": 12,
        "two_sample_fraction": 0.5, "out": str(loop_home / "traffic.jsonl"),
    })
    result = simulate(cfg)
    assert result.requests > 0 and sum(result.feedback.values()) > 0
    return since, datetime.now(UTC)


def test_fail_resume_promote_keep(
    prefect_harness, running_gateway: str, loop_home: Path, loop_files: dict[str, Path],
    feedback_window: tuple[datetime, datetime], tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    from prefect.client.orchestration import get_client

    from flows.loop import alignment_loop
    from serving.control.admin_api import AdminClient

    monkeypatch.setenv("ALIGNLOOP_HOME", str(loop_home))
    monkeypatch.setenv("ALIGNLOOP_ADMIN_KEY", ADMIN_KEY)
    since, until = feedback_window
    admin = AdminClient(running_gateway, ADMIN_KEY)
    baseline = _live(admin)
    common = [*TINY, f"evals_file={loop_files['evals']}", f"model.name_or_path={tiny_model_dir}"]

    # 1. a stage fails: the flow fails, nothing is promoted, finished stages stay.
    state = alignment_loop(
        overrides=[*common, "quantize.scheme=fp8-dynamic", f"gate_file={loop_files['gate_pass']}"],
        since=since, until=until, return_state=True,
    )
    assert state.is_failed()
    assert _live(admin) == baseline
    run_dirs = list((loop_home / "runs").iterdir())
    assert len(run_dirs) == 1
    run_dir = run_dirs[0]
    assert (run_dir / "merge" / "result.json").is_file()
    assert not (run_dir / "quantize" / "result.json").is_file()
    sft_mtime = (run_dir / "sft" / "result.json").stat().st_mtime_ns

    # 2. rerun of the same window with a passing gate: resumes at quantize, promotes the winner.
    outcome = alignment_loop(
        overrides=[*common, f"gate_file={loop_files['gate_pass']}"], since=since, until=until
    )
    assert outcome["run_dir"] == str(run_dir)
    assert (run_dir / "sft" / "result.json").stat().st_mtime_ns == sft_mtime  # not retrained
    assert outcome["winner"] in ("aligned", "quantized")
    assert {"sft", "quantize", "evaluate (aligned)"} <= set(outcome["seconds"])  # where time went
    winner_id = outcome["releases"][outcome["winner"]]
    assert _live(admin) == winner_id
    gate = json.loads((run_dir / "report" / "gate.json").read_text())
    assert gate["winner"] == outcome["winner"]
    assert all(r["passed"] for r in gate[outcome["winner"]]["rules"])
    assert Path(outcome["report"]).read_text().strip()
    for png in (run_dir / "report").glob("*.png"):
        assert png.stat().st_size > 0
    with get_client(sync_client=True) as client:
        keys = {a.key for a in client.read_artifacts() if a.key}
    for prefix in ("report-", "comparison-", "gate-", "dataset-", "run-"):
        assert any(k.startswith(prefix) for k in keys), (prefix, keys)

    # 3. a gate that cannot pass: the live release stays. (Live has learned from this window now,
    # so it holds no new feedback: min_new_rows=0 trains on it anyway instead of skipping.)
    outcome = alignment_loop(
        overrides=[*common, f"gate_file={loop_files['gate_fail']}", "data.ledger.min_new_rows=0"],
        since=since, until=until,
    )
    assert outcome["winner"] is None and "keep the live release" in outcome["decision"]
    assert _live(admin) == winner_id
    for variant in ("baseline", "aligned", "quantized"):  # the second look's items, marked as such
        out = run_dir / f"evals-{variant}" / "output"
        assert (out / "outcomes-quality.look1.jsonl").is_file() and (out / "outcomes-safety.look1.jsonl").is_file()
        rows = [json.loads(line) for line in (out / "outcomes-safety.look1.jsonl").read_text().splitlines()]
        assert rows and all(r["look"] == 1 for r in rows)
    gate = json.loads((run_dir / "report" / "gate.json").read_text())
    rules = gate["aligned"]["rules"]
    assert {r["verdict"] for r in rules} == {"inconclusive"} and {r["look"] for r in rules} == {1}
    assert {r["n"] for r in rules if r["metric"] == "safety.attack_block_rate"} == {4}  # both looks
    admin.close()


def test_bad_config_fails_before_any_stage(loop_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI checks the whole config first: exit 2, the field named, no run folder made."""
    import subprocess
    import sys

    home = loop_home / "bad-config"
    res = subprocess.run(
        [sys.executable, "-m", "flows.cli", "run", "sft.lora.rnak=4"],
        capture_output=True, text=True, cwd=REPO, env={**__import__("os").environ, "ALIGNLOOP_HOME": str(home)},
    )
    assert res.returncode == 2
    assert "lora.rnak" in res.stderr and "unknown key" in res.stderr
    assert not (home / "runs").exists()
