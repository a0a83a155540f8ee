"""The gallery storage interface: galleries -> identities -> faces, and a change log.

A gallery is a named collection of identities; an identity has a name (unique in its gallery),
optional JSON metadata, and faces; a face is one embedding (float32 (512,), unit length) with its
pre-normalisation norm and the sha256 of the photo it came from. Enrolling the same photo (same
sha256) for the same identity twice stores it once.

Every write that adds or removes faces bumps the gallery's ``version`` and records, under that
version, one change row per face touched. Search indexes (:mod:`gallery.index`) hold a version and
catch up by reading the changes after it (:meth:`GalleryStore.delta`); versions of one gallery
commit in order, so reading "everything after v" never misses a change.

Backends: :class:`gallery.sqlite_store.SqliteStore` (``sqlite:///path``) and
:class:`gallery.postgres_store.PostgresStore` (``postgresql://...``); :func:`gallery.open.open_store`
picks by URL.
"""
from __future__ import annotations

import abc
import json
import logging
import math
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Sequence

import numpy as np

from adaface.identity import ModelIdentity
from adaface.options import EMBEDDING_SIZE

from .audit import Actor
from .errors import BadMetadataError, BadNameError

logger = logging.getLogger(__name__)

GALLERY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
#: characters in an identity name
MAX_IDENTITY_NAME = 200
#: bytes of an identity's metadata as compact UTF-8 JSON
MAX_METADATA_BYTES = 16 * 1024
#: nesting of an identity's metadata: the object itself is level 1, an object or list in it level 2
MAX_METADATA_DEPTH = 16
#: the range of integers in metadata, and of row ids (signed 64-bit)
INT64_MIN, INT64_MAX = -2 ** 63, 2 ** 63 - 1
#: Unicode categories refused in an identity name: control characters (C0, DEL, C1), lone surrogates
_BAD_NAME_CATEGORIES = {"Cc", "Cs"}
#: the change-log version a dropped gallery is announced with
DROPPED = -1


@dataclass(frozen=True)
class Gallery:
    """A gallery row; ``identities`` and ``faces`` are counts, ``version`` its change-log head."""

    id: int
    name: str
    created_at: float
    version: int
    identities: int = 0
    faces: int = 0
    model: Optional[ModelIdentity] = None  # the network that made its embeddings; None until the first enroll


@dataclass(frozen=True)
class FaceRecord:
    """A stored face (without its embedding): id, owner, norm and the photo's sha256 (hex)."""

    id: int
    identity_id: int
    norm: float
    photo_sha256: str
    created_at: float


@dataclass(frozen=True)
class Identity:
    """An identity; ``faces`` is filled by :meth:`GalleryStore.get_identity`, else empty."""

    id: int
    name: str
    metadata: Optional[dict]
    created_at: float
    face_count: int = 0
    faces: tuple = ()


@dataclass(frozen=True)
class NewFace:
    """A face to enroll: embedding float32 (512,) unit length, its norm, the photo's sha256 (hex),
    and its aligned 112×112 crop as PNG bytes when crops are kept (what a re-embed reads)."""

    embedding: np.ndarray
    norm: float
    photo_sha256: str
    crop_png: Optional[bytes] = None


@dataclass(frozen=True)
class ReembedState:
    """Where a gallery's re-embed with a model stands: faces with a crop, those of them embedded
    by the model so far, and the faces without a crop (left out: removed at the switch)."""

    with_crop: int
    staged: int
    without_crop: int

    @property
    def pending(self) -> int:
        return self.with_crop - self.staged


@dataclass(frozen=True)
class Enrolled:
    """What an enroll did: the identity, and for each face given its record and whether it is new."""

    identity: Identity
    faces: list
    created_identity: bool = False

    @property
    def added(self) -> int:
        return sum(1 for _, new in self.faces if new)


@dataclass
class Rows:
    """Faces for a search index: ids (int64 (n,)), identities (int64 (n,)), vectors float32 (n, 512).

    From :meth:`GalleryStore.snapshot` all of a gallery's faces at ``version``; from
    :meth:`GalleryStore.delta` ``touched`` lists every face id added or removed after the base
    version, and the other arrays those of them that still exist.
    """

    version: int
    face_ids: np.ndarray
    identity_ids: np.ndarray
    vectors: np.ndarray
    touched: Optional[np.ndarray] = None


@dataclass(frozen=True)
class ExportRow:
    """One face for export/import: identity name and metadata, photo sha256, norm, embedding."""

    identity: str
    metadata: Optional[dict]
    photo_sha256: str
    norm: float
    embedding: np.ndarray = field(repr=False)


