
import pandas as pd
import pytest
import torch

from stainmil.config import ElasticNetConfig, EntropyConfig, ModelConfig, RegConfig
from stainmil.errors import ConfigError
from stainmil.model.regularizers import AttentionRegularizer, per_level, schedule_factor
from stainmil.train.trainer import train
from tests.model.test_hierarchical import model_for, random_bags


def test_per_level_values_and_validation():
    assert per_level(0.5, "k") == [0.5, 0.5, 0.5]
    assert per_level([1, 2, 3], "k") == [1.0, 2.0, 3.0]
    with pytest.raises(ConfigError, match="patch, slice, stain"):
        per_level([1, 2], "model.reg.elastic.l1")


def test_schedules():
    assert schedule_factor("constant", 7, 10) == 1
    assert schedule_factor("linear", 1, 10) == 1 and schedule_factor("linear", 6, 10) == pytest.approx(0.5)
    assert schedule_factor("cosine", 1, 10) == 1 and schedule_factor("cosine", 6, 10) == pytest.approx(0.5)


def test_terms_by_hand_and_gradients_flow():
    bags = random_bags()
    model = model_for(bags).train()
    batch = bags.batch(bags.case_ids)
    config = ModelConfig(reg=RegConfig(elastic=ElasticNetConfig(l1=[0.1, 0, 0], l2=[0, 0.2, 0]),
                                       entropy=EntropyConfig(weight=[0, 0, 0.3], normalize=False)))
    out = model(batch)
    terms = AttentionRegularizer(config, 10)(out, batch, epoch=1)
    assert set(terms) == {"elastic_patch", "elastic_slice", "entropy_stain"}
    assert torch.isclose(terms["elastic_patch"], 0.1 * out.patch_attention_logits.abs().mean())
    assert torch.isclose(terms["elastic_slice"], 0.2 * out.slice_attention_logits.pow(2).mean())
    w, groups = out.stain_weights, batch.group_case
    entropies = [-(w[groups == b] * torch.log(w[groups == b])).sum() for b in range(batch.n_cases)
                 if (groups == b).sum() > 1]
    assert torch.isclose(terms["entropy_stain"], -0.3 * torch.stack(entropies).mean(), atol=1e-6)
    sum(terms.values()).backward()
    for pool in ("patch", "slice", "stain"):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.pools[pool].parameters()), pool


def _run(config, tmp_path, name, *overrides):
    return train(config.with_overrides({"train.runs_dir": str(tmp_path / name), "train.max_epochs": 5,
                                        **dict(overrides)})).run_dir


def test_zero_coefficients_train_bit_identically(prepared, tmp_path):
    plain = _run(prepared, tmp_path, "plain")
    zeros = _run(prepared, tmp_path, "zeros", ("model.reg.elastic.l1", [0.0, 0.0, 0.0]),
                 ("model.reg.entropy.weight", 0.0), ("model.reg.entropy.schedule", "cosine"))
    a = pd.read_csv(plain / "history.csv").drop(columns="seconds")
    b = pd.read_csv(zeros / "history.csv").drop(columns="seconds")
    assert a.equals(b)
    wa = torch.load(plain / "checkpoints" / "last.pth", weights_only=True)["model"]
    wb = torch.load(zeros / "checkpoints" / "last.pth", weights_only=True)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_entropy_regularisation_raises_attention_entropy(prepared, tmp_path):
    """Same seed; lambda > 0 at the patch level gives flatter patch attention after training."""
    from stainmil.analysis.attention import analyze_tables
    from stainmil.evaluate.evaluation import evaluate_run

    entropies = []
    for name, weight in (("base", 0.0), ("entropy", 2.0)):
        run = _run(prepared, tmp_path, name, ("model.reg.entropy.weight", [weight, 0.0, 0.0]),
                   ("train.lr", 1e-3))
        evaluate_run(run)
        tables, _, _ = analyze_tables(run, "all")
        entropies.append(tables.cases["patch_entropy_normalised"].mean())
        history = pd.read_csv(run / "history.csv")
        if weight:
            assert "train_entropy_patch" in history and (history["train_entropy_patch"] < 0).all()
    assert entropies[1] > entropies[0], entropies
