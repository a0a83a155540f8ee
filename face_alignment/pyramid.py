"""The MTCNN image pyramid and the P-Net pass over it: exact where it decides, fast elsewhere.

The reference resizes the full image to every pyramid level with PIL's BILINEAR filter
(antialiasing: a triangle filter as wide as the scale, fixed-point coefficients with 22 fraction
bits, a horizontal pass rounded to uint8, then a vertical pass). For the 20 to 30 levels of a
photo that costs about as much as P-Net itself. MTCNN's output is sensitive to it: one grey
level on 0.1% of a level's pixels moves a score by up to 0.01 and can flip which boxes survive
(on one shared photo a face's landmarks then move by 0.4 px). So each level is scanned twice:

1. on a fast approximate level, ``torch.nn.functional.interpolate(antialias=True)``: on the CPU
   its uint8 kernel, written after Pillow's but with 16-bit coefficients, has about 0.1% of
   pixels one grey level off; elsewhere (no uint8 kernel) two float passes rounded as Pillow
   rounds have about 0.2% off by one or two. P-Net scores on it are within 0.008 (CPU) and 0.02
   (float) of the exact ones over the shared photos;
2. on the exact level, only for the P-Net rows where the approximate score comes within
   ``resize_margin`` (0.05 CPU, 0.1 float: 5-6× those errors) of the threshold: their 12-pixel
   bands are rebuilt with Pillow's own arithmetic (``exact_band``) and P-Net runs again on
   them. Every candidate box comes from those exact rows, as the reference's do. The bands of
   all levels are built together, spread over native threads (Pillow resamples on one core).

Cheaper approximate levels do not hold the margin: resizing the small levels from a copy of the
photo already halved or quartered moves scores by up to 0.12 on the shared photos. P-Net itself
runs as ``proposal.PNetPass`` does it.
"""
import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from serving.native import map_native

from .proposal import STACKED_LEVEL_PIXELS, PNetPass

MIN_DETECTION_SIZE = 12  # P-Net's window, pixels
PRECISION_BITS = 22  # Pillow's fixed-point coefficients for 8-bit images
MARGIN_EXACT_KERNEL = 0.05  # approximate scores from the uint8 CPU kernel
MARGIN_FLOAT_KERNEL = 0.1  # approximate scores from the float path
LEVEL_BATCH_PIXELS = 8_000_000  # approximate levels made at once (24 MB): all of a 6 MP photo's


def pyramid_scales(width: int, height: int, min_face_size: float, factor: float) -> list:
    """Scales at which P-Net (a 12-px window) sees faces of ``min_face_size`` px and larger."""
    m = MIN_DETECTION_SIZE / min_face_size
    min_length = min(width, height) * m
    scales = []
    count = 0
    while min_length > MIN_DETECTION_SIZE:
        scales.append(m * factor ** count)
        min_length *= factor
        count += 1
    return scales


def level_size(width: int, height: int, scale: float) -> tuple:
    """(height, width) of a pyramid level, rounded up as the reference does."""
    return math.ceil(height * scale), math.ceil(width * scale)


def image_tensor(image: np.ndarray, device: torch.device) -> torch.Tensor:
    """H×W×3 uint8 RGB ndarray -> 1×3×H×W uint8 tensor on ``device`` (channels-last memory)."""
    return torch.from_numpy(np.require(image, requirements=("C", "W"))).to(device).permute(2, 0, 1).unsqueeze(0)


def resize(image: torch.Tensor, size: tuple) -> torch.Tensor:
    """Resize 1×3×H×W uint8 to ``size`` (height, width) close to PIL's BILINEAR; uint8 out."""
    if image.device.type == "cpu":
        return F.interpolate(image, size=size, mode="bilinear", align_corners=False, antialias=True)
    x = image.float()
    x = F.interpolate(x, size=(x.shape[2], size[1]), mode="bilinear", align_corners=False, antialias=True)
    x = x.add_(0.5).floor_().clamp_(0, 255)
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    return x.add_(0.5).floor_().clamp_(0, 255).to(torch.uint8)


