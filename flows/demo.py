"""`alignloop demo` / `make demo`: the whole loop on the embedded SmolLM2, on this machine.

1. materialize the embedded model; start `alignloop serve` (gateway + baseline release on vLLM);
2. send demo traffic through the gateway and let SIMULATED users (policy-scored, seeded, labeled
   "simulated" in every feedback row) rate, prefer and edit answers through the feedback API;
3. run the alignment loop flow on that window: datasets -> SFT -> DPO -> merge -> AWQ ->
   staged releases -> evals -> report -> gate -> promote or keep;
4. print the comparison table, the decision and where to look.

``--windows N`` repeats 2-3 N times against the same gateway, as N scheduled runs would: window
k's traffic uses seed k, its users judge whatever release is live by then, and each run builds
on the ledger of every earlier window. The per-window table (decision, dataset version, the gate's
metrics vs live) is printed and written to ``<data dir>/demo-windows.md``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import typer

from flows import prefect_env
from flows.simulate import SimulateConfig
from flows.simulate import run as simulate
from flows.window import trend_rows, window_summary
from ground.config import data_dir, load_config, repo_root
from ground.platform import cached, detect
from ground.procs import owned_popen
from serving.control.server import ServeConfig, running_server, server_file
from serving.engine.vllm_server import free_port
from serving.gateway.config import DEMO_REVIEWER_KEY
from serving.releases.store import live_lineage
from training.base_model import is_current, materialize
from training.lineage import describe_chain

DEMO_ADMIN_KEY = "sk-alignloop-admin"  # the DEMO admin key of configs/gateway.yaml (hash only there)
# The demo decides under its own gate: the production rules with margins its 24-48 items per task
# can resolve, read sequentially (the config's header). The loop and the release manager both use it.
DEMO_GATE = repo_root() / "configs" / "gate-demo.yaml"


def _say(msg: str) -> None:
    typer.echo(f"[demo {time.strftime('%H:%M:%S')}] {msg}")


def _start_gateway(
    log_path: Path, keep: bool = False, timeout_s: float = 600, serve_overrides: list[str] | None = None
) -> tuple[subprocess.Popen, str]:
    """`alignloop serve` in a child process; wait until the live release answers through it.

    It stops with the demo (ground/procs.py) and listens on a free port, unless ``keep``: then it
    is detached and serves on at the serve config's fixed port (8000), where `alignloop serve`
    would. ``serve_overrides`` are key=value settings of `alignloop serve`.
    """
    if (info := running_server()) is not None:
        raise RuntimeError(f"a gateway already runs for {data_dir()} ({info['url']}); "
                           "`alignloop stop` stops it")
    server_file().unlink(missing_ok=True)
    log_path.parent.mkdir(parents=True, exist_ok=True)

    port = [] if keep else [f"port={free_port()}"]
    cmd = [sys.executable, "-m", "flows.cli", "serve", *port, *(serve_overrides or [])]
    with log_path.open("ab") as logf:
        # The child runs from the checkout: name the data dir, or a demo started elsewhere would
        # wait for a gateway that serves (and writes) another data dir.
        env = {**os.environ, "ALIGNLOOP_HOME": str(data_dir())}
        out = {"stdout": logf, "stderr": subprocess.STDOUT, "cwd": repo_root(), "env": env}
        if keep:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, start_new_session=True, **out)
        else:
            proc = owned_popen(cmd, grace_s=90, **out)
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"`alignloop serve` exited with {proc.returncode}; see {log_path}")
        if time.monotonic() > deadline:
            proc.terminate()
            raise RuntimeError(f"the live release did not come up in {timeout_s:.0f}s; see {log_path}")
        info = running_server()  # written by the gateway once it listens: its URL
        try:
            if info and httpx.get(f"{info['url']}/healthz", timeout=3).status_code == 200:
                return proc, info["url"]
        except httpx.HTTPError:
            pass
        time.sleep(1)


def _stop_gateway(proc: subprocess.Popen) -> None:
    proc.terminate()  # SIGTERM: the gateway stops every vLLM it started, then exits
    try:
        proc.wait(timeout=90)
    except subprocess.TimeoutExpired:
        proc.kill()


def _traffic(url: str, window: int) -> Any:
    """Demo traffic + simulated feedback for one window (seed = window number)."""
    overrides = [f"base_url={url}/v1"]
    if window:  # window 0 is exactly `make demo`'s traffic
        overrides += [f"seed={window}", f"out={data_dir() / 'simulate' / f'traffic-window{window}.jsonl'}"]
    return simulate(load_config(SimulateConfig, repo_root() / "configs" / "demo.yaml", overrides))


def _live_chain() -> str:
    """The live release's lineage in one line (what `alignloop release list` prints under it)."""
    try:
        lineage = live_lineage()
    except (OSError, ValueError) as exc:
        return f"unknown ({exc})"
    return f"{lineage.release_id}: {describe_chain(lineage)}" if lineage else "no live release"


