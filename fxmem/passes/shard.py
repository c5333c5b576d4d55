"""Sharding annotations: DTensor placements on every node, and the collectives they imply.

Two jobs, one module:

* :func:`propagate_placements` (used by :func:`fxmem.shard.plan`): given the placements of the
  parameters of a *global* ATen graph (``Shard(0)`` for a column-parallel weight, ...), walk the
  graph in order and ask DTensor's own sharding propagator (the rules ``DTensor`` uses at run
  time) for each node's output placement and for the input placements it needs. Where an input
  must change placement, the collective that implies (``Partial → Replicate`` = all-reduce,
  ``Shard → Replicate`` = all-gather, ...) is recorded on the node. Ops without a DTensor rule
  fall back to "everything replicated", as ``_tp_transform`` does.

* :func:`annotate` — the pipeline pass ``"shard"`` (stages inference, forward, backward). Graphs
  compiled from a model that :func:`fxmem.shard.apply` parallelized hold the *local* computation
  of one rank and PyTorch's functional collectives (``_c10d_functional.all_reduce`` + ``wait_tensor``
  ...), which AOTAutograd put there when it traced the DTensors. The pass marks each node with a
  placement (``Partial`` before an all-reduce, ``Replicate`` after it, ``Shard`` into an
  all-gather, ...) and each collective with its kind, bytes and group size, so that explain()
  lists them and the memory figures of the report are per-rank figures (the graph's tensors are
  already local). A graph with no collective is left alone at the cost of one scan.

Before / after (the pass only adds metadata; the code is unchanged)::

    mm = aten.mm(x, t)                                   # meta: placement Partial(sum)
    all_reduce = _c10d_functional.all_reduce(mm, 'sum', '0')   # meta: collective all_reduce, 512 B
    wait = _c10d_functional.wait_tensor(all_reduce)      # meta: placement Replicate()

Preconditions: every computing node carries ``meta["val"]``. Numerical promise: exact — the pass
never changes the graph's code. fxmem implements no communication of its own.
"""

from __future__ import annotations

import operator
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from fxmem.analysis.sizes import node_bytes, parameter_bytes
from fxmem.config import ShardConfig
from fxmem.passes.base import PassContext, PassResult

PLACEMENT_KEY = "fxmem_placement"      # str, e.g. "Shard(1)", "Replicate()", "Partial(sum)"
COLLECTIVE_KEY = "fxmem_collective"    # dict: kind, bytes, group_size (on collective nodes)
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


