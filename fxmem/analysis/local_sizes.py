"""Per-rank sizes of a global training graph under tensor parallelism — read-only.

A tensor-parallel rank runs the same step as one process, on local shards: a column-parallel
layer's output, attention's heads and the row-parallel layer's input hold ``1/tp`` of their
elements; norms, the residual stream and the row-parallel output (all-reduced) are whole.
:func:`tp_local_sizes` finds which is which with **one propagation**
(:func:`fxmem.analysis.placement.propagate_placements`, DTensor's own sharding rules) over the
*joint* forward+backward graph fit estimates, seeded with the shard plan's parameter placements
(``ShardPlan.param_shard_dims``) and forced where the plan's ``parallelize_module`` styles
redistribute: a row-parallel layer's output and the vocabulary split's outputs to ``Replicate()``
in the forward, and — the backward of a column-parallel layer's ``Replicate`` input — its input
gradient all-reduced right there (left alone, DTensor's propagation would carry that ``Partial``
on through the norm's backward and gather the next weight instead). The result is a node name →
local fraction table and the bytes a collective keeps beside its output;
:func:`fxmem.analysis.sizes.local_sizes` makes every ``node_bytes`` read the local size while fit
partitions and walks its timeline.

Example (a Megatron MLP, tp 2, ``x`` ``[N, d]``, the joint graph)::

    addmm = aten.addmm(b1, x, t)     # t = w1ᵀ Shard(1)  → Shard(1): ½ per rank
    gelu = aten.gelu(addmm)          # Shard(1)                      ½
    addmm_1 = aten.addmm(b2, gelu, t_1)  # t_1 = w2ᵀ Shard(0) → Partial, forced Replicate: whole
    ...                              # (the all-reduce reuses the dying partial's buffer: nothing beside it)
    mm = aten.mm(grad, w2)           # the hidden gradient: Shard(1), ½
    mm_2 = aten.mm(grad_h, w1)       # x's gradient: Partial, forced Replicate (all-reduced): whole

Not modelled: DTensor's ``_MaskPartial`` mask of the vocabulary split (a ``[B, T]`` integer
tensor) and gloo's own staging buffers (outside PyTorch's allocator); an op DTensor has no rule
for (fxmem's chunked-loss ops) is counted whole, an over-estimate, and listed in ``no_rule``.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

aten = torch.ops.aten
# what lies between a weight placeholder and the matmul that reads it (a transpose, a dtype cast)
_TO_MATMUL = {aten.t.default, aten.permute.default, aten.transpose.int, aten.view.default,
              aten._to_copy.default, torch.ops.prims.convert_element_type.default}
_MATMULS = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.matmul.default}


@dataclass
class LocalSizes:
    """What one tensor-parallel rank holds of each node of a global graph."""

    # node name → (the global shape, the fraction of its elements one rank holds)
    fractions: dict[str, tuple[tuple[int, ...], float]] = field(default_factory=dict)
    # node name → bytes of collective buffers alive while that node runs (beside its inputs and output)
    transients: dict[str, int] = field(default_factory=dict)
    collectives: Counter = field(default_factory=Counter)
    # nodes whose output a collective makes on the rank (a row-parallel product all-reduced, the
    # vocabulary split's lookup all-reduced, its logits gathered): a rank's partitioner cannot
    # recompute them in the backward (a collective is impure), so they are saved or recomputed from
    # nothing upstream of them — fit bans their recomputation as the rank's compile does
    collective_outputs: list[str] = field(default_factory=list)
    redistributions: list = field(default_factory=list)  # fxmem.analysis.placement.Redistribution
    no_rule: list[str] = field(default_factory=list)

    def local_bytes(self, node: fx.Node, nbytes: int) -> int:
        hit = self.fractions.get(node.name)
        val = node.meta.get("val")
        if hit is None or not isinstance(val, torch.Tensor) or tuple(val.shape) != hit[0]:
            return nbytes  # a node the propagation did not see (made by a later pass): whole
        return int(nbytes * hit[1])


def _plan_name(fqn: str, planned: dict) -> str:
    """``fqn`` as the plan names it: fit traces HF models inside a wrapper (``0.model.layers...``),
    the plan the model itself (``model.layers...``); the longest suffix the plan knows."""
    parts = fqn.split(".")
    for i in range(len(parts)):
        name = ".".join(parts[i:])
        if name in planned:
            return name
    return fqn


def _fraction(placement, val, tp: int) -> float:
    if placement is None or not hasattr(placement, "is_shard") or not placement.is_shard():
        return 1.0  # Replicate, Partial: every rank holds the whole shape
    dim = placement.dim if placement.dim >= 0 else placement.dim + val.dim()
    size = int(val.shape[dim]) if 0 <= dim < val.dim() else 0
    if size == 0:
        return 1.0
    return -(-size // tp) / size  # torch.chunk: the largest shard


def _weight_matmuls(weight: fx.Node) -> list[fx.Node]:
    """The matmuls that read ``weight`` through a transpose / cast, in graph order: the forward's
    product first, then the backward's input gradient (the joint graph runs forward first)."""
    frontier, found = [weight], []
    seen = set()
    while frontier:
        n = frontier.pop()
        for u in n.users:
            if u in seen or u.op != "call_function":
                continue
            seen.add(u)
            if u.target in _MATMULS:
                found.append(u)
            elif u.target in _TO_MATMUL:
                frontier.append(u)
    order = {n: i for i, n in enumerate(weight.graph.nodes)}
    return sorted(found, key=order.__getitem__)


