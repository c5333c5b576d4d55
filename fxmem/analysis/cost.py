"""FLOP and byte cost model per ATen op — read-only.

FLOPs come from ``torch.utils.flop_counter``'s registry (mm, addmm, bmm, baddbmm, convolution and
its backward, the CUDA attention kernels), plus the CPU flash attention forward and backward
(``_scaled_dot_product_flash_attention_for_cpu``), which ``FlopCounterMode`` counts as 0 — a
partitioner that trusts it thinks CPU attention is free to recompute. Every other op counts 0
FLOPs here: its cost is the bytes it moves (inputs read + outputs written), which is what bounds
pointwise and reduction ops on real hardware.

Bytes are counted two ways. ``graph_cost(gm)`` charges every ATen node its inputs and outputs, as
the graph runs op by op (``codegen="eager"``). ``graph_cost(gm, fused=True)`` charges what
Inductor's kernels move: a pointwise op fused into its users (the fusion model of
:mod:`fxmem.analysis.timeline`) moves nothing, a view moves nothing, and every other node reads
the buffers its kernel reads (through the ops fused into it, each storage once) and writes its
output. An op whose own implementation moves more than its inputs and outputs (a custom op that
loops over chunks) says how much through :func:`register_internal_bytes`.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch.utils import flop_counter

from fxmem.analysis.saved import forward_outputs
from fxmem.analysis.sizes import is_alias_op, node_bytes, storage_root, tensor_bytes
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


_INTERNAL_BYTES: dict = {}


def register_internal_bytes(op, fn) -> None:
    """``fn(node) -> int``: the bytes ``op`` moves inside itself beyond reading its inputs and
    writing its outputs once (the intermediates of a chunked loop: each chunk's logits written
    and read again). Like ``flop_counter.register_flop_formula``, called where the op is defined."""
    _INTERNAL_BYTES[getattr(op, "default", op)] = fn


def internal_bytes(node: fx.Node) -> int:
    fn = _INTERNAL_BYTES.get(node.target) if node.op == "call_function" else None
    return int(fn(node)) if fn is not None else 0


def node_bytes_moved(node: fx.Node) -> int:
    """Bytes read (tensor inputs) plus bytes written (outputs) by one node, plus what it moves
    inside itself (:func:`register_internal_bytes`)."""
    if node.op != "call_function":
        return 0
    read = 0
    for arg in node.all_input_nodes:
        val = arg.meta.get("val")
        if isinstance(val, torch.Tensor):
            read += tensor_bytes(val)
    val = node.meta.get("val")
    return read + _written(node) + internal_bytes(node)


def _written(node: fx.Node) -> int:
    val = node.meta.get("val")
    return sum(tensor_bytes(v) for v in (val if isinstance(val, (list, tuple)) else [val]) if isinstance(v, torch.Tensor))


def _fused_bytes_moved(gm: fx.GraphModule) -> int:
    """Bytes Inductor's kernels move for ``gm`` (see the module docstring)."""
    from fxmem.analysis.timeline import inductor_fusion, kernel_reads  # the fusion model (it imports the codegen)

    outputs = {storage_root(n) for n in forward_outputs(gm) if isinstance(n, fx.Node)}
    skip, _ = inductor_fusion(gm, outputs)
    moved = 0
    for node in gm.graph.nodes:
        if node.op != "call_function" or node in skip or is_alias_op(node) or node.target is operator.getitem:
            continue
        reads = set(kernel_reads(node, skip))  # each storage once
        moved += sum(tensor_bytes(r.meta.get("val")) for r in reads if isinstance(r.meta.get("val"), torch.Tensor))
        moved += _written(node) + internal_bytes(node)
    return moved


@dataclass(frozen=True)
class GraphCost:
    flops: int
    bytes_moved: int
    matmul_nodes: int


def graph_cost(gm: fx.GraphModule, *, fused: bool = False) -> GraphCost:
    """Total FLOPs and bytes moved by a graph, and how many compute-bound nodes it has.
    ``fused``: bytes as Inductor's kernels move them, not op by op (module docstring)."""
    flops = moved = mm = 0
    for node in gm.graph.nodes:
        flops += node_flops(node)
        moved += 0 if fused else node_bytes_moved(node)
        mm += is_compute_bound(node)
    if fused:
        moved = _fused_bytes_moved(gm)
    return GraphCost(flops, moved, mm)


__all__ = ["node_flops", "node_bytes_moved", "register_internal_bytes", "internal_bytes", "is_compute_bound", "graph_cost", "GraphCost", "node_bytes"]
