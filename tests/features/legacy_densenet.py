"""DenseNet-121 in plain torch, state-dict compatible with torchvision's ImageNet checkpoint.

torchvision does not import with the CPU torch build used here, so the architecture
(Huang et al. 2017; growth 32, blocks 6-12-24-16, 64 initial features, bn_size 4) is written out.
Parameter names follow torchvision exactly (``features.denseblock1.denselayer1.norm1.weight`` …);
torchvision's published file still uses the legacy ``norm.1``-style names, which
:func:`remap_legacy_keys` renames on load, as torchvision itself does.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_URL = "https://download.pytorch.org/models/densenet121-a639ec97.pth"
FEATURE_DIM = 1024
_LEGACY_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$"
)


class DenseLayer(nn.Module):
    def __init__(self, in_features: int, growth_rate: int, bn_size: int) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(in_features)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_features, bn_size * growth_rate, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth_rate)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C_in, H, W) -> (B, growth_rate, H, W)."""
        return self.conv2(self.relu2(self.norm2(self.conv1(self.relu1(self.norm1(x))))))


class DenseBlock(nn.ModuleDict):
    def __init__(self, n_layers: int, in_features: int, growth_rate: int, bn_size: int) -> None:
        super().__init__()
        for i in range(n_layers):
            self.add_module(f"denselayer{i + 1}", DenseLayer(in_features + i * growth_rate, growth_rate, bn_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) -> (B, C + n_layers * growth_rate, H, W)."""
        features = [x]
        for layer in self.values():
            features.append(layer(torch.cat(features, 1)))
        return torch.cat(features, 1)


class Transition(nn.Sequential):
    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.add_module("norm", nn.BatchNorm2d(in_features))
        self.add_module("relu", nn.ReLU(inplace=True))
        self.add_module("conv", nn.Conv2d(in_features, out_features, 1, bias=False))
        self.add_module("pool", nn.AvgPool2d(2, 2))


class DenseNet121(nn.Module):
    """``forward`` returns pooled features (B, 1024): features -> ReLU -> global average pool.

    ``classifier`` is kept (unused by :meth:`forward`) so torchvision's file loads unchanged.
    """

    block_config = (6, 12, 24, 16)

    def __init__(self, growth_rate: int = 32, init_features: int = 64, bn_size: int = 4) -> None:
        super().__init__()
        self.features = nn.Sequential()
        self.features.add_module("conv0", nn.Conv2d(3, init_features, 7, stride=2, padding=3, bias=False))
        self.features.add_module("norm0", nn.BatchNorm2d(init_features))
        self.features.add_module("relu0", nn.ReLU(inplace=True))
        self.features.add_module("pool0", nn.MaxPool2d(3, stride=2, padding=1))
        n = init_features
        for i, n_layers in enumerate(self.block_config):
            self.features.add_module(f"denseblock{i + 1}", DenseBlock(n_layers, n, growth_rate, bn_size))
            n += n_layers * growth_rate
            if i != len(self.block_config) - 1:
                self.features.add_module(f"transition{i + 1}", Transition(n, n // 2))
                n //= 2
        self.features.add_module("norm5", nn.BatchNorm2d(n))
        self.classifier = nn.Linear(n, 1000)
        self.out_dim = n
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear):
                nn.init.constant_(m.bias, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 3, H, W) normalised images -> (B, 1024) pooled features."""
        return self.pool(self.features(x))

    @staticmethod
    def pool(maps: torch.Tensor) -> torch.Tensor:
        """Feature maps (B, 1024, h, w) -> (B, 1024): ReLU then global average pool."""
        return torch.flatten(F.adaptive_avg_pool2d(F.relu(maps), 1), 1)

    def tail_start(self, n_blocks: int) -> int:
        """Index in ``features`` where the last ``n_blocks`` dense blocks begin (``len(features)`` for 0).

        The tail holds those blocks, the transitions between them and the final norm.
        """
        if not 0 <= n_blocks <= len(self.block_config):
            raise ValueError(f"n_blocks must be in 0..{len(self.block_config)}, got {n_blocks}")
        if n_blocks == 0:
            return len(self.features)
        return list(self.features._modules).index(f"denseblock{len(self.block_config) - n_blocks + 1}")


def remap_legacy_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename torchvision's legacy keys (``…denselayer1.norm.1.weight`` -> ``…denselayer1.norm1.weight``)."""
    renamed = {}
    for key, value in state_dict.items():
        match = _LEGACY_KEY.match(key)
        renamed[match.group(1) + match.group(2) if match else key] = value  # norm + 1.weight
    return renamed


def load_state_dict_checked(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Load a (possibly legacy-named) state dict strictly, with a readable error on mismatch."""
    from stainmil.errors import StoreError

    state_dict = remap_legacy_keys(state_dict)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    if missing or unexpected:
        raise StoreError(f"weights from {source} do not fit {type(model).__name__}: {len(missing)} missing keys "
                         f"(e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]}); use a "
                         "state dict saved from the same architecture.")
