"""The reference MTCNN algorithm, written out plainly: the baseline for ``bench/mtcnn.py``.

Our own straightforward rendering of what the reference (mk-minchul/AdaFace
``face_alignment/mtcnn.py`` + ``mtcnn_pytorch/src``) does, step by step and at the same cost:
every pyramid level is a PIL BILINEAR resize of the full PIL image, each level goes through
P-Net separately, the R-Net/O-Net crops are cut one box at a time (converting the whole image
with ``np.asarray`` for each box), and NMS deletes indices from the order array as the reference
does. It uses the project's nets (``face_alignment.nets.load_nets``), so it differs from the
reference only in code, not in weights. Used only for benchmarking; the service uses
``face_alignment.detector``.

Run as a script to check it against the reference's landmarks:
``.venv/bin/python bench/reference_mtcnn.py`` (prints the worst error over reference.json).
"""
import math
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from face_alignment.nets import load_nets  # noqa: E402


def nms(boxes, overlap_threshold=0.5, mode="union"):
    """Greedy NMS as the reference writes it; returns the kept indices (a list)."""
    if len(boxes) == 0:
        return []
    pick = []
    x1, y1, x2, y2, score = [boxes[:, i] for i in range(5)]
    area = (x2 - x1 + 1.0) * (y2 - y1 + 1.0)
    ids = np.argsort(score)
    while len(ids) > 0:
        last = len(ids) - 1
        i = ids[last]
        pick.append(i)
        ix1 = np.maximum(x1[i], x1[ids[:last]])
        iy1 = np.maximum(y1[i], y1[ids[:last]])
        ix2 = np.minimum(x2[i], x2[ids[:last]])
        iy2 = np.minimum(y2[i], y2[ids[:last]])
        w = np.maximum(0.0, ix2 - ix1 + 1.0)
        h = np.maximum(0.0, iy2 - iy1 + 1.0)
        inter = w * h
        if mode == "min":
            overlap = inter / np.minimum(area[i], area[ids[:last]])
        else:
            overlap = inter / (area[i] + area[ids[:last]] - inter)
        ids = np.delete(ids, np.concatenate([[last], np.where(overlap > overlap_threshold)[0]]))
    return pick


def convert_to_square(bboxes):
    """Grow boxes to squares around their centres (not rounded here)."""
    square = np.zeros_like(bboxes)
    x1, y1, x2, y2 = [bboxes[:, i] for i in range(4)]
    h = y2 - y1 + 1.0
    w = x2 - x1 + 1.0
    max_side = np.maximum(h, w)
    square[:, 0] = x1 + w * 0.5 - max_side * 0.5
    square[:, 1] = y1 + h * 0.5 - max_side * 0.5
    square[:, 2] = square[:, 0] + max_side - 1.0
    square[:, 3] = square[:, 1] + max_side - 1.0
    return square


def calibrate_box(bboxes, offsets):
    """Move box edges by offsets given in box units."""
    x1, y1, x2, y2 = [bboxes[:, i] for i in range(4)]
    w = x2 - x1 + 1.0
    h = y2 - y1 + 1.0
    translation = np.hstack([w[:, None], h[:, None], w[:, None], h[:, None]]) * offsets
    bboxes[:, 0:4] = bboxes[:, 0:4] + translation
    return bboxes


def correct_bboxes(bboxes, width, height):
    """Crop geometry for boxes that leave the image; clips ``bboxes`` in place (views)."""
    x1, y1, x2, y2 = [bboxes[:, i] for i in range(4)]
    w, h = x2 - x1 + 1.0, y2 - y1 + 1.0
    n = bboxes.shape[0]
    x, y, ex, ey = x1, y1, x2, y2
    dx, dy = np.zeros((n,)), np.zeros((n,))
    edx, edy = w.copy() - 1.0, h.copy() - 1.0
    ind = np.where(ex > width - 1.0)[0]
    edx[ind] = w[ind] + width - 2.0 - ex[ind]
    ex[ind] = width - 1.0
    ind = np.where(ey > height - 1.0)[0]
    edy[ind] = h[ind] + height - 2.0 - ey[ind]
    ey[ind] = height - 1.0
    ind = np.where(x < 0.0)[0]
    dx[ind] = 0.0 - x[ind]
    x[ind] = 0.0
    ind = np.where(y < 0.0)[0]
    dy[ind] = 0.0 - y[ind]
    y[ind] = 0.0
    return [v.astype("int32") for v in (dy, edy, dx, edx, y, ey, x, ex, w, h)]