def _embedding_of(weight: fx.Node) -> fx.Node | None:
    uses = [u for u in weight.users if u.op == "call_function" and u.target == aten.embedding.default]
    return uses[0] if uses else None


def tp_local_sizes(joint: fx.GraphModule, param_names: dict[int, str], tp_plan, tp: int,
                   num_fwd_outputs: int) -> LocalSizes:
    """Per-rank sizes of ``joint`` (a global forward+backward ATen graph) under ``tp_plan``
    (:class:`fxmem.shard.tensor_parallel.ShardPlan`) over ``tp`` ranks.

    ``param_names``: placeholder index → the parameter's qualified name (as
    :func:`fxmem.backend.parameter_inputs` gives them); ``num_fwd_outputs``: the joint graph's
    forward outputs (the gradients follow, one per input). Read-only: the graph is not changed."""
    from torch.distributed.tensor import Replicate, Shard

    from fxmem import dtensor_rules
    from fxmem.analysis.placement import propagate_placements

    dtensor_rules.register()  # CPU flash attention's rules (forward and backward), as plan/apply do
    placeholders = [n for n in joint.graph.nodes if n.op == "placeholder"]
    by_name: dict[str, fx.Node] = {}
    for i, fqn in param_names.items():
        if i < len(placeholders):
            by_name[_plan_name(fqn, tp_plan.param_shard_dims)] = placeholders[i]
    seeds: dict[str, Any] = {}
    for fqn, node in by_name.items():
        dim = tp_plan.param_shard_dims.get(fqn)
        if dim is not None:
            seeds[node.name] = Shard(dim)
    force: dict[str, Any] = {}

    def matmuls(module: str) -> list[fx.Node]:
        w = by_name.get(f"{module}.weight")
        return _weight_matmuls(w) if w is not None else []

    # RowwiseParallel(output_layouts=Replicate()): the row-parallel product is all-reduced at once
    for g in tp_plan.groups:
        for mm in matmuls(g.rowwise)[:1]:
            force[mm.name] = Replicate()
    heads = [m for m, kind in tp_plan.vocab.items() if kind == "head"]
    for module in heads:  # the vocabulary head's Shard(-1) logits are all-gathered
        for mm in matmuls(module)[:1]:
            force[mm.name] = Replicate()
    # a column-parallel layer's input is a Replicate DTensor made from the local input: the
    # backward of that boundary all-reduces the Partial input gradient right there (DTensor's
    # own propagation would carry the Partial on through the norm's backward instead)
    for module in [m for g in tp_plan.groups for m in g.colwise] + heads:
        for mm in matmuls(module)[1:]:
            force[mm.name] = Replicate()
    for module in (m for m, kind in tp_plan.vocab.items() if kind == "embedding"):
        w = by_name.get(f"{module}.weight")
        emb = _embedding_of(w) if w is not None else None
        if emb is not None:
            force[emb.name] = Replicate()  # the _MaskPartial lookup all-reduced
    prop = propagate_placements(joint, seeds, tp, force=force, outputs_replicated=False)
    # a sharded parameter's gradient is a shard, whatever DTensor's rules (or their absence: the
    # embedding's backward) made of the op that computes it
    grad_fraction: dict[str, float] = {}
    (output,) = [n for n in joint.graph.nodes if n.op == "output"]
    outs = list(output.args[0]) if isinstance(output.args[0], (list, tuple)) else [output.args[0]]
    grads = outs[num_fwd_outputs:]
    for i, g in enumerate(grads):
        if isinstance(g, fx.Node) and i < len(placeholders) and placeholders[i].name in seeds:
            val = placeholders[i].meta.get("val")
            grad_fraction[g.name] = _fraction(seeds[placeholders[i].name], val, tp)

    result = LocalSizes(no_rule=list(prop.no_rule), redistributions=list(prop.redistributions))
    nodes = {n.name: n for n in joint.graph.nodes}
    for name, placement in prop.placements.items():
        node = nodes[name]
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor) and not isinstance(placement, tuple):
            result.fractions[name] = (tuple(int(s) for s in val.shape),
                                      grad_fraction.get(name, _fraction(placement, val, tp)))
    for r in prop.redistributions:
        result.collectives[r.kind] += 1
        node = nodes.get(r.node)
        if node is None or node.op == "output":
            continue
        val = node.meta.get("val") if r.arg == "output" else getattr(nodes.get(r.arg), "meta", {}).get("val")
        if not isinstance(val, torch.Tensor):
            continue
        if r.arg == "output":
            result.collective_outputs.append(r.node)
            extra = _forced_transient(r, val, tp)
        else:
            # an input redistributed for this op: a new buffer of the wanted placement beside it
            extra = int(r.bytes * _fraction(_parse(r.dst), val, tp))
        if extra:
            result.transients[r.node] = result.transients.get(r.node, 0) + extra
    return result


