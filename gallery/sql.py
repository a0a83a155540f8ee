"""The SQL both backends share: every store operation written once over a tiny transaction API.

Statements use ``%s`` placeholders (SQLite's backend rewrites them to ``?``). A backend supplies
``_transaction(write)``, a context manager yielding a :class:`Tx`; a write transaction serialises
with other writers to the same gallery (SQLite: ``BEGIN IMMEDIATE``; PostgreSQL: the row lock
taken by the version bump), so a gallery's versions commit in order.
"""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from typing import Iterator, Optional, Sequence

import numpy as np

from adaface.identity import ModelIdentity

from . import audit
from .audit import Actor, AuditEvent

from .errors import (CropNotFoundError, FaceNotFoundError, GalleryExistsError, GalleryNotFoundError, IdentityExistsError,
                     ModelMismatchError,
                     IdentityNotFoundError)
from adaface.options import EMBEDDING_SIZE

from .store import (ExportRow, FaceRecord, Gallery, GalleryStore, Identity, Enrolled, NewFace, ReembedState,
                    Rows, DROPPED, blobs_to_matrix, check_face_id, check_gallery_name, check_identity_name,
                    check_metadata, read_metadata, vector_blob)

logger = logging.getLogger(__name__)

#: ids per IN (...) list
CHUNK = 500
#: faces per piece of a chunked snapshot (8 MiB of float32)
SNAPSHOT_ROWS = 4_096
#: a gallery's faces for a snapshot, in id order (one parameter: the gallery id)
_SNAPSHOT_FACES = "SELECT id, identity_id, embedding FROM adaface_faces WHERE gallery_id = %s ORDER BY id"
#: a gallery's face ids, as a subquery with one parameter (the gallery id)
_GALLERY_FACES = "SELECT id FROM adaface_faces WHERE gallery_id = %s"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS adaface_galleries (
    id {id_column},
    name TEXT NOT NULL UNIQUE,
    created_at {real} NOT NULL,
    version {integer} NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS adaface_identities (
    id {id_column},
    gallery_id {integer} NOT NULL REFERENCES adaface_galleries (id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    metadata TEXT,
    created_at {real} NOT NULL,
    UNIQUE (gallery_id, name)
);
CREATE TABLE IF NOT EXISTS adaface_faces (
    id {id_column},
    identity_id {integer} NOT NULL REFERENCES adaface_identities (id) ON DELETE CASCADE,
    gallery_id {integer} NOT NULL,
    embedding {blob} NOT NULL,
    norm {real} NOT NULL,
    photo_sha256 TEXT NOT NULL,
    created_at {real} NOT NULL,
    UNIQUE (identity_id, photo_sha256)
);
CREATE INDEX IF NOT EXISTS adaface_faces_gallery ON adaface_faces (gallery_id);
CREATE TABLE IF NOT EXISTS adaface_changes (
    gallery_id {integer} NOT NULL,
    version {integer} NOT NULL,
    face_id {integer} NOT NULL,
    op TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS adaface_changes_gallery ON adaface_changes (gallery_id, version);
CREATE TABLE IF NOT EXISTS adaface_gallery_models (
    gallery_id {integer} PRIMARY KEY REFERENCES adaface_galleries (id) ON DELETE CASCADE,
    arch TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    synthetic {integer} NOT NULL,
    set_at {real} NOT NULL
);
CREATE TABLE IF NOT EXISTS adaface_crops (
    face_id {integer} PRIMARY KEY REFERENCES adaface_faces (id) ON DELETE CASCADE,
    png {blob} NOT NULL
);
CREATE TABLE IF NOT EXISTS adaface_reembed (
    face_id {integer} PRIMARY KEY REFERENCES adaface_faces (id) ON DELETE CASCADE,
    gallery_id {integer} NOT NULL,
    fingerprint TEXT NOT NULL,
    embedding {blob} NOT NULL,
    norm {real} NOT NULL
);
CREATE INDEX IF NOT EXISTS adaface_reembed_gallery ON adaface_reembed (gallery_id, fingerprint);
"""


def schema(id_column: str, integer: str, real: str, blob: str) -> str:
    """The tables and indexes, in a backend's column types: ``id_column`` (an auto-increment
    primary key), ``integer`` (64-bit), ``real`` (double) and ``blob`` (bytes)."""
    return (_SCHEMA + audit.SCHEMA).format(id_column=id_column, integer=integer, real=real, blob=blob)


class Tx:
    """One transaction's statements: ``one``/``all`` fetch rows, ``run`` returns the row count.
    ``notify(gallery_id, version)`` announces a change at commit where the backend can."""

    def one(self, sql: str, args: Sequence = ()) -> Optional[tuple]:
        raise NotImplementedError

    def all(self, sql: str, args: Sequence = ()) -> list:
        raise NotImplementedError

    def run(self, sql: str, args: Sequence = ()) -> int:
        raise NotImplementedError

    def stream(self, sql: str, args: Sequence = ()) -> Iterator[tuple]:
        """Rows one at a time, without holding the whole result in memory."""
        raise NotImplementedError

    def notify(self, gallery_id: int, version: int) -> None:
        """Nothing by default (SQLite readers poll the version)."""


def _marks(n: int) -> str:
    return ",".join(["%s"] * n)


class SqlStore(GalleryStore):
    """All of :class:`GalleryStore` in SQL; subclasses add connections and transactions."""

    def _transaction(self, write: bool):
        raise NotImplementedError

    @contextmanager
    def _read(self) -> Iterator[Tx]:
        with self._transaction(False) as tx:
            yield tx

    @contextmanager
    def _write(self) -> Iterator[Tx]:
        with self._transaction(True) as tx:
            yield tx

    # -- helpers -----------------------------------------------------------------------------

    @staticmethod
    def _gallery_id(tx: Tx, name: str) -> int:
        row = tx.one("SELECT id FROM adaface_galleries WHERE name = %s", (check_gallery_name(name),))
        if row is None:
            raise GalleryNotFoundError(name)
        return row[0]

    @staticmethod
    def _identity_row(tx: Tx, gallery_id: int, gallery: str, name: str) -> tuple:
        row = tx.one("SELECT id, name, metadata, created_at FROM adaface_identities "
                     "WHERE gallery_id = %s AND name = %s", (gallery_id, check_identity_name(name)))
        if row is None:
            raise IdentityNotFoundError(gallery, name)
        return row

    @staticmethod
    def _identity_with_faces(tx: Tx, identity_id: int) -> Identity:
        """The identity with its face records, as this transaction sees it."""
        ident = tx.one("SELECT id, name, metadata, created_at FROM adaface_identities WHERE id = %s", (identity_id,))
        faces = tx.all("SELECT id, identity_id, norm, photo_sha256, created_at FROM adaface_faces "
                       "WHERE identity_id = %s ORDER BY id", (identity_id,))
        records = tuple(FaceRecord(*f) for f in faces)
        return Identity(ident[0], ident[1], read_metadata(ident[2]), ident[3], len(records), records)

    @staticmethod
    def _lock_gallery(tx: Tx, gallery_id: int) -> None:
        """Serialise with the gallery's other writers now (PostgreSQL: its row lock, which the
        version bump takes anyway), before reading what the write will change: an enroll that
        commits in between would otherwise add faces this write does not see."""
        tx.run("UPDATE adaface_galleries SET version = version WHERE id = %s", (gallery_id,))

    @staticmethod
    def _record(tx: Tx, gallery_id: int, face_ids: Sequence[int], op: str) -> int:
        """Bump the gallery's version and log ``op`` ('add' or 'del') for each face; the new version."""
        version = tx.one("UPDATE adaface_galleries SET version = version + 1 WHERE id = %s RETURNING version",
                         (gallery_id,))[0]
        for start in range(0, len(face_ids), CHUNK):
            chunk = face_ids[start:start + CHUNK]
            values = ",".join(["(%s, %s, %s, %s)"] * len(chunk))
            args = [a for fid in chunk for a in (gallery_id, version, fid, op)]
            tx.run(f"INSERT INTO adaface_changes (gallery_id, version, face_id, op) VALUES {values}", args)
        tx.notify(gallery_id, version)
        return version

    @staticmethod
    def _gallery(row) -> Gallery:
        model = ModelIdentity(row[6], row[7], bool(row[8])) if len(row) > 8 and row[6] is not None else None
        return Gallery(id=row[0], name=row[1], created_at=row[2], version=row[3],
                       identities=row[4] if len(row) > 4 else 0, faces=row[5] if len(row) > 5 else 0, model=model)

    _GALLERY_COLUMNS = ("g.id, g.name, g.created_at, g.version, "
                        "(SELECT count(*) FROM adaface_identities i WHERE i.gallery_id = g.id), "
                        "(SELECT count(*) FROM adaface_faces f WHERE f.gallery_id = g.id), "
                        "m.arch, m.fingerprint, m.synthetic")
    _GALLERY_FROM = "adaface_galleries g LEFT JOIN adaface_gallery_models m ON m.gallery_id = g.id"

    @staticmethod
    def _model_of(tx: Tx, gallery_id: int) -> Optional[ModelIdentity]:
        row = tx.one("SELECT arch, fingerprint, synthetic FROM adaface_gallery_models WHERE gallery_id = %s",
                     (gallery_id,))
        return ModelIdentity(row[0], row[1], bool(row[2])) if row else None

    @staticmethod
    def _set_model(tx: Tx, gallery_id: int, model: ModelIdentity) -> None:
        tx.run("DELETE FROM adaface_gallery_models WHERE gallery_id = %s", (gallery_id,))
        tx.run("INSERT INTO adaface_gallery_models (gallery_id, arch, fingerprint, synthetic, set_at) "
               "VALUES (%s, %s, %s, %s, %s)", (gallery_id, model.arch, model.fingerprint, int(model.synthetic),
                                                time.time()))

    def _match_model(self, tx: Tx, gallery_id: int, gallery: str, model: ModelIdentity) -> ModelIdentity:
        """The gallery's model checked against ``model`` (set from it where there is none)."""
        stored = self._model_of(tx, gallery_id)
        if stored is None:
            faces = tx.one("SELECT count(*) FROM adaface_faces WHERE gallery_id = %s", (gallery_id,))[0]
            if faces:
                logger.warning("gallery %s: %d faces stored before models were recorded; taken as made by the "
                               "running model %s", gallery, faces, model.name)
            self._set_model(tx, gallery_id, model)
            return model
        if stored.fingerprint != model.fingerprint or stored.arch != model.arch:
            raise ModelMismatchError(gallery, stored, model)
        return stored

    # -- galleries ---------------------------------------------------------------------------

    def create_gallery(self, name: str, actor: Optional[Actor] = None) -> Gallery:
        check_gallery_name(name)
        with self._write() as tx:
            row = tx.one("INSERT INTO adaface_galleries (name, created_at, version) VALUES (%s, %s, 0) "
                         "ON CONFLICT (name) DO NOTHING RETURNING id, name, created_at, version",
                         (name, time.time()))
            if row is not None:
                audit.write(tx, actor, "gallery.create", name)
        if row is None:
            raise GalleryExistsError(name)
        return self._gallery(row)

    def ensure_gallery(self, name: str, actor: Optional[Actor] = None) -> Gallery:
        check_gallery_name(name)
        with self._write() as tx:
            if tx.run("INSERT INTO adaface_galleries (name, created_at, version) VALUES (%s, %s, 0) "
                      "ON CONFLICT (name) DO NOTHING", (name, time.time())):
                audit.write(tx, actor, "gallery.create", name)
            row = tx.one(f"SELECT {self._GALLERY_COLUMNS} FROM {self._GALLERY_FROM} WHERE g.name = %s", (name,))
        return self._gallery(row)

    def get_gallery(self, name: str) -> Gallery:
        check_gallery_name(name)
        with self._read() as tx:
            row = tx.one(f"SELECT {self._GALLERY_COLUMNS} FROM {self._GALLERY_FROM} WHERE g.name = %s", (name,))
        if row is None:
            raise GalleryNotFoundError(name)
        return self._gallery(row)

    def list_galleries(self) -> list:
        with self._read() as tx:
            rows = tx.all(f"SELECT {self._GALLERY_COLUMNS} FROM {self._GALLERY_FROM} ORDER BY g.name")
        return [self._gallery(r) for r in rows]

    def delete_gallery(self, name: str, actor: Optional[Actor] = None) -> None:
        with self._write() as tx:
            gallery_id = self._gallery_id(tx, name)
            counts = tx.one("SELECT (SELECT count(*) FROM adaface_identities WHERE gallery_id = %s), "
                            "(SELECT count(*) FROM adaface_faces WHERE gallery_id = %s)", (gallery_id, gallery_id))
            audit.write(tx, actor, "gallery.delete", name,
                        detail={"identities_removed": int(counts[0]), "faces_removed": int(counts[1])})
            tx.run("DELETE FROM adaface_changes WHERE gallery_id = %s", (gallery_id,))
            tx.run("DELETE FROM adaface_reembed WHERE gallery_id = %s", (gallery_id,))
            tx.run(f"DELETE FROM adaface_crops WHERE face_id IN ({_GALLERY_FACES})", (gallery_id,))
            tx.run("DELETE FROM adaface_faces WHERE gallery_id = %s", (gallery_id,))
            tx.run("DELETE FROM adaface_identities WHERE gallery_id = %s", (gallery_id,))
            tx.run("DELETE FROM adaface_gallery_models WHERE gallery_id = %s", (gallery_id,))
            tx.run("DELETE FROM adaface_galleries WHERE id = %s", (gallery_id,))
            tx.notify(gallery_id, DROPPED)
        self._forget()

    # -- identities and faces ----------------------------------------------------------------

    def enroll(self, gallery: str, identity: str, faces: Sequence[NewFace],
               metadata: Optional[dict] = None, model: Optional[ModelIdentity] = None,
               actor: Optional[Actor] = None) -> Enrolled:
        check_identity_name(identity)
        meta_text = check_metadata(metadata)
        blobs = [vector_blob(f.embedding) for f in faces]
        now = time.time()
        with self._write() as tx:
            gallery_id = self._gallery_id(tx, gallery)
            if model is not None:
                self._match_model(tx, gallery_id, gallery, model)
            created = tx.one("INSERT INTO adaface_identities (gallery_id, name, metadata, created_at) "
                             "VALUES (%s, %s, %s, %s) ON CONFLICT (gallery_id, name) DO NOTHING RETURNING id",
                             (gallery_id, identity, meta_text, now)) is not None
            if not created and meta_text is not None:
                tx.run("UPDATE adaface_identities SET metadata = %s WHERE gallery_id = %s AND name = %s",
                       (meta_text, gallery_id, identity))
            ident = self._identity_row(tx, gallery_id, gallery, identity)
            results, added = [], []
            for face, blob in zip(faces, blobs):
                row = tx.one("INSERT INTO adaface_faces (identity_id, gallery_id, embedding, norm, photo_sha256, "
                             "created_at) VALUES (%s, %s, %s, %s, %s, %s) "
                             "ON CONFLICT (identity_id, photo_sha256) DO NOTHING RETURNING id, created_at",
                             (ident[0], gallery_id, blob, float(face.norm), face.photo_sha256, now))
                if row is not None:
                    added.append(row[0])
                    record = FaceRecord(row[0], ident[0], float(face.norm), face.photo_sha256, row[1])
                    if face.crop_png is not None:
                        tx.run("INSERT INTO adaface_crops (face_id, png) VALUES (%s, %s)", (row[0], face.crop_png))
                else:
                    old = tx.one("SELECT id, norm, created_at FROM adaface_faces "
                                 "WHERE identity_id = %s AND photo_sha256 = %s", (ident[0], face.photo_sha256))
                    record = FaceRecord(old[0], ident[0], old[1], face.photo_sha256, old[2])
                results.append((record, row is not None))
            if added:
                self._record(tx, gallery_id, added, "add")
            if added or created or meta_text is not None:
                audit.write(tx, actor, "identity.enroll", gallery, identity, ident[0], added,
                            {"created": created, "metadata_replaced": meta_text is not None,
                             "photos_already_enrolled": len(faces) - len(added)})
            count = tx.one("SELECT count(*) FROM adaface_faces WHERE identity_id = %s", (ident[0],))[0]
        identity_record = Identity(ident[0], ident[1], read_metadata(ident[2]), ident[3], count)
        return Enrolled(identity_record, results, created)

    def list_identities(self, gallery: str, limit: int = 100, offset: int = 0) -> list:
        with self._read() as tx:
            gallery_id = self._gallery_id(tx, gallery)
            rows = tx.all("SELECT i.id, i.name, i.metadata, i.created_at, "
                          "(SELECT count(*) FROM adaface_faces f WHERE f.identity_id = i.id) "
                          "FROM adaface_identities i WHERE i.gallery_id = %s ORDER BY i.name LIMIT %s OFFSET %s",
                          (gallery_id, int(limit), int(offset)))
        return [Identity(r[0], r[1], read_metadata(r[2]), r[3], r[4]) for r in rows]

    def get_identity(self, gallery: str, name: str) -> Identity:
        with self._read() as tx:
            gallery_id = self._gallery_id(tx, gallery)
            ident = self._identity_row(tx, gallery_id, gallery, name)
            return self._identity_with_faces(tx, ident[0])

    def update_identity(self, gallery: str, name: str, new_name: Optional[str] = None,
                        metadata: Optional[dict] = None, actor: Optional[Actor] = None) -> Identity:
        meta_text = check_metadata(metadata)
        if new_name is not None:
            check_identity_name(new_name)
        # The answer is read inside the transaction: read after it, a concurrent rename or delete
        # could make a committed change answer identity_not_found.
        with self._write() as tx:
            gallery_id = self._gallery_id(tx, gallery)
            ident = self._identity_row(tx, gallery_id, gallery, name)
            if new_name is not None and new_name != name:
                if tx.one("SELECT 1 FROM adaface_identities WHERE gallery_id = %s AND name = %s",
                          (gallery_id, new_name)) is not None:
                    raise IdentityExistsError(gallery, new_name)
                # still named ``name``: under PostgreSQL a concurrent rename may have committed since
                if tx.run("UPDATE adaface_identities SET name = %s WHERE id = %s AND name = %s",
                          (new_name, ident[0], name)) == 0:
                    raise IdentityNotFoundError(gallery, name)
            if meta_text is not None:
                tx.run("UPDATE adaface_identities SET metadata = %s WHERE id = %s", (meta_text, ident[0]))
            renamed = new_name is not None and new_name != name
            if renamed or meta_text is not None:
                detail = {"metadata_replaced": meta_text is not None}
                if renamed:
                    detail["renamed_from"] = name
                audit.write(tx, actor, "identity.update", gallery, new_name if renamed else name, ident[0],
                            detail=detail)
            return self._identity_with_faces(tx, ident[0])

    def delete_identity(self, gallery: str, name: str, actor: Optional[Actor] = None) -> int:
        with self._write() as tx:
            gallery_id = self._gallery_id(tx, gallery)
            self._lock_gallery(tx, gallery_id)
            ident = self._identity_row(tx, gallery_id, gallery, name)
            face_ids = [r[0] for r in tx.all("SELECT id FROM adaface_faces WHERE identity_id = %s", (ident[0],))]
            tx.run("DELETE FROM adaface_crops WHERE face_id IN (SELECT id FROM adaface_faces WHERE identity_id = %s)",
                   (ident[0],))
            tx.run("DELETE FROM adaface_faces WHERE identity_id = %s", (ident[0],))
            tx.run("DELETE FROM adaface_identities WHERE id = %s", (ident[0],))
            if face_ids:
                self._record(tx, gallery_id, face_ids, "del")
            audit.write(tx, actor, "identity.delete", gallery, name, ident[0], face_ids)
        self._forget()
        return len(face_ids)

    def delete_face(self, gallery: str, face_id: int, actor: Optional[Actor] = None) -> None:
        row_id = check_face_id(face_id)
        with self._write() as tx:
            gallery_id = self._gallery_id(tx, gallery)
            owner = None if row_id is None else tx.one(
                "SELECT i.id, i.name FROM adaface_faces f JOIN adaface_identities i ON i.id = f.identity_id "
                "WHERE f.id = %s AND f.gallery_id = %s", (row_id, gallery_id))
            if owner is not None:
                tx.run("DELETE FROM adaface_crops WHERE face_id = %s", (row_id,))
            if row_id is None or tx.run("DELETE FROM adaface_faces WHERE id = %s AND gallery_id = %s",
                                        (row_id, gallery_id)) == 0:
                raise FaceNotFoundError(gallery, face_id)
            self._record(tx, gallery_id, [row_id], "del")
            audit.write(tx, actor, "face.delete", gallery, owner[1], owner[0], [row_id])
        self._forget()

    def merge_identity(self, gallery: str, name: str, into: str, actor: Optional[Actor] = None) -> Identity:
        with self._write() as tx:
            gallery_id = self._gallery_id(tx, gallery)
            self._lock_gallery(tx, gallery_id)
            source = self._identity_row(tx, gallery_id, gallery, name)
            target = self._identity_row(tx, gallery_id, gallery, into)
            if source[0] == target[0]:
                return self._identity_with_faces(tx, target[0])
            faces = tx.all("SELECT id, photo_sha256 FROM adaface_faces WHERE identity_id = %s ORDER BY id",
                           (source[0],))
            kept = {r[0] for r in tx.all("SELECT photo_sha256 FROM adaface_faces WHERE identity_id = %s",
                                         (target[0],))}
            moved = [f for f, sha in faces if sha not in kept]
            dropped = [f for f, sha in faces if sha in kept]
            for start in range(0, len(dropped), CHUNK):
                chunk = dropped[start:start + CHUNK]
                tx.run(f"DELETE FROM adaface_crops WHERE face_id IN ({_marks(len(chunk))})", chunk)
                tx.run(f"DELETE FROM adaface_faces WHERE id IN ({_marks(len(chunk))})", chunk)
            for start in range(0, len(moved), CHUNK):
                chunk = moved[start:start + CHUNK]
                tx.run(f"UPDATE adaface_faces SET identity_id = %s WHERE id IN ({_marks(len(chunk))})",
                       [target[0], *chunk])
            tx.run("DELETE FROM adaface_identities WHERE id = %s", (source[0],))
            if faces:
                # a moved face is logged as added again: an index re-reads it with its new owner
                self._record(tx, gallery_id, [f for f, _ in faces], "add")
            audit.write(tx, actor, "identity.merge", gallery, into, target[0], moved,
                        {"merged_from": name, "faces_moved": len(moved), "duplicate_photos_dropped": len(dropped),
                         "dropped_face_ids": dropped[:100]})
            merged = self._identity_with_faces(tx, target[0])
        if dropped:
            self._forget()
        return merged

    def list_faces(self, gallery: str, identity: Optional[str] = None, limit: int = 100,
                   offset: int = 0) -> tuple:
        with self._read() as tx:
            gallery_id = self._gallery_id(tx, gallery)
            where, args = "f.gallery_id = %s", [gallery_id]
            if identity is not None:
                where, args = "f.identity_id = %s", [self._identity_row(tx, gallery_id, gallery, identity)[0]]
            total = tx.one(f"SELECT count(*) FROM adaface_faces f WHERE {where}", args)[0]
            rows = tx.all("SELECT f.id, f.identity_id, f.norm, f.photo_sha256, f.created_at, i.name "
                          "FROM adaface_faces f JOIN adaface_identities i ON i.id = f.identity_id "
                          f"WHERE {where} ORDER BY f.id LIMIT %s OFFSET %s", [*args, int(limit), int(offset)])
        return [(FaceRecord(*r[:5]), r[5]) for r in rows], int(total)

    def delete_faces(self, gallery: str, face_ids: Sequence[int], actor: Optional[Actor] = None) -> list:
        ids = sorted({i for i in (check_face_id(f) for f in face_ids) if i is not None})
        with self._write() as tx:
            gallery_id = self._gallery_id(tx, gallery)
            found = []
            for start in range(0, len(ids), CHUNK):
                chunk = ids[start:start + CHUNK]
                found += tx.all("SELECT f.id, f.identity_id, f.norm, f.photo_sha256, f.created_at, i.name "
                                "FROM adaface_faces f JOIN adaface_identities i ON i.id = f.identity_id "
                                f"WHERE f.gallery_id = %s AND f.id IN ({_marks(len(chunk))})", [gallery_id, *chunk])
            found.sort()
            gone = [r[0] for r in found]
            for start in range(0, len(gone), CHUNK):
                chunk = gone[start:start + CHUNK]
                tx.run(f"DELETE FROM adaface_crops WHERE face_id IN ({_marks(len(chunk))})", chunk)
                tx.run(f"DELETE FROM adaface_faces WHERE id IN ({_marks(len(chunk))})", chunk)
            if gone:
                self._record(tx, gallery_id, gone, "del")
                owners = sorted({r[5] for r in found})
                audit.write(tx, actor, "faces.delete", gallery, owners[0] if len(owners) == 1 else None, None, gone,
                            {"identities": owners[:20]})
        if found:
            self._forget()
        return [(FaceRecord(*r[:5]), r[5]) for r in found]

    def audit_events(self, galleries: Optional[Sequence[str]] = None, identity: Optional[str] = None,
                     action: Optional[str] = None, before: Optional[int] = None, limit: int = 100) -> list:
        sql, args = audit.query(galleries, identity, action, before, limit)
        with self._read() as tx:
            return [audit.event(r) for r in tx.all(sql, args)]

    def photo_hashes(self, gallery: str) -> set:
        with self._read() as tx:
            gallery_id = self._gallery_id(tx, gallery)
            return {r[0] for r in tx.all("SELECT photo_sha256 FROM adaface_faces WHERE gallery_id = %s",
                                         (gallery_id,))}

    def export_rows(self, gallery: str) -> Iterator[ExportRow]:
        with self._read() as tx:
            gallery_id = self._gallery_id(tx, gallery)
            rows = tx.all("SELECT i.name, i.metadata, f.photo_sha256, f.norm, f.embedding FROM adaface_faces f "
                          "JOIN adaface_identities i ON i.id = f.identity_id WHERE f.gallery_id = %s ORDER BY f.id",
                          (gallery_id,))
        for name, meta, sha, norm, blob in rows:
            yield ExportRow(name, read_metadata(meta), sha, norm, np.frombuffer(bytes(blob), "<f4").astype(np.float32))

    # -- the model, crops, re-embedding -----------------------------------------------------

    def _forget(self) -> None:
        """After a delete: make the deleted rows unrecoverable where the backend can (SQLite)."""

    def check_model(self, gallery: str, model: ModelIdentity) -> ModelIdentity:
        with self._read() as tx:
            gallery_id = self._gallery_id(tx, gallery)
            stored = self._model_of(tx, gallery_id)
        if stored is not None and (stored.fingerprint, stored.arch) == (model.fingerprint, model.arch):
            return stored
        with self._write() as tx:  # set it, or raise the mismatch
            return self._match_model(tx, self._gallery_id(tx, gallery), gallery, model)

    def face_crop(self, gallery: str, face_id: int) -> bytes:
        row_id = check_face_id(face_id)
        with self._read() as tx:
            gallery_id = self._gallery_id(tx, gallery)
            face = None if row_id is None else tx.one(
                "SELECT c.png, f.id FROM adaface_faces f LEFT JOIN adaface_crops c ON c.face_id = f.id "
                "WHERE f.id = %s AND f.gallery_id = %s", (row_id, gallery_id))
        if face is None:
            raise FaceNotFoundError(gallery, face_id)
        if face[0] is None:
            raise CropNotFoundError(gallery, face_id)
        return bytes(face[0])

    def identity_vectors(self, gallery: str, name: str) -> tuple:
        with self._read() as tx:
            gallery_id = self._gallery_id(tx, gallery)
            ident = self._identity_row(tx, gallery_id, gallery, name)
            rows = tx.all("SELECT id, embedding FROM adaface_faces WHERE identity_id = %s ORDER BY id", (ident[0],))
        return np.array([r[0] for r in rows], np.int64), blobs_to_matrix([bytes(r[1]) for r in rows])

    def reembed_pending(self, gallery: str, model: ModelIdentity, limit: int) -> list:
        with self._read() as tx:
            gallery_id = self._gallery_id(tx, gallery)
            rows = tx.all("SELECT f.id, c.png FROM adaface_faces f JOIN adaface_crops c ON c.face_id = f.id "
                          "LEFT JOIN adaface_reembed r ON r.face_id = f.id AND r.fingerprint = %s "
                          "WHERE f.gallery_id = %s AND r.face_id IS NULL ORDER BY f.id LIMIT %s",
                          (model.fingerprint, gallery_id, int(limit)))
        return [(r[0], bytes(r[1])) for r in rows]

    def stage_embeddings(self, gallery: str, model: ModelIdentity, rows: Sequence[tuple]) -> None:
        with self._write() as tx:
            gallery_id = self._gallery_id(tx, gallery)
            for face_id, embedding, norm in rows:
                tx.run("DELETE FROM adaface_reembed WHERE face_id = %s", (int(face_id),))
                tx.run("INSERT INTO adaface_reembed (face_id, gallery_id, fingerprint, embedding, norm) "
                       "SELECT id, gallery_id, %s, %s, %s FROM adaface_faces WHERE id = %s AND gallery_id = %s",
                       (model.fingerprint, vector_blob(embedding), float(norm), int(face_id), gallery_id))

    def reembed_state(self, gallery: str, model: ModelIdentity) -> ReembedState:
        with self._read() as tx:
            return self._reembed_state(tx, self._gallery_id(tx, gallery), model)

    @staticmethod
    def _reembed_state(tx: Tx, gallery_id: int, model: ModelIdentity) -> ReembedState:
        total = tx.one("SELECT count(*) FROM adaface_faces WHERE gallery_id = %s", (gallery_id,))[0]
        with_crop = tx.one(f"SELECT count(*) FROM adaface_crops WHERE face_id IN ({_GALLERY_FACES})",
                           (gallery_id,))[0]
        staged = tx.one("SELECT count(*) FROM adaface_reembed r JOIN adaface_crops c ON c.face_id = r.face_id "
                        "WHERE r.gallery_id = %s AND r.fingerprint = %s", (gallery_id, model.fingerprint))[0]
        return ReembedState(with_crop, staged, total - with_crop)

    def finish_reembed(self, gallery: str, model: ModelIdentity, actor: Optional[Actor] = None) -> Optional[list]:
        with self._write() as tx:
            gallery_id = self._gallery_id(tx, gallery)
            if self._reembed_state(tx, gallery_id, model).pending:
                return None
            staged = "SELECT face_id FROM adaface_reembed WHERE gallery_id = %s AND fingerprint = %s"
            left_out = tx.all(f"SELECT f.id, i.name FROM adaface_faces f JOIN adaface_identities i "
                              f"ON i.id = f.identity_id WHERE f.gallery_id = %s AND f.id NOT IN ({staged}) "
                              f"ORDER BY f.id", (gallery_id, gallery_id, model.fingerprint))
            tx.run(f"UPDATE adaface_faces SET "
                   f"embedding = (SELECT r.embedding FROM adaface_reembed r WHERE r.face_id = adaface_faces.id), "
                   f"norm = (SELECT r.norm FROM adaface_reembed r WHERE r.face_id = adaface_faces.id) "
                   f"WHERE gallery_id = %s AND id IN ({staged})", (gallery_id, gallery_id, model.fingerprint))
            for start in range(0, len(left_out), CHUNK):
                chunk = [r[0] for r in left_out[start:start + CHUNK]]
                tx.run(f"DELETE FROM adaface_faces WHERE id IN ({_marks(len(chunk))})", chunk)
            tx.run("DELETE FROM adaface_reembed WHERE gallery_id = %s", (gallery_id,))
            self._set_model(tx, gallery_id, model)
            every = [r[0] for r in tx.all("SELECT id FROM adaface_faces WHERE gallery_id = %s", (gallery_id,))]
            touched = sorted(every + [r[0] for r in left_out])
            if touched:
                self._record(tx, gallery_id, touched, "add")
            audit.write(tx, actor, "gallery.reembed", gallery, face_ids=[r[0] for r in left_out],
                        detail={"model": model.name, "faces_reembedded": len(every),
                                "faces_removed_without_crop": len(left_out)})
        if left_out:
            self._forget()
        return [(r[0], r[1]) for r in left_out]

    # -- for search indexes ------------------------------------------------------------------

    def gallery_state(self, name: str) -> Optional[tuple]:
        with self._read() as tx:
            return tx.one("SELECT id, version FROM adaface_galleries WHERE name = %s", (name,))

    @staticmethod
    def _rows(version: int, rows: list, touched=None) -> Rows:
        return Rows(version, np.array([r[0] for r in rows], np.int64), np.array([r[1] for r in rows], np.int64),
                    blobs_to_matrix([bytes(r[2]) for r in rows]), touched)

    def snapshot(self, gallery_id: int) -> Rows:
        # Streamed into preallocated arrays: a million faces need their 2 GiB once, not three times.
        with self._transaction(False, snapshot=True) as tx:
            head = self._snapshot_head(tx, gallery_id)
            if head is None:
                return self._rows(DROPPED, [])
            version, count = head
            face_ids, identity_ids = np.empty(count, np.int64), np.empty(count, np.int64)
            vectors = np.empty((count, EMBEDDING_SIZE), np.float32)
            i = 0
            for i, (face_id, identity_id, blob) in enumerate(tx.stream(_SNAPSHOT_FACES, (gallery_id,)), start=1):
                face_ids[i - 1], identity_ids[i - 1] = face_id, identity_id
                vectors[i - 1] = np.frombuffer(blob, "<f4")
        return Rows(version, face_ids[:i], identity_ids[:i], vectors[:i])

    def snapshot_chunks(self, gallery_id: int, rows: int = SNAPSHOT_ROWS) -> Iterator:
        with self._transaction(False, snapshot=True) as tx:
            head = self._snapshot_head(tx, gallery_id)
            if head is None:
                yield DROPPED, 0
                return
            version, count = head
            yield version, count
            piece, n = None, 0
            for face_id, identity_id, blob in tx.stream(_SNAPSHOT_FACES, (gallery_id,)):
                if piece is None:            # fresh arrays for each piece: the caller keeps the last
                    piece = Rows(version, np.empty(rows, np.int64), np.empty(rows, np.int64),
                                 np.empty((rows, EMBEDDING_SIZE), np.float32))
                piece.face_ids[n], piece.identity_ids[n] = face_id, identity_id
                piece.vectors[n] = np.frombuffer(blob, "<f4")
                n += 1
                if n == rows:
                    yield piece
                    piece, n = None, 0
            if n:
                yield Rows(version, piece.face_ids[:n], piece.identity_ids[:n], piece.vectors[:n])

    @staticmethod
    def _snapshot_head(tx, gallery_id: int) -> Optional[tuple]:
        """(version, face count) of a gallery, or None when it is gone."""
        return tx.one("SELECT version, (SELECT count(*) FROM adaface_faces WHERE gallery_id = %s) "
                      "FROM adaface_galleries WHERE id = %s", (gallery_id, gallery_id))

    def delta(self, gallery_id: int, after_version: int) -> Rows:
        # The changes are read before the faces: a face whose removal is among the changes read
        # is already gone when the faces are read (both commit together).
        with self._transaction(False, snapshot=True) as tx:
            changes = tx.all("SELECT face_id, version FROM adaface_changes WHERE gallery_id = %s AND version > %s",
                             (gallery_id, after_version))
            touched = sorted({c[0] for c in changes})
            rows = []
            for start in range(0, len(touched), CHUNK):
                chunk = touched[start:start + CHUNK]
                rows += tx.all(f"SELECT id, identity_id, embedding FROM adaface_faces WHERE id IN ({_marks(len(chunk))})",
                               chunk)
        version = max((c[1] for c in changes), default=after_version)
        return self._rows(version, rows, np.array(touched, np.int64))

    def vectors(self, face_ids: Sequence[int]) -> tuple:
        ids = sorted({int(i) for i in face_ids})
        rows = []
        with self._read() as tx:
            for start in range(0, len(ids), CHUNK):
                chunk = ids[start:start + CHUNK]
                rows += tx.all(f"SELECT id, embedding FROM adaface_faces WHERE id IN ({_marks(len(chunk))})", chunk)
        rows.sort()
        return np.array([r[0] for r in rows], np.int64), blobs_to_matrix([bytes(r[1]) for r in rows])

    def describe_faces(self, face_ids: Sequence[int]) -> dict:
        ids = sorted({int(i) for i in face_ids})
        found = {}
        with self._read() as tx:
            for start in range(0, len(ids), CHUNK):
                chunk = ids[start:start + CHUNK]
                for r in tx.all("SELECT f.id, f.photo_sha256, i.name, i.metadata FROM adaface_faces f "
                                "JOIN adaface_identities i ON i.id = f.identity_id "
                                f"WHERE f.id IN ({_marks(len(chunk))})", chunk):
                    found[r[0]] = (r[1], r[2], read_metadata(r[3]))
        return found
