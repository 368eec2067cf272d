"""No process outlives the alignloop command that started it: each long-running command is killed
(SIGTERM as `timeout` and a cancelled Prefect run send it, SIGINT as Ctrl-C, SIGKILL) at the point
where it has started a vLLM server or training processes, and then every process it started is
counted, wherever it was reparented (the ALIGNLOOP_TEST_TAG in their environment).

Real commands, real vLLM and real training on the tiny model; each case stops early, so the
whole file takes about a minute or two.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.integration]

REPO = Path(__file__).resolve().parents[2]
VLLM = "vllm.entrypoints.openai.api_server"  # vLLM's API server has started
ENGINE = "spawn_main"  # ... and has spawned its engine core process
TRAINER = "-m training.sft --config"  # the training process itself (below accelerate launch)
LAUNCHERS = ("procs.py", "accelerate.commands.launch")  # their command lines name the others


@pytest.fixture
def home(tmp_path: Path, embedded_model_dir: Path, tiny_model_dir: Path) -> Path:
    """A fresh data dir whose embedded model is the one already materialized for the tests."""
    home = tmp_path / "home"
    (home / "models").mkdir(parents=True)
    (home / "models" / "base").symlink_to(embedded_model_dir, target_is_directory=True)
    return home


def _configs(home: Path, tiny_model_dir: Path) -> dict[str, Path]:
    from datasets import Dataset, DatasetDict

    from serving.engine.vllm_server import free_port

    rows = [{"prompt": [{"role": "user", "content": f"Question {i}?"}],
             "completion": [{"role": "assistant", "content": f"Answer {i}, with some more words."}]}
            for i in range(16)]
    dataset = home / "dataset"
    DatasetDict(sft=Dataset.from_list(rows)).save_to_disk(str(dataset))
    serve = home / "serve.yaml"
    serve.write_text(yaml.safe_dump({
        "port": free_port(), "gateway_file": str(REPO / "configs" / "gateway.yaml"), "log_level": "warning",
        "releases": {"initial_model": str(tiny_model_dir),
                     "default_args": {"max_model_len": 512, "kv_cache_gib": 1}},
    }))
    sft = home / "sft.yaml"
    sft.write_text(yaml.safe_dump({
        "model": {"name_or_path": str(tiny_model_dir)}, "dataset_path": str(dataset),
        "heldout_split": None, "run_dir": str(home / "run"), "launch": {"launcher": "accelerate"},
        "train": {"max_steps": 200, "batch_size": 4, "max_length": 128}, "lora": {"rank": 4, "alpha": 8},
    }))
    return {"serve": serve, "sft": sft}


CASES = [
    # (id, command, what must be running when the signal comes, signal)
    ("doctor-vllm-SIGTERM", "doctor", VLLM, signal.SIGTERM),  # the reported bug
    ("doctor-engine-SIGTERM", "doctor", ENGINE, signal.SIGTERM),
    ("doctor-vllm-SIGINT", "doctor", VLLM, signal.SIGINT),
    ("doctor-vllm-SIGKILL", "doctor", VLLM, signal.SIGKILL),
    ("serve-vllm-SIGKILL", "serve", VLLM, signal.SIGKILL),
    ("sft-training-SIGTERM", "sft", TRAINER, signal.SIGTERM),
    ("sft-training-SIGKILL", "sft", TRAINER, signal.SIGKILL),
    ("demo-vllm-SIGKILL", "demo", VLLM, signal.SIGKILL),  # demo -> its `alignloop serve` -> vLLM
]


@pytest.mark.parametrize(("command", "running", "sig"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_killed_command_leaves_no_process(
    command: str, running: str, sig: signal.Signals, home: Path, tiny_model_dir: Path, proc_tag,
) -> None:
    files = _configs(home, tiny_model_dir)
    argv = {
        "doctor": ["doctor"],
        "serve": ["serve", "--config", str(files["serve"])],
        "sft": ["sft", "--config", str(files["sft"])],
        "demo": ["demo"],
    }[command]
    env = {**os.environ, "ALIGNLOOP_HOME": str(home), "ALIGNLOOP_FORCE_CPU": "1"}
    log = home / f"{command}.log"
    with log.open("wb") as out:
        owner = subprocess.Popen([sys.executable, "-m", "flows.cli", *argv], cwd=REPO, env=env,
                                 stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while not any(running in c and not any(x in c for x in LAUNCHERS) for c in proc_tag.cmdlines()):
            assert owner.poll() is None, f"{command} ended before {running} started:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"{running} did not start:\n{log.read_text()[-3000:]}"
            time.sleep(0.2)
        time.sleep(1)  # into vLLM's start-up / the first training steps
        before = len(proc_tag.pids())
        owner.send_signal(sig)
        owner.wait(timeout=90)
    finally:
        if owner.poll() is None:
            owner.kill()
    assert before >= 3  # the command, a watchdog, the server/trainer (and its own children)
    left = proc_tag(45)
    assert left == [], f"{len(left)} process(es) outlived `alignloop {command}` ({sig.name}): {proc_tag.cmdlines()}"
