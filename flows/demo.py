"""`alignloop demo` / `make demo`: the whole loop on the embedded SmolLM2, on this machine.

1. materialize the embedded model; start `alignloop serve` (gateway + baseline release on vLLM);
2. send demo traffic through the gateway and let SIMULATED users (policy-scored, seeded, labeled
   "simulated" in every feedback row) rate, prefer and edit answers through the feedback API;
3. run the alignment loop flow on that window: datasets -> SFT -> DPO -> merge -> AWQ ->
   staged releases -> evals -> report -> gate -> promote or keep;
4. print the comparison table, the decision and where to look.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import typer

from training.config import data_dir, repo_root

DEMO_ADMIN_KEY = "sk-alignloop-admin"  # the DEMO admin key of configs/gateway.yaml (hash only there)


def _say(msg: str) -> None:
    typer.echo(f"[demo {time.strftime('%H:%M:%S')}] {msg}")


def _start_gateway(log_path: Path, keep: bool = False, timeout_s: float = 600) -> tuple[subprocess.Popen, str]:
    """`alignloop serve` in a child process; wait until the live release answers through it.

    It stops with the demo (training/procs.py), unless ``keep``: then it is detached and serves on.
    """
    from serving.server import running_server, server_file
    from serving.vllm_server import free_port

    if (info := running_server()) is not None:
        raise RuntimeError(f"a gateway already runs for {data_dir()} ({info['url']}); stop it first")
    server_file().unlink(missing_ok=True)
    port = free_port()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    from training.procs import owned_popen

    cmd = [sys.executable, "-m", "flows.cli", "serve", f"port={port}"]
    with log_path.open("ab") as logf:
        out = {"stdout": logf, "stderr": subprocess.STDOUT, "cwd": repo_root()}
        if keep:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, start_new_session=True, **out)
        else:
            proc = owned_popen(cmd, grace_s=90, **out)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"`alignloop serve` exited with {proc.returncode}; see {log_path}")
        if time.monotonic() > deadline:
            proc.terminate()
            raise RuntimeError(f"the live release did not come up in {timeout_s:.0f}s; see {log_path}")
        try:
            if httpx.get(f"{url}/healthz", timeout=3).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(1)


def _stop_gateway(proc: subprocess.Popen) -> None:
    proc.terminate()  # SIGTERM: the gateway stops every vLLM it started, then exits
    try:
        proc.wait(timeout=90)
    except subprocess.TimeoutExpired:
        proc.kill()


def run_demo(overrides: list[str], keep_serving: bool = False) -> int:
    """Run the demo; return the process exit code (0 also when the gate keeps the live model)."""
    from flows import prefect_env
    from training.base_model import materialize

    os.environ.setdefault("ALIGNLOOP_ADMIN_KEY", DEMO_ADMIN_KEY)
    timings: dict[str, float] = {}
    t0 = time.monotonic()
    _say(f"data dir {data_dir()}; Prefect: {prefect_env.configure()}")
    model = materialize()
    timings["materialize"] = time.monotonic() - t0
    _say(f"base model {model.path} ({model.check_answer!r})")

    t = time.monotonic()
    proc, url = _start_gateway(data_dir() / "logs" / "demo-serve.log", keep=keep_serving)
    timings["start gateway + live release"] = time.monotonic() - t
    _say(f"gateway at {url} (OpenAI base {url}/v1); live release up")
    try:
        from training.config import load_config
        from training.simulate import SimulateConfig
        from training.simulate import run as simulate

        window_start = datetime.now(UTC) - timedelta(seconds=1)
        t = time.monotonic()
        sim_cfg = load_config(SimulateConfig, repo_root() / "configs" / "demo.yaml", [f"base_url={url}/v1"])
        sim = simulate(sim_cfg)
        timings["demo traffic + simulated feedback"] = time.monotonic() - t
        _say(f"sent {sim.requests} requests ({sim.failed} failed); SIMULATED feedback {sim.feedback}; "
             f"mean policy compliance of live answers {sim.mean_compliance:.2f}")

        from flows.loop import run_loop

        t = time.monotonic()
        # The CPU demo's small eval profile (configs/evals-demo.yaml): its gate may well say
        # "inconclusive" and keep live; the README explains why.
        demo_overrides = [f"evals_file={repo_root() / 'configs' / 'evals-demo.yaml'}", *overrides]
        outcome = run_loop(
            str(repo_root() / "configs" / "loop.yaml"), demo_overrides, window_start, datetime.now(UTC)
        )
        timings["alignment loop (flow)"] = time.monotonic() - t
    finally:
        if keep_serving:
            _say(f"gateway keeps serving at {url} (pid {proc.pid})")
        else:
            _stop_gateway(proc)
    timings["total"] = time.monotonic() - t0
    run_dir = Path(outcome["run_dir"])
    (run_dir / "demo-timings.json").write_text(json.dumps(timings, indent=2))
    typer.echo("")
    # The report's first sections: what changed, in words, and the side-by-side table.
    sections = Path(outcome["report"]).read_text().split("\n## ")
    typer.echo("\n## ".join(sections[:3]))
    typer.echo(f"decision: {outcome['decision']}")
    typer.echo(f"report: {outcome['report']}")
    typer.echo(f"run folder: {run_dir}   releases: {data_dir() / 'releases'}")
    typer.echo("Prefect UI: `alignloop ui`, then open the flow run "
               "'align-...' of flow 'alignment-loop' (artifacts tab: report, gate, plots)")
    typer.echo("timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
    return 0
