"""Pipeline stages split by memory, carried out by ``torch.distributed.pipelining``.

``pipeline(model, *args, stages=S, schedule="1f1b", microbatches=M)`` runs the model once on one
microbatch (single process, autograd on) and records, in call order, the *atoms* it may split
between: the children of every repeated block (the modules an ``nn.ModuleList`` holds — for a
transformer layer: norm, attention, norm, MLP), with everything before the first one (embeddings)
and after the last one (final norm, head) as the prefix and suffix. For each atom it measures the
parameter bytes it owns and the bytes autograd saves for backward while it runs (per unique
storage, parameters excluded — ``saved_tensors_hooks``, as fxmem measures activations
everywhere). A stage holds its parameters plus its saved activations for every microbatch in
flight under the schedule: GPipe runs all M forwards before any backward (M in flight on every
stage); 1F1B keeps ``min(S - s, M)`` in flight on stage ``s``. The contiguous split that
minimizes the largest stage is found exactly by dynamic programming over the atoms.

The split points become ``SplitPoint.BEGINNING`` entries of ``torch.distributed.pipelining.pipeline``'s
``split_spec``; :meth:`PipelinePlan.build` makes this rank's ``PipelineStage`` and the schedule
(``ScheduleGPipe`` or ``Schedule1F1B``). fxmem implements no communication (the stages send and
receive through ``torch.distributed.pipelining``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from fxmem.shard.mesh import blocks

SCHEDULES = ("gpipe", "1f1b")


@dataclass
class Atom:
    """A unit a stage boundary may fall before: a block's child module, or the prefix / suffix."""

    module: str            # "<prefix>" / "<suffix>" for the code before / after the blocks
    param_bytes: int
    activation_bytes: int  # saved for backward, per microbatch


@dataclass
class Stage:
    """One pipeline stage: its atoms and the bytes it holds at the schedule's peak."""

    index: int
    first: str
    last: str
    param_bytes: int
    activation_bytes: int   # per microbatch
    in_flight: int          # microbatches whose activations the stage holds at once

    @property
    def bytes(self) -> int:
        return self.param_bytes + self.in_flight * self.activation_bytes


@dataclass
class PipelinePlan:
    """Stages balanced by memory and the ``split_spec`` that carries them out."""

    stages: list[Stage]
    schedule: str
    microbatches: int
    split_points: list[str]   # module names: a stage begins at each
    atoms: list[Atom]
    microbatch_args: tuple

    @property
    def imbalance(self) -> float:
        """Largest stage over smallest, minus one (0.1: within 10% of each other)."""
        sizes = [s.bytes for s in self.stages]
        return max(sizes) / max(min(sizes), 1) - 1

    def split_spec(self) -> dict:
        from torch.distributed.pipelining import SplitPoint

        return {name: SplitPoint.BEGINNING for name in self.split_points}

    def build(self, model: nn.Module, stage_index: int, device: torch.device | str = "cpu", group=None,
              loss_fn=None):
        """This rank's ``PipelineStage`` and schedule: ``(pipe, stage, schedule)``.

        ``torch.distributed.pipelining.pipeline`` exports the model on one microbatch and splits
        the graph at :attr:`split_points`; ``schedule.step(x)`` on the first stage,
        ``schedule.step(target=y, losses=losses)`` on the last (with ``loss_fn``), plain
        ``schedule.step()`` in between.
        """
        from torch.distributed.pipelining import Schedule1F1B, ScheduleGPipe, pipeline

        pipe = pipeline(model, mb_args=self.microbatch_args, split_spec=self.split_spec())
        if pipe.num_stages != len(self.stages):
            raise RuntimeError(f"fxmem.shard.pipeline: torch.distributed.pipelining made {pipe.num_stages} stages "
                               f"from split points {self.split_points}, the plan has {len(self.stages)}")
        stage = pipe.build_stage(stage_index, torch.device(device), group)
        cls = ScheduleGPipe if self.schedule == "gpipe" else Schedule1F1B
        return pipe, stage, cls(stage, n_microbatches=self.microbatches, loss_fn=loss_fn)

    def table(self) -> str:
        out = [f"fxmem.shard pipeline: {len(self.stages)} stages, {self.schedule}, {self.microbatches} microbatches"]
        out.append("stage  first .. last                                params B  activations B/microbatch  in flight  bytes")
        for s in self.stages:
            span = f"{s.first} .. {s.last}"
            out.append(f"{s.index:<5d}  {span:<44s} {s.param_bytes:<9d} {s.activation_bytes:<25d} "
                       f"{s.in_flight:<10d} {s.bytes}")
        out.append(f"split points (SplitPoint.BEGINNING): {', '.join(self.split_points) or 'none'}; "
                   f"largest / smallest stage: {1 + self.imbalance:.3f}")
        return "\n".join(out)

    def __str__(self) -> str:
        return self.table()