def register_cpu_sdpa_rules() -> None:
    """Heads-parallel (and batch-parallel) DTensor rules for CPU flash attention.

    DTensor has rules for the CUDA SDPA kernels but none for
    ``aten._scaled_dot_product_flash_attention_for_cpu`` (and its backward), which is what
    ``F.scaled_dot_product_attention`` runs on CPU. Attention is independent per head and per
    batch row, so ``Shard(0)``/``Shard(1)`` of q, k, v give the same shard of the output (and of
    the gradients). Registered through the public ``register_sharding`` once per process.
    """
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor.experimental import register_sharding

    aten = torch.ops.aten
    fwd = aten._scaled_dot_product_flash_attention_for_cpu.default
    bwd = aten._scaled_dot_product_flash_attention_for_cpu_backward.default
    prop = DTensor._op_dispatcher.sharding_propagator
    if fwd in prop.op_strategy_funcs and bwd in prop.op_strategy_funcs:
        return

    def mask_placement(mask, p):
        if mask is None:
            return None
        if p.is_shard() and mask.shape[p.dim] == 1:
            return Replicate()  # a mask broadcast over heads (or batch) is the same on every rank
        return p

    @register_sharding(fwd)
    def _sdpa_cpu(q, k, v, dropout_p=0.0, is_causal=False, attn_mask=None, scale=None):
        rules = []
        for p in (Replicate(), Shard(0), Shard(1)):
            rules.append(([p, p], [p, p, p, None, None, mask_placement(attn_mask, p), None]))
        return rules

    @register_sharding(bwd)
    def _sdpa_cpu_backward(grad, q, k, v, out, lse, dropout_p=0.0, is_causal=False, attn_mask=None, scale=None):
        rules = []
        for p in (Replicate(), Shard(0), Shard(1)):
            rules.append(([p, p, p], [p] * 6 + [None, None, mask_placement(attn_mask, p), None]))
        return rules


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
    outputs are made ``Replicate()`` when ``outputs_replicated``. Annotates ``node.meta``.
    """
    from torch.distributed.tensor import DTensor, Replicate
    from torch.distributed.tensor._op_schema import OpSchema

    register_cpu_sdpa_rules()
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
        node.meta[PLACEMENT_KEY] = str(placement) if not isinstance(placement, tuple) else \
            "(" + ", ".join(str(p) for p in placement) + ")"

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
    by_name = {n.name: n for n in gm.graph.nodes}
    for r in result.redistributions:
        by_name[r.node].meta.setdefault(REDISTRIBUTE_KEY, []).append(r)
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


# --------------------------------------------------------------------------------------------
# The pipeline pass: annotate compiled per-rank graphs that hold functional collectives.
# --------------------------------------------------------------------------------------------

_COLLECTIVE_KINDS = {
    "all_reduce": "all_reduce", "all_reduce_": "all_reduce",
    "all_gather_into_tensor": "all_gather", "all_gather_into_tensor_out": "all_gather",
    "reduce_scatter_tensor": "reduce_scatter", "all_to_all_single": "all_to_all",
    "broadcast": "broadcast", "all_reduce_coalesced": "all_reduce",
}


def _collective(node: fx.Node) -> str | None:
    target = node.target
    if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
        return None
    if target.namespace not in ("_c10d_functional", "c10d_functional", "_c10d_functional_autograd"):
        return None
    return _COLLECTIVE_KINDS.get(target._opname)


def _group_size(node: fx.Node) -> int | None:
    schema = node.target._schema
    for arg, value in zip(schema.arguments, node.args):
        if arg.name == "group_size" and isinstance(value, int):
            return value
    for arg, value in zip(schema.arguments, node.args):
        if arg.name == "group_name" and isinstance(value, str):
            try:  # the group by name, when this process belongs to it
                from torch.distributed.distributed_c10d import _resolve_process_group

                return _resolve_process_group(value).size()
            except Exception:  # noqa: BLE001 - a graph traced elsewhere: size unknown here
                return None
    return None


def annotate(gm: fx.GraphModule, config: ShardConfig = ShardConfig(), ctx: PassContext = PassContext()) -> PassResult:
    """The ``"shard"`` pass: mark placements and collectives in a per-rank graph (metadata only)."""
    collectives = [(n, kind) for n in gm.graph.nodes if (kind := _collective(n)) is not None]
    if not collectives:
        return PassResult(gm, False, {})
    counts: Counter = Counter()
    comm_bytes = 0
    group_sizes = set()
    rows = []
    for node, kind in collectives:
        src = node.args[0]
        nbytes = node_bytes(src) if isinstance(src, fx.Node) else 0
        size = _group_size(node)
        if size is not None:
            group_sizes.add(size)
        node.meta[COLLECTIVE_KEY] = {"kind": kind, "bytes": nbytes, "group_size": size}
        counts[kind] += 1
        comm_bytes += nbytes
        before, after = {"all_reduce": ("Partial(sum)", "Replicate()"), "all_gather": ("Shard", "Replicate()"),
                         "reduce_scatter": ("Partial(sum)", "Shard"), "all_to_all": ("Shard", "Shard")}.get(kind, ("?", "?"))
        if isinstance(src, fx.Node):
            src.meta[PLACEMENT_KEY] = before
        waits = [u for u in node.users if u.op == "call_function" and getattr(u.target, "_opname", "") == "wait_tensor"]
        for w in waits:
            w.meta[PLACEMENT_KEY] = after
        rows.append({"node": node.name, "collective": kind, "input": src.name if isinstance(src, fx.Node) else str(src),
                     "bytes": nbytes, "group_size": size})
    stats = {
        "world_size": max(group_sizes) if group_sizes else None,
        "collectives": dict(counts),
        "comm_bytes": comm_bytes,
        "per_rank_param_bytes": parameter_bytes(gm),
        "rows": rows,
    }
    return PassResult(gm, False, stats)
