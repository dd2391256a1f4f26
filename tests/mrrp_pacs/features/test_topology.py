"""Nucleus graph topology: pair graphs, exact and sampled centralities, patch tokens.

References are independent: networkx for exact centralities, a brute-force k-NN for the graphs,
igraph's exact Brandes for the sampled estimates, numpy for the patch statistics.
"""

from itertools import combinations_with_replacement

import igraph as ig
import networkx as nx
import numpy as np
import pytest
from scipy.stats import spearmanr

from mrrp_pacs.errors import FeatureError
from mrrp_pacs.features.topology import (
    GRAPH_NAMES,
    GRAPH_PAIRS,
    KIND_NAMES,
    NODE_FEATURE_NAMES,
    PATCH_STATISTICS,
    TOPOLOGY_VERSION,
    node_features,
    pair_graph,
    patch_tokens,
)
from mrrp_pacs.phantom.histology import render_slide

TRAITS = {"nuclear_size": 0.0, "pleomorphism": 0.0, "tumour_density": 0.0, "lymphocytes": 1.0,
          "lymph_clustering": 0.0}
MPP = 0.5  # µm per phantom pixel


@pytest.fixture(scope="module")
def phantom_nuclei() -> tuple[np.ndarray, np.ndarray]:
    """About 1,100 nuclei of a 1 mm phantom slide: centroids in µm and types."""
    nuclei = render_slide(np.random.default_rng(0), TRAITS, size_px=2048).nuclei
    return np.stack([nuclei.x_px, nuclei.y_px], axis=1) * MPP, nuclei.kind


def tumour_nests(rng: np.random.Generator) -> np.ndarray:
    """About 20,000 tumour nuclei (µm) in six irregular nests with lumina, 16 µm apart.

    The nests lie more than 60 µm apart, so each is one component of about 3,300 nodes.
    """
    parts = []
    radius_um, spacing_um = 520.0, 16.0
    for row in range(2):
        for col in range(3):
            steps = np.arange(-1.4 * radius_um, 1.4 * radius_um, spacing_um)
            gx, gy = np.meshgrid(steps, steps)
            xy = np.stack([gx.ravel(), gy.ravel()], axis=1)
            xy += rng.uniform(-0.35, 0.35, xy.shape) * spacing_um
            angle = np.arctan2(xy[:, 1], xy[:, 0])
            keep = np.hypot(*xy.T) < radius_um * (1 + 0.25 * np.cos(3 * angle
                                                                     + rng.uniform(0, 6.3)))
            for lumen in rng.uniform(-0.5, 0.5, (3, 2)) * radius_um:
                keep &= np.hypot(*(xy - lumen).T) > 45.0
            parts.append(xy[keep] + np.array([col, row]) * 2.6 * radius_um)
    return np.concatenate(parts)


def column(features: np.ndarray, name: str) -> np.ndarray:
    return features[:, NODE_FEATURE_NAMES.index(name)]


def test_names_and_version_are_stable():
    assert TOPOLOGY_VERSION == "1"
    assert GRAPH_NAMES == ("T-T", "I-I", "S-S", "N-N", "T-I", "T-S", "T-N", "I-S", "I-N", "S-N")
    # 4 same-type graphs x 7 features + 6 cross-type graphs x 6 (no clustering: bipartite)
    assert len(NODE_FEATURE_NAMES) == 64 == len(set(NODE_FEATURE_NAMES))
    assert NODE_FEATURE_NAMES[:7] == (
        "T-T/degree", "T-T/component_size", "T-T/clustering", "T-T/closeness",
        "T-T/betweenness", "T-T/edge_min_um", "T-T/edge_mean_um")
    assert "T-I/clustering" not in NODE_FEATURE_NAMES


