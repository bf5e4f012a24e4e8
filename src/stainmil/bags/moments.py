"""Feature statistics over rows that arrive in chunks (the trainer's per-dimension standardisation)."""

from __future__ import annotations

import torch


class RunningMoments:
    """Mean and unbiased std (D,) over rows added in chunks (Chan et al.'s pairwise update, float64)."""

    def __init__(self, dim: int) -> None:
        self.n = 0
        self.mean = torch.zeros(dim, dtype=torch.float64)
        self.m2 = torch.zeros(dim, dtype=torch.float64)

    def add(self, chunk: torch.Tensor) -> None:
        """``chunk``: (n, D) rows."""
        if not len(chunk):
            return
        x = chunk.double()
        n_b = len(x)
        mean_b = x.mean(0)
        m2_b = ((x - mean_b) ** 2).sum(0)
        n = self.n + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n_b / n)
        self.m2 = self.m2 + m2_b + delta ** 2 * (self.n * n_b / n)
        self.n = n

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.mean, (self.m2 / max(self.n - 1, 1)).sqrt()
