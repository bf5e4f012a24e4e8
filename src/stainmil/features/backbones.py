"""Build a registered encoder with its weights: a frozen ``(B, 3, H, W) -> (B, D)`` :class:`Backbone`.

Weights (``features.weights``):

* ``pretrained`` — the encoder's published weights: torchvision's ImageNet file through the torch hub
  cache (``imagenet`` is accepted as a synonym for these), or the model's Hugging Face repo through
  ``huggingface_hub`` (works offline from a populated HF cache with ``HF_HUB_OFFLINE=1``; gated models
  need accepted terms and a token). Nothing falls back silently: a failure names what to do.
* a local file — ``.pth`` / ``.pt`` / ``.bin`` (``torch.load(weights_only=True)``) or ``.safetensors``;
  loaded strictly, a wrong file names its missing and unexpected keys.
* ``random`` — seeded initialisation, for tests and the offline demo.

Other encoders plug in without touching the rest: register an :class:`~stainmil.features.encoders.EncoderSpec`,
or point ``features.backbone`` at ``file:/path/encoder.py:build`` where ``build(config)`` returns an
``nn.Module`` mapping normalised images to (B, D) with an integer ``out_dim`` attribute.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from stainmil.config import FeaturesConfig
from stainmil.errors import ConfigError, StoreError
from stainmil.features.encoder_modules import EncoderModule, build_encoder_module
from stainmil.features.encoders import EncoderSpec, check_image_size, encoder_spec

# torchvision's DenseNet files still use the legacy ``…denselayer1.norm.1.weight`` key names
_LEGACY_DENSENET_KEY = __import__("re").compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$")
# keys a state dict may hold that the encoder deliberately drops (ResNet-50 cut after layer 3; classifier heads)
_IGNORED_PREFIXES = ("layer4.", "fc.", "head.", "pooler.", "mask_token")


@dataclass
class Backbone:
    name: str
    module: nn.Module      # eval mode, frozen; forward: (B, 3, H, W) -> (B, out_dim)
    out_dim: int
    weights_id: str        # what was loaded: 'imagenet' | 'hf:<repo>@<revision>' | 'random(seed=0)' | file path
    weights_hash: str      # sha256 (16 hex) of the parameters and buffers actually loaded


def state_dict_hash(module: nn.Module) -> str:
    """sha256 over names and bytes of every parameter and buffer (first 16 hex digits).

    An :class:`EncoderModule` is hashed by its library network (``net``), so the hash does not depend on
    how stainmil wraps it (stores made before the wrapper keep their hash).
    """
    module = module.net if isinstance(module, EncoderModule) else module
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


def load_weights_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.pth``/``.pt``/``.bin`` (``weights_only=True``) or ``.safetensors``.

    A checkpoint dict holding ``state_dict`` or ``model`` is unwrapped; a ``module.`` prefix (DataParallel)
    is removed.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"features.weights '{path}' is neither 'pretrained', 'random' nor an existing file; "
                          "point it at a .pth/.bin/.safetensors state dict.")
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(file), device="cpu")
        else:
            state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated file, not a state dict, pickle refused by weights_only …
        raise StoreError(f"could not read weights file {file} ({type(exc).__name__}: {exc}); save it with "
                         "torch.save(model.state_dict(), …) or safetensors.") from exc
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise StoreError(f"{file} does not hold a state dict of tensors; save one with "
                         "torch.save(model.state_dict(), …).")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_state_dict_checked(net: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Load strictly into the library network, naming missing/unexpected keys and shape mismatches."""
    state_dict = {(m.group(1) + m.group(2) if (m := _LEGACY_DENSENET_KEY.match(k)) else k): v
                  for k, v in state_dict.items()}
    own = net.state_dict()
    state_dict = {k: v for k, v in state_dict.items() if k in own or not k.startswith(_IGNORED_PREFIXES)}
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    wrong = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}" for k in own
             if k in state_dict and state_dict[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        raise StoreError(f"weights from {source} do not fit {type(net).__name__}: {len(missing)} missing keys "
                         f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}), {len(wrong)} "
                         f"of another shape (e.g. {wrong[:2]}); use a state dict saved from the same architecture.")
    net.load_state_dict(state_dict, strict=True)


