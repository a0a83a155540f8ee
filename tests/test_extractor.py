"""The extractor: input forms, batching, align and face policies, errors, preprocessing, CLI.

Random IR-18 weights keep these fast; parity with the reference lives in test_parity.py.
"""
import base64
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import adaface.decode as image_decode
from serving.errors import STATUS
from AdaFaceFeature import (EMBEDDING_SIZE, AdaFaceFeature, BadOptionError, FaceInputError,
                            NotAlignedError, crops_to_tensor, resolve_device)
from conftest import FACEDATA, REPO, require_shared

PHOTO = "adaface/img1.jpeg"          # 259×194, one face about 64 px wide
OTHER_PHOTO = "adaface/img2.jpeg"    # 201×251, one face about 85 px wide
THIRD_PHOTO = "adaface/img3.jpeg"
CROP = "aligned/img1_aligned.jpg"    # 112×112 aligned crop


def shared_file(relative: str):
    require_shared()
    return FACEDATA / relative


def jpeg_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def extractor():
    return AdaFaceFeature("synthetic", arch="ir_18", device="cpu")


@pytest.fixture(scope="module")
def two_faces():
    """img1.jpeg and img2.jpeg (enlarged 1.5×) side by side on grey: H×W×3 uint8 RGB.

    The enlarged right-hand face is the larger one; MTCNN scores the left-hand one higher.
    """
    left = Image.open(shared_file(PHOTO)).convert("RGB")
    right = Image.open(shared_file(OTHER_PHOTO)).convert("RGB")
    right = right.resize((round(right.width * 1.5), round(right.height * 1.5)), Image.BILINEAR)
    canvas = Image.new("RGB", (left.width + right.width, max(left.height, right.height)), (128, 128, 128))
    canvas.paste(left, (0, 0))
    canvas.paste(right, (left.width, 0))
    return np.asarray(canvas), left.width


def embeddings(faces) -> np.ndarray:
    return np.stack([f.embedding for f in faces])


# -- batching and input forms ----------------------------------------------------------------

def test_batch_equals_single_images(extractor):
    photo = shared_file(PHOTO).read_bytes()
    crop = shared_file(CROP).read_bytes()
    singles = [extractor.embed_image(photo), extractor.embed_image(crop)]
    batch = extractor.embed([photo, crop, photo, crop])
    assert [len(faces) for faces in batch] == [1, 1, 1, 1]
    for got, want in zip(batch, singles * 2):
        np.testing.assert_allclose(got[0].embedding, want[0].embedding, atol=1e-5, rtol=0)
        assert got[0].norm == pytest.approx(want[0].norm, rel=1e-5)


def test_every_input_form_gives_the_same_embedding(extractor):
    path = shared_file(PHOTO)
    raw = path.read_bytes()
    b64 = base64.b64encode(raw).decode("ascii")
    forms = {
        "pil": Image.open(path),
        "numpy": np.asarray(Image.open(path).convert("RGB")),
        "bytes": raw,
        "base64": b64,
        "data-url": "data:image/jpeg;base64," + b64,
        "base64-bytes": b64.encode("ascii"),
    }
    reference = extractor.embed_image(raw)
    assert len(reference) == 1
    for form, value in forms.items():
        faces = extractor.embed_image(value)
        assert len(faces) == 1, form
        np.testing.assert_allclose(faces[0].embedding, reference[0].embedding, atol=1e-6, rtol=0,
                                   err_msg=form)
        np.testing.assert_allclose(faces[0].box, reference[0].box, atol=1e-6, err_msg=form)


def test_face_fields(extractor):
    face = extractor.embed_image(shared_file(PHOTO).read_bytes())[0]
    assert face.embedding.shape == (EMBEDDING_SIZE,) and face.embedding.dtype == np.float32
    assert np.linalg.norm(face.embedding) == pytest.approx(1.0, abs=1e-5)
    assert np.isfinite(face.norm) and face.norm > 0
    assert face.box.shape == (4,) and face.box[0] < face.box[2] and face.box[1] < face.box[3]
    assert 0.9 < face.score <= 1.0
    assert face.landmarks.shape == (5, 2)
    # the face lies inside its box
    assert (face.landmarks[:, 0] > face.box[0]).all() and (face.landmarks[:, 0] < face.box[2]).all()


# -- align and face policies -----------------------------------------------------------------

def test_auto_takes_a_112_crop_as_is(extractor):
    faces = extractor.embed_image(shared_file(CROP).read_bytes(), align_mode="auto")
    assert len(faces) == 1
    assert faces[0].box is None and faces[0].score is None and faces[0].landmarks is None
    never = extractor.embed_image(shared_file(CROP).read_bytes(), align_mode="never")
    np.testing.assert_array_equal(never[0].embedding, faces[0].embedding)


