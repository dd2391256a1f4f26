"""Time nucleus graph topology and check its sampled centralities against exact ones.

Run: ``.venv/bin/python benchmarks/bench_topology.py [nuclei] [repeats] [spearman_nodes]``
(defaults 100000, 3, 20000). Prints:

1. ``node_features`` + ``patch_tokens`` (256 µm patches) for ``nuclei`` nuclei of a synthetic
   tissue region (tumour nests on a jittered 16 µm grid, stroma, lymphocyte aggregates, ducts,
   as in the phantom slides) and of a worst case where the four types are intermixed on one
   grid (every cross-type graph is then one giant component): median wall and CPU seconds over
   ``repeats`` runs, and peak memory.
2. The networkx reference: exact betweenness + closeness of a 2,000-node tumour graph with
   networkx against this module (exact, and sampled) on the same graph, and networkx
   extrapolated to 100,000 nodes (Brandes costs n·m, and m grows as n in a k-NN graph).
3. Spearman correlation of the sampled estimates with igraph's exact values on one connected
   ``spearman_nodes``-node tumour graph (the exact reference takes minutes), beside plain
   igraph source sampling.
"""

from __future__ import annotations

import resource
import statistics
import sys
import time

import igraph as ig
import networkx as nx
import numpy as np
from scipy import ndimage
from scipy.stats import spearmanr

from mrrp_pacs.features.topology import NODE_FEATURE_NAMES, node_features, pair_graph, patch_tokens

SPACING_UM = 16.0  # tumour nucleus spacing, as in the phantom at tumour_density 0
PATCH_UM = 256.0


