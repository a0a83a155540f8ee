"""Search in PostgreSQL with pgvector (0.8 or newer): the schema it needs and the search itself.

Where the ``vector`` extension is available, :class:`gallery.postgres_store.PostgresStore` adds:

- ``adaface_faces.embedding_half halfvec(512)``: each face's float32 embedding rounded to half
  precision. The float32 ``embedding`` stays the exact source (export, re-embedding, rescoring).
- The trigger ``adaface_faces_half``: on every INSERT, and every UPDATE that sets ``embedding``
  (re-embedding), it sets ``embedding_half`` from the bytes in PostgreSQL itself, through the SQL
  function ``adaface_halfvec(bytea)`` (about 0.25 ms a face), so every writer fills it, whatever
  SQL it runs, in the same transaction as the embedding.
- The HNSW index ``adaface_faces_half_hnsw`` (``halfvec_ip_ops``: inner product, the vectors are
  unit length; ``m`` 16, ``ef_construction`` 64), over the faces of every gallery.

A database made before (the column missing) is upgraded under the schema lock: the column and the
trigger are added, the existing faces filled in batches (converted here with numpy and copied in
binary), then the index built with ``CREATE INDEX CONCURRENTLY``, so replicas of the previous
version keep writing meanwhile.

The search (:func:`search`) asks the index for each probe's nearest faces in one gallery: one
index over all galleries, filtered by ``gallery_id`` with pgvector 0.8's iterative index scan
(``hnsw.iterative_scan = relaxed_order``: the scan goes on until enough faces of the gallery are
found, at most ``hnsw.max_scan_tuples``). The candidates are rescored with their float32 bytes,
so the similarities answered are the exact float32 cosines, and each identity is kept once with
its best face. Queries are planned with their gallery's id (never as prepared generic plans), so
for a gallery that is a small part of the table the planner reads its faces through the
``gallery_id`` index instead; a scan that comes back short is answered by the exact search.
``exact=True`` does not use the HNSW index: the gallery's faces ordered by halfvec similarity,
rescored in float32, read until no face left could beat the k-th identity found (halfvec's error
on a cosine is below :data:`HALF_ERROR`), so its answer is the exhaustive float32 one.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np
import psycopg

from adaface.options import EMBEDDING_SIZE

from .index import Hit
from .store import blobs_to_matrix

logger = logging.getLogger(__name__)

#: the oldest pgvector with iterative index scans
MIN_VERSION = (0, 8)
COLUMN = "embedding_half"
INDEX = "adaface_faces_half_hnsw"
TRIGGER = "adaface_faces_half"
#: faces per batch when an existing database is filled
BACKFILL_BATCH = 10_000
#: bound on |halfvec cosine - float32 cosine| for unit vectors: each factor rounded to half
#: (relative error 2^-11 a component, so at most 2^-11 on the cosine each) plus the float32 sum,
#: doubled for margin
HALF_ERROR = 2e-3

# float32 little-endian bytes -> halfvec: sign, exponent and mantissa of each word taken apart
# (exponent 0: zero or subnormal), rounded to half by the cast, as numpy's astype(float16) does.
_HALFVEC_FUNCTION = """
CREATE OR REPLACE FUNCTION adaface_halfvec(embedding bytea) RETURNS halfvec
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
SELECT ARRAY(
    SELECT (1 - 2 * (hi >> 7))::float8 * ((w & 8388607) + CASE WHEN e > 0 THEN 8388608 ELSE 0 END)
           * pow(2.0::float8, greatest(e, 1) - 150)
    FROM (SELECT o, hi, w, w >> 23 AS e
          FROM (SELECT o, get_byte(embedding, o + 3) AS hi,
                       get_byte(embedding, o) | (get_byte(embedding, o + 1) << 8)
                       | (get_byte(embedding, o + 2) << 16) | ((get_byte(embedding, o + 3) & 127) << 24) AS w
                FROM generate_series(0, length(embedding) - 4, 4) AS o) AS words) AS parts
    ORDER BY o
)::halfvec
$$
"""

_TRIGGER_FUNCTION = f"""
CREATE OR REPLACE FUNCTION adaface_faces_half() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.{COLUMN} := adaface_halfvec(NEW.embedding);
    RETURN NEW;
