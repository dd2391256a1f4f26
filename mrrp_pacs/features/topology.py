"""Graph topology of nuclei, sc-MTOP style: per-nucleus centralities and per-patch tokens.

Nuclei are nodes; for every unordered pair of nucleus types (a, b), a == b included, a k-NN
graph joins nuclei of those types (Zhao et al. 2023, sc-MTOP; reference code ``WSIGraph.py``):

- same type (``T-T``, ``I-I``, ``S-S``, ``N-N``): each nucleus is linked to its ``k`` nearest
  nuclei of its own type;
- cross type (``T-I``, ``T-S``, ``T-N``, ``I-S``, ``I-N``, ``S-N``): each nucleus of type a is
  linked to its ``k`` nearest nuclei of type b and each of type b to its ``k`` nearest of type a;
  only a–b links exist, so the graph is bipartite.

Links longer than ``max_edge_um`` are dropped; the graph is undirected (a link found from both
ends is one edge) and each edge carries its length in µm. Every nucleus of type a or b is a node
of graph (a, b), isolated or not; a nucleus of another type is absent from it.

Per node and graph (all ten graphs): degree, size of its connected component, closeness and
betweenness centrality within that component, and min and mean length (µm) of its edges; the
local clustering coefficient on the four same-type graphs only (a bipartite graph has no
triangles, so it is 0 on the cross-type graphs and left out). Centralities count hops, as
sc-MTOP does (edge lengths enter through the edge-length features):

- closeness = (c - 1) / sum of hop distances to the other c - 1 nodes of the component
  (networkx ``closeness_centrality(wf_improved=False)``; 0 for an isolated node);
- betweenness = sum over unordered pairs {s, t} of the share of shortest s–t paths through the
  node, divided by (c - 1)(c - 2) / 2 (networkx ``betweenness_centrality`` on the component;
  0 when c <= 2).

A component of fewer than ``exact_below`` nodes (or of no more than ``samples``) gets exact
values (igraph, Brandes). A larger one gets seeded estimates from ``samples`` source nodes, one
drawn in each of ``samples`` equal runs of the component's nodes in Morton (Z-curve) order, so
sources cover the tissue evenly. From their breadth-first searches:

- closeness: Eppstein–Wang, the sum of distances of v estimated as sum_i n_i d(s_i, v), n_i the
  size of the run that s_i was drawn from;
- betweenness: Brandes dependencies with Geisberger–Sanders–Schultes linear scaling — a pair
  (s, t) credits v on its shortest paths with weight d(s, v) / d(s, t), so that nuclei near a
  sampled source are not over-counted and nuclei of low betweenness are not under-counted (plain
  source sampling, igraph ``betweenness(sources=...)``, reaches a Spearman correlation of only
  0.97 with the exact values on a 21k-node nucleus graph at 256 sources; this reaches 0.999).
  igraph's ``closeness(cutoff=...)`` is not used: it is no estimate of closeness.

The same inputs and seed give the same numbers, whatever the order of the nuclei. Cost: for
100k nuclei about 8 s of one core on a tissue-like region and 24 s in the worst case, all four
types intermixed so that every graph is one giant component (``benchmarks/bench_topology.py``).
"""

from __future__ import annotations

import logging
import math

import igraph as ig
import numpy as np
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

from mrrp_pacs.errors import FeatureError

LOGGER = logging.getLogger(__name__)

TOPOLOGY_VERSION = "1"

KIND_NAMES = ("tumour", "inflammatory", "stromal", "normal")
_KIND_LETTERS = ("T", "I", "S", "N")

# sc-MTOP's order: the same-type graphs first, then the cross-type pairs.
GRAPH_PAIRS: tuple[tuple[int, int], ...] = (
    (0, 0), (1, 1), (2, 2), (3, 3), (0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3))
GRAPH_NAMES = tuple(f"{_KIND_LETTERS[a]}-{_KIND_LETTERS[b]}" for a, b in GRAPH_PAIRS)

