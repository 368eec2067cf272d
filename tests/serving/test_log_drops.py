"""Rows that vanish (issue 23): every dropped log row is counted on /metrics, feedback on it says
"not logged", the control plane's reader survives a bad message, and a process that dies holding
the shared-state lock blocks nobody.

Real pieces throughout (SQLite, a multiprocessing queue, shared memory, a real process killed with
SIGKILL); the only stand-in is a database write held on an event, to fill the writer's queue
without sending 100,000 requests.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_gateway_support import KEY_A, FakeUpstream, make_config, running_fake  # noqa: E402

from ground.logstore import ExchangeRecord, LogStore  # noqa: E402
from serving.gateway.app import create_app, serve_in_thread  # noqa: E402
from serving.gateway.dataplane import ControlPlane, QueueLogStore, SharedAdmission, SharedState  # noqa: E402
from serving.gateway.upstream import StaticUpstream  # noqa: E402

H = {"Authorization": f"Bearer {KEY_A}"}
ROOT = Path(__file__).resolve().parents[2]


def _record(i: int, tenant: str = "a") -> ExchangeRecord:
    return ExchangeRecord(id=f"chatcmpl-{i}", tenant=tenant, messages=[{"role": "user", "content": "hi"}],
                          response=f"answer {i}")


def _metric(text: str, name: str) -> float:
    return float(next(line.split()[-1] for line in text.splitlines() if line.startswith(name + " ")))


def test_single_process_drop_is_counted_and_its_feedback_is_not_a_404(tmp_path: Path) -> None:
    """The writer's queue full: the row is dropped, /metrics counts it, feedback gets a 410."""
    store = LogStore(f"sqlite:///{tmp_path / 'logs.db'}", max_queue=1)
    held, write = threading.Event(), store._write_batch
    store._write_batch = lambda batch: (held.wait(30), write(batch))  # the database is slow
    with running_fake(FakeUpstream()) as up:
        app = create_app(make_config(), StaticUpstream(up), store)
        with serve_in_thread(app) as base:
            ids = [httpx.post(base + "/v1/chat/completions", headers=H, timeout=10,
                              json={"model": "alignloop", "messages": [{"role": "user", "content": f"q{i}"}]}
                              ).json()["id"] for i in range(4)]  # 1 being written, 1 queued, 2 dropped
            metrics = httpx.get(base + "/metrics", headers={"Authorization": "Bearer sk-admin"}).text
            assert _metric(metrics, "gateway_log_rows_dropped_total") == 2
            r = httpx.post(base + "/v1/feedback", headers=H, json={"request_id": ids[-1], "rating": {"score": 5}})
            assert r.status_code == 410, r.text
            err = r.json()["error"]
            assert err["code"] == "request_not_logged" and err["param"] == "request_id"
            r = httpx.post(base + "/v1/feedback", headers={"Authorization": "Bearer sk-tenant-b"},
                           json={"request_id": ids[-1], "rating": {"score": 5}})
            assert r.status_code == 404  # another tenant learns nothing about it
            held.set()
            r = httpx.post(base + "/v1/feedback", headers=H, json={"request_id": ids[0], "rating": {"score": 5}})
            assert r.status_code == 200, r.text


def test_a_workers_drops_reach_the_control_planes_metrics_and_feedback(tmp_path: Path) -> None:
    """A worker's full queue: the drop lands in its shared-memory slot, which the control plane's
    store counts and feedback consults."""
    state = SharedState()
    log_queue = mp.get_context("spawn").Queue(maxsize=1)
    try:
        worker = QueueLogStore(log_queue, state, worker=3)
        worker.log_exchange(_record(0))
        worker.log_exchange(_record(1))  # the queue is full: dropped
        store = LogStore(f"sqlite:///{tmp_path / 'logs.db'}")
        store.add_drop_source(state)
        assert store.dropped_total() == 1
        assert store.was_dropped("chatcmpl-1", "a") and not store.was_dropped("chatcmpl-1", "b")
        assert not store.was_dropped("chatcmpl-0", "a")
        app = create_app(make_config(), StaticUpstream(None), store)
        with serve_in_thread(app) as base:
            metrics = httpx.get(base + "/metrics", headers={"Authorization": "Bearer sk-admin"}).text
            assert _metric(metrics, "gateway_log_rows_dropped_total") == 1
            r = httpx.post(base + "/v1/feedback", headers=H, json={"request_id": "chatcmpl-1", "rating": {"score": 1}})
            assert r.status_code == 410 and r.json()["error"]["code"] == "request_not_logged"
    finally:
        log_queue.cancel_join_thread()
        log_queue.close()
        state.close()


