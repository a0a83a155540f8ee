"""The shared backend: PostgreSQL as the durable source of truth for several replicas.

Vectors are stored as 2,048-byte float32 ``bytea``. Where the database has pgvector 0.8 or newer,
they are also stored as ``halfvec`` with an HNSW index and search runs in PostgreSQL
(:mod:`gallery.pgvector`): :meth:`PostgresStore.search` answers, replicas hold no copy of the
vectors, and a write is searched by every replica from its commit.

Otherwise search stays in each replica's memory (:mod:`gallery.index`): every write that adds or
removes faces bumps the gallery's version under its row lock, logs the faces touched in
``adaface_changes`` and sends ``NOTIFY adaface_gallery`` with ``"<gallery id>:<version>"`` at
commit. Each replica's listener thread (a native thread, also under gevent) receives it and loads
the delta from the change log, so a write made on one replica is in every other replica's search
matrix within milliseconds; after a lost connection the listener reconnects and catches up from
the log. Which search is used is logged once, at the first connection.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import psycopg

from adaface.threads import allocate_lock, native_sleep, start_new_thread

from . import pgvector
from .errors import ConflictError, StoreUnavailableError
from .sql import SqlStore, Tx, schema

logger = logging.getLogger(__name__)

CHANNEL = "adaface_gallery"
#: advisory lock key that serialises schema creation and upgrades between replicas starting together
SCHEMA_LOCK = 0x61646166
#: how often a replica asks again for the schema lock while another holds it
SCHEMA_POLL_S = 0.2
CONNECT_TIMEOUT_S = 10
RECONNECT_DELAY_S = 1.0

SCHEMA = schema(id_column="BIGSERIAL PRIMARY KEY", integer="BIGINT", real="DOUBLE PRECISION", blob="BYTEA")


class _PgTx(Tx):
    def __init__(self, conn: psycopg.Connection):
        self.conn = conn

    def one(self, sql: str, args: Sequence = ()):
        return self.conn.execute(sql, tuple(args)).fetchone()

    def all(self, sql: str, args: Sequence = ()) -> list:
        return self.conn.execute(sql, tuple(args)).fetchall()

    def run(self, sql: str, args: Sequence = ()) -> int:
        return self.conn.execute(sql, tuple(args)).rowcount

    def stream(self, sql: str, args: Sequence = ()):
        with self.conn.cursor(name="adaface_stream") as cursor:   # server-side: fetched in batches
            cursor.itersize = 2000
            cursor.execute(sql, tuple(args))
            yield from cursor

    def notify(self, gallery_id: int, version: int) -> None:
        self.conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, f"{gallery_id}:{version}"))


class PostgresStore(SqlStore):
    """A gallery store in a PostgreSQL database (tables created on first connection).

    ``search_settings`` tune the HNSW search where pgvector is used (:class:`gallery.pgvector.SearchSettings`).
    """

    def __init__(self, url: str, search_settings: pgvector.SearchSettings = pgvector.SearchSettings()):
        self.url = url
        self.search_settings = search_settings
        #: the pgvector version searched with, or None (search in each replica's memory)
        self.pgvector: Optional[str] = None
        self._lock = allocate_lock()
        self._conn = None
        self._listener = None
        with self._lock:
            self._connection()

    def _connect(self) -> psycopg.Connection:
        try:
            conn = psycopg.connect(self.url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S)
        except psycopg.OperationalError as exc:
            raise StoreUnavailableError(f"cannot connect to the gallery database: {exc}") from exc
        try:
            status = self._prepare(conn)
        except BaseException:
            conn.close()
            raise
        previous, self.pgvector = self.pgvector, status.version
        if self._conn is None or previous != status.version:     # first connection, or a change
            self._log_search(status)
        return conn

    @classmethod
    def _prepare(cls, conn: psycopg.Connection) -> pgvector.Status:
        """Tables, then pgvector's column, trigger and index where it can be used; an existing
        database is upgraded (backfill, index build). All under the schema lock, a session lock
        here because the upgrade commits in batches."""
        cls._lock_schema(conn)
        try:
            with conn.transaction():
                for statement in SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                status = pgvector.install(conn)
            if status.version and not status.ready:
                pgvector.upgrade(conn)
                status = pgvector.Status(status.version, ready=True)
        finally:
            if not conn.broken:
                conn.execute("SELECT pg_advisory_unlock(%s)", (SCHEMA_LOCK,))
        return status

    @staticmethod
    def _lock_schema(conn: psycopg.Connection) -> None:
        """Take the schema lock, asking again every :data:`SCHEMA_POLL_S` while another replica
        holds it. Not a blocking ``pg_advisory_lock``: a statement waiting on it holds a snapshot,
        and the upgrade's ``CREATE INDEX CONCURRENTLY`` waits for every older snapshot, which
        would be a deadlock."""
        waiting = False
        while not conn.execute("SELECT pg_try_advisory_lock(%s)", (SCHEMA_LOCK,)).fetchone()[0]:
            if not waiting:
                logger.info("gallery store: waiting for another replica's schema creation or upgrade")
                waiting = True
            native_sleep(SCHEMA_POLL_S)

    @staticmethod
    def _log_search(status: pgvector.Status) -> None:
        """Say which search is used."""
        if status.version:
            logger.info("gallery search: in PostgreSQL with pgvector %s (HNSW over halfvec, rescored in float32)",
                        status.version)
        else:
            logger.info("gallery search: in each replica's memory (%s)", status.reason)

    def _connection(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._conn = self._connect()
        return self._conn

    @contextmanager
    def _transaction(self, write: bool, snapshot: bool = False) -> Iterator[Tx]:
        # Plain reads run in autocommit (one round trip per statement); writes in a transaction;
        # snapshot reads in a REPEATABLE READ one, so that all their statements see one state.
        with self._lock:
            conn = self._connection()
            try:
                if not (write or snapshot):
                    yield _PgTx(conn)
                    return
                with conn.transaction():
                    if snapshot:
                        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                    yield _PgTx(conn)
            except psycopg.IntegrityError as exc:
                raise ConflictError(f"a concurrent write conflicted; retry: {exc.diag.message_primary}") from exc
            except psycopg.OperationalError as exc:
                conn.close()
                raise StoreUnavailableError(f"gallery database error: {exc}") from exc

    def search(self, gallery_id: int, probes: np.ndarray, top_k: int, exact: bool = False) -> Optional[list]:
        """The HNSW search in PostgreSQL (see :mod:`gallery.pgvector`), in one read-only snapshot;
        None without pgvector."""
        if self.pgvector is None:
            return None
        with self._transaction(False, snapshot=True) as tx:
            return pgvector.search(tx.conn, gallery_id, probes, top_k, exact, self.search_settings)

    def subscribe(self, on_change: Callable[[int, int], None], on_reconnect: Callable[[], None]) -> bool:
        # With pgvector no replica holds vectors in memory: nothing to keep in step, no listener
        # (an index loaded all the same is brought up to date by its version check).
        if self.pgvector is not None:
            return False
        if self._listener is None:
            self._listener = _Listener(self.url, on_change, on_reconnect)
            self._listener.start()
        return True

    def close(self) -> None:
        if self._listener is not None:
            self._listener.stop()
        with self._lock:
            if self._conn is not None:
                self._conn.close()


class _Listener:
    """``LISTEN adaface_gallery`` on its own connection, in a native thread; reconnects on loss.

    After every (re)connection it calls ``on_reconnect`` so the caller catches up on anything
    committed while it was not listening; then ``on_change(gallery_id, version)`` per notification.
    """

    def __init__(self, url: str, on_change, on_reconnect):
        self.url, self.on_change, self.on_reconnect = url, on_change, on_reconnect
        self.stopped = False
        self.listening = False

    def start(self) -> None:
        start_new_thread(self._run, ())

    def stop(self) -> None:
        self.stopped = True

    def _run(self) -> None:
        while not self.stopped:
            try:
                with psycopg.connect(self.url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    self.listening = True
                    self._call(self.on_reconnect)
                    while not self.stopped:
                        for note in conn.notifies(timeout=0.5):
                            self._dispatch(note.payload)
            except Exception as exc:  # lost connection or server down: retry
                if not self.stopped:
                    logger.warning("gallery listener: %s; reconnecting in %.0f s", exc, RECONNECT_DELAY_S)
            self.listening = False
            if not self.stopped:
                native_sleep(RECONNECT_DELAY_S)

    def _dispatch(self, payload: str) -> None:
        try:
            gallery_id, version = (int(part) for part in payload.split(":"))
        except ValueError:
            logger.warning("gallery listener: ignoring notification %r", payload)
            return
        self._call(self.on_change, gallery_id, version)

    @staticmethod
    def _call(fn, *args) -> None:
        try:
            fn(*args)
        except Exception:  # a failed catch-up is retried by the next search's version check
            logger.exception("gallery listener: catching up failed")