def test_always_detects_in_a_112_crop(extractor):
    faces = extractor.embed_image(shared_file(CROP).read_bytes(), align_mode="always")
    assert len(faces) == 1
    assert faces[0].box is not None and faces[0].landmarks.shape == (5, 2)


def test_never_refuses_an_image_that_is_not_112(extractor):
    with pytest.raises(NotAlignedError) as info:
        extractor.embed_image(shared_file(PHOTO).read_bytes(), align_mode="never")
    assert info.value.code == "not_aligned" and STATUS[info.value.code] == 422
    assert isinstance(info.value, FaceInputError)


def test_all_returns_every_face_in_score_order(extractor, two_faces):
    image, _ = two_faces
    faces = extractor.embed_image(image, faces="all")
    assert len(faces) == 2
    assert faces[0].score >= faces[1].score
    # two different people: their embeddings are not the same vector
    assert float(faces[0].embedding @ faces[1].embedding) < 0.99


def test_largest_and_score_policies(extractor, two_faces):
    image, split = two_faces
    everyone = extractor.embed_image(image, faces="all")
    boxes = np.stack([f.box for f in everyone])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    largest = extractor.embed_image(image, faces="largest")
    assert len(largest) == 1
    np.testing.assert_array_equal(largest[0].box, boxes[np.argmax(areas)])
    assert largest[0].box[0] >= split  # the enlarged face on the right
    by_score = extractor.embed_image(image, faces="score")
    assert len(by_score) == 1
    np.testing.assert_array_equal(by_score[0].box, everyone[0].box)
    assert by_score[0].box[2] <= split  # here the top score is the smaller, left-hand face


def test_max_faces_caps_all(extractor, two_faces):
    image, _ = two_faces
    capped = extractor.embed_image(image, faces="all", max_faces=1)
    assert len(capped) == 1
    np.testing.assert_array_equal(capped[0].box, extractor.embed_image(image, faces="all")[0].box)


def test_no_face_gives_an_empty_list(extractor):
    grey = np.full((480, 640, 3), 128, np.uint8)
    assert extractor.embed_image(grey) == []
    assert extractor.embed_image(png_bytes(Image.fromarray(grey)), faces="all") == []
    assert extractor.embed([grey, grey]) == [[], []]


@pytest.mark.parametrize("options", [
    {"faces": "biggest"},
    {"faces": None},
    {"align_mode": "sometimes"},
    {"align_mode": "AUTO"},
    {"min_face_size": 0},
    {"min_face_size": 20_000},
], ids=["faces", "faces-none", "align", "align-case", "min-face-0", "min-face-huge"])
def test_bad_options_raise(extractor, options):
    with pytest.raises(BadOptionError) as info:
        extractor.embed_image(np.full((64, 64, 3), 128, np.uint8), **options)
    assert STATUS[info.value.code] == 400 and info.value.code == "bad_option"


def test_min_face_size_override_excludes_a_small_face(extractor):
    photo = shared_file(PHOTO).read_bytes()  # face about 64 px wide
    assert len(extractor.embed_image(photo)) == 1
    assert extractor.embed_image(photo, min_face_size=200) == []
    assert len(extractor.embed_image(photo)) == 1  # the override does not stick


# -- decoding errors -------------------------------------------------------------------------

def test_empty_bytes_raise_empty_image_error(extractor):
    with pytest.raises(image_decode.EmptyImageError) as info:
        extractor.embed_image(b"")
    assert STATUS[info.value.code] == 400


def test_random_bytes_raise_not_an_image(extractor):
    junk = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    with pytest.raises(image_decode.NotAnImageError):
        extractor.embed_image(junk)
    with pytest.raises(image_decode.NotAnImageError):  # one bad image fails embed as a whole
        extractor.embed([shared_file(CROP).read_bytes(), junk])


