"""Placement propagation: DTensor placements of every node of a global ATen graph, and the
collectives they imply (read-only; used by :func:`fxmem.shard.plan`).

Given the placements of the parameters of a *global* (single-device) ATen graph (``Shard(0)`` for
a column-parallel weight, ...), :func:`propagate_placements` walks the graph in order and asks
DTensor's own sharding propagator (the rules ``DTensor`` uses at run time) for each node's output
placement and for the input placements it needs. Where an input must change placement, the
collective that implies (``Partial → Replicate`` = all-reduce, ``Shard → Replicate`` =
all-gather, ...) is recorded. Ops without a DTensor rule fall back to "everything replicated", as
``_tp_transform`` does.

Example (a Megatron MLP, ``w1`` column-parallel, ``w2`` row-parallel, 2 ranks)::

    t = aten.t(w1)          # Shard(1)
    mm = aten.mm(x, t)      # Shard(1)
    gelu = aten.gelu(mm)    # Shard(1)
    t_1 = aten.t(w2)        # Shard(0)
    mm_1 = aten.mm(gelu, t_1)   # Partial(sum) → all_reduce at the output (Replicate)

The graph is not changed; :meth:`Propagation.annotate` writes the placements into ``node.meta``
when the caller wants them there. No process group is needed (:func:`planning_mesh`).
"""

from __future__ import annotations

import operator
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from fxmem.analysis.sizes import node_bytes

PLACEMENT_KEY = "fxmem_placement"      # str, e.g. "Shard(1)", "Replicate()", "Partial(sum)"
REDISTRIBUTE_KEY = "fxmem_redistribute"  # list of Redistribution implied at this node (plans)


@dataclass(frozen=True)
class Redistribution:
    """An input (or the output) of ``node`` that must change placement: one collective."""

    node: str
    arg: str           # the input node's name, or "output"
    src: str
    dst: str
    kind: str          # all_reduce | all_gather | reduce_scatter | all_to_all
    bytes: int         # bytes of the global tensor


@dataclass
class Propagation:
    """The placements of every node of a global graph, and the collectives they imply."""

    placements: dict[str, Any] = field(default_factory=dict)   # node name -> Placement or tuple
    redistributions: list[Redistribution] = field(default_factory=list)
    no_rule: list[str] = field(default_factory=list)           # ops DTensor has no rule for

    def collectives(self) -> Counter:
        return Counter(r.kind for r in self.redistributions)

    def annotate(self, gm: fx.GraphModule) -> None:
        """Write the result into the graph it was computed on: ``meta[PLACEMENT_KEY]`` on every
        placed node, ``meta[REDISTRIBUTE_KEY]`` (the collectives) on the nodes that need them."""
        for node in gm.graph.nodes:
            placement = self.placements.get(node.name)
            if placement is not None:
                node.meta[PLACEMENT_KEY] = placement_str(placement)
            node.meta.pop(REDISTRIBUTE_KEY, None)
        by_name = {n.name: n for n in gm.graph.nodes}
        for r in self.redistributions:
            by_name[r.node].meta.setdefault(REDISTRIBUTE_KEY, []).append(r)


def placement_str(placement) -> str:
    """``Shard(1)`` → ``"S(1)"``-style text as DTensor prints it; a tuple of them in parentheses."""
    if isinstance(placement, tuple):
        return "(" + ", ".join(str(p) for p in placement) + ")"
    return str(placement)


def collective_kind(src, dst) -> str | None:
    """The collective a placement change costs (None: local, no communication)."""
    if src == dst:
        return None
    if src.is_partial():
        return "all_reduce" if dst.is_replicate() else "reduce_scatter" if dst.is_shard() else None
    if src.is_shard():
        return "all_gather" if dst.is_replicate() else "all_to_all" if dst.is_shard() else "all_gather"
    return None  # Replicate -> Shard / Partial: a local slice, no communication


def planning_mesh(world_size: int):
    """A DeviceMesh for planning only: no process group is created or needed."""
    from torch.distributed.device_mesh import DeviceMesh

    return DeviceMesh("cpu", torch.arange(world_size), _init_backend=False, _rank=0)


def _tensor_meta(val: torch.Tensor):
    from torch.distributed.tensor._dtensor_spec import TensorMeta

    return TensorMeta(shape=val.shape, stride=val.stride(), dtype=val.dtype)


def _spec(mesh, placement, val):
    from torch.distributed.tensor._dtensor_spec import DTensorSpec

    return DTensorSpec(mesh, (placement,), _tensor_meta(val))


def _placements_of(spec) -> Any:
    """DTensor output spec(s) → one placement, or a tuple of them (None for non-tensors)."""
    from torch.distributed.tensor._dtensor_spec import DTensorSpec

    if isinstance(spec, DTensorSpec):
        return spec.placements[0]
    if isinstance(spec, (tuple, list)):
        return tuple(_placements_of(s) for s in spec)
    return None


