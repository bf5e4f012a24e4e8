"""The gradient check every-parameter tests share."""

from __future__ import annotations

import torch
from torch import nn

from stainmil.model.attention import ATTENTION_POOLS


def score_biases(model: nn.Module) -> set[str]:
    """Names of the biases added to every score of an attention pool (the last linear layer of each pool).

    A softmax within a group is unchanged when one constant is added to all its scores, so these biases move
    nothing: their gradient is 0 up to rounding (about 1e-9 to 1e-6 here), whatever the seed."""
    names = set()
    for prefix, module in model.named_modules():
        if isinstance(module, tuple(ATTENTION_POOLS.values())):
            last = [name for name, m in module.named_modules() if isinstance(m, nn.Linear)][-1]
            names.add(f"{prefix}.{last}.bias".lstrip("."))
    return names


def assert_every_parameter_learns(model: nn.Module) -> None:
    """Every parameter has a finite gradient, non-zero — except the score biases, whose gradient is ~0."""
    shift_only = score_biases(model)
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        if name in shift_only:
            assert p.grad.abs().max() < 1e-4, (name, p.grad)
        else:
            assert p.grad.abs().sum() > 0, name