def _forced_transient(r, val: torch.Tensor, tp: int) -> int:
    """Bytes beside a forced redistribution's output while it is made, as Inductor lowers it.

    * all-reduce (``Partial → Replicate``): Inductor's lowering clones the input and all-reduces
      the clone in place (``comm_lowering._all_reduce``); the clone takes the dying partial
      product's buffer (in-place reuse), so nothing is alive beside the output;
    * all-gather (``Shard(d) → Replicate``): the collective gathers along dim 0 into a buffer of
      the whole size; for ``d == 0`` that is the output (the local shard is alive beside it), for
      another ``d`` DTensor then concatenates the gathered chunks along ``d`` into the output: the
      gathered buffer is alive beside it (the local shard is freed after the gather)."""
    src = _parse(r.src)
    if r.kind == "all_gather" and hasattr(src, "is_shard") and src.is_shard():
        dim = src.dim if src.dim >= 0 else src.dim + val.dim()
        return int(r.bytes * _fraction(src, val, tp)) if dim == 0 else r.bytes
    return 0


def _parse(text: str):
    """A placement's text (``"S(1)"``, ``"Shard(dim=1)"``) → ``Shard(1)``; anything else (``R``,
    ``P(sum)``, a strided shard) → ``Replicate()``: whole on every rank."""
    from torch.distributed.tensor import Replicate, Shard

    m = re.fullmatch(r"(?:Shard|S)\((?:dim=)?(-?\d+)\)", text)
    return Shard(int(m.group(1))) if m else Replicate()


__all__ = ["LocalSizes", "tp_local_sizes"]
