"""Several gateway worker processes in front of one control plane (``alignloop serve`` with
``workers`` > 1).

    control plane (the `alignloop serve` process)          worker processes (spawned, N)
      ReleaseManager: releases, vLLM processes               uvicorn on the shared listening socket
      LogStore: the single writer                            /v1/chat/completions, /v1/models,
      the full app (admin, feedback, review...) on a         /healthz, /metrics; everything else is
      Unix socket                                            forwarded to the control plane

What they share, and how:
- **The live upstream (and the gateway config: keys, limits)**: a small JSON blob in shared
  memory with a version number. The control plane rewrites it on every switch (under a lock);
  a worker reads the version (one integer) at each request's start and re-reads the blob only
  when it changed. So after a promote or rollback returns, every new request in every worker
  goes to the new release; in-flight ones finish where they started.
- **Admission**: per-worker, per-tenant in-flight counts in the same shared memory, checked and
  taken under one lock, so limits and the fair share are global. A worker that dies has its
  counts zeroed and is restarted.
- **The lock** is an ``flock`` on a file (:class:`ProcessLock`), not a semaphore: the kernel
  releases it when its holder dies, so a worker killed while holding it (SIGKILL, OOM) cannot
  block the other workers or the restart watcher. Simpler than a lock-free design, which would
  make the check-and-take of admission racy; the price is two system calls per request.
- **Log rows**: a bounded multiprocessing queue to the control plane's LogStore, never blocking.
  A row a worker drops (queue full) is counted in the worker's own slot of the shared memory and
  its id kept in a small per-worker ring there (one writer each: no lock), so the control plane
  exports the drops on /metrics and answers feedback on such a request with "not logged"
  (410) instead of "no such request". The control plane's reader survives a bad message (logged,
  counted in ``gateway_log_rows_rejected_total``). Feedback goes to the control plane, which waits
  briefly for a row still in transit from a worker instead of for the whole backlog.
- **Metrics**: prometheus_client's multiprocess mode (one directory of mmap files); a worker's
  /metrics sums all workers and adds the control plane's log-writer series.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import logging
import multiprocessing as mp
import os
import queue as queue_mod
import shutil
import signal
import socket
import struct
import tempfile
import threading
import time
from dataclasses import dataclass
from multiprocessing import resource_tracker, shared_memory
from pathlib import Path
from typing import Any

import orjson
from prometheus_client import multiprocess, values

from guardrails.pii import import_presidio_for_serving
from serving.gateway.admission import fair_share_refusal
from serving.gateway.config import GatewayConfig
from serving.gateway.upstream import Upstream

log = logging.getLogger(__name__)

MAX_WORKERS = 64
MAX_TENANTS = 1024
_HDR = 16  # version (q) + blob length (q)
_COUNTS = MAX_WORKERS * MAX_TENANTS * 8
DROP_RING = 256
"""Ids of the last rows each worker dropped, kept for feedback's "not logged" answer."""
_DIGEST = 16
_DROPS = MAX_WORKERS * 8  # rows dropped per worker (q), written by that worker only
_RING = MAX_WORKERS * DROP_RING * _DIGEST
_BLOB_MAX = 1 << 20
_BLOB_OFF = _HDR + _COUNTS + _DROPS + _RING
_CTX = mp.get_context("spawn")


class ProcessLock:
    """A lock between processes that the kernel releases when its holder dies (``flock``).

    Each process opens the file itself (the lock pickles as its path: a spawned worker reopens
    it), so the lock belongs to that process's open file; a thread lock in front makes it
    exclusive between the threads of one process too.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        self._threads = threading.Lock()

    def acquire(self, blocking: bool = True) -> bool:
        if not self._threads.acquire(blocking):
            return False
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX if blocking else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._threads.release()
            return False
        return True

    def release(self) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        self._threads.release()

    def __enter__(self) -> ProcessLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __getstate__(self) -> str:
        return self.path

    def __setstate__(self, path: str) -> None:
        self.__init__(path)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._fd)


def drop_digest(tenant: str, request_id: str) -> bytes:
    """What a worker's drop ring keeps of a dropped row: fixed size, and per tenant."""
    return hashlib.blake2b(f"{tenant}\0{request_id}".encode(), digest_size=_DIGEST).digest()


