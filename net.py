"""AdaFace IR backbones and the loader for their weights.

The networks are the "ir" variants (no squeeze-excitation) of mk-minchul/AdaFace ``net.py``.

Input: float32 tensor N x 3 x 112 x 112, colour order **BGR**, each channel scaled as
``(x / 255 - 0.5) / 0.5`` (so values lie in [-1, 1]).
Output: ``(embedding, norm)`` where ``embedding`` is N x 512 float32, L2-normalised along dim 1,
and ``norm`` is N x 1 float32, the L2 norm before normalisation (AdaFace's image-quality proxy).

Weights come in three layouts, all read by :func:`load_backbone`:

* a released PyTorch Lightning ``.ckpt``: ``{"state_dict": {"model.<key>": ..., "head.*": ...}, ...}``;
* a plain backbone state dict (``.pt`` / ``.pth``) with bare keys;
* a CVLFace file (``.pt`` or ``.safetensors``) whose keys carry a ``net.`` prefix.

Pickled files are read without running code from them: tensors are rebuilt by torch, a short list
of plain containers is admitted, and every other class or function named in the file becomes an
inert placeholder (see :class:`_RestrictedUnpickler`).
"""
from __future__ import annotations

import _compat_pickle
import builtins
import codecs
import functools
import hashlib
import logging
import math
import os
import pickle
import struct
import types
import zipfile
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from adaface.options import EMBEDDING_SIZE

logger = logging.getLogger(__name__)

# Units per stage for each architecture (mk-minchul/AdaFace get_blocks). The names, in this order,
# are adaface.options.ARCH_NAMES, what the settings accept; a test keeps the two the same.
ARCHS: dict[str, tuple[int, int, int, int]] = {
    "ir_18": (2, 2, 2, 2),
    "ir_34": (3, 4, 6, 3),
    "ir_50": (3, 4, 14, 3),
    "ir_101": (3, 13, 30, 3),
}
# Output channels of the four stages; the input of stage 1 has 64 channels.
STAGE_CHANNELS = (64, 128, 256, 512)

WEIGHT_SUFFIXES = (".ckpt", ".pt", ".pth", ".safetensors")

# Key prefixes added by the wrappers that saved the backbone: Lightning ("model."), CVLFace ("net."),
# the CVLFace Hugging Face wrapper ("model.net."), DataParallel ("module.").
WRAPPER_PREFIXES = ("model.", "net.", "module.")
# Keys of the AdaFace classification head in Lightning checkpoints; not part of the backbone.
IGNORED_PREFIXES = ("head.",)

WEIGHTS_HELP = (
    "AdaFace weights come from the Google Drive links in the AdaFace README "
    "(https://github.com/mk-minchul/AdaFace, e.g. adaface_ir101_webface12m.ckpt) or from the "
    "Hugging Face repository minchul/cvlface_adaface_ir101_webface12m (model.safetensors); "
    "set ADAFACE_WEIGHTS to the file or to a folder holding exactly one such file."
)


# --------------------------------------------------------------------------------------------
# Architecture
# --------------------------------------------------------------------------------------------