END
$$
"""

_TRIGGER = (f"CREATE TRIGGER {TRIGGER} BEFORE INSERT OR UPDATE OF embedding ON adaface_faces "
            "FOR EACH ROW EXECUTE FUNCTION adaface_faces_half()")


def index_sql(concurrently: bool) -> str:
    """The statement that builds the HNSW index (``CONCURRENTLY``: without blocking writes)."""
    how = "CONCURRENTLY " if concurrently else ""
    return (f"CREATE INDEX {how}IF NOT EXISTS {INDEX} ON adaface_faces USING hnsw ({COLUMN} halfvec_ip_ops) "
            "WITH (m = 16, ef_construction = 64)")


@dataclass(frozen=True)
class Status:
    """What :func:`install` found: the pgvector version in use (None: search stays in memory,
    ``reason`` says why), and whether every face has its halfvec and the HNSW index is built and
    valid (if not, :func:`upgrade` is due)."""

    version: Optional[str]
    reason: str = ""
    ready: bool = False


@dataclass(frozen=True)
class SearchSettings:
    """The HNSW search's knobs: ``ef_search`` (the graph walk's candidate list, pgvector's
    ``hnsw.ef_search``), ``candidates`` (faces fetched and rescored per probe, at least
    4 × top_k), ``max_scan_tuples`` (how far an iterative scan may go looking for the gallery's
    faces) and ``iterative_scan`` (``relaxed_order``, ``strict_order`` or ``off``)."""

    ef_search: int = 200
    candidates: int = 40
    max_scan_tuples: int = 20_000
    iterative_scan: str = "relaxed_order"


def parse_version(text: str) -> tuple:
    """``"0.8.2"`` -> (0, 8, 2); a suffix after the numbers is ignored."""
    parts = []
    for piece in text.split("."):
        digits = "".join(c for c in piece if c.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


# -- schema ------------------------------------------------------------------------------------

def install(conn: psycopg.Connection) -> Status:
    """Inside the schema transaction: create the extension where it can be, and when it is recent
    enough add what is missing of the function, the column and the trigger (and the index, on an
    empty table). Changes nothing when pgvector cannot be used."""
    version = _extension_version(conn)
    if version is None:
        return Status(None, "the vector extension is not available")
    if parse_version(version) < MIN_VERSION:
        wanted = ".".join(map(str, MIN_VERSION))
        return Status(None, f"pgvector {version} is older than {wanted} (ALTER EXTENSION vector UPDATE)")
    added = []
    problem = _attempt(conn, lambda c: added.append(_add_column(c)))
    if problem:
        return Status(None, f"cannot add the halfvec column: {problem}")
    return Status(version, ready=not added[0] and _index_valid(conn) is True)


def _attempt(conn: psycopg.Connection, step) -> Optional[str]:
    """Run ``step(conn)`` in a savepoint; None, or why it failed (it then changed nothing).
    A lost connection is raised."""
    try:
        with conn.transaction():
            step(conn)
    except psycopg.Error as exc:
        if conn.broken or conn.closed:
            raise
        return exc.diag.message_primary or str(exc)
    return None


def _extension_version(conn: psycopg.Connection) -> Optional[str]:
    """The installed pgvector version, after creating the extension where the server has it."""
    installed = conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'vector'").fetchone()
    if installed:
        return installed[0]
    if not conn.execute("SELECT 1 FROM pg_available_extensions WHERE name = 'vector'").fetchone():
        return None
    problem = _attempt(conn, lambda c: c.execute("CREATE EXTENSION IF NOT EXISTS vector"))
    if problem:
        logger.warning("gallery search: CREATE EXTENSION vector failed: %s", problem)
        return None
    return conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'vector'").fetchone()[0]


def _add_column(conn: psycopg.Connection) -> bool:
    """Function, column, trigger, each only when missing (ALTER TABLE locks the whole table);
    True when faces stored without the trigger may lack their halfvec."""
    conn.execute(_HALFVEC_FUNCTION)
    conn.execute(_TRIGGER_FUNCTION)
    added = False
    if not conn.execute("SELECT 1 FROM pg_attribute WHERE attrelid = 'adaface_faces'::regclass "
                        "AND attname = %s AND NOT attisdropped", (COLUMN,)).fetchone():
        conn.execute(f"ALTER TABLE adaface_faces ADD COLUMN IF NOT EXISTS {COLUMN} halfvec({EMBEDDING_SIZE})")
        added = True
    if not conn.execute("SELECT 1 FROM pg_trigger WHERE tgrelid = 'adaface_faces'::regclass AND tgname = %s",
                        (TRIGGER,)).fetchone():
        conn.execute(_TRIGGER)
        added = True
    # the table is locked from the trigger's creation until commit, so an empty one stays empty
    if added and not conn.execute("SELECT 1 FROM adaface_faces LIMIT 1").fetchone():
        if _index_valid(conn) is None:
            conn.execute(index_sql(concurrently=False))
        return False
    return added


def _index_valid(conn: psycopg.Connection) -> Optional[bool]:
    """True when the HNSW index exists and is valid, False when a failed build left it invalid,
    None when there is none."""
    row = conn.execute("SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass(%s)", (INDEX,)).fetchone()
    return None if row is None else bool(row[0])


def upgrade(conn: psycopg.Connection) -> None:
    """Fill ``embedding_half`` for the faces stored before the column, then build the index.

    ``conn`` is in autocommit and holds the schema lock; each batch commits on its own, and the
    index is built ``CONCURRENTLY``, so other writers are not held up.
    """
    filled = backfill(conn)
    valid = _index_valid(conn)
    if valid:
        return
    logger.info("gallery search: building the HNSW index (%d faces backfilled)", filled)
    if valid is False:                       # left by a build that failed
        conn.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {INDEX}")
    conn.execute(index_sql(concurrently=True))
    logger.info("gallery search: HNSW index %s built", INDEX)


def backfill(conn: psycopg.Connection, batch: Optional[int] = None) -> int:
    """Set ``embedding_half`` where it is NULL, ``batch`` faces (by id) a transaction; the count.

    A face written meanwhile gets its halfvec from the trigger, and one re-embedded between the
    read and the write keeps the trigger's (only NULLs are written).
    """
    batch = batch or BACKFILL_BATCH
    last, filled = 0, 0
    while True:
        rows = conn.execute(f"SELECT id, embedding FROM adaface_faces WHERE id > %s AND {COLUMN} IS NULL "
                            "ORDER BY id LIMIT %s", (last, batch)).fetchall()
        if not rows:
            return filled
        ids = np.array([r[0] for r in rows], np.int64)
        filled += _fill(conn, ids, blobs_to_matrix([bytes(r[1]) for r in rows]))
        last = int(ids[-1])
        logger.info("gallery search: %d faces of the existing ones given their halfvec", filled)


def _fill(conn: psycopg.Connection, ids: np.ndarray, vectors: np.ndarray) -> int:
    """One backfill transaction: the halfvecs copied into a temporary table, then set where NULL."""
    with conn.transaction(), conn.cursor() as cursor:
        cursor.execute(f"CREATE TEMP TABLE adaface_half_batch (id bigint, h halfvec({EMBEDDING_SIZE})) "
                       "ON COMMIT DROP")
        with cursor.copy("COPY adaface_half_batch (id, h) FROM STDIN (FORMAT BINARY)") as copy:
            copy.write(halfvec_copy(ids, vectors))
        cursor.execute(f"UPDATE adaface_faces f SET {COLUMN} = b.h FROM adaface_half_batch b "
                       f"WHERE f.id = b.id AND f.{COLUMN} IS NULL")
        return cursor.rowcount


def halfvec_copy(ids: np.ndarray, vectors: np.ndarray) -> bytes:
    """``COPY ... (FORMAT BINARY)`` data of rows (bigint id, halfvec): ids int64 (n,), vectors
    float32 (n, 512), rounded to half as pgvector rounds them."""
    dim = vectors.shape[1]
    row = np.dtype([("fields", ">i2"), ("id_size", ">i4"), ("id", ">i8"), ("vector_size", ">i4"),
                    ("dim", ">i2"), ("unused", ">i2"), ("x", ">f2", (dim,))])
    rows = np.zeros(len(ids), row)
    rows["fields"], rows["id_size"], rows["id"] = 2, 8, ids
    rows["vector_size"], rows["dim"], rows["x"] = 4 + 2 * dim, dim, vectors
    return b"PGCOPY\n\xff\r\n\x00" + bytes(8) + rows.tobytes() + b"\xff\xff"


# -- search ------------------------------------------------------------------------------------

_NEAREST = (f"SELECT id, identity_id, embedding, {COLUMN} <#> %s::halfvec AS distance FROM adaface_faces "
            "WHERE gallery_id = %s ORDER BY distance LIMIT %s")


def search(conn: psycopg.Connection, gallery_id: int, probes: np.ndarray, top_k: int, exact: bool,
           settings: SearchSettings) -> list:
    """For each probe (float32 (m, 512) unit rows) up to ``top_k`` :class:`Hit`, best first.

    ``conn`` is inside a transaction (the ``SET LOCAL`` settings end with it).
    """
    probes = np.ascontiguousarray(np.atleast_2d(probes), np.float32)
    if top_k < 1:
        return [[] for _ in probes]
    configure(conn, exact, settings)
    find = _exact if exact else _approximate
    return [find(conn, gallery_id, probe, top_k, settings) for probe in probes]


def configure(conn: psycopg.Connection, exact: bool, settings: SearchSettings) -> None:
    """The transaction's search settings: the HNSW scan's, or no index scan at all for ``exact``."""
    if exact:
        conn.execute("SET LOCAL enable_indexscan = off")
        return
    ef_search = min(1000, max(settings.ef_search, settings.candidates))
    conn.execute("SELECT set_config('hnsw.ef_search', %s, true), set_config('hnsw.iterative_scan', %s, true), "
                 "set_config('hnsw.max_scan_tuples', %s, true)",
                 (str(ef_search), settings.iterative_scan, str(settings.max_scan_tuples)))


def _approximate(conn, gallery_id: int, probe: np.ndarray, top_k: int, settings: SearchSettings) -> list:
    limit = max(settings.candidates, 4 * top_k)
    while True:
        rows = nearest(conn, gallery_id, probe, limit)
        if len(rows) < limit:   # the gallery is smaller, or the scan stopped: search every face
            with _index_scans_off(conn):
                return _exact(conn, gallery_id, probe, top_k, settings)
        hits = best_identities(rows, probe, top_k)
        if len(hits) >= top_k:
            return hits
        limit *= 4


def _exact(conn, gallery_id: int, probe: np.ndarray, top_k: int, settings: SearchSettings) -> list:
    """The exhaustive float32 answer, with index scans off (see the module docstring)."""
    limit = max(settings.candidates, 4 * top_k)
    while True:
        rows = nearest(conn, gallery_id, probe, limit)
        hits = best_identities(rows, probe, top_k)
        # rows come by halfvec similarity (-distance); a face not read is at most HALF_ERROR above
        # the last one read, so once that is below the k-th identity's, none can enter the top k
        if len(rows) < limit or (len(hits) == top_k and -rows[-1][3] + HALF_ERROR < hits[-1].similarity):
            return hits
        limit *= 4


@contextmanager
def _index_scans_off(conn: psycopg.Connection) -> Iterator[None]:
    """``enable_indexscan`` off for the statements inside, back as it was after."""
    before = conn.execute("SELECT current_setting('enable_indexscan')").fetchone()[0]
    conn.execute("SET LOCAL enable_indexscan = off")
    try:
        yield
    finally:
        conn.execute("SELECT set_config('enable_indexscan', %s, true)", (before,))


def nearest(conn, gallery_id: int, probe: np.ndarray, limit: int) -> list:
    """(face id, identity id, float32 bytes, halfvec distance) of up to ``limit`` faces of the
    gallery, nearest first as the plan finds them. Never prepared: each query is planned with
    its gallery's id and statistics."""
    return conn.execute(_NEAREST, (halfvec_text(probe), gallery_id, limit), prepare=False).fetchall()


def best_identities(rows: list, probe: np.ndarray, top_k: int) -> list:
    """The ``top_k`` best identities among ``rows`` (from :func:`nearest`), by their faces'
    float32 cosine with ``probe``, each with its best face."""
    if not rows:
        return []
    similarities = blobs_to_matrix([bytes(r[2]) for r in rows]) @ probe
    hits, seen = [], set()
    for i in np.argsort(-similarities, kind="stable"):
        identity_id = rows[i][1]
        if identity_id not in seen:
            seen.add(identity_id)
            hits.append(Hit(int(identity_id), int(rows[i][0]), min(1.0, float(similarities[i]))))
            if len(hits) == top_k:
                break
    return hits


def halfvec_text(vector: np.ndarray) -> str:
    """A vector as pgvector's text input, ``[x1,x2,...]`` (float32 digits; PostgreSQL rounds it)."""
    return "[" + ",".join(f"{x:.9g}" for x in vector.tolist()) + "]"