def check_gallery_name(name) -> str:
    if not isinstance(name, str) or not GALLERY_NAME.fullmatch(name):
        raise BadNameError("a gallery name is 1 to 64 characters: letters, digits, '_', '.', '-' "
                           f"(starting with a letter or digit); got {name!r}")
    return name


def check_identity_name(name) -> str:
    """``name`` if it can name an identity (in a URL path too), else a BadNameError."""
    if not isinstance(name, str) or not _identity_name_ok(name):
        raise BadNameError(f"an identity name is 1 to {MAX_IDENTITY_NAME} characters, without '/', control "
                           f"characters or surrounding spaces, and not '.' or '..'; got {name!r}")
    return name


def _identity_name_ok(name: str) -> bool:
    return (0 < len(name) <= MAX_IDENTITY_NAME and name == name.strip() and name not in (".", "..")
            and "/" not in name and not any(unicodedata.category(c) in _BAD_NAME_CATEGORIES for c in name))


def check_metadata(metadata) -> Optional[str]:
    """None, or a JSON object within the limits -> its compact JSON text (stored as is);
    anything else is a :class:`gallery.errors.BadMetadataError`.

    Limits: :data:`MAX_METADATA_DEPTH` levels, :data:`MAX_METADATA_BYTES` bytes of UTF-8 JSON;
    numbers finite, integers within signed 64 bits, strings valid Unicode (no lone surrogates),
    keys strings. What passes can be written by any JSON encoder, orjson included.
    """
    if metadata is None:
        return None
    problem = metadata_problem(metadata)
    if problem is not None:
        raise BadMetadataError(problem)
    text = json.dumps(metadata, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    if len(text.encode()) > MAX_METADATA_BYTES:
        raise BadMetadataError(f"metadata is larger than {MAX_METADATA_BYTES} bytes of JSON")
    return text


def metadata_problem(metadata) -> Optional[str]:
    """Why ``metadata`` cannot be stored (a message), or None; see :func:`check_metadata`.

    Walks the value without recursion, and gives up on more values than the byte limit could
    hold (each takes at least one byte of JSON).
    """
    if not isinstance(metadata, dict):
        return "metadata must be a JSON object"
    pending, seen = [(metadata, 1)], 0
    while pending:
        value, depth = pending.pop()
        seen += 1
        if seen > MAX_METADATA_BYTES:
            return f"metadata is larger than {MAX_METADATA_BYTES} bytes of JSON"
        if isinstance(value, (dict, list)):
            problem = _container_problem(value, depth)
            pending.extend((child, depth + 1) for child in (value.values() if isinstance(value, dict) else value))
        else:
            problem = _scalar_problem(value)
        if problem is not None:
            return problem
    return None


def _container_problem(value, depth: int) -> Optional[str]:
    if depth > MAX_METADATA_DEPTH:
        return f"metadata nests deeper than {MAX_METADATA_DEPTH} levels"
    for key in value if isinstance(value, dict) else ():
        if not isinstance(key, str) or not _valid_text(key):
            return f"metadata keys must be valid Unicode strings; got {key!r}"
    return None


def _scalar_problem(value) -> Optional[str]:
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int):
        return None if INT64_MIN <= value <= INT64_MAX else f"metadata integers must fit in 64 bits; got {value}"
    if isinstance(value, float):
        return None if math.isfinite(value) else f"metadata numbers must be finite; got {value}"
    if isinstance(value, str):
        return None if _valid_text(value) else f"metadata strings must be valid Unicode; got {value!r}"
    return f"metadata holds a {type(value).__name__}, which is not a JSON value"


