"""The audit trail: one row per gallery write, written in the write's own transaction.

Every write a store makes (create or delete a gallery, enroll, rename or change metadata,
delete an identity or a face, switch a gallery to a re-embedded model) adds an
``adaface_audit`` row saying who (:class:`Actor`: the API key's name, or the command line's
user), from where (the client's address), what (``action``), to which gallery, identity and
face ids, and when (seconds since the epoch, UTC). The row commits with the write or not at
all, so an acknowledged write always has its row, and a failed one has none.

The trail holds no biometric data: no embedding, no crop, no photo hash. Rows are not tied to
the gallery's rows, so deleting an identity or a gallery keeps the record of what was done.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

#: every action a row can record, with what it means
ACTIONS = {
    "gallery.create": "a gallery was created",
    "gallery.delete": "a gallery and everything in it were deleted",
    "identity.enroll": "faces were added to an identity (created when new)",
    "identity.update": "an identity was renamed or its metadata replaced",
    "identity.merge": "an identity's faces were moved to another identity and it was deleted",
    "identity.delete": "an identity and its faces were deleted",
    "face.delete": "one face was deleted",
    "faces.delete": "several faces were deleted at once",
    "gallery.reembed": "the gallery switched to a re-embedded model",
}
#: rows per page of :meth:`gallery.store.GalleryStore.audit_events`, at most
MAX_EVENTS = 1000
#: face ids listed in one row, at most (a gallery delete records the count instead)
MAX_FACE_IDS = 10_000


@dataclass(frozen=True)
class Actor:
    """Who made a write: ``name`` (an API key's name, ``cli:<user>``, ``local`` for library
    callers) and ``address`` (the client's IP address; empty when there is none)."""

    name: str = "local"
    address: str = ""


LOCAL = Actor()


@dataclass(frozen=True)
class AuditEvent:
    """One row of the trail; ``at`` in seconds since the epoch (UTC)."""

    id: int
    at: float
    actor: str
    address: str
    action: str
    gallery: str
    identity: Optional[str] = None
    identity_id: Optional[int] = None
    face_ids: tuple = ()
    detail: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"id": self.id, "at": self.at, "actor": self.actor, "address": self.address,
                "action": self.action, "gallery": self.gallery, "identity": self.identity,
                "identity_id": self.identity_id, "face_ids": list(self.face_ids), "detail": self.detail}


SCHEMA = """
CREATE TABLE IF NOT EXISTS adaface_audit (
    id {id_column},
    at {real} NOT NULL,
    actor TEXT NOT NULL,
    address TEXT NOT NULL,
    action TEXT NOT NULL,
    gallery TEXT NOT NULL,
    identity TEXT,
    identity_id {integer},
    face_ids TEXT NOT NULL,
    detail TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS adaface_audit_gallery ON adaface_audit (gallery, id);
"""
COLUMNS = "id, at, actor, address, action, gallery, identity, identity_id, face_ids, detail"


def write(tx, actor: Optional[Actor], action: str, gallery: str, identity: Optional[str] = None,
          identity_id: Optional[int] = None, face_ids: Sequence[int] = (), detail: Optional[dict] = None) -> None:
    """Add one row in the transaction ``tx`` (a :class:`gallery.sql.Tx`)."""
    if action not in ACTIONS:
        raise ValueError(f"unknown audit action {action!r}")
    actor = actor or LOCAL
    ids = [int(f) for f in face_ids]
    detail = dict(detail or {})
    if len(ids) > MAX_FACE_IDS:
        detail["face_ids_left_out"] = len(ids) - MAX_FACE_IDS
        ids = ids[:MAX_FACE_IDS]
    tx.run("INSERT INTO adaface_audit (at, actor, address, action, gallery, identity, identity_id, face_ids, detail) "
           "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
           (time.time(), actor.name, actor.address, action, gallery, identity, identity_id,
            ",".join(str(i) for i in ids), json.dumps(detail, sort_keys=True)))


def query(galleries: Optional[Sequence[str]] = None, identity: Optional[str] = None, action: Optional[str] = None,
          before: Optional[int] = None, limit: int = 100) -> tuple:
    """(SQL, args): the newest rows first, ``limit`` of them, filtered by gallery names (None:
    every gallery), identity name, action and ``before`` (an id: rows older than it)."""
    where, args = [], []
    if galleries is not None:
        if not galleries:
            where.append("1 = 0")
        else:
            where.append(f"gallery IN ({','.join(['%s'] * len(galleries))})")
            args += list(galleries)
    for column, value in (("identity", identity), ("action", action)):
        if value is not None:
            where.append(f"{column} = %s")
            args.append(value)
    if before is not None:
        where.append("id < %s")
        args.append(int(before))
    clause = f" WHERE {' AND '.join(where)}" if where else ""
    args.append(max(1, min(int(limit), MAX_EVENTS)))
    return f"SELECT {COLUMNS} FROM adaface_audit{clause} ORDER BY id DESC LIMIT %s", args


def event(row: tuple) -> AuditEvent:
    """An :class:`AuditEvent` from a row of :data:`COLUMNS`."""
    ids = tuple(int(i) for i in row[8].split(",") if i) if row[8] else ()
    return AuditEvent(int(row[0]), float(row[1]), row[2], row[3], row[4], row[5], row[6],
                      None if row[7] is None else int(row[7]), ids, json.loads(row[9]) if row[9] else {})
