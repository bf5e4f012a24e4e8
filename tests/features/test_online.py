"""Online encoder: same features as the store when frozen, a trainable tail, checkpointing, refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stainmil.data.cohort import load_manifest
from stainmil.errors import ConfigError
from stainmil.features.backbones import build_module
from stainmil.features.encoders import encoder_spec
from stainmil.features.online import OnlineEncoder, split_backbone
from stainmil.features.store import load_features


def _online(prepared, **features):
    """The features section of an online run with ``features`` set."""
    return prepared.with_overrides({"features.mode": "online",
                                    **{f"features.{key}": value for key, value in features.items()}}).features


def test_frozen_online_features_are_the_stores_features(prepared):
    manifest = load_manifest(prepared).iloc[:40]
    encoder = OnlineEncoder(_online(prepared), torch.device("cpu"))
    with torch.inference_mode():
        online = encoder.encode(list(manifest["path"]), augment=False, rng=None).numpy()
    stored = load_features(prepared.paths.store, load_manifest(prepared))[:40].astype(np.float32)
    assert np.allclose(online, stored, rtol=1e-2, atol=1e-3)
    assert encoder.trainable_parameters() == []
    augmented = encoder.encode(list(manifest["path"]), augment=True, rng=np.random.default_rng(0))
    assert not torch.allclose(augmented, torch.from_numpy(online), atol=1e-3)


def test_tail_start_names_the_dense_blocks():
    model = build_module(encoder_spec("densenet121"), 64)
    names = list(model.net.features._modules)
    assert names[model.tail_start(1)] == "denseblock4"
    assert names[model.tail_start(2)] == "denseblock3"
    assert names[model.tail_start(4)] == "denseblock1"
    assert model.tail_start(0) == len(names)


def test_only_the_last_blocks_learn(prepared):
    encoder = OnlineEncoder(_online(prepared, trainable_blocks=1), torch.device("cpu"))
    tail = encoder.trainable_parameters()
    assert tail and all(p.requires_grad for p in tail)
    assert sum(p.numel() for p in tail) < sum(p.numel() for p in encoder.module.parameters())
    assert all(k.startswith(("net.features.denseblock4.", "net.features.norm5.")) for k in encoder.tail_state())
    stem_before = encoder.module.net.features.conv0.weight.clone()
    tail_before = [p.detach().clone() for p in tail]
    optimizer = torch.optim.SGD(tail, lr=0.1)
    paths = list(load_manifest(prepared)["path"][:16])
    encoder.encode(paths, augment=True, rng=np.random.default_rng(0)).pow(2).mean().backward()
    optimizer.step()
    assert torch.equal(encoder.module.net.features.conv0.weight, stem_before)
    assert encoder.module.net.features.conv0.weight.grad is None
    assert any(not torch.equal(p, b) for p, b in zip(tail, tail_before))


def test_gradient_checkpointing_gives_the_same_gradients(prepared):
    paths = list(load_manifest(prepared)["path"][:8])
    grads = []
    for checkpointing in (False, True):
        encoder = OnlineEncoder(_online(prepared, trainable_blocks=2, gradient_checkpointing=checkpointing),
                                torch.device("cpu"))
        encoder.encode(paths, augment=False, rng=None).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in encoder.trainable_parameters()]))
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_fine_tuning_a_backbone_without_blocks_is_refused():
    with pytest.raises(ConfigError, match="trainable_blocks"):
        split_backbone(torch.nn.Linear(3, 3), 1)
    with pytest.raises(ConfigError, match="has 4 blocks; choose 0..4"):
        split_backbone(build_module(encoder_spec("densenet121"), 64), 5)


def test_vit_tail_is_its_last_transformer_blocks_and_final_norm():
    module = build_module(encoder_spec("kaiko_vits16"), 32)
    stem, tail, trained = split_backbone(module, 2)
    assert list(tail) == list(module.net.blocks[-2:])
    assert module.net.norm in trained
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        assert torch.allclose(module.finish(tail(stem(x))), module(x))


def test_online_augmentation_can_be_switched_off(prepared):
    paths = list(load_manifest(prepared)["path"][:8])
    encoder = OnlineEncoder(_online(prepared, online_augment=False), torch.device("cpu"))
    with torch.inference_mode():
        plain = encoder.encode(paths, augment=False, rng=None)
        assert torch.equal(encoder.encode(paths, augment=True, rng=np.random.default_rng(0)), plain)