# The demo's goal on two CPU cores, after set-up (README).
DEMO_GOAL_S = 600.0
LOOP_STAGE = "alignment loop (flow)"


def _probe_state() -> str:
    """Whether set-up measured this CPU already (the loop's "plan quantization" reads it)."""
    platform = detect()
    if platform.has_gpu:
        return "GPU machine: no platform probe"
    hit = cached(platform)
    if hit is None:
        return ("platform probe not taken on this machine yet: the loop takes it (about a minute; "
                "`make setup` or `alignloop prepare` does it before the demo)")
    return f"platform probe from {hit.taken_at} (set-up): {hit.choice()}"


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)} min {int(round(seconds % 60)):02d} s"


def time_budget(timings: dict[str, float], loop_seconds: list[dict[str, float]]) -> list[str]:
    """Where the demo's time went: one line per stage with its share of the total, the loop's
    tasks under each loop run (``loop_seconds``, one dict per window, in order), and the total
    against the 10-minute goal."""
    total = timings.get("total") or sum(timings.values()) or 1.0
    cpu = f"{os.cpu_count()} cores, {detect().isa}"
    lines = [f"time budget (goal: {_minutes(DEMO_GOAL_S)} after set-up; this machine: {cpu})"]
    loops = iter(loop_seconds)
    for stage, secs in timings.items():
        if stage == "total":
            continue
        lines.append(f"  {stage:<52} {secs:6.0f} s {secs / total:6.1%}")
        if stage.startswith(LOOP_STAGE):
            tasks = next(loops, {})
            for task_name, task_s in tasks.items():
                lines.append(f"    {task_name:<50} {task_s:6.0f} s {task_s / total:6.1%}")
            rest = secs - sum(tasks.values())
            if tasks and rest >= 1:
                lines.append(f"    {'(flow start-up, Prefect, between tasks)':<50} {rest:6.0f} s {rest / total:6.1%}")
    over = total - DEMO_GOAL_S
    verdict = f"over the goal by {_minutes(over)}" if over > 0 else "within the goal"
    lines.append(f"  {'total':<52} {total:6.0f} s  ({_minutes(total)}: {verdict})")
    return lines


def closing_lines(kept: tuple[str, int] | None = None) -> list[str]:
    """The demo's last lines: the one command that serves this data dir again (gateway, live
    release, review page on the serve config's fixed port) and how to stop it; with ``kept``
    (url, pid) the gateway `--keep-serving` left running instead."""
    exe = Path(sys.executable).parent / "alignloop"
    alignloop = str(exe.relative_to(repo_root())) if exe.is_relative_to(repo_root()) else "alignloop"
    if kept is not None:
        url, pid = kept
        first = [f"the gateway keeps serving this data dir at {url} (pid {pid}); stop it: {alignloop} stop"]
    else:
        cfg = load_config(ServeConfig, repo_root() / "configs" / "serve.yaml")
        url = f"http://{cfg.host}:{cfg.port}"
        first = [f"serve it again (gateway, live release, review page on {url}): make serve "
                 f"(= {alignloop} serve); Ctrl-C stops it"]
    return [
        *first,
        f"review page: {url}/review (demo reviewer key {DEMO_REVIEWER_KEY}); OpenAI API: {url}/v1",
        f"while it serves, each release's address, placement and scheme: {alignloop} release list",
    ]


