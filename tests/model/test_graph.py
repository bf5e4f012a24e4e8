"""The graph pieces of the multi-stain graph models, against their reference definitions."""

import numpy as np
import pytest
import torch
from sklearn.neighbors import kneighbors_graph

from stainmil.model.graph import GATv2, knn_edges, max_mean_readout, top_k_pool
from stainmil.model.registry import build_model
from tests.model.test_baselines import STAINS, small_config
from tests.model.test_hierarchical import random_bags


def test_knn_edges_are_scikit_learns_graph_within_each_case():
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.normal(size=(30, 4))).float()
    groups = torch.tensor([0] * 12 + [1] * 18)
    edges = knn_edges(x, groups, k=5, block=40)                       # blocks of 3 rows: the chunked path
    mine = {(int(s), int(t)) for s, t in edges.T}
    expected = set()
    for rows in (np.arange(12), np.arange(12, 30)):
        graph = kneighbors_graph(x[rows].numpy(), 5, mode="connectivity", include_self=False)
        expected |= {(int(rows[i]), int(rows[j])) for i, j in zip(*graph.nonzero())}
    assert mine == expected
    assert knn_edges(x[:1], groups[:1], k=5).shape == (2, 0)         # a one-patch case has no neighbour
    assert knn_edges(x[:3], groups[:3], k=7, self_loops=True).shape[1] == 9


def test_knn_of_a_50000_patch_case_never_builds_the_n_by_n_matrix(monkeypatch):
    calls = []
    real = torch.cdist

    def spy(a, b, *args, **kwargs):
        calls.append(len(a) * len(b))
        return real(a, b, *args, **kwargs)

    monkeypatch.setattr(torch, "cdist", spy)
    n, block = 50_000, 1 << 22
    x = torch.randn(n, 2)
    edges = knn_edges(x, torch.zeros(n, dtype=torch.long), k=5, block=block)
    assert edges.shape == (2, 5 * n) and max(calls) <= block and max(calls) < n * n // 100


def test_gatv2_is_a_softmax_over_each_nodes_in_edges_and_itself():
    torch.manual_seed(0)
    layer = GATv2(3, 4, heads=2)
    x = torch.randn(4, 3)
    edges = torch.tensor([[1, 2, 3], [0, 0, 1]])                      # 1->0, 2->0, 3->1
    out = layer(x, edges)
    with torch.no_grad():  # node 0 by hand: messages from 1, 2 and itself
        left, right = layer.lin_l(x).view(4, 2, 4), layer.lin_r(x).view(4, 2, 4)
        score = torch.stack([(torch.nn.functional.leaky_relu(left[j] + right[0], 0.2) * layer.att).sum(-1)
                             for j in (1, 2, 0)])                     # (3, H)
        alpha = torch.softmax(score, 0)
        expected = (alpha[..., None] * left[[1, 2, 0]]).sum(0).mean(0) + layer.bias
    assert torch.allclose(out[0], expected, atol=1e-6)
    assert torch.allclose(out[2], layer.lin_l(x[2:3]).view(2, 4).mean(0) + layer.bias, atol=1e-6)  # only itself


def test_pooling_keeps_the_best_share_of_each_case_and_their_edges():
    x = torch.arange(10.0)[:, None].repeat(1, 2)
    groups = torch.tensor([0] * 4 + [1] * 6)
    score = torch.tensor([0.1, 0.9, 0.5, 0.3, 0.2, 0.8, 0.7, 0.1, 0.6, 0.0])
    edges = torch.tensor([[1, 2, 5, 9], [2, 3, 6, 5]])
    pooled, kept_edges, kept_groups, kept = top_k_pool(x, edges, groups, 2, score, 0.5)
    assert kept.tolist() == [1, 2, 5, 6, 8] and kept_groups.tolist() == [0, 0, 1, 1, 1]
    assert kept_edges.tolist() == [[0, 2], [1, 3]]                   # 1->2 and 5->6 survive, renumbered
    assert torch.allclose(pooled[:, 0], torch.tensor([0.9, 1.0, 4.0, 4.2, 4.8]))
    readout = max_mean_readout(pooled, kept_groups, 2)
    assert torch.allclose(readout[0], torch.tensor([1.0, 1.0, 0.95, 0.95]))


