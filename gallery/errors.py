"""Errors a gallery client can cause, each with a stable ``code``.

The service maps each code to its HTTP status in one table (``serving.errors.STATUS``), so the
store raises these directly; the command line prints their message.
"""


class GalleryError(Exception):
    """Base class: a client-caused gallery error."""

    code = "bad_request"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class BadNameError(GalleryError):
    code = "bad_name"


class BadMetadataError(GalleryError):
    """Metadata the store refuses: not a JSON object, too deep or too large, or holding a value
    JSON cannot carry (a non-finite number, an integer beyond 64 bits, a string that is not
    valid Unicode)."""

    code = "bad_metadata"


class GalleryNotFoundError(GalleryError):
    code = "gallery_not_found"

    def __init__(self, name: str):
        super().__init__(f"no gallery named {name!r}")


class GalleryExistsError(GalleryError):
    code = "gallery_exists"

    def __init__(self, name: str):
        super().__init__(f"a gallery named {name!r} already exists")


class IdentityNotFoundError(GalleryError):
    code = "identity_not_found"

    def __init__(self, gallery: str, name: str):
        super().__init__(f"gallery {gallery!r} has no identity named {name!r}")
        self.gallery, self.name = gallery, name


class IdentityExistsError(GalleryError):
    code = "identity_exists"

    def __init__(self, gallery: str, name: str):
        super().__init__(f"gallery {gallery!r} already has an identity named {name!r}")
        self.gallery, self.name = gallery, name


class FaceNotFoundError(GalleryError):
    code = "face_not_found"

    def __init__(self, gallery: str, face_id: int):
        super().__init__(f"gallery {gallery!r} has no face with id {face_id}")


class StoreUrlError(ValueError):
    """ADAFACE_GALLERY_URL names no backend we have (a configuration error, not a client one)."""


class ConflictError(GalleryError):
    """A concurrent write got there first (a name taken meanwhile); retrying gives the real answer."""

    code = "conflict"


class StoreUnavailableError(GalleryError):
    """The database could not be reached or stayed locked (retry)."""

    code = "store_unavailable"


class ModelMismatchError(GalleryError):
    """The gallery's embeddings were made by another network than the one asking: comparing them
    would give meaningless answers (re-embed the gallery, or run the model that filled it)."""

    code = "model_mismatch"

    def __init__(self, gallery: str, stored, running):
        super().__init__(f"gallery {gallery!r} holds embeddings of {stored.name}, not of the running model "
                         f"{running.name}: re-embed it (gallery reembed, or POST /v1/galleries/{gallery}/reembed) "
                         "or run the model that filled it")
        self.stored, self.running = stored, running


class CropNotFoundError(GalleryError):
    code = "crop_not_found"

    def __init__(self, gallery: str, face_id: int):
        super().__init__(f"face {face_id} of gallery {gallery!r} has no stored crop "
                         "(enrolled with ADAFACE_STORE_CROPS=false, or before crops were kept)")
