"""The fast MTCNN pieces against the plain computations they replace.

- ``proposal.PNetPass`` (conv1 + PReLU + pool as one stride-2 convolution, strips, small levels
  stacked into one canvas, fused heads) against ``nets.PNet`` run as the reference runs it, on
  even and odd level sizes;
- ``pyramid.scan_pyramid`` (levels made in threads, big ones in strips, small ones stacked)
  against P-Net on every level made by Pillow;
- ``PNetPass.many`` with its pieces in parallel threads against one thread, and
  ``openmp.one_thread`` (one OpenMP thread for the calling thread alone), and ``MTCNN.detect``
  leaving the caller's torch thread count as it was;
- ``detector.crop_boxes`` against PIL's crop and resize, and with several threads;
- ``serving.native.map_native`` and ``NativeSlots``.

``resample.Resampler`` itself is checked against Pillow in ``test_resample.py``.
"""
import io
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import photo
from face_alignment import MTCNN, openmp, proposal
from face_alignment import pyramid as pyr
from face_alignment.detector import crop_boxes
from face_alignment.nets import load_nets
from adaface.threads import NativeSlots, map_native


@pytest.fixture(scope="module")
def nets():
    return load_nets(torch.device("cpu"))


def random_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth random H×W×3 uint8 RGB image (noise blurred by a PIL downscale)."""
    rng = np.random.default_rng(seed)
    noise = Image.fromarray(rng.integers(0, 256, (height * 4, width * 4, 3), dtype=np.uint8))
    return np.array(noise.resize((width, height), Image.BILINEAR))


def plain_pnet(pnet, level: torch.Tensor):
    """P-Net as the reference runs it on a 1×3×h×w uint8 level: (score h'×w', offsets h'×w'×4)."""
    x = level.float().sub(127.5).mul(0.0078125)
    offsets, score = pnet(x)
    return score[0], offsets[0].permute(1, 2, 0)


@pytest.mark.parametrize("size", [(480, 720), (481, 720), (480, 721), (37, 53), (12, 12), (13, 17)])
def test_pnet_pass_matches_the_net(nets, size):
    level = torch.from_numpy(random_image(*size)).permute(2, 0, 1).unsqueeze(0)
    fast = proposal.PNetPass(nets[0])
    with torch.inference_mode():
        score, offsets = fast(level)
        want_score, want_offsets = plain_pnet(nets[0], level)
    assert score.shape == want_score.shape == (proposal.pnet_rows(size[0]), want_score.shape[1])
    assert torch.allclose(score, want_score, atol=1e-5), (score - want_score).abs().max()
    assert torch.allclose(offsets, want_offsets, atol=1e-5), (offsets - want_offsets).abs().max()


def test_pnet_pass_on_stacked_levels_matches_each_alone(nets):
    sizes = [(37, 53), (13, 17), (12, 12), (40, 21), (23, 40), (151, 131), (60, 90)]
    levels = [torch.from_numpy(random_image(*size, seed=i)).permute(2, 0, 1).unsqueeze(0)
              for i, size in enumerate(sizes)]
    fast = proposal.PNetPass(nets[0])
    with torch.inference_mode():
        found = fast.many(levels)
        for level, (score, offsets) in zip(levels, found):
            want_score, want_offsets = plain_pnet(nets[0], level)
            assert score.shape == want_score.shape
            assert torch.allclose(score, want_score, atol=1e-5), (score - want_score).abs().max()
            assert torch.allclose(offsets, want_offsets, atol=1e-5), (offsets - want_offsets).abs().max()


@pytest.mark.parametrize("strip_pixels", [proposal.STRIP_PIXELS, 211 * 30])
def test_pnet_pass_cells_over_a_threshold(nets, monkeypatch, strip_pixels):
    monkeypatch.setattr(proposal, "STRIP_PIXELS", strip_pixels)  # one pass, or 15 rows a strip
    levels = [torch.from_numpy(random_image(*size, seed=i)).permute(2, 0, 1).unsqueeze(0)
              for i, size in enumerate([(301, 211), (37, 53), (13, 17)])]
    fast = proposal.PNetPass(nets[0])
    with torch.inference_mode():
        for level, (rows, cols, scores, offsets) in zip(levels, fast.many(levels, threshold=0.1)):
            want_score, want_offsets = plain_pnet(nets[0], level)
            want_rows, want_cols = torch.nonzero(want_score > 0.1, as_tuple=True)
            assert len(want_rows) > 0
            assert torch.equal(rows, want_rows) and torch.equal(cols, want_cols)
            assert torch.allclose(scores, want_score[want_rows, want_cols], atol=1e-5)
            assert torch.allclose(offsets, want_offsets[want_rows, want_cols], atol=1e-5)


def test_pnet_pass_in_strips_matches_one_pass(nets, monkeypatch):
    level = torch.from_numpy(random_image(301, 211, seed=1)).permute(2, 0, 1).unsqueeze(0)
    fast = proposal.PNetPass(nets[0])
    with torch.inference_mode():
        whole = fast(level)
        monkeypatch.setattr(proposal, "STRIP_PIXELS", 211 * 30)  # 15 output rows per strip
        strips = fast(level)
    assert strips[0].shape == whole[0].shape
    assert torch.allclose(strips[0], whole[0], atol=1e-6)
    assert torch.allclose(strips[1], whole[1], atol=1e-6)


@pytest.mark.parametrize("threshold", [None, 0.1])
def test_pnet_pass_in_threads_matches_one_thread(nets, monkeypatch, threshold):
    monkeypatch.setattr(proposal, "STRIP_PIXELS", 211 * 30)  # 15 rows a strip: many pieces
    levels = [torch.from_numpy(random_image(*size, seed=i)).permute(2, 0, 1).unsqueeze(0)
              for i, size in enumerate([(301, 211), (180, 240), (37, 53), (13, 17), (60, 90)])]
    fast = proposal.PNetPass(nets[0])
    assert len(fast.pieces(levels)) > 10
    with torch.inference_mode():
        alone, threaded = fast.many(levels, threshold), fast.many(levels, threshold, workers=2)
    for one, two in zip(alone, threaded):
        if threshold is not None:
            assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])  # the same cells
            one, two = one[2:], two[2:]
        for a, b in zip(one, two):
            assert a.shape == b.shape and torch.allclose(a, b, atol=1e-6), (a - b).abs().max()


@pytest.mark.skipif(not openmp.available(), reason="no OpenMP runtime found beside torch")
def test_one_openmp_thread_is_the_calling_threads_alone():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    seen = {}

    def fresh_thread():  # torch sets a new thread's count up on its first op: after ours
        with openmp.one_thread():
            torch.ones(64, 64) @ torch.ones(64, 64)
            seen["inside"] = torch.get_num_threads()
            time.sleep(0.2)
        seen["after"] = torch.get_num_threads()

    try:
        worker = threading.Thread(target=fresh_thread)
        worker.start()
        time.sleep(0.1)
        seen["caller meanwhile"] = torch.get_num_threads()
        worker.join()
        with openmp.one_thread():
            seen["caller inside"] = torch.get_num_threads()
        seen["caller after"] = torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    assert seen == {"inside": 1, "after": 2, "caller meanwhile": 2, "caller inside": 1, "caller after": 2}


def test_detect_leaves_the_callers_thread_count(nets):
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        detector = MTCNN()
        found = detector.detect(np.asarray(Image.open(io.BytesIO(photo("img1.jpeg"))).convert("RGB")))
        assert len(found) >= 1 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_scan_pyramid_finds_the_cells_of_the_exact_levels(nets):
    image = np.asarray(Image.open(io.BytesIO(photo("img1.jpeg"))).convert("RGB"))
    found_photo = pyr.Photo(image)
    scales = pyr.pyramid_scales(found_photo.width, found_photo.height, 20.0, 0.85)
    fast = proposal.PNetPass(nets[0])
    with torch.inference_mode():
        cells = pyr.scan_pyramid(found_photo, fast, scales, 0.6, workers=2)
        assert sum(len(rows) for rows, *_ in cells) > 0
        for scale, (rows, cols, scores, offsets) in zip(scales, cells):
            height, width = pyr.level_size(found_photo.width, found_photo.height, scale)
            level = np.array(Image.fromarray(image).resize((width, height), Image.BILINEAR))
            score, offset = plain_pnet(nets[0], torch.from_numpy(level).permute(2, 0, 1).unsqueeze(0))
            want_rows, want_cols = torch.nonzero(score > 0.6, as_tuple=True)
            np.testing.assert_array_equal(rows, want_rows.numpy())
            np.testing.assert_array_equal(cols, want_cols.numpy())
            np.testing.assert_allclose(scores, score[want_rows, want_cols].numpy(), atol=1e-5)
            np.testing.assert_allclose(offsets, offset[want_rows, want_cols].numpy(), atol=1e-5)


def test_crop_boxes_are_pils_crop_and_resize():
    image = random_image(300, 400, seed=5)
    pil = Image.fromarray(image)
    boxes = np.array([[10, 20, 209, 219], [-30, -12, 90, 108], [350, 250, 449, 349],  # inside, over edges
                      [100, 100, 110, 110], [-200, -200, -100, -100], [0, 0, 0, 0]], float)  # tiny, outside
    for size in (24, 48):
        crops = crop_boxes(image, boxes, size)
        for crop, (x1, y1, x2, y2) in zip(crops, boxes.astype(int).tolist()):
            want = np.asarray(pil.crop((x1, y1, x2 + 1, y2 + 1)).resize((size, size), Image.BILINEAR))
            np.testing.assert_array_equal(crop, want)


def test_crop_boxes_in_threads_match_one_thread():
    image = random_image(300, 400, seed=3)
    rng = np.random.default_rng(4)
    corners = rng.uniform(-50, 380, (40, 2))
    boxes = np.hstack([corners, corners + rng.uniform(-5, 120, (40, 1))])  # some empty, some outside
    one = crop_boxes(image, boxes, 24, workers=1)
    assert one.any()
    np.testing.assert_array_equal(crop_boxes(image, boxes, 24, workers=3), one)


def test_map_native_keeps_order_and_uses_threads():
    seen = set()

    def work(i):
        seen.add(threading.get_ident())
        time.sleep(0.02)  # releases the GIL, as Pillow does
        return i * i

    assert map_native(work, range(8), workers=2) == [i * i for i in range(8)]
    assert len(seen) == 2
    assert map_native(work, [], workers=2) == []


def test_map_native_raises_the_first_error_after_all_finish():
    done = []

    def work(i):
        if i == 3:
            raise ValueError("bad item")
        time.sleep(0.01)
        done.append(i)

    with pytest.raises(ValueError, match="bad item"):
        map_native(work, range(6), workers=2)
    assert sorted(done) == [0, 1, 2, 4, 5]


@pytest.mark.parametrize("count", [1, 2])
def test_native_slots_admit_at_most_their_count(count):
    slots = NativeSlots(count)
    inside, most, guard = [0], [0], threading.Lock()

    def work(_):
        with slots.held():
            with guard:
                inside[0] += 1
                most[0] = max(most[0], inside[0])
            time.sleep(0.02)
            with guard:
                inside[0] -= 1

    map_native(work, range(8), workers=4)
    assert most[0] == count and inside[0] == 0
    with slots.held():  # every slot was given back
        pass