def test_exact_centralities_equal_networkx(phantom_nuclei):
    xy_um, kinds = phantom_nuclei
    features, names = node_features(xy_um, kinds)  # every component < 2000 nodes: exact
    assert names == list(NODE_FEATURE_NAMES)
    assert features.shape == (len(kinds), 64) and features.dtype == np.float32
    checked = 0
    for (a, b), graph_name in zip(GRAPH_PAIRS, GRAPH_NAMES, strict=True):
        nodes, edges, length_um = pair_graph(xy_um, kinds, a, b)
        graph = nx.Graph()
        graph.add_nodes_from(nodes.tolist())
        graph.add_weighted_edges_from(zip(*edges.T.tolist(), length_um.tolist(), strict=True))
        betweenness: dict[int, float] = {}
        closeness: dict[int, float] = {}
        size: dict[int, int] = {}
        for component in nx.connected_components(graph):
            part = graph.subgraph(component)
            betweenness |= nx.betweenness_centrality(part)
            closeness |= nx.closeness_centrality(part, wf_improved=False)
            size |= dict.fromkeys(component, len(component))
        expected = {"betweenness": betweenness, "closeness": closeness, "component_size": size,
                    "degree": dict(graph.degree())}
        if a == b:
            expected["clustering"] = nx.clustering(graph)
        for feature, values in expected.items():
            got = column(features, f"{graph_name}/{feature}")[nodes]
            want = np.array([values[i] for i in nodes.tolist()])
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7,
                                       err_msg=f"{graph_name}/{feature}")
        for i in nodes[:50].tolist():
            lengths = [d["weight"] for _, _, d in graph.edges(i, data=True)]
            got_min = column(features, f"{graph_name}/edge_min_um")[i]
            got_mean = column(features, f"{graph_name}/edge_mean_um")[i]
            if lengths:
                assert got_min == pytest.approx(min(lengths), rel=1e-6)
                assert got_mean == pytest.approx(np.mean(lengths), rel=1e-6)
            else:
                assert np.isnan(got_min) and np.isnan(got_mean)
        checked += len(nodes)
    assert checked == 4 * len(kinds)  # every nucleus sits in 4 of the 10 graphs


def test_sampled_estimates_rank_like_exact_on_20k_nuclei():
    xy_um = tumour_nests(np.random.default_rng(0))
    kinds = np.zeros(len(xy_um), dtype=np.int64)
    assert 19_000 < len(xy_um) < 21_000
    features, _ = node_features(xy_um, kinds, exact_below=1000, samples=256, seed=0)

    nodes, edges, _ = pair_graph(xy_um, kinds, 0, 0)
    graph = ig.Graph(n=len(nodes), edges=edges.tolist())
    exact_b = np.zeros(len(nodes))
    exact_c = np.zeros(len(nodes))
    components = list(graph.connected_components())
    assert len(components) == 6 and min(map(len, components)) > 3000  # all estimated
    for component in components:
        part = graph.induced_subgraph(component)
        n = len(component)
        exact_b[component] = np.array(part.betweenness(directed=False)) / ((n - 1) * (n - 2) / 2)
        exact_c[component] = part.closeness()
    estimate_b = column(features, "T-T/betweenness")[nodes]
    estimate_c = column(features, "T-T/closeness")[nodes]

    assert not np.allclose(estimate_b, exact_b)  # the sampling path ran
    assert spearmanr(estimate_b, exact_b).statistic >= 0.99
    assert spearmanr(estimate_c, exact_c).statistic >= 0.99
    # unbiased in scale, not only in rank
    assert estimate_b.sum() / exact_b.sum() == pytest.approx(1.0, abs=0.03)
    assert np.median(estimate_c / exact_c) == pytest.approx(1.0, abs=0.02)


