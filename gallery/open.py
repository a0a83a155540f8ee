"""Which store a URL names, and opening it: the factory over the backends.

The interface (:mod:`gallery.store`) knows no backend; this module imports them, so no import
runs back from a backend to here.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from .errors import StoreUrlError
from .store import GalleryStore


def sqlite_path(url: str, base: Path) -> Path:
    """``sqlite:///relative/path`` (relative to ``base``) or ``sqlite:////absolute/path``."""
    rest = url[len("sqlite:///"):]
    if not rest:
        raise StoreUrlError(f"ADAFACE_GALLERY_URL={url!r} names no file: use sqlite:///path/to/gallery.db")
    path = Path(rest).expanduser()
    return path if path.is_absolute() else base / path


def check_url(url: str) -> str:
    """``url`` if it names a backend we have, else a StoreUrlError naming the accepted forms."""
    if not url.startswith(("sqlite:///", "postgresql://", "postgres://")):
        raise StoreUrlError(f"ADAFACE_GALLERY_URL={url!r}: use sqlite:///path/to/gallery.db or "
                            "postgresql://user:password@host:5432/database")
    return url


def open_store(url: str, base: Optional[Path] = None) -> GalleryStore:
    """The store for ``url``: ``sqlite:///path`` (relative paths from ``base``, the working folder
    by default) or ``postgresql://user:password@host:port/database`` (also ``postgres://``)."""
    check_url(url)
    if url.startswith("sqlite:///"):
        from .sqlite_store import SqliteStore
        return SqliteStore(sqlite_path(url, base if base is not None else Path.cwd()))
    from .postgres_store import PostgresStore
    return PostgresStore(url)