def test_truncated_jpeg_and_bad_base64(extractor):
    data = jpeg_bytes(Image.new("RGB", (200, 200), (10, 200, 30)))
    with pytest.raises(image_decode.TruncatedImageError):
        extractor.embed_image(data[: len(data) // 2])
    with pytest.raises(image_decode.Base64DecodeError):
        extractor.embed_image("not base64 at all!")


# -- network input ---------------------------------------------------------------------------

def test_crops_to_tensor_shape_dtype_and_scaling():
    rng = np.random.default_rng(1)
    crops = rng.integers(0, 256, (3, 112, 112, 3), dtype=np.uint8)
    t = crops_to_tensor(crops, torch.device("cpu"))
    assert t.shape == (3, 3, 112, 112) and t.dtype == torch.float32
    expected = (crops[..., ::-1].transpose(0, 3, 1, 2).astype(np.float32) / 255.0 - 0.5) / 0.5
    np.testing.assert_allclose(t.numpy(), expected, atol=1e-6, rtol=0)
    assert t.min() >= -1.0 and t.max() <= 1.0


def test_crops_to_tensor_is_bgr():
    red = np.zeros((1, 112, 112, 3), np.uint8)
    red[..., 0] = 255
    t = crops_to_tensor(red, torch.device("cpu"))
    assert torch.all(t[0, 2] == 1.0)
    assert torch.all(t[0, 0] == -1.0) and torch.all(t[0, 1] == -1.0)
    grey = crops_to_tensor(np.full((1, 112, 112, 3), 51, np.uint8), torch.device("cpu"))
    torch.testing.assert_close(grey, torch.full((1, 3, 112, 112), -0.6), atol=1e-6, rtol=0)


def test_crops_to_tensor_leaves_its_input_alone():
    crops = np.arange(112 * 112 * 3, dtype=np.int64).reshape(1, 112, 112, 3).astype(np.uint8)
    before = crops.copy()
    crops_to_tensor(crops, torch.device("cpu"))
    np.testing.assert_array_equal(crops, before)


def test_embed_crops_of_nothing(extractor):
    emb, norms = extractor.embed_crops(np.zeros((0, 112, 112, 3), np.uint8))
    assert emb.shape == (0, EMBEDDING_SIZE) and norms.shape == (0,)


# -- devices ---------------------------------------------------------------------------------

def test_resolve_device_auto_and_cpu():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device("").type == expected
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available on this machine")
@pytest.mark.parametrize("name", ["cuda", "cuda:0"])
def test_resolve_device_cuda_without_cuda(name):
    with pytest.raises(ValueError, match="CUDA is not available"):
        resolve_device(name)


@pytest.mark.parametrize("name", ["tpu", "meta", "gpu", "cuda:x"])
def test_resolve_device_refuses_unknown(name):
    with pytest.raises(ValueError):
        resolve_device(name)


# -- command line ----------------------------------------------------------------------------

def run_cli(*args, weights="synthetic"):
    env = {**os.environ, "ADAFACE_WEIGHTS": weights, "ADAFACE_ARCH": "ir_18", "ADAFACE_DEVICE": "cpu",
           "ADAFACE_THREADS": "1"}
    return subprocess.run([sys.executable, "AdaFaceFeature.py", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_embed_prints_one_json_line_per_image():
    images = [shared_file(PHOTO), shared_file(OTHER_PHOTO)]
    result = run_cli(*images)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 2
    for line, path in zip(lines, images):
        record = json.loads(line)
        assert record["image"] == str(path)
        assert len(record["faces"]) == 1 and "error" not in record
        embedding = np.array(record["faces"][0]["embedding"])
        assert embedding.shape == (EMBEDDING_SIZE,)
        assert np.linalg.norm(embedding) == pytest.approx(1.0, abs=1e-4)
        assert len(record["faces"][0]["box"]) == 4


def test_cli_compare_prints_a_similarity_matrix():
    images = [shared_file(PHOTO), shared_file(OTHER_PHOTO), shared_file(THIRD_PHOTO)]
    result = run_cli("compare", *images)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 4
    assert lines[0].split() == [p.name for p in images]
    matrix = []
    for line, path in zip(lines[1:], images):
        name, *values = line.split()
        assert name == path.name
        matrix.append([float(v) for v in values])
    matrix = np.array(matrix)
    assert matrix.shape == (3, 3)
    np.testing.assert_array_equal(np.diag(matrix), [1.0, 1.0, 1.0])
    np.testing.assert_allclose(matrix, matrix.T, atol=1e-4)
    assert (np.abs(matrix) <= 1.0).all()


def test_cli_embed_dir_writes_vectors_and_lists_skipped(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for relative in (PHOTO, OTHER_PHOTO):
        source = shared_file(relative)
        (folder / source.name).write_bytes(source.read_bytes())
    Image.new("RGB", (640, 480), (128, 128, 128)).save(folder / "blank.png")
    out = tmp_path / "vectors.npz"
    result = run_cli("embed-dir", folder, "--out", out)
    assert result.returncode == 0, result.stderr
    with np.load(out) as data:
        assert data["embeddings"].shape == (2, EMBEDDING_SIZE)
        assert data["embeddings"].dtype == np.float32
        assert sorted(data["names"].tolist()) == ["img1.jpeg", "img2.jpeg"]
        assert data["norms"].shape == (2,)
    assert "skipped blank.png: no face found" in result.stdout
    assert "wrote 2 embeddings from 3 images" in result.stdout


def test_cli_missing_weights_exit_code_and_help():
    result = run_cli(shared_file(PHOTO), weights="/nonexistent.ckpt")
    assert result.returncode == 2
    assert "/nonexistent.ckpt" in result.stderr
    assert "github.com/mk-minchul/AdaFace" in result.stderr and "ADAFACE_WEIGHTS" in result.stderr
    assert "Traceback" not in result.stderr
