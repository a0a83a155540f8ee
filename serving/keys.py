"""API keys: the keys file's lines, hashed keys, and the admin key made on first start.

One key a line (``#`` starts a comment, blank lines are skipped)::

    KEY [name=LABEL] [scopes=S1,S2] [galleries=G1,G2] [rate=N/s]

``KEY`` is the key itself or ``sha256:<64 hex>`` of it (``python AdaFaceFeature.py keys new``
prints a new random key and its line). No ``scopes=`` means every scope
(:data:`adaface.options.SCOPES`) and no ``galleries=`` every gallery, so a bare key (as in
``ADAFACE_API_KEYS=k1,k2``) can do everything, as before. ``name`` goes into logs, metrics and
the audit trail, never the key; without one a key is named ``key-`` and the first 8 hex digits
of its sha256.

Presented keys are hashed and compared with every configured hash with
:func:`hmac.compare_digest`, always all of them, so the time taken says nothing of which key
matched or how much of it.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

from adaface.options import KEY_NAME_PATTERN, SCOPES
from gallery.errors import BadNameError
from gallery.store import check_gallery_name

from .rates import Rate, parse_rate

logger = logging.getLogger("adaface")

ALL_SCOPES = frozenset(SCOPES)
_HASHED = re.compile(r"sha256:([0-9a-fA-F]{64})")
_NAME = re.compile(KEY_NAME_PATTERN)
ATTRIBUTES = ("name", "scopes", "galleries", "rate")


class KeyFileError(ValueError):
    """A keys line that cannot be used; the message names the line and what to write."""


@dataclass(frozen=True)
class Key:
    """One configured key: its sha256, name, scopes, galleries (None: all) and rate (None: no limit)."""

    digest: bytes
    name: str
    scopes: frozenset = ALL_SCOPES
    galleries: Optional[frozenset] = None
    rate: Optional[Rate] = None

    def sees(self, gallery: str) -> bool:
        """Whether this key may reach ``gallery`` (any gallery when it names none)."""
        return self.galleries is None or gallery in self.galleries


def digest(key: str) -> bytes:
    """sha256 of a key's UTF-8 bytes."""
    return hashlib.sha256(key.encode("utf-8")).digest()


def hashed_form(key: str) -> str:
    """What a keys file may hold instead of ``key``: ``sha256:<64 hex>``."""
    return "sha256:" + digest(key).hex()


def new_key() -> str:
    """A new random key: 32 bytes, URL-safe base64 (43 characters)."""
    return secrets.token_urlsafe(32)


def parse_line(line: str, where: str = "key") -> Optional[Key]:
    """One keys line -> :class:`Key`; None for a blank or comment line. ``where`` names the line
    in errors (``ADAFACE_API_KEYS_FILE line 3``)."""
    text = line.strip()
    if not text or text.startswith("#"):
        return None
    secret, *rest = text.split()
    hashed = _HASHED.fullmatch(secret)
    if secret.startswith("sha256:") and hashed is None:
        raise KeyFileError(f"{where}: a hashed key is sha256: and 64 hex digits")
    if "=" in secret and secret.split("=", 1)[0] in ATTRIBUTES:
        raise KeyFileError(f"{where}: the line starts with the key, then its attributes")
    value = bytes.fromhex(hashed.group(1)) if hashed else digest(secret)
    fields = {}
    for item in rest:
        name, eq, raw = item.partition("=")
        if not eq or name not in ATTRIBUTES:
            raise KeyFileError(f"{where}: {item!r} is not an attribute: use {', '.join(a + '=' for a in ATTRIBUTES)}")
        if name in fields:
            raise KeyFileError(f"{where}: {name}= is given twice")
        fields[name] = raw
    return Key(value, _name(fields.get("name"), value, where), _scopes(fields.get("scopes"), where),
               _galleries(fields.get("galleries"), where), _rate(fields.get("rate"), where))


def _name(raw: Optional[str], value: bytes, where: str) -> str:
    if raw is None:
        return "key-" + value.hex()[:8]
    if not _NAME.fullmatch(raw):
        raise KeyFileError(f"{where}: name={raw!r}: 1 to 64 letters, digits or _ . : @ -")
    return raw


def _scopes(raw: Optional[str], where: str) -> frozenset:
    if raw is None:
        return ALL_SCOPES
    scopes = frozenset(s for s in raw.split(",") if s)
    unknown = sorted(scopes - ALL_SCOPES)
    if unknown or not scopes:
        raise KeyFileError(f"{where}: scopes={raw!r}: use some of {', '.join(SCOPES)}")
    return scopes


def _galleries(raw: Optional[str], where: str) -> Optional[frozenset]:
    if raw is None:
        return None
    names = [g for g in raw.split(",") if g]
    try:
        for name in names:
            check_gallery_name(name)
    except BadNameError as exc:
        raise KeyFileError(f"{where}: galleries={raw!r}: {exc}") from None
    if not names:
        raise KeyFileError(f"{where}: galleries= names no gallery (leave it out for every gallery)")
    return frozenset(names)


def _rate(raw: Optional[str], where: str) -> Optional[Rate]:
    if raw is None:
        return None
    try:
        return parse_rate(raw)
    except ValueError as exc:
        raise KeyFileError(f"{where}: {exc}") from None


def parse_lines(lines: Iterable[tuple]) -> list:
    """(where, line) pairs -> the keys they hold; two keys with one name are refused."""
    keys = [k for where, line in lines if (k := parse_line(line, where)) is not None]
    names = [k.name for k in keys]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise KeyFileError(f"two keys are named {twice[0]!r}: names say who did what, so each must be unique")
    return keys


class KeyRing:
    """The configured keys; :meth:`find` turns a presented key into its :class:`Key`."""

    def __init__(self, keys: list):
        self.keys = list(keys)

    def __bool__(self) -> bool:
        return bool(self.keys)

    def find(self, presented: str) -> Optional[Key]:
        """The key whose hash equals the presented key's, or None; every key is compared."""
        value, found = digest(presented), None
        for key in self.keys:
            if hmac.compare_digest(value, key.digest) and found is None:
                found = key
        return found


def admin_key(path: Path) -> str:
    """The generated admin key's line, made on first use: read from ``path``, or, when absent, a
    new random key written there (mode 0600, its folder created) as ``KEY name=admin``. Several
    workers starting at once agree: the file is written aside and linked into place, and the one
    that loses the race reads the winner's."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        aside = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        descriptor = os.open(aside, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as out:
            out.write(f"{new_key()} name=admin\n")
            out.flush()
            os.fsync(out.fileno())
        try:
            os.link(aside, path)
            logger.warning("no API keys are configured: made an admin key for the gallery routes in %s "
                           "(send it as Authorization: Bearer <key>; see the README's first screen)", path)
        except FileExistsError:
            pass
        finally:
            os.unlink(aside)
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        logger.warning("%s can be read by other users (mode %o): chmod 600 it", path, mode)
    return path.read_text()
