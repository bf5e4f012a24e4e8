import pytest
import torch

from stainmil.config import FeaturesConfig
from stainmil.errors import ConfigError, StoreError
from stainmil.features import backbones
from stainmil.features.backbones import build_backbone, state_dict_hash
from stainmil.features.densenet import DenseNet121, remap_legacy_keys


def test_architecture_matches_torchvision_densenet121():
    model = DenseNet121()
    assert sum(p.numel() for p in model.parameters()) == 7_978_856  # torchvision's densenet121
    keys = model.state_dict().keys()
    assert len(keys) == 727
    assert "features.denseblock1.denselayer1.norm1.weight" in keys
    assert "features.transition3.conv.weight" in keys and "classifier.weight" in keys
    with torch.inference_mode():
        assert model.eval()(torch.randn(2, 3, 64, 64)).shape == (2, 1024)


def _legacy(state):
    """Rename keys the way torchvision's published file names them (norm1 -> norm.1, …)."""
    out = {}
    for key, value in state.items():
        for name in ("norm1", "relu1", "conv1", "norm2", "relu2", "conv2"):
            key = key.replace(f".{name}.", f".{name[:-1]}.{name[-1]}.")
        out[key] = value
    return out


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
        assert torch.allclose(backbone.module(x), source.eval()(x))


def test_random_weights_are_seeded():
    a = build_backbone(FeaturesConfig(weights="random", seed=1))
    b = build_backbone(FeaturesConfig(weights="random", seed=1))
    c = build_backbone(FeaturesConfig(weights="random", seed=2))
    assert a.weights_hash == b.weights_hash != c.weights_hash
    assert not any(p.requires_grad for p in a.module.parameters())


def test_imagenet_offline_stops_with_instructions(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(backbones.torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(StoreError, match="densenet121-a639ec97.pth") as info:
        build_backbone(FeaturesConfig(weights="imagenet"))
    assert "copy it to" in str(info.value)


def test_wrong_weight_file_and_unknown_backbone(tmp_path):
    torch.save({"not": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(StoreError, match="missing keys"):
        build_backbone(FeaturesConfig(weights=str(tmp_path / "other.pth")))
    with pytest.raises(ConfigError, match="not registered"):
        build_backbone(FeaturesConfig(backbone="vit_giant"))


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
