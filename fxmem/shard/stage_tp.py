"""Tensor parallelism inside a pipeline stage: the stage's graph run on DTensors.

``torch.distributed.pipelining`` builds each stage from a piece of the graph ``torch.export``
made of the model: its projections are ``aten.linear`` calls on parameters, not ``nn.Linear``
modules, so ``parallelize_module``'s styles (which wrap modules) have nothing to attach to. What
does apply is DTensor itself. The 1-D tensor-parallel plan (:mod:`fxmem.shard.tensor_parallel`)
says which dimension of which parameter to split; the stage's parameters become DTensors sharded
that way on the ``tp`` mesh (the rest, buffers included, replicated), the stage's inputs enter as
replicated DTensors and its outputs leave as whole tensors. In between, DTensor's sharding
propagation runs every op of the graph and inserts the collectives the placements need — for a
column-parallel projection followed by a row-parallel one, the all-reduce of the Megatron pair::

    before:  recv x ──▶ [stage graph: linear(x, W_q) ... linear(h, W_o) ... ] ──▶ send y
    after:   recv x ──from_local(Replicate)──▶ [same graph, W_q: Shard(0), W_o: Shard(1) DTensors;
             DTensor all-reduces W_o's partial sums] ──redistribute(Replicate).to_local()──▶ send y

fxmem implements no communication: every collective is DTensor's. The collectives are what
propagation chooses, not a hand-written plan's (counted per step by ``benchmarks/scale.py
--only pipeline_tp``; docs/shard.md).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn as nn


def shard_bytes(model: nn.Module, shard_dims: dict[str, int | None], tp: int) -> dict[str, int]:
    """Each parameter's bytes on one tensor-parallel rank, by name: ``ceil(d / tp)`` along its
    planned dimension (``torch.chunk``'s largest piece, which DTensor gives the first ranks), whole
    where the plan keeps it replicated."""
    out = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        dim = shard_dims.get(name)
        shape = list(p.shape)
        if dim is not None:
            shape[dim] = -(-shape[dim] // tp)
        out[name] = int(torch.Size(shape).numel()) * p.element_size()
    return out


def replicate_partial(t: Any) -> Any:
    """``t`` all-reduced to ``Replicate()`` where it holds pending sums (``Partial``), else ``t``."""
    from torch.distributed.tensor import DTensor, Replicate

    if isinstance(t, DTensor) and any(p.is_partial() for p in t.placements):
        return t.redistribute(t.device_mesh, [Replicate()] * t.device_mesh.ndim)
    return t


_MATMULS = ("mm", "addmm", "bmm", "matmul", "linear")


def _rewrite_for_dtensors(graph: fx.Graph) -> bool:
    """Two edits of a stage graph for DTensor execution; whether anything changed.

    * ``aten._assert_tensor_metadata`` (export's dtype/device checks on inputs; they return
      nothing) is removed: DTensor has no sharding rule for it (HF Llama's exported layers carry it).
    * After every matrix product, a call of :func:`replicate_partial`: the row-parallel
      projection's partial sums are all-reduced once, where it returns (the Megatron pair's
      all-reduce), instead of by each later op that reads them — DTensor does not cache a
      redistribution, and the residual stream is read by the add, the norm's ``pow`` and its
      ``mul``: each would all-reduce it again. A product that is not partial passes unchanged.
    """
    changed = False
    for node in list(graph.nodes):
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        if node.target is torch.ops.aten._assert_tensor_metadata.default and not node.users:
            graph.erase_node(node)
            changed = True
        elif node.target.__name__.split(".")[0] in _MATMULS:
            with graph.inserting_after(node):
                settled = graph.call_function(replicate_partial, (node,))
            node.replace_all_uses_with(settled, delete_user_cb=lambda user, s=settled: user is not s)
            changed = True
    return changed


def _rewrite_stage_graphs(module: nn.Module) -> None:
    """:func:`_rewrite_for_dtensors` on every graph of the stage (its submodules are torch.export's
    ``InterpreterModule`` modules, whose code is made from their graph by ``finalize``)."""
    for m in module.modules():
        graph = getattr(m, "graph", None)
        if isinstance(graph, fx.Graph) and _rewrite_for_dtensors(graph):
            if isinstance(m, fx.GraphModule):
                m.recompile()
            elif hasattr(m, "finalize"):
                m.finalize()


def _set(module: nn.Module, name: str, value: Any, buffer: bool = False) -> None:
    owner_name, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    if buffer:
        owner.register_buffer(leaf, value)
    else:
        setattr(owner, leaf, value)


def distribute_stage(module: nn.Module, shard_dims: dict[str, int | None], tp_mesh) -> nn.Module:
    """Make ``module`` (a pipeline stage's piece of the exported graph) tensor-parallel on the 1-D
    ``tp_mesh``, in place: parameters named in ``shard_dims`` with a dimension become DTensors
    ``Shard(dim)``, every other parameter and buffer ``Replicate()``; its forward takes and gives
    whole tensors (see the module docstring). Returns ``module``."""
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    _rewrite_stage_graphs(module)
    for name, p in list(module.named_parameters()):
        dim = shard_dims.get(name)
        placement = Shard(dim) if dim is not None else Replicate()
        _set(module, name, nn.Parameter(distribute_tensor(p.data, tp_mesh, [placement]), requires_grad=p.requires_grad))
    for name, b in list(module.named_buffers()):
        _set(module, name, distribute_tensor(b, tp_mesh, [Replicate()]), buffer=True)
    inner = module.forward

    def whole(t: Any) -> Any:
        return t.redistribute(tp_mesh, [Replicate()]).to_local() if isinstance(t, DTensor) else t

    @functools.wraps(inner)
    def forward(*args, **kwargs):
        # every tp rank of a stage receives the same activations (or the same microbatch)
        args = tuple(DTensor.from_local(a, tp_mesh, [Replicate()], run_check=False) if isinstance(a, torch.Tensor)
                     else a for a in args)
        out = inner(*args, **kwargs)
        return type(out)(whole(t) for t in out) if isinstance(out, (tuple, list)) else whole(out)

    module.forward = forward
    return module


@contextlib.contextmanager
def replicated_plain_tensors():
    """DTensor's implicit replication for the duration, restoring what was set before (torch's
    ``implicit_replication`` resets the flag to off on exit, even when nested). Tensors a stage's
    graph makes itself (``arange`` positions, masks, rotary tables computed from them) are the same
    on every tp rank: replicated is what they are. The backward needs it too, so the schedule's
    whole ``step`` runs under it."""
    from torch.distributed.tensor import DTensor

    dispatcher = DTensor._op_dispatcher  # the flag is its attribute (a property over a C++ flag in 2.13)
    before = dispatcher._allow_implicit_replication
    dispatcher._allow_implicit_replication = True
    try:
        yield
    finally:
        dispatcher._allow_implicit_replication = before


def reduce_partial_gradients(module: nn.Module) -> int:
    """Give every parameter's gradient its parameter's placement. DTensor leaves the gradient of a
    replicated parameter fed by a sharded computation (a norm's weight after a column-parallel
    projection's backward) as ``Partial(sum)`` — pending sums, not values: the optimizer would
    then all-reduce it inside each of its own ops (AdamW: five times per tensor), and a user
    reading ``p.grad`` would see one rank's share. One all-reduce each, here. Returns how many."""
    from torch.distributed.tensor import DTensor

    reduced = 0
    for p in module.parameters():
        g = p.grad
        if isinstance(g, DTensor) and isinstance(p, DTensor) and tuple(g.placements) != tuple(p.placements):
            p.grad = g.redistribute(p.device_mesh, p.placements)
            reduced += 1
    return reduced


def step_on_dtensors(step: Callable, module: nn.Module) -> Callable:
    """``step`` (a schedule's ``step`` over ``module``'s stage) run under
    :func:`replicated_plain_tensors`, its gradients settled after it (:func:`reduce_partial_gradients`)."""

    @functools.wraps(step)
    def run(*args, **kwargs):
        with replicated_plain_tensors():
            out = step(*args, **kwargs)
            reduce_partial_gradients(module)
        return out

    return run
