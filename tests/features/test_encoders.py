"""The encoder registry: every entry built on the meta device against its model card; real forwards of the
small ones; the staged forward equals the library's own; every weight route round-trips a written state dict."""

import pytest
import torch
from safetensors.torch import save_file

from stainmil.config import FeaturesConfig
from stainmil.errors import ConfigError, StoreError
from stainmil.features.backbones import build_backbone
from stainmil.features.encoder_modules import build_encoder_module
from stainmil.features.encoders import ENCODERS, check_image_size, encoder_spec, encoder_table_markdown

TRAINABLE_TIMM = {"uni_v1", "virchow2", "kaiko_vits16", "lunit_vits8"}


@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_every_encoder_matches_its_model_card_on_the_meta_device(name):
    spec = ENCODERS[name]
    with torch.device("meta"):
        module = build_encoder_module(spec, spec.input_size)
    params = sum(p.numel() for p in module.parameters()) / 1e6
    assert params == pytest.approx(spec.params_m, rel=0.02), f"{name}: {params:.1f} M parameters"
    assert module.out_dim == spec.dim
    with torch.device("meta"):
        out = module(torch.empty(2, 3, spec.input_size, spec.input_size))
    assert out.shape == (2, spec.dim)
    assert module.block_count >= 3


@pytest.mark.parametrize("name", ["densenet121", "resnet50_trunc", "kaiko_vits16"])
def test_small_encoders_run_a_real_forward(name):
    backbone = build_backbone(FeaturesConfig(backbone=name, weights="random", image_size=64))
    with torch.inference_mode():
        out = backbone.module(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, ENCODERS[name].dim) and torch.isfinite(out).all()
    assert out.std() > 0


@pytest.mark.parametrize("name, size", [("kaiko_vits16", 64), ("h0_mini", 56)])
def test_staged_vit_forward_equals_timms_own(name, size):
    module = build_backbone(FeaturesConfig(backbone=name, weights="random", image_size=size)).module
    x = torch.randn(2, 3, size, size)
    with torch.inference_mode():
        assert torch.allclose(module(x), module.net(x), atol=1e-5)


def test_cls_plus_mean_pooling_is_virchows():
    """Virchow: class token ++ mean of the patch tokens (registers excluded) of the normed output."""
    spec = encoder_spec("virchow2")
    small = type(spec)(**{**spec.__dict__, "architecture": "vit_small_patch14_reg4_dinov2", "dim": 768,
                          "kwargs": {k: v for k, v in spec.kwargs.items() if k != "mlp_ratio"}})
    module = build_encoder_module(small, 56).eval()
    x = torch.randn(2, 3, 56, 56)
    with torch.inference_mode():
        tokens = module.net.forward_features(x)  # (B, 1 + 4 + 16, 384), normed
        expected = torch.cat([tokens[:, 0], tokens[:, 5:].mean(1)], -1)
        assert torch.allclose(module(x), expected, atol=1e-5)


def test_phikon_v2_staged_forward_equals_transformers():
    spec = encoder_spec("phikon_v2")
    small = type(spec)(**{**spec.__dict__, "kwargs": {**spec.kwargs, "hidden_size": 64, "num_hidden_layers": 2,
                                                      "num_attention_heads": 2, "intermediate_size": 128}})
    module = build_encoder_module(small, 32).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        assert torch.allclose(module(x), module.net(pixel_values=x).last_hidden_state[:, 0], atol=1e-5)


def _small_vit_state(tmp_path):
    source = build_backbone(FeaturesConfig(backbone="kaiko_vits16", weights="random", seed=7, image_size=32))
    return source, source.module.net.state_dict()


def test_weight_files_round_trip_pth_bin_safetensors(tmp_path):
    source, state = _small_vit_state(tmp_path)
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        expected = source.module(x)
    torch.save(state, tmp_path / "w.pth")
    torch.save({"model": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "w.bin")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "w.safetensors"))
    for file in ("w.pth", "w.bin", "w.safetensors"):
        loaded = build_backbone(FeaturesConfig(backbone="kaiko_vits16", weights=str(tmp_path / file), image_size=32))
        assert loaded.weights_hash == source.weights_hash
        with torch.inference_mode():
            assert torch.equal(loaded.module(x), expected)


def test_uni_weights_file_in_the_real_format(tmp_path):
    """UNI's pytorch_model.bin is a plain timm state dict of vit_large_patch16_224 (init_values=1e-5)."""
    with torch.device("meta"):
        keys = build_encoder_module(encoder_spec("uni_v1"), 224).net.state_dict().keys()
    assert "blocks.23.ls2.gamma" in keys and "pos_embed" in keys and "cls_token" in keys
    wrong = {k: torch.zeros(1) for k in ["cls_token", "pos_embed", "not.a.key"]}
    torch.save(wrong, tmp_path / "uni.bin")
    with pytest.raises(StoreError, match="missing keys.*unexpected.*not.a.key"):
        build_backbone(FeaturesConfig(backbone="uni_v1", weights=str(tmp_path / "uni.bin")))


def test_pretrained_from_an_offline_hugging_face_cache(tmp_path, monkeypatch):
    """weights=pretrained with HF_HUB_OFFLINE=1 reads the repo's file from a populated HF cache."""
    source, state = _small_vit_state(tmp_path)
    spec = encoder_spec("kaiko_vits16")
    repo = tmp_path / "hub" / f"models--{spec.hub_id.replace('/', '--')}"
    revision = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(snapshot / spec.weights_file))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    loaded = build_backbone(FeaturesConfig(backbone="kaiko_vits16", weights="pretrained", image_size=32))
    assert loaded.weights_id == f"hf:{spec.hub_id}@{revision}"
    assert loaded.weights_hash == source.weights_hash
    # a gated model that is not cached: one sentence saying what to do
    with pytest.raises(StoreError, match="accept the terms at https://huggingface.co/MahmoodLab/UNI.*HF_TOKEN"):
        build_backbone(FeaturesConfig(backbone="uni_v1", weights="pretrained"))


def test_vit_input_size_must_fit_its_tokens():
    check_image_size(encoder_spec("uni_v1"), 224)
    with pytest.raises(ConfigError, match="multiple of uni_v1's 16-px tokens; set it to 48 or 64"):
        check_image_size(encoder_spec("uni_v1"), 50)
    with pytest.raises(ConfigError, match="applies to torchvision encoders"):
        build_backbone(FeaturesConfig(backbone="kaiko_vits16", weights="imagenet", image_size=32))


def test_table_lists_every_encoder_with_its_dimension():
    table = encoder_table_markdown()
    for name, spec in ENCODERS.items():
        assert f"| {name} |" in table and f"| {spec.dim} |" in table