class BasicBlockIR(nn.Module):
    """Pre-activation residual unit of the IR backbones: ``res_layer(x) + shortcut_layer(x)``.

    Maps N x ``in_channels`` x H x W to N x ``depth`` x H/stride x W/stride.
    """

    def __init__(self, in_channels: int, depth: int, stride: int) -> None:
        super().__init__()
        # Weight compat requires the names shortcut_layer / res_layer, the Sequential indices and
        # this registration order (shortcut first): they are the released checkpoints' keys.
        if in_channels == depth:
            self.shortcut_layer = nn.MaxPool2d(1, stride)
        else:
            self.shortcut_layer = nn.Sequential(
                nn.Conv2d(in_channels, depth, 1, stride, bias=False),
                nn.BatchNorm2d(depth),
            )
        self.res_layer = nn.Sequential(
            nn.BatchNorm2d(in_channels),
            nn.Conv2d(in_channels, depth, 3, 1, 1, bias=False),
            nn.BatchNorm2d(depth),
            nn.PReLU(depth),
            nn.Conv2d(depth, depth, 3, stride, 1, bias=False),
            nn.BatchNorm2d(depth),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res_layer(x) + self.shortcut_layer(x)


def _make_body(units_per_stage: Sequence[int]) -> nn.Sequential:
    """Flat Sequential of units; the first unit of every stage halves the resolution."""
    units = []
    in_channels = 64
    for count, depth in zip(units_per_stage, STAGE_CHANNELS):
        units.append(BasicBlockIR(in_channels, depth, 2))
        units.extend(BasicBlockIR(depth, depth, 1) for _ in range(count - 1))
        in_channels = depth
    return nn.Sequential(*units)


class Backbone(nn.Module):
    """AdaFace IR backbone.

    ``forward(x)``: x is float32 N x 3 x 112 x 112, BGR, scaled as ``(x / 255 - 0.5) / 0.5``.
    Returns ``(embedding, norm)``: N x 512 L2-normalised float32, and N x 1 pre-normalisation norms.
    """

    def __init__(self, units_per_stage: Sequence[int]) -> None:
        super().__init__()
        units_per_stage = tuple(units_per_stage)
        if len(units_per_stage) != 4 or not all(isinstance(n, int) and n > 0 for n in units_per_stage):
            raise ValueError(f"units_per_stage must be 4 positive ints, got {units_per_stage!r}")
        self.units_per_stage = units_per_stage
        # Weight compat requires the names input_layer / output_layer / body, the Sequential
        # indices and this registration order: they are the released checkpoints' keys.
        self.input_layer = nn.Sequential(
            nn.Conv2d(3, 64, 3, 1, 1, bias=False),
            nn.BatchNorm2d(64),
            nn.PReLU(64),
        )
        self.output_layer = nn.Sequential(
            nn.BatchNorm2d(512),
            nn.Dropout(0.4),
            nn.Flatten(),
            nn.Linear(512 * 7 * 7, EMBEDDING_SIZE),
            nn.BatchNorm1d(EMBEDDING_SIZE, affine=False),
        )
        self.body = _make_body(units_per_stage)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.input_layer(x)
        x = self.body(x)
        x = self.output_layer(x)
        norm = torch.norm(x, 2, 1, True)
        return torch.div(x, norm), norm


def build_model(arch: str) -> Backbone:
    """A randomly initialised backbone for ``arch`` (one of :data:`ARCHS`)."""
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(ARCHS)}")
    return Backbone(ARCHS[arch])


def ir_18() -> Backbone:
    return build_model("ir_18")


def ir_34() -> Backbone:
    return build_model("ir_34")


def ir_50() -> Backbone:
    return build_model("ir_50")


def ir_101() -> Backbone:
    return build_model("ir_101")


def _uninitialised_model(arch: str) -> Backbone:
    """The backbone with allocated but unset CPU tensors, for callers that overwrite every one."""
    with torch.device("meta"):
        model = build_model(arch)
    return model.to_empty(device="cpu")


def synthetic_backbone(arch: str = "ir_101", seed: int = 0, device: str | torch.device = "cpu") -> Backbone:
    """A backbone with deterministic random weights, for trying the service without real weights.

    Kaiming-normal convolutions and linear layer, PReLU slopes 0.25, batch norms near identity
    with mildly random statistics; the last norm of each residual branch is scaled to 0.1 so
    activations stay bounded through the 49 units of IR-101. Eval mode, gradients off.
    """
    model = _uninitialised_model(arch)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, module in model.named_modules():
            _synthetic_init(name, module, generator)
    return model.to(device).eval().requires_grad_(False)


def _synthetic_init(name: str, module: nn.Module, g: torch.Generator) -> None:
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        fan_in = module.weight[0].numel()
        module.weight.normal_(0.0, math.sqrt(2.0 / fan_in), generator=g)
        if module.bias is not None:
            module.bias.normal_(0.0, 0.01, generator=g)
    elif isinstance(module, nn.PReLU):
        module.weight.fill_(0.25)
    elif isinstance(module, nn.modules.batchnorm._BatchNorm):
        module.num_batches_tracked.zero_()
        module.running_mean.normal_(0.0, 0.05, generator=g)
        module.running_var.uniform_(0.8, 1.2, generator=g)
        if module.affine:
            scale = 0.1 if name.endswith("res_layer.5") else 1.0
            module.weight.normal_(scale, 0.1 * scale, generator=g)
            module.bias.normal_(0.0, 0.05, generator=g)


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


class WeightsError(Exception):
    """Base class of every error met while finding or loading backbone weights."""


class WeightsNotFoundError(WeightsError):
    """No weights file at the given path (or none in the given folder)."""


class AmbiguousWeightsError(WeightsError):
    """A folder was given that holds more than one weights file."""


class CorruptWeightsError(WeightsError):
    """The file is truncated, unreadable or not a checkpoint."""