def preprocess(img):
    """H×W×3 float32 -> 1×3×H×W scaled as (x - 127.5) * 0.0078125."""
    img = img.transpose((2, 0, 1))
    img = np.expand_dims(img, 0)
    return (img - 127.5) * 0.0078125


def get_image_boxes(bounding_boxes, img, size=24):
    """Cut boxes out of the PIL image one at a time, zero-padded, resized to size×size."""
    num_boxes = len(bounding_boxes)
    width, height = img.size
    dy, edy, dx, edx, y, ey, x, ex, w, h = correct_bboxes(bounding_boxes, width, height)
    img_boxes = np.zeros((num_boxes, 3, size, size), "float32")
    for i in range(num_boxes):
        img_box = np.zeros((h[i], w[i], 3), "uint8")
        img_array = np.asarray(img, "uint8")
        img_box[dy[i]:(edy[i] + 1), dx[i]:(edx[i] + 1), :] = img_array[y[i]:(ey[i] + 1), x[i]:(ex[i] + 1), :]
        img_box = Image.fromarray(img_box).resize((size, size), Image.BILINEAR)
        img_boxes[i, :, :, :] = preprocess(np.asarray(img_box, "float32"))
    return img_boxes


def generate_bboxes(probs, offsets, scale, threshold):
    """P-Net map cells above threshold -> boxes N×9 in image pixels."""
    stride, cell_size = 2, 12
    inds = np.where(probs > threshold)
    if inds[0].size == 0:
        return np.array([])
    tx1, ty1, tx2, ty2 = [offsets[0, i, inds[0], inds[1]] for i in range(4)]
    offsets = np.array([tx1, ty1, tx2, ty2])
    score = probs[inds[0], inds[1]]
    bounding_boxes = np.vstack([
        np.round((stride * inds[1] + 1.0) / scale),
        np.round((stride * inds[0] + 1.0) / scale),
        np.round((stride * inds[1] + 1.0 + cell_size) / scale),
        np.round((stride * inds[0] + 1.0 + cell_size) / scale),
        score, offsets,
    ])
    return bounding_boxes.T


def run_first_stage(image, pnet, scale, threshold, device):
    """Resize the full PIL image to one pyramid level, run P-Net, NMS the level's boxes."""
    width, height = image.size
    sw, sh = math.ceil(width * scale), math.ceil(height * scale)
    img = np.asarray(image.resize((sw, sh), Image.BILINEAR), "float32")
    img = torch.FloatTensor(preprocess(img)).to(device)
    offsets, probs = pnet(img)
    probs = probs.cpu().numpy()[0]
    offsets = offsets.cpu().numpy()
    boxes = generate_bboxes(probs, offsets, scale, threshold)
    if len(boxes) == 0:
        return None
    return boxes[nms(boxes[:, 0:5], overlap_threshold=0.5)]


