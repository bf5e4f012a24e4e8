"""CLAM (Lu et al. 2021, "Data-efficient and weakly supervised computational pathology on whole-slide images").

    patches (P, D) --Linear(512)->ReLU->Dropout--> h (P, 512)
      --gated attention (hidden 256): one branch (CLAM-SB) or one per class (CLAM-MB)--> a (P,) / (P, C)
      --sum a h--> case (B, 512) / (B, C, 512) --bag classifier(s)--> logits (B, C)

Instance-level clustering (the paper's auxiliary task): for each labelled training case, the
``k_sample`` most and least attended patches (attention branch of the true class) are pseudo-labelled
positive / negative for that class's binary instance classifier; with more than two classes (the
paper's "subtyping") the most attended patches of every other class's branch are pseudo-labelled
negative for that class too, and the loss is averaged over classes. Loss: smooth top-1 SVM (Berrada et
al. 2018; tau = alpha = 1), or cross-entropy. The paper's total ``0.7 bag + 0.3 instance`` is given to the
trainer as ``bag + (0.3 / 0.7) instance`` (the same gradients up to a constant factor, which Adam ignores;
weight decay is then relatively 1/0.7 weaker than in the reference).
A case with fewer than 2 patches adds no instance loss; ``k`` shrinks to half the case's patches.

Reported patch attention: CLAM-SB its one branch; CLAM-MB the branch of the predicted class (as CLAM's own
heatmaps do).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from stainmil.config import ModelConfig, setting
from stainmil.errors import ConfigError
from stainmil.model.attention import GatedAttention
from stainmil.model.base import projector
from stainmil.model.flat import CasePooling, FlatMIL, labelled
from stainmil.model.registry import register_architecture
from stainmil.model.segment import group_ranks, segment_softmax, segment_sum


def smooth_top1_svm(logits: torch.Tensor, targets: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """Smooth top-1 SVM loss per row (tau = 1): logsumexp(s + alpha [j != y]) - s_y. (N, K), (N,) -> (N,)."""
    margin = alpha * (1 - F.one_hot(targets, logits.shape[-1]).to(logits.dtype))
    return torch.logsumexp(logits + margin, dim=-1) - logits.gather(1, targets[:, None]).squeeze(1)


@dataclass(frozen=True)
class CLAMOptions:
    """``model.options.clam_sb`` / ``clam_mb``: the paper's (and reference code's) recipe by default."""

    k_sample: int = setting("Patches taken from each end of the attention ranking for the instance clustering "
                            "loss (Lu et al. 2021: 8).", default=8)
    bag_weight: float = setting("Weight of the bag loss; the instance loss gets 1 - this (paper: 0.7).", default=0.7)
    instance_loss: Literal["svm", "ce"] = setting("Instance loss, smooth top-1 SVM (the paper's) or cross-entropy.",
                                                  default="svm")
    attention_dim: int = setting("Hidden size of its gated attention (paper, 'small': 256).", default=256)

    def __post_init__(self) -> None:
        if not 0 < self.bag_weight <= 1:
            raise ConfigError(f"model.options.clam_*.bag_weight must be in (0, 1], got {self.bag_weight}.")
        if self.k_sample < 1 or self.attention_dim < 1:
            raise ConfigError(f"model.options.clam_*.k_sample and attention_dim must be at least 1, got "
                              f"{self.k_sample}, {self.attention_dim}.")


@register_architecture("clam_mb", reference="Lu et al. 2021: a branch per class, clustering", options=CLAMOptions,
                       multi_branch=True)
@register_architecture("clam_sb", reference="Lu et al. 2021: one branch, instance clustering", options=CLAMOptions)
class CLAM(FlatMIL):
    def __init__(self, in_dim: int, config: ModelConfig, stains: list[str], options: CLAMOptions,
                 multi_branch: bool = False) -> None:
        super().__init__(in_dim, config, stains)
        b, c = options, config.n_classes
        self.multi_branch = multi_branch
        self.k_sample, self.bag_weight = b.k_sample, b.bag_weight
        self.instance_loss = smooth_top1_svm if b.instance_loss == "svm" else (
            lambda logits, targets: F.cross_entropy(logits, targets, reduction="none"))
        self.projector = projector(in_dim, config)
        self.attention = GatedAttention(config.embed_dim, b.attention_dim, config.dropout,
                                        outputs=c if multi_branch else 1)
        if multi_branch:  # one bag classifier per class, on that class's pooled embedding
            self.classifiers = nn.ModuleList([nn.Linear(config.embed_dim, 1) for _ in range(c)])
        else:
            self.classifier = nn.Linear(config.embed_dim, c)
        self.instance_classifiers = nn.ModuleList([nn.Linear(config.embed_dim, 2) for _ in range(c)])

    def _bag_logits(self, case: torch.Tensor) -> torch.Tensor:
        """(B, E) (SB) or (B, C, E) (MB) -> (B, C)."""
        if not self.multi_branch:
            return self.classifier(case)
        return torch.cat([clf(case[:, k]) for k, clf in enumerate(self.classifiers)], dim=1)

    def pool_cases(self, x, patch_case, n_cases, labels, context) -> CasePooling:
        h = self.projector(x)                                                  # (P, E)
        scores = self.attention.score(h)                                       # (P,) SB | (P, C) MB
        branches = scores[:, None] if scores.dim() == 1 else scores            # (P, K)
        weights = torch.stack([segment_softmax(branches[:, k], patch_case, n_cases)
                               for k in range(branches.shape[1])], dim=1)      # (P, K)
        pooled = torch.stack([segment_sum(weights[:, k, None] * h, patch_case, n_cases)
                              for k in range(branches.shape[1])], dim=1)       # (B, K, E)
        logits = self._bag_logits(pooled[:, 0] if not self.multi_branch else pooled)
        shown = logits.argmax(1)[patch_case] if self.multi_branch else torch.zeros_like(patch_case)  # (P,)
        aux = {}
        use = labelled(labels, self.training)
        if bool(use.any()):  # 0.7 bag + 0.3 instance as bag + (0.3 / 0.7) instance (see the module docstring)
            aux["clam_instance_loss"] = (1 - self.bag_weight) / self.bag_weight * self._instance_loss(
                h, branches, patch_case, n_cases, labels, use)
        case_embedding = pooled[:, 0] if not self.multi_branch else pooled.gather(
            1, logits.argmax(1)[:, None, None].expand(-1, 1, pooled.shape[2])).squeeze(1)
        return CasePooling(logits, case_embedding, h, branches.gather(1, shown[:, None]).squeeze(1),
                           attention_weights=weights.gather(1, shown[:, None]).squeeze(1), auxiliary_losses=aux)

    def _instance_loss(self, h, branches, patch_case, n_cases, labels, use) -> torch.Tensor:
        """Mean over labelled cases of the instance clustering loss (module docstring)."""
        n_classes = len(self.instance_classifiers)
        subtyping = n_classes > 2
        per_case = h.new_zeros(n_cases)
        for k in range(n_classes):
            branch = branches[:, k if self.multi_branch else 0]
            rank, sizes = group_ranks(branch, patch_case, n_cases)     # 0 = most attended
            k_case = torch.clamp(sizes // 2, max=self.k_sample)                # (B,)
            top = rank < k_case[patch_case]
            bottom = (sizes[patch_case] - 1 - rank) < k_case[patch_case]
            in_class = use & (labels == k)                                      # cases whose class is k
            out_class = use & (labels != k) if subtyping else torch.zeros_like(use)
            rows_in = (top | bottom) & in_class[patch_case]
            rows_out = top & out_class[patch_case]
            rows = rows_in | rows_out
            if not bool(rows.any()):
                continue
            targets = (top & rows_in).long()[rows]                             # 1: top of the true class
            losses = self.instance_loss(self.instance_classifiers[k](h[rows]), targets)
            case_of = patch_case[rows]
            counts = torch.bincount(case_of, minlength=n_cases).clamp_min(1).to(h.dtype)
            per_case = per_case + torch.zeros_like(per_case).index_add(0, case_of, losses) / counts
        if subtyping:
            per_case = per_case / n_classes
        counted = use & (torch.bincount(patch_case, minlength=n_cases) >= 2)   # a 1-patch case has no top/bottom
        return per_case[counted].mean() if bool(counted.any()) else per_case.sum() * 0.0

    def instance_logits(self, patch_embeddings: torch.Tensor) -> torch.Tensor:
        """One patch: every branch's attention is 1 on it, so each pooled embedding is the patch's own."""
        if not self.multi_branch:
            return self.classifier(patch_embeddings)
        return torch.cat([clf(patch_embeddings) for clf in self.classifiers], dim=1)
