"""The old pipeline's pseudocode as plain nested Python loops: the reference `stainmil bench` times and checks
the vectorised model against.

    for each case: for each stain: for each slice: pool patches; pool slices; pool stains; classify

It reuses the modules of a :class:`HierarchicalMIL` (projector, score-based attention pools, classifier), so
its logits must equal the vectorised forward pass within float tolerance (``model.stain_identity`` none or
embedding: the stain's vector is added to each slice embedding).
"""

from __future__ import annotations

import torch


def _pool(pool, h: torch.Tensor) -> torch.Tensor:
    """One group: (n, E) -> (E,) with softmax attention."""
    weights = torch.softmax(pool.score(pool.transform(h, torch.zeros(len(h), dtype=torch.long), 1)), dim=0)
    return weights @ h


def nested_forward(model, batch) -> torch.Tensor:
    """(B, C) logits computed case by case, stain by stain, slice by slice."""
    logits = []
    for b in range(batch.n_cases):
        stain_embeddings = []
        for g in torch.nonzero(batch.group_case == b).flatten().tolist():
            slice_embeddings = []
            stain_vector = 0.0 if model.stain_embedding is None else model.stain_embedding.weight[batch.group_stain[g]]
            for s in torch.nonzero(batch.slice_group == g).flatten().tolist():
                h = model.embed(batch.features[batch.patch_slice == s])      # (n, E)
                slice_embeddings.append(_pool(model.pools["patch"], h) + stain_vector)
            stain_embeddings.append(_pool(model.pools["slice"], torch.stack(slice_embeddings)))
        case_embedding = _pool(model.pools["stain"], torch.stack(stain_embeddings))
        logits.append(model.classifier(case_embedding))
    return torch.stack(logits)