def propagate_placements(gm: fx.GraphModule, seeds: dict[str, Any], world_size: int, *,
                         force: dict[str, Any] | None = None, outputs_replicated: bool = True) -> Propagation:
    """Placements of every node of a global (single-device) ATen graph.

    ``seeds``: node name → placement for parameter (``get_attr``/placeholder) nodes; every other
    input is ``Replicate()``. ``force``: node name → placement its output is redistributed to
    right after it (what a ``parallelize_module`` style does at a module's output). The graph's
    outputs are made ``Replicate()`` when ``outputs_replicated``.

    Read-only: the graph is not touched (:meth:`Propagation.annotate` writes the result into
    ``node.meta``). Ops DTensor has no rule for are replicated and listed in ``no_rule``; the CPU
    flash-attention rules fxmem adds are registered by :func:`fxmem.dtensor_rules.register`
    (``fxmem.shard.plan`` / ``apply`` call it), not here.
    """
    from torch.distributed.tensor import DTensor, Replicate
    from torch.distributed.tensor._op_schema import OpSchema

    mesh = planning_mesh(world_size)
    prop = DTensor._op_dispatcher.sharding_propagator
    force = force or {}
    result = Propagation()
    specs: dict[fx.Node, Any] = {}
    replicate = Replicate()

    def record(node, arg_name, src, dst, val) -> None:
        kind = collective_kind(src, dst)
        if kind is not None:
            nbytes = node_bytes(val) if isinstance(val, fx.Node) else 0
            result.redistributions.append(Redistribution(node.name, arg_name, str(src), str(dst), kind, nbytes))

    def set_node(node, placement):
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            specs[node] = _spec(mesh, placement, val)
        elif isinstance(val, (tuple, list)) and isinstance(placement, tuple):
            specs[node] = tuple(_spec(mesh, p, v) if isinstance(v, torch.Tensor) and p is not None else None
                                for p, v in zip(placement, val))
        result.placements[node.name] = placement

    def arg_schema(a):
        if isinstance(a, fx.Node):
            if a in specs and not isinstance(specs[a], tuple):
                return specs[a]
            return a.meta.get("val")
        if isinstance(a, list):
            return [arg_schema(x) for x in a]
        if isinstance(a, tuple):
            return tuple(arg_schema(x) for x in a)
        return a

    def tensor_args(node):
        return [a for a in node.all_input_nodes if a in specs and not isinstance(specs[a], tuple)]

    for node in gm.graph.nodes:
        if node.op in ("placeholder", "get_attr"):
            if isinstance(node.meta.get("val"), torch.Tensor):
                set_node(node, seeds.get(node.name, replicate))
            continue
        if node.op == "output":
            if outputs_replicated:
                for a in node.all_input_nodes:
                    p = result.placements.get(a.name)
                    if p is not None and not isinstance(p, tuple) and not p.is_replicate():
                        record(node, a.name, p, replicate, a)
            continue
        if node.op != "call_function":
            continue
        if node.target is operator.getitem:
            src = node.args[0]
            placements = result.placements.get(src.name)
            if isinstance(placements, tuple):
                set_node(node, placements[node.args[1]])
            continue
        vals = node.meta.get("val")
        if not isinstance(vals, (torch.Tensor, tuple, list)):
            continue
        inputs = tensor_args(node)
        op = node.target
        out_placement = None
        if isinstance(op, torch._ops.OpOverload) and inputs:
            if all(specs[a].placements[0].is_replicate() for a in inputs):
                out_placement = None  # fast path below: all replicated in, replicated out
            else:
                schema = OpSchema(op, tuple(arg_schema(a) for a in node.args),
                                  {k: arg_schema(v) for k, v in node.kwargs.items()})
                try:
                    sharding = prop.propagate_op_sharding_non_cached(schema)
                except Exception:  # noqa: BLE001 - no rule, or the rule refuses: replicate (as _tp_transform does)
                    sharding = None
                    result.no_rule.append(f"{node.name} ({op})")
                if sharding is not None and sharding.output_spec is not None:
                    wanted = sharding.redistribute_schema.args_spec if sharding.redistribute_schema is not None else None
                    if wanted is not None:
                        current = [s for s in (arg_schema(a) for a in _flat_args(node)) if _is_spec(s)]
                        for cur, want in zip(current, wanted):
                            src_node = _node_of(node, cur, specs)
                            record(node, src_node.name if src_node is not None else "?", cur.placements[0],
                                   want.placements[0], src_node)
                    out_placement = _placements_of(sharding.output_spec)
                else:
                    for a in inputs:
                        record(node, a.name, specs[a].placements[0], replicate, a)
        if out_placement is None:
            out_placement = replicate if isinstance(vals, torch.Tensor) else tuple(
                replicate if isinstance(v, torch.Tensor) else None for v in vals)
        if node.name in force and not isinstance(out_placement, tuple) and out_placement != force[node.name]:
            record(node, "output", out_placement, force[node.name], node)
            out_placement = force[node.name]
        set_node(node, out_placement)
    return result


def _flat_args(node: fx.Node) -> list:
    flat = []
    for a in list(node.args) + list(node.kwargs.values()):
        if isinstance(a, (list, tuple)):
            flat.extend(a)
        else:
            flat.append(a)
    return flat


def _is_spec(x) -> bool:
    from torch.distributed.tensor._dtensor_spec import DTensorSpec

    return isinstance(x, DTensorSpec)


def _node_of(node: fx.Node, spec, specs: dict) -> fx.Node | None:
    for a in node.all_input_nodes:
        if specs.get(a) is spec:
            return a
    return None


__all__ = [
    "PLACEMENT_KEY", "REDISTRIBUTE_KEY", "Redistribution", "Propagation", "collective_kind", "planning_mesh",
    "placement_str", "propagate_placements",
]
