"""MTCNN face detection with the reference AdaFace parameters, returning 5-point landmarks.

Faithful to the reference (mk-minchul/AdaFace ``face_alignment/mtcnn.py``): the same pyramid
(min face 20 px, factor 0.85, every level resized from the full image with PIL's antialiasing
BILINEAR filter), thresholds (0.6, 0.7, 0.9), NMS thresholds (0.7, 0.7, 0.7), box arithmetic
and O-Net landmark decoding, so that landmarks match the reference's to a fraction of a pixel.
"""
import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from PIL import Image

from . import boxes as bx
from .nets import load_nets

MIN_DETECTION_SIZE = 12


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


def _to_tensor(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """N×H×W×3 uint8 or float32 RGB -> N×3×H×W float32 scaled as (x - 127.5) / 128."""
    t = torch.from_numpy(np.require(images, requirements=("C", "W"))).to(device=device, dtype=torch.float32)
    return t.permute(0, 3, 1, 2).sub_(127.5).mul_(0.0078125)


def crop_boxes(image: np.ndarray, boxes: np.ndarray, size: int) -> np.ndarray:
    """Cut each box out of the H×W×3 uint8 image, zero-padded where it leaves the image, and
    resize it to size×size with PIL BILINEAR; returns N×size×size×3 uint8."""
    height, width = image.shape[:2]
    out = np.zeros((len(boxes), size, size, 3), np.uint8)
    corners = boxes[:, 0:4].astype(np.int64)
    for i, (x1, y1, x2, y2) in enumerate(corners):
        w, h = x2 - x1 + 1, y2 - y1 + 1
        sx1, sy1, sx2, sy2 = max(x1, 0), max(y1, 0), min(x2, width - 1), min(y2, height - 1)
        if w <= 0 or h <= 0 or sx2 < sx1 or sy2 < sy1:
            continue
        patch = np.zeros((h, w, 3), np.uint8)
        patch[sy1 - y1:sy2 - y1 + 1, sx1 - x1:sx2 - x1 + 1] = image[sy1:sy2 + 1, sx1:sx2 + 1]
        out[i] = np.asarray(Image.fromarray(patch).resize((size, size), Image.BILINEAR))
    return out


class MTCNN:
    """P-Net, R-Net and O-Net built once on ``device``; ``detect`` finds every face in an image."""

    def __init__(self, device="cpu", params: DetectorParams = DetectorParams()):
        self.device = torch.device(device)
        self.params = params
        self.pnet, self.rnet, self.onet = load_nets(self.device)

    @torch.inference_mode()
    def detect(self, image: np.ndarray, params: Optional[DetectorParams] = None) -> Detections:
        """Find faces in an H×W×3 uint8 RGB image; no face gives empty ``Detections``.

        ``params`` overrides the detector's own parameters for this call.
        """
        p = params or self.params
        image = np.ascontiguousarray(image, dtype=np.uint8)
        scale_back = 1.0
        if p.max_side and max(image.shape[:2]) > p.max_side:
            image, scale_back = self._shrink(image, p.max_side)
        found = self._stage_three(image, self._stage_two(image, self._stage_one(image, p), p), p)
        if scale_back != 1.0:
            found.boxes *= scale_back
            found.landmarks *= np.float32(scale_back)
        return found

    @staticmethod
    def _shrink(image: np.ndarray, max_side: int):
        height, width = image.shape[:2]
        ratio = max_side / max(height, width)
        size = (max(1, round(width * ratio)), max(1, round(height * ratio)))
        small = np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))
        return small, width / size[0]

    def _stage_one(self, image: np.ndarray, p: DetectorParams) -> np.ndarray:
        """P-Net over the pyramid -> squared candidate boxes N×5."""
        height, width = image.shape[:2]
        pil = Image.fromarray(image)
        candidates = []
        for scale in pyramid_scales(width, height, p.min_face_size, p.factor):
            size = (math.ceil(width * scale), math.ceil(height * scale))
            level = np.asarray(pil.resize(size, Image.BILINEAR))[None]
            offsets, prob = self.pnet(_to_tensor(level, self.device))
            found = bx.proposals(prob[0].cpu().numpy(), offsets[0].cpu().numpy(), scale, p.thresholds[0])
            if len(found):
                candidates.append(found[bx.nms(found[:, 0:5], 0.5)])
        if not candidates:
            return np.zeros((0, 5))
        found = np.vstack(candidates)
        found = found[bx.nms(found[:, 0:5], p.nms_thresholds[0])]
        return bx.square(bx.calibrate(found[:, 0:5], found[:, 5:9]))

    def _stage_two(self, image: np.ndarray, boxes: np.ndarray, p: DetectorParams) -> np.ndarray:
        """R-Net on 24×24 crops -> refined squared boxes N×5."""
        if len(boxes) == 0:
            return boxes
        crops = crop_boxes(image, boxes, 24)
        bx.clip(boxes, image.shape[1], image.shape[0])
        offsets, prob = self.rnet(_to_tensor(crops, self.device))
        offsets, prob = offsets.cpu().numpy(), prob.cpu().numpy()
        keep = np.nonzero(prob > p.thresholds[1])[0]
        boxes, offsets = boxes[keep], offsets[keep]
        boxes[:, 4] = prob[keep]
        keep = bx.nms(boxes, p.nms_thresholds[1])
        return bx.square(bx.calibrate(boxes[keep], offsets[keep]))

    def _stage_three(self, image: np.ndarray, boxes: np.ndarray, p: DetectorParams) -> Detections:
        """O-Net on 48×48 crops -> final boxes, scores and landmarks."""
        if len(boxes) == 0:
            return Detections.empty()
        crops = crop_boxes(image, boxes, 48)
        bx.clip(boxes, image.shape[1], image.shape[0])
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
