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


@pytest.mark.parametrize("mode", ["constant", "adaptive"])
def test_a_fused_optimizer_takes_the_same_steps_to_rounding(mode):
    """An architecture with fused_optimizer (BioX-CPath's 47 M parameters) steps Adam with torch's fused kernel:
    the same update as the per-tensor step, to float rounding; SGD has no such switch and is left as it is."""
    from stainmil.model.registry import architecture

    assert architecture("biox_cpath").fused_optimizer and not architecture("mustang").fused_optimizer
    torch.manual_seed(0)
    nets = [torch.nn.Linear(64, 32) for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    start = [p.detach().clone() for p in nets[0].parameters()]
    config = TrainConfig(weight_decay_mode=mode, lr=1e-2)
    optimizers = [build_optimizer(net, config, fused=fused) for net, fused in zip(nets, (False, True))]
    inner = [getattr(o, "optimizer", o) for o in optimizers]
    assert [o.defaults.get("fused") for o in inner] == [None, True]
    for step in range(5):
        x = torch.randn(8, 64, generator=torch.Generator().manual_seed(step))
        for net, optimizer in zip(nets, optimizers):
            optimizer.zero_grad()
            net(x).square().mean().backward()
            optimizer.step()
    for a, b, before in zip(nets[0].parameters(), nets[1].parameters(), start):
        assert torch.allclose(a, b, atol=1e-6) and (a - before).abs().max() > 1e-3  # moved, and alike
    sgd = build_optimizer(nets[0], TrainConfig(optimizer="sgd"), fused=True)
    assert not sgd.defaults.get("fused")
