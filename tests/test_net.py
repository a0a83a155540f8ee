"""The IR backbones: random-init forward checks, the released key layout, parity with the reference."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import net
from conftest import FACEDATA, REFERENCE, require_shared

# Trainable parameters (buffers excluded); ir_18/50/101 equal the manifests' num_parameters.
PARAMETER_COUNTS = {"ir_18": 24_020_352, "ir_34": 34_134_080, "ir_50": 43_585_600, "ir_101": 65_150_912}
BODY_UNITS = {"ir_18": 8, "ir_34": 16, "ir_50": 24, "ir_101": 49}
MANIFEST_ARCHS = ["ir_18", "ir_50", "ir_101"]


def meta_model(arch):
    """The module tree without allocating or initialising weights."""
    with torch.device("meta"):
        return net.build_model(arch)


def load_manifest(arch):
    require_shared()
    with open(REFERENCE / f"manifest_{arch}.json") as f:
        return json.load(f)


@pytest.mark.parametrize("arch", list(net.ARCHS))
def test_random_init_forward(arch):
    torch.manual_seed(0)
    model = net.build_model(arch).eval()
    x = torch.randn(2, 3, 112, 112)
    with torch.inference_mode():
        emb, norm = model(x)
    assert emb.shape == (2, 512) and norm.shape == (2, 1)
    assert emb.dtype == torch.float32 and norm.dtype == torch.float32
    assert torch.isfinite(emb).all() and torch.isfinite(norm).all()
    assert (norm > 0).all()
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(2), atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", list(net.ARCHS))
def test_parameter_count_and_units(arch):
    model = meta_model(arch)
    assert sum(p.numel() for p in model.parameters()) == PARAMETER_COUNTS[arch]
    assert len(model.body) == BODY_UNITS[arch] == sum(net.ARCHS[arch])


@pytest.mark.parametrize("arch", MANIFEST_ARCHS)
def test_keys_and_shapes_match_released_manifest(arch):
    manifest = load_manifest(arch)
    ours = [(k, list(v.shape)) for k, v in meta_model(arch).state_dict().items()]
    theirs = [(e["key"], e["shape"]) for e in manifest["backbone"]]
    assert ours == theirs
    assert sum(p.numel() for p in meta_model(arch).parameters()) == manifest["num_parameters"]


def test_ir101_manifest_totals():
    manifest = load_manifest("ir_101")
    assert len(manifest["backbone"]) == 917 == len(meta_model("ir_101").state_dict())
    assert manifest["num_parameters"] == 65_150_912


def test_public_constructors():
    for arch, constructor in [("ir_18", net.ir_18), ("ir_34", net.ir_34), ("ir_50", net.ir_50),
                              ("ir_101", net.ir_101)]:
        with torch.device("meta"):
            model = constructor()
        assert isinstance(model, net.Backbone) and model.units_per_stage == net.ARCHS[arch]


def test_unknown_arch_lists_known_ones():
    with pytest.raises(ValueError) as info:
        net.build_model("ir_200")
    assert "ir_200" in str(info.value)
    for arch in net.ARCHS:
        assert arch in str(info.value)


@pytest.mark.parametrize("units", [(2, 2, 2), (2, 2, 0, 2), "abcd"])
def test_bad_units_per_stage(units):
    with pytest.raises(ValueError):
        net.Backbone(units)


def test_batch_equals_single_images():
    model = net.synthetic_backbone("ir_18", seed=3)
    x = torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        batch, batch_norm = model(x)
        single = torch.cat([model(x[i:i + 1])[0] for i in range(2)])
    torch.testing.assert_close(batch, single, atol=1e-5, rtol=1e-4)
    assert batch_norm.shape == (2, 1)


# ---------------------------------------------------------------------------------------------
# Parity with the reference network (IR-101 synthetic Lightning checkpoint)
# ---------------------------------------------------------------------------------------------

PARITY_MIN_COSINE = 0.9999
CROP_IMAGES = ["img1.jpeg", "img2.jpeg", "img3.jpeg"]


def to_input(rgb: np.ndarray) -> torch.Tensor:
    """112x112x3 uint8 RGB -> 1x3x112x112 float32 BGR scaled to [-1, 1], as the reference does."""
    bgr = rgb[:, :, ::-1].astype(np.float64)
    scaled = ((bgr / 255.0) - 0.5) / 0.5
    return torch.from_numpy(scaled.astype(np.float32).transpose(2, 0, 1).copy()).unsqueeze(0)


def read_rgb(path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.fixture(scope="module")
def reference_ir101(synthetic_ckpt):
    return net.load_backbone(synthetic_ckpt("ir_101", "lightning"))


def embed(model, rgb_images):
    """N x 512 embeddings and N pre-normalisation norms."""
    with torch.inference_mode():
        emb, norm = model(torch.cat([to_input(rgb) for rgb in rgb_images]))
    return emb.numpy(), norm.numpy().ravel()


@pytest.mark.parity
@pytest.mark.slow
def test_parity_aligned_images_as_is(reference_ir101):
    require_shared()
    paths = sorted((FACEDATA / "aligned").glob("*.jpg"))
    assert paths, "no aligned images found"
    ours, _ = embed(reference_ir101, [read_rgb(p) for p in paths])
    cosines = {p.name: cosine(ours[i], np.load(REFERENCE / "expected_ir101" / f"{p.name}.asis.npy")[0])
               for i, p in enumerate(paths)}
    assert min(cosines.values()) >= PARITY_MIN_COSINE, cosines


@pytest.mark.parity
@pytest.mark.slow
def test_parity_reference_crops(reference_ir101):
    require_shared()
    folder = REFERENCE / "expected_ir101"
    ours, norms = embed(reference_ir101, [read_rgb(folder / f"{name}.face0.png") for name in CROP_IMAGES])
    cosines = {name: cosine(ours[i], np.load(folder / f"{name}.emb.npy")[0])
               for i, name in enumerate(CROP_IMAGES)}
    assert min(cosines.values()) >= PARITY_MIN_COSINE, cosines
    with open(folder / "reference.json") as f:
        reference = json.load(f)
    expected_norms = [reference[name]["norms"][0] for name in CROP_IMAGES]
    np.testing.assert_allclose(norms, expected_norms, rtol=1e-4)
