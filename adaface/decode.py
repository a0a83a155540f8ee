"""Turn what clients send (raw image bytes, base64 text, PIL images, arrays) into RGB pixels.

Every decoder here returns a C-contiguous ``uint8`` array of shape ``(H, W, 3)`` in RGB order,
with EXIF orientation applied. Bad input raises a subclass of :class:`ImageInputError`, whose
``code`` names the kind (the service maps it to an HTTP status).

Decoded formats: JPEG (and its multi-picture variant MPO), PNG, WebP, BMP, GIF and TIFF; for
animated or multi-page files only the first frame is read. Formats we recognise but do not decode
(HEIC/HEIF, AVIF, JPEG XL, JPEG 2000, SVG, PDF, PSD, ICO, ...) raise
:class:`UnsupportedImageFormatError`.

Size limit: ``max_pixels`` (width x height) is checked from the header before any pixel is
decoded. Pillow's own decompression-bomb check stays in force as well: it warns above
``PIL.Image.MAX_IMAGE_PIXELS`` and refuses above twice that, so a per-call limit beyond twice
Pillow's has no further effect. Truncated files are refused; ``LOAD_TRUNCATED_IMAGES`` is never set.
"""
from __future__ import annotations

import binascii
import io
import re
import struct
import warnings

import numpy as np
from PIL import Image, ImageOps, TiffImagePlugin, UnidentifiedImageError

from .errors import InputError
from .options import MAX_PIXELS as DEFAULT_MAX_PIXELS

# Pillow format names we decode. Pillow's JPEG opener also returns multi-picture JPEGs (many
# phone photos), under the format name MPO.
DECODED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")

# Pillow formats with a strong signature, opened (header only) to name a format we refuse.
_IDENTIFY_ONLY_FORMATS = ("AVIF", "JPEG2000", "PSD", "ICO", "ICNS", "PPM", "QOI", "DDS", "EPS",
                          "FITS", "BLP", "SGI", "DCX")