def _torchvision_state_dict(spec: EncoderSpec) -> dict[str, torch.Tensor]:
    cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(spec.hub_id).name
    try:
        return torch.hub.load_state_dict_from_url(spec.hub_id, map_location="cpu", progress=True,
                                                  check_hash=True, weights_only=True)
    except Exception as exc:  # network refused, hash mismatch, …
        raise StoreError(
            f"could not load ImageNet weights for {spec.name} ({type(exc).__name__}: {exc}); download "
            f"{spec.hub_id} on a machine with internet and copy it to {cache}, or set features.weights to a "
            ".pth path (or 'random' for a smoke test).") from exc


def _huggingface_state_dict(spec: EncoderSpec) -> tuple[dict[str, torch.Tensor], str]:
    """The hub repo's weights file (from the HF cache when offline) and ``hf:<repo>@<revision>``."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    how = (f"accept the terms at https://huggingface.co/{spec.hub_id}, run `hf auth login` (or set HF_TOKEN), "
           if spec.gated else "")
    try:
        path = Path(hf_hub_download(spec.hub_id, spec.weights_file))
    except GatedRepoError as exc:
        raise StoreError(f"{spec.name} is gated on Hugging Face and this token has no access ({spec.hub_id}); "
                         f"{how}then run again — or download {spec.weights_file} and set "
                         "features.weights to its path.") from exc
    except (LocalEntryNotFoundError, RepositoryNotFoundError, OSError) as exc:
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        raise StoreError(f"could not get {spec.hub_id}/{spec.weights_file} for {spec.name} "
                         f"({'HF_HUB_OFFLINE is set and it is not in the HF cache' if offline else type(exc).__name__}"
                         f"); {how}fetch it once with internet (`hf download {spec.hub_id} {spec.weights_file}`) so "
                         "the cache holds it, or set features.weights to a local copy of the file.") from exc
    revision = path.parent.name if path.parent.parent.name == "snapshots" else "local"
    return load_weights_file(path), f"hf:{spec.hub_id}@{revision}"


def _published_weights(spec: EncoderSpec, weights: str) -> tuple[dict[str, torch.Tensor], str]:
    if spec.weights_source == "torchvision":
        return _torchvision_state_dict(spec), "imagenet"
    if weights == "imagenet":
        raise ConfigError(f"features.weights=imagenet applies to torchvision encoders; {spec.name} has "
                          "pathology weights: set features.weights=pretrained.")
    return _huggingface_state_dict(spec)


def build_module(spec: EncoderSpec, image_size: int, seed: int = 0) -> EncoderModule:
    """The encoder's architecture, seeded initialisation (the global RNG is left untouched)."""
    check_image_size(spec, image_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_encoder_module(spec, image_size)


def build_backbone(config: FeaturesConfig) -> Backbone:
    """Build the configured backbone (frozen, eval mode, on CPU)."""
    if config.backbone.startswith("file:"):
        return _from_file(config.backbone, config)
    spec = encoder_spec(config.backbone)
    check_image_size(spec, config.image_size)
    state = None  # weights are fetched before the (possibly 1B-parameter) network is built: fail fast
    if config.weights == "random":
        weights_id = f"random(seed={config.seed})"
    elif config.weights in ("pretrained", "imagenet"):
        state, weights_id = _published_weights(spec, config.weights)
    else:
        state, weights_id = load_weights_file(config.weights), str(Path(config.weights).expanduser().resolve())
    module = build_module(spec, config.image_size, config.seed)
    if state is not None:
        load_state_dict_checked(module.net, state, weights_id)
    return Backbone(spec.name, _freeze(module), module.out_dim, weights_id, state_dict_hash(module))


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
