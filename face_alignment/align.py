"""5-point face alignment onto the 112×112 ArcFace/AdaFace template.

The similarity transform is estimated as MATLAB's ``cp2tform('similarity')`` does, which is what
the reference pipeline uses: a least-squares fit of the template-to-image mapping (residuals
measured in image pixels), with the reflective solution also fitted and the one whose forward
mapping lands closer to the template kept. Umeyama's estimate (scikit-image) is a different fit
and moves the crop by up to several grey levels on average.
"""
import cv2
import numpy as np

from adaface.options import CROP_SIZE

#: Template points (x, y) in the 112×112 crop: left eye, right eye, nose, left and right mouth
#: corner (the 96×112 template shifted right by 8 px to make it square).
TEMPLATE = np.array(
    [[38.29459953, 51.69630051], [73.53179932, 51.50139999], [56.02519989, 71.73660278],
     [41.54930115, 92.36550140], [70.72990036, 92.20410156]],
    dtype=np.float32,
)


class AlignmentError(ValueError):
    """The landmarks do not determine a transform (e.g. all five points coincide)."""


def _fit(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity mapping dst -> src; returns its inverse (src -> dst) as 3×3 for
    column vectors, i.e. ``[x', y', 1] = M @ [x, y, 1]``."""
    x, y = dst[:, 0], dst[:, 1]
    ones, zeros = np.ones_like(x), np.zeros_like(x)
    design = np.concatenate([np.stack([x, y, ones, zeros], 1), np.stack([y, -x, zeros, ones], 1)])
    target = np.concatenate([src[:, 0], src[:, 1]])
    if np.linalg.matrix_rank(design) < 4:
        raise AlignmentError("landmarks are degenerate: at least two distinct points are needed")
    a, b, tx, ty = np.linalg.lstsq(design, target, rcond=None)[0]
    dst_to_src = np.array([[a, b, tx], [-b, a, ty], [0.0, 0.0, 1.0]])
    return np.linalg.inv(dst_to_src)


def similarity_matrix(landmarks: np.ndarray, template: np.ndarray = TEMPLATE) -> np.ndarray:
    """2×3 float64 affine matrix taking image pixels to crop pixels for ``cv2.warpAffine``.

    ``landmarks`` and ``template`` are 5×2 (x, y); both are rounded to float32 first, as in the
    reference.
    """
    src = np.asarray(landmarks, dtype=np.float32).astype(np.float64)
    dst = np.asarray(template, dtype=np.float32).astype(np.float64)
    direct = _fit(src, dst)
    flip = np.diag([-1.0, 1.0, 1.0])
    reflected = flip @ _fit(src, dst @ flip[:2, :2])
    homog = np.concatenate([src, np.ones((len(src), 1))], axis=1).T

    def residual(m: np.ndarray) -> float:
        return float(np.linalg.norm((m @ homog)[:2].T - dst))

    best = direct if residual(direct) <= residual(reflected) else reflected
    return best[:2]


def align(image: np.ndarray, landmarks: np.ndarray, size: int = CROP_SIZE) -> np.ndarray:
    """Warp an H×W×3 uint8 image (any channel order, kept) so the 5 landmarks (5×2, x, y in
    pixels) land on the template; returns the size×size×3 uint8 crop (bilinear, black border)."""
    if size != CROP_SIZE:
        raise ValueError(f"only {CROP_SIZE}×{CROP_SIZE} crops are supported, got {size}")
    matrix = similarity_matrix(landmarks)
    return cv2.warpAffine(image, matrix, (size, size))
