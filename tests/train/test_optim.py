import math

import pytest
import torch

from stainmil.config import TrainConfig
from stainmil.train.optim import AdaptiveWeightDecay, adaptive_decay, build_optimizer


def test_adaptive_decay_update_by_hand():
    """SGD lr=0.1, lambda0=0.01, alpha=2: the update computed step by step on paper."""
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0, 3.0]))
    g = torch.tensor([0.1, -0.2, 0.6])
    mean = (0.1 + 0.2 + 0.6) / 3                                     # 0.3
    std = math.sqrt(((0.1 - mean) ** 2 + (0.2 - mean) ** 2 + (0.6 - mean) ** 2) / 3)
    expected = []
    for wi, gi in zip([1.0, 2.0, 3.0], [0.1, -0.2, 0.6]):
        decay = 0.01 * 2 / (1 + math.exp(-2 * (abs(gi) - mean) / std))
        expected.append(wi - 0.1 * (gi + decay * wi))
    optimizer = AdaptiveWeightDecay(torch.optim.SGD([w], lr=0.1), lambda0=0.01, alpha=2.0, decoupled=False)
    w.grad = g.clone()
    optimizer.step()
    assert torch.allclose(w.data, torch.tensor(expected), atol=1e-7)


def test_decoupled_variant_decays_after_the_step():
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    g = torch.tensor([0.5, 0.5])  # equal magnitudes: g_hat = 0, decay = lambda0 everywhere
    optimizer = AdaptiveWeightDecay(torch.optim.SGD([w], lr=0.1), lambda0=0.05, alpha=1.0, decoupled=True)
    w.grad = g.clone()
    optimizer.step()
    stepped = torch.tensor([1.0, 2.0]) - 0.1 * g
    assert torch.allclose(w.data, stepped - 0.1 * 0.05 * stepped)


def test_larger_gradient_means_larger_decay_and_scalar_gets_lambda0():
    decay = adaptive_decay(torch.tensor([0.01, 0.1, 1.0]), 0.1, 1.0)
    assert decay[0] < decay[1] < decay[2] and (decay < 0.2).all()
    assert adaptive_decay(torch.tensor([3.0]), 0.1, 1.0).item() == pytest.approx(0.1)


def test_build_optimizer_modes():
    model = torch.nn.Linear(3, 2)
    plain = build_optimizer(model, TrainConfig(weight_decay=0.1))
    assert isinstance(plain, torch.optim.Adam) and plain.param_groups[0]["weight_decay"] == 0.1
    adaptive = build_optimizer(model, TrainConfig(weight_decay=0.1, weight_decay_mode="adaptive"))
    assert isinstance(adaptive, AdaptiveWeightDecay) and adaptive.param_groups[0]["weight_decay"] == 0.0
