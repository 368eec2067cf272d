"""Flow fixtures: Prefect's test harness, and a real `alignloop serve` with the tiny model live."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
ADMIN_KEY = "sk-alignloop-admin"  # the demo keys of configs/gateway.yaml
TENANT_KEY = "sk-alignloop-demo"


@pytest.fixture(scope="session")
def prefect_harness():
    """A temporary Prefect API + database for the session (Prefect's own test harness)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=300):
        yield


@pytest.fixture(scope="module")
def loop_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("loop-home")
    return home


def _small_jsonl(src: Path, dst: Path, n: int) -> str:
    dst.write_text("".join(src.read_text().splitlines(keepends=True)[:n]))
    return str(dst)


@pytest.fixture(scope="module")
def tiny_evals(loop_home: Path) -> Path:
    """An evals config with a few items per task (the loop tests' eval stages take seconds)."""
    tasks = REPO / "evals" / "tasks" / "safety"
    evals = {
        "quality": {"limit": 2, "num_concurrent": 2, "max_gen_toks": 8, "preference_limit": 3},
        "safety": {
            "max_tokens": 8, "num_concurrent": 2,
            "attacks_file": _small_jsonl(tasks / "attacks.jsonl", loop_home / "attacks.jsonl", 4),
            "benign_file": _small_jsonl(tasks / "benign.jsonl", loop_home / "benign.jsonl", 4),
        },
        "perf": {"concurrency": [], "requests_per_level": 4, "repeats": 2, "input_len": 16, "output_len": 4,
                 "realistic_prompts": None, "realistic_num_prompts": 2},
    }
    path = loop_home / "evals.yaml"
    path.write_text(yaml.safe_dump(evals))
    return path


@pytest.fixture(scope="module")
def running_gateway(loop_home: Path, tiny_model_dir: Path):
    """`alignloop serve` as a child process, with the tiny model as the initial live release."""
    from serving.engine.vllm_server import free_port

    port = free_port()
    # The gateway verifies promotions with this policy (the loop test's passing gate).
    gate_pass = loop_home / "gate-pass.yaml"
    gate_pass.write_text(yaml.safe_dump(
        {"rules": [{"name": "no failed requests", "metric": "perf.failed", "op": "==", "value": 0}]}
    ))
    serve_cfg = {
        "port": port,
        "gateway_file": str(REPO / "configs" / "gateway.yaml"),
        "log_level": "warning",
        "releases": {
            "grace_s": 5,
            "initial_model": str(tiny_model_dir),
            "default_args": {"max_model_len": 1024, "kv_cache_gib": 1},
            "gate_file": str(gate_pass),
        },
    }
    cfg_path = loop_home / "serve.yaml"
    cfg_path.write_text(yaml.safe_dump(serve_cfg))
    env = {**os.environ, "ALIGNLOOP_HOME": str(loop_home)}
    log = (loop_home / "serve.log").open("ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "serve", "--config", str(cfg_path)],
        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while True:
        assert proc.poll() is None, (loop_home / "serve.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "gateway did not come up"
        try:
            if httpx.get(f"{url}/healthz", timeout=3).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(1)
    yield url
    proc.terminate()
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
