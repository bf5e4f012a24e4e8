"""Stain identity on feature-level cohorts: where the label hangs on one stain (decoys in the others) and where
the stain says nothing, the test AUC of every ``model.stain_identity`` over several seeds. Measured, not asserted.

    python benchmarks/stain_identity.py --seeds 5 --cases 160

Each case has three stains of one slice; a patch is a feature vector (standard normal), and evidence is +strength
on feature 0 in a third of a slice's patches. *Keyed*: evidence in SOX10 iff high-grade and in the other stains iff
the case is a decoy (half of each class). *Free*: evidence in every stain, each stain independently with
probability ``--free-rate`` when high-grade (the stain name tells nothing). The model trains with the training
loop's step (Adam) for ``--epochs`` epochs; the figure is the test AUC on fresh cases.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import roc_auc_score

from stainmil.bags.cohort import CohortBags
from stainmil.config import Config, ModelConfig
from stainmil.model.registry import build_model
from stainmil.model.regularizers import AttentionRegularizer
from stainmil.train.losses import cross_entropy
from stainmil.train.trainer import TrainingStep

STAINS = ["he", "melan", "sox10"]


def bags(kind: str, n_cases: int, seed: int, dim: int, patches: int, strength: float, free_rate: float) -> CohortBags:
    rng = np.random.default_rng(seed)
    labels = np.tile([0, 1], n_cases // 2)
    decoys = rng.permutation(np.tile([0, 1], n_cases // 2))
    rows, features = [], []
    for c in range(n_cases):
        for stain in STAINS:
            if kind == "keyed":
                evidence = labels[c] if stain == "sox10" else decoys[c]
            else:
                evidence = labels[c] and rng.random() < free_rate
            x = rng.standard_normal((patches, dim))
            if evidence:
                x[: patches // 3, 0] += strength
            features.append(x)
            rows += [{"case": str(c), "stain": stain, "slice": "0", "patch": str(p), "label": int(labels[c])}
                     for p in range(patches)]
    return CohortBags(pd.DataFrame(rows), np.concatenate(features).astype(np.float32), STAINS)


def score(identity: str, train: CohortBags, test: CohortBags, seed: int, epochs: int, lr: float,
          dim: int = 32, condition_lr: float = 1.0) -> float:
    """Test AUC of one model; ``condition_lr``: the learning rate of the ``attention`` identity's stain vectors as a
    multiple of ``lr``."""
    torch.manual_seed(seed)
    config = Config(model=ModelConfig(stain_identity=identity, embed_dim=dim, attention_hidden_dim=max(16, dim // 2),
                                      dropout=0.1)).with_overrides({"train.lr": lr})
    model = build_model(train.feature_dim, config.model, STAINS)
    named = dict(model.named_parameters())
    condition = [p for n, p in named.items() if n == "stain_condition"]
    groups = [{"params": [p for n, p in named.items() if n != "stain_condition"]}]
    if condition:
        groups.append({"params": condition, "lr": lr * condition_lr})
    optimizer = torch.optim.Adam(groups, lr=lr)
    step = TrainingStep(model, optimizer, cross_entropy, AttentionRegularizer(config.model, epochs), None,
                        config.train)
    rng = np.random.default_rng(seed)
    cases = train.case_ids
    for epoch in range(1, epochs + 1):
        model.train()
        order = [cases[i] for i in rng.permutation(len(cases))]
        for i in range(0, len(order), 8):
            step(train.batch(order[i:i + 8]), epoch)
    model.eval()
    with torch.no_grad():
        batch = test.batch(test.case_ids)
        return float(roc_auc_score(batch.labels.numpy(), model(batch).probabilities[:, 1].numpy()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--cases", type=int, default=160)
    parser.add_argument("--test-cases", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--patches", type=int, default=12)
    parser.add_argument("--strength", type=float, default=1.5)
    parser.add_argument("--free-rate", type=float, default=0.6)
    parser.add_argument("--identities", default="none,embedding,gated,attention")
    parser.add_argument("--embed-dim", type=int, default=32)
    parser.add_argument("--condition-lr", type=float, default=1.0,
                        help="learning rate of the attention identity's stain vectors, times --lr")
    args = parser.parse_args()
    torch.set_num_threads(1)
    identities = args.identities.split(",")
    print(f"{'cohort':<6} {'identity':<10} {'AUC mean':>8} {'sd':>6}  per seed  (s)")
    for kind in ("keyed", "free"):
        for identity in identities:
            start, aucs = time.perf_counter(), []
            for seed in range(args.seeds):
                train = bags(kind, args.cases, 100 + seed, args.dim, args.patches, args.strength, args.free_rate)
                test = bags(kind, args.test_cases, 900 + seed, args.dim, args.patches, args.strength, args.free_rate)
                aucs.append(score(identity, train, test, seed, args.epochs, args.lr, args.embed_dim,
                                  args.condition_lr))
            print(f"{kind:<6} {identity:<10} {np.mean(aucs):8.3f} {np.std(aucs):6.3f}  "
                  f"{' '.join(f'{a:.3f}' for a in aucs)}  ({time.perf_counter() - start:.0f})", flush=True)


if __name__ == "__main__":
    main()
