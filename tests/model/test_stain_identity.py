"""Stain identity: where the label speaks in one stain only and the others carry decoys, a stain-blind model
cannot tell the key stain from the decoys; ``embedding`` and ``specific`` can (feature-level version of
``synth --preset stain-key``); so can ``attention`` (and ``gated``), which start as stain-blind."""

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import roc_auc_score

from stainmil.bags.cohort import CohortBags
from stainmil.config import Config, ModelConfig
from stainmil.model.registry import build_model
from stainmil.model.regularizers import AttentionRegularizer
from stainmil.train.losses import cross_entropy
from stainmil.train.trainer import TrainingStep

STAINS = ["he", "melan", "sox10"]


def stain_keyed_bags(n_cases: int, seed: int, dim: int = 8, patches: int = 12) -> CohortBags:
    """Stains alike; evidence (+3 on feature 0 in a third of a slice's patches) in sox10 iff high-grade, and in the
    other stains iff the case is a decoy (half of each class)."""
    rng = np.random.default_rng(seed)
    rows, features = [], []
    labels = np.tile([0, 1], n_cases // 2)
    decoys = np.tile([0, 0, 1, 1], n_cases // 4 + 1)[:n_cases]
    for c in range(n_cases):
        for stain in STAINS:
            evidence = labels[c] if stain == "sox10" else decoys[c]
            x = rng.standard_normal((patches, dim))
            if evidence:
                x[: patches // 3, 0] += 3.0
            features.append(x)
            rows += [{"case": str(c), "stain": stain, "slice": "0", "patch": str(p), "label": int(labels[c])}
                     for p in range(patches)]
    return CohortBags(pd.DataFrame(rows), np.concatenate(features).astype(np.float32), STAINS)


def train_and_score(identity: str, architecture: str = "hierarchical") -> float:
    train_bags, test_bags = stain_keyed_bags(64, seed=0), stain_keyed_bags(40, seed=1)
    torch.manual_seed(0)
    config = Config(model=ModelConfig(architecture=architecture, stain_identity=identity, embed_dim=16,
                                      attention_hidden_dim=8, dropout=0.0)).with_overrides({"train.lr": 3e-3})
    model = build_model(train_bags.feature_dim, config.model, STAINS)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.train.lr)
    step = TrainingStep(model, optimizer, cross_entropy, AttentionRegularizer(config.model, 80), None, config.train)
    rng = np.random.default_rng(0)
    cases = train_bags.case_ids
    for epoch in range(1, 81):
        model.train()
        order = [cases[i] for i in rng.permutation(len(cases))]
        for i in range(0, len(order), 8):
            step(train_bags.batch(order[i:i + 8]), epoch)
    model.eval()
    with torch.no_grad():
        batch = test_bags.batch(test_bags.case_ids)
        probs = model(batch).probabilities[:, 1].numpy()
    return roc_auc_score(batch.labels.numpy(), probs)


@pytest.mark.parametrize("architecture", ["hierarchical", "abmil"])
def test_stain_blind_models_cannot_find_the_key_stain(architecture):
    assert train_and_score("none", architecture) < 0.75


@pytest.mark.parametrize("architecture,identity", [("hierarchical", "embedding"), ("hierarchical", "specific"),
                                                   ("hierarchical", "attention"), ("abmil", "embedding")])
def test_stain_aware_models_find_the_key_stain(architecture, identity):
    assert train_and_score(identity, architecture) > 0.88


def test_attention_and_gated_start_as_the_stain_blind_model():
    """Before training, ``attention`` is exactly ``none`` (a zero vector) and ``gated`` nearly so (the gate ~0.018)."""
    from stainmil.model.base import GATE_START

    bags = stain_keyed_bags(8, seed=2)
    batch = bags.batch(bags.case_ids)
    outputs = {}
    reference = None
    for identity in ("none", "attention", "gated"):
        torch.manual_seed(0)
        model = build_model(bags.feature_dim, ModelConfig(stain_identity=identity, embed_dim=16,
                                                          attention_hidden_dim=8, dropout=0.0), STAINS).eval()
        if reference is None:
            reference = model.state_dict()
        model.load_state_dict(reference, strict=False)  # the same shared weights (the gated one drew more numbers)
        if identity == "gated":
            with torch.no_grad():
                model.stain_gate.fill_(-30.0)  # fully shut: the stain vector contributes nothing
        with torch.no_grad():
            outputs[identity] = model(batch)
    for identity in ("attention", "gated"):
        assert torch.allclose(outputs[identity].logits, outputs["none"].logits, atol=1e-5), identity
        assert torch.allclose(outputs[identity].effective_attention, outputs["none"].effective_attention, atol=1e-6)
    assert torch.sigmoid(torch.tensor(GATE_START)) < 0.02
