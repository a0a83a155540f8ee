"""The weights loader, on checkpoints written by the tests: every layout and every refusal."""
import argparse
import hashlib
import os
import pickle
import random
import sys
import types

import pytest
import torch
from safetensors.torch import save_file

import net


@pytest.fixture(scope="module")
def ir18_state():
    """Backbone state dict of a small deterministic ir_18 (bare keys, CPU tensors)."""
    return {k: v.clone() for k, v in net.synthetic_backbone("ir_18", seed=1).state_dict().items()}


def lightning_dict(state, **extra):
    sd = {"model." + k: v for k, v in state.items()}
    sd["head.kernel"] = torch.randn(512, 10)
    sd["head.t"] = torch.zeros(1)
    return {"state_dict": sd, "epoch": 3, "global_step": 100, **extra}


def write(path, obj):
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in obj.items()}, str(path))
    else:
        torch.save(obj, path)
    return path


LAYOUTS = {
    "lightning.ckpt": lambda s: lightning_dict(s),
    "plain.pt": lambda s: dict(s),
    "plain.pth": lambda s: dict(s),
    "cvlface.pt": lambda s: {"net." + k: v for k, v in s.items()},
    "cvlface.safetensors": lambda s: {"net." + k: v for k, v in s.items()},
    "hf_wrapper.safetensors": lambda s: {"model.net." + k: v for k, v in s.items()},
    "dataparallel.pth": lambda s: {"module." + k: v for k, v in s.items()},
}


def assert_model_equals(model, state):
    loaded = model.state_dict()
    assert loaded.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(loaded[k], v), k


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_each_layout_loads(tmp_path, ir18_state, layout):
    path = write(tmp_path / layout, LAYOUTS[layout](ir18_state))
    model = net.load_backbone(path)
    assert_model_equals(model, ir18_state)
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert net.read_state_dict(path).keys() == ir18_state.keys()


def test_synthetic_lightning_checkpoint(synthetic_ckpt):
    path = synthetic_ckpt("ir_18", "lightning")
    raw = torch.load(path, weights_only=True)["state_dict"]
    model = net.load_backbone(path, arch="ir_18")
    source = {k[len("model."):]: v for k, v in raw.items() if k.startswith("model.")}
    assert_model_equals(model, source)


def test_folder_with_one_weights_file(tmp_path, ir18_state):
    write(tmp_path / "adaface_ir18.ckpt", lightning_dict(ir18_state))
    (tmp_path / "README.md").write_text("not weights")
    assert net.resolve_weights_path(tmp_path) == tmp_path / "adaface_ir18.ckpt"
    assert_model_equals(net.load_backbone(tmp_path), ir18_state)


def test_load_to_device_and_sha256(tmp_path, ir18_state):
    path = write(tmp_path / "w.pt", dict(ir18_state))
    model = net.load_backbone(str(path), device=torch.device("cpu"))
    assert next(model.parameters()).device.type == "cpu"
    assert net.file_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    assert net.file_sha256(path, chunk_size=1000) == net.file_sha256(path)


def test_missing_num_batches_tracked_is_tolerated(tmp_path, ir18_state):
    state = {k: v for k, v in ir18_state.items() if not k.endswith("num_batches_tracked")}
    model = net.load_backbone(write(tmp_path / "w.safetensors", state))
    torch.testing.assert_close(model.state_dict()["input_layer.0.weight"], ir18_state["input_layer.0.weight"])


def test_strip_prefixes():
    t = torch.zeros(1)
    assert net.strip_prefixes({"model.a.b": t, "head.kernel": t}).keys() == {"a.b"}
    assert net.strip_prefixes({"model.net.a": t}).keys() == {"a"}
    assert net.strip_prefixes({"a": t, "model.b": t}).keys() == {"a", "model.b"}


# ---------------------------------------------------------------------------------------------
# Unknown classes and code in pickles
# ---------------------------------------------------------------------------------------------


def pickle_under_fake_module(monkeypatch, path, obj_factory):
    """torch.save objects of classes living in a module that will not exist at load time."""
    module = types.ModuleType("fake_lightning_parsing")

    class AttributeDict(dict):
        pass

    class CallbackState:
        def __init__(self):
            self.best_score = 0.5
            self.history = [1, 2, 3]

    class Log(list):
        pass

    for cls in (AttributeDict, CallbackState, Log):
        cls.__module__ = module.__name__
        cls.__qualname__ = cls.__name__
        setattr(module, cls.__name__, cls)
    with monkeypatch.context() as m:
        m.setitem(sys.modules, module.__name__, module)
        torch.save(obj_factory(module), path)
    assert module.__name__ not in sys.modules
    return path


