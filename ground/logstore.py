"""The request/feedback log store (SQLAlchemy; SQLite in WAL mode by default, any URL by config).

Two tables:
- ``requests``: one row per exchange through the gateway (messages *after* redaction, response,
  usage, latencies, guardrail verdicts, status). Written off the hot path by one background
  writer that batches inserts from a bounded queue: a request never waits for the database; when
  the queue is full the row is dropped and counted (``dropped``, exported on /metrics), never
  blocking, and its id is remembered for a while (:meth:`LogStore.was_dropped`), so feedback on
  it is told "not logged" rather than "no such request". :meth:`LogStore.close` flushes what is queued, so nothing is lost on shutdown.
  :meth:`LogStore.has_exchange` also sees rows still queued, so no request path waits for the
  backlog.
- ``feedback``: ratings, preferences and edits that users attach to a request id. Written
  synchronously (the API answers only after the row is stored) and idempotent by content.

Readers (the data stage) use :meth:`LogStore.exchanges` and :meth:`LogStore.feedback_events`.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from sqlalchemy import (
    JSON,
    Column,
    DateTime,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    event,
    func,
    insert,
    inspect,
    select,
    text,
)
from sqlalchemy.engine import Engine

from ground.config import data_dir

log = logging.getLogger(__name__)

FeedbackKind = Literal["rating", "preference", "edit"]

metadata = MetaData()

requests_table = Table(
    "requests",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("tenant", String(128), nullable=False, index=True),
    Column("created_at", DateTime(timezone=True), nullable=False, index=True),
    Column("release", String(128), nullable=True, index=True),
    Column("model", String(256), nullable=True),
    Column("messages", JSON, nullable=False),  # after input guardrails (redacted)
    Column("params", JSON, nullable=False),  # sampling parameters sent upstream
    Column("response", Text, nullable=True),  # after output guardrails
    # Every choice ({index, content, finish_reason, tool_calls?}) when n > 1 or tools were called;
    # `response` is the first choice's text either way.
    Column("choices", JSON, nullable=True),
    Column("finish_reason", String(32), nullable=True),
    Column("usage", JSON, nullable=True),  # {"prompt_tokens", "completion_tokens", "total_tokens"}
    Column("ttft_ms", Float, nullable=True),
    Column("latency_ms", Float, nullable=True),
    Column("guardrail_ms", Float, nullable=True),
    Column("overhead_ms", Float, nullable=True),  # the gateway's own time, guardrails included
    Column("verdicts", JSON, nullable=False),  # [{"hook", "stage", "action", "reason"}]
    Column("status", String(32), nullable=False),  # ok | blocked | upstream_error | client_error | cancelled
    Column("http_status", Integer, nullable=False),
    Column("stream", Integer, nullable=False, default=0),
)

feedback_table = Table(
    "feedback",
    metadata,
    Column("id", String(64), primary_key=True),  # content hash: identical feedback is idempotent
    Column("request_id", String(64), nullable=False, index=True),
    Column("tenant", String(128), nullable=False, index=True),
    Column("kind", String(16), nullable=False),
    Column("payload", JSON, nullable=False),
    Column("comment", Text, nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False, index=True),
    # Who gave it, as the server knows it (never taken from text a client controls): an end-user
    # or reviewer id (None = not given), and their role: user | reviewer | simulated.
    Column("actor", String(128), nullable=True, index=True),
    Column("actor_role", String(16), nullable=False, default="user"),
)

ActorRole = Literal["user", "reviewer", "simulated"]


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass
class ExchangeRecord:
    """One exchange as the gateway logs it (the ``requests`` table's row)."""

    id: str
    tenant: str
    messages: list[dict[str, Any]]
    params: dict[str, Any] = field(default_factory=dict)
    response: str | None = None
    choices: list[dict[str, Any]] | None = None
    finish_reason: str | None = None
    usage: dict[str, int] | None = None
    ttft_ms: float | None = None
    latency_ms: float | None = None
    guardrail_ms: float | None = None
    overhead_ms: float | None = None
    verdicts: list[dict[str, Any]] = field(default_factory=list)
    status: str = "ok"
    http_status: int = 200
    stream: bool = False
    release: str | None = None
    model: str | None = None
    created_at: datetime = field(default_factory=utcnow)

    def row(self) -> dict[str, Any]:
        d = self.__dict__.copy()
        d["stream"] = int(self.stream)
        return d


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=10000")
    cur.close()


def make_engine(url: str) -> Engine:
    """An engine for ``url``; SQLite gets WAL, NORMAL sync and a busy timeout."""
    engine = create_engine(url, future=True)
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def _aware(ts: datetime | None) -> datetime | None:
    """SQLite returns naive datetimes; everything stored is UTC."""
    if ts is not None and ts.tzinfo is None:
        return ts.replace(tzinfo=UTC)
    return ts


MAX_DROPPED_IDS = 10_000
"""Ids of dropped rows remembered for feedback's "not logged" answer (older ones: "not found")."""


class LogStore:
    """Log store with a batched background writer for exchanges.

    Args:
        url: SQLAlchemy URL, e.g. ``sqlite:///.alignloop/logs.db`` or ``postgresql+psycopg://...``.
        batch_size: exchanges per insert transaction at most.
        max_queue: rows waiting for the writer at most; more are dropped (and counted).
    """

    _STOP = object()

    def __init__(self, url: str, batch_size: int = 256, max_queue: int = 100_000) -> None:
        self.url = url
        self.engine = make_engine(url)
        metadata.create_all(self.engine)
        _add_missing_columns(self.engine)
        self.batch_size = batch_size
        self._queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self._pending: dict[str, dict[str, Any]] = {}  # id -> row queued, not yet committed
        self._writer = threading.Thread(target=self._write_loop, name="logstore-writer", daemon=True)
        self._writer.start()
        self._closed = False
        self.write_errors = 0
        self.dropped = 0  # rows refused because the queue was full
        self.rejected = 0  # messages from worker processes that were not rows (see dataplane)
        self.written = 0
        # (tenant, id) of the last rows dropped, for feedback's "not logged"; and other places
        # rows are dropped (worker processes: serving.gateway.dataplane.SharedState)
        self._dropped_ids: collections.OrderedDict[tuple[str, str], None] = collections.OrderedDict()
        self._drop_sources: list[Any] = []

    def queued(self) -> int:
        """Rows waiting for the writer now."""
        return self._queue.qsize()

    def add_drop_source(self, source: Any) -> None:
        """Count rows dropped elsewhere too (``source.dropped_count()``, ``source.was_dropped``)."""
        self._drop_sources.append(source)

    def dropped_total(self) -> int:
        """Rows dropped because a queue was full: this writer's and every drop source's."""
        return self.dropped + sum(s.dropped_count() for s in self._drop_sources)

    def was_dropped(self, request_id: str, tenant: str) -> bool:
        """Whether ``tenant``'s exchange ``request_id`` was answered but its row dropped
        (among the last ``MAX_DROPPED_IDS`` drops here, or a drop source's)."""
        return (tenant, request_id) in self._dropped_ids or any(
            s.was_dropped(tenant, request_id) for s in self._drop_sources
        )

    # -- writes ---------------------------------------------------------------------------------
    def log_exchange(self, record: ExchangeRecord) -> None:
        """Queue one exchange; never blocks (a full queue drops the row and counts it)."""
        if self._closed:
            raise RuntimeError("log store is closed")
        self.log_row(record.row())

    def log_row(self, row: dict[str, Any]) -> None:
        """Queue one exchange row (``ExchangeRecord.row()``; worker processes send these).

        Raises ValueError for something that is not such a row (it would fail its whole batch).
        """
        if self._closed:
            raise RuntimeError("log store is closed")
        if not (isinstance(row, dict) and isinstance(row.get("id"), str)
                and isinstance(row.get("tenant"), str) and isinstance(row.get("messages"), list)):
            raise ValueError("not an exchange row")
        self._pending[row["id"]] = row
        try:
            self._queue.put_nowait(row)
        except queue.Full:
            self._pending.pop(row["id"], None)
            self.dropped += 1
            self._dropped_ids[(row["tenant"], row["id"])] = None
            if len(self._dropped_ids) > MAX_DROPPED_IDS:
                self._dropped_ids.popitem(last=False)
            log.error("log store queue full (%d rows): exchange %s dropped", self._queue.maxsize, row["id"])

    def _write_loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is self._STOP:
                self._queue.task_done()
                return
            batch = [item]
            while len(batch) < self.batch_size:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is self._STOP:
                    self._queue.put(nxt)  # handle after this batch is written
                    self._queue.task_done()
                    break
                batch.append(nxt)
            self._write_batch(batch)
            for row in batch:
                self._pending.pop(row["id"], None)
                self._queue.task_done()

    def _write_batch(self, batch: list[dict[str, Any]]) -> None:
        for attempt in range(5):
            try:
                with self.engine.begin() as conn:
                    conn.execute(insert(requests_table), batch)
                self.written += len(batch)
                return
            except Exception:  # noqa: BLE001 - retried, then logged; the writer must not die
                if attempt == 4:
                    self._write_one_by_one(batch)
                else:
                    threading.Event().wait(0.2 * (attempt + 1))

    def _write_one_by_one(self, batch: list[dict[str, Any]]) -> None:
        """A batch the database refused 5 times: one bad row must not take the others with it."""
        for row in batch:
            try:
                with self.engine.begin() as conn:
                    conn.execute(insert(requests_table), [row])
                self.written += 1
            except Exception:  # noqa: BLE001 - counted and logged; the writer must not die
                self.write_errors += 1
                log.exception("log store: exchange %s not written", row.get("id"))

    def flush(self) -> None:
        """Block until every queued exchange is written."""
        self._queue.join()

    def close(self) -> None:
        """Flush and stop the writer (called on gateway shutdown)."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(self._STOP)
        self._writer.join()
        self.engine.dispose()

    def add_feedback(
        self,
        request_id: str,
        tenant: str,
        kind: FeedbackKind,
        payload: dict[str, Any],
        comment: str | None = None,
        actor: str | None = None,
        actor_role: ActorRole = "user",
    ) -> tuple[str, bool]:
        """Store feedback synchronously. Returns (feedback id, created); identical repeats are no-ops.

        The id hashes the actor too: the same verdict from two people is two rows (agreement
        counts), the same verdict sent twice by one person is one.
        """
        who = [] if actor is None and actor_role == "user" else [actor, actor_role]
        body = json.dumps([request_id, tenant, kind, payload, comment, *who], sort_keys=True)
        fid = "fb-" + hashlib.sha256(body.encode()).hexdigest()[:24]
        with self.engine.begin() as conn:
            exists = conn.execute(
                select(feedback_table.c.id).where(feedback_table.c.id == fid)
            ).first()
            if exists:
                return fid, False
            conn.execute(
                insert(feedback_table).values(
                    id=fid, request_id=request_id, tenant=tenant, kind=kind, payload=payload,
                    comment=comment, created_at=utcnow(), actor=actor, actor_role=actor_role,
                )
            )
        return fid, True

    # -- reads ----------------------------------------------------------------------------------
    def has_exchange(self, request_id: str, tenant: str, wait_s: float = 0.0) -> bool:
        """Whether ``tenant`` has an exchange with this id, queued or written. Never waits for
        the writer's backlog (the feedback API calls this on its request path); ``wait_s`` waits
        up to that long for this one row to arrive (from a worker process)."""
        return self.exchange_params(request_id, tenant, wait_s) is not None

    def exchange_params(
        self, request_id: str, tenant: str, wait_s: float = 0.0
    ) -> dict[str, Any] | None:
        """The request parameters (``user`` among them) of ``tenant``'s exchange with this id,
        queued or written, or None if there is none; waits as :meth:`has_exchange` does."""
        found = self.exchange_brief(request_id, tenant, wait_s)
        return None if found is None else found["params"]

    def exchange_brief(
        self, request_id: str, tenant: str, wait_s: float = 0.0
    ) -> dict[str, Any] | None:
        """``{"params", "response"}`` of ``tenant``'s exchange with this id, queued or written,
        or None if there is none; waits as :meth:`has_exchange` does."""
        q = select(requests_table.c.params, requests_table.c.response).where(
            requests_table.c.id == request_id, requests_table.c.tenant == tenant
        )
        deadline = time.monotonic() + wait_s
        while True:
            row = self._pending.get(request_id)
            if row is not None and row["tenant"] == tenant:
                return {"params": row.get("params") or {}, "response": row.get("response")}
            with self.engine.connect() as conn:
                found = conn.execute(q).first()
            if found is not None:
                return {"params": found[0] or {}, "response": found[1]}
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.02)

    def get_exchange(self, request_id: str, tenant: str | None = None) -> dict[str, Any] | None:
        """One exchange by id (restricted to ``tenant`` when given). Flushes queued writes first."""
        self.flush()
        q = select(requests_table).where(requests_table.c.id == request_id)
        if tenant is not None:
            q = q.where(requests_table.c.tenant == tenant)
        with self.engine.connect() as conn:
            row = conn.execute(q).mappings().first()
        return self._exchange_dict(row) if row else None

    @staticmethod
    def _exchange_dict(row: Any) -> dict[str, Any]:
        d = dict(row)
        if "created_at" in d:
            d["created_at"] = _aware(d["created_at"])
        if "stream" in d:
            d["stream"] = bool(d["stream"])
        return d

    def exchanges(
        self,
        since: datetime | None = None,
        until: datetime | None = None,
        tenants: list[str] | None = None,
        releases: list[str] | None = None,
        columns: list[str] | None = None,
    ) -> Iterator[dict[str, Any]]:
        """Exchanges in ``[since, until)``, oldest first, optionally filtered by tenant/release;
        ``columns`` reads only those (the online rules skip the messages and answers)."""
        self.flush()
        q = _window_query(requests_table, since, until, tenants, columns)
        if releases:
            q = q.where(requests_table.c.release.in_(releases))
        with self.engine.connect() as conn:
            for row in conn.execute(q).mappings():
                yield self._exchange_dict(row)

    def feedback_events(
        self,
        since: datetime | None = None,
        until: datetime | None = None,
        tenants: list[str] | None = None,
    ) -> Iterator[dict[str, Any]]:
        """Feedback in ``[since, until)``, oldest first."""
        q = _window_query(feedback_table, since, until, tenants)
        with self.engine.connect() as conn:
            for row in conn.execute(q).mappings():
                d = dict(row)
                d["created_at"] = _aware(d["created_at"])
                yield d

    def count_exchanges(self) -> int:
        self.flush()

        with self.engine.connect() as conn:
            return conn.execute(select(func.count()).select_from(requests_table)).scalar_one()


def _add_missing_columns(engine: Engine) -> None:
    """Add columns that newer code declares to tables an older version created (nullable or
    defaulted columns only, so existing rows stay valid). No migration framework for two tables."""
    insp = inspect(engine)
    for table in (requests_table, feedback_table):
        have = {c["name"] for c in insp.get_columns(table.name)}
        for col in table.columns:
            if col.name in have:
                continue
            ddl = f"ALTER TABLE {table.name} ADD COLUMN {col.name} {col.type.compile(engine.dialect)}"
            if col.default is not None:
                ddl += f" DEFAULT '{col.default.arg}'"
            with engine.begin() as conn:
                conn.execute(text(ddl))


def _window_query(
    t: Table, since: datetime | None, until: datetime | None, tenants: list[str] | None,
    columns: list[str] | None = None,
):
    """Rows of ``t`` with ``created_at`` in ``[since, until)``, oldest first, for ``tenants``."""
    q = (select(*(t.c[c] for c in columns)) if columns else select(t)).order_by(t.c.created_at, t.c.id)
    if since is not None:
        q = q.where(t.c.created_at >= since)
    if until is not None:
        q = q.where(t.c.created_at < until)
    if tenants:
        q = q.where(t.c.tenant.in_(tenants))
    return q


def default_url() -> str:
    path = data_dir() / "logs.db"
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"
