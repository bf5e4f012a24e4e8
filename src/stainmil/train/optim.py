"""Optimizers chosen by config, including adaptive weight decay (AdaDecay).

AdaDecay (Nakamura & Hong 2019, IEEE Access, doi 10.1109/ACCESS.2019.2937139): the decay of each
weight follows the magnitude of its gradient, normalised within its layer (here: within each
parameter tensor, the unit torch gives a "layer"), through a sigmoid::

    a = |g|;  g_hat = (a - mean(a)) / std(a)        (population std; g_hat = 0 for one-element tensors)
    decay = lambda0 * 2 / (1 + exp(-alpha * g_hat)) (in (0, 2 lambda0); lambda0 at the layer mean)
    g <- g + decay * w                              (coupled, before the optimizer step), or
    w <- w - lr * decay * w                         (decoupled, after the step, AdamW-style)

Weights whose gradient is large (still learning, far from the data) decay more; weights that have
converged keep their size. The paper's abstract states the per-layer normalisation and the sigmoid
mapping; the constants follow the formula above (lambda0 = ``train.weight_decay``,
alpha = ``train.adaptive_decay_alpha``) — the full text could not be consulted offline.
"""

from __future__ import annotations

import torch
from torch import nn

from stainmil.config import TrainConfig


def adaptive_decay(grad: torch.Tensor, lambda0: float, alpha: float) -> torch.Tensor:
    """Per-element decay rate for one parameter tensor from its gradient (same shape)."""
    magnitude = grad.abs()
    if magnitude.numel() < 2:
        normalised = torch.zeros_like(magnitude)
    else:
        normalised = (magnitude - magnitude.mean()) / (magnitude.std(unbiased=False) + 1e-12)
    return lambda0 * 2.0 * torch.sigmoid(alpha * normalised)


class AdaptiveWeightDecay:
    """Wraps an optimizer (built without weight decay) and applies AdaDecay around its step."""

    def __init__(self, optimizer: torch.optim.Optimizer, lambda0: float, alpha: float, decoupled: bool) -> None:
        self.optimizer = optimizer
        self.lambda0, self.alpha, self.decoupled = lambda0, alpha, decoupled

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self) -> None:
        decays = []
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                decay = adaptive_decay(p.grad, self.lambda0, self.alpha)
                if self.decoupled:
                    decays.append((p, decay, group["lr"]))
                else:
                    p.grad.add_(decay * p)
        self.optimizer.step()
        for p, decay, lr in decays:
            p.sub_(lr * decay * p)

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)


OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}


def build_optimizer(model: nn.Module, config: TrainConfig, extra_groups: list[dict] | None = None,
                    fused: bool = False):
    """The configured optimizer; with ``weight_decay_mode: adaptive`` wrapped in AdaDecay.

    ``extra_groups``: more parameter groups with their own settings (e.g. a fine-tuned backbone's lr).
    ``fused``: Adam/AdamW take torch's fused kernel (the architecture's ``fused_optimizer``; SGD ignores it).
    """
    cls = OPTIMIZERS[config.optimizer]
    groups = [{"params": list(model.parameters())}, *(extra_groups or [])]
    kernel = {"fused": True} if fused and config.optimizer in ("adam", "adamw") else {}
    decay = 0.0 if config.weight_decay_mode == "adaptive" else config.weight_decay
    try:
        optimizer = cls(groups, lr=config.lr, weight_decay=decay, **kernel)
    except RuntimeError:  # a torch without the fused kernel for these parameters' device (CPU before torch 2.4)
        optimizer = cls(groups, lr=config.lr, weight_decay=decay)
    if config.weight_decay_mode == "adaptive":
        return AdaptiveWeightDecay(optimizer, config.weight_decay, config.adaptive_decay_alpha,
                                   config.decoupled_weight_decay)
    return optimizer
