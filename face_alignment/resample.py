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
(``tests/test_resample.py`` checks it against Pillow). Pillow 13 chooses which pass runs first
by the sizes, and runs the vertical one first for some (a photo more than twice as high as wide,
say); ``Resampler.horizontal_first`` tells which sizes are computed here, and the rest, like
everything when numba is missing, comes from Pillow itself, slower and the same.
"""
import functools
import math

import cv2
import numpy as np
from PIL import Image

from adaface.threads import map_native

try:
    from numba import njit
except ImportError:  # pragma: no cover - numba is in requirements.txt; Pillow gives the same pixels
    njit = None

PRECISION_BITS = 22  # Pillow's fixed-point coefficients for 8-bit images
TALL = 1.9  # photos this many times as high as wide, or more, are resized by Pillow (see
SAME_SCALE = 1.1  # ``Resampler.horizontal_first``), as are sizes whose two factors differ more
SLAB_BYTES = 1 << 20  # source rows per slab of the horizontal pass (fewer, longer kernel calls)


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

    The sums are exact in 32 bits whatever their order (the weights are positive and those of a
    row sum to 2**22, the pixels are below 2**8), so four rows are added at a time: a quarter of
    the loads and stores of the running sums."""
    width = src.shape[1]
    acc = np.empty(width, np.int32)
    for j in range(first.shape[0]):
        acc[:] = 1 << (PRECISION_BITS - 1)
        start, taps, t = first[j], count[j], 0
        while t + 4 <= taps:
            w0, w1, w2, w3 = weights[j, t], weights[j, t + 1], weights[j, t + 2], weights[j, t + 3]
            r0, r1, r2, r3 = src[start + t], src[start + t + 1], src[start + t + 2], src[start + t + 3]
            for k in range(width):
                pair = w0 * np.int32(r0[k]) + w1 * np.int32(r1[k])
                acc[k] += pair + (w2 * np.int32(r2[k]) + w3 * np.int32(r3[k]))
            t += 4
        while t < taps:
            weight, row = weights[j, t], src[start + t]
            for k in range(width):
                acc[k] += weight * np.int32(row[k])
            t += 1
        for k in range(width):
            value = acc[k] >> PRECISION_BITS
            out[j, k] = 0 if value < 0 else (255 if value > 255 else value)


def _compiled(function):
    """``function`` compiled by numba, without the GIL; the machine code is cached beside this
    file (or in ``NUMBA_CACHE_DIR``), else, where no folder is writable, compiled in each process."""
    try:
        return njit(cache=True, nogil=True)(function)
    except RuntimeError:  # numba found no writable cache folder
        return njit(nogil=True)(function)


if njit is not None:
    _resample_rows = _compiled(_resample_rows)


def _readonly(array: np.ndarray) -> np.ndarray:
    """A read-only view: the kernels always see read-only inputs, so numba compiles each once."""
    view = array.view()
    view.flags.writeable = False
    return view


def transposed(image: np.ndarray, out: np.ndarray = None) -> np.ndarray:
    """H×W×3 uint8 -> its W×H×3 transpose (C order), written into ``out`` when given (a C-order
    W×H×3 uint8 array). OpenCV's tiled transpose, several times faster than a plain loop."""
    if out is None:
        out = np.empty((image.shape[1], image.shape[0], 3), np.uint8)
    written = cv2.transpose(np.ascontiguousarray(image), dst=out)
    if written is not out:  # OpenCV allocates a new array when ``out`` does not fit
        raise ValueError(f"cannot transpose {image.shape} into {out.shape} {out.dtype}")
    return out


class Resampler:
    """Makes Pillow-exact BILINEAR resizes of one H×W×3 uint8 RGB photo, at any number of sizes.

    The horizontal pass reads the photo transposed, in slabs of ``slab_rows`` source rows (about
    ``SLAB_BYTES`` each), made once, on first use; each slab goes through every size's
    horizontal pass at once. The work is spread over native threads (numba releases the GIL):
    the slabs, then the sizes' vertical passes.
    """

    def __init__(self, image: np.ndarray):
        self.image = np.ascontiguousarray(image, dtype=np.uint8)
        height, width = self.image.shape[:2]
        self.slab_rows = max(8, SLAB_BYTES // (3 * max(width, 1)))
        self._slabs = None

    def resize(self, size: tuple) -> np.ndarray:
        """The photo resized to ``size`` (height, width) as ``PIL.Image.resize(BILINEAR)`` gives
        it: height × width × 3 uint8."""
        return self.resize_many([size])[0]

    def resize_many(self, sizes: list, workers: int = 1) -> list:
        """``resize`` at each of ``sizes``, with ``workers`` native threads."""
        if njit is None or not all(self.horizontal_first(size) for size in sizes):
            pil = Image.fromarray(self.image)
            return [np.asarray(pil.resize((width, height), Image.BILINEAR)) for height, width in sizes]
        in_height, in_width = self.image.shape[:2]
        wide = [k for k, (_, width) in enumerate(sizes) if width != in_width]
        rows = {k: np.empty((in_height, sizes[k][1], 3), np.uint8) for k in wide}  # after the horizontal pass
        slabs = self.slabs(workers)

        def horizontal(slab: int):
            top, columns = slabs[slab]
            for k in wide:
                width = sizes[k][1]
                out = np.empty((width, columns.shape[1], 3), np.uint8)
                _resample_rows(columns.reshape(in_width, -1), *pil_coefficients(in_width, width), out.reshape(width, -1))
                transposed(out, rows[k][top:top + columns.shape[1]])

        def vertical(k: int) -> np.ndarray:
            height, width = sizes[k]
            src = rows.get(k, self.image)
            if height == in_height:
                return src.copy() if src is self.image else src
            out = np.empty((height, width, 3), np.uint8)
            _resample_rows(_readonly(src.reshape(in_height, -1)), *pil_coefficients(in_height, height),
                           out.reshape(height, -1))
            return out

        if wide:
            map_native(horizontal, range(len(slabs)), workers)
        return map_native(vertical, range(len(sizes)), workers)

    def horizontal_first(self, size: tuple) -> bool:
        """Whether Pillow makes ``size`` (height, width) with its horizontal pass first, the only
        order computed here. Pillow 13 picks the order by the sizes; measured (tests/
        test_resample.py), it runs the horizontal pass first when the height does not shrink,
        and when both sides shrink by about the same factor (within ``SAME_SCALE``) on a photo
        less than ``TALL`` times as high as wide: every pyramid level and every face crop of
        ordinary photos. Anything else goes to Pillow itself."""
        height, width = size
        in_height, in_width = self.image.shape[:2]
        if height >= in_height or width == in_width:
            return True
        ratio = (height / in_height) / (width / in_width)
        return in_height < TALL * in_width and 1 / SAME_SCALE <= ratio <= SAME_SCALE

    def slabs(self, workers: int = 1) -> list:
        """The photo transposed, by slabs of ``slab_rows`` rows: [(first row, W×rows×3 uint8)],
        made once (by ``workers`` native threads)."""
        if self._slabs is None:
            tops = range(0, self.image.shape[0], self.slab_rows)
            self._slabs = list(zip(tops, map_native(lambda top: _readonly(transposed(
                self.image[top:top + self.slab_rows])), tops, workers)))
        return self._slabs
