"""``resample.Resampler`` against Pillow: the same pixels, not close ones.

MTCNN's boxes and landmarks depend on the pyramid levels to the grey level, so every size class
is checked for equality with ``PIL.Image.resize(BILINEAR)``: shrinking by small and large
factors, to one pixel, enlarging, one axis only, the same size, every pyramid level of a shared
photo and of photos of many shapes, and the face crops' sizes. Pillow 13 runs its vertical pass
first for some sizes (tall photos); those must go to Pillow, and the sweeps below check that the
sizes computed here are the ones where Pillow runs the horizontal pass first.
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


def test_transposed():
    image = random_image(70, 90, seed=5)
    np.testing.assert_array_equal(transposed(image), image.transpose(1, 0, 2))
    rows = np.zeros((100, 70, 3), np.uint8)
    assert transposed(image, rows[5:95]) is not None  # into rows of a larger array, in place
    np.testing.assert_array_equal(rows[5:95], image.transpose(1, 0, 2))
    assert not rows[:5].any() and not rows[95:].any()
    with pytest.raises(ValueError):
        transposed(image, np.zeros((90, 71, 3), np.uint8))  # OpenCV would write a new array


@pytest.mark.parametrize("workers", [1, 3])
def test_many_sizes_in_slabs_and_threads(workers):
    image = random_image(700, 900, seed=6)
    resampler = Resampler(image)
    assert len(resampler.slabs()) > 1  # the horizontal pass runs slab by slab
    sizes = [(420, 540), (700, 300), (357, 900), (21, 27), (700, 900), (5, 1200)]
    for size, got in zip(sizes, resampler.resize_many(sizes, workers)):
        np.testing.assert_array_equal(got, pillow(image, size), err_msg=str(size))


def test_coefficients_sum_to_one_and_are_shared_read_only():
    first, count, weights = pil_coefficients(1000, 37)
    assert (weights.sum(axis=1) >= (1 << 22) - weights.shape[1]).all()
    assert (weights.sum(axis=1) <= (1 << 22) + weights.shape[1]).all()
    assert pil_coefficients(1000, 37)[2] is weights
    with pytest.raises(ValueError):
        weights[0, 0] = 1


def test_pyramid_levels_of_many_photo_shapes_are_pillows():
    rng = np.random.default_rng(7)
    computed = 0
    for _ in range(40):
        width, height = int(rng.integers(24, 900)), int(rng.integers(24, 900))
        image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        resampler = Resampler(image)
        sizes = [pyr.level_size(width, height, s) for s in pyr.pyramid_scales(width, height, 20.0, 0.85)]
        computed += sum(resampler.horizontal_first(size) for size in sizes)
        for size, got in zip(sizes, resampler.resize_many(sizes, workers=2)):
            np.testing.assert_array_equal(got, pillow(image, size), err_msg=f"{width}x{height} -> {size}")
    assert computed > 200  # most levels are computed here, not by Pillow


def test_a_tall_photo_goes_to_pillow_and_still_matches():
    image = random_image(900, 371, seed=8)
    resampler = Resampler(image)
    sizes = [pyr.level_size(371, 900, s) for s in pyr.pyramid_scales(371, 900, 20.0, 0.85)]
    assert not any(resampler.horizontal_first(size) for size in sizes)
    for size, got in zip(sizes, resampler.resize_many(sizes)):
        np.testing.assert_array_equal(got, pillow(image, size))


@pytest.mark.parametrize("out", [24, 48])
def test_face_crop_sizes_are_pillows(out):
    rng = np.random.default_rng(out)
    for width in range(2, 160, 3):
        for height in (width - 1, width, width + 1):
            if height < 1:
                continue
            image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            np.testing.assert_array_equal(Resampler(image).resize((out, out)), pillow(image, (out, out)),
                                          err_msg=f"{width}x{height}")
