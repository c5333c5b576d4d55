"""An s-t minimum cut on a small integer flow network, solved by scipy's Dinic max-flow.

Why not networkx: ``networkx.minimum_cut`` is pure Python; the remat λ search solves a few dozen
cuts per graph, and scipy's C implementation is two orders of magnitude faster on the
thousands-of-vertex networks a 12-layer transformer gives. scipy takes int32 capacities only, so
capacities are scaled into int32 (exact when they already fit, which is the case on small graphs)
and every "infinite" edge gets a capacity larger than the sum of all finite ones.

Among all minimum cuts this returns the one with the *largest* source side: the vertices that
cannot reach the sink in the residual graph. For the remat network (source side = "available
without recomputation") that is the minimum cut that recomputes the least — an exact
lexicographic tie-break without perturbing the capacities.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

INF = math.inf
SOURCE, SINK = 0, 1

# Room for the finite capacities (their sum stays below 2**29) and for infinite edges (2**30):
# a max-flow through a finite cut never overflows int32.
_FINITE_TOTAL = 2**29
_INF_CAP = 2**30


@dataclass
class FlowNetwork:
    """Directed edges with float capacities (``math.inf`` allowed); vertices 0 (source), 1 (sink)."""

    n: int
    tails: list[int]
    heads: list[int]
    caps: list[float]

    @classmethod
    def empty(cls, n: int) -> FlowNetwork:
        return cls(n, [], [], [])

    def add(self, u: int, v: int, cap: float) -> None:
        if cap > 0:
            self.tails.append(u)
            self.heads.append(v)
            self.caps.append(cap)


@dataclass(frozen=True)
class Cut:
    source_side: np.ndarray  # bool per vertex
    value: float             # in the network's (unscaled) units; inf if every cut is infinite
    scale: float             # capacity units per int32 unit used by the solver (1.0 = exact)


def min_cut(net: FlowNetwork) -> Cut:
    """The minimum s-t cut with the largest source side (see the module docstring)."""
    # imported here: scipy takes ~0.3 s to import, and a compile that AOTAutograd's cache serves
    # (a restarted run) imports fxmem's backend without ever cutting a graph
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import breadth_first_order, maximum_flow

    caps = np.asarray(net.caps, dtype=np.float64)
    tails = np.asarray(net.tails, dtype=np.int64)
    heads = np.asarray(net.heads, dtype=np.int64)
    finite = np.isfinite(caps)
    total = float(caps[finite].sum()) if finite.any() else 0.0
    integral = bool(np.all(caps[finite] == np.round(caps[finite])))
    scale = 1.0 if (integral and total < _FINITE_TOTAL) else max(total / _FINITE_TOTAL, 1e-300)
    q = np.where(finite, np.round(np.where(finite, caps, 0.0) / scale), _INF_CAP).astype(np.int64)
    # parallel edges are summed by the sparse constructor; keep infinite ones infinite
    graph = csr_matrix((q, (tails, heads)), shape=(net.n, net.n))
    graph.data = np.minimum(graph.data, _INF_CAP).astype(np.int32)
    graph.eliminate_zeros()
    graph.sort_indices()
    result = maximum_flow(graph, SOURCE, SINK, method="dinic")
    flow = result.flow.tocsr()
    residual = (graph.astype(np.int64) - flow.astype(np.int64)).tocsr()
    residual.data = (residual.data > 0).astype(np.int8)
    residual.eliminate_zeros()
    # vertices that reach the sink in the residual graph: BFS from the sink over reversed edges
    reach_sink = breadth_first_order(residual.T.tocsr(), SINK, directed=True, return_predecessors=False)
    source_side = np.ones(net.n, dtype=bool)
    source_side[reach_sink] = False
    value = float(result.flow_value) * scale
    if result.flow_value >= _INF_CAP or result.flow_value < 0:  # an infinite path (int32 may wrap)
        value = INF
    return Cut(source_side, value, scale)
