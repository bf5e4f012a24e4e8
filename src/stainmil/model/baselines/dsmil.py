"""DSMIL (Li, Li & Eliceiri 2021, "Dual-stream multiple instance learning network"), both streams.

On standardised patch features x (P, D), as the reference code (dsmil-wsi) runs on pre-extracted ones:

* max-instance stream: instance classifier  x -> (P, C); per case and class, the highest score is that
  class's logit (B, C), and its patch is the class's *critical instance*;
* bag stream: q = Linear->ReLU->Linear->Tanh (128), v = x; attention of each patch to each class's critical
  instance  softmax_case(<q_i, q_crit> / sqrt(128))  (P, C); bag embedding per class  sum a v  (B, C, D);
  a Conv1d(C, C, kernel D) over the classes gives the bag logits (B, C).

Training loss (paper): 0.5 CE(bag stream) + 0.5 CE(max-instance stream), given to the trainer as the case loss
on the bag stream plus the max-instance CE (the same up to a factor of 2, which Adam ignores but weight decay
does not). Prediction (paper): the mean of the two streams' probabilities; in eval mode ``logits`` are their log.
Deviation: with two classes the reference code trains one positive output with BCE; here both classes have a
logit and softmax CE (the same model family for any number of classes), so each class has a critical instance.
Reported patch attention: the bag stream's attention to the predicted class's critical instance.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from stainmil.config import ModelConfig
from stainmil.model.flat import CasePooling, FlatMIL, labelled
from stainmil.model.registry import register_architecture
from stainmil.model.segment import group_ranks, segment_softmax, segment_sum

QUERY_DIM = 128


@register_architecture("dsmil", reference="Li et al. 2021: max-instance + attention streams")
class DSMIL(FlatMIL):
    def __init__(self, in_dim: int, config: ModelConfig, stains: list[str]) -> None:
        super().__init__(in_dim, config, stains)
        c = config.n_classes
        self.instance_classifier = nn.Linear(in_dim, c)
        self.query = nn.Sequential(nn.Linear(in_dim, QUERY_DIM), nn.ReLU(), nn.Linear(QUERY_DIM, QUERY_DIM), nn.Tanh())
        self.bag_classifier = nn.Conv1d(c, c, kernel_size=in_dim)

    def _streams(self, x: torch.Tensor, patch_case: torch.Tensor, n_cases: int):
        instance = self.instance_classifier(x)                                  # (P, C)
        n_classes = instance.shape[1]
        critical_rows = torch.zeros((n_cases, n_classes), dtype=torch.long, device=x.device)  # (B, C)
        for k in range(n_classes):
            rank, _ = group_ranks(instance[:, k].detach(), patch_case, n_cases)
            top = torch.nonzero(rank == 0).squeeze(1)                            # each case's top patch
            critical_rows[patch_case[top], k] = top
        max_logits = instance[critical_rows, torch.arange(n_classes, device=x.device)]  # (B, C)
        q = self.query(x)                                                       # (P, Q)
        q_critical = q[critical_rows]                                           # (B, C, Q)
        scores = (q[:, None, :] * q_critical[patch_case]).sum(-1) / math.sqrt(QUERY_DIM)  # (P, C)
        weights = torch.stack([segment_softmax(scores[:, k], patch_case, n_cases)
                               for k in range(n_classes)], dim=1)               # (P, C)
        bags = torch.stack([segment_sum(weights[:, k, None] * x, patch_case, n_cases)
                            for k in range(n_classes)], dim=1)                  # (B, C, D)
        bag_logits = self.bag_classifier(bags).squeeze(-1)                      # (B, C)
        return bag_logits, max_logits, scores, weights, bags

    def pool_cases(self, x, patch_case, n_cases, labels, context) -> CasePooling:
        bag_logits, max_logits, scores, weights, bags = self._streams(x, patch_case, n_cases)
        if self.training:
            logits = bag_logits
        else:
            logits = combined_logits(bag_logits, max_logits)
        predicted = logits.argmax(1)                                            # (B,)
        shown = predicted[patch_case][:, None]
        aux = {}
        use = labelled(labels, self.training)
        if bool(use.any()):
            aux["dsmil_max_instance_loss"] = F.cross_entropy(max_logits[use], labels[use])
        case_embedding = bags.gather(1, predicted[:, None, None].expand(-1, 1, bags.shape[2])).squeeze(1)
        return CasePooling(logits, case_embedding, x, scores.gather(1, shown).squeeze(1),
                           attention_weights=weights.gather(1, shown).squeeze(1), auxiliary_losses=aux)

    def instance_logits(self, patch_embeddings: torch.Tensor) -> torch.Tensor:
        """One patch: it is every class's critical instance and gets all the attention."""
        instance = self.instance_classifier(patch_embeddings)                   # (P, C)
        n_classes = instance.shape[1]
        bags = patch_embeddings[:, None, :].expand(-1, n_classes, -1)           # (P, C, D)
        bag_logits = self.bag_classifier(bags).squeeze(-1)
        return combined_logits(bag_logits, instance)


def combined_logits(bag_logits: torch.Tensor, max_logits: torch.Tensor) -> torch.Tensor:
    """log of the mean of the two streams' class probabilities (B, C), in log space (finite however far apart the
    streams are): its softmax is that mean."""
    both = torch.stack([torch.log_softmax(bag_logits, -1), torch.log_softmax(max_logits, -1)])  # (2, B, C)
    return torch.logsumexp(both, dim=0) - math.log(2.0)
