"""MTCNN face detection with the reference AdaFace parameters, returning 5-point landmarks.

Faithful to the reference (mk-minchul/AdaFace ``face_alignment/mtcnn.py``): the same pyramid
(min face 20 px, factor 0.85, every level the full image resized with PIL's antialiasing
BILINEAR filter), thresholds (0.6, 0.7, 0.9), NMS thresholds (0.7, 0.7, 0.7), box arithmetic,
zero-padded PIL-resized crops for R-Net and O-Net, and O-Net landmark decoding, so that
landmarks match the reference's to a fraction of a pixel. How the PIL resizes are made quickly,
to the bit, is told in ``resample.py``; how P-Net runs on the levels, in ``proposal.py``.
"""
import contextlib
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from adaface.threads import map_native

from . import boxes as bx
from . import openmp
from . import pyramid as pyr
from .nets import load_nets
from .pyramid import pyramid_scales
from .resample import Resampler

CROP_PIXELS_PER_THREAD = 500_000  # boxes' source pixels worth another thread (a thread costs ~0.3 ms)


@dataclass(frozen=True)
class DetectorParams:
    """Detection parameters; the defaults are the reference's."""

    min_face_size: float = 20.0
    thresholds: tuple = (0.6, 0.7, 0.9)
    nms_thresholds: tuple = (0.7, 0.7, 0.7)
    factor: float = 0.85
    max_side: Optional[int] = None  # detect on a copy shrunk to this longest side (None: full res)


@dataclass
class Detections:
    """Faces found in one image, in descending O-Net score order.

    boxes: float64 N×4 (x1, y1, x2, y2) in pixels of the input image; scores: float64 N;
    landmarks: float32 N×5×2 (x, y) for left eye, right eye, nose, left and right mouth corner.
    """

    boxes: np.ndarray
    scores: np.ndarray
    landmarks: np.ndarray

    def __len__(self) -> int:
        return len(self.scores)

    @staticmethod
    def empty() -> "Detections":
        return Detections(np.zeros((0, 4)), np.zeros(0), np.zeros((0, 5, 2), np.float32))


