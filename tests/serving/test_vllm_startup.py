"""Start-up supervision: a hung vLLM is told from a slow one, and a worker failure ends the wait.

vLLM itself is replaced by a stand-in server (``ALIGNLOOP_SERVE_PYTHON`` points at a small
script) because the failure modes under test are ones a real vLLM shows only on some CPUs (a
worker that hangs during start-up on AVX2-only machines). The stand-in writes log lines the way
vLLM does, then hangs, fails or becomes healthy, as its ``STANDIN_MODE`` says. Everything else is
real: the process manager, the release manager, the log file, HTTP health checks.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from serving.engine.vllm_server import StartupLog, VLLMArgs, VLLMServer, VLLMStartError
from serving.releases.manager import ReleaseManager
from serving.releases.staging import StagingPolicy
from serving.releases.store import ReleaseStore

STANDIN = """\
#!{python}
import http.server, json, os, sys, time

port = int(sys.argv[sys.argv.index("--port") + 1])
mode = os.environ["STANDIN_MODE"]


def say(line):
    print(f"(APIServer pid={{os.getpid()}}) INFO 11-30 12:00:00 [standin.py:1] {{line}}", flush=True)


say("non-default args: {{'port': %d}}" % port)
say("Resolved architecture: LlamaForCausalLM")
if mode == "hang":  # a worker that never comes back: the log stops, /health never answers
    say("Starting to load model /m...")
    time.sleep(3600)
if mode == "worker_fails":  # vLLM 0.32's words when a worker dies during start-up
    print("(Worker pid=7) ERROR 11-30 12:00:01 [multiproc_executor.py:1063] WorkerProc hit an exception.")
    print("(Worker pid=7) ERROR 11-30 12:00:01 [multiproc_executor.py:1063] Traceback (most recent call last):")
    print("(Worker pid=7) ERROR 11-30 12:00:01 [multiproc_executor.py:1063] RuntimeError: Unsupported CPU attention configuration: head_dim=16 isa=2", flush=True)
    time.sleep(3600)  # the engine waits for a worker that is gone
