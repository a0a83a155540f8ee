"""Errors a gallery client can cause, each with its HTTP ``status`` and a short ``code``.

The service's error handler answers any exception carrying ``status`` and ``code`` as JSON
(``serving.errors.client_error``), so the store raises these directly; the command line prints
their message.
"""


class GalleryError(Exception):
    """Base class: a client-caused gallery error (HTTP 400 unless a subclass says otherwise)."""

    status = 400
    code = "bad_request"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class BadNameError(GalleryError):
    code = "bad_name"


class GalleryNotFoundError(GalleryError):
    status, code = 404, "gallery_not_found"

    def __init__(self, name: str):
        super().__init__(f"no gallery named {name!r}")


class GalleryExistsError(GalleryError):
    status, code = 409, "gallery_exists"

    def __init__(self, name: str):
        super().__init__(f"a gallery named {name!r} already exists")


class IdentityNotFoundError(GalleryError):
    status, code = 404, "identity_not_found"

    def __init__(self, gallery: str, name: str):
        super().__init__(f"gallery {gallery!r} has no identity named {name!r}")


class IdentityExistsError(GalleryError):
    status, code = 409, "identity_exists"

    def __init__(self, gallery: str, name: str):
        super().__init__(f"gallery {gallery!r} already has an identity named {name!r}")


class FaceNotFoundError(GalleryError):
    status, code = 404, "face_not_found"

    def __init__(self, gallery: str, face_id: int):
        super().__init__(f"gallery {gallery!r} has no face with id {face_id}")


class StoreUrlError(ValueError):
    """ADAFACE_GALLERY_URL names no backend we have (a configuration error, not a client one)."""


class ConflictError(GalleryError):
    """A concurrent write got there first (a name taken meanwhile); retrying gives the real answer."""

    status, code = 409, "conflict"


class StoreUnavailableError(GalleryError):
    """The database could not be reached or stayed locked (HTTP 503; retry)."""

    status, code = 503, "store_unavailable"