class ReferenceMTCNN:
    """The reference algorithm on the project's nets; ``detect(rgb)`` -> (boxes N×5, landmarks N×10)."""

    def __init__(self, device="cpu"):
        self.device = torch.device(device)
        self.pnet, self.rnet, self.onet = load_nets(self.device)

    @torch.no_grad()
    def detect(self, rgb, min_face_size=20.0, thresholds=(0.6, 0.7, 0.9), nms_thresholds=(0.7, 0.7, 0.7),
               factor=0.85):
        image = Image.fromarray(np.asarray(rgb, np.uint8))
        width, height = image.size
        min_length = min(height, width)
        min_detection_size = 12
        scales = []
        m = min_detection_size / min_face_size
        min_length *= m
        factor_count = 0
        while min_length > min_detection_size:
            scales.append(m * factor ** factor_count)
            min_length *= factor
            factor_count += 1

        empty = np.zeros((0, 5)), np.zeros((0, 10), np.float32)
        bounding_boxes = [run_first_stage(image, self.pnet, s, thresholds[0], self.device) for s in scales]
        bounding_boxes = [b for b in bounding_boxes if b is not None]
        if not bounding_boxes:
            return empty
        bounding_boxes = np.vstack(bounding_boxes)
        bounding_boxes = bounding_boxes[nms(bounding_boxes[:, 0:5], nms_thresholds[0])]
        bounding_boxes = calibrate_box(bounding_boxes[:, 0:5], bounding_boxes[:, 5:])
        bounding_boxes = convert_to_square(bounding_boxes)
        bounding_boxes[:, 0:4] = np.round(bounding_boxes[:, 0:4])

        img_boxes = torch.FloatTensor(get_image_boxes(bounding_boxes, image, size=24)).to(self.device)
        offsets, probs = self.rnet(img_boxes)
        offsets, probs = offsets.cpu().numpy(), probs.cpu().numpy()
        keep = np.where(probs > thresholds[1])[0]
        bounding_boxes = bounding_boxes[keep]
        bounding_boxes[:, 4] = probs[keep]
        offsets = offsets[keep]
        keep = nms(bounding_boxes, nms_thresholds[1])
        bounding_boxes = calibrate_box(bounding_boxes[keep], offsets[keep])
        bounding_boxes = convert_to_square(bounding_boxes)
        bounding_boxes[:, 0:4] = np.round(bounding_boxes[:, 0:4])

        if len(bounding_boxes) == 0:
            return empty
        img_boxes = torch.FloatTensor(get_image_boxes(bounding_boxes, image, size=48)).to(self.device)
        landmarks, offsets, probs = self.onet(img_boxes)
        landmarks, offsets, probs = landmarks.cpu().numpy(), offsets.cpu().numpy(), probs.cpu().numpy()
        keep = np.where(probs > thresholds[2])[0]
        bounding_boxes = bounding_boxes[keep]
        bounding_boxes[:, 4] = probs[keep]
        offsets = offsets[keep]
        landmarks = landmarks[keep]
        width = bounding_boxes[:, 2] - bounding_boxes[:, 0] + 1.0
        height = bounding_boxes[:, 3] - bounding_boxes[:, 1] + 1.0
        xmin, ymin = bounding_boxes[:, 0], bounding_boxes[:, 1]
        landmarks[:, 0:5] = xmin[:, None] + width[:, None] * landmarks[:, 0:5]
        landmarks[:, 5:10] = ymin[:, None] + height[:, None] * landmarks[:, 5:10]
        bounding_boxes = calibrate_box(bounding_boxes, offsets)
        keep = nms(bounding_boxes, nms_thresholds[2], mode="min")
        return bounding_boxes[keep], landmarks[keep]


def _check_against_reference_json():
    """Worst landmark error of this baseline vs the reference's saved landmarks, all images."""
    import json
    root = Path(__file__).resolve().parents[2] / "shared"
    expected = json.loads((root / "reference" / "expected_ir101" / "reference.json").read_text())
    detector = ReferenceMTCNN()
    worst, count_mismatches = 0.0, 0
    for name, ref in expected.items():
        path = next((root / "facedata").glob(f"*/{name}"))
        _, marks = detector.detect(np.asarray(Image.open(path).convert("RGB")))
        want = np.asarray(ref["landmarks"], np.float64).reshape(-1, 5, 2)
        got = np.stack([marks[:, 0:5], marks[:, 5:10]], axis=2)
        if len(got) != len(want):
            count_mismatches += 1
            print(f"{name}: {len(got)} faces, reference {len(want)}")
            continue
        if len(got):
            worst = max(worst, float(np.abs(got - want).max()))
    print(f"{len(expected)} images, face-count mismatches {count_mismatches}, worst landmark error {worst:.4f} px")


if __name__ == "__main__":
    _check_against_reference_json()
