"""FSDP2 over ``dp`` around tensor parallelism over ``tp``: the 2-D plan and its execution.

``plan(model, *args, mesh={"dp": D, "tp": T})`` plans tensor parallelism over the ``tp`` ranks
exactly as the 1-D plan does (:mod:`fxmem.shard.tensor_parallel`), then wraps every block (each
module held by an ``nn.ModuleList``: transformer layers) and the root in FSDP2's ``fully_shard``
over the ``dp`` ranks — torchtitan's composition, planned instead of written by hand. The plan
counts, per rank, the bytes of parameters, gradients and AdamW moments (``exp_avg``,
``exp_avg_sq`` and the ``step`` scalars), and the collectives of one training step: tensor
parallelism's (from its plan) plus FSDP2's (one all-gather per unit in forward, one in backward for
every unit resharded after forward — FSDP2 keeps the root unsharded, so not the root — and one
reduce-scatter per unit in backward).

``apply(model, plan, device_mesh)`` takes a 2-D ``DeviceMesh`` with ``mesh_dim_names=("dp",
"tp")`` and calls ``parallelize_module`` on ``mesh["tp"]``, then ``fully_shard(..., mesh=mesh["dp"])``
bottom-up. fxmem implements no communication: every collective is DTensor's or FSDP2's.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from fxmem.shard.tensor_parallel import ShardPlan, ShardPlanError
from fxmem.shard.tensor_parallel import apply as apply_tp
from fxmem.shard.tensor_parallel import plan as plan_tp

_PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16}
_STEP_BYTES = 4  # AdamW keeps one float32 ``step`` scalar tensor per parameter


@dataclass
class Unit:
    """One ``fully_shard`` unit: a block or the root, and what one rank holds of it."""

    module: str                 # "" is the root (the parameters no block holds)
    param_bytes: int            # the unit's own parameters, whole
    per_rank_bytes: int         # this rank's shard after tensor parallelism and FSDP2
    reshard_after_forward: bool


@dataclass
class StateBytes:
    """Model-state bytes: parameters, gradients, optimizer state (AdamW moments and steps)."""

    params: int
    grads: int
    optimizer: int

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer


def mixed_precision_policy(precision: str | None):
    """FSDP2's ``MixedPrecisionPolicy`` for ``precision`` — parameters all-gathered and computed in
    bf16 / fp16, gradients reduced in fp32 onto fp32 master shards — or None (shared by the mesh
    plan and the pipeline's stages)."""
    if precision is None:
        return None
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=_PRECISIONS[precision], reduce_dtype=torch.float32)


@dataclass
class MeshPlan:
    """FSDP2 over ``dp`` around tensor parallelism over ``tp``: units, bytes and collectives per step."""

    dp: int
    tp: int
    tp_plan: ShardPlan | None       # None when tp == 1
    units: list[Unit]
    precision: str | None
    single: StateBytes              # one process holds all of it
    per_rank: StateBytes
    forward_collectives: dict[str, int]
    backward_collectives: dict[str, int]
    collectives_by_mesh: dict[str, dict[str, int]] = field(default_factory=dict)  # "tp"/"dp" → kind → per step

    @property
    def world_size(self) -> int:
        return self.dp * self.tp

    def mp_policy(self):
        """FSDP2's ``MixedPrecisionPolicy`` for ``precision`` (compute low, reduce in fp32), or None."""
        return mixed_precision_policy(self.precision)

    def table(self) -> str:
        out = [f"fxmem.shard plan for mesh dp={self.dp} x tp={self.tp} ({self.world_size} ranks)"]
        if self.tp_plan is not None:
            out.append("tensor parallelism over tp:")
            out.extend("  " + line for line in self.tp_plan.table().splitlines()[1:])
        if self.dp > 1:
            mp = f", MixedPrecisionPolicy(param_dtype={self.precision}, reduce_dtype=fp32)" if self.precision else ""
            out.append(f"FSDP2 fully_shard over dp{mp}:")
            width = max(len(u.module or "<root>") for u in self.units)
            out.append(f"  {'unit'.ljust(width)}  bytes     bytes/rank  reshard after forward")
            for u in self.units:
                out.append(f"  {(u.module or '<root>').ljust(width)}  {str(u.param_bytes).ljust(8)}  "
                           f"{str(u.per_rank_bytes).ljust(10)}  {u.reshard_after_forward}")
        s, r = self.single, self.per_rank
        out.append("model state per rank (one process → this plan):")
        for what, a, b in (("parameters", s.params, r.params), ("gradients", s.grads, r.grads),
                           ("AdamW state", s.optimizer, r.optimizer), ("total", s.total, r.total)):
            out.append(f"  {what:12s} {a:>10d} B → {b:>10d} B  ({b / max(a, 1):.3f}x)")
        for mesh_dim, counts in self.collectives_by_mesh.items():
            out.append(f"collectives per step on {mesh_dim}: {_fmt(counts)}")
        out.append(f"collectives per forward: {_fmt(self.forward_collectives)}; "
                   f"per backward: {_fmt(self.backward_collectives)}")
        return "\n".join(out)

    def __str__(self) -> str:
        return self.table()