def test_unknown_classes_are_inert(tmp_path, monkeypatch, ir18_state):
    def make(mod):
        hparams = mod.AttributeDict(arch="ir_18", lr=0.1)
        extra = {
            "hyper_parameters": hparams,
            "hparams_namespace": argparse.Namespace(arch="ir_18", epochs=26),
            "callbacks": {"ModelCheckpoint": mod.CallbackState()},
            "loops": mod.Log([1, 2]),
        }
        return lightning_dict(ir18_state, **extra)

    path = pickle_under_fake_module(monkeypatch, tmp_path / "released.ckpt", make)
    with pytest.raises((ModuleNotFoundError, AttributeError)):
        torch.load(path, weights_only=False)  # an unrestricted load cannot even rebuild it
    assert_model_equals(net.load_backbone(path), ir18_state)


class RunsCode:
    """Unpickling this would run a shell command (or Python code) that creates ``marker``."""

    def __init__(self, marker, how):
        self.marker, self.how = str(marker), how

    def __reduce__(self):
        if self.how == "os.system":
            return os.system, (f"touch {self.marker}",)
        return exec, (f"open({self.marker!r}, 'w').close()",)


@pytest.mark.parametrize("how", ["os.system", "exec"])
@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_code_in_pickle_does_not_run(tmp_path, how, writer):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    if writer == "torch.save":
        torch.save(RunsCode(marker, how), path)
    else:
        with open(path, "wb") as f:
            pickle.dump(RunsCode(marker, how), f)
    with pytest.raises(net.CorruptWeightsError) as info:
        net.load_backbone(path)
    assert not marker.exists()
    assert str(path) in str(info.value)


def test_code_beside_valid_weights_does_not_run(tmp_path, ir18_state):
    marker = tmp_path / "pwned"
    path = tmp_path / "mixed.ckpt"
    torch.save(lightning_dict(ir18_state, callbacks=[RunsCode(marker, "os.system")]), path)
    assert_model_equals(net.load_backbone(path), ir18_state)
    assert not marker.exists()


def test_code_in_place_of_a_tensor_is_refused(tmp_path, ir18_state):
    marker = tmp_path / "pwned"
    state = dict(ir18_state)
    state["input_layer.0.weight"] = RunsCode(marker, "exec")
    path = tmp_path / "w.pt"
    torch.save(state, path)
    with pytest.raises(net.CorruptWeightsError, match="input_layer.0.weight"):
        net.load_backbone(path)
    assert not marker.exists()


def test_torchscript_archive_is_refused(tmp_path):
    path = tmp_path / "scripted.pt"
    torch.jit.script(torch.nn.Linear(2, 2)).save(str(path))
    with pytest.raises(net.CorruptWeightsError, match="TorchScript"):
        net.read_state_dict(path)


# ---------------------------------------------------------------------------------------------
# Damaged files
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cut.ckpt", "cut.safetensors"])
def test_truncated_file(tmp_path, ir18_state, name):
    path = tmp_path / name
    write(path, lightning_dict(ir18_state) if name.endswith(".ckpt") else dict(ir18_state))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(net.CorruptWeightsError, match="download it again"):
        net.load_backbone(path)


