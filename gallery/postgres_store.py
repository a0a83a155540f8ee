"""The shared backend: PostgreSQL as the durable source of truth for several replicas.

Vectors are stored as 2,048-byte float32 ``bytea``; search stays in each replica's memory
(:mod:`gallery.index`). Every write that adds or removes faces bumps the gallery's version under
its row lock, logs the faces touched in ``adaface_changes`` and sends ``NOTIFY adaface_gallery``
with ``"<gallery id>:<version>"`` at commit. Each replica's listener thread (a native thread, also
under gevent) receives it and loads the delta from the change log, so a write made on one replica
is in every other replica's search matrix within milliseconds; after a lost connection the
listener reconnects and catches up from the log.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import psycopg

from adaface.threads import allocate_lock, native_sleep, start_new_thread

from .errors import ConflictError, StoreUnavailableError
from .sql import SqlStore, Tx, schema

logger = logging.getLogger(__name__)

CHANNEL = "adaface_gallery"
#: pg_advisory_xact_lock key that serialises schema creation between replicas starting together
SCHEMA_LOCK = 0x61646166
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
    """A gallery store in a PostgreSQL database (tables created on first connection)."""

    def __init__(self, url: str):
        self.url = url
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
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
        return conn

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

    def subscribe(self, on_change: Callable[[int, int], None], on_reconnect: Callable[[], None]) -> bool:
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