def _to_tensor(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """N×H×W×3 uint8 or float32 RGB -> N×3×H×W float32 scaled as (x - 127.5) / 128."""
    t = torch.from_numpy(np.require(images, requirements=("C", "W"))).to(device=device, dtype=torch.float32)
    return t.permute(0, 3, 1, 2).sub_(127.5).mul_(0.0078125)


def crop_boxes(image: np.ndarray, boxes: np.ndarray, size: int, workers: int = 1) -> np.ndarray:
    """Cut each box out of the H×W×3 uint8 RGB image, zero-padded where it leaves the image, and
    resize it to size×size with PIL BILINEAR, as the reference does (``PIL.Image.crop`` then
    ``resize``; the resize is ``resample.Resampler``'s, Pillow's to the bit); returns
    N×size×size×3 uint8. The boxes are shared among up to ``workers`` native threads, one per
    ``CROP_PIXELS_PER_THREAD`` pixels of the boxes."""
    out = np.zeros((len(boxes), size, size, 3), np.uint8)
    corners = boxes[:, 0:4].astype(np.int64).tolist()

    def cut(indices: range):
        for i in indices:
            x1, y1, x2, y2 = corners[i]
            if x2 >= x1 and y2 >= y1:
                out[i] = Resampler(_crop(image, x1, y1, x2 + 1, y2 + 1)).resize((size, size))

    areas = (boxes[:, 2] - boxes[:, 0] + 1) * (boxes[:, 3] - boxes[:, 1] + 1)
    chunks = max(1, min(workers, len(boxes), int(areas.sum()) // CROP_PIXELS_PER_THREAD))
    map_native(cut, [range(k, len(boxes), chunks) for k in range(chunks)], chunks)
    return out


def _crop(image: np.ndarray, left: int, top: int, right: int, bottom: int) -> np.ndarray:
    """``image[top:bottom, left:right]`` with zeros where the box leaves the image, as PIL's
    ``crop`` gives it: (bottom - top)×(right - left)×3 uint8."""
    height, width = image.shape[:2]
    if left >= 0 and top >= 0 and right <= width and bottom <= height:
        return image[top:bottom, left:right]
    out = np.zeros((bottom - top, right - left, 3), np.uint8)
    x0, y0, x1, y1 = max(left, 0), max(top, 0), min(right, width), min(bottom, height)
    if x1 > x0 and y1 > y0:
        out[y0 - top:y1 - top, x0 - left:x1 - left] = image[y0:y1, x0:x1]
    return out


class MTCNN:
    """P-Net, R-Net and O-Net built once on ``device``; ``detect`` finds every face in an image."""

    def __init__(self, device="cpu", params: DetectorParams = DetectorParams()):
        self.device = torch.device(device)
        self.params = params
        self.pnet, self.rnet, self.onet = load_nets(self.device)
        self._pnet_pass = pyr.PNetPass(self.pnet)

    @torch.inference_mode()
    def detect(self, image: np.ndarray, params: Optional[DetectorParams] = None) -> Detections:
        """Find faces in an H×W×3 uint8 RGB image; no face gives empty ``Detections``.

        ``params`` overrides the detector's own parameters for this call. The work is spread
        over ``torch.get_num_threads()`` native threads. On the CPU, each runs torch on one
        OpenMP thread (``openmp.one_thread``), the calling thread too: a team of two would
        spin on the second core after each op, in the way of the second native thread.
        """
        workers = torch.get_num_threads()
        single = self.device.type == "cpu" and workers > 1 and openmp.available()
        with openmp.one_thread() if single else contextlib.nullcontext():
            return self._detect(image, params or self.params, workers)

    def _detect(self, image: np.ndarray, p: DetectorParams, workers: int) -> Detections:
        photo = pyr.Photo(image)
        scale_x = scale_y = 1.0
        if p.max_side and max(photo.height, photo.width) > p.max_side:
            photo, scale_x, scale_y = self._shrink(photo, p.max_side, workers)
        boxes = self._stage_two(photo, self._stage_one(photo, p, workers), p, workers)
        found = self._stage_three(photo, boxes, p, workers)
        if scale_x != 1.0 or scale_y != 1.0:
            found.boxes *= np.array([scale_x, scale_y, scale_x, scale_y])
            found.landmarks *= np.array([scale_x, scale_y], np.float32)
        return found

    @staticmethod
    def _shrink(photo: pyr.Photo, max_side: int, workers: int):
        """The photo shrunk to ``max_side`` on its longer side (PIL's BILINEAR, antialiased), and
        the x and y factors from its pixels back to the original's."""
        ratio = max_side / max(photo.height, photo.width)
        size = (max(1, round(photo.height * ratio)), max(1, round(photo.width * ratio)))
        small = pyr.Photo(photo.resampler.resize_many([size], workers)[0])
        return small, photo.width / size[1], photo.height / size[0]

    def _stage_one(self, photo: pyr.Photo, p: DetectorParams, workers: int) -> np.ndarray:
        """P-Net over the pyramid -> squared candidate boxes N×5."""
        scales = pyramid_scales(photo.width, photo.height, p.min_face_size, p.factor)
        candidates = []
        for scale, cells in zip(scales, pyr.scan_pyramid(photo, self._pnet_pass, scales, p.thresholds[0], workers)):
            found = bx.cell_boxes(*cells, scale)
            if len(found):
                candidates.append(found[bx.nms(found[:, 0:5], 0.5)])
        if not candidates:
            return np.zeros((0, 5))
        found = np.vstack(candidates)
        found = found[bx.nms(found[:, 0:5], p.nms_thresholds[0])]
        return bx.square(bx.calibrate(found[:, 0:5], found[:, 5:9]))

    def _stage_two(self, photo: pyr.Photo, boxes: np.ndarray, p: DetectorParams, workers: int) -> np.ndarray:
        """R-Net on 24×24 crops -> refined squared boxes N×5."""
        if len(boxes) == 0:
            return boxes
        crops = crop_boxes(photo.image, boxes, 24, workers)
        bx.clip(boxes, photo.width, photo.height)
        offsets, prob = self.rnet(_to_tensor(crops, self.device))
        offsets, prob = offsets.cpu().numpy(), prob.cpu().numpy()
        keep = np.nonzero(prob > p.thresholds[1])[0]
        boxes, offsets = boxes[keep], offsets[keep]
        boxes[:, 4] = prob[keep]
        keep = bx.nms(boxes, p.nms_thresholds[1])
        return bx.square(bx.calibrate(boxes[keep], offsets[keep]))

    def _stage_three(self, photo: pyr.Photo, boxes: np.ndarray, p: DetectorParams, workers: int) -> Detections:
        """O-Net on 48×48 crops -> final boxes, scores and landmarks."""
        if len(boxes) == 0:
            return Detections.empty()
        crops = crop_boxes(photo.image, boxes, 48, workers)
        bx.clip(boxes, photo.width, photo.height)
        marks, offsets, prob = self.onet(_to_tensor(crops, self.device))
        marks, offsets, prob = marks.cpu().numpy(), offsets.cpu().numpy(), prob.cpu().numpy()
        keep = np.nonzero(prob > p.thresholds[2])[0]
        boxes, offsets, marks = boxes[keep], offsets[keep], marks[keep]
        boxes[:, 4] = prob[keep]
        w = boxes[:, 2:3] - boxes[:, 0:1] + 1.0
        h = boxes[:, 3:4] - boxes[:, 1:2] + 1.0
        marks[:, 0:5] = boxes[:, 0:1] + w * marks[:, 0:5]
        marks[:, 5:10] = boxes[:, 1:2] + h * marks[:, 5:10]
        boxes = bx.calibrate(boxes, offsets)
        keep = bx.nms(boxes, p.nms_thresholds[2], mode="min")
        boxes, marks = boxes[keep], marks[keep]
        landmarks = np.stack([marks[:, 0:5], marks[:, 5:10]], axis=2)
        return Detections(boxes[:, 0:4].copy(), boxes[:, 4].copy(), landmarks.astype(np.float32))