def _valid_text(text: str) -> bool:
    """True when ``text`` encodes to UTF-8 (a lone surrogate does not)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def read_metadata(text: Optional[str]) -> Optional[dict]:
    """Stored metadata text -> the object; metadata stored before these checks that fails them
    (too deep, a non-finite number) reads as None, with a warning, so the identity can still be
    listed, read, searched, given new metadata or deleted."""
    if text is None:
        return None
    try:
        metadata = json.loads(text)
    except (ValueError, RecursionError) as exc:
        logger.warning("stored identity metadata is not readable JSON (%s); read as null", exc)
        return None
    problem = metadata_problem(metadata)
    if problem is not None:
        logger.warning("stored identity metadata is refused (%s); read as null", problem)
        return None
    return metadata


def check_face_id(face_id) -> Optional[int]:
    """A face id as an int, or None where no row could have it (beyond signed 64 bits)."""
    face_id = int(face_id)
    return face_id if INT64_MIN <= face_id <= INT64_MAX else None


def vector_blob(embedding: np.ndarray) -> bytes:
    """float32 (512,) -> 2,048 little-endian bytes, the stored form."""
    v = np.asarray(embedding, dtype="<f4").reshape(-1)
    if v.shape != (EMBEDDING_SIZE,) or not np.all(np.isfinite(v)):
        raise ValueError(f"an embedding is {EMBEDDING_SIZE} finite float32 values; got shape {v.shape}")
    return v.tobytes()


def blobs_to_matrix(blobs: Sequence[bytes]) -> np.ndarray:
    """Stored blobs -> float32 (n, 512)."""
    if not blobs:
        return np.zeros((0, EMBEDDING_SIZE), np.float32)
    return np.frombuffer(b"".join(blobs), dtype="<f4").reshape(len(blobs), EMBEDDING_SIZE).astype(np.float32)


class GalleryStore(abc.ABC):
    """The interface both backends implement (see the module docstring).

    Methods raise :mod:`gallery.errors` for bad names and missing or duplicate rows, and
    :class:`gallery.errors.StoreUnavailableError` when the database cannot be used. All methods
    are safe to call from several threads.
    """

    url: str

    # -- galleries ---------------------------------------------------------------------------
    @abc.abstractmethod
    def create_gallery(self, name: str, actor: Optional[Actor] = None) -> Gallery:
        """A new, empty gallery (GalleryExistsError if the name is taken)."""

    @abc.abstractmethod
    def ensure_gallery(self, name: str, actor: Optional[Actor] = None) -> Gallery:
        """The gallery, created when absent."""

    @abc.abstractmethod
    def get_gallery(self, name: str) -> Gallery:
        """The gallery with its identity and face counts."""

    @abc.abstractmethod
    def list_galleries(self) -> list:
        """Every gallery, by name, with counts."""

    @abc.abstractmethod
    def delete_gallery(self, name: str, actor: Optional[Actor] = None) -> None:
        """Delete the gallery and everything in it."""

    # -- identities and faces ----------------------------------------------------------------
    @abc.abstractmethod
    def enroll(self, gallery: str, identity: str, faces: Sequence[NewFace],
               metadata: Optional[dict] = None, model: Optional[ModelIdentity] = None,
               actor: Optional[Actor] = None) -> Enrolled:
        """Add faces to an identity (created if absent; metadata replaced when given), in one
        transaction; a photo sha256 the identity already has is not stored again. With ``model``
        (the network that made the embeddings) the gallery's model is checked as
        :meth:`check_model` does, in the same transaction."""

    @abc.abstractmethod
    def list_identities(self, gallery: str, limit: int = 100, offset: int = 0) -> list:
        """Identities by name, with face counts."""

    @abc.abstractmethod
    def get_identity(self, gallery: str, name: str) -> Identity:
        """One identity with its face records."""

    @abc.abstractmethod
    def update_identity(self, gallery: str, name: str, new_name: Optional[str] = None,
                        metadata: Optional[dict] = None, actor: Optional[Actor] = None) -> Identity:
        """Rename (IdentityExistsError if taken) and/or replace the metadata."""

    @abc.abstractmethod
    def delete_identity(self, gallery: str, name: str, actor: Optional[Actor] = None) -> int:
        """Delete an identity and its faces; the number of faces removed."""

    @abc.abstractmethod
    def delete_face(self, gallery: str, face_id: int, actor: Optional[Actor] = None) -> None:
        """Delete one face (FaceNotFoundError if the gallery has no such face)."""

    @abc.abstractmethod
    def merge_identity(self, gallery: str, name: str, into: str, actor: Optional[Actor] = None) -> Identity:
        """Move every face of ``name`` to the existing identity ``into`` and delete ``name``, in one
        transaction (a photo ``into`` already has is dropped, not stored twice); ``into`` after it."""

    @abc.abstractmethod
    def list_faces(self, gallery: str, identity: Optional[str] = None, limit: int = 100,
                   offset: int = 0) -> tuple:
        """``(faces, total)``: up to ``limit`` (:class:`FaceRecord`, identity name) pairs in id
        order after ``offset``, of one identity or the whole gallery, and how many there are."""

    @abc.abstractmethod
    def delete_faces(self, gallery: str, face_ids: Sequence[int], actor: Optional[Actor] = None) -> list:
        """Delete those of ``face_ids`` that the gallery has, in one transaction; the deleted as
        (:class:`FaceRecord`, identity name) pairs, in id order (ids it lacks are skipped)."""

    @abc.abstractmethod
    def audit_events(self, galleries: Optional[Sequence[str]] = None, identity: Optional[str] = None,
                     action: Optional[str] = None, before: Optional[int] = None, limit: int = 100) -> list:
        """The audit trail (:mod:`gallery.audit`), newest first: up to ``limit`` (at most
        :data:`gallery.audit.MAX_EVENTS`) :class:`gallery.audit.AuditEvent`, of the named galleries
        only (None: all), of one identity name or action, older than the row id ``before``."""

    @abc.abstractmethod
    def photo_hashes(self, gallery: str) -> set:
        """The sha256 of every photo enrolled in the gallery (to resume a build)."""

    @abc.abstractmethod
    def export_rows(self, gallery: str) -> Iterator[ExportRow]:
        """Every face with its identity, in enrolment order."""

    # -- the model, crops, re-embedding -----------------------------------------------------
    @abc.abstractmethod
    def check_model(self, gallery: str, model: ModelIdentity) -> ModelIdentity:
        """The gallery's model when it is ``model``; a gallery without one takes ``model`` (an
        empty one, or one filled before models were recorded: logged); ModelMismatchError when
        another model filled it."""

    @abc.abstractmethod
    def face_crop(self, gallery: str, face_id: int) -> bytes:
        """The face's aligned crop as PNG (FaceNotFoundError, CropNotFoundError)."""

    @abc.abstractmethod
    def identity_vectors(self, gallery: str, name: str) -> tuple:
        """(face ids int64 (k,), float32 (k, 512)) of one identity's faces."""

    @abc.abstractmethod
    def reembed_pending(self, gallery: str, model: ModelIdentity, limit: int) -> list:
        """Up to ``limit`` (face id, crop PNG) of faces with a crop not yet embedded by ``model``."""

    @abc.abstractmethod
    def stage_embeddings(self, gallery: str, model: ModelIdentity, rows: Sequence[tuple]) -> None:
        """Keep (face id, embedding float32 (512,), norm) made by ``model`` for the switch; search
        still uses the gallery's current vectors."""

    @abc.abstractmethod
    def reembed_state(self, gallery: str, model: ModelIdentity) -> ReembedState:
        """How far a re-embed with ``model`` has come."""

    @abc.abstractmethod
    def finish_reembed(self, gallery: str, model: ModelIdentity, actor: Optional[Actor] = None) -> Optional[list]:
        """In one transaction: every face takes its staged embedding, faces without a crop are
        removed, and the gallery's model becomes ``model``; the removed faces as (face id,
        identity name). None (and nothing changed) while some face with a crop is not staged."""

    # -- for search indexes ------------------------------------------------------------------
    @abc.abstractmethod
    def gallery_state(self, name: str) -> Optional[tuple]:
        """(gallery id, version), or None: the cheap check a search makes first."""

    @abc.abstractmethod
    def snapshot(self, gallery_id: int) -> Rows:
        """All of a gallery's faces and the version they are at (one consistent read)."""

    @abc.abstractmethod
    def snapshot_chunks(self, gallery_id: int, rows: int = 4_096) -> Iterator:
        """The same faces in pieces, from one consistent read that stays open while they are read:
        first ``(version, face count)`` (:data:`DROPPED`, 0 for a gallery that is gone), then
        :class:`Rows` of at most ``rows`` faces each, in id order. A search index loads a
        gallery this way so that the float32 vectors are never all held at once (10 million
        faces are 20 GB)."""

    @abc.abstractmethod
    def delta(self, gallery_id: int, after_version: int) -> Rows:
        """The faces added or removed after ``after_version`` (see :class:`Rows`)."""

    @abc.abstractmethod
    def describe_faces(self, face_ids: Sequence[int]) -> dict:
        """face id -> (photo sha256, identity name, identity metadata), for faces that exist."""

    @abc.abstractmethod
    def vectors(self, face_ids: Sequence[int]) -> tuple:
        """(face ids int64 (k,), float32 (k, 512) embeddings) of those of ``face_ids`` that exist,
        in ascending id order: the exact vectors an approximate search rescores with."""

    def search(self, gallery_id: int, probes: np.ndarray, top_k: int, exact: bool = False) -> Optional[list]:
        """Search in the database itself, where the backend can (PostgreSQL with pgvector): for
        each probe (float32 (m, 512) unit rows) up to ``top_k`` :class:`gallery.index.Hit`, best
        identity first; None where it cannot, and the caller searches its in-memory index."""
        return None

    def subscribe(self, on_change: Callable[[int, int], None], on_reconnect: Callable[[], None]) -> bool:
        """Call ``on_change(gallery_id, version)`` from a background thread when another process
        writes (``version`` is :data:`DROPPED` for a dropped gallery) and ``on_reconnect()`` after
        a lost connection; False where the backend has no notifications (search then relies on
        the version check before each query)."""
        return False

    @abc.abstractmethod
    def close(self) -> None:
        """Release connections and stop any listener."""
