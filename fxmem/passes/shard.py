"""``shard``: sharding annotations on per-rank graphs — placements and the collectives in them.

Graphs compiled from a model that :func:`fxmem.shard.apply` parallelized hold the *local*
computation of one rank and PyTorch's functional collectives (``_c10d_functional.all_reduce`` +
``wait_tensor`` ...), which AOTAutograd put there when it traced the DTensors. The pass marks each
node with a placement (``Partial`` before an all-reduce, ``Replicate`` after it, ``Shard`` into an
all-gather, ...) and each collective with its kind, bytes and group size, so that explain() lists
them and the memory figures of the report are per-rank figures (the graph's tensors are already
local). A graph with no collective is left alone at the cost of one scan.

Placement *propagation* over global graphs (what ``fxmem.shard.plan`` uses) is an analysis:
:mod:`fxmem.analysis.placement`.

Before / after (the pass only adds metadata; the code is unchanged)::

    mm = aten.mm(x, t)                                   # meta: placement Partial(sum)
    all_reduce = _c10d_functional.all_reduce(mm, 'sum', '0')   # meta: collective all_reduce, 512 B
    wait = _c10d_functional.wait_tensor(all_reduce)      # meta: placement Replicate()

Preconditions: every computing node carries ``meta["val"]``. Numerical promise: exact — the pass
never changes the graph's code. fxmem implements no communication of its own.
"""

from __future__ import annotations

from collections import Counter

import torch
import torch.fx as fx

from fxmem.analysis.placement import PLACEMENT_KEY
from fxmem.analysis.sizes import node_bytes, parameter_bytes
from fxmem.config import ShardConfig
from fxmem.passes.base import PassContext, PassResult

COLLECTIVE_KEY = "fxmem_collective"    # dict: kind, bytes, group_size (on collective nodes)


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
