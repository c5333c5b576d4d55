"""``fxmem.shard``: tensor parallelism, FSDP2 and pipeline stages planned from the graph.

One module per job:

* :mod:`fxmem.shard.tensor_parallel` — the 1-D tensor-parallel plan (Megatron pairs found in the
  traced graph, checked with DTensor's rules) and ``parallelize_module``;
* :mod:`fxmem.shard.mesh` — FSDP2 (``fully_shard`` over ``dp``) around tensor parallelism over
  ``tp``, with per-rank bytes of parameters, gradients and optimizer state;
* :mod:`fxmem.shard.pipeline` — pipeline stages balanced by memory for
  ``torch.distributed.pipelining`` (with FSDP2 over ``dp`` or tensor parallelism over ``tp``);
* :mod:`fxmem.shard.stage_tp` — a pipeline stage's graph run on DTensors (pp × tp).

fxmem implements no communication of its own; see ``docs/shard.md``.
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from fxmem.shard import mesh as _mesh
from fxmem.shard import tensor_parallel as _tp
from fxmem.shard.mesh import MeshPlan, StateBytes, Unit, grad_scaler
from fxmem.shard.pipeline import PipelinePlan, pipeline
from fxmem.shard.tensor_parallel import ShardPlan, ShardPlanError

__all__ = ["plan", "apply", "pipeline", "grad_scaler", "ShardPlan", "MeshPlan", "PipelinePlan", "ShardPlanError",
           "StateBytes", "Unit"]


def plan(model: nn.Module, *args: Any, kwargs: dict | None = None, world_size: int | None = None,
         mesh: dict | None = None, vocab: str | bool = "auto", precision: str | None = None,
         units: list[str] | None = None) -> ShardPlan | MeshPlan:
    """Plan sharding for ``model`` from its traced graph (no process group needed).

    ``world_size=N``: 1-D tensor parallelism (a :class:`ShardPlan`). ``mesh={"dp": D, "tp": T}``:
    FSDP2 over ``dp`` around tensor parallelism over ``tp`` (a :class:`MeshPlan`); ``precision``
    (``None`` | ``"bf16"`` | ``"fp16"``) and ``units`` apply to the mesh plan only.
    """
    if (world_size is None) == (mesh is None):
        raise ValueError("fxmem.shard.plan: give exactly one of world_size=N (1-D tensor parallelism) "
                         "or mesh={'dp': D, 'tp': T} (FSDP2 around tensor parallelism)")
    if world_size is not None:
        if precision is not None or units is not None:
            raise ValueError("fxmem.shard.plan: precision= and units= are FSDP2 settings; use mesh={'dp': D, 'tp': T}")
        return _tp.plan(model, *args, kwargs=kwargs, world_size=world_size, vocab=vocab)
    return _mesh.plan(model, *args, kwargs=kwargs, mesh=mesh, vocab=vocab, precision=precision, units=units)


def apply(model: nn.Module, plan: ShardPlan | MeshPlan, device_mesh) -> nn.Module:
    """Carry ``plan`` out on ``device_mesh`` (1-D for a :class:`ShardPlan`, ``("dp", "tp")`` for a :class:`MeshPlan`)."""
    if isinstance(plan, MeshPlan):
        return _mesh.apply(model, plan, device_mesh)
    if isinstance(plan, ShardPlan):
        return _tp.apply(model, plan, device_mesh)
    raise TypeError(f"fxmem.shard.apply: plan must be a ShardPlan or MeshPlan from fxmem.shard.plan, got {type(plan).__name__}")
