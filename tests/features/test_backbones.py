"""Encoders: torchvision DenseNet equals the old hand-written one, every weight route, refusals."""

import pytest
import torch

from stainmil.config import FeaturesConfig
from stainmil.errors import ConfigError, StoreError
from stainmil.features import backbones
from stainmil.features.backbones import build_backbone, state_dict_hash
from tests.features.legacy_densenet import DenseNet121, remap_legacy_keys


def _legacy(state):
    """Rename keys the way torchvision's published file names them (norm1 -> norm.1, …)."""
    out = {}
    for key, value in state.items():
        for name in ("norm1", "relu1", "conv1", "norm2", "relu2", "conv2"):
            key = key.replace(f".{name}.", f".{name[:-1]}.{name[-1]}.")
        out[key] = value
    return out


def test_torchvision_densenet_gives_the_old_implementations_features(tmp_path):
    """Same state dict -> same features (max |delta| <= 1e-5) and the same weights hash: old stores stay valid."""
    torch.manual_seed(3)
    old = DenseNet121().eval()
    for m in old.modules():  # non-trivial BatchNorm statistics, as trained weights have
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    torch.save(old.state_dict(), tmp_path / "dn.pth")
    new = build_backbone(FeaturesConfig(weights=str(tmp_path / "dn.pth")))
    assert new.weights_hash == state_dict_hash(old)
    x = torch.randn(4, 3, 96, 96)
    with torch.inference_mode():
        assert (new.module(x) - old(x)).abs().max() <= 1e-5
    assert sum(p.numel() for p in new.module.parameters()) == 7_978_856  # torchvision's densenet121


def test_legacy_checkpoint_file_loads_unchanged(tmp_path):
    source = DenseNet121()
    legacy = _legacy(source.state_dict())
    assert "features.denseblock1.denselayer1.norm.1.weight" in legacy
    assert remap_legacy_keys(legacy).keys() == source.state_dict().keys()
    torch.save(legacy, tmp_path / "densenet121-legacy.pth")
    backbone = build_backbone(FeaturesConfig(weights=str(tmp_path / "densenet121-legacy.pth")))
    assert backbone.weights_hash == state_dict_hash(source)
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        assert torch.allclose(backbone.module(x), source.eval()(x), atol=1e-5)


def test_random_weights_are_seeded():
    a = build_backbone(FeaturesConfig(weights="random", seed=1))
    b = build_backbone(FeaturesConfig(weights="random", seed=1))
    c = build_backbone(FeaturesConfig(weights="random", seed=2))
    assert a.weights_hash == b.weights_hash != c.weights_hash
    assert not any(p.requires_grad for p in a.module.parameters())


@pytest.mark.parametrize("weights", ["pretrained", "imagenet"])
def test_imagenet_offline_stops_with_instructions(monkeypatch, weights):
    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(backbones.torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(StoreError, match="densenet121-a639ec97.pth") as info:
        build_backbone(FeaturesConfig(weights=weights))
    assert "copy it to" in str(info.value)


def test_imagenet_weights_from_the_hub_cache(monkeypatch, tmp_path):
    """The documented offline route: the torchvision file copied into the torch hub cache is used."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    source = build_backbone(FeaturesConfig(weights="random", seed=5))
    (tmp_path / "checkpoints").mkdir()
    torch.save(source.module.net.state_dict(), tmp_path / "checkpoints" / "densenet121-a639ec97.pth")
    loaded = build_backbone(FeaturesConfig(weights="pretrained"))
    assert loaded.weights_id == "imagenet" and loaded.weights_hash == source.weights_hash


def test_wrong_weight_file_names_its_keys(tmp_path):
    torch.save({"not": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(StoreError, match="missing keys") as info:
        build_backbone(FeaturesConfig(weights=str(tmp_path / "other.pth")))
    assert "'not'" in str(info.value)
    (tmp_path / "broken.pth").write_bytes(b"\x80\x04 not a pickle")
    with pytest.raises(StoreError, match="could not read weights file"):
        build_backbone(FeaturesConfig(weights=str(tmp_path / "broken.pth")))
    with pytest.raises(ConfigError, match="not registered"):
        build_backbone(FeaturesConfig(backbone="vit_giant"))
    with pytest.raises(ConfigError, match="neither 'pretrained', 'random' nor an existing file"):
        build_backbone(FeaturesConfig(weights=str(tmp_path / "absent.pth")))


def test_backbone_from_a_user_file(tmp_path):
    (tmp_path / "enc.py").write_text(
        "import torch\n"
        "class Enc(torch.nn.Module):\n"
        "    out_dim = 3\n"
        "    def forward(self, x):\n"
        "        return x.mean((2, 3))\n"
        "def build(config):\n"
        "    return Enc()\n")
    backbone = build_backbone(FeaturesConfig(backbone=f"file:{tmp_path / 'enc.py'}:build"))
    assert backbone.out_dim == 3
    assert backbone.module(torch.ones(2, 3, 8, 8)).shape == (2, 3)
