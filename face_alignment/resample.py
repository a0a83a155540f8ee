"""Pillow's BILINEAR resize of 8-bit RGB images, to the bit, in a fraction of Pillow's time.

MTCNN's output depends on its pyramid levels to the grey level (one grey level on 0.1% of a
level's pixels moves a P-Net score by up to 0.01 and can change which boxes survive), and the
reference makes every level with ``PIL.Image.resize(BILINEAR)``: an antialiasing triangle filter
as wide as the scale, integer coefficients with 22 fraction bits, a horizontal pass rounded to
uint8, then a vertical pass. Pillow computes each output pixel as a scalar dot product; for the
20 to 30 levels of a photo that costs about as much as P-Net itself.

Here both passes run as sums of whole rows: ``out[j] = Σ_t w[j, t] · in[first[j] + t]`` over rows
of thousands of pixels, which the compiler (numba) turns into 8-wide integer SIMD. The
horizontal pass runs on the photo transposed, so that its source columns are rows too. The
arithmetic is Pillow's: the same coefficients (``pil_coefficients``), 32-bit integer sums with
the same rounding bias, the same shift and clip, so the result is identical, not close
(``tests/test_resample.py`` checks it against Pillow). Without numba the levels come from
Pillow itself, slower and the same.
"""
import functools
import math

import numpy as np
from PIL import Image

from serving.native import map_native

try:
    from numba import njit
except ImportError:  # pragma: no cover - numba is in requirements.txt; Pillow gives the same pixels
    njit = None

PRECISION_BITS = 22  # Pillow's fixed-point coefficients for 8-bit images
PARALLEL_PIXELS = 250_000  # transposes of at least this many pixels per thread are split


@functools.lru_cache(maxsize=512)
def pil_coefficients(in_size: int, out_size: int):
    """Pillow's BILINEAR resampling coefficients along one axis, as ``precompute_coeffs`` and
    ``normalize_coeffs_8bpc`` compute them (same double arithmetic, same order).

    Returns (first, count, weights): output pixel i is
    ``clip8((2**21 + sum_t weights[i, t] * in[first[i] + t]) >> 22)`` over t < count[i];
    first and count are int64 arrays (out_size), weights int32 (out_size × ksize, zero past count).
    Cached per size pair (photos of one size share their levels' coefficients): read-only.
    """
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = filterscale  # the triangle filter's support is 1
    ksize = int(math.ceil(support)) * 2 + 1
    center = (np.arange(out_size) + 0.5) * scale
    first = np.maximum((center - support + 0.5).astype(np.int64), 0)
    count = np.minimum((center + support + 0.5).astype(np.int64), in_size) - first
    taps = np.arange(ksize)
    offset = taps[None, :] + first[:, None] - center[:, None] + 0.5  # as Pillow: int + int - double
    weights = np.maximum(1.0 - np.abs(offset * (1.0 / filterscale)), 0.0)
    weights[taps[None, :] >= count[:, None]] = 0.0
    total = np.cumsum(weights, axis=1)[:, -1]  # summed in order, as Pillow sums them
    weights = np.divide(weights, total[:, None], out=weights, where=total[:, None] != 0.0)
    weights = np.trunc(0.5 + weights * (1 << PRECISION_BITS)).astype(np.int32)
    for array in (first, count, weights):
        array.flags.writeable = False
    return first, count, weights


def _resample_rows(src, first, count, weights, out):
    """One Pillow pass along the first axis: ``out[j] = clip8((2**21 + Σ_t weights[j, t] ·
    src[first[j] + t]) >> 22)`` for N×M uint8 ``src`` into J×M uint8 ``out``.

    The sums fit in 32 bits (the weights of a row sum to 2**22, the pixels are below 2**8)."""
    width = src.shape[1]
    acc = np.empty(width, np.int32)
    for j in range(first.shape[0]):
        acc[:] = 1 << (PRECISION_BITS - 1)
        for t in range(count[j]):
            weight = weights[j, t]
            row = src[first[j] + t]
            for k in range(width):
                acc[k] += np.int32(weight * np.int32(row[k]))
        for k in range(width):
            value = acc[k] >> PRECISION_BITS
            out[j, k] = 0 if value < 0 else (255 if value > 255 else value)


def _transpose(src, out, start, stop):
    """Columns ``start:stop`` of A×B×3 uint8 ``src`` into rows ``start:stop`` of its B×A×3
    transpose ``out`` (written in order, read across)."""
    for b in range(start, stop):
        for a in range(src.shape[0]):
            out[b, a, 0] = src[a, b, 0]
            out[b, a, 1] = src[a, b, 1]
            out[b, a, 2] = src[a, b, 2]


if njit is not None:
    _resample_rows = njit(cache=True, nogil=True)(_resample_rows)
    _transpose = njit(cache=True, nogil=True)(_transpose)


def _readonly(array: np.ndarray) -> np.ndarray:
    """A read-only view: the kernels always see read-only inputs, so numba compiles each once."""
    view = array.view()
    view.flags.writeable = False
    return view


def transposed(image: np.ndarray, workers: int = 1) -> np.ndarray:
    """H×W×3 uint8 -> its W×H×3 transpose (C order), the horizontal pass's input; large images
    are split by columns among ``workers`` native threads."""
    src = _readonly(np.ascontiguousarray(image))
    out = np.empty((image.shape[1], image.shape[0], 3), np.uint8)
    parts = max(1, min(workers, image.shape[0] * image.shape[1] // PARALLEL_PIXELS))
    bounds = np.linspace(0, image.shape[1], parts + 1).astype(int)
    map_native(lambda k: _transpose(src, out, bounds[k], bounds[k + 1]), range(parts), parts)
    return out


class Resampler:
    """Makes Pillow-exact BILINEAR resizes of one H×W×3 uint8 RGB photo, at any number of sizes.

    ``resize`` releases the GIL (numba ``nogil``), so several sizes can be made at once in
    native threads; the transposed photo is made once, on first use.
    """

    def __init__(self, image: np.ndarray):
        self.image = np.ascontiguousarray(image, dtype=np.uint8)
        self._columns = None

    def resize(self, size: tuple) -> np.ndarray:
        """The photo resized to ``size`` (height, width) as ``PIL.Image.resize(BILINEAR)`` gives
        it: height × width × 3 uint8."""
        height, width = size
        in_height, in_width = self.image.shape[:2]
        if njit is None:
            return np.asarray(Image.fromarray(self.image).resize((width, height), Image.BILINEAR))
        columns = self.columns()  # in_width × in_height × 3
        if width != in_width:
            first, count, weights = pil_coefficients(in_width, width)
            columns_out = np.empty((width, in_height, 3), np.uint8)
            _resample_rows(_readonly(columns.reshape(in_width, -1)), first, count, weights,
                           columns_out.reshape(width, -1))
            rows = transposed(columns_out)  # in_height × width × 3
        else:
            rows = self.image
        if height == in_height:
            return rows.copy() if rows is self.image else rows
        first, count, weights = pil_coefficients(in_height, height)
        out = np.empty((height, width, 3), np.uint8)
        _resample_rows(_readonly(rows.reshape(in_height, -1)), first, count, weights, out.reshape(height, -1))
        return out

    def columns(self, workers: int = 1) -> np.ndarray:
        """The photo transposed (W×H×3), made once (by ``workers`` native threads)."""
        if self._columns is None:
            self._columns = transposed(self.image, workers)
        return self._columns