class SharedState:
    """Shared memory + lock: the state blob (upstream, config), the admission counts and each
    worker's log-row drops."""

    def __init__(self, name: str | None = None, lock: ProcessLock | None = None) -> None:
        size = _HDR + _COUNTS + _DROPS + _RING + _BLOB_MAX
        self.owner = name is None
        self.shm = shared_memory.SharedMemory(name=name, create=self.owner, size=size)
        if not self.owner:
            # Python's resource tracker would unlink the segment when this process exits.
            with contextlib.suppress(Exception):
                resource_tracker.unregister(self.shm._name, "shared_memory")  # type: ignore[attr-defined]
        if lock is None:
            fd, path = tempfile.mkstemp(prefix="alignloop-gateway-", suffix=".lock")
            os.close(fd)
            lock = ProcessLock(path)
        self.lock = lock
        self.counts = self.shm.buf[_HDR : _HDR + _COUNTS].cast("q")
        self.drops = self.shm.buf[_HDR + _COUNTS : _HDR + _COUNTS + _DROPS].cast("q")
        self.ring = self.shm.buf[_HDR + _COUNTS + _DROPS : _HDR + _COUNTS + _DROPS + _RING]
        if self.owner:
            self.shm.buf[: _BLOB_OFF] = bytes(_BLOB_OFF)

    def handle(self) -> tuple[str, ProcessLock]:
        return self.shm.name, self.lock

    # -- the blob ---------------------------------------------------------------------------------
    def version(self) -> int:
        return struct.unpack_from("q", self.shm.buf, 0)[0]

    def publish(self, state: dict[str, Any]) -> int:
        data = orjson.dumps(state)
        if len(data) > _BLOB_MAX:
            raise ValueError(f"gateway state is {len(data)} bytes; at most {_BLOB_MAX}")
        with self.lock:
            off = _BLOB_OFF
            self.shm.buf[off : off + len(data)] = data
            version = self.version() + 1
            struct.pack_into("qq", self.shm.buf, 0, version, len(data))
            return version

    def read(self) -> tuple[int, dict[str, Any]]:
        with self.lock:
            version, n = struct.unpack_from("qq", self.shm.buf, 0)
            off = _BLOB_OFF
            data = bytes(self.shm.buf[off : off + n])
        return version, (orjson.loads(data) if n else {})

    # -- admission counts ----------------------------------------------------------------------
    def zero_worker(self, worker: int) -> None:
        with self.lock:
            base = worker * MAX_TENANTS
            for t in range(MAX_TENANTS):
                self.counts[base + t] = 0

    # -- log rows a worker dropped (each worker writes only its own slot: no lock) ----------------
    def note_drop(self, worker: int, tenant: str, request_id: str) -> None:
        n = self.drops[worker]
        slot = (worker * DROP_RING + n % DROP_RING) * _DIGEST
        self.ring[slot : slot + _DIGEST] = drop_digest(tenant, request_id)
        self.drops[worker] = n + 1

    def dropped_count(self) -> int:
        """Rows every worker dropped so far (a restarted worker goes on counting in its slot)."""
        return sum(self.drops)

    def was_dropped(self, tenant: str, request_id: str) -> bool:
        """Whether a worker dropped this tenant's row recently (its last DROP_RING drops)."""
        digest, ring = drop_digest(tenant, request_id), self.ring.tobytes()
        at = ring.find(digest)
        while at != -1 and at % _DIGEST:  # only whole slots count
            at = ring.find(digest, at + 1)
        return at != -1

    def close(self) -> None:
        self.counts.release()
        self.drops.release()
        self.ring.release()
        self.shm.close()
        if self.owner:
            with contextlib.suppress(FileNotFoundError):
                self.shm.unlink()
            self.lock.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.lock.path)


def state_blob(config: GatewayConfig, upstream: Upstream | None, keys_epoch: int = 0) -> dict[str, Any]:
    return {
        "upstream": None if upstream is None else upstream.to_dict(),
        "config": config.model_dump(mode="json"),
        # bumped when the control plane re-read the keys file (SIGHUP, /admin/keys/reload): the
        # workers then rebuild their key rings too
        "keys_epoch": keys_epoch,
    }


class SharedUpstream:
    """A worker's ``UpstreamProvider``: the control plane's current upstream, read from shared
    memory when its version changes (one integer read per request otherwise)."""

    def __init__(self, state: SharedState, on_config: Any = None) -> None:
        self.state = state
        self.on_config = on_config
        self._version = -1
        self._upstream: Upstream | None = None
        self._config: dict | None = None
        self._keys_epoch: int | None = None

    def current(self) -> Upstream | None:
        if self.state.version() != self._version:
            version, blob = self.state.read()
            up = blob.get("upstream")
            self._upstream = None if up is None else Upstream.from_dict(up)
            changed = (blob.get("config"), blob.get("keys_epoch")) != (self._config, self._keys_epoch)
            if changed and self.on_config is not None:
                self._config, self._keys_epoch = blob.get("config"), blob.get("keys_epoch")
                self.on_config(GatewayConfig.model_validate(self._config))
            self._version = version
        return self._upstream


