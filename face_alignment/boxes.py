"""Box arithmetic for MTCNN, vectorised with NumPy.

Boxes are float64 arrays N×5 of (x1, y1, x2, y2, score) in pixels of the original image, with
the inclusive-pixel convention of the reference (width = x2 - x1 + 1).
"""
import numpy as np

STRIDE = 2
CELL = 12


def nms(boxes: np.ndarray, threshold: float, mode: str = "union") -> np.ndarray:
    """Greedy non-maximum suppression; returns kept indices, highest score first.

    ``mode`` is "union" (IoU) or "min" (intersection over the smaller area). Ties in score are
    broken as NumPy's default argsort orders them, as the reference does.
    """
    if len(boxes) == 0:
        return np.zeros(0, dtype=np.int64)
    x1, y1, x2, y2, score = (boxes[:, i] for i in range(5))
    area = (x2 - x1 + 1.0) * (y2 - y1 + 1.0)
    order = np.argsort(score)
    keep = []
    while order.size:
        i = order[-1]
        keep.append(i)
        rest = order[:-1]
        w = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]) + 1.0)
        h = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]) + 1.0)
        inter = w * h
        if mode == "min":
            overlap = inter / np.minimum(area[i], area[rest])
        else:
            overlap = inter / (area[i] + area[rest] - inter)
        order = rest[overlap <= threshold]
    return np.asarray(keep, dtype=np.int64)


def cell_boxes(rows: np.ndarray, cols: np.ndarray, scores: np.ndarray, offsets: np.ndarray,
               scale: float) -> np.ndarray:
    """P-Net cells (row, col) of a level scaled by ``scale``, with their scores (N) and offsets
    (N×4) -> candidate boxes N×9 (x1, y1, x2, y2, score, 4 offsets) in image pixels.

    A cell (i, j) is a 12×12 window at stride 2 in the level.
    """
    if len(rows) == 0:
        return np.zeros((0, 9))
    out = np.empty((len(rows), 9))
    out[:, 0] = np.round((STRIDE * cols + 1.0) / scale)
    out[:, 1] = np.round((STRIDE * rows + 1.0) / scale)
    out[:, 2] = np.round((STRIDE * cols + 1.0 + CELL) / scale)
    out[:, 3] = np.round((STRIDE * rows + 1.0 + CELL) / scale)
    out[:, 4] = scores
    out[:, 5:9] = offsets
    return out


def calibrate(boxes: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Move box edges by the regressed offsets (fractions of the box size); returns a new array."""
    out = boxes.copy()
    w = boxes[:, 2] - boxes[:, 0] + 1.0
    h = boxes[:, 3] - boxes[:, 1] + 1.0
    out[:, 0:4] = boxes[:, 0:4] + np.stack([w, h, w, h], axis=1) * offsets
    return out


def square(boxes: np.ndarray) -> np.ndarray:
    """Grow each box to a square around its centre, edges rounded to whole pixels."""
    out = np.zeros_like(boxes)
    w = boxes[:, 2] - boxes[:, 0] + 1.0
    h = boxes[:, 3] - boxes[:, 1] + 1.0
    side = np.maximum(w, h)
    out[:, 0] = boxes[:, 0] + w * 0.5 - side * 0.5
    out[:, 1] = boxes[:, 1] + h * 0.5 - side * 0.5
    out[:, 2] = out[:, 0] + side - 1.0
    out[:, 3] = out[:, 1] + side - 1.0
    out[:, 4] = boxes[:, 4]
    out[:, 0:4] = np.round(out[:, 0:4])
    return out


def clip(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    """Clip box corners into the image, in place and returned.

    The reference clips the boxes it crops (as a side effect of cropping), and later stages
    compute offsets and landmarks relative to the clipped box, so we do the same.
    """
    np.clip(boxes[:, 0:2], 0.0, None, out=boxes[:, 0:2])
    np.minimum(boxes[:, 2], width - 1.0, out=boxes[:, 2])
    np.minimum(boxes[:, 3], height - 1.0, out=boxes[:, 3])
    return boxes