def _chunk(args: tuple, microbatches: int) -> tuple:
    """The first microbatch of ``args`` (tensors split on dim 0, as the schedules split them)."""
    out = []
    for a in args:
        if isinstance(a, torch.Tensor):
            if a.shape[0] % microbatches:
                raise ValueError(f"fxmem.shard.pipeline: batch size {a.shape[0]} is not divisible by "
                                 f"microbatches={microbatches}")
            out.append(a[: a.shape[0] // microbatches])
        else:
            out.append(a)
    return tuple(out)


def measure_atoms(model: nn.Module, args: tuple) -> list[Atom]:
    """Parameter and saved-activation bytes of every atom, from one forward (see the module docstring).

    Each storage autograd saves is charged to the region running when it is first saved: the
    prefix until the first block child starts, then the block child that started last (code
    between children — a residual add — goes with the child before it), then the suffix once the
    last child has returned.
    """
    names = [f"{b}.{c}" for b in blocks(model) for c, _ in model.get_submodule(b).named_children()]
    names = [n for n in names if any(True for _ in model.get_submodule(n).parameters())]
    if not names:
        raise ValueError("fxmem.shard.pipeline: the model has no repeated blocks (modules held by an nn.ModuleList) "
                         "to split between")
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: set[int] = set()
    order: list[str] = []
    region = ["<prefix>"]
    saved: dict[str, int] = {}
    calls: list[nn.Module] = []

    def pack(t: torch.Tensor):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params and ptr not in seen:
            seen.add(ptr)
            saved[region[0]] = saved.get(region[0], 0) + t.untyped_storage().nbytes()
        return t

    def enter(name):
        def hook(module, args):
            order.append(name)
            region[0] = name
        return hook

    def leave(module, args, output):
        region[0] = "<suffix>"

    handles = [model.get_submodule(n).register_forward_pre_hook(enter(n)) for n in names]
    # the suffix starts when the last block returns
    handles.append(model.get_submodule(blocks(model)[-1]).register_forward_hook(leave))
    handles += [m.register_forward_pre_hook(lambda m, a: calls.append(m)) for m in model.modules()]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(*args)
            del out
    finally:
        for h in handles:
            h.remove()
    if sorted(order) != sorted(names):
        raise ValueError("fxmem.shard.pipeline: every block's children must run exactly once per forward to be "
                         f"split points; ran {order}")
    names = order  # call order (a layer may define its children in another order: HF Llama does)
    # parameters outside the blocks: before the first block (embeddings) or after it (final norm, head)
    in_atoms = {id(p) for n in names for p in model.get_submodule(n).parameters()}
    first_block = calls.index(model.get_submodule(names[0]))
    first_use: dict[int, int] = {}
    for i, m in enumerate(calls):
        for p in m.parameters(recurse=False):
            first_use.setdefault(id(p), i)
    unique = {id(p): p for p in model.parameters() if id(p) not in in_atoms}
    prefix = sum(p.numel() * p.element_size() for pid, p in unique.items() if first_use.get(pid, 0) < first_block)
    suffix = sum(p.numel() * p.element_size() for pid, p in unique.items() if first_use.get(pid, 0) > first_block)
    atoms = [Atom("<prefix>", prefix, saved.get("<prefix>", 0))]
    atoms += [Atom(n, sum(p.numel() * p.element_size() for p in model.get_submodule(n).parameters()), saved.get(n, 0))
              for n in names]
    atoms.append(Atom("<suffix>", suffix, saved.get("<suffix>", 0)))
    return atoms


def in_flight(schedule: str, stage: int, stages: int, microbatches: int) -> int:
    """Microbatches whose activations stage ``stage`` holds at once under ``schedule``."""
    return microbatches if schedule == "gpipe" else min(stages - stage, microbatches)


def balance(atoms: list[Atom], stages: int, schedule: str, microbatches: int) -> list[int]:
    """Start indices of stages 1..S-1 (into ``atoms``) minimizing the largest stage's bytes.

    Exact: dynamic programming over (atoms used, stages made); a stage starts at a block child
    (never inside the prefix, never at the suffix).
    """
    n = len(atoms)
    prefix_p = [0]
    prefix_a = [0]
    for a in atoms:
        prefix_p.append(prefix_p[-1] + a.param_bytes)
        prefix_a.append(prefix_a[-1] + a.activation_bytes)

    def cost(i, j, s):  # atoms[i:j] as stage s
        return prefix_p[j] - prefix_p[i] + in_flight(schedule, s, stages, microbatches) * (prefix_a[j] - prefix_a[i])

    inf = float("inf")
    # best[s][j]: the smallest possible largest-stage bytes with atoms[:j] split into s+1 stages
    best = [[inf] * (n + 1) for _ in range(stages)]
    choice = [[0] * (n + 1) for _ in range(stages)]
    for j in range(2, n):  # stage 0 holds the prefix and at least one block child
        best[0][j] = cost(0, j, 0)
    for s in range(1, stages):
        for j in range(2, n + 1):
            for i in range(2, j):  # stage s = atoms[i:j], starting at a block child (i < n - 1)
                if i >= n - 1 or best[s - 1][i] == inf:
                    continue
                if s < stages - 1 and j == n:
                    continue
                c = max(best[s - 1][i], cost(i, j, s))
                if c < best[s][j]:
                    best[s][j], choice[s][j] = c, i
    if best[stages - 1][n] == inf:
        raise ValueError(f"fxmem.shard.pipeline: stages={stages} is more than the {n - 2} block children "
                         "the model can be split between")
    starts, j = [], n
    for s in range(stages - 1, 0, -1):
        i = choice[s][j]
        starts.append(i)
        j = i
    return starts[::-1]


def pipeline(model: nn.Module, *args: Any, stages: int, schedule: str = "1f1b", microbatches: int | None = None) -> PipelinePlan:
    """Plan ``stages`` pipeline stages balanced by memory (see the module docstring).

    ``args``: the whole batch (split into ``microbatches`` on dim 0, as the schedules split it;
    default: ``stages``). ``schedule``: ``"gpipe"`` or ``"1f1b"``. Returns a
    :class:`PipelinePlan`; print it for per-stage bytes, ``plan.build(model, rank)`` runs it.
    """
    if not isinstance(stages, int) or isinstance(stages, bool) or stages < 1:
        raise ValueError(f"fxmem.shard.pipeline: stages={stages!r}; accepted: a positive int")
    if schedule not in SCHEDULES:
        raise ValueError(f"fxmem.shard.pipeline: schedule={schedule!r}; accepted: {' | '.join(SCHEDULES)}")
    microbatches = stages if microbatches is None else microbatches
    if not isinstance(microbatches, int) or microbatches < 1:
        raise ValueError(f"fxmem.shard.pipeline: microbatches={microbatches!r}; accepted: a positive int")
    if schedule == "1f1b" and microbatches < stages:
        raise ValueError(f"fxmem.shard.pipeline: 1f1b needs microbatches >= stages, got {microbatches} < {stages}")
    mb = _chunk(args, microbatches)
    atoms = measure_atoms(model, mb)
    starts = balance(atoms, stages, schedule, microbatches) if stages > 1 else []
    bounds = [0] + starts + [len(atoms)]
    out = []
    for s in range(stages):
        group = atoms[bounds[s]:bounds[s + 1]]
        out.append(Stage(s, group[0].module, group[-1].module, sum(a.param_bytes for a in group),
                         sum(a.activation_bytes for a in group), in_flight(schedule, s, stages, microbatches)))
    return PipelinePlan(out, schedule, microbatches, [atoms[i].module for i in starts], atoms, mb)