class SharedAdmission:
    """Global, per-tenant admission across worker processes (``service.Admission``)."""

    def __init__(self, state: SharedState, worker: int, config: GatewayConfig) -> None:
        self.state, self.worker = state, worker
        self.set_config(config)

    def set_config(self, config: GatewayConfig) -> None:
        names = [t.name for t in config.tenants]
        if len(names) > MAX_TENANTS:
            raise ValueError(f"tenants: at most {MAX_TENANTS} with several workers")
        self.index = {n: i for i, n in enumerate(names)}
        self.caps = {t.name: t.max_in_flight for t in config.tenants}
        self.global_cap = config.limits.max_in_flight

    def _snapshot(self) -> tuple[dict[str, int], int]:
        c = self.state.counts
        counts = {}
        for name, i in self.index.items():
            counts[name] = sum(c[w * MAX_TENANTS + i] for w in range(MAX_WORKERS))
        return counts, sum(counts.values())

    def admit(self, tenant: str) -> str | None:
        i = self.index.get(tenant)
        if i is None:
            return f"tenant {tenant!r} is not configured"
        with self.state.lock:
            counts, total = self._snapshot()
            why = fair_share_refusal(tenant, counts, total, self.caps, self.global_cap)
            if why is None:
                self.state.counts[self.worker * MAX_TENANTS + i] += 1
            return why

    def release(self, tenant: str) -> None:
        with self.state.lock:
            self.state.counts[self.worker * MAX_TENANTS + self.index[tenant]] -= 1

    def in_flight(self) -> int:
        """Requests in flight in this worker (``/healthz`` of the worker that answers)."""
        c = self.state.counts
        base = self.worker * MAX_TENANTS
        return sum(c[base + i] for i in self.index.values())


class QueueLogStore:
    """A worker's log store: rows go to the control plane's single writer through a bounded
    queue; a full queue drops the row (never blocks the request) and notes it in the worker's
    slot of the shared state, where the control plane counts it and feedback finds it."""

    def __init__(self, queue: Any, state: SharedState, worker: int) -> None:
        self.queue, self.state, self.worker = queue, state, worker
        self._closed = False

    def log_exchange(self, record: Any) -> None:
        if self._closed:
            raise RuntimeError("log store is closed")
        try:
            self.queue.put_nowait(record.row())
        except queue_mod.Full:
            self.state.note_drop(self.worker, record.tenant, record.id)
            log.error("log queue to the control plane full: exchange %s dropped", record.id)

    def queued(self) -> int:
        return 0  # the control plane's writer reports its own queue

    def has_exchange(self, request_id: str, tenant: str) -> bool:  # feedback is forwarded
        raise RuntimeError("feedback is handled by the control plane")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.queue.close()
        self.queue.join_thread()  # every row put is in the pipe before this worker exits


@dataclass
class WorkerSpec:
    """What a worker process needs (picklable: passed to a spawned process)."""

    index: int
    sock: socket.socket
    shm_name: str
    lock: ProcessLock
    log_queue: Any
    control_uds: str
    metrics_dir: str
    log_level: str


def worker_main(spec: WorkerSpec) -> None:  # pragma: no cover - runs in a child process
    """A data-plane worker: the chat app on the shared socket until SIGTERM/SIGINT."""
    with contextlib.suppress(Exception):  # the control plane killed outright: the workers go too
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = spec.metrics_dir

    values.ValueClass = values.get_value_class()  # metrics made from now on go to the mmap files
    logging.basicConfig(level=logging.WARNING, format=f"%(asctime)s worker-{spec.index} %(name)s %(message)s")
    # lazy: uvicorn, the gateway's server only
    import uvicorn

    import_presidio_for_serving()  # a worker never trains: ~450 MB less per process
    # lazy: serving.gateway.app loads aiohttp, fastapi, sqlalchemy, starlette, uvicorn
    from serving.gateway.app import create_app, uvicorn_config

    state = SharedState(spec.shm_name, spec.lock)
    _, blob = state.read()
    config = GatewayConfig.model_validate(blob["config"])
    admission = SharedAdmission(state, spec.index, config)
    holder: dict[str, Any] = {}

    def on_config(cfg: GatewayConfig) -> None:  # keys, limits: switched with the blob
        admission.set_config(cfg)
        if "app" in holder:
            # lazy: serving.gateway.auth loads fastapi
            from serving.gateway.auth import KeyRing

            holder["app"].state.keyring = KeyRing(cfg)

    provider = SharedUpstream(state, on_config)
    app = create_app(
        config, provider, QueueLogStore(spec.log_queue, state, spec.index), admission=admission,
        forward_to=spec.control_uds,
    )
    holder["app"] = app
    app.state.keys_sync = provider.current  # before each authentication: see serving.gateway.auth
    provider.current()
    server = uvicorn.Server(uvicorn_config(app, log_level=spec.log_level, timeout_graceful_shutdown=10))
    try:
        server.run(sockets=[spec.sock])
    finally:
        state.close()


