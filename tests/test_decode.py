"""image_decode: every format and mode we decode, base64 variants, each refusal, shared photos.

All images except the shared photos are written here with Pillow.
"""
import base64
import io
import struct
import time
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image, ImageOps

import adaface.decode as idec
from serving.errors import STATUS
from adaface.decode import (Base64DecodeError, EmptyImageError, ImageInputError, ImageTooLargeError,
                          NotAnImageError, TruncatedImageError, UnsupportedImageFormatError,
                          decode_any, decode_base64, decode_image, looks_like_image)
from conftest import FACEDATA, require_shared


def _rgb(h=24, w=40, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _smooth(h=48, w=64) -> np.ndarray:
    """A gradient that JPEG keeps close to the original."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // (w - 1), y * 255 // (h - 1), (x + y) * 255 // (h + w - 2)],
                    axis=2).astype(np.uint8)


def _save(im: Image.Image, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **params)
    return buf.getvalue()


def _png(arr: np.ndarray) -> bytes:
    return _save(Image.fromarray(arr), "PNG")


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG claiming ``width x height`` RGB whose pixel data is one empty zlib stream."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)
            + _png_chunk(b"IDAT", zlib.compress(b"")) + _png_chunk(b"IEND", b""))


def _check_output(out: np.ndarray, shape) -> None:
    assert out.shape == shape
    assert out.dtype == np.uint8
    assert out.flags.c_contiguous


# --- formats -----------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt,params", [
    ("PNG", {}), ("WEBP", {"lossless": True}), ("BMP", {}), ("TIFF", {}),
    ("TIFF", {"compression": "tiff_lzw"}),
])
def test_lossless_formats_round_trip(fmt, params):
    arr = _rgb()
    out = decode_image(_save(Image.fromarray(arr), fmt, **params))
    _check_output(out, arr.shape)
    np.testing.assert_array_equal(out, arr)


def test_big_endian_tiff():
    grey = Image.new("I;16B", (5, 3))
    grey.putdata([0, 257, 32768, 65535, 1000] * 3)
    data = _save(grey, "TIFF")
    assert data[:4] == b"MM\x00*"
    assert looks_like_image(data)
    np.testing.assert_array_equal(decode_image(data)[0, :, 0], [0, 1, 128, 255, 4])


def test_jpeg_close_to_source():
    arr = _smooth()
    out = decode_image(_save(Image.fromarray(arr), "JPEG", quality=95))
    _check_output(out, arr.shape)
    assert np.abs(out.astype(int) - arr).mean() < 2


def test_multi_picture_jpeg_gives_first_picture():
    first = Image.new("RGB", (20, 10), (10, 200, 30))
    data = _save(first, "MPO", save_all=True, append_images=[Image.new("RGB", (20, 10))])
    assert Image.open(io.BytesIO(data)).format == "MPO"
    out = decode_image(data)
    _check_output(out, (10, 20, 3))
    assert np.abs(out.astype(int) - (10, 200, 30)).max() < 4


def test_gif_single_frame():
    arr = np.zeros((10, 12, 3), np.uint8)
    arr[:5] = (255, 0, 0)
    arr[5:] = (0, 0, 255)
    np.testing.assert_array_equal(decode_image(_save(Image.fromarray(arr), "GIF")), arr)


def test_gif_two_frames_gives_first():
    red = Image.new("RGB", (8, 6), (255, 0, 0))
    blue = Image.new("RGB", (8, 6), (0, 0, 255))
    data = _save(red, "GIF", save_all=True, append_images=[blue], duration=100)
    assert Image.open(io.BytesIO(data)).n_frames == 2
    out = decode_image(data)
    _check_output(out, (6, 8, 3))
    assert (out == (255, 0, 0)).all()


# --- modes -------------------------------------------------------------------------------------

def _grey3(values) -> np.ndarray:
    grey = np.asarray(values, dtype=np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1)


def test_mode_L():
    grey = np.arange(0, 240, 10, dtype=np.uint8).reshape(4, 6)
    np.testing.assert_array_equal(decode_image(_png(grey)), _grey3(grey))


def test_mode_LA_drops_alpha():
    grey = np.arange(24, dtype=np.uint8).reshape(4, 6) * 10
    alpha = np.zeros_like(grey)
    data = _save(Image.fromarray(np.stack([grey, alpha], axis=2), "LA"), "PNG")
    np.testing.assert_array_equal(decode_image(data), _grey3(grey))


def test_mode_RGBA_drops_alpha_keeping_colour():
    rgba = np.concatenate([_rgb(), np.zeros((24, 40, 1), np.uint8)], axis=2)
    rgba[0, 0, 3] = 255
    np.testing.assert_array_equal(decode_image(_save(Image.fromarray(rgba), "PNG")), rgba[..., :3])


def test_mode_1():
    bits = Image.new("1", (4, 2))
    bits.putpixel((1, 0), 1)
    out = decode_image(_save(bits, "PNG"))
    expected = np.zeros((2, 4, 3), np.uint8)
    expected[0, 1] = 255
    np.testing.assert_array_equal(out, expected)


def test_mode_CMYK():
    cmyk = Image.new("CMYK", (4, 3), (0, 255, 255, 0))  # red in CMYK
    out = decode_image(_save(cmyk, "TIFF"))
    np.testing.assert_array_equal(out, np.asarray(cmyk.convert("RGB")))
    assert (out == (255, 0, 0)).all()


def test_mode_CMYK_jpeg():
    cmyk = Image.new("CMYK", (16, 16), (0, 0, 0, 0))
    out = decode_image(_save(cmyk, "JPEG", quality=95))
    assert out.shape == (16, 16, 3) and out.min() >= 250


def _palette(transparency=None) -> bytes:
    p = Image.new("P", (3, 1))
    p.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255])
    p.putdata([0, 1, 2])
    params = {} if transparency is None else {"transparency": transparency}
    return _save(p, "PNG", **params)


@pytest.mark.parametrize("transparency", [None, 1, bytes([255, 0, 128])])
def test_mode_P_with_and_without_transparency(transparency):
    data = _palette(transparency)
    im = Image.open(io.BytesIO(data))
    assert im.mode == "P"
    assert ("transparency" in im.info) == (transparency is not None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = decode_image(data)
    np.testing.assert_array_equal(out, [[[255, 0, 0], [0, 255, 0], [0, 0, 255]]])


def test_16bit_png_scaled_not_clipped():
    values = np.array([[0, 1, 128, 257, 1000], [32767, 32768, 65278, 65534, 65535]], np.uint16)
    data = _save(Image.fromarray(values), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    out = decode_image(data)
    _check_output(out, (2, 5, 3))
    expected = np.rint(values / 257.0).astype(np.uint8)
    np.testing.assert_array_equal(out[..., 0], expected)
    np.testing.assert_array_equal(out[..., 0], [[0, 0, 0, 1, 4], [127, 128, 254, 255, 255]])
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I"])
def test_16bit_and_int_modes_from_pil(mode):
    im = Image.new(mode, (4, 1))
    im.putdata([0, 257, 32768, 65535])
    np.testing.assert_array_equal(decode_image(im)[0, :, 0], [0, 1, 128, 255])


def test_mode_I_tiff():
    im = Image.new("I", (4, 1))
    im.putdata([0, 257, 32768, 65535])
    data = _save(im, "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "I"
    np.testing.assert_array_equal(decode_image(data)[0, :, 0], [0, 1, 128, 255])


def test_mode_F_tiff_rounded_and_clipped():
    im = Image.fromarray(np.array([[0.0, 12.4, 12.6, 300.0, -5.0, np.nan]], np.float32), "F")
    data = _save(im, "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "F"
    np.testing.assert_array_equal(decode_image(data)[0, :, 0], [0, 12, 13, 255, 0, 0])


# --- EXIF orientation --------------------------------------------------------------------------

def _oriented_jpeg(orientation: int) -> bytes:
    arr = np.zeros((24, 40, 3), np.uint8)  # H=24, W=40
    arr[:12, :20] = (255, 0, 0)     # top-left red
    arr[:12, 20:] = (0, 255, 0)     # top-right green
    arr[12:, :20] = (0, 0, 255)     # bottom-left blue
    arr[12:, 20:] = (255, 255, 255)  # bottom-right white
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _save(Image.fromarray(arr), "JPEG", quality=95, exif=exif.tobytes())


def test_exif_orientation_6_rotates():
    data = _oriented_jpeg(6)
    stored = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    assert stored.shape == (24, 40, 3)
    out = decode_image(data)
    _check_output(out, (40, 24, 3))
    np.testing.assert_array_equal(out, np.rot90(stored, k=-1))  # 90 degrees clockwise
    # Clockwise: the stored bottom-left (blue) is now top-left, top-left (red) is top-right.
    assert np.abs(out[2, 2].astype(int) - (0, 0, 255)).max() < 40
    assert np.abs(out[2, -3].astype(int) - (255, 0, 0)).max() < 40
    assert np.abs(out[-3, 2].astype(int) - (255, 255, 255)).max() < 40


def test_exif_orientation_1_is_untouched():
    data = _oriented_jpeg(1)
    np.testing.assert_array_equal(decode_image(data),
                                  np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))


def test_pil_input_with_exif_matches_bytes_and_is_not_modified():
    data = _oriented_jpeg(6)
    im = Image.open(io.BytesIO(data))
    np.testing.assert_array_equal(decode_image(im), decode_image(data))
    assert im.size == (40, 24)
    assert im.getexif()[0x0112] == 6


# --- base64 ------------------------------------------------------------------------------------

def _png_for_base64() -> bytes:
    """A PNG whose base64 uses '+' and '/' and needs padding."""
    for seed in range(50):
        data = _png(_rgb(seed=seed))
        text = base64.b64encode(data)
        if len(data) % 3 and b"+" in text and b"/" in text:
            return data
    raise AssertionError("no suitable test image")


def test_base64_variants_identical():
    data = _png_for_base64()
    plain = base64.b64encode(data).decode()
    variants = {
        "plain": plain,
        "bytes": plain.encode(),
        "data_url": "data:image/png;base64," + plain,
        "line_breaks": "\r\n".join(plain[i:i + 76] for i in range(0, len(plain), 76)) + "\n",
        "mime": base64.encodebytes(data).decode(),
        "spaces": "  " + plain[:10] + " \t" + plain[10:] + " ",
        "url_safe": base64.urlsafe_b64encode(data).decode(),
        "no_padding": plain.rstrip("="),
        "url_safe_no_padding_data_url": "data:image/png;base64," + base64.urlsafe_b64encode(data)
        .decode().rstrip("="),
    }
    assert variants["no_padding"] != plain
    assert "-" in variants["url_safe"] and "_" in variants["url_safe"]
    expected = decode_image(data)
    for name, text in variants.items():
        assert decode_base64(text) == data, name
        np.testing.assert_array_equal(decode_any(text), expected, err_msg=name)
    np.testing.assert_array_equal(decode_any(plain.encode()), expected)
    np.testing.assert_array_equal(decode_any(data), expected)


def test_base64_large_input_is_fast():
    payload = np.random.default_rng(1).bytes(6_000_000)
    text = base64.encodebytes(payload)  # 8 MB, a line break every 76 characters
    start = time.perf_counter()
    assert decode_base64(b"data:image/jpeg;base64," + text) == payload
    assert time.perf_counter() - start < 1.0


@pytest.mark.parametrize("text", [
    "abc$defg", "ab=cd", "abcd=efg", "a", "abcde", "é123", "data:image/png,AAAA",
    "data:image/png;base64", "AAAA====",
])
def test_bad_base64(text):
    with pytest.raises(Base64DecodeError):
        decode_base64(text)


# --- errors ------------------------------------------------------------------------------------

@pytest.mark.parametrize("cls,code,status", [
    (EmptyImageError, "empty_body", 400),
    (Base64DecodeError, "bad_base64", 400),
    (NotAnImageError, "not_an_image", 400),
    (TruncatedImageError, "truncated_image", 400),
    (UnsupportedImageFormatError, "unsupported_format", 415),
    (ImageTooLargeError, "image_too_large", 413),
])
def test_error_table(cls, code, status):
    assert issubclass(cls, ImageInputError) and issubclass(cls, ValueError)
    assert (cls.code, STATUS[cls.code]) == (code, status)
    assert str(cls()) and cls().message == str(cls())
    assert str(cls("detail")) == "detail"


@pytest.mark.parametrize("call", [
    lambda: decode_image(b""), lambda: decode_any(b""), lambda: decode_any(""),
    lambda: decode_base64(" \r\n"), lambda: decode_base64("data:image/png;base64,"),
])
def test_empty(call):
    with pytest.raises(EmptyImageError) as info:
        call()
    assert (info.value.code, STATUS[info.value.code]) == ("empty_body", 400)


def test_bad_base64_through_decode_any():
    with pytest.raises(Base64DecodeError) as info:
        decode_any(b"this is not base64!")
    assert (info.value.code, STATUS[info.value.code]) == ("bad_base64", 400)


def test_random_bytes():
    junk = np.random.default_rng(2).bytes(5000)
    assert not looks_like_image(junk)
    for call in (decode_image, decode_any):
        with pytest.raises(NotAnImageError) as info:
            call(junk)
        assert (info.value.code, STATUS[info.value.code]) == ("not_an_image", 400)


def test_base64_of_random_bytes_is_not_an_image():
    with pytest.raises(NotAnImageError):
        decode_any(base64.b64encode(np.random.default_rng(3).bytes(300)).decode())


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
@pytest.mark.parametrize("keep", [0.5, 0.9, 20])
def test_truncated(fmt, keep):
    data = _save(Image.fromarray(_rgb(64, 80)), fmt)
    cut = data[:int(len(data) * keep)] if keep < 1 else data[:keep]
    assert looks_like_image(cut)
    with pytest.raises(TruncatedImageError) as info:
        decode_image(cut)
    assert (info.value.code, STATUS[info.value.code]) == ("truncated_image", 400)


def test_over_pixel_limit():
    data = _png(_rgb(20, 30))
    assert decode_image(data, max_pixels=600).shape == (20, 30, 3)
    for image in (data, Image.open(io.BytesIO(data)), _rgb(20, 30)):
        with pytest.raises(ImageTooLargeError) as info:
            decode_image(image, max_pixels=599)
        assert (info.value.code, STATUS[info.value.code]) == ("image_too_large", 413)
    with pytest.raises(ImageTooLargeError):
        decode_any(base64.b64encode(data), max_pixels=100)


def test_default_limit_checked_from_header_before_decoding():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with pytest.raises(ImageTooLargeError):
            decode_image(_png_header_only(10_000, 9_000))   # 9.0e7 pixels, over our default
        with pytest.raises(TruncatedImageError):  # under a raised limit it gets to the pixels
            decode_image(_png_header_only(10_000, 9_000), max_pixels=10**8)
    with pytest.raises(ImageTooLargeError) as info:
        decode_image(_png_header_only(100_000, 100_000))    # Pillow's own bomb error ...
    # ... told with our limit, not Pillow's
    assert str(info.value) == f"image is 10000000000 pixels, over the limit of {idec.DEFAULT_MAX_PIXELS}"
    with pytest.raises(ImageTooLargeError) as info:
        decode_image(_png_header_only(9_000, 6_000))        # 54 Mpx: over a 50-Mpx photo's size
    assert "54000000 pixels, over the limit of 52000000" in str(info.value)
    with pytest.raises(TruncatedImageError):  # a 50-Mpx phone photo is within the default
        decode_image(_png_header_only(8_192, 6_144))
    assert idec.DEFAULT_MAX_PIXELS == 52_000_000
    assert Image.MAX_IMAGE_PIXELS is not None


_HEIC = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 64
_AVIF = b"\x00\x00\x00\x1cftypavif\x00\x00\x00\x00avifmif1miaf" + b"\x00" * 64
_SVG = b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10">' \
       b'<rect width="10" height="10"/></svg>'
_PDF = b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<< /Type /Catalog >>\nendobj\n"


@pytest.mark.parametrize("data", [_HEIC, _AVIF, _SVG, b"  \n" + _SVG, _PDF],
                         ids=["heic", "avif", "svg", "svg_ws", "pdf"])
def test_unsupported_recognised_formats(data):
    assert looks_like_image(data)
    for call in (decode_image, decode_any):
        with pytest.raises(UnsupportedImageFormatError) as info:
            call(data)
        assert (info.value.code, STATUS[info.value.code]) == ("unsupported_format", 415)
    with pytest.raises(UnsupportedImageFormatError):
        decode_any(base64.b64encode(data).decode())


@pytest.mark.parametrize("fmt", ["ICO", "PPM"])
def test_unsupported_pillow_formats(fmt):
    with pytest.raises(UnsupportedImageFormatError):
        decode_image(_save(Image.fromarray(_rgb(16, 16)), fmt))


# --- looks_like_image --------------------------------------------------------------------------

@pytest.mark.parametrize("fmt,params", [
    ("JPEG", {}), ("PNG", {}), ("GIF", {}), ("WEBP", {}), ("BMP", {}), ("TIFF", {}),
])
def test_looks_like_image(fmt, params):
    data = _save(Image.fromarray(_rgb()), fmt, **params)
    assert looks_like_image(data)
    assert not looks_like_image(base64.b64encode(data))
    assert not looks_like_image(b"data:image/png;base64," + base64.b64encode(data))


def test_looks_like_image_rejects_base64_starting_like_bmp():
    assert not looks_like_image(b"BMwLCB3b3JsZCBoZWxsbywgd29ybGQ=")
    assert not looks_like_image(b"")


# --- numpy and PIL inputs ----------------------------------------------------------------------

def test_numpy_rgb_taken_as_is():
    arr = _rgb()
    out = decode_image(arr)
    assert out is arr or np.shares_memory(out, arr)
    np.testing.assert_array_equal(out, decode_image(_png(arr)))


def test_numpy_non_contiguous_made_contiguous():
    arr = _rgb(24, 80)[:, ::2]
    out = decode_image(arr)
    assert out.flags.c_contiguous
    np.testing.assert_array_equal(out, arr)


@pytest.mark.parametrize("shape", [(24, 40), (24, 40, 1), (24, 40, 4)])
def test_numpy_grey_and_rgba_match_bytes_path(shape):
    arr = np.random.default_rng(4).integers(0, 256, shape, dtype=np.uint8)
    png = _png(arr[..., 0] if shape[-1] == 1 else arr)
    out = decode_image(arr)
    _check_output(out, (24, 40, 3))
    np.testing.assert_array_equal(out, decode_image(png))


@pytest.mark.parametrize("bad", [
    np.zeros((4, 4, 3), np.float32), np.zeros((4, 4, 3), np.uint16), np.zeros((4, 4, 2), np.uint8),
    np.zeros((2, 4, 4, 3), np.uint8), np.zeros(12, np.uint8), np.zeros((0, 4, 3), np.uint8),
])
def test_numpy_bad_dtype_or_shape(bad):
    with pytest.raises(NotAnImageError) as info:
        decode_image(bad)
    assert str(info.value)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF"])
def test_pil_input_matches_bytes_path(fmt):
    data = _save(Image.fromarray(_smooth()), fmt)
    np.testing.assert_array_equal(decode_image(Image.open(io.BytesIO(data))), decode_image(data))


def test_pil_modes_match_bytes_path():
    for im in (Image.new("L", (5, 4), 77), Image.new("RGBA", (5, 4), (1, 2, 3, 0)),
               Image.new("CMYK", (5, 4), (10, 20, 30, 40))):
        fmt = "TIFF" if im.mode == "CMYK" else "PNG"
        np.testing.assert_array_equal(decode_image(im), decode_image(_save(im, fmt)))


def test_output_is_writable():
    out = decode_image(_png(_rgb()))
    out[0, 0] = 0


def test_wrong_python_type():
    with pytest.raises(TypeError):
        decode_image("aGVsbG8=")
    with pytest.raises(TypeError):
        decode_image([[0, 0, 0]])


# --- shared photos -----------------------------------------------------------------------------

def _shared_photos():
    if not FACEDATA.is_dir():
        return []
    return sorted(p for p in FACEDATA.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))


def test_shared_webp_behind_jpg_name():
    require_shared()
    path = FACEDATA / "deepface" / "img47.jpg"
    data = path.read_bytes()
    assert data[:4] == b"RIFF" and data[8:12] == b"WEBP"
    assert looks_like_image(data)
    out = decode_image(data)
    _check_output(out, (1800, 1350, 3))
    np.testing.assert_array_equal(out, np.asarray(Image.open(path).convert("RGB")))
    np.testing.assert_array_equal(decode_any(base64.b64encode(data).decode()), out)


@pytest.mark.parametrize("path", _shared_photos(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_shared_photos_match_pil(path):
    require_shared()
    with Image.open(path) as im:
        orientation = im.getexif().get(0x0112, 1)
        upright = im if orientation == 1 else ImageOps.exif_transpose(im)
        reference = np.asarray(upright.convert("RGB"))
    out = decode_image(path.read_bytes())
    _check_output(out, reference.shape)
    np.testing.assert_array_equal(out, reference)


def _float_rgb_tiff(width: int = 8, height: int = 8) -> bytes:
    """A little-endian TIFF of 3 samples of 32-bit floating-point data per pixel, which Pillow
    cannot open (it reads float TIFFs with one sample only)."""
    from PIL import TiffImagePlugin
    pixels = np.linspace(0, 1, width * height * 3, dtype="<f4").tobytes()
    ifd = TiffImagePlugin.ImageFileDirectory_v2()
    for tag, value in ((256, width), (257, height), (258, (32, 32, 32)), (259, 1), (262, 2), (277, 3),
                       (278, height), (279, len(pixels)), (339, (3, 3, 3)), (273, 0)):
        ifd[tag] = value
    ifd[273] = 8 + len(ifd.tobytes(8))
    return b"II*\x00" + struct.pack("<I", 8) + ifd.tobytes(8) + pixels


def test_float_rgb_tiff_is_unsupported_not_truncated():
    data = _float_rgb_tiff()
    with pytest.raises(UnsupportedImageFormatError) as info:
        decode_any(data)
    assert "3 samples of 32-bit floating-point" in str(info.value)
    assert STATUS[info.value.code] == 415
    with pytest.raises(TruncatedImageError):  # the same file cut inside its directory
        decode_any(data[:60])


def test_image_size_reads_the_header_alone():
    assert idec.image_size(_png_header_only(10_000, 9_000)) == (10_000, 9_000)
    assert idec.image_size(_png_header_only(100_000, 100_000)) is None  # over Pillow's ceiling
    assert idec.image_size(b"not an image") is None
    assert idec.image_size(b"") is None