_SAME_TYPE_FEATURES = ("degree", "component_size", "clustering", "closeness", "betweenness",
                       "edge_min_um", "edge_mean_um")
_CROSS_TYPE_FEATURES = tuple(f for f in _SAME_TYPE_FEATURES if f != "clustering")

NODE_FEATURE_NAMES: tuple[str, ...] = tuple(
    f"{graph}/{feature}"
    for (a, b), graph in zip(GRAPH_PAIRS, GRAPH_NAMES, strict=True)
    for feature in (_SAME_TYPE_FEATURES if a == b else _CROSS_TYPE_FEATURES))

PATCH_STATISTICS = ("mean", "std", "q25", "q50", "q75")
_QUANTILES = (0.25, 0.50, 0.75)

# Flat (source, node) cells held at once by the sampled path search: bounds its memory to a few
# hundred MB (the stored search levels dominate) whatever the component size.
_SEARCH_CELLS = 1 << 22


def node_features(xy_um: np.ndarray, kinds: np.ndarray, *, k: int = 5, max_edge_um: float = 60.0,
                  exact_below: int = 2000, samples: int = 256, seed: int = 0
                  ) -> tuple[np.ndarray, list[str]]:
    """Topology features of every nucleus in the ten cell-type-pair k-NN graphs.

    Parameters
    ----------
    xy_um : np.ndarray, shape (n, 2)
        Nucleus centroids (x, y) in µm, finite.
    kinds : np.ndarray, shape (n,)
        Integer nucleus type: 0 tumour, 1 inflammatory, 2 stromal, 3 normal.
    k : int
        Neighbours linked per nucleus (k-NN), >= 1.
    max_edge_um : float
        Longest edge kept, in µm; longer k-NN links are dropped.
    exact_below : int
        Components with fewer nodes get exact closeness and betweenness; larger ones get
        sampled estimates (see the module docstring).
    samples : int
        Source nodes per estimated component, >= 2.
    seed : int
        Seed of the source sampling; equal seeds give equal numbers.

    Returns
    -------
    features : np.ndarray, shape (n, len(NODE_FEATURE_NAMES)), float32
        One row per nucleus in input order. NaN where the nucleus is not a node of that graph
        (graph T-I holds only tumour and inflammatory nuclei) and for the edge lengths of a node
        without edges. Units: edge lengths in µm, component size in nodes, centralities
        dimensionless (higher = more central).
    names : list of str
        ``"<graph>/<feature>"``, e.g. ``"T-I/betweenness"``; equal to ``NODE_FEATURE_NAMES``.
    """
    xy, kind = _checked_nuclei(xy_um, kinds)
    _check_graph_options(k, max_edge_um)
    _check_int_at_least("exact_below", exact_below, 0)
    _check_int_at_least("samples", samples, 2)
    _check_int_at_least("seed", seed, 0)

    # Morton order puts neighbours close in memory (faster searches) and gives the runs from
    # which sources are drawn.
    order = _morton_order(xy, kind)
    xy, kind = xy[order], kind[order]
    index = _KindIndex(xy, kind)
    seeds = np.random.SeedSequence(seed).spawn(len(GRAPH_PAIRS))

    columns: list[np.ndarray] = []
    for (a, b), graph_seed, name in zip(GRAPH_PAIRS, seeds, GRAPH_NAMES, strict=True):
        members, pairs, length_um = index.pair_graph(a, b, k, float(max_edge_um))
        edges = np.searchsorted(members, pairs)
        block = np.full((len(xy), len(_SAME_TYPE_FEATURES) if a == b
                         else len(_CROSS_TYPE_FEATURES)), np.nan)
        block[members] = _graph_features(len(members), edges, length_um, a == b, exact_below,
                                         samples, np.random.default_rng(graph_seed))
        LOGGER.debug("graph %s: %d nodes, %d edges", name, len(members), len(edges))
        columns.append(block)
    features = np.empty((len(xy), len(NODE_FEATURE_NAMES)), dtype=np.float32)
    features[order] = np.concatenate(columns, axis=1)
    return features, list(NODE_FEATURE_NAMES)


