"""``python AdaFaceFeature.py keys ...``: make API keys for the keys file.

    keys new [--name N] [--scopes S1,S2] [--galleries G1,G2] [--rate 10/s]
        a new random key, printed once on stderr, and its line for ADAFACE_API_KEYS_FILE on
        stdout, holding only the key's sha256 (``keys new >> keys.txt`` keeps no raw key)
    keys hash
        the ``sha256:<hex>`` form of a key read from stdin (one line)

The service reads the file's format (:mod:`serving.keys` there; the README's "Keys" section);
this command only writes lines of it.
"""
from __future__ import annotations

import hashlib
import re
import secrets
import sys

from adaface.options import KEY_NAME_PATTERN, SCOPES

from .registry import command

_NAME = re.compile(KEY_NAME_PATTERN)


def hashed(key: str) -> str:
    """``sha256:<64 hex>`` of a key's UTF-8 bytes (what the keys file may hold instead)."""
    return "sha256:" + hashlib.sha256(key.encode("utf-8")).hexdigest()


def key_line(key: str, name=None, scopes=None, galleries=None, rate=None) -> str:
    """The keys-file line of ``key`` (hashed) with its attributes; ValueError for a bad one."""
    parts = [hashed(key)]
    if name is not None:
        if not _NAME.fullmatch(name):
            raise ValueError(f"--name {name!r}: 1 to 64 letters, digits or _ . : @ -")
        parts.append(f"name={name}")
    if scopes is not None:
        unknown = sorted(set(scopes.split(",")) - set(SCOPES))
        if unknown:
            raise ValueError(f"--scopes: {', '.join(unknown)} is not a scope; use some of {', '.join(SCOPES)}")
        parts.append(f"scopes={scopes}")
    if galleries is not None:
        parts.append(f"galleries={galleries}")
    if rate is not None:
        parts.append(f"rate={rate}")
    return " ".join(parts)


def cmd_new(args, ctx) -> int:
    key = secrets.token_urlsafe(32)
    try:
        line = key_line(key, args.name, args.scopes, args.galleries, args.rate)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"new key (shown once; give it to the client): {key}", file=sys.stderr)
    print(line)
    return 0


def cmd_hash(args, ctx) -> int:
    key = sys.stdin.readline().strip()
    if not key:
        print("error: write the key on stdin (echo -n KEY | python AdaFaceFeature.py keys hash)", file=sys.stderr)
        return 2
    print(hashed(key))
    return 0


@command("keys")
def register(sub, parents) -> None:
    keys = sub.add_parser("keys", help="make API keys for ADAFACE_API_KEYS_FILE")
    actions = keys.add_subparsers(dest="action", required=True)
    p = actions.add_parser("new", help="a new random key and its (hashed) keys-file line")
    p.add_argument("--name", help="the name logs, metrics and the audit trail show")
    p.add_argument("--scopes", help=f"comma-separated, some of {', '.join(SCOPES)} (default: all)")
    p.add_argument("--galleries", help="comma-separated gallery names it may reach (default: all)")
    p.add_argument("--rate", help="N/s, N/min or N/h (default: no limit)")
    p.set_defaults(run=cmd_new)
    p = actions.add_parser("hash", help="the sha256: form of a key read from stdin")
    p.set_defaults(run=cmd_hash)
