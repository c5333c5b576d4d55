"""Liveness-based peak-memory estimate of running an FX graph — read-only.

The estimate walks the nodes in order. A node's output storage is allocated when it runs (views
allocate nothing: they join their root's storage) and freed after the last use of any alias of
it. Inputs (placeholders that are not parameters) are live for the whole run, since the caller
holds them; graph outputs stay live to the end. Parameters and frozen constants are excluded:
they are reported as parameter bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx

from fxmem.analysis.sizes import is_parameter_node, node_bytes, storage_root


@dataclass(frozen=True)
class PeakEstimate:
    peak_bytes: int
    peak_node: str | None
    input_bytes: int


def last_uses(gm: fx.GraphModule, runs_at: dict[fx.Node, int] | None = None) -> dict[fx.Node, int]:
    """Position (in node order) of the last use of each storage root, over all aliases of it.

    ``runs_at``: where each node's reads really happen, when that is later than its own position
    (a fused op reads its inputs in the kernel it is fused into); default: its position.
    """
    nodes = list(gm.graph.nodes)
    position = {n: i for i, n in enumerate(nodes)}
    at = runs_at if runs_at is not None else position
    last: dict[fx.Node, int] = {}
    for node in nodes:
        root = storage_root(node)
        last[root] = max(last.get(root, position[root]), at[node])
        for user in node.users:
            last[root] = max(last[root], at[user])
    return last


def estimate_peak(gm: fx.GraphModule) -> PeakEstimate:
    """Peak of live activation bytes while running ``gm`` node by node (see module docstring)."""
    nodes = list(gm.graph.nodes)
    last_use = last_uses(gm)
    output_roots = {storage_root(n) for n in nodes if any(u.op == "output" for u in n.users)}
    frees: dict[int, list[fx.Node]] = {}
    for root, pos in last_use.items():
        if root in output_roots or root.op == "placeholder":
            continue
        frees.setdefault(pos, []).append(root)

    live = 0
    input_bytes = 0
    for node in nodes:
        if node.op == "placeholder" and not is_parameter_node(node):
            input_bytes += node_bytes(node)
    live = input_bytes
    peak, peak_node = live, None
    for i, node in enumerate(nodes):
        if node.op in ("call_function", "call_module", "call_method") and storage_root(node) is node:
            live += node_bytes(node) if not is_parameter_node(node) else 0
        if live > peak:
            peak, peak_node = live, node.name
        for root in frees.get(i, ()):
            if root.op in ("call_function", "call_module", "call_method") and not is_parameter_node(root):
                live -= node_bytes(root)
    return PeakEstimate(peak_bytes=peak, peak_node=peak_node, input_bytes=input_bytes)
