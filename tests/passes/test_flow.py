"""fxmem.passes._flow: scipy max-flow min-cut agrees with networkx; ties keep the largest source side."""

import math
import random

import networkx as nx
import pytest

from fxmem.passes._flow import INF, SINK, SOURCE, FlowNetwork, min_cut


def _random_network(seed: int, n: int = 12, scale: float = 1.0):
    rng = random.Random(seed)
    net = FlowNetwork.empty(n)
    g = nx.DiGraph()
    for _ in range(3 * n):
        u, v = rng.randrange(n), rng.randrange(n)
        if u == v or v == SOURCE or u == SINK:
            continue
        cap = INF if rng.random() < 0.15 else rng.randint(1, 50) * scale
        net.add(u, v, cap)
        if g.has_edge(u, v):
            g[u][v]["capacity"] += cap
        else:
            g.add_edge(u, v, capacity=cap)
    g.add_nodes_from([SOURCE, SINK])
    return net, g


@pytest.mark.parametrize("seed", range(20))
def test_cut_value_matches_networkx(seed):
    net, g = _random_network(seed)
    try:
        expected, _ = nx.minimum_cut(g, SOURCE, SINK)
    except nx.NetworkXUnbounded:
        expected = math.inf
    assert min_cut(net).value == expected


@pytest.mark.parametrize("seed", range(5))
def test_large_capacities_are_scaled_close(seed):
    net, g = _random_network(seed, scale=1e9)  # sums far beyond int32: scaled
    try:
        expected, _ = nx.minimum_cut(g, SOURCE, SINK)
    except nx.NetworkXUnbounded:
        pytest.skip("no finite cut")
    cut = min_cut(net)
    assert cut.scale > 1
    assert cut.value == pytest.approx(expected, rel=1e-3)


def test_ties_take_the_largest_source_side():
    # source → a → b → sink, both edges capacity 5: cutting either is minimal; the largest source
    # side cuts b → sink (a and b stay on the source side)
    net = FlowNetwork.empty(4)
    net.add(SOURCE, 2, 5)
    net.add(2, 3, 5)
    net.add(3, SINK, 5)
    cut = min_cut(net)
    assert cut.value == 5
    assert list(cut.source_side) == [True, False, True, True]