def _fmt(c: dict) -> str:
    return ", ".join(f"{v} {k}" for k, v in sorted(c.items()) if v) or "none"


def parse_mesh(mesh: Any) -> tuple[int, int]:
    """``{"dp": D, "tp": T}`` → ``(D, T)``; a clear error for anything else."""
    if not isinstance(mesh, dict) or not set(mesh) <= {"dp", "tp"} or not mesh:
        raise ValueError(f"fxmem.shard.plan: mesh={mesh!r}; accepted: a dict with keys 'dp' and/or 'tp', "
                         "e.g. {'dp': 2, 'tp': 2}")
    sizes = {k: mesh.get(k, 1) for k in ("dp", "tp")}
    for k, v in sizes.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"fxmem.shard.plan: mesh[{k!r}]={v!r}; accepted: a positive int")
    return sizes["dp"], sizes["tp"]


def blocks(model: nn.Module) -> list[str]:
    """The repeated blocks: every module an ``nn.ModuleList`` holds directly (transformer layers)."""
    names = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList):
            names.extend(f"{name}.{child}" if name else child for child, _ in module.named_children())
    return [n for n in names if any(True for _ in model.get_submodule(n).parameters())]


def plan(model: nn.Module, *args: Any, kwargs: dict | None = None, mesh: dict, vocab: str | bool = "auto",
         precision: str | None = None, units: list[str] | None = None) -> MeshPlan:
    """Plan FSDP2 over ``mesh["dp"]`` around tensor parallelism over ``mesh["tp"]`` (no process group needed).

    ``units``: the modules to ``fully_shard`` besides the root (default: :func:`blocks`).
    ``precision``: ``None``, ``"bf16"`` or ``"fp16"`` — FSDP2's ``MixedPrecisionPolicy``
    (parameters all-gathered and computed in that dtype, gradients reduced in fp32; the sharded
    master parameters, gradients and optimizer state stay fp32).
    """
    dp, tp = parse_mesh(mesh)
    if precision is not None and precision not in _PRECISIONS:
        raise ValueError(f"fxmem.shard.plan: precision={precision!r}; accepted: None | 'bf16' | 'fp16'")
    names = blocks(model) if units is None else list(units)
    for n in names:
        try:
            model.get_submodule(n)
        except AttributeError:
            raise ValueError(f"fxmem.shard.plan: units names {n!r}, which is not a module of the model") from None
    # a vocabulary split saves parameters, gradients and both AdamW moments, each sharded over dp
    # a fused projection (GPT-2 c_attn) is _StridedShard over tp; FSDP2 shards dim 0 again over dp,
    # and DTensor's gather of a 1-D bias sharded that way ((_StridedShard(0, 2), _StridedShard(0, 3)))
    # is wrong on torch 2.13 (full_tensor, state_dict, checkpoints): its bias stays whole over tp
    fused = None if dp == 1 else "replicate_bias"
    tp_plan = plan_tp(model, *args, kwargs=kwargs, world_size=tp, vocab=vocab, state_factor=4 / dp,
                      split_fused=fused) if tp > 1 else None
    dims = tp_plan.param_shard_dims if tp_plan else {}

    def local_bytes(name: str, p: torch.Tensor) -> int:
        shape = list(p.shape)
        d = dims.get(name)
        if d is not None:
            shape[d] = math.ceil(shape[d] / tp)  # DTensor's Shard: torch.chunk sizes, the largest
        if dp > 1 and shape:
            shape[0] = math.ceil(shape[0] / dp)  # FSDP2 shards dim 0 of the local tensor (padded)
        return math.prod(shape) * p.element_size()

    # each unique parameter belongs to the innermost unit holding it (tied ones: the first name)
    owner: dict[int, str] = {}
    first_name: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        first_name.setdefault(id(p), name)
    unique = {id(p): p for p in model.parameters()}
    for pid, name in first_name.items():
        holders = [u for u in names if name.startswith(u + ".")]
        owner[pid] = max(holders, key=len) if holders else ""
    unit_rows = []
    for u in names + [""]:
        mine = [pid for pid, o in owner.items() if o == u]
        unit_rows.append(Unit(u, sum(unique[p].numel() * unique[p].element_size() for p in mine),
                              sum(local_bytes(first_name[p], unique[p]) for p in mine), reshard_after_forward=u != ""))
    single_params = sum(p.numel() * p.element_size() for p in unique.values())
    rank_params = sum(local_bytes(first_name[pid], p) for pid, p in unique.items())
    trainable = [pid for pid, p in unique.items() if p.requires_grad]
    single = StateBytes(single_params, sum(unique[p].numel() * unique[p].element_size() for p in trainable),
                        sum(2 * unique[p].numel() * unique[p].element_size() + _STEP_BYTES for p in trainable))
    per_rank = StateBytes(rank_params, sum(local_bytes(first_name[p], unique[p]) for p in trainable),
                          sum(2 * local_bytes(first_name[p], unique[p]) + _STEP_BYTES for p in trainable))
    fwd: Counter = Counter()
    bwd: Counter = Counter()
    by_mesh: dict[str, dict[str, int]] = {}
    if tp_plan is not None:
        fwd.update(tp_plan.forward_collectives)
        bwd.update(tp_plan.backward_collectives)
        by_mesh["tp"] = dict(Counter(tp_plan.forward_collectives) + Counter(tp_plan.backward_collectives))
    if dp > 1:
        # FSDP2: all-gather each unit's parameters before its forward and (resharded units) before
        # its backward; reduce-scatter its gradients after its backward
        with_params = [u for u in unit_rows if u.param_bytes]
        fwd["all_gather"] += len(with_params)
        bwd["all_gather"] += sum(u.reshard_after_forward for u in with_params)
        bwd["reduce_scatter"] += len(with_params)
        by_mesh["dp"] = {"all_gather": len(with_params) + sum(u.reshard_after_forward for u in with_params),
                         "reduce_scatter": len(with_params)}
    return MeshPlan(dp, tp, tp_plan, unit_rows, precision, single, per_rank, dict(fwd), dict(bwd), by_mesh)


