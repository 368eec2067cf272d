"""Worker processes in front of a control plane (serving.gateway.dataplane): real spawned workers on a
shared socket, the real log store, admission shared through shared memory.

The upstreams are benchmarks/synthetic_upstream.py (SYNTHETIC OpenAI-compatible servers, no
model) in threads; the release manager is replaced by a switchable provider with the manager's
``on_switch`` hook, because what is tested is how workers learn a switch, not vLLM start-up
(the real manager and vLLM are in test_releases_integration.py, where `alignloop serve` runs
with two workers).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from synthetic_upstream import SyntheticUpstream  # noqa: E402
from test_gateway_support import ADMIN, KEY_A, KEY_B, make_config  # noqa: E402

from ground.logstore import LogStore  # noqa: E402
from serving.engine.vllm_server import free_port  # noqa: E402
from serving.gateway.app import create_app, serve_in_thread  # noqa: E402
from serving.gateway.config import hash_key  # noqa: E402
from serving.gateway.dataplane import ControlPlane  # noqa: E402
from serving.gateway.upstream import StaticUpstream, Upstream  # noqa: E402

pytestmark = pytest.mark.integration


class SwitchableManager(StaticUpstream):
    """The part of ReleaseManager the control plane uses: current() and on_switch()."""

    def __init__(self, upstream: Upstream) -> None:
        super().__init__(upstream)
        self.listeners: list = []

    def on_switch(self, fn) -> None:  # noqa: ANN001
        self.listeners.append(fn)

    def set(self, upstream: Upstream | None) -> None:
        super().set(upstream)
        for fn in self.listeners:
            fn(upstream)


@contextlib.contextmanager
def control_plane(tmp_path: Path, cfg, workers: int = 2) -> Iterator[tuple]:  # noqa: ANN001
    ups = [SyntheticUpstream(slow_first_s=1.5) for _ in range(2)]
    with contextlib.ExitStack() as stack:
        bases = [stack.enter_context(serve_in_thread(u)) for u in ups]
        releases = [Upstream(b + "/v1", f"r{i}", "synthetic") for i, b in enumerate(bases)]
        manager = SwitchableManager(releases[0])
        store = LogStore(f"sqlite:///{tmp_path / 'logs.db'}")
        app = create_app(cfg, manager, store)
        app.state.service.feedback_wait_s = 2.0
        uds = tempfile.mktemp(prefix="al-cp-", suffix=".sock", dir="/tmp")
        port = free_port()
        plane = ControlPlane(cfg, manager, store, "127.0.0.1", port, workers, uds)
        stack.enter_context(serve_in_thread(app, uds=uds))
        plane.start()
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    if httpx.get(base + "/healthz", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, "workers never answered"
                time.sleep(0.2)
            yield base, manager, releases, ups, store, plane
        finally:
            plane.stop()
            store.close()


def _rows(store: LogStore, n: int, timeout_s: float = 20) -> list[dict]:
    deadline = time.monotonic() + timeout_s
    while True:
        rows = list(store.exchanges())
        if len(rows) >= n or time.monotonic() > deadline:
            return rows
        time.sleep(0.1)


def _chat(base: str, key: str = KEY_A, content: str = "hi", stream: bool = False, **kw) -> httpx.Response:  # noqa: ANN003
    return httpx.post(
        base + "/v1/chat/completions", headers={"Authorization": f"Bearer {key}"}, timeout=30,
        json={"model": "alignloop", "stream": stream, "max_tokens": 8,
              "messages": [{"role": "user", "content": content}]}, **kw,
    )


def test_workers_share_limits_switch_together_and_log_through_one_writer(tmp_path: Path) -> None:
    cfg = make_config(
        tenants=[
            {"name": "a", "key_sha256": hash_key(KEY_A), "max_in_flight": 4},
            {"name": "b", "key_sha256": hash_key(KEY_B), "max_in_flight": 64},
        ],
        guardrails={"input": [{"name": "injection"}]},
    )
    with control_plane(tmp_path, cfg) as (base, manager, releases, ups, store, plane):
        # Load over both workers: one row each, through the control plane's writer.
        async def burst(n: int, conc: int, **body) -> Counter:  # noqa: ANN003
            seen: Counter = Counter()
            async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=conc)) as c:
                async def one(i: int) -> None:
                    r = await c.post(
                        base + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY_B}"},
                        json={"model": "alignloop", "max_tokens": 8, "stream": i % 2 == 0,
                              "messages": [{"role": "user", "content": f"q{i}"}], **body},
                    )
                    await r.aread()
                    seen[r.status_code] += 1
                await asyncio.gather(*(one(i) for i in range(n)))
            return seen

        assert asyncio.run(burst(300, 24)) == {200: 300}
        rows = _rows(store, 300)
        assert len(rows) == 300 and {r["release"] for r in rows} == {"r0"}

        # Admission is global: tenant a may have 4 in flight in all workers together.
        async def slow_a(n: int) -> Counter:
            seen: Counter = Counter()
            async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=n)) as c:
                async def one(i: int) -> None:
                    r = await c.post(
                        base + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY_A}"},
                        json={"model": "alignloop", "max_tokens": 2, "stream": True,
                              "messages": [{"role": "user", "content": f"SLOWFIRST {i}"}]},
                    )
                    await r.aread()
                    seen[r.status_code] += 1
                await asyncio.gather(*(one(i) for i in range(n)))
            return seen

        assert asyncio.run(slow_a(12)) == {200: 4, 429: 8}

        # A switch reaches every worker before the next request: all of them go to r1.
        manager.set(releases[1])
        ids = [_chat(base, KEY_B, f"after {i}").json()["id"] for i in range(20)]
        rows = {r["id"]: r for r in _rows(store, 300 + 4 + 20)}
        assert {rows[i]["release"] for i in ids} == {"r1"}

        # Feedback through a worker is answered by the control plane, for a row just served.
        rid = _chat(base, KEY_B, "rate me").json()["id"]
        fb = httpx.post(base + "/v1/feedback", headers={"Authorization": f"Bearer {KEY_B}"},
                        json={"request_id": rid, "rating": {"thumbs": "up"}})
        assert fb.status_code == 200 and fb.json()["created"] is True
        assert httpx.post(base + "/v1/feedback", headers={"Authorization": f"Bearer {KEY_A}"},
                          json={"request_id": rid, "rating": {"score": 2}}).status_code == 404

        # /metrics sums every worker, and carries the writer's series.
        metrics = httpx.get(base + "/metrics", headers={"Authorization": f"Bearer {ADMIN}"}).text
        assert 'gateway_requests_total{status="429",tenant="a"} 8.0' in metrics
        assert 'gateway_requests_total{status="200",tenant="b"} 321.0' in metrics
        assert "gateway_log_rows_dropped_total 0.0" in metrics
        # ...for the admin or a metrics key only, in a worker as in the control plane; a worker's
        # /healthz tells a caller without a key only that it is up; admin bodies forwarded by a
        # worker are size-limited as the control plane limits them.
        assert httpx.get(base + "/metrics").status_code == 401
        assert httpx.get(base + "/healthz").json() == {"status": "ok"}
        big = httpx.post(base + "/admin/releases", headers={"Authorization": f"Bearer {ADMIN}"},
                         content=b"x" * (cfg.limits.max_admin_body_bytes + 1))
        assert big.status_code == 413 and "max_admin_body_bytes" in big.json()["error"]["message"]

        # A worker that dies is replaced and its slots freed; the gateway keeps answering.
        victim = plane.procs[0].pid
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 90
        while not (plane.procs[0].pid != victim and plane.alive_workers() == 2):
            assert time.monotonic() < deadline, "worker not restarted"
            time.sleep(0.2)
        assert all(_chat(base, KEY_B, f"x{i}").status_code == 200 for i in range(10))
        assert sum(plane.state.counts[i] for i in range(2 * 1024)) == 0
    rows = list(LogStore(f"sqlite:///{tmp_path / 'logs.db'}").exchanges())
    assert len(rows) == 300 + 4 + 20 + 1 + 10  # the 429s were never admitted: no rows


def test_alignloop_serve_fronts_an_external_upstream_with_workers(tmp_path: Path) -> None:
    """`alignloop serve` as a user runs it, with releases.upstream_url (no vLLM started) and two
    workers: requests are served and logged, the release list shows the external release."""
    import json
    import shutil
    import subprocess

    import yaml

    from ground.config import repo_root
    from serving.gateway.config import GatewayConfig

    syn = SyntheticUpstream()
    with serve_in_thread(syn) as up_base:
        port = free_port()
        home = tmp_path / "home"
        cfg = {
            "port": port,
            "log_level": "warning",
            "workers": 2,
            "gateway": GatewayConfig.model_validate(
                make_config(guardrails={}).model_dump(mode="json")
            ).model_dump(mode="json"),
            "releases": {"upstream_url": up_base + "/v1", "upstream_model": "synthetic",
                         "initial_model": None, "grace_s": 0},
        }
        (tmp_path / "serve.yaml").write_text(yaml.safe_dump(cfg))
        env = {**os.environ, "ALIGNLOOP_HOME": str(home), "HF_HUB_OFFLINE": "1", "ALIGNLOOP_ADMIN_KEY": ADMIN}
        env.pop("ALIGNLOOP_GATEWAY_URL", None)
        exe = shutil.which("alignloop", path=str(repo_root() / ".venv/bin")) or "alignloop"
        base = f"http://127.0.0.1:{port}"
        with (tmp_path / "serve.log").open("w") as log:
            proc = subprocess.Popen([exe, "serve", "--config", str(tmp_path / "serve.yaml")],
                                    env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    h = httpx.get(base + "/healthz", timeout=2)
                    if h.status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
                time.sleep(0.3)
            ids = [_chat(base, KEY_A, f"q{i}", stream=i % 2 == 0).status_code for i in range(40)]
            assert ids == [200] * 40
            listed = subprocess.run([exe, "release", "list", "--json"], env=env,
                                    capture_output=True, text=True, timeout=60)
            (rel,) = json.loads(listed.stdout)
            assert rel["status"] == "live" and rel["upstream_url"] == up_base + "/v1" and rel["serving"], listed.stderr
            # pages are the control plane's too: a form, and a refused sign-in from this origin
            page = httpx.get(base + "/review/login")
            assert page.status_code == 200 and "<form" in page.text
            refused = httpx.post(base + "/review/login", data={"key": "nope"}, headers={"origin": base})
            assert refused.status_code == 401 and "unknown reviewer key" in refused.text
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(60) == 0, (tmp_path / "serve.log").read_text()[-3000:]
    rows = list(LogStore(f"sqlite:///{home / 'logs.db'}").exchanges())
    assert len(rows) == 40 and {r["release"] for r in rows} == {rel["release_id"]}
    assert syn.stats.requests == 40 + 2  # + one real generation when staged and when promoted
