"""What the CompreFace and DeepStack layers share: which gallery a caller's requests address,
the face ids those APIs see, and boxes in their integer form.

Both APIs have one face collection per key. Here it is a gallery: the one gallery a key is
limited to (``galleries=`` in the keys file), else ``ADAFACE_COMPAT_GALLERY`` (default
``default``), which a key limited to other galleries may not use.
"""
from __future__ import annotations

import re
import uuid

import numpy as np

from adaface import options as opt
from gallery.errors import GalleryNotFoundError

from .errors import ApiError

#: CompreFace's image ids are UUIDs; ours are a face id in the last 56 bits under this prefix
_IMAGE_ID = re.compile(r"00000000-0000-4000-80([0-9a-f]{2})-([0-9a-f]{12})", re.IGNORECASE)


def collection(caller, default: str) -> str:
    """The gallery ``caller`` (:class:`serving.access.Caller`) addresses: its key's one gallery,
    else ``default``; 403 ``forbidden`` where its key is limited to galleries that exclude it."""
    limited = caller.galleries
    if limited is not None and len(limited) == 1:
        return next(iter(limited))
    if not caller.sees(default):
        raise ApiError(403, "forbidden", f"the key {caller.name!r} is limited to several galleries and not to "
                       f"{default!r} (ADAFACE_COMPAT_GALLERY): give it one gallery to use it here")
    return default


def image_id(face_id: int) -> str:
    """A face id as a UUID string (``00000000-0000-4000-80xx-xxxxxxxxxxxx``)."""
    return str(uuid.UUID(f"000000000000400080{int(face_id):014x}"))


def face_id(image: str):
    """The face id in an :func:`image_id`, or None for any other string."""
    match = _IMAGE_ID.fullmatch(str(image).strip())
    return int(match.group(1) + match.group(2), 16) if match else None


def largest_first(faces) -> list:
    """Faces sorted by box area, largest first (a face without a box, an aligned crop, first)."""
    def area(face) -> float:
        if face.box is None:
            return float("inf")
        x1, y1, x2, y2 = np.asarray(face.box, np.float64).reshape(-1)[:4]
        return float((x2 - x1) * (y2 - y1))
    return sorted(faces, key=lambda f: -area(f))


def int_box(face, width: int = 112, height: int = 112) -> tuple:
    """``(x_min, y_min, x_max, y_max)`` as integer pixels (rounded, at least 0) of a face's box;
    a face taken as an aligned crop has no box and gets the whole ``width`` × ``height`` image."""
    if face.box is None:
        return 0, 0, int(width), int(height)
    x1, y1, x2, y2 = (max(0, int(round(float(v)))) for v in np.asarray(face.box).reshape(-1)[:4])
    return x1, y1, x2, y2


def identity_names(state, gallery: str) -> list:
    """Every identity name of ``gallery``, sorted (none when it does not exist yet), read a page
    at a time through ``state`` (:class:`serving.gallery_state.GalleryState`)."""
    names, offset = [], 0
    try:
        while True:
            page = state.call("list_identities", gallery, opt.LIST_LIMIT.high, offset)
            names += [i.name for i in page]
            if len(page) < opt.LIST_LIMIT.high:
                return names
            offset += len(page)
    except GalleryNotFoundError:
        return names
