"""Errors a caller can cause, each with a stable machine-readable ``code``.

The library knows nothing of HTTP: the service maps codes to statuses in one table
(``serving.errors.STATUS``) and the command line prints the message. Anything else raised is a
bug.
"""
from __future__ import annotations


class InputError(ValueError):
    """Base class: bad input or options from the caller; ``code`` names the kind."""

    code = "bad_request"
    default_message = "the request cannot be processed"

    def __init__(self, message: str | None = None):
        super().__init__(message or self.default_message)
        self.message = str(self)


class BadOptionError(InputError):
    """An option outside its vocabulary or bounds (see :mod:`adaface.options`)."""

    code = "bad_option"


class NoFaceError(InputError):
    code = "no_face"
    default_message = "no face was found in the image"


class NotAlignedError(InputError):
    """``align=never`` given an image that is not a 112×112 crop."""

    code = "not_aligned"


def code_of(exc: BaseException) -> str | None:
    """The stable code of an error a caller caused (ours, the decoder's, the galleries'), or None."""
    code = getattr(exc, "code", None)
    return code if isinstance(code, str) and isinstance(exc, Exception) else None
