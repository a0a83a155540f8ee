"""``resample.Resampler`` against Pillow: the same pixels, not close ones.

MTCNN's boxes and landmarks depend on the pyramid levels to the grey level, so every size class
is checked for equality with ``PIL.Image.resize(BILINEAR)``: shrinking by small and large
factors, to one pixel, enlarging, one axis only, the same size, and every pyramid level of a
shared photo.
"""
import io

import numpy as np
import pytest
from PIL import Image

from conftest import photo
from face_alignment import pyramid as pyr
from face_alignment.resample import Resampler, pil_coefficients, transposed


def random_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Noise with smooth parts: H×W×3 uint8 RGB."""
    rng = np.random.default_rng(seed)
    noise = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    ramp = np.linspace(0, 255, width, dtype=np.uint8)[None, :, None]
    return np.where(rng.random((height, 1, 1)) < 0.5, noise, np.broadcast_to(ramp, noise.shape)).astype(np.uint8)


def pillow(image: np.ndarray, size: tuple) -> np.ndarray:
    return np.asarray(Image.fromarray(image).resize((size[1], size[0]), Image.BILINEAR))


@pytest.mark.parametrize("size", [(240, 180), (97, 131), (13, 9), (1, 1), (1, 355), (481, 7),
                                  (600, 500), (961, 710), (481, 200), (300, 355), (481, 355)])
def test_resize_is_pillows(size):
    image = random_image(481, 355, seed=sum(size))
    np.testing.assert_array_equal(Resampler(image).resize(size), pillow(image, size))


def test_resize_of_a_read_only_or_strided_array():
    image = random_image(120, 90, seed=3)
    read_only = np.asarray(Image.fromarray(image))  # PIL's arrays are read-only
    assert not read_only.flags.writeable
    np.testing.assert_array_equal(Resampler(read_only).resize((40, 30)), pillow(image, (40, 30)))
    strided = random_image(120, 180, seed=4)[:, ::2]
    np.testing.assert_array_equal(Resampler(strided).resize((50, 33)), pillow(np.ascontiguousarray(strided), (50, 33)))


def test_resize_returns_its_own_array():
    image = random_image(20, 30)
    same = Resampler(image).resize((20, 30))
    np.testing.assert_array_equal(same, image)
    same[0, 0] = 255 - image[0, 0]
    assert not np.array_equal(same, image)


def test_every_pyramid_level_of_a_photo_is_pillows():
    image = np.asarray(Image.open(io.BytesIO(photo("img1.jpeg"))).convert("RGB"))
    resampler = Resampler(image)
    scales = pyr.pyramid_scales(image.shape[1], image.shape[0], 20.0, 0.85)
    assert len(scales) > 10
    for scale in scales:
        size = pyr.level_size(image.shape[1], image.shape[0], scale)
        np.testing.assert_array_equal(resampler.resize(size), pillow(image, size), err_msg=str(size))


@pytest.mark.parametrize("workers", [1, 3])
def test_transposed(workers):
    image = random_image(700, 900, seed=5)
    np.testing.assert_array_equal(transposed(image, workers), image.transpose(1, 0, 2))


def test_coefficients_sum_to_one_and_are_shared_read_only():
    first, count, weights = pil_coefficients(1000, 37)
    assert (weights.sum(axis=1) >= (1 << 22) - weights.shape[1]).all()
    assert (weights.sum(axis=1) <= (1 << 22) + weights.shape[1]).all()
    assert pil_coefficients(1000, 37)[2] is weights
    with pytest.raises(ValueError):
        weights[0, 0] = 1