def resize_margin(device: torch.device) -> float:
    """How far below the threshold an approximate score must be to be trusted as a non-face."""
    return MARGIN_EXACT_KERNEL if device.type == "cpu" else MARGIN_FLOAT_KERNEL


def pil_coefficients(in_size: int, out_size: int, start: int = 0, stop: int = None):
    """Pillow's BILINEAR resampling coefficients along one axis for output pixels
    ``start:stop`` (default all), as ``precompute_coeffs`` and ``normalize_coeffs_8bpc`` compute
    them (same double arithmetic, same order).

    Returns (first, count, weights): output pixel i is
    ``clip8((sum_t weights[i, t] * in[first[i] + t] + 2**21) >> 22)`` over t < count[i];
    weights are integers (float64 array (stop - start) × ksize, zero past count).
    """
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = filterscale  # the triangle filter's support is 1
    ksize = int(math.ceil(support)) * 2 + 1
    center = (np.arange(start, out_size if stop is None else stop) + 0.5) * scale
    first = np.maximum((center - support + 0.5).astype(np.int64), 0)
    count = np.minimum((center + support + 0.5).astype(np.int64), in_size) - first
    taps = np.arange(ksize)
    offset = taps[None, :] + first[:, None] - center[:, None] + 0.5  # as Pillow: int + int - double
    weights = np.maximum(1.0 - np.abs(offset * (1.0 / filterscale)), 0.0)
    weights[taps[None, :] >= count[:, None]] = 0.0
    total = np.cumsum(weights, axis=1)[:, -1]  # summed in order, as Pillow sums them
    weights = np.divide(weights, total[:, None], out=weights, where=total[:, None] != 0.0)
    return first, count, np.trunc(0.5 + weights * (1 << PRECISION_BITS))


class Photo:
    """One photo as the detector needs it: the H×W×3 uint8 RGB array, the same as a 1×3×H×W
    uint8 tensor on the device (channels-last memory), and, made on first use, a PIL image."""

    def __init__(self, image: np.ndarray, pixels: torch.Tensor):
        self.image = image
        self.pixels = pixels
        self._pil = None

    @classmethod
    def of_array(cls, image: np.ndarray, device: torch.device) -> "Photo":
        """From an H×W×3 uint8 RGB array."""
        return cls(image, image_tensor(image, device))

    @classmethod
    def of_pixels(cls, pixels: torch.Tensor) -> "Photo":
        """From a 1×3×H×W uint8 tensor."""
        return cls(np.ascontiguousarray(pixels[0].permute(1, 2, 0).cpu().numpy()), pixels)

    @property
    def height(self) -> int:
        return self.image.shape[0]

    @property
    def width(self) -> int:
        return self.image.shape[1]

    @property
    def pil(self) -> Image.Image:
        if self._pil is None:
            self._pil = Image.fromarray(self.image)
        return self._pil


def exact_band(photo: Photo, size: tuple, rows: tuple) -> torch.Tensor:
    """Rows ``rows[0]:rows[1]`` of the photo resized to ``size`` (height, width) exactly as
    ``PIL.Image.resize(BILINEAR)`` gives them: a CPU tensor rows × width × 3 uint8.

    The horizontal pass is Pillow's own, over the source rows involved only (a resize of that
    strip to the new width and its own height, which Pillow does with the whole image's
    horizontal coefficients and an identity vertical pass); the vertical pass applies Pillow's
    integer coefficients in float64, where the sums are exact.
    """
    height, width = size
    top, bottom = rows
    first, count, weights = pil_coefficients(photo.height, height, top, bottom)
    src_top, src_bottom = int(first[0]), int((first + count).max())
    strip = photo.pil.resize((width, src_bottom - src_top), Image.BILINEAR, box=(0, src_top, photo.width, src_bottom))
    # The vertical pass without BLAS: a BLAS call this small costs more in waking its threads.
    taps = np.arange(weights.shape[1])
    index = np.minimum(first[:, None] + taps[None, :], src_bottom - 1) - src_top  # rows × taps
    horizontal = np.asarray(strip, dtype=np.float64).reshape(src_bottom - src_top, -1)
    sums = np.einsum("rt,rtc->rc", weights, horizontal[index])  # zero weights past each count
    out = np.clip(np.floor((sums + (1 << (PRECISION_BITS - 1))) / (1 << PRECISION_BITS)), 0, 255)
    return torch.from_numpy(out.astype(np.uint8).reshape(bottom - top, width, 3))


