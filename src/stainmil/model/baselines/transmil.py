"""TransMIL (Shao et al. 2021, "Transformer based correlated MIL").

    patches (N, D) --Linear(512)->ReLU--> (N, 512) --pad to a square H x H by repeating the first patches-->
      [CLS] + tokens --TransLayer--> PPEG (depth-wise 7/5/3 convolutions on the H x H grid) --TransLayer-->
      LayerNorm --> CLS token --Linear--> logits (C,)

TransLayer: x + MultiheadAttention(LayerNorm(x)) (8 heads of 64, attention dropout 0.1). Deviation from the
paper: exact attention (PyTorch's scaled-dot-product kernels, memory linear in the sequence on CPU and GPU)
instead of its Nyström approximation, which exists to save memory and changes the result. Each case is its
own sequence (no padding across cases). TransMIL has no patch attention to report: the CLS token's
attention is not a distribution over the case's patches (the padding copies and two layers mix them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from stainmil.config import ModelConfig, setting
from stainmil.errors import ConfigError
from stainmil.model.flat import CasePooling, FlatMIL
from stainmil.model.registry import register_architecture


class TransLayer(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attention = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, E) -> (B, L, E)."""
        h = self.norm(x)
        return x + self.attention(h, h, h, need_weights=False)[0]


class PPEG(nn.Module):
    """Pyramid position encoding generator: depth-wise convolutions over the tokens laid out on a square."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv2d(dim, dim, k, 1, k // 2, groups=dim) for k in (7, 5, 3)])

    def forward(self, x: torch.Tensor, side: int) -> torch.Tensor:
        """(B, 1 + side^2, E) -> same; the CLS token passes unchanged."""
        cls, tokens = x[:, :1], x[:, 1:]
        grid = tokens.transpose(1, 2).reshape(len(x), -1, side, side)          # (B, E, H, W)
        grid = grid + sum(conv(grid) for conv in self.convs)
        return torch.cat([cls, grid.flatten(2).transpose(1, 2)], dim=1)


@dataclass(frozen=True)
class TransMILOptions:
    """``model.options.transmil``."""

    heads: int = setting("Attention heads of its two layers (Shao et al. 2021: 8).", default=8)
    dropout: float = setting("Attention dropout (paper: 0.1).", default=0.1)

    def __post_init__(self) -> None:
        if self.heads < 1 or not 0 <= self.dropout < 1:
            raise ConfigError(f"model.options.transmil: heads must be at least 1 and dropout in [0, 1), got "
                              f"{self.heads}, {self.dropout}.")


@register_architecture("transmil", reference="Shao et al. 2021: transformer with PPEG", options=TransMILOptions,
                       patch_attention=False)
class TransMIL(FlatMIL):
    def __init__(self, in_dim: int, config: ModelConfig, stains: list[str], options: TransMILOptions) -> None:
        super().__init__(in_dim, config, stains)
        e, b = config.embed_dim, options
        if e % b.heads:
            raise ConfigError(f"transmil: model.embed_dim {e} must be divisible by model.options.transmil.heads "
                              f"{b.heads}.")
        self.fc = nn.Sequential(nn.Linear(in_dim, e), nn.ReLU())
        self.cls_token = nn.Parameter(torch.randn(1, 1, e))
        self.layer1 = TransLayer(e, b.heads, b.dropout)
        self.ppeg = PPEG(e)
        self.layer2 = TransLayer(e, b.heads, b.dropout)
        self.norm = nn.LayerNorm(e)
        self.classifier = nn.Linear(e, config.n_classes)

    def encode(self, h: torch.Tensor) -> torch.Tensor:
        """(B, N, E) bags of the same size -> (B, E) CLS embeddings."""
        n = h.shape[1]
        side = math.ceil(math.sqrt(n))
        extra = side * side - n
        if extra:                                                              # square grid: repeat the first rows
            h = torch.cat([h, h[:, torch.arange(extra, device=h.device) % n]], dim=1)
        x = torch.cat([self.cls_token.expand(len(h), -1, -1), h], dim=1)       # (B, 1 + H*W, E)
        x = self.layer2(self.ppeg(self.layer1(x), side))
        return self.norm(x)[:, 0]

    def pool_cases(self, x, patch_case, n_cases, labels, context) -> CasePooling:
        h = self.fc(x)                                                         # (P, E)
        cases = torch.stack([self.encode(h[patch_case == b][None])[0] for b in range(n_cases)])  # (B, E)
        return CasePooling(self.classifier(cases), cases, h, None)

    def instance_logits(self, patch_embeddings: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
        """One patch per bag, in chunks: (P, E) -> (P, C)."""
        return torch.cat([self.classifier(self.encode(part[:, None])) for part in patch_embeddings.split(chunk)])