def pair_graph(xy_um: np.ndarray, kinds: np.ndarray, a: int, b: int, *, k: int = 5,
               max_edge_um: float = 60.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The k-NN graph of nucleus types a and b that :func:`node_features` measures.

    Parameters
    ----------
    xy_um, kinds, k, max_edge_um
        As for :func:`node_features`.
    a, b : int
        Nucleus types, 0..3; a == b gives a same-type graph.

    Returns
    -------
    nodes : np.ndarray, shape (n_nodes,), int64
        Indices (into the inputs, ascending) of every nucleus of type a or b.
    edges : np.ndarray, shape (m, 2), int64
        Undirected edges as index pairs, first < second, each once.
    length_um : np.ndarray, shape (m,), float64
        Edge lengths in µm, all <= ``max_edge_um``.
    """
    xy, kind = _checked_nuclei(xy_um, kinds)
    for name, value in (("a", a), ("b", b)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or \
                not 0 <= value < len(KIND_NAMES):
            raise FeatureError(f"{name} must be a nucleus type 0..{len(KIND_NAMES) - 1}, "
                               f"got {value!r}")
    _check_graph_options(k, max_edge_um)
    # built in node_features' order, so that k-NN ties break the same way
    order = _morton_order(xy, kind)
    nodes, pairs, length_um = _KindIndex(xy[order], kind[order]).pair_graph(
        min(a, b), max(a, b), k, float(max_edge_um))
    edges = np.sort(order[pairs], axis=1)
    by_edge = np.lexsort((edges[:, 1], edges[:, 0]))
    return np.sort(order[nodes]), edges[by_edge], length_um[by_edge]


def patch_tokens(node_features: np.ndarray, kinds: np.ndarray, patch_index: np.ndarray,
                 n_patches: int) -> tuple[np.ndarray, list[str]]:
    """One fixed-length topology token per patch: statistics of its nuclei per type.

    For each patch and nucleus type t, over the nuclei of type t in the patch and for each
    feature of the graphs that contain type t (its same-type graph and its three cross-type
    graphs): mean, population standard deviation and the 25, 50 and 75 % quantiles (linear
    interpolation) of the finite values; then the count of nuclei of type t. A statistic without
    any finite value (no nucleus of that type in the patch, or none with edges) is 0, so the
    token holds no NaN; the count says how many nuclei stand behind it.

    Parameters
    ----------
    node_features : np.ndarray, shape (n, len(NODE_FEATURE_NAMES))
        Output of :func:`node_features`.
    kinds : np.ndarray, shape (n,)
        Integer nucleus type, 0..3, as given to :func:`node_features`.
    patch_index : np.ndarray, shape (n,)
        Integer patch (tile) of each nucleus, 0 <= index < ``n_patches``.
    n_patches : int
        Number of patches, >= 0.

    Returns
    -------
    tokens : np.ndarray, shape (n_patches, len(names)), float32
        Per patch, type-major: for each type its feature statistics, then its count.
    names : list of str
        ``"<type>/<graph>/<feature>/<statistic>"`` (e.g. ``"tumour/T-I/betweenness/q50"``) and
        ``"<type>/count"``; fixed for a ``TOPOLOGY_VERSION``.
    """
    values = np.asarray(node_features)
    if values.ndim != 2 or values.shape[1] != len(NODE_FEATURE_NAMES):
        raise FeatureError(f"node_features must have shape (n, {len(NODE_FEATURE_NAMES)}), "
                           f"got {values.shape}; pass the output of node_features")
    if np.isinf(values).any():
        raise FeatureError("node_features holds infinite values; pass the output of "
                           "node_features")
    kind = _checked_kinds(kinds, len(values))
    _check_int_at_least("n_patches", n_patches, 0)
    patch = np.asarray(patch_index)
    if patch.shape != (len(values),) or not np.issubdtype(patch.dtype, np.integer):
        raise FeatureError(f"patch_index must be an integer array of shape ({len(values)},), "
                           f"got {patch.dtype} {patch.shape}")
    if len(patch) and (patch.min() < 0 or patch.max() >= n_patches):
        raise FeatureError(f"patch_index must lie in 0..{n_patches - 1}, got values in "
                           f"{patch.min()}..{patch.max()}")

    blocks: list[np.ndarray] = []
    names: list[str] = []
    for t, kind_name in enumerate(KIND_NAMES):
        of_kind = kind == t
        where = patch[of_kind]
        graphs = {name for name, pair in zip(GRAPH_NAMES, GRAPH_PAIRS, strict=True)
                  if t in pair}
        columns = [j for j, name in enumerate(NODE_FEATURE_NAMES)
                   if name.split("/")[0] in graphs]
        for j in columns:
            blocks.append(_grouped_statistics(values[of_kind, j], where, n_patches))
            names += [f"{kind_name}/{NODE_FEATURE_NAMES[j]}/{s}" for s in PATCH_STATISTICS]
        blocks.append(np.bincount(where, minlength=n_patches)[:, None].astype(np.float64))
        names.append(f"{kind_name}/count")
    return np.concatenate(blocks, axis=1).astype(np.float32), names


def _grouped_statistics(value: np.ndarray, group: np.ndarray, n_groups: int) -> np.ndarray:
    """Mean, std and quantiles of the finite values per group, (n_groups, 5); 0 where none."""
    finite = np.isfinite(value)
    value, group = value[finite].astype(np.float64), group[finite]
    out = np.zeros((n_groups, len(PATCH_STATISTICS)))
    count = np.bincount(group, minlength=n_groups)
    present = count > 0
    mean = np.bincount(group, weights=value, minlength=n_groups)[present] / count[present]
    out[present, 0] = mean
    deviation = value - out[group, 0]
    out[present, 1] = np.sqrt(np.bincount(group, weights=deviation**2, minlength=n_groups)
                              [present] / count[present])
    ranked = value[np.lexsort((value, group))]
    start = (np.cumsum(count) - count)[present]
    last = count[present] - 1
    for column, q in enumerate(_QUANTILES, start=2):
        position = last * q
        low = np.floor(position).astype(np.int64)
        high = np.minimum(low + 1, last)
        frac = position - low
        out[present, column] = (ranked[start + low] * (1 - frac) + ranked[start + high] * frac)
    return out


class _KindIndex:
    """Nuclei split by type, with one k-d tree per type, for building the pair graphs."""

    def __init__(self, xy_um: np.ndarray, kind: np.ndarray) -> None:
        self.xy_um = xy_um
        self.members = [np.flatnonzero(kind == t) for t in range(len(KIND_NAMES))]
        self.trees = [cKDTree(xy_um[m]) if len(m) else None for m in self.members]

    def pair_graph(self, a: int, b: int, k: int, max_edge_um: float
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Nodes (ascending ids), edges (m, 2) as ids with i < j, and their lengths in µm."""
        # cKDTree's bound is strict; the next float up keeps links of exactly max_edge_um.
        bound = np.nextafter(max_edge_um, np.inf)
        links: list[np.ndarray] = []
        for source, target in ((a, b), (b, a)) if a != b else ((a, a),):
            tree, origin, found_in = self.trees[target], self.members[source], \
                self.members[target]
            if tree is None or not len(origin):
                continue
            itself = 1 if source == target else 0  # a nucleus is its own nearest neighbour
            want = min(k + itself, len(found_in))
            _, found = tree.query(self.xy_um[origin], k=want, distance_upper_bound=bound)
            found = found.reshape(len(origin), want)  # k = 1 gives a flat array
            near = np.where(found < len(found_in),
                            found_in[np.minimum(found, len(found_in) - 1)], -1)
            if itself:
                # the nucleus itself is not always first when two share a centroid
                near = np.where(near == origin[:, None], -1, near)
                near = np.where(np.cumsum(near >= 0, axis=1) <= k, near, -1)
            pairs = np.stack([np.repeat(origin, want), near.ravel()], axis=1)
            links.append(pairs[pairs[:, 1] >= 0])
        members = np.union1d(self.members[a], self.members[b])
        if not links:
            return members, np.empty((0, 2), dtype=np.int64), np.empty(0)
        pairs = np.sort(np.concatenate(links), axis=1)
        n = len(self.xy_um)
        key = np.unique(pairs[:, 0] * n + pairs[:, 1])  # a link found from both ends: one edge
        pairs = np.stack([key // n, key % n], axis=1)
        length_um = np.hypot(*(self.xy_um[pairs[:, 0]] - self.xy_um[pairs[:, 1]]).T)
        return members, pairs, length_um


def _graph_features(n: int, edges: np.ndarray, length_um: np.ndarray, same_type: bool,
                    exact_below: int, samples: int, rng: np.random.Generator) -> np.ndarray:
    """Feature block of one graph, (n, 7) for a same-type graph, (n, 6) otherwise."""
    ends = edges.ravel()
    twice = np.repeat(length_um, 2)
    degree = np.bincount(ends, minlength=n).astype(np.float64)
    edge_min = np.full(n, np.nan)
    if len(ends):
        order = np.lexsort((twice, ends))
        firsts = np.flatnonzero(np.r_[True, ends[order][1:] != ends[order][:-1]])
        edge_min[ends[order][firsts]] = twice[order][firsts]
    with np.errstate(invalid="ignore", divide="ignore"):
        edge_mean = np.bincount(ends, weights=twice, minlength=n) / degree

    adjacency = csr_matrix((np.ones(len(edges)), (edges[:, 0], edges[:, 1])), shape=(n, n))
    _, component = connected_components(adjacency, directed=False)
    size = np.bincount(component)[component] if n else np.zeros(0, dtype=np.int64)
    closeness, betweenness = _centralities(edges, component, size, exact_below, samples, rng)
    columns = [degree, size.astype(np.float64)]
    if same_type:
        graph = ig.Graph(n=n)
        graph.add_edges(edges)
        columns.append(np.asarray(graph.transitivity_local_undirected(mode="zero")))
    columns += [closeness, betweenness, edge_min, edge_mean]
    return np.stack(columns, axis=1) if n else np.empty((0, len(columns)))


def _centralities(edges: np.ndarray, component: np.ndarray, size: np.ndarray, exact_below: int,
                  samples: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Closeness and normalised betweenness within each component, exact or estimated."""
    n = len(component)
    closeness = np.zeros(n)
    betweenness = np.zeros(n)
    estimated = (size >= exact_below) & (size > samples)
    exact = np.flatnonzero(~estimated & (size > 1))
    if len(exact):
        within = np.searchsorted(exact, edges[~estimated[edges[:, 0]]])
        small = ig.Graph(n=len(exact))
        small.add_edges(within)
        closeness[exact] = small.closeness()
        betweenness[exact] = small.betweenness(directed=False)
    # nodes and edges grouped by component; stable sorts keep each group ascending (Morton)
    by_component = np.argsort(component, kind="stable")
    node_start = np.searchsorted(component[by_component], np.arange(component.max() + 2)) \
        if n else np.zeros(1, dtype=np.int64)
    edge_component = component[edges[:, 0]]
    edge_order = np.argsort(edge_component, kind="stable")
    edge_start = np.searchsorted(edge_component[edge_order], np.arange(len(node_start)))
    for label in np.unique(component[estimated]):
        nodes = by_component[node_start[label]:node_start[label + 1]]
        local = np.searchsorted(nodes, edges[edge_order[edge_start[label]:
                                                         edge_start[label + 1]]])
        distance_sum, betweenness[nodes] = _sampled_paths(len(nodes), local, samples, rng)
        closeness[nodes] = (len(nodes) - 1) / distance_sum
        LOGGER.debug("estimated centralities of a %d-node component from %d sources",
                     len(nodes), samples)
    pairs = (size - 1) * (size - 2) / 2
    betweenness = np.divide(betweenness, pairs, out=np.zeros(n), where=size > 2)
    return closeness, betweenness


def _sampled_paths(n: int, edges: np.ndarray, samples: int, rng: np.random.Generator
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Estimated sum of hop distances and (unnormalised) betweenness of a connected graph.

    ``edges`` are (m, 2) node ids 0..n-1 in Morton order; one source is drawn in each of
    ``samples`` equal runs of ids. The searches run level by level for a batch of sources at
    once (numpy over all (source, node) pairs of a level), keeping per level the frontier and
    its shortest-path DAG arcs for the backward (dependency) pass.
    """
    bounds = np.linspace(0, n, samples + 1).astype(np.int64)
    sources = rng.integers(bounds[:-1], bounds[1:])
    weights = np.diff(bounds).astype(np.float64)
    head = np.concatenate([edges[:, 0], edges[:, 1]])
    tail = np.concatenate([edges[:, 1], edges[:, 0]])
    order = np.argsort(head, kind="stable")
    neighbours = tail[order].astype(np.int32)
    degree = np.bincount(head, minlength=n).astype(np.int32)
    first_arc = (np.cumsum(degree) - degree).astype(np.int32)

    distance_sum = np.zeros(n)
    betweenness = np.zeros(n)
    batches = -(-samples * n // _SEARCH_CELLS)
    for rows in np.array_split(np.arange(samples), batches):
        nodes, values_d, values_b = _search_batch(sources[rows], weights[rows], n, neighbours,
                                                  degree, first_arc)
        distance_sum += np.bincount(nodes, weights=values_d, minlength=n)
        betweenness += np.bincount(nodes, weights=values_b, minlength=n)
    return distance_sum, betweenness


def _search_batch(sources: np.ndarray, weights: np.ndarray, n: int, neighbours: np.ndarray,
                  degree: np.ndarray, first_arc: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Breadth-first searches from ``sources``; per reached (source, node): node, w·d, w·d·g.

    g is the linearly scaled dependency of Geisberger et al.: g(v) = sum over DAG children w of
    sigma(v) / sigma(w) * (1 / d(w) + g(w)), so that d(v) g(v) = sum over targets t of the
    share of s–t shortest paths through v times d(s, v) / d(s, t).
    """
    rows = len(sources)
    seen = np.zeros(rows * n, dtype=bool)
    claim = np.empty(rows * n, dtype=np.int32)
    frontier_node = sources.astype(np.int32)
    frontier_base = np.arange(rows, dtype=np.int32) * np.int32(n)  # flat id of (row, node 0)
    seen[frontier_base + frontier_node] = True
    sigma: list[np.ndarray] = [np.ones(rows)]
    levels_node = [frontier_node]
    levels_base = [frontier_base]
    arcs: list[tuple[np.ndarray, np.ndarray]] = []
    while True:
        count = degree[frontier_node]
        parent = np.repeat(np.arange(len(frontier_node), dtype=np.int32), count)
        arc = np.repeat(first_arc[frontier_node] - (np.cumsum(count) - count), count)
        arc += np.arange(len(arc), dtype=np.int32)
        child_flat = frontier_base[parent] + neighbours[arc]
        new = ~seen[child_flat]
        if not new.any():
            break
        parent, child_flat = parent[new], child_flat[new]
        # a child reached over several arcs: the last arc's claim names it once
        arc_id = np.arange(len(child_flat), dtype=np.int32)
        claim[child_flat] = arc_id
        winner = claim[child_flat]
        is_first = winner == arc_id
        child = (np.cumsum(is_first, dtype=np.int32) - 1)[winner]
        frontier_flat = child_flat[is_first]
        frontier_base = frontier_base[parent[is_first]]
        frontier_node = frontier_flat - frontier_base
        seen[frontier_flat] = True
        sigma.append(np.bincount(child, weights=sigma[-1][parent], minlength=len(frontier_node)))
        levels_node.append(frontier_node)
        levels_base.append(frontier_base)
        arcs.append((parent, child))

    dependency: np.ndarray = np.zeros(len(levels_node[-1]))
    values_b = [np.zeros(rows)] * len(levels_node)  # the sources' own entry stays 0
    for level in range(len(arcs), 0, -1):
        parent, child = arcs[level - 1]
        share = sigma[level - 1][parent] / sigma[level][child]
        values_b[level] = level * dependency * weights[levels_base[level] // n]
        dependency = np.bincount(parent, weights=share * (1.0 / level + dependency[child]),
                                 minlength=len(levels_node[level - 1]))
    values_d = [level * weights[base // n] for level, base in enumerate(levels_base)]
    return (np.concatenate(levels_node), np.concatenate(values_d), np.concatenate(values_b))


def _morton_order(xy: np.ndarray, kind: np.ndarray) -> np.ndarray:
    """Indices sorting nuclei along a Z-order curve on a 2^16 grid over their bounding box.

    Ties (same grid cell) break on x, y and type, so the order does not depend on input order.
    """
    if not len(xy):
        return np.zeros(0, dtype=np.int64)
    span = float(np.ptp(xy, axis=0).max()) or 1.0
    grid = ((xy - xy.min(axis=0)) / span * 65535).astype(np.uint64)
    key = np.zeros(len(xy), dtype=np.uint64)
    for bit in range(16):
        one = np.uint64(1)
        key |= ((grid[:, 0] >> np.uint64(bit)) & one) << np.uint64(2 * bit)
        key |= ((grid[:, 1] >> np.uint64(bit)) & one) << np.uint64(2 * bit + 1)
    return np.lexsort((kind, xy[:, 1], xy[:, 0], key))


def _checked_nuclei(xy_um: np.ndarray, kinds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    xy = np.asarray(xy_um)
    if xy.ndim != 2 or xy.shape[1] != 2 or not np.issubdtype(xy.dtype, np.number) or \
            np.issubdtype(xy.dtype, np.complexfloating):
        raise FeatureError(f"xy_um must be a real array of shape (n, 2) in µm, got "
                           f"{xy.dtype} {xy.shape}")
    xy = xy.astype(np.float64)
    if not np.isfinite(xy).all():
        raise FeatureError(f"xy_um holds {int((~np.isfinite(xy)).any(axis=1).sum())} nuclei "
                           "with non-finite coordinates; drop or fix them")
    return xy, _checked_kinds(kinds, len(xy))


def _checked_kinds(kinds: np.ndarray, n: int) -> np.ndarray:
    kind = np.asarray(kinds)
    if kind.shape != (n,) or not np.issubdtype(kind.dtype, np.integer):
        raise FeatureError(f"kinds must be an integer array of shape ({n},), got "
                           f"{kind.dtype} {kind.shape}")
    if n and (kind.min() < 0 or kind.max() >= len(KIND_NAMES)):
        raise FeatureError(f"kinds must be 0..{len(KIND_NAMES) - 1} "
                           f"({', '.join(KIND_NAMES)}), got values in {kind.min()}..{kind.max()}")
    return kind.astype(np.int64)


def _check_graph_options(k: int, max_edge_um: float) -> None:
    _check_int_at_least("k", k, 1)
    if isinstance(max_edge_um, bool) or not isinstance(max_edge_um, (int, float, np.number)) \
            or not math.isfinite(max_edge_um) or max_edge_um <= 0:
        raise FeatureError(f"max_edge_um must be a positive number of µm, got {max_edge_um!r}")


def _check_int_at_least(name: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise FeatureError(f"{name} must be an integer >= {minimum}, got {value!r}")
