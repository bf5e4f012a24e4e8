import numpy as np
import torch
import torch.nn.functional as F

from stainmil.config import TrainConfig
from stainmil.model.output import MILOutput
from stainmil.train.losses import build_loss, class_weights, weighted_mean
from stainmil.train.trainer import epoch_order
from tests.model.test_hierarchical import random_bags


def _output(logits):
    empty = torch.zeros(0)
    return MILOutput(logits, *[empty] * 7, torch.zeros(0, 1), torch.zeros(len(logits), 1))


def test_focal_with_gamma_zero_is_weighted_ce_and_down_weights_easy_cases():
    logits = torch.tensor([[2.0, -1.0], [0.1, 0.3], [-3.0, 3.0]])
    labels = torch.tensor([0, 0, 1])
    weights = torch.tensor([2.0, 0.5])
    focal0 = build_loss(TrainConfig(loss="focal", focal_gamma=0.0))(_output(logits), labels, weights)
    ce = build_loss(TrainConfig(loss="ce"))(_output(logits), labels, weights)
    assert torch.allclose(focal0, ce)
    focal2 = build_loss(TrainConfig(loss="focal", focal_gamma=2.0))(_output(logits), labels, weights)
    assert (focal2 < ce).all()
    assert torch.isclose(weighted_mean(ce, labels, weights), F.cross_entropy(logits, labels, weight=weights))


def test_label_smoothing_matches_torch():
    logits = torch.randn(5, 2)
    labels = torch.tensor([0, 1, 1, 0, 1])
    loss = build_loss(TrainConfig(loss="label_smoothing_ce", label_smoothing=0.2))(_output(logits), labels, None)
    assert torch.isclose(loss.mean(), F.cross_entropy(logits, labels, label_smoothing=0.2))


def test_auto_class_weights_are_inverse_frequency():
    w = class_weights(TrainConfig(), np.array([0, 1, 1, 1]), 2)
    assert torch.allclose(w, torch.tensor([2.0, 2 / 3]))


def test_balanced_sampler_draws_classes_evenly():
    bags = random_bags(n_cases=9)  # labels c % 2: 4 of class 0 (even ids), 5 of class 1
    cases = bags.case_ids[:7]       # 3 vs 4
    rng = np.random.default_rng(0)
    drawn = [bags.case_label(c) for _ in range(300) for c in epoch_order(cases, bags, "balanced", rng)]
    assert abs(np.mean(drawn) - 0.5) < 0.03
    assert sorted(epoch_order(cases, bags, "sequential", rng)) == sorted(cases)