_WHITESPACE = b" \t\r\n\v\f"
_URLSAFE_TO_STD = bytes.maketrans(b"-_", b"+/")
_REFUSED_BRANDS = {  # ISO-BMFF major brands
    **dict.fromkeys((b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1"),
                    "HEIC/HEIF"),
    b"avif": "AVIF", b"avis": "AVIF", b"jxl ": "JPEG XL",
}
_REFUSED_PREFIXES = (
    (b"\xff\x0a", "JPEG XL"), (b"\x00\x00\x00\x0cJXL \r\n\x87\n", "JPEG XL"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG 2000"), (b"\xff\x4f\xff\x51", "JPEG 2000"),
    (b"%PDF-", "PDF"), (b"%!PS", "PostScript/EPS"), (b"\xc5\xd0\xd3\xc6", "PostScript/EPS"),
    (b"8BPS\x00\x01", "PSD"), (b"8BPS\x00\x02", "PSB"), (b"qoif", "QOI"),
)
_BMP_HEADER_SIZES = {12, 16, 40, 52, 56, 64, 108, 124}


class ImageInputError(InputError):
    """Base class: the client sent something we cannot turn into an image."""

    code = "bad_image"
    default_message = "the request does not contain a usable image"


class EmptyImageError(ImageInputError):
    """Nothing to decode: an empty body or empty base64 text."""

    code = "empty_body"
    default_message = "no image data was sent (empty body)"


class Base64DecodeError(ImageInputError):
    """The text is not valid base64 (after the tolerated variations)."""

    code = "bad_base64"
    default_message = "the image text is not valid base64"


class NotAnImageError(ImageInputError):
    """The bytes are no image format we know, or an array of the wrong dtype/shape."""

    code = "not_an_image"
    default_message = "the data is not an image in any format we recognise"


class TruncatedImageError(ImageInputError):
    """The file starts like a decodable image but ends early or breaks."""

    code = "truncated_image"
    default_message = "the image data ends early (truncated or corrupt file)"


class UnsupportedImageFormatError(ImageInputError):
    """A recognised image or document format that we do not decode."""

    code = "unsupported_format"
    default_message = "this image format is not supported; send JPEG, PNG, WebP, BMP, GIF or TIFF"


class ImageTooLargeError(ImageInputError):
    """Width x height is over the pixel limit (checked from the header)."""

    code = "image_too_large"
    default_message = "the image has too many pixels"


# ---------------------------------------------------------------------------------------------
# base64


def _to_ascii(data: str | bytes | bytearray | memoryview) -> bytes:
    if isinstance(data, str):
        try:
            return data.encode("ascii")
        except UnicodeEncodeError as exc:
            raise Base64DecodeError(f"base64 text contains a non-ASCII character at "
                                    f"position {exc.start}") from None
    return bytes(data)


def _strip_data_url(text: bytes) -> bytes:
    """Drop a ``data:<media type>;base64,`` prefix when present (whitespace already removed)."""
    if text[:5].lower() != b"data:":
        return text
    header, comma, payload = text.partition(b",")
    if not comma:
        raise Base64DecodeError("data: URL without a ',' before the payload")
    if not header.lower().endswith(b";base64"):
        raise Base64DecodeError("data: URL is not base64-encoded (expected ';base64,')")
    return payload


def decode_base64(data: str | bytes) -> bytes:
    """Decode base64 image text to the raw image bytes.

    Accepts a ``data:image/...;base64,`` prefix, whitespace and line breaks anywhere, the URL-safe
    alphabet (``-`` and ``_``) and missing ``=`` padding. Raises :class:`EmptyImageError` when
    nothing is left to decode and :class:`Base64DecodeError` for anything else that is invalid.
    """
    text = _to_ascii(data).translate(None, _WHITESPACE)
    padded = _strip_data_url(text).translate(_URLSAFE_TO_STD)
    text = padded.rstrip(b"=")
    if len(padded) - len(text) > 2:
        raise Base64DecodeError("base64 text ends with too much '=' padding")
    if not text:
        raise EmptyImageError("the base64 text is empty")
    if len(text) % 4 == 1:
        raise Base64DecodeError("base64 text has an impossible length (one character too many "
                                "or one missing)")
    text += b"=" * (-len(text) % 4)
    try:
        return binascii.a2b_base64(text, strict_mode=True)
    except binascii.Error as exc:
        raise Base64DecodeError(f"invalid base64: {exc}") from None


# ---------------------------------------------------------------------------------------------
# format sniffing


def _decoded_format(head: bytes) -> str | None:
    """Name of a format we decode whose signature starts ``head``, else None."""
    if head[:3] == b"\xff\xd8\xff":
        return "JPEG"
    if head[:8] == b"\x89PNG\r\n\x1a\n":
        return "PNG"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "TIFF"
    if head[:2] == b"BM" and len(head) >= 18:
        # The DIB header size keeps base64 text that happens to start with "BM" out.
        if struct.unpack_from("<I", head, 14)[0] in _BMP_HEADER_SIZES:
            return "BMP"
    return None


def _isobmff_brand(head: bytes) -> bytes | None:
    """Major brand of an ISO-BMFF file (HEIF, AVIF, ...) whose first box is a sane ``ftyp``."""
    if len(head) < 12 or head[4:8] != b"ftyp":
        return None
    return head[8:12] if 8 <= struct.unpack_from(">I", head)[0] <= 4096 else None


def _refused_format(head: bytes) -> str | None:
    """Name of an image or document format we recognise but do not decode, else None."""
    brand = _isobmff_brand(head)
    if brand in _REFUSED_BRANDS:
        return _REFUSED_BRANDS[brand]
    for prefix, name in _REFUSED_PREFIXES:
        if head.startswith(prefix):
            return name
    if head[:4] in (b"\x00\x00\x01\x00", b"\x00\x00\x02\x00") and head[4:6] not in (b"", b"\0\0"):
        return "ICO/CUR"
    return "SVG" if _is_svg(head) else None


def _is_svg(head: bytes) -> bool:
    text = head.lstrip(b"\xef\xbb\xbf" + _WHITESPACE)
    return text[:1] == b"<" and b"<svg" in text[:4096].lower()


def looks_like_image(data: bytes) -> bool:
    """True when ``data`` starts with the signature of an image (or document) format we know.

    Covers the decoded formats (JPEG, PNG, GIF, WebP, BMP, TIFF in both byte orders) and the
    recognised but refused ones (HEIC/HEIF, AVIF, JPEG XL, JPEG 2000, PDF, EPS, PSD, ICO, QOI,
    SVG). No signature here can begin valid base64 text, which is what lets an endpoint accept
    either raw image bytes or base64 in the same body.
    """
    head = bytes(data[:4096])
    return _decoded_format(head) is not None or _refused_format(head) is not None


# ---------------------------------------------------------------------------------------------
# decoding


def _check_pixels(width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise ImageTooLargeError(f"image is {width}x{height} = {width * height} pixels, "
                                 f"over the limit of {max_pixels}")


def _pillow_refused_format(data: bytes) -> str | None:
    """Pillow's name for ``data`` among strongly signed formats we refuse, read from the header."""
    try:
        with Image.open(io.BytesIO(data), formats=_IDENTIFY_ONLY_FORMATS) as im:
            return im.format
    except Exception:  # noqa: BLE001 - any failure here just means "none of these"
        return None


def _open(data: bytes, max_pixels: int) -> Image.Image:
    """Open ``data`` with one of the decoded formats, reading the header only."""
    head = data[:4096]
    refused = _refused_format(head)
    if refused:
        raise UnsupportedImageFormatError(f"{refused} images are not supported; "
                                          f"send JPEG, PNG, WebP, BMP, GIF or TIFF")
    try:
        return Image.open(io.BytesIO(data), formats=DECODED_FORMATS)
    except Image.DecompressionBombError as exc:  # Pillow's own ceiling, over any limit we allow
        size = re.search(r"\((\d+) pixels\)", str(exc))
        counted = f"{int(size.group(1))} pixels, " if size else ""
        raise ImageTooLargeError(f"image is {counted}over the limit of {max_pixels}") from None
    except UnidentifiedImageError:
        pass
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as exc:
        raise _load_error(exc) from None
    known = _decoded_format(head)
    if known == "TIFF":
        layout = _tiff_layout(data)
        if layout:
            raise UnsupportedImageFormatError(f"TIFF with {layout} is not supported; send 8- or 16-bit "
                                              f"grey or RGB, or JPEG, PNG, WebP, BMP or GIF")
    if known:
        raise TruncatedImageError(f"data starts like a {known} file but its header is cut short "
                                  f"or corrupt")
    other = _pillow_refused_format(data)
    if other:
        raise UnsupportedImageFormatError(f"{other} images are not supported; "
                                          f"send JPEG, PNG, WebP, BMP, GIF or TIFF")
    raise NotAnImageError()


_TIFF_SAMPLE_KINDS = {1: "unsigned", 2: "signed", 3: "floating-point", 4: "undefined", 5: "complex integer",
                      6: "complex floating-point"}


def _tiff_layout(data: bytes) -> str | None:
    """The pixel layout of a TIFF whose first directory reads whole ("3 samples of 32-bit
    floating-point"), or None when it does not (a cut or corrupt file)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # Pillow only warns of a directory cut short
            ifd = TiffImagePlugin.ImageFileDirectory_v2(data[:8])
            stream = io.BytesIO(data)
            stream.seek(ifd.next)
            ifd.load(stream)
        if not all(tag in ifd for tag in (256, 257, 258)):  # width, height, bits per sample
            return None
        bits = ifd[258]
        kinds = ifd.get(339, (1,))
        samples = ifd.get(277, len(bits) if isinstance(bits, tuple) else 1)
    except Exception:  # noqa: BLE001 - an unreadable directory means a broken file
        return None
    bits = bits[0] if isinstance(bits, tuple) else bits
    kind = kinds[0] if isinstance(kinds, tuple) else kinds
    return f"{samples} sample{'s' if samples != 1 else ''} of {bits}-bit {_TIFF_SAMPLE_KINDS.get(kind, 'unknown')} data"


def _load_error(exc: Exception) -> ImageInputError:
    """Map an exception Pillow raised while decoding to one of our errors."""
    if isinstance(exc, EOFError) or "truncated" in str(exc).lower():
        return TruncatedImageError(f"the image data ends early: {exc}")
    return NotAnImageError(f"the image data is corrupt: {exc}")


def _load(im: Image.Image) -> None:
    try:
        im.load()
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as exc:
        raise _load_error(exc) from None


def _upright(im: Image.Image, *, in_place: bool) -> Image.Image:
    """``im`` turned upright per its EXIF orientation (``in_place`` avoids a copy of the pixels).

    An unreadable EXIF block leaves the image as it is rather than refusing the photo.
    """
    try:
        turned = ImageOps.exif_transpose(im, in_place=in_place)
    except (SyntaxError, ValueError, TypeError, KeyError, struct.error, OSError):
        return im
    return im if in_place else turned


def _scale_16bit(values: np.ndarray) -> np.ndarray:
    """Map 0..65535 to 0..255 with rounding (65535 -> 255, 32768 -> 128)."""
    wide = np.clip(values, 0, 65535).astype(np.uint32)
    return ((wide * 255 + 32767) // 65535).astype(np.uint8)


def _grey_to_rgb(grey: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.repeat(grey[:, :, None], 3, axis=2))


def _to_rgb_array(im: Image.Image) -> np.ndarray:
    """Pixels of a loaded image as a writable (H, W, 3) uint8 RGB array.

    16-bit grey (``I;16*``) and 32-bit integer (``I``, taken as 16-bit data) are scaled from
    0..65535 to 0..255; float (``F``) is taken on the 0..255 scale, rounded and clipped, NaN -> 0.
    Alpha is dropped, not composited: a transparent pixel keeps its underlying colour.
    """
    if im.mode.startswith("I;16") or im.mode == "I":
        return _grey_to_rgb(_scale_16bit(np.asarray(im)))
    if im.mode == "F":
        grey = np.nan_to_num(np.asarray(im), nan=0.0, posinf=255.0, neginf=0.0)
        return _grey_to_rgb(np.clip(np.rint(grey), 0, 255).astype(np.uint8))
    if im.mode in ("P", "PA") and "transparency" in im.info:
        im = im.convert("RGBA")  # Pillow's recommended path for palette transparency
    if im.mode != "RGB":
        try:
            im = im.convert("RGB")
        except ValueError as exc:
            raise UnsupportedImageFormatError(f"colour mode {im.mode} is not supported: "
                                              f"{exc}") from None
    return np.array(im, dtype=np.uint8, order="C")


def _from_pil(im: Image.Image, max_pixels: int) -> np.ndarray:
    _check_pixels(im.width, im.height, max_pixels)
    _load(im)
    return _to_rgb_array(_upright(im, in_place=False))


def _from_bytes(data: bytes, max_pixels: int) -> np.ndarray:
    if not data:
        raise EmptyImageError()
    with _open(data, max_pixels) as im:
        _check_pixels(im.width, im.height, max_pixels)
        _load(im)
        return _to_rgb_array(_upright(im, in_place=True))


def _from_array(arr: np.ndarray, max_pixels: int) -> np.ndarray:
    """(H, W) grey, (H, W, 1) grey, (H, W, 3) RGB or (H, W, 4) RGBA uint8 -> (H, W, 3) RGB."""
    if arr.dtype != np.uint8:
        raise NotAnImageError(f"image array must have dtype uint8, got {arr.dtype}")
    if arr.ndim == 3 and arr.shape[2] in (1, 3, 4):
        arr = arr[:, :, 0] if arr.shape[2] == 1 else arr[:, :, :3]
    elif arr.ndim != 2:
        raise NotAnImageError(f"image array must be (H, W), (H, W, 3) or (H, W, 4), "
                              f"got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise NotAnImageError(f"image array has zero size: shape {arr.shape}")
    _check_pixels(arr.shape[1], arr.shape[0], max_pixels)
    return _grey_to_rgb(arr) if arr.ndim == 2 else np.ascontiguousarray(arr)


def decode_image(data: bytes | Image.Image | np.ndarray, *,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode an image to a C-contiguous ``uint8`` array of shape ``(H, W, 3)``, RGB order.

    ``data`` is one of:

    - raw file bytes (``bytes``, ``bytearray`` or ``memoryview``) in JPEG, PNG, WebP, BMP, GIF
      (first frame) or TIFF (first page); EXIF orientation is applied, so H and W are those of
      the upright picture;
    - a ``PIL.Image.Image`` in any mode, handled like the decoded bytes (EXIF orientation applied;
      the caller's image is not modified);
    - a ``numpy.ndarray`` of dtype uint8: ``(H, W, 3)`` is taken as RGB as it is (no copy when
      already C-contiguous), ``(H, W)`` / ``(H, W, 1)`` as grey, ``(H, W, 4)`` as RGBA.

    Alpha is dropped (``convert('RGB')``), not composited. 16-bit data is scaled to 8 bits.
    Images with more than ``max_pixels`` pixels raise :class:`ImageTooLargeError` before their
    pixels are decoded. Other bad input raises the matching :class:`ImageInputError` subclass.
    """
    if isinstance(data, (bytes, bytearray, memoryview)):
        return _from_bytes(bytes(data), max_pixels)
    if isinstance(data, Image.Image):
        return _from_pil(data, max_pixels)
    if isinstance(data, np.ndarray):
        return _from_array(data, max_pixels)
    if isinstance(data, str):
        raise TypeError("decode_image takes raw image bytes; use decode_any for base64 text")
    raise TypeError(f"decode_image takes bytes, a PIL image or a numpy array, "
                    f"not {type(data).__name__}")


def file_bytes(data: bytes | str) -> bytes:
    """The image file in raw image bytes or base64 text (told apart by content).

    ``str`` is always base64. ``bytes`` are taken as an image file when they start with a known
    image signature (:func:`looks_like_image`), otherwise as base64 text. Bytes that are neither
    raise :class:`Base64DecodeError` when they are ASCII (meant as base64, presumably) and
    :class:`NotAnImageError` otherwise.
    """
    if isinstance(data, str):
        return decode_base64(data)
    data = bytes(data)
    if not data:
        raise EmptyImageError()
    if looks_like_image(data):
        return data
    try:
        return decode_base64(data)
    except Base64DecodeError:
        if data.isascii():
            raise
        raise NotAnImageError("the data is neither an image in a format we recognise "
                              "nor base64 text") from None


def image_size(data: bytes) -> tuple | None:
    """(width, height) in pixels of an image file, read from its header alone (no pixel is
    decoded), or None when the header does not say (not an image, cut short, ...)."""
    if not data or _refused_format(data[:4096]):
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=DECODED_FORMATS) as im:
                return im.width, im.height
    except Exception:  # noqa: BLE001 - decoding will raise the right error for it
        return None


def decode_any(data: bytes | str, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode raw image bytes or base64 text (told apart by content, see :func:`file_bytes`)
    to ``(H, W, 3)`` uint8 RGB."""
    return decode_image(file_bytes(data), max_pixels=max_pixels)