if mode == "slow":  # longer than the quiet period in all, but never quiet for that long
    for i in range(int(os.environ.get("STANDIN_SLOW_LINES", "10"))):
        say(f"Loading safetensors checkpoint shards: {{10 * i}}% Completed")
        time.sleep(0.3)


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        body = json.dumps({{"choices": [{{"message": {{"content": "OK"}}}}]}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


say("Starting vLLM server on http://127.0.0.1:%d" % port)
http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
"""


@pytest.fixture
def standin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Make the serving env's interpreter a stand-in; returns a function that sets its mode."""
    script = tmp_path / "standin-python"
    script.write_text(STANDIN.format(python=sys.executable))
    script.chmod(0o755)
    monkeypatch.setenv("ALIGNLOOP_SERVE_PYTHON", str(script))
    model = tmp_path / "model"
    model.mkdir()

    def mode(name: str) -> Path:
        monkeypatch.setenv("STANDIN_MODE", name)
        return model

    return mode


def _gone(pid: int) -> bool:
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_manager_gives_up_on_a_hung_start_after_the_quiet_period(standin, tmp_path: Path) -> None:
    args = VLLMArgs(startup_quiet_s=1, startup_timeout_s=600)
    manager = ReleaseManager(ReleaseStore(tmp_path / "releases"), default_args=args)
    t0 = time.monotonic()
    try:
        rel = manager.stage(standin("hang"), release_id="hung")
    finally:
        manager.shutdown()
    took = time.monotonic() - t0
    reason = rel.history[-1].reason
    assert rel.status == "failed" and "hung" in reason and "no log output" in reason, reason
    assert took < 30, f"waited {took:.0f}s: the quiet period is 1s, the start-up timeout 600s"
    # A hung start-up is tried once more (it was flaky on an overloaded machine), then given up.
    log_text = (tmp_path / "releases" / "hung" / "vllm.log").read_text()
    assert log_text.count("Resolved architecture") == 2
    # The error names the phase and carries the log tail, the stand-in's last words included.
    assert "last phase: loading weights" in reason and "Starting to load model /m" in reason
    assert not manager.warm()


def test_worker_failure_in_the_log_fails_at_once(standin, tmp_path: Path) -> None:
    """The engine would wait forever for its dead worker; the log says why, so stop waiting."""
    server = VLLMServer(
        standin("worker_fails"), log_path=tmp_path / "v.log",
        args=VLLMArgs(startup_quiet_s=600, startup_timeout_s=600),
    )
    t0 = time.monotonic()
    with pytest.raises(VLLMStartError) as err:
        server.start()
    assert time.monotonic() - t0 < 30
    first_line = str(err.value).splitlines()[0]
    assert "engine reported a failure" in first_line
    assert "RuntimeError: Unsupported CPU attention configuration: head_dim=16" in first_line
    assert "WorkerProc hit an exception" in str(err.value)  # the log tail
    assert not server.alive() and not err.value.hung  # a reported failure is not retried


def test_slow_start_that_keeps_logging_is_not_hung(standin, tmp_path: Path) -> None:
    """3 s of start-up with a 2 s quiet period: it logs all along (every 0.3 s), so it is waited
    for. The same log file held a failed start before: only what this start wrote counts."""
    log_path = tmp_path / "v.log"
    with pytest.raises(VLLMStartError):
        VLLMServer(standin("worker_fails"), log_path=log_path).start()
    args = VLLMArgs(startup_quiet_s=2, startup_timeout_s=60)
    server = VLLMServer(standin("slow"), log_path=log_path, args=args).start()
    try:
        assert server.startup_s is not None and server.startup_s > args.startup_quiet_s
        assert server.check_generation() == "OK"
        pid = server.proc.pid
    finally:
        server.stop()
    assert _gone(pid)


def test_startup_log_reads_phases_and_the_root_cause(tmp_path: Path) -> None:
    log_path = tmp_path / "v.log"
    log_path.write_text("old start\nWorkerProc hit an exception.\n")
    watch = StartupLog(log_path, offset=log_path.stat().st_size)
    with log_path.open("a") as f:
        f.write("(Worker pid=9) INFO 11-30 12:00:00 [x.py:1] Starting to load model /m...\n")
        f.write("Loading safetensors checkpoint shards:  50% Completed | 1/2\r")
    watch.poll()
    assert watch.phase == "loading weights (50%)" and watch.fatal is None
    with log_path.open("a") as f:
        f.write("(Worker pid=9) ERROR 11-30 12:00:01 [m.py:1] WorkerProc hit an exception.\n")
        f.write("(Worker pid=9) ERROR 11-30 12:00:01 [m.py:1] RuntimeError: root cause\n")
        f.write("(EngineCore pid=8) ERROR 11-30 12:00:01 [c.py:1] EngineDeadError: consequence\n")
    watch.poll()
    assert watch.fatal == "WorkerProc hit an exception." and watch.reason() == "RuntimeError: root cause"


def test_start_up_progress_in_the_log_and_through_the_admin_api(
    standin, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A staging client sees vLLM's phase while it waits; the gateway's log says it too."""
    import logging

    from ground.logstore import LogStore
    from serving.control.admin_api import AdminClient, build_admin_router, startup_progress
    from serving.engine import vllm_server
    from serving.gateway.app import create_app, serve_in_thread
    from serving.gateway.config import GatewayConfig, TenantConfig, hash_key

    monkeypatch.setattr(vllm_server, "PROGRESS_EVERY_S", 0.5)
    monkeypatch.setenv("STANDIN_SLOW_LINES", "8")  # 2.4 s of "loading weights"
    gateway = GatewayConfig(
        tenants=[TenantConfig(name="t", key_sha256=hash_key("sk-t"))],
        admin_key_sha256=hash_key("sk-admin"),
    )
    manager = ReleaseManager(ReleaseStore(tmp_path / "releases"), default_args=VLLMArgs())
    logs = LogStore(f"sqlite:///{tmp_path / 'logs.db'}")
    staging = StagingPolicy(model_roots=[str(tmp_path)])  # the stand-in models live there
    app = create_app(gateway, manager, logs, extra_routers=[build_admin_router(manager, staging=staging)])
    seen: list[str] = []
    try:
        with (
            caplog.at_level(logging.INFO, logger="serving.engine.vllm_server"),
            serve_in_thread(app) as url,
            AdminClient(url, "sk-admin") as admin,
        ):
            with startup_progress(admin, seen.append, every_s=0.5):
                rel = admin.stage(str(standin("slow")), release_id="slow")
            assert rel.status == "staged"
            assert next(r for r in admin.describe() if r["release_id"] == "slow")["starting"] is None
    finally:
        manager.shutdown()
        logs.close()
    assert any(m.startswith("release slow: vLLM loading weights (") for m in seen), seen
    progress = [r.getMessage() for r in caplog.records if "starting:" in r.getMessage()]
    assert any("loading weights (" in m for m in progress), progress