class ArchitectureMismatchError(WeightsError):
    """The weights belong to another architecture than the configured one (or to none known)."""


class StateDictMismatchError(WeightsError):
    """Backbone keys are missing, unexpected, or have the wrong shape."""


# --------------------------------------------------------------------------------------------
# Restricted unpickling
# --------------------------------------------------------------------------------------------


class _Unresolved:
    """Inert stand-in for a class or function that the restricted unpickler does not admit.

    It accepts and ignores constructor arguments, pickled state, items and list entries; calling
    an instance returns the instance. ``qualname`` records what the file named.
    """

    qualname = "?"

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs) -> None:
        pass

    def __setstate__(self, state) -> None:
        pass

    def __setitem__(self, key, value) -> None:
        pass

    def append(self, item) -> None:
        pass

    def extend(self, items) -> None:
        pass

    def __call__(self, *args, **kwargs):
        return self

    def __repr__(self) -> str:
        return f"<unresolved {self.qualname}>"


@functools.lru_cache(maxsize=512)
def _unresolved_class(module: str, name: str) -> type:
    return type(name, (_Unresolved,), {"qualname": f"{module}.{name}", "__module__": __name__})


@functools.lru_cache(maxsize=1)
def _admitted_globals() -> dict[tuple[str, str], object]:
    """The globals a checkpoint may name: tensor rebuilding, plain containers, numpy scalars."""
    admitted: dict[tuple[str, str], object] = {
        ("collections", "OrderedDict"): OrderedDict,
        ("_codecs", "encode"): codecs.encode,  # bytes in protocol-2 pickles
        ("torch", "Size"): torch.Size,
        ("torch", "Tensor"): torch.Tensor,
        ("torch", "device"): torch.device,
        ("torch.nn.parameter", "Parameter"): nn.Parameter,
        ("torch._tensor", "_rebuild_from_type_v2"): torch._tensor._rebuild_from_type_v2,
        ("numpy", "dtype"): np.dtype,
    }
    for name in ("dict", "list", "tuple", "set", "frozenset", "int", "float", "complex", "bool",
                 "str", "bytes", "bytearray"):
        admitted[("builtins", name)] = getattr(builtins, name)
    for name in ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3", "_rebuild_parameter",
                 "_rebuild_parameter_with_state"):
        if hasattr(torch._utils, name):
            admitted[("torch._utils", name)] = getattr(torch._utils, name)
    scalar = np.float64(0).__reduce__()[0]  # numpy's scalar constructor, wherever numpy keeps it
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        admitted[(module, "scalar")] = scalar
    return admitted