def row_runs(rows: np.ndarray) -> list:
    """Sorted P-Net map rows -> [start, stop) runs of rows whose 12-pixel bands touch or overlap."""
    runs = []
    for row in rows.tolist():
        if runs and row <= runs[-1][1] + 5:
            runs[-1][1] = row + 1
        else:
            runs.append([row, row + 1])
    return runs


def scan_pyramid(photo: Photo, pnet: PNetPass, scales: list, threshold: float, workers: int = 1) -> list:
    """P-Net cells whose score passes ``threshold`` on each pyramid level, all computed on the
    exact levels: one (rows, cols, scores, offsets N×4) NumPy tuple per scale, row-major.

    Every level is made approximately (``workers`` native threads share the levels: torch's
    uint8 resize runs on one core, without the GIL) and scanned by P-Net for its scores alone;
    then the exact bands of all levels are built, their Pillow passes also spread over
    ``workers`` native threads, and P-Net runs on them for scores and box offsets.
    """
    sizes = [level_size(photo.width, photo.height, scale) for scale in scales]
    margin = resize_margin(photo.pixels.device)
    jobs = []  # (level, first map row, band's pixel rows)

    def scanned(level: int, score: torch.Tensor):
        near = torch.nonzero(score.amax(dim=1) > threshold - margin).flatten().cpu().numpy()
        rows = sizes[level][0]
        jobs.extend((level, start, (2 * start, min(rows, 2 * stop + 10))) for start, stop in row_runs(near))

    threads = workers if photo.pixels.device.type == "cpu" else 1
    small = []  # the levels P-Net runs on stacked together
    for batch in _level_batches(sizes):
        levels = map_native(lambda level: resize(photo.pixels, sizes[level]), batch, threads)
        for level, pixels in zip(batch, levels):
            if pixels.shape[2] * pixels.shape[3] > STACKED_LEVEL_PIXELS:
                scanned(level, pnet(pixels, offsets=False)[0])
            else:
                small.append((level, pixels))
    for (level, _), (score, _) in zip(small, pnet.many([pixels for _, pixels in small], offsets=False)):
        scanned(level, score)
    _ = photo.pil  # made once, before the threads share it

    def build(k: int) -> torch.Tensor:
        level, _, rows = jobs[k]
        return exact_band(photo, sizes[level], rows)

    # The bands that read the most source rows go first, so the threads finish together.
    order = sorted(range(len(jobs)), key=lambda k: (jobs[k][2][1] - jobs[k][2][0]) / scales[jobs[k][0]], reverse=True)
    bands = [None] * len(jobs)
    for k, band in zip(order, map_native(build, order, workers)):
        bands[k] = band
    found = [[] for _ in scales]
    outputs = pnet.many([band.to(photo.pixels.device).permute(2, 0, 1).unsqueeze(0) for band in bands])
    for (level, start, _), (band_score, band_offsets) in zip(jobs, outputs):
        rows, cols = torch.nonzero(band_score > threshold, as_tuple=True)
        found[level].append((rows + start, cols, band_score[rows, cols], band_offsets[rows, cols]))
    return [_cells(parts) for parts in found]


def _level_batches(sizes: list) -> list:
    """Level indices in batches of at most ``LEVEL_BATCH_PIXELS`` (or one larger level), so
    that the levels made together stay within a bounded memory."""
    batches, total = [], LEVEL_BATCH_PIXELS
    for level, (height, width) in enumerate(sizes):
        if total + height * width > LEVEL_BATCH_PIXELS:
            batches.append([])
            total = 0
        batches[-1].append(level)
        total += height * width
    return batches


def _cells(parts: list) -> tuple:
    """Concatenate one level's (rows, cols, scores, offsets) tensors as NumPy."""
    if not parts:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros((0, 4), np.float32)
    return tuple(torch.cat(part).cpu().numpy() for part in zip(*parts))
