"""The MTCNN image pyramid and the P-Net pass over it.

The reference resizes the full image to every pyramid level with PIL's BILINEAR filter, and
MTCNN's output is sensitive to those pixels: one grey level on 0.1% of a level's pixels moves a
P-Net score by up to 0.01 and can flip which boxes survive (on one shared photo a face's
landmarks then move by 0.4 px). So the levels here are Pillow's, to the bit, made by
``resample.Resampler`` (3 to 4 times faster than Pillow on one core, and without the GIL, so the
levels of a photo are made in parallel native threads). P-Net runs on them as
``proposal.PNetPass`` does it: the large levels one by one, in strips, the small ones stacked.
"""
import math

import numpy as np
import torch

from .proposal import STACKED_LEVEL_PIXELS, PNetPass
from .resample import Resampler

MIN_DETECTION_SIZE = 12  # P-Net's window, pixels
LEVEL_BATCH_PIXELS = 8_000_000  # levels made at once: their horizontal passes hold 24 MB


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


class Photo:
    """One photo as the detector needs it: the H×W×3 uint8 RGB array and its exact resizes
    (``resampler``)."""

    def __init__(self, image: np.ndarray):
        self.image = np.ascontiguousarray(image, dtype=np.uint8)
        self.resampler = Resampler(self.image)

    @property
    def height(self) -> int:
        return self.image.shape[0]

    @property
    def width(self) -> int:
        return self.image.shape[1]


def scan_pyramid(photo: Photo, pnet: PNetPass, scales: list, threshold: float, workers: int = 1) -> list:
    """P-Net cells whose score passes ``threshold`` on each pyramid level: one (rows, cols,
    scores, offsets N×4) NumPy tuple per scale, row-major.

    The levels are made with ``workers`` native threads, in batches bounded by
    ``LEVEL_BATCH_PIXELS`` (so a huge photo's pyramid is never all in memory at once), and go to
    P-Net's device; P-Net runs on each batch's large levels with as many threads, and on the
    levels of up to ``STACKED_LEVEL_PIXELS`` together, with the last batch.
    """
    sizes = [level_size(photo.width, photo.height, scale) for scale in scales]
    found, small = [None] * len(scales), []
    batches = _level_batches(sizes, photo.height)
    for batch in batches:
        levels = photo.resampler.resize_many([sizes[level] for level in batch], workers)
        large = []
        for level, pixels in zip(batch, levels):
            tensor = torch.from_numpy(pixels).to(pnet.device).permute(2, 0, 1).unsqueeze(0)
            (large if pixels.shape[0] * pixels.shape[1] > STACKED_LEVEL_PIXELS else small).append((level, tensor))
        _scan(pnet, large + small if batch is batches[-1] else large, threshold, workers, found)
    return found


def _scan(pnet: PNetPass, levels: list, threshold: float, workers: int, found: list) -> None:
    """P-Net over [(level index, tensor)], each level's cells as NumPy into ``found``."""
    for (level, _), cells in zip(levels, pnet.many([tensor for _, tensor in levels], threshold, workers)):
        found[level] = tuple(t.cpu().numpy() for t in cells)


def _level_batches(sizes: list, photo_height: int) -> list:
    """Level indices in batches whose horizontal passes (photo height × level width each) come
    to at most ``LEVEL_BATCH_PIXELS``, or one larger level."""
    batches, total = [], LEVEL_BATCH_PIXELS
    for level, (_, width) in enumerate(sizes):
        if total + photo_height * width > LEVEL_BATCH_PIXELS:
            batches.append([])
            total = 0
        batches[-1].append(level)
        total += photo_height * width
    return batches