def _admitted_torch_attr(name: str) -> object | None:
    """torch dtypes (``torch.float32``) and storage classes (``torch.FloatStorage``)."""
    value = getattr(torch, name, None)
    if isinstance(value, torch.dtype):
        return value
    if isinstance(value, type) and issubclass(value, (torch.storage.TypedStorage, torch.UntypedStorage)):
        return value
    return None


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that never imports or calls anything outside :func:`_admitted_globals`."""

    def find_class(self, module: str, name: str):
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        admitted = _admitted_globals().get((module, name))
        if admitted is None and module == "torch":
            admitted = _admitted_torch_attr(name)
        if admitted is not None:
            return admitted
        logger.debug("checkpoint names %s.%s; replaced by an inert placeholder", module, name)
        return _unresolved_class(module, name)


def _restricted_load(file, **kwargs):
    return _RestrictedUnpickler(file, **kwargs).load()


# A stand-in for the pickle module, as torch.load's pickle_module argument expects.
_restricted_pickle = types.ModuleType(f"{__name__}._restricted_pickle")
_restricted_pickle.Unpickler = _RestrictedUnpickler
_restricted_pickle.load = _restricted_load
_restricted_pickle.UnpicklingError = pickle.UnpicklingError


# --------------------------------------------------------------------------------------------
# Reading files
# --------------------------------------------------------------------------------------------


def resolve_weights_path(path: str | os.PathLike) -> Path:
    """The weights file at ``path``; a folder must hold exactly one .ckpt/.pt/.pth/.safetensors."""
    p = Path(path).expanduser()
    if p.is_dir():
        found = sorted(c for c in p.iterdir() if c.is_file() and c.suffix.lower() in WEIGHT_SUFFIXES)
        if not found:
            raise WeightsNotFoundError(
                f"no weights file ({', '.join(WEIGHT_SUFFIXES)}) in folder {p}. {WEIGHTS_HELP}"
            )
        if len(found) > 1:
            raise AmbiguousWeightsError(
                f"{len(found)} weights files in folder {p}: {', '.join(c.name for c in found)}; "
                "keep only one there or set ADAFACE_WEIGHTS to the file itself"
            )
        return found[0]
    if not p.is_file():
        raise WeightsNotFoundError(f"no weights file at {p}. {WEIGHTS_HELP}")
    return p


def weights_fingerprint(model: torch.nn.Module) -> str:
    """Hex SHA-256 of a loaded backbone's weights, whatever file they came from: every tensor of
    its state dict in key order (name, shape, then its values as little-endian float32), BN's
    ``num_batches_tracked`` counters left out. The same weights from a ``.ckpt``, a ``.pt`` or a
    ``.safetensors`` give the same fingerprint; any changed value gives another."""
    digest = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        if key.endswith("num_batches_tracked"):
            continue
        values = tensor.detach().to("cpu", torch.float32).contiguous().numpy().astype("<f4", copy=False)
        digest.update(f"{key}:{tuple(values.shape)};".encode())
        digest.update(values.tobytes())
    return digest.hexdigest()


def file_sha256(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _looks_like_safetensors(head: bytes) -> bool:
    """safetensors files start with a little-endian u64 header length, then a JSON object."""
    if len(head) < 9:
        return False
    (header_len,) = struct.unpack("<Q", head[:8])
    return 0 < header_len < 100_000_000 and head[8:9] == b"{"


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as zf:
            return any(n.endswith("/constants.pkl") or n == "constants.pkl" for n in zf.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CorruptWeightsError(
            f"cannot read {path} as safetensors ({exc}); the file may be truncated: download it again"
        ) from exc


def _load_pickled(path: Path) -> object:
    """torch.load with weights_only, then with the restricted unpickler; never unrestricted."""
    if _is_torchscript(path):
        raise CorruptWeightsError(
            f"{path} is a TorchScript archive, not a checkpoint; use the released .ckpt or a state dict"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        logger.debug("weights_only load of %s refused (%s); using the restricted unpickler", path, exc)
    except Exception as exc:
        raise _corrupt(path, exc) from exc
    try:
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_restricted_pickle)
    except Exception as exc:
        raise _corrupt(path, exc) from exc


def _corrupt(path: Path, exc: BaseException) -> CorruptWeightsError:
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return CorruptWeightsError(
        f"cannot read {path} as a PyTorch checkpoint ({detail[:300]}); the file may be truncated "
        "or not a checkpoint: download it again"
    )


def _read_raw(path: Path) -> object:
    with open(path, "rb") as f:
        head = f.read(16)
    if not head:
        raise CorruptWeightsError(f"{path} is empty; download the weights again")
    if path.suffix.lower() == ".safetensors" or _looks_like_safetensors(head):
        return _load_safetensors(path)
    return _load_pickled(path)


def _describe(obj: object) -> str:
    if isinstance(obj, Mapping):
        keys = [str(k) for k in obj]
        return f"a mapping with keys {_shorten(keys, 6)}"
    return f"an object of type {type(obj).__name__}" if not isinstance(obj, _Unresolved) else repr(obj)


def _find_state_dict(obj: object, path: Path) -> Mapping:
    """The mapping that holds the tensors: ``obj["state_dict"]`` (Lightning) or ``obj`` itself."""
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model_state_dict"):
            inner = obj.get(key)
            if isinstance(inner, Mapping):
                return inner
        if any(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
    raise CorruptWeightsError(
        f"{path} is not a model checkpoint: expected a state dict of tensors or a Lightning "
        f"checkpoint with a 'state_dict', found {_describe(obj)}. {WEIGHTS_HELP}"
    )


def strip_prefixes(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop ``head.*`` keys and remove wrapper prefixes (``model.``, ``net.``, ...) shared by all keys."""
    keys = {str(k): v for k, v in state_dict.items()}
    while True:
        keys = {k: v for k, v in keys.items() if not k.startswith(IGNORED_PREFIXES)}
        prefix = next((p for p in WRAPPER_PREFIXES if keys and all(k.startswith(p) for k in keys)), None)
        if prefix is None:
            return keys
        keys = {k[len(prefix):]: v for k, v in keys.items()}


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Backbone tensors from a weights file (or a folder with one), prefixes stripped, on CPU."""
    path = resolve_weights_path(path)
    state_dict = strip_prefixes(_find_state_dict(_read_raw(path), path))
    not_tensors = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise CorruptWeightsError(
            f"{path}: entries that should be tensors are not: {_shorten(not_tensors)}; "
            "the file is not an AdaFace backbone checkpoint"
        )
    if not state_dict:
        raise CorruptWeightsError(f"{path} holds no backbone tensors. {WEIGHTS_HELP}")
    return state_dict


# --------------------------------------------------------------------------------------------
# Matching weights to an architecture
# --------------------------------------------------------------------------------------------


def _shorten(items: Sequence[str], limit: int = 8) -> str:
    items = list(items)
    shown = ", ".join(items[:limit])
    return shown if len(items) <= limit else f"{shown}, ... and {len(items) - limit} more"


def infer_arch(state_dict: Mapping[str, torch.Tensor]) -> str:
    """The architecture name whose units per stage match the ``body.N`` keys of ``state_dict``.

    Stages are delimited by the units with a projection shortcut (``body.N.shortcut_layer.0``).
    """
    units = {int(parts[1]) for parts in (k.split(".") for k in state_dict)
             if len(parts) > 2 and parts[0] == "body" and parts[1].isdigit()}
    if not units:
        raise ArchitectureMismatchError(
            "the weights have no body.N keys, so they are not an AdaFace IR backbone. " + WEIGHTS_HELP
        )
    total = max(units) + 1
    starts = sorted(u for u in units if f"body.{u}.shortcut_layer.0.weight" in state_dict)
    bounds = [0, *starts, total]
    stages = tuple(b - a for a, b in zip(bounds, bounds[1:]))
    for name, depths in ARCHS.items():
        if depths == stages:
            return name
    raise ArchitectureMismatchError(
        f"the weights have {total} body units in stages {stages}, which matches no known "
        f"architecture ({', '.join(f'{n} {d}' for n, d in ARCHS.items())})"
    )


def _choose_arch(state_dict: Mapping[str, torch.Tensor], arch: str | None, source: object) -> str:
    if arch is None:
        return infer_arch(state_dict)
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(ARCHS)}")
    try:
        found = infer_arch(state_dict)
    except ArchitectureMismatchError:
        return arch  # incomplete weights: the strict key check says what is wrong
    if found != arch:
        raise ArchitectureMismatchError(
            f"the configured architecture is {arch} but the weights in {source} are {found}; "
            f"configure {found} (or leave the architecture unset to infer it), or use {arch} weights"
        )
    return arch


def _arch_name(model: Backbone) -> str:
    names = [n for n, d in ARCHS.items() if d == model.units_per_stage]
    return names[0] if names else f"the IR backbone with units {model.units_per_stage}"


def load_weights(model: Backbone, state_dict: Mapping[str, torch.Tensor], source: object = "the weights") -> None:
    """Copy ``state_dict`` into ``model`` strictly: every key present, none extra, shapes equal.

    Only a missing ``num_batches_tracked`` is tolerated (unused at inference; set to 0).
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state_dict if k not in expected]
    wrong_shape = [
        f"{k} (file {tuple(state_dict[k].shape)}, model {tuple(v.shape)})"
        for k, v in expected.items() if k in state_dict and state_dict[k].shape != v.shape
    ]
    if missing or unexpected or wrong_shape:
        parts = [f"{label} ({len(keys)}): {_shorten(keys)}"
                 for label, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                     ("shape mismatches", wrong_shape)) if keys]
        raise StateDictMismatchError(
            f"{source} do not fit {_arch_name(model)}: "
            + "; ".join(parts)
            + ". Use an AdaFace IR backbone checkpoint of the configured architecture."
        )
    full = dict(state_dict)
    for k, v in expected.items():
        full.setdefault(k, torch.zeros_like(v))
    model.load_state_dict(full, strict=True)


def load_backbone(path: str | os.PathLike, arch: str | None = None,
                  device: str | torch.device = "cpu") -> Backbone:
    """Build the backbone for the weights at ``path`` (file or folder) and load them.

    ``arch=None`` infers the architecture from the weights; a configured ``arch`` must match.
    Returns the model on ``device``, in eval mode, with gradients off.
    Raises a :class:`WeightsError` subclass for every problem with the file.
    """
    path = resolve_weights_path(path)
    state_dict = read_state_dict(path)
    arch = _choose_arch(state_dict, arch, path)
    model = _uninitialised_model(arch)
    load_weights(model, state_dict, source=f"the weights in {path}")
    logger.info("loaded %s backbone from %s (%d tensors)", arch, path, len(state_dict))
    return model.to(device).eval().requires_grad_(False)