def windows_table(runs: list[dict]) -> str:
    """The demo's per-window table in markdown: what each window decided and the gate's numbers."""
    rows = trend_rows(runs)
    if not rows:
        return "(no finished window)"
    cols = list(dict.fromkeys(c for r in rows for c in r))
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r.get(c, "–")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def run_demo(
    overrides: list[str], keep_serving: bool = False, windows: int = 1, serve_overrides: list[str] | None = None
) -> int:
    """Run the demo on ``windows`` consecutive feedback windows; return the exit code (0 also
    when the gate keeps the live model). ``serve_overrides`` go to `alignloop serve`."""
    os.environ.setdefault("ALIGNLOOP_ADMIN_KEY", DEMO_ADMIN_KEY)
    timings: dict[str, float] = {}
    t0 = time.monotonic()
    _say(f"data dir {data_dir()}; Prefect: {prefect_env.configure()}")
    made_before = is_current()  # an older conversion's folder is rebuilt here, not "made at set-up"
    model = materialize()
    stage = "materialize" + (" (made at set-up)" if made_before else "")
    timings[stage] = time.monotonic() - t0

    _say(f"[{timings[stage]:.0f} s] base model {model.path} ({model.check_answer!r}); {_probe_state()}")

    t = time.monotonic()
    proc, url = _start_gateway(data_dir() / "logs" / "demo-serve.log", keep=keep_serving,
                               serve_overrides=[f"releases.gate_file={DEMO_GATE}", *(serve_overrides or [])])
    timings["start gateway + live release"] = time.monotonic() - t
    _say(f"[{timings['start gateway + live release']:.0f} s] gateway at {url} (OpenAI base {url}/v1); "
         "live release up")
    outcomes = []
    try:
        # lazy: flows.loop loads prefect
        from flows.loop import run_loop

        # The CPU demo's small eval profile (configs/evals-demo.yaml) under the demo's gate.
        demo_overrides = [f"evals_file={repo_root() / 'configs' / 'evals-demo.yaml'}", f"gate_file={DEMO_GATE}",
                          *overrides]
        window_start = datetime.now(UTC) - timedelta(seconds=1)
        for k in range(windows):
            tag = f" (window {k + 1} of {windows})" if windows > 1 else ""
            t = time.monotonic()
            sim = _traffic(url, k)
            timings[f"demo traffic + simulated feedback{tag}"] = time.monotonic() - t
            _say(f"[{time.monotonic() - t:.0f} s] sent {sim.requests} requests ({sim.failed} failed); SIMULATED feedback {sim.feedback}; "
                 f"mean policy compliance of live answers {sim.mean_compliance:.2f}{tag}")
            t = time.monotonic()
            window_end = datetime.now(UTC)
            outcome = run_loop(str(repo_root() / "configs" / "loop.yaml"), demo_overrides, window_start, window_end)
            timings[f"{LOOP_STAGE}{tag}"] = time.monotonic() - t
            outcomes.append(outcome)
            window_start = window_end
            _say(f"[{time.monotonic() - t:.0f} s] decision{tag}: {outcome['decision']}")
    finally:
        if not keep_serving:
            _stop_gateway(proc)
    timings["total"] = time.monotonic() - t0
    run_dir = Path(outcomes[-1]["run_dir"])
    (run_dir / "demo-timings.json").write_text(json.dumps(timings, indent=2))
    typer.echo("")
    if windows == 1:
        # The report's first sections: what changed, in words, and the side-by-side table.
        sections = Path(outcomes[0]["report"]).read_text().split("\n## ")
        typer.echo("\n## ".join(sections[:3]))
    else:
        runs = [window_summary(Path(o["run_dir"])) for o in outcomes]
        table = windows_table(runs)
        summary = data_dir() / "demo-windows.md"
        summary.write_text(f"# alignloop demo: {windows} windows\n\n{table}\n\n"
                           f"timings (s): {json.dumps({k: round(v) for k, v in timings.items()})}\n")
        (data_dir() / "demo-windows.json").write_text(json.dumps({"windows": runs, "timings": timings}, indent=2))
        typer.echo(table)
        typer.echo(f"per-window table: {summary}")
        typer.echo(f"live release's lineage: {_live_chain()}")
    typer.echo(f"decision: {outcomes[-1]['decision']}")
    typer.echo(f"  (under the demo's gate, {DEMO_GATE.relative_to(repo_root())}: production rules with 20-point "
               "margins that 24-48 items per task can resolve and latency at most twice live's; "
               "configs/gate.yaml allows 5-10 points and holds the SLO)")
    if outcomes[-1].get("report"):
        typer.echo(f"report: {outcomes[-1]['report']}")
    typer.echo(f"run folder: {run_dir}   releases: {data_dir() / 'releases'}")
    typer.echo("Prefect UI: `alignloop ui`, then open the flow run "
               "'align-...' of flow 'alignment-loop' (artifacts tab: report, gate, plots)")
    typer.echo("")
    for line in time_budget(timings, [o.get("seconds") or {} for o in outcomes]):
        typer.echo(line)
    typer.echo("")
    kept = None
    if keep_serving:
        kept = (url, (running_server() or {}).get("pid", proc.pid))
    for line in closing_lines(kept):
        typer.echo(line)
    return 0