class ControlPlane:
    """Spawns the workers, publishes the upstream to them, drains their log rows, restarts a
    worker that dies, and stops them all (log rows flushed) on :meth:`stop`."""

    def __init__(
        self, config: GatewayConfig, manager: Any, store: Any, host: str, port: int, workers: int,
        control_uds: str, log_level: str = "warning", log_queue_rows: int = 100_000,
    ) -> None:
        if not 1 <= workers <= MAX_WORKERS:
            raise ValueError(f"workers: 1..{MAX_WORKERS}")
        self.config, self.manager, self.store = config, manager, store
        self.n, self.control_uds, self.log_level = workers, control_uds, log_level
        self.state = SharedState()
        store.add_drop_source(self.state)  # the workers' drops: on /metrics, and for feedback
        self.log_queue = _CTX.Queue(maxsize=log_queue_rows)
        self.metrics_dir = tempfile.mkdtemp(prefix="alignloop-metrics-")
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(2048)
        self.sock.set_inheritable(True)
        self.procs: dict[int, Any] = {}
        self.keys_epoch = 0
        self._stopping = threading.Event()
        self.publish(manager.current())
        manager.on_switch(self.publish)
        self._reader = threading.Thread(target=self._read_logs, name="worker-logs", daemon=True)
        self._monitor = threading.Thread(target=self._watch, name="worker-monitor", daemon=True)

    def publish(self, upstream: Upstream | None) -> None:
        if not self._stopping.is_set():
            self.state.publish(state_blob(self.config, upstream, self.keys_epoch))

    def keys_changed(self) -> None:
        """The control plane re-read the keys file: every worker re-reads it at its next request."""
        self.keys_epoch += 1
        self.publish(self.manager.current())

    def _spawn(self, index: int) -> None:
        spec = WorkerSpec(
            index, self.sock, self.state.shm.name, self.state.lock, self.log_queue,
            self.control_uds, self.metrics_dir, self.log_level,
        )
        proc = _CTX.Process(target=worker_main, args=(spec,), name=f"gateway-worker-{index}", daemon=False)
        proc.start()
        self.procs[index] = proc

    def start(self) -> None:
        self._reader.start()
        for i in range(self.n):
            self._spawn(i)
        self._monitor.start()

    def _read_logs(self) -> None:
        """Move the workers' rows into the store until the ``None`` that :meth:`stop` sends.

        One bad message must not end the thread (every later row would then be lost without a
        trace): it is logged, counted (``store.rejected``) and skipped. A queue whose pipe is
        gone ends it.
        """
        while True:
            try:
                row = self.log_queue.get()
            except (EOFError, OSError):
                log.exception("worker log queue closed; no more rows are read")
                return
            except Exception:  # noqa: BLE001 - a message that does not unpickle
                self._reject("a message that could not be read")
                continue
            if row is None:
                return
            try:
                self.store.log_row(row)
            except RuntimeError:  # the store is closed: nothing more can be written
                log.error("log store closed; a worker's row was not logged")
                return
            except Exception:  # noqa: BLE001 - not a row (bad type, missing keys)
                self._reject(f"a bad row ({type(row).__name__})")

    def _reject(self, what: str) -> None:
        self.store.rejected += 1
        log.exception("worker log queue: skipped %s", what)

    def _watch(self) -> None:
        while not self._stopping.wait(0.5):
            for i, proc in list(self.procs.items()):
                # exit code 0: a graceful stop (SIGINT/SIGTERM reached the worker): not restarted
                if proc.is_alive() or proc.exitcode == 0 or self._stopping.is_set():
                    continue
                log.error("gateway worker %d (pid %s) exited with %s; restarting", i, proc.pid, proc.exitcode)
                self.state.zero_worker(i)  # its requests died with it
                with contextlib.suppress(Exception):
                    multiprocess.mark_process_dead(proc.pid, self.metrics_dir)
                self._spawn(i)

    def alive_workers(self) -> int:
        return sum(p.is_alive() for p in self.procs.values())

    def stop(self, timeout_s: float = 20) -> None:
        """SIGTERM every worker (graceful: streams finish within uvicorn's grace), wait, then
        drain their log rows into the store."""
        self._stopping.set()
        for proc in self.procs.values():
            if proc.is_alive():
                proc.terminate()
        deadline = time.monotonic() + timeout_s
        for proc in self.procs.values():
            proc.join(max(0.1, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join(5)
        self.log_queue.put(None)  # after every row the workers sent: FIFO
        self._reader.join(timeout_s)
        self.sock.close()
        self.state.close()
        shutil.rmtree(self.metrics_dir, ignore_errors=True)
        with contextlib.suppress(OSError):
            Path(self.control_uds).unlink()