def tissue(rng: np.random.Generator, nuclei: int) -> tuple[np.ndarray, np.ndarray]:
    """About ``nuclei`` nuclei (µm, type) of a tissue region; tumour about 65 %."""
    side_um = np.sqrt(nuclei / 0.0031)
    cells = int(side_um // 8) + 1
    field = ndimage.gaussian_filter(rng.standard_normal((cells, cells)), 12.0, mode="wrap")
    nest = field > 0

    def in_nest(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return nest[np.clip(y // 8, 0, cells - 1).astype(int),
                    np.clip(x // 8, 0, cells - 1).astype(int)]

    steps = np.arange(SPACING_UM / 2, side_um, SPACING_UM)
    gx, gy = np.meshgrid(steps, steps)
    x = gx.ravel() + rng.uniform(-0.35, 0.35, gx.size) * SPACING_UM
    y = gy.ravel() + rng.uniform(-0.35, 0.35, gx.size) * SPACING_UM
    keep = in_nest(x, y)
    tumour = np.stack([x[keep], y[keep]], axis=1)
    n_stroma = int(0.35 * len(tumour))
    stroma = rng.uniform(0, side_um, (3 * n_stroma, 2))
    stroma = stroma[~in_nest(stroma[:, 0], stroma[:, 1])][:n_stroma]
    n_lymph = int(0.2 * len(tumour))
    centres = rng.uniform(0, side_um, (max(1, n_lymph // 60), 2))
    lymph = centres[rng.integers(0, len(centres), n_lymph)] + rng.normal(0, 22.0, (n_lymph, 2))
    angle = np.linspace(0, 2 * np.pi, 24, endpoint=False)
    ring = 30.0 * np.stack([np.cos(angle), np.sin(angle)], axis=1)
    ducts = (rng.uniform(0, side_um, (max(1, len(tumour) // 2000), 1, 2)) + ring).reshape(-1, 2)
    parts = (tumour, lymph, stroma, ducts)
    kinds = np.concatenate([np.full(len(p), t) for t, p in enumerate(parts)])
    return np.concatenate(parts), kinds


def intermixed(rng: np.random.Generator, nuclei: int) -> tuple[np.ndarray, np.ndarray]:
    """Nuclei on one jittered grid with types drawn independently (worst case)."""
    side = int(np.sqrt(nuclei))
    gx, gy = np.meshgrid(np.arange(side) * SPACING_UM, np.arange(side) * SPACING_UM)
    xy = np.stack([gx.ravel(), gy.ravel()], axis=1) + rng.uniform(-5, 5, (side * side, 2))
    return xy, rng.choice(4, len(xy), p=[0.6, 0.13, 0.22, 0.05])


def one_nest(rng: np.random.Generator, nuclei: int) -> np.ndarray:
    """About ``nuclei`` tumour nuclei (µm) in one irregular nest with lumina."""
    radius_um = SPACING_UM * np.sqrt(nuclei / np.pi) * 1.02
    steps = np.arange(-1.4 * radius_um, 1.4 * radius_um, SPACING_UM)
    gx, gy = np.meshgrid(steps, steps)
    xy = np.stack([gx.ravel(), gy.ravel()], axis=1)
    xy += rng.uniform(-0.35, 0.35, xy.shape) * SPACING_UM
    angle = np.arctan2(xy[:, 1], xy[:, 0])
    keep = np.hypot(*xy.T) < radius_um * (1 + 0.2 * np.cos(3 * angle + rng.uniform(0, 6.3)))
    for lumen in rng.uniform(-0.5, 0.5, (6, 2)) * radius_um:
        keep &= np.hypot(*(xy - lumen).T) > 40.0
    return xy[keep]


def time_pattern(name: str, xy_um: np.ndarray, kinds: np.ndarray, repeats: int) -> None:
    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        features, _ = node_features(xy_um, kinds)
        patch = ((xy_um - xy_um.min(axis=0)) // PATCH_UM).astype(np.int64)
        columns = int(patch[:, 0].max()) + 1
        tokens, _ = patch_tokens(features, kinds, patch[:, 1] * columns + patch[:, 0],
                                 columns * (int(patch[:, 1].max()) + 1))
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    largest = {graph: int(np.nanmax(features[:, NODE_FEATURE_NAMES.index(
        f"{graph}/component_size")])) for graph in ("T-T", "S-S", "T-S", "T-I", "I-S")}
    print(f"{name}: {len(kinds)} nuclei {np.bincount(kinds, minlength=4).tolist()}, "
          f"{tokens.shape[0]} patches x {tokens.shape[1]}")
    print(f"  largest components {largest}")
    print(f"  node_features + patch_tokens: median wall {statistics.median(walls):.1f} s, "
          f"CPU {statistics.median(cpus):.1f} s (runs: "
          f"{', '.join(f'{w:.1f}' for w in walls)} s wall)")


def networkx_reference(nodes: int) -> None:
    xy_um = one_nest(np.random.default_rng(1), nodes)
    kinds = np.zeros(len(xy_um), dtype=np.int64)
    _, edges, _ = pair_graph(xy_um, kinds, 0, 0)
    graph = nx.Graph()
    graph.add_nodes_from(range(len(xy_um)))
    graph.add_edges_from(edges.tolist())
    start = time.process_time()
    nx.betweenness_centrality(graph)
    nx.closeness_centrality(graph, wf_improved=False)
    networkx_s = time.process_time() - start
    start = time.process_time()
    node_features(xy_um, kinds, exact_below=len(xy_um) + 1)
    exact_s = time.process_time() - start
    start = time.process_time()
    node_features(xy_um, kinds, exact_below=0)
    sampled_s = time.process_time() - start
    scale = (100_000 / len(xy_um)) ** 2
    print(f"networkx reference on a {len(xy_um)}-node tumour graph ({len(edges)} edges), CPU s:")
    print(f"  networkx exact betweenness + closeness {networkx_s:.2f} s; node_features exact "
          f"{exact_s:.2f} s ({networkx_s / exact_s:.0f}x faster), sampled (256 sources) "
          f"{sampled_s:.2f} s ({networkx_s / sampled_s:.0f}x)")
    print(f"  networkx extrapolated to 100,000 nodes: {networkx_s * scale / 3600:.1f} h")


def spearman_check(nodes: int) -> None:
    xy_um = one_nest(np.random.default_rng(2), nodes)
    kinds = np.zeros(len(xy_um), dtype=np.int64)
    start = time.process_time()
    features, names = node_features(xy_um, kinds, exact_below=0, seed=0)
    sampled_s = time.process_time() - start
    _, edges, _ = pair_graph(xy_um, kinds, 0, 0)
    components = ig.Graph(n=len(xy_um), edges=edges.tolist()).connected_components()
    largest = int(np.argmax(components.sizes()))
    members = np.flatnonzero(np.array(components.membership) == largest)
    giant = components.subgraph(largest)  # keeps the ascending order of members
    n = len(members)
    start = time.process_time()
    exact_b = np.array(giant.betweenness(directed=False)) / ((n - 1) * (n - 2) / 2)
    exact_c = np.array(giant.closeness())
    exact_s = time.process_time() - start
    estimate_b = features[members, names.index("T-T/betweenness")]
    estimate_c = features[members, names.index("T-T/closeness")]
    sources = np.random.default_rng(0).choice(n, 256, replace=False).tolist()
    plain_b = np.array(giant.betweenness(directed=False, sources=sources))
    print(f"estimates on one {n}-node tumour component (all of {len(xy_um)} nuclei), 256 "
          f"sources: sampled {sampled_s:.1f} s CPU, exact igraph {exact_s:.0f} s CPU")
    print(f"  Spearman betweenness {spearmanr(estimate_b, exact_b).statistic:.4f} "
          f"(plain igraph source sampling {spearmanr(plain_b, exact_b).statistic:.4f}), "
          f"closeness {spearmanr(estimate_c, exact_c).statistic:.4f}")
    print(f"  sum ratio betweenness {estimate_b.sum() / exact_b.sum():.3f}, median ratio "
          f"closeness {np.median(estimate_c / exact_c):.3f}")


def main() -> None:
    nuclei = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    repeats = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    spearman_nodes = int(sys.argv[3]) if len(sys.argv) > 3 else 20_000
    time_pattern("tissue region", *tissue(np.random.default_rng(0), nuclei), repeats)
    time_pattern("intermixed worst case", *intermixed(np.random.default_rng(0), nuclei),
                 repeats)
    print(f"peak memory {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    networkx_reference(2000)
    spearman_check(spearman_nodes)


if __name__ == "__main__":
    main()