@pytest.mark.parametrize("architecture", ["mustang", "biox_cpath"])
def test_a_graph_model_takes_one_patch_cases_and_cases_missing_a_stain(architecture):
    bags = random_bags(n_cases=5)  # case 2 has no Melan-A
    torch.manual_seed(0)
    model = build_model(bags.feature_dim, small_config(architecture), STAINS).eval()
    with torch.no_grad():
        out = model(bags.batch(bags.case_ids))
        assert torch.isfinite(out.logits).all()
        batch = bags.batch(["1"])
        one = batch.subset(np.arange(len(batch.features)) == 0)
        assert torch.isfinite(model(one).logits).all() and model(one).effective_attention.item() == pytest.approx(1)


def _paired_cohort(seed, n_cases=40, n=24):
    """Every patch drawn uniformly in a square, so each patch alone looks alike in both classes; in class 1 the
    patches come in near-duplicate pairs: only who neighbours whom carries the label."""
    import pandas as pd

    from stainmil.bags.cohort import CohortBags

    rng = np.random.default_rng(seed)
    rows, features = [], []
    for case in range(n_cases):
        label = case % 2
        points = (np.repeat(rng.uniform(-1, 1, (n // 2, 2)), 2, 0) + rng.normal(0, 0.01, (n, 2)) if label
                  else rng.uniform(-1, 1, (n, 2)))
        rows += [{"case": str(case), "stain": "he", "slice": "0", "patch": str(i), "label": label, "path": ""}
                 for i in range(n)]
        features.append(points)
    return CohortBags(pd.DataFrame(rows), np.concatenate(features).astype(np.float32), STAINS)


def test_a_graph_model_learns_what_only_the_neighbourhoods_show_and_a_bag_model_cannot():
    from sklearn.metrics import roc_auc_score

    train, test = _paired_cohort(0), _paired_cohort(1)
    auc = {}
    for architecture in ("mustang", "abmil"):
        torch.manual_seed(0)
        config = small_config(architecture, {"mustang": {"k": 1}})  # the nearest patch: its twin in class 1
        model = build_model(2, config, STAINS)
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
        for step in range(150):
            model.train()
            batch = train.batch(list(np.random.default_rng(step).choice(train.case_ids, 8, replace=False)))
            loss = torch.nn.functional.cross_entropy(model(batch).logits, batch.labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            batch = test.batch(test.case_ids)
            auc[architecture] = roc_auc_score(batch.labels.numpy(), model.eval()(batch).probabilities[:, 1].numpy())
    assert auc["mustang"] > 0.9 and auc["abmil"] < 0.75, auc


def test_random_walk_encoding_is_the_return_probability_of_each_step_in_bounded_blocks():
    from stainmil.model.graph import random_walk_encoding

    edges = torch.tensor([[0, 0, 1, 1, 2, 2, 3, 3, 3], [0, 1, 1, 2, 2, 0, 3, 0, 1]])
    adjacency = torch.zeros(4, 4)
    adjacency[edges[0], edges[1]] = 1
    walk = adjacency / adjacency.sum(1, keepdim=True)
    expected = torch.stack([torch.linalg.matrix_power(walk, k).diagonal() for k in range(1, 6)], dim=1)
    assert torch.allclose(random_walk_encoding(edges, 4, 5), expected, atol=1e-6)
    assert torch.allclose(random_walk_encoding(edges, 4, 5, block=4), expected, atol=1e-6)  # one column at a time


def test_region_adjacency_links_touching_cells_of_one_slice_only():
    from stainmil.model.graph import region_adjacency_edges

    xs, ys = np.meshgrid(np.arange(3) * 256.0, np.arange(3) * 256.0)
    position = torch.tensor(np.stack([xs.ravel(), ys.ravel(), np.full(9, 256.0)], 1), dtype=torch.float32)
    position = torch.cat([position, position[:1]])                    # a tenth patch, on another slice
    edges = region_adjacency_edges(position, torch.tensor([0] * 9 + [1]))
    neighbours = {i: {int(t) for s, t in edges.T if int(s) == i} for i in range(10)}
    assert neighbours[4] == set(range(9)) and neighbours[0] == {0, 1, 3, 4} and neighbours[9] == {9}


def test_biox_cpath_reads_where_patches_lie_when_the_cohort_knows_it():
    from stainmil.bags.cohort import CohortBags

    bags = random_bags(n_cases=3)
    manifest = bags.manifest.assign(x=np.arange(len(bags.manifest)) % 4 * 256.0,
                                    y=np.arange(len(bags.manifest)) // 4 * 256.0, size0=256.0)
    placed = CohortBags(manifest, bags.source.gather(np.arange(len(manifest)), None).numpy(), STAINS)
    torch.manual_seed(0)
    model = build_model(bags.feature_dim, small_config("biox_cpath"), STAINS).eval()
    with torch.no_grad():
        with_places, without = placed.batch(placed.case_ids), bags.batch(bags.case_ids)
        assert with_places.patch_position is not None and without.patch_position is None
        assert not torch.allclose(model(with_places).logits, model(without).logits)  # the spatial edges count


def test_biox_cpath_builds_each_case_graph_once_and_exactly_as_the_whole_batch_graph(monkeypatch):
    """The k-NN graph and random-walk encoding depend on the input features and places only: kept per case, they
    are the batch-wide ones bit for bit, and a case seen again (the next epoch) is not rebuilt."""
    from stainmil.bags.cohort import CohortBags
    from stainmil.model.graph import random_walk_encoding, region_adjacency_edges
    from stainmil.model.multistain import biox_cpath
    from stainmil.model.multistain.biox_cpath import WALK_STEPS

    bags = random_bags(n_cases=4)
    manifest = bags.manifest.assign(x=np.arange(len(bags.manifest)) % 5 * 256.0,
                                    y=np.arange(len(bags.manifest)) // 5 * 256.0, size0=256.0)
    placed = CohortBags(manifest, bags.source.gather(np.arange(len(manifest)), None).numpy(), STAINS)
    model = build_model(bags.feature_dim, small_config("biox_cpath"), STAINS).train()
    for data in (bags, placed):
        batch = data.batch(data.case_ids)
        x = model.standardise(batch.features)
        case = batch.group_case[batch.slice_group[batch.patch_slice]]
        position = batch.patch_position
        edges, walk = model.case_graphs(x, case, position, batch.patch_slice)
        whole = knn_edges(x, case, model.k, self_loops=True)          # the batch-wide graph, as it was built before
        if position is not None:
            whole = torch.unique(torch.cat([whole, region_adjacency_edges(position, batch.patch_slice)], 1), dim=1)
        assert torch.equal(edges, whole)
        assert torch.equal(walk, random_walk_encoding(whole, len(x), WALK_STEPS))
    built = len(model.graph_cache.graphs)
    assert built == 8                                                   # 4 cases x (with and without places)
    calls = []
    monkeypatch.setattr(biox_cpath, "random_walk_encoding", lambda *a, **k: calls.append(1))
    batch = bags.batch(bags.case_ids[:2])                              # another batch of cases seen before
    model(batch)
    assert not calls and len(model.graph_cache.graphs) == built


GRADIENT_SCRIPT = """
import hashlib, sys, torch
from tests.model.test_baselines import STAINS, small_config
from tests.model.test_hierarchical import random_bags
from stainmil.model.registry import build_model
torch.set_num_threads(2)
bags = random_bags(n_cases=8)
torch.manual_seed(0)
model = build_model(bags.feature_dim, small_config(sys.argv[1]), STAINS).train()
batch = bags.batch(bags.case_ids)
torch.manual_seed(1)
torch.nn.functional.cross_entropy(model(batch).logits, batch.labels).backward()
grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
print(hashlib.sha256(grads.numpy().tobytes()).hexdigest())
"""


@pytest.mark.parametrize("architecture", ["mustang", "biox_cpath"])
def test_graph_models_give_the_same_gradients_in_every_process(architecture):
    """Two threads, three fresh processes, one seed: bit-identical gradients. Indexing with repeated indices
    (x[edges]) summed its backward in a thread-dependent order on CPU, and compare-models' AUCs moved run to run."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    digests = {subprocess.run([sys.executable, "-c", GRADIENT_SCRIPT, architecture], cwd=root, check=True,
                              capture_output=True, text=True).stdout.strip() for _ in range(3)}
    assert len(digests) == 1, digests