def apply(model: nn.Module, plan: MeshPlan, device_mesh) -> nn.Module:
    """Tensor parallelism on ``device_mesh["tp"]``, then FSDP2 on ``device_mesh["dp"]``; returns the model.

    ``device_mesh``: ``init_device_mesh(device, (D, T), mesh_dim_names=("dp", "tp"))``. The
    result is an ``FSDPModule``: train it with any optimizer built *after* ``apply`` (its
    parameters are the sharded DTensors), and ``torch.compile(model, backend="fxmem")`` it.
    """
    names = tuple(device_mesh.mesh_dim_names or ())
    if names != ("dp", "tp") or tuple(device_mesh.shape) != (plan.dp, plan.tp):
        raise ShardPlanError(f"fxmem.shard.apply: the plan is for a mesh dp={plan.dp} x tp={plan.tp}; give "
                             f"init_device_mesh(device, ({plan.dp}, {plan.tp}), mesh_dim_names=('dp', 'tp')), "
                             f"not a mesh of shape {tuple(device_mesh.shape)} named {names}")
    if plan.tp_plan is not None:
        apply_tp(model, plan.tp_plan, device_mesh["tp"])
    if plan.dp > 1:
        from torch.distributed.fsdp import fully_shard

        kwargs = {"mesh": device_mesh["dp"]}
        if plan.mp_policy() is not None:
            kwargs["mp_policy"] = plan.mp_policy()
        for unit in plan.units:  # blocks first, the root last (FSDP2 wants children before parents)
            target = model.get_submodule(unit.module) if unit.module else model
            fully_shard(target, reshard_after_forward=unit.reshard_after_forward, **kwargs)
    return model


def grad_scaler(plan: MeshPlan, device_type: str = "cuda", *, process_group=None, **kwargs):
    """The loss scaler for training ``plan``'s sharded model: scaling on for ``precision="fp16"``,
    off (a pass-through: ``scale`` returns the loss, ``step`` calls ``optimizer.step()``) for bf16
    and fp32, so that one loop serves every precision::

        scaler = fxmem.shard.grad_scaler(plan, "cuda")
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    It is FSDP's ``ShardedGradScaler``, which all-reduces the found-overflow flag over
    ``process_group`` (default: every rank). ``torch.amp.GradScaler`` is not enough on a dp × tp
    mesh: it reduces the flag over the mesh dimensions the *first* gradient is sharded on, and
    under FSDP2 around tensor parallelism that gradient may be whole over ``tp`` (an embedding
    kept whole by ``vocab=False``): an overflow in one tensor-parallel rank's shard then skips the
    step on that rank only, and the replicas drift apart (measured: docs/shard.md, "fp16").
    ``kwargs`` go to the scaler (``init_scale``, ``growth_interval``, ...).
    """
    if not isinstance(plan, MeshPlan):
        raise TypeError(f"fxmem.shard.grad_scaler: plan must be a MeshPlan from fxmem.shard.plan(..., mesh=...), "
                        f"got {type(plan).__name__}")
    from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

    if process_group is None:
        import torch.distributed as dist

        process_group = dist.group.WORLD
    return ShardedGradScaler(device_type, enabled=plan.precision == "fp16", process_group=process_group, **kwargs)