def test_pair_graphs_are_the_capped_knn_links():
    rng = np.random.default_rng(1)
    xy_um = rng.uniform(0, 400, (300, 2))  # continuous: no distance ties
    kinds = rng.choice(3, 300, p=[0.5, 0.3, 0.2])
    cap_um = 35.0
    for a, b in combinations_with_replacement(range(4), 2):
        nodes, edges, length_um = pair_graph(xy_um, kinds, a, b, k=4, max_edge_um=cap_um)
        np.testing.assert_array_equal(nodes, np.flatnonzero((kinds == a) | (kinds == b)))
        expected = set()
        for source, target in {(a, b), (b, a)}:
            candidates = np.flatnonzero(kinds == target)
            for i in np.flatnonzero(kinds == source):
                others = candidates[candidates != i]
                distance = np.hypot(*(xy_um[others] - xy_um[i]).T)
                for j in others[np.argsort(distance)[:4]]:
                    if np.hypot(*(xy_um[j] - xy_um[i])) <= cap_um:
                        expected.add((min(i, j), max(i, j)))
        assert set(map(tuple, edges.tolist())) == expected, (a, b)
        assert np.all(edges[:, 0] < edges[:, 1])
        assert np.all(length_um <= cap_um)
        np.testing.assert_allclose(length_um, np.hypot(*(xy_um[edges[:, 0]]
                                                         - xy_um[edges[:, 1]]).T))
        if a != b:  # cross-type graphs are bipartite
            assert np.all(kinds[edges[:, 0]] != kinds[edges[:, 1]])
        else:
            assert np.all(kinds[edges] == a)


def test_edge_cap_is_inclusive_and_drops_longer_links():
    xy_um = np.array([[0.0, 0.0], [60.0, 0.0], [0.0, 60.001], [200.0, 0.0]])
    kinds = np.zeros(4, dtype=np.int64)
    _, edges, length_um = pair_graph(xy_um, kinds, 0, 0, k=3, max_edge_um=60.0)
    assert edges.tolist() == [[0, 1]] and length_um.tolist() == [60.0]
    features, _ = node_features(xy_um, kinds, k=3, max_edge_um=60.0)
    np.testing.assert_array_equal(column(features, "T-T/degree"), [1, 1, 0, 0])
    np.testing.assert_array_equal(column(features, "T-T/component_size"), [2, 2, 1, 1])
    np.testing.assert_array_equal(column(features, "T-T/closeness"), [1, 1, 0, 0])
    assert np.isnan(column(features, "T-T/edge_min_um")[2:]).all()


def test_absent_nuclei_are_nan_and_present_ones_finite(phantom_nuclei):
    xy_um, kinds = phantom_nuclei
    features, _ = node_features(xy_um, kinds)
    for (a, b), graph_name in zip(GRAPH_PAIRS, GRAPH_NAMES, strict=True):
        member = (kinds == a) | (kinds == b)
        for name in NODE_FEATURE_NAMES:
            if not name.startswith(graph_name + "/"):
                continue
            values = column(features, name)
            assert np.isnan(values[~member]).all(), name
            if "edge_" in name:  # NaN exactly where a node has no edge
                degree = column(features, f"{graph_name}/degree")
                assert np.array_equal(np.isnan(values[member]), degree[member] == 0), name
            else:
                assert np.isfinite(values[member]).all(), name


def test_same_seed_same_numbers_other_seed_other_estimates():
    xy_um = tumour_nests(np.random.default_rng(2))[:4000]
    rng = np.random.default_rng(3)
    kinds = rng.choice(4, len(xy_um), p=[0.7, 0.1, 0.15, 0.05])
    first, _ = node_features(xy_um, kinds, exact_below=300, samples=32, seed=7)
    again, _ = node_features(xy_um, kinds, exact_below=300, samples=32, seed=7)
    other, _ = node_features(xy_um, kinds, exact_below=300, samples=32, seed=8)
    np.testing.assert_array_equal(first, again)
    betweenness = NODE_FEATURE_NAMES.index("T-T/betweenness")
    assert not np.array_equal(first[:, betweenness], other[:, betweenness])
    # shuffling the input order changes nothing but the row order
    shuffle = rng.permutation(len(xy_um))
    shuffled, _ = node_features(xy_um[shuffle], kinds[shuffle], exact_below=300, samples=32,
                                seed=7)
    np.testing.assert_array_equal(shuffled, first[shuffle])


