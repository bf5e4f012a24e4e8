"""Backbone registry: a name -> builder that returns a frozen encoder ``(B, 3, H, W) -> (B, D)``.

Built in: ``densenet121`` (the team's backbone). Other encoders plug in without touching the rest:

* in code: ``@register_backbone("my_encoder")`` on a ``builder(config) -> Backbone``;
* from a file: ``features.backbone: "file:/path/encoder.py:build"`` where ``build(config)`` returns
  an ``nn.Module`` mapping normalised images to (B, D) features and having an ``out_dim`` attribute.
"""

from __future__ import annotations

import hashlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from stainmil.config import FeaturesConfig
from stainmil.errors import ConfigError, StoreError
from stainmil.features.densenet import IMAGENET_URL, DenseNet121, load_state_dict_checked


@dataclass
class Backbone:
    name: str
    module: nn.Module      # eval mode, frozen; forward: (B, 3, H, W) -> (B, out_dim)
    out_dim: int
    weights_id: str        # what was loaded: 'imagenet' | 'random(seed=0)' | file path
    weights_hash: str      # sha256 (16 hex) of the parameters and buffers actually loaded


BackboneBuilder = Callable[[FeaturesConfig], Backbone]
BACKBONES: dict[str, BackboneBuilder] = {}


def register_backbone(name: str) -> Callable[[BackboneBuilder], BackboneBuilder]:
    def decorator(builder: BackboneBuilder) -> BackboneBuilder:
        BACKBONES[name] = builder
        return builder

    return decorator


def state_dict_hash(module: nn.Module) -> str:
    """sha256 over names and bytes of every parameter and buffer (first 16 hex digits)."""
    digest = hashlib.sha256()
    for key, tensor in sorted(module.state_dict().items()):
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _freeze(module: nn.Module) -> nn.Module:
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def load_weights_file(path: str) -> dict[str, torch.Tensor]:
    """Read a state dict from a .pth file (safely: ``weights_only=True``)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"features.weights '{path}' is neither 'imagenet', 'random' nor an existing file; "
                          "point it at a .pth state dict.")
    state = torch.load(file, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise StoreError(f"{file} does not hold a state dict; save one with torch.save(model.state_dict(), …).")
    return state


def _imagenet_state_dict() -> dict[str, torch.Tensor]:
    cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(IMAGENET_URL).name
    try:
        return torch.hub.load_state_dict_from_url(IMAGENET_URL, map_location="cpu", progress=True,
                                                  check_hash=True, weights_only=True)
    except Exception as exc:  # network refused, hash mismatch, …
        raise StoreError(
            f"could not load ImageNet weights for densenet121 ({type(exc).__name__}: {exc}); download "
            f"{IMAGENET_URL} on a machine with internet and copy it to {cache}, or set features.weights to a "
            ".pth path (or 'random' for a smoke test).") from exc


@register_backbone("densenet121")
def build_densenet121(config: FeaturesConfig) -> Backbone:
    if config.weights == "random":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            model = DenseNet121()
        weights_id = f"random(seed={config.seed})"
    else:
        model = DenseNet121()
        if config.weights == "imagenet":
            state, weights_id = _imagenet_state_dict(), "imagenet"
        else:
            state, weights_id = load_weights_file(config.weights), str(Path(config.weights).expanduser().resolve())
        load_state_dict_checked(model, state, weights_id)
    return Backbone("densenet121", _freeze(model), model.out_dim, weights_id, state_dict_hash(model))


def _from_file(spec: str, config: FeaturesConfig) -> Backbone:
    try:
        _, file, function = spec.split(":", 2)
    except ValueError as exc:
        raise ConfigError(f"features.backbone '{spec}' must look like file:/path/encoder.py:build.") from exc
    path = Path(file).expanduser()
    if not path.is_file():
        raise ConfigError(f"features.backbone file {path} does not exist.")
    module_spec = importlib.util.spec_from_file_location(f"stainmil_user_backbone_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, function):
        raise ConfigError(f"features.backbone file {path} has no function '{function}'.")
    encoder = getattr(module, function)(config)
    out_dim = getattr(encoder, "out_dim", None)
    if not isinstance(encoder, nn.Module) or not isinstance(out_dim, int):
        raise ConfigError(f"{path}:{function} must return an nn.Module with an integer out_dim attribute.")
    return Backbone(spec, _freeze(encoder), out_dim, f"{path}:{function}", state_dict_hash(encoder))


def build_backbone(config: FeaturesConfig) -> Backbone:
    """Build the configured backbone (frozen, eval mode, on CPU)."""
    if config.backbone.startswith("file:"):
        return _from_file(config.backbone, config)
    if config.backbone not in BACKBONES:
        raise ConfigError(f"features.backbone '{config.backbone}' is not registered; choose one of "
                          f"{sorted(BACKBONES)} or use file:/path/encoder.py:build.")
    return BACKBONES[config.backbone](config)
