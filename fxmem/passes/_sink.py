"""Sink matmuls in a backward graph to just before their first use, when that frees memory.

AOTAutograd's backward order (``reordering_to_mimic_autograd_engine``) follows the autograd
engine: a linear layer's input gradient ``mm(grad, w)`` comes first, then its weight gradient.
When the weight gradient reads a *recomputed* activation, the recomputation sits just before it
— after the input gradient, whose output then stays alive across the recomputation without
being read::

    before:                                        after:
    mm   = mm(grad, w_down)        # 24 MiB        gelu = gelu(pre)                # recomputed
    gelu = gelu(pre)               # 24 MiB        dw   = mm(grad.T, gelu)         # gelu freed
    dw   = mm(grad.T, gelu)        # gelu freed    mm   = mm(grad, w_down)         # 24 MiB
    dpre = gelu_backward(mm, pre)                  dpre = gelu_backward(mm, pre)

Rule: a compute-bound node (matmul, convolution, attention: :func:`~fxmem.analysis.cost.is_compute_bound`)
moves, with the views of its output, down to just before the first node that reads them, or
sooner: to just before the last other read of a tensor it reads (a parameter's life is free).
So every tensor it reads is alive down there anyway, and the move only shortens its output's
life: the live bytes at every point of the graph stay equal or fall, never rise. Pointwise ops are left where they are (Inductor fuses
them with their neighbours), and nothing moves across a mutation, a collective or another side
effect. A random op is no barrier: moving a pure matmul across it changes neither value nor the
order of the draws — and every SDPA forward op is tagged random (for its dropout), so a
recomputed attention would otherwise pin the input gradient above it (4 SDPA blocks at budget
0.0: 9 MiB on the step's peak). A random node itself never moves.
Exact: the same ops on the same values, in another valid order.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from fxmem.analysis.cost import is_compute_bound
from fxmem.analysis.sizes import is_alias_op, storage_root


def _impure(node: fx.Node) -> bool:
    return node.op == "call_function" and node.is_impure()


def _only_draws_random(node: fx.Node) -> bool:
    """``node`` is impure only because it may draw random numbers: an op tagged
    ``nondeterministic_seeded`` that mutates nothing. Every SDPA forward op is tagged so (for its
    dropout), also with ``dropout_p=0``. Moving a pure node across it changes neither its result
    nor the order of the random draws."""
    target = node.target
    return (isinstance(target, torch._ops.OpOverload) and torch.Tag.nondeterministic_seeded in target.tags
            and not target._schema.is_mutable)


def _barrier(node: fx.Node) -> bool:
    """Nothing moves across ``node``: it mutates, communicates or has another side effect."""
    return _impure(node) and not _only_draws_random(node)


def _with_views(node: fx.Node) -> list[fx.Node]:
    """``node`` and every view of its output (transitively), in graph order."""
    group, stack = {node}, [node]
    while stack:
        for user in stack.pop().users:
            if user not in group and is_alias_op(user) and not _impure(user) and storage_root(user) is node:
                group.add(user)
                stack.append(user)
    return [n for n in node.graph.nodes if n in group]


def sink_compute(graph: fx.Graph, parameters: set[fx.Node]) -> int:
    """Sink the compute-bound nodes of ``graph`` (see the module docstring); returns how many moved.

    ``parameters``: placeholders whose tensors outlive the graph (their lifetime is free).
    """
    moved = 0
    candidates = [n for n in graph.nodes if n.op == "call_function" and is_compute_bound(n) and not _impure(n)]
    # who reads each storage: moving nodes changes the order, never the edges
    readers: dict[fx.Node, list[fx.Node]] = {}
    for other in graph.nodes:
        for inp in other.all_input_nodes:
            readers.setdefault(storage_root(inp), []).append(other)
    for node in reversed(candidates):  # later nodes first: an earlier one may then sink past them
        order = {n: i for i, n in enumerate(graph.nodes)}
        group = _with_views(node)
        members = set(group)
        consumers = [u for m in group for u in m.users if u not in members]
        if not consumers:
            continue
        # the storages the group reads must stay alive down to the new place anyway: it goes just
        # before its first consumer, or before the last read of an input if that comes sooner
        inputs = {storage_root(i) for m in group for i in m.all_input_nodes
                  if i not in members and isinstance(i.meta.get("val"), torch.Tensor)}
        last_reads = [max((order[u] for u in readers.get(r, ()) if u not in members), default=-1)
                      for r in inputs if r not in parameters]
        start = order[node]
        stop = min([order[u] for u in consumers] + last_reads)
        nodes = list(graph.nodes)
        between = [n for n in nodes[start + 1:max(stop, start + 1)] if n not in members]
        if not between or any(_barrier(n) for n in between):
            continue
        target = nodes[stop]
        for member in group:
            target.prepend(member)
        moved += 1
    return moved
