"""FLOP and byte cost model per ATen op — read-only.

FLOPs come from ``torch.utils.flop_counter``'s registry (mm, addmm, bmm, baddbmm, convolution and
its backward, the CUDA attention kernels), plus the CPU flash attention forward and backward
(``_scaled_dot_product_flash_attention_for_cpu``), which ``FlopCounterMode`` counts as 0 — a
partitioner that trusts it thinks CPU attention is free to recompute. Every other op counts 0
FLOPs here: its cost is the bytes it moves (inputs read + outputs written), which is what bounds
pointwise and reduction ops on real hardware.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx
from torch.utils import flop_counter

from fxmem.analysis.sizes import node_bytes, tensor_bytes
from fxmem.passes.base import val as _val  # one helper for every module

aten = torch.ops.aten


def _shape(x):
    return tuple(int(s) if not isinstance(s, torch.SymInt) else s.node.hint for s in x.shape)


def _sdpa_cpu_forward_flops(node: fx.Node) -> int:
    q, k, v = (_val(a) for a in node.args[:3])
    return int(flop_counter.sdpa_flop_count(_shape(q), _shape(k), _shape(v)))


def _sdpa_cpu_backward_flops(node: fx.Node) -> int:
    grad_out, q, k, v = (_val(a) for a in node.args[:4])
    return int(flop_counter.sdpa_backward_flop_count(_shape(grad_out), _shape(q), _shape(k), _shape(v)))


_EXTRA_FLOPS = {}
for _name, _fn in (
    ("_scaled_dot_product_flash_attention_for_cpu", _sdpa_cpu_forward_flops),
    ("_scaled_dot_product_flash_attention_for_cpu_backward", _sdpa_cpu_backward_flops),
    ("_scaled_dot_product_attention_math", _sdpa_cpu_forward_flops),
):
    if hasattr(aten, _name):
        _EXTRA_FLOPS[getattr(aten, _name)] = _fn

# Ops whose recomputation costs FLOPs (matmul-class and attention); "free" recomputation is
# recomputation of anything else.
COMPUTE_BOUND_PACKETS = frozenset(
    list(flop_counter.flop_registry) + list(_EXTRA_FLOPS)
)


def _packet(node: fx.Node):
    target = node.target
    return getattr(target, "overloadpacket", target)


def node_flops(node: fx.Node) -> int:
    """FLOPs of one node (0 for ops that are not matmul, convolution or attention)."""
    if node.op != "call_function":
        return 0
    packet = _packet(node)
    if packet in _EXTRA_FLOPS:
        return _EXTRA_FLOPS[packet](node)
    fn = flop_counter.flop_registry.get(packet)
    if fn is None:
        return 0
    args = torch.fx.node.map_arg(node.args, _val)
    kwargs = torch.fx.node.map_arg(node.kwargs, _val)
    out = node.meta.get("val")
    try:
        return int(fn(*args, **kwargs, out_val=out))
    except Exception:  # an unusual overload: count it as compute-bound without a figure
        return 0


def is_compute_bound(node: fx.Node) -> bool:
    """True for matmul, convolution and attention ops: recomputing them costs FLOPs.

    The registry is read at call time: custom ops register their FLOP formulas when their module
    is imported (``fxmem::linear_cross_entropy``), possibly after this one.
    """
    if node.op != "call_function":
        return False
    packet = _packet(node)
    return packet in COMPUTE_BOUND_PACKETS or packet in flop_counter.flop_registry


def node_bytes_moved(node: fx.Node) -> int:
    """Bytes read (tensor inputs) plus bytes written (outputs) by one node."""
    if node.op != "call_function":
        return 0
    read = 0
    for arg in node.all_input_nodes:
        val = arg.meta.get("val")
        if isinstance(val, torch.Tensor):
            read += tensor_bytes(val)
    val = node.meta.get("val")
    written = sum(tensor_bytes(v) for v in (val if isinstance(val, (list, tuple)) else [val]) if isinstance(v, torch.Tensor))
    return read + written


@dataclass(frozen=True)
class GraphCost:
    flops: int
    bytes_moved: int
    matmul_nodes: int


def graph_cost(gm: fx.GraphModule) -> GraphCost:
    """Total FLOPs and bytes moved by a graph, and how many compute-bound nodes it has."""
    flops = moved = mm = 0
    for node in gm.graph.nodes:
        flops += node_flops(node)
        moved += node_bytes_moved(node)
        mm += is_compute_bound(node)
    return GraphCost(flops, moved, mm)


__all__ = ["node_flops", "node_bytes_moved", "is_compute_bound", "graph_cost", "GraphCost", "node_bytes"]