@pytest.mark.parametrize("name", ["noise.ckpt", "noise.pth", "noise.safetensors"])
def test_random_bytes(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(random.Random(0).randbytes(64 * 1024))
    with pytest.raises(net.CorruptWeightsError):
        net.load_backbone(path)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.pt"
    path.touch()
    with pytest.raises(net.CorruptWeightsError, match="empty"):
        net.load_backbone(path)


def test_checkpoint_without_tensors(tmp_path):
    path = write(tmp_path / "meta.ckpt", {"epoch": 3, "hyper_parameters": {"arch": "ir_101"}})
    with pytest.raises(net.CorruptWeightsError, match="not a model checkpoint"):
        net.load_backbone(path)


# ---------------------------------------------------------------------------------------------
# Finding the file
# ---------------------------------------------------------------------------------------------


def test_missing_path_says_where_weights_come_from(tmp_path):
    with pytest.raises(net.WeightsNotFoundError) as info:
        net.load_backbone(tmp_path / "nope.ckpt")
    message = str(info.value)
    assert "nope.ckpt" in message
    assert "minchul/cvlface_adaface_ir101_webface12m" in message
    assert "Google Drive" in message and "ADAFACE_WEIGHTS" in message


def test_folder_without_weights(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(net.WeightsNotFoundError, match="no weights file"):
        net.resolve_weights_path(tmp_path)


def test_folder_with_two_weights_files(tmp_path, ir18_state):
    write(tmp_path / "a.ckpt", dict(ir18_state))
    write(tmp_path / "b.safetensors", dict(ir18_state))
    with pytest.raises(net.AmbiguousWeightsError) as info:
        net.load_backbone(tmp_path)
    assert "a.ckpt" in str(info.value) and "b.safetensors" in str(info.value)
    assert isinstance(info.value, net.WeightsError)


# ---------------------------------------------------------------------------------------------
# Keys and architectures
# ---------------------------------------------------------------------------------------------


def test_missing_keys(tmp_path, ir18_state):
    state = dict(ir18_state)
    del state["body.3.res_layer.1.weight"]
    with pytest.raises(net.StateDictMismatchError, match="missing keys.*body.3.res_layer.1.weight"):
        net.load_backbone(write(tmp_path / "w.pt", state))


def test_many_missing_keys_are_shortened(tmp_path, ir18_state):
    state = {k: v for k, v in ir18_state.items() if not k.startswith("body.7.")}
    with pytest.raises(net.StateDictMismatchError, match=r"and \d+ more"):
        net.load_backbone(write(tmp_path / "w.pt", state), arch="ir_18")


def test_unexpected_keys(tmp_path, ir18_state):
    state = {**ir18_state, "body.3.extra.weight": torch.zeros(3)}
    with pytest.raises(net.StateDictMismatchError, match="unexpected keys.*body.3.extra.weight"):
        net.load_backbone(write(tmp_path / "w.ckpt", lightning_dict(state)))


def test_shape_mismatch(tmp_path, ir18_state):
    state = {**ir18_state, "output_layer.3.weight": torch.zeros(256, 512 * 7 * 7)}
    with pytest.raises(net.StateDictMismatchError, match="output_layer.3.weight"):
        net.load_backbone(write(tmp_path / "w.pt", state))


def test_configured_arch_mismatch(tmp_path, ir18_state):
    path = write(tmp_path / "w.pt", dict(ir18_state))
    with pytest.raises(net.ArchitectureMismatchError) as info:
        net.load_backbone(path, arch="ir_50")
    assert "ir_50" in str(info.value) and "ir_18" in str(info.value)


def test_unknown_configured_arch(tmp_path, ir18_state):
    with pytest.raises(ValueError, match="ir_101"):
        net.load_backbone(write(tmp_path / "w.pt", dict(ir18_state)), arch="ir_152")


@pytest.mark.parametrize("arch", list(net.ARCHS))
def test_infer_arch(arch):
    with torch.device("meta"):
        state = net.build_model(arch).state_dict()
    assert net.infer_arch(state) == arch


def test_infer_arch_refuses_unknown_layouts():
    with pytest.raises(net.ArchitectureMismatchError, match="no body"):
        net.infer_arch({"fc.weight": torch.zeros(1)})
    with torch.device("meta"):
        state = net.build_model("ir_18").state_dict()
    truncated = {k: v for k, v in state.items() if not k.startswith("body.7.")}
    with pytest.raises(net.ArchitectureMismatchError, match="matches no known"):
        net.infer_arch(truncated)


# ---------------------------------------------------------------------------------------------
# Synthetic weights
# ---------------------------------------------------------------------------------------------


def test_synthetic_backbone_is_deterministic_and_finite():
    x = torch.randn(1, 3, 112, 112, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        a, norm_a = net.synthetic_backbone("ir_101", seed=0)(x)
        b, norm_b = net.synthetic_backbone("ir_101", seed=0)(x)
    assert torch.equal(a, b) and torch.equal(norm_a, norm_b)
    assert torch.isfinite(a).all() and torch.isfinite(norm_a).all() and (norm_a > 0).all()
    torch.testing.assert_close(a.norm(dim=1), torch.ones(1), atol=1e-5, rtol=0)


def test_synthetic_backbone_sets_every_tensor():
    first = net.synthetic_backbone("ir_18", seed=5).state_dict()
    second = net.synthetic_backbone("ir_18", seed=5).state_dict()
    for k, v in first.items():
        assert torch.isfinite(v.float()).all(), k
        assert torch.equal(v, second[k]), k


def test_synthetic_backbone_seed_matters():
    first = net.synthetic_backbone("ir_18", seed=0).state_dict()
    second = net.synthetic_backbone("ir_18", seed=1).state_dict()
    assert not torch.equal(first["output_layer.3.weight"], second["output_layer.3.weight"])
