"""Every encoder as the same module: ``(B, 3, H, W)`` normalised images -> ``(B, D)`` embeddings.

An :class:`EncoderModule` wraps the library's own network (``self.net``: torchvision's DenseNet /
ResNet, timm's VisionTransformer, transformers' Dinov2Model — so their state dicts load unchanged)
and exposes it as a sequence of ``stages`` followed by ``finish`` (final norm + pooling). Online
fine-tuning (``features.trainable_blocks: n``) trains the last ``n`` *blocks* — dense blocks,
ResNet layers or transformer blocks — plus ``finish``'s parameters; everything before runs frozen.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from stainmil.features.encoders import EncoderSpec, resolve_kwargs


class EncoderModule(nn.Module):
    """Base: ``forward(x) = finish(stage_k(… stage_1(x)))``; subclasses set ``net`` and ``out_dim``."""

    out_dim: int

    def stages(self) -> list[nn.Module]:
        raise NotImplementedError

    def finish(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def finish_modules(self) -> list[nn.Module]:
        """Modules with parameters used by :meth:`finish` (trained with the tail)."""
        return []

    @property
    def block_count(self) -> int:
        """How many trailing blocks ``trainable_blocks`` may unfreeze."""
        raise NotImplementedError

    def tail_start(self, n_blocks: int) -> int:
        """Index in :meth:`stages` where the last ``n_blocks`` blocks begin (``len(stages)`` for 0)."""
        if not 0 <= n_blocks <= self.block_count:
            raise ValueError(f"n_blocks must be in 0..{self.block_count}, got {n_blocks}")
        return len(self.stages()) - n_blocks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 3, H, W) normalised -> (B, out_dim)."""
        for stage in self.stages():
            x = stage(x)
        return self.finish(x)


class DenseNetEncoder(EncoderModule):
    """torchvision DenseNet-121: features -> ReLU -> global average pool (1024). Blocks: the 4 dense blocks
    (a tail of n blocks holds them, the transitions between them and the final norm)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net, self.out_dim = net, net.classifier.in_features

    def stages(self) -> list[nn.Module]:
        return list(self.net.features.children())

    def finish(self, maps: torch.Tensor) -> torch.Tensor:
        """(B, 1024, h, w) -> (B, 1024)."""
        return torch.flatten(F.adaptive_avg_pool2d(F.relu(maps), 1), 1)

    @property
    def block_count(self) -> int:
        return sum(name.startswith("denseblock") for name in self.net.features._modules)

    def tail_start(self, n_blocks: int) -> int:
        if not 0 <= n_blocks <= self.block_count:
            raise ValueError(f"n_blocks must be in 0..{self.block_count}, got {n_blocks}")
        names = list(self.net.features._modules)
        return len(names) if n_blocks == 0 else names.index(f"denseblock{self.block_count - n_blocks + 1}")


class ResNetTruncEncoder(EncoderModule):
    """torchvision ResNet-50 cut after layer 3 (CLAM's ``resnet50_trunc``): -> average pool (1024).
    Blocks: layer1..layer3. ``layer4`` and ``fc`` are removed (their keys are ignored when loading)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        net.layer4, net.fc = nn.Identity(), nn.Identity()
        self.net, self.out_dim = net, 1024

    def stages(self) -> list[nn.Module]:
        n = self.net
        return [n.conv1, n.bn1, n.relu, n.maxpool, n.layer1, n.layer2, n.layer3]

    def finish(self, maps: torch.Tensor) -> torch.Tensor:
        return torch.flatten(F.adaptive_avg_pool2d(maps, 1), 1)

    @property
    def block_count(self) -> int:
        return 3


class _TimmEmbed(nn.Module):
    """Patch embedding + class/register tokens + position embedding + pre-norm of a timm ViT."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = [net]  # not a submodule: the parameters belong to the ViT

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> tokens (B, T, C)."""
        net = self.net[0]
        return net.norm_pre(net.patch_drop(net._pos_embed(net.patch_embed(x))))


class TimmViTEncoder(EncoderModule):
    """A timm VisionTransformer; blocks = transformer blocks; ``finish`` = final norm + ``pooling``."""

    def __init__(self, net: nn.Module, pooling: str, out_dim: int) -> None:
        super().__init__()
        self.net, self.pooling, self.out_dim = net, pooling, out_dim
        self.embed = _TimmEmbed(net)

    def stages(self) -> list[nn.Module]:
        return [self.embed, *self.net.blocks]

    def finish(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, T, C) -> (B, C) class token, or (B, 2C) class token ++ mean of the patch tokens."""
        tokens = self.net.norm(tokens)
        cls = tokens[:, 0]
        if self.pooling == "cls+mean":
            return torch.cat([cls, tokens[:, self.net.num_prefix_tokens:].mean(1)], dim=-1)
        return self.net.fc_norm(cls)

    def finish_modules(self) -> list[nn.Module]:
        return [self.net.norm, self.net.fc_norm]

    @property
    def block_count(self) -> int:
        return len(self.net.blocks)


class _HFLayer(nn.Module):
    """A transformers layer as a stage returning only the hidden states; ``wrapped`` is the layer itself."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self._layer = [layer]  # not a submodule: the parameters belong to the Dinov2Model

    @property
    def wrapped(self) -> nn.Module:
        return self._layer[0]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out = self.wrapped(tokens)
        return out[0] if isinstance(out, tuple) else out


class Dinov2Encoder(EncoderModule):
    """transformers' Dinov2Model (Phikon-v2): embeddings -> layers -> layernorm -> class token."""

    def __init__(self, net: nn.Module, out_dim: int) -> None:
        super().__init__()
        self.net, self.out_dim = net, out_dim
        self.layers = [_HFLayer(layer) for layer in net.encoder.layer]

    def stages(self) -> list[nn.Module]:
        return [self.net.embeddings, *self.layers]

    def finish(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.net.layernorm(tokens)[:, 0]

    def finish_modules(self) -> list[nn.Module]:
        return [self.net.layernorm]

    @property
    def block_count(self) -> int:
        return len(self.layers)


def build_encoder_module(spec: EncoderSpec, image_size: int) -> EncoderModule:
    """The architecture of ``spec`` with freshly initialised weights (on the current default device)."""
    kwargs = resolve_kwargs(spec, image_size)
    if spec.library == "torchvision":
        import torchvision

        kwargs.pop("truncate_after", None)
        net = getattr(torchvision.models, spec.architecture)(weights=None, **kwargs)
        return DenseNetEncoder(net) if spec.architecture.startswith("densenet") else ResNetTruncEncoder(net)
    if spec.library == "timm":
        import timm

        net = timm.create_model(spec.architecture, pretrained=False, **kwargs)
        return TimmViTEncoder(net, spec.pooling, spec.dim)
    import transformers

    config = getattr(transformers, spec.architecture)(**kwargs)
    return Dinov2Encoder(transformers.Dinov2Model(config), spec.dim)