def test_reader_thread_survives_bad_messages(tmp_path: Path) -> None:
    """A message that is not a row, or not even a pickle, is counted and skipped; the rows after
    it are still written."""
    store = LogStore(f"sqlite:///{tmp_path / 'logs.db'}")
    plane = object.__new__(ControlPlane)  # only the reader: no workers, no socket
    plane.store, plane.log_queue = store, mp.get_context("spawn").Queue()
    q = plane.log_queue
    for message in ("not a row", {"id": 5}, _record(1).row(), b"\x80not a pickle",
                    _record(2).row(), None):  # as a worker's put() writes them, in this order
        q._sem.acquire()
        q._writer.send_bytes(message if isinstance(message, bytes) else pickle.dumps(message))
    plane._read_logs()  # returns at the None, having read everything before it
    assert store.rejected == 3
    assert [r["id"] for r in store.exchanges()] == ["chatcmpl-1", "chatcmpl-2"]
    store.close()


def test_one_bad_row_does_not_take_its_batch_with_it(tmp_path: Path) -> None:
    store = LogStore(f"sqlite:///{tmp_path / 'logs.db'}")
    bad = {**_record(9).row(), "http_status": None}  # NOT NULL: the database refuses it
    store._write_batch([_record(1).row(), bad, _record(2).row()])  # as the writer would
    assert store.write_errors == 1 and store.written == 2
    assert [r["id"] for r in store.exchanges()] == ["chatcmpl-1", "chatcmpl-2"]
    store.close()


def test_a_process_killed_holding_the_lock_blocks_nobody() -> None:
    """SIGKILL while holding the shared-state lock: the kernel frees it, so the other workers'
    admission and the restart watcher's zeroing go on."""
    state = SharedState()
    try:
        cfg = make_config()
        code = (
            "import os, signal, sys\n"
            "from serving.gateway.dataplane import ProcessLock\n"
            "lock = ProcessLock(sys.argv[1]); lock.acquire()\n"
            "print('held', flush=True)\n"
            "os.kill(os.getpid(), signal.SIGKILL)\n"
        )
        child = subprocess.run([sys.executable, "-c", code, state.lock.path], cwd=ROOT,
                               capture_output=True, text=True, timeout=60)
        assert child.stdout.strip() == "held" and child.returncode == -signal.SIGKILL
        assert state.lock.acquire(False), "the dead process's lock was not released"
        state.lock.release()
        admission = SharedAdmission(state, 0, cfg)
        assert admission.admit("a") is None and admission.in_flight() == 1
        state.zero_worker(0)
        assert admission.in_flight() == 0
    finally:
        state.close()


def test_the_lock_excludes_other_processes_and_threads() -> None:
    state = SharedState()
    try:
        assert state.lock.acquire(False)
        other = subprocess.run(
            [sys.executable, "-c", "import sys; from serving.gateway.dataplane import ProcessLock; "
             "print(ProcessLock(sys.argv[1]).acquire(False))", state.lock.path],
            cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert other.stdout.strip() == "False"
        got: list[bool] = []
        t = threading.Thread(target=lambda: got.append(state.lock.acquire(False)))
        t.start()
        t.join()
        assert got == [False]
        state.lock.release()
    finally:
        state.close()


@pytest.fixture(autouse=True)
def _no_leaked_locks():  # noqa: ANN202 - every lock file a test made is gone with its state
    import glob
    import tempfile

    before = set(glob.glob(os.path.join(tempfile.gettempdir(), "alignloop-gateway-*.lock")))
    yield
    after = set(glob.glob(os.path.join(tempfile.gettempdir(), "alignloop-gateway-*.lock")))
    assert after <= before