def test_patch_tokens_aggregate_per_type_without_nan(phantom_nuclei):
    xy_um, kinds = phantom_nuclei
    features, _ = node_features(xy_um, kinds)
    patch = (xy_um[:, 0] // 256).astype(np.int64)  # 256 µm columns; patch 7 stays empty
    n_patches = 8
    assert patch.max() < 7
    tokens, names = patch_tokens(features, kinds, patch, n_patches)

    per_type = 25 * len(PATCH_STATISTICS) + 1  # 7 + 3 x 6 features of the type's 4 graphs
    assert tokens.shape == (n_patches, 4 * per_type) and tokens.dtype == np.float32
    assert len(names) == len(set(names)) == tokens.shape[1]
    assert names[0] == "tumour/T-T/degree/mean" and names[per_type - 1] == "tumour/count"
    assert "tumour/I-S/degree/mean" not in names and "normal/S-N/betweenness/q75" in names
    assert np.isfinite(tokens).all()
    assert np.all(tokens[7] == 0)

    for t, kind_name in enumerate(KIND_NAMES):
        counts = tokens[:, names.index(f"{kind_name}/count")]
        np.testing.assert_array_equal(counts, np.bincount(patch[kinds == t], minlength=8))
    for kind_name, t, feature, p in (("tumour", 0, "T-S/betweenness", 2),
                                     ("inflammatory", 1, "I-I/edge_mean_um", 3),
                                     ("stromal", 2, "T-S/edge_min_um", 1)):
        values = column(features, feature)[(kinds == t) & (patch == p)].astype(np.float64)
        values = values[np.isfinite(values)]
        assert len(values) >= 5
        want = [values.mean(), values.std(), *np.quantile(values, [0.25, 0.5, 0.75])]
        got = [tokens[p, names.index(f"{kind_name}/{feature}/{s}")] for s in PATCH_STATISTICS]
        np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.mark.parametrize(("xy_um", "kinds", "message"), [
    (np.zeros((3, 3)), np.zeros(3, dtype=int), "xy_um must be a real array of shape"),
    (np.array([[0.0, np.nan], [1.0, 1.0]]), np.zeros(2, dtype=int), "non-finite"),
    (np.zeros((3, 2)), np.zeros(2, dtype=int), "kinds must be an integer array of shape"),
    (np.zeros((3, 2)), np.zeros(3), "kinds must be an integer array"),
    (np.zeros((3, 2)), np.array([0, 1, 4]), r"kinds must be 0\.\.3"),
])
def test_bad_nuclei_raise_feature_error(xy_um, kinds, message):
    with pytest.raises(FeatureError, match=message):
        node_features(xy_um, kinds)


@pytest.mark.parametrize(("options", "message"), [
    ({"k": 0}, "k must be an integer >= 1"),
    ({"max_edge_um": -1.0}, "max_edge_um must be a positive number"),
    ({"max_edge_um": float("inf")}, "max_edge_um must be a positive number"),
    ({"samples": 1}, "samples must be an integer >= 2"),
    ({"exact_below": 2.5}, "exact_below must be an integer"),
])
def test_bad_options_raise_feature_error(options, message):
    with pytest.raises(FeatureError, match=message):
        node_features(np.zeros((2, 2)), np.zeros(2, dtype=int), **options)


def test_bad_patch_inputs_raise_feature_error(phantom_nuclei):
    xy_um, kinds = phantom_nuclei
    features = np.zeros((len(kinds), len(NODE_FEATURE_NAMES)), dtype=np.float32)
    patch = np.zeros(len(kinds), dtype=np.int64)
    with pytest.raises(FeatureError, match="node_features must have shape"):
        patch_tokens(features[:, :10], kinds, patch, 1)
    with pytest.raises(FeatureError, match=r"patch_index must lie in 0\.\.0"):
        patch_tokens(features, kinds, patch + 1, 1)
    with pytest.raises(FeatureError, match="patch_index must be an integer array"):
        patch_tokens(features, kinds, patch[:-1], 1)
    with pytest.raises(FeatureError, match=r"kinds must be 0\.\.3"):
        patch_tokens(features, kinds + 4, patch, 1)
    with pytest.raises(FeatureError, match="a must be a nucleus type"):
        pair_graph(xy_um, kinds, 5, 0)
