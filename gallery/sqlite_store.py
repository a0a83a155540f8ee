"""The embedded backend: one SQLite file in WAL mode, shared by every worker on the machine.

``synchronous=FULL``: a write is on disk when its call returns, so an acknowledged enroll survives
a crash of the process or the machine. Vectors are stored as 2,048-byte float32 blobs. Writers
take the write lock up front (``BEGIN IMMEDIATE``) and wait up to ``busy_timeout`` for another
process's write; readers never block (WAL). Other workers notice writes through the gallery's
``version`` column, which their search index checks before each query. Deleted rows are
overwritten (``secure_delete``) and the log emptied after each delete, so a deleted face or crop
leaves no bytes in the file.
"""
from __future__ import annotations

import logging
import sqlite3
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

from adaface.threads import allocate_lock

from .errors import ConflictError, StoreUnavailableError
from .sql import SqlStore, Tx, schema

logger = logging.getLogger(__name__)

BUSY_TIMEOUT_S = 30.0

SCHEMA = schema(id_column="INTEGER PRIMARY KEY AUTOINCREMENT", integer="INTEGER", real="REAL", blob="BLOB")


class _SqliteTx(Tx):
    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn

    @staticmethod
    def _sql(sql: str) -> str:
        return sql.replace("%s", "?")

    def one(self, sql: str, args: Sequence = ()):
        return self.conn.execute(self._sql(sql), tuple(args)).fetchone()

    def all(self, sql: str, args: Sequence = ()) -> list:
        return self.conn.execute(self._sql(sql), tuple(args)).fetchall()

    def run(self, sql: str, args: Sequence = ()) -> int:
        return self.conn.execute(self._sql(sql), tuple(args)).rowcount

    def stream(self, sql: str, args: Sequence = ()):
        yield from self.conn.execute(self._sql(sql), tuple(args))


def _rollback(conn: sqlite3.Connection) -> None:
    if conn.in_transaction:
        conn.execute("ROLLBACK")


class SqliteStore(SqlStore):
    """A gallery store in one SQLite file (created, with its folder, on first use)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.url = f"sqlite:///{self.path}"
        self._lock = allocate_lock()
        self._conn = self._connect()

    def _connect(self) -> sqlite3.Connection:
        if not self.path.parent.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            conn = sqlite3.connect(str(self.path), timeout=BUSY_TIMEOUT_S, isolation_level=None,
                                   check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute("PRAGMA secure_delete=ON")  # deleted rows (faces, crops) are overwritten with zeros
            conn.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT_S * 1000)}")
            conn.execute("BEGIN IMMEDIATE")
            try:
                for statement in SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise StoreUnavailableError(f"cannot open the gallery database {self.path}: {exc}") from exc
        return conn

    @contextmanager
    def _transaction(self, write: bool, snapshot: bool = False) -> Iterator[Tx]:
        # One connection per store, used by one thread at a time; reads run in a transaction so
        # that their statements see one snapshot of the file.
        with self._lock:
            conn = self._conn
            try:
                conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            except sqlite3.OperationalError as exc:
                raise StoreUnavailableError(f"the gallery database is busy: {exc}") from exc
            try:
                yield _SqliteTx(conn)
                conn.execute("COMMIT")
            except sqlite3.IntegrityError as exc:
                _rollback(conn)
                raise ConflictError(f"a concurrent write conflicted; retry: {exc}") from exc
            except sqlite3.OperationalError as exc:
                _rollback(conn)
                raise StoreUnavailableError(f"gallery database error: {exc}") from exc
            except BaseException:
                _rollback(conn)
                raise

    def _forget(self) -> None:
        """Copy the write-ahead log into the file and empty it: until then the pages as they were
        before a delete (a crop's bytes among them) stay in the log."""
        with self._lock:
            try:
                self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error as exc:  # a reader holds the log; the next checkpoint completes it
                logger.warning("gallery database %s: checkpoint after a delete failed: %s", self.path, exc)

    def close(self) -> None:
        with self._lock:
            self._conn.close()
