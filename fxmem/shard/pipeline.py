"""Pipeline stages split by memory, carried out by ``torch.distributed.pipelining``.

``pipeline(model, *args, stages=S, schedule="1f1b", microbatches=M, loss_fn=..., target=...)``
measures what each stage will hold and splits the model where the largest stage is smallest.

Atoms. A stage boundary may fall before any child of a repeated block (the modules an
``nn.ModuleList`` holds — for a transformer layer: norm, attention, norm, MLP) and, inside such a
child, before or after each of its own children with parameters (the projections) that run once
in order: ``blocks.1.mlp.down_proj`` (before it), ``blocks.1.mlp.up_proj:end`` (after it).
Everything before the first block (embeddings) is the *prefix*, the code after the last block
(final norm, head) the *suffix*, and the pipeline's ``loss_fn`` on the output the *loss* — always
on the last stage::

    block children only:  [ln_1 | attn | ln_2 | mlp]                      one MLP ~30% of a stage (4 layers)
    with inner atoms:     [ln_1 | attn | attn.q_proj:end | attn.k_proj | ... | attn.o_proj | attn.o_proj:end
                           | ln_2 | mlp | mlp.up_proj:end | mlp.down_proj | mlp.down_proj:end]

A stage may begin at an atom only where every tensor that crosses the boundary is contiguous (a
point-to-point send takes contiguous tensors): after the attention's heads are viewed and
transposed (before ``k_proj``, ``v_proj``) it may not. What crosses is measured and reported
(:attr:`Atom.boundary_bytes`; a boundary inside the MLP sends its wide hidden activation).

Measured on the graphs that will run. The stages ``torch.distributed.pipelining`` builds are
pieces of the graph ``torch.export`` makes of the model, and they save for backward what *that*
graph saves, not what the eager model saves (HF Llama: the exported layers keep other tensors
than the eager ones). So the model is split once at *every* atom with the same
``torch.distributed.pipelining.pipeline`` the stages come from, and the pieces run one microbatch
under ``saved_tensors_hooks`` twice::

    before:  model ──export──▶ [prefix | layers.0.input_layernorm | layers.0.self_attn | layers.0.self_attn.q_proj:end | ... | suffix]
    run A:   as stage 0 runs them: autograd flows from the parameters only
    run B:   as a later stage runs them: every floating input of a piece requires grad —
             ``PipelineStage`` makes each received floating activation a leaf that requires grad,
             so rotary tables and masks passed between stages are saved for backward too

Each saved storage (parameters excluded) is recorded with the atoms that save it; a stage's
activations are the storages any of its atoms saves, counted once (run A for stage 0, run B for
the others). A stage's bytes are its peak during ``schedule.step`` (:attr:`Stage.bytes`):
parameters + what its boundaries hold (:func:`boundary_bytes`: receive buffers, outputs kept
until their backward, gradient receive buffers, the last stage's outputs) + the larger of its
activations for every microbatch in flight (GPipe runs all M forwards before any backward: M;
1F1B keeps ``min(S - s, M)`` on stage ``s``) and its parameter gradients beside the microbatches
it still holds after the first backward (:func:`with_grads`). The contiguous split that minimizes the largest stage is exact (dynamic programming
over the atoms). The chosen split points are where ``pipe_split()`` runs, as
``pipeline(split_spec={m: SplitPoint.BEGINNING / END})`` places it (:meth:`PipelinePlan.split_spec`
gives that dict); :meth:`PipelinePlan.build` makes this rank's ``PipelineStage`` and
``ScheduleGPipe`` / ``Schedule1F1B``. An inner split point ``torch.distributed.pipelining``
refuses is left out with a warning (never a crash). fxmem implements no communication.

pp × dp (``pipeline(..., dp=D)``, ``build(..., group=mesh["pp"].get_group(), dp_mesh=mesh["dp"])``):
each stage's module is ``fully_shard``-ed over its dp ranks before its ``PipelineStage`` is made —
the block units of :func:`fxmem.shard.mesh.blocks`, then the stage root — and the bytes are per
rank: the stage's schedule replayed over its FSDP2 units (:mod:`fxmem.shard.fsdp_peak`;
:attr:`Stage.bytes`; docs/shard.md, "Pipeline stages × FSDP2 over dp"). ``precision="bf16"`` /
``"fp16"`` (with dp) gives every unit FSDP2's ``MixedPrecisionPolicy`` (as the mesh plan does);
the model is then measured and exported with its parameters in that dtype and the stage gets its
fp32 masters back before ``fully_shard``::

    before:  stage module (GraphModule)  ──▶  PipelineStage
    after:   stage module ──fully_shard(blocks.i over dp), fully_shard(root over dp)──▶ FSDPModule ──▶ PipelineStage
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn

from fxmem.shard.fsdp_peak import FSDPStage, Unit, order
from fxmem.shard.mesh import _PRECISIONS, blocks, mixed_precision_policy

SCHEDULES = ("gpipe", "1f1b")
PREFIX, SUFFIX, LOSS = "<prefix>", "<suffix>", "<loss>"
END = ":end"   # an atom ``m:end`` begins right after module ``m`` returns (SplitPoint.END)


@dataclass
class Atom:
    """A unit a stage boundary may fall before (a block's child, or a point before or after a
    projection inside one: ``m`` / ``m:end``), or the prefix / suffix / loss.

    ``activation_bytes``: saved for backward per microbatch when it runs on the first stage;
    ``received_activation_bytes``: on a later stage (floating inputs require grad). Storages two
    atoms both save are in both figures; a stage counts them once. ``boundary_bytes``: what a stage
    beginning here receives per microbatch (every tensor made before it and used from it on).
    """

    module: str
    param_bytes: int
    activation_bytes: int
    received_activation_bytes: int = 0
    splittable: bool = False   # a stage may begin here
    boundary_bytes: int = 0    # what a stage beginning here receives per microbatch
    output_bytes: int = 0      # on the last atom: the model's output per microbatch (the last stage keeps it)
    compute_param_bytes: int | None = None   # its parameters in the dtype they are computed in (precision=); None: param_bytes

    @property
    def gathered_bytes(self) -> int:
        """Its parameters as FSDP2 all-gathers them (``MixedPrecisionPolicy.param_dtype``, else as kept)."""
        return self.param_bytes if self.compute_param_bytes is None else self.compute_param_bytes


@dataclass
class Stage:
    """One pipeline stage: its atoms and the bytes it holds at the schedule's peak."""

    index: int
    first: str
    last: str
    param_bytes: int
    activation_bytes: int   # per microbatch
    in_flight: int          # microbatches whose activations the stage holds at once
    grad_bytes: int = 0     # its parameters' gradients (made by the first backward, kept to the optimizer step)
    boundary_bytes: int = 0  # what it holds because of its boundaries (:func:`boundary_bytes`)
    with_grads: int = 0     # microbatches whose activations it holds beside the gradients (:func:`with_grads`)
    dp: int = 1             # FSDP2 over this many data-parallel ranks (PipelinePlan.build(dp_mesh=...))
    gathered_bytes: int = 0  # with dp: the stage root's unit plus its largest block unit, whole (all-gathered)
    fsdp: FSDPStage | None = None   # with dp: its FSDP2 units and schedule, replayed for the peak (fsdp_peak)

    @property
    def bytes(self) -> int:
        """The peak: before the first backward ``in_flight`` microbatches' activations; from it on
        the gradients beside ``with_grads`` microbatches' (a backward frees a microbatch's saved
        tensors as it makes the gradients, so the two do not add up).

        With ``dp > 1`` (FSDP2 on the stage, see :meth:`PipelinePlan.build`) the rank keeps its
        shard of the parameters (``param_bytes / dp``) and its boundary buffers; the rest is the
        largest live total of :func:`fxmem.shard.fsdp_peak.step_peak`, which replays the stage's
        schedule over its FSDP2 units: all-gather buffers (flat output, copied-out parameters,
        gloo's copy), units kept gathered from a backward to the next forward, gradients made whole
        and accumulated over the microbatches (resharding and gradient sync are off until
        ``perform_reduce_grad``), the reduce-scatter's input, and each microbatch's activations
        from its unit's forward to its unit's backward.
        """
        if self.dp == 1:
            held = max(self.in_flight * self.activation_bytes,
                       self.grad_bytes + self.with_grads * self.activation_bytes)
            return self.param_bytes + held + self.boundary_bytes
        return self.shard_bytes + self.boundary_bytes + self.fsdp.peak()

    @property
    def shard_bytes(self) -> int:
        """This rank's parameters at rest: ``param_bytes / dp`` (FSDP2's dim-0 padding not counted)."""
        return -(-self.param_bytes // self.dp)

    @property
    def state_bytes(self) -> int:
        """Model state at rest per rank after the optimizer step: parameters, gradients and both
        AdamW moments, each ``/ dp`` (the gradients are reduce-scattered by the last backward)."""
        return 4 * self.shard_bytes


@dataclass
class _Saved:
    """Per atom, the storages it saves for backward: ``{storage key: bytes}``, for runs A and B."""

    first: list[dict[int, int]]
    received: list[dict[int, int]]
    # per run, each storage passed between pieces: {storage: (the piece that made it, the last piece taking it)}
    first_flow: dict[int, tuple[int, int]] = field(default_factory=dict)
    received_flow: dict[int, tuple[int, int]] = field(default_factory=dict)

    def stage_atoms(self, received: bool, i: int, j: int) -> list[int]:
        """Per atom of a stage ``atoms[i:j]``, the bytes of the storages first saved there within the
        stage, *without* those that cross the stage's boundaries: made before ``i`` (received:
        the stage's receive buffer is that storage) or made in it and taken at ``j`` or later (sent:
        ``fwd_cache`` holds it) — :func:`boundary_bytes` counts those already."""
        per_atom = self.received if received else self.first
        flow = self.received_flow if received else self.first_flow
        seen: set[int] = set()
        out = []
        for k in range(i, j):
            total = 0
            for key, nbytes in per_atom[k].items():
                if key in seen:
                    continue
                seen.add(key)
                made, last = flow.get(key, (k, k))
                if not (made < i or (made < j and last >= j)):
                    total += nbytes
            out.append(total)
        return out

    def table(self, received: bool) -> list[list[int]]:
        """``t[i][j]``: bytes of the storages atoms ``i..j-1`` save, each counted once."""
        per_atom = self.received if received else self.first
        n = len(per_atom)
        t = [[0] * (n + 1) for _ in range(n + 1)]
        for i in range(n):
            seen: set[int] = set()
            total = 0
            for j in range(i, n):
                for key, nbytes in per_atom[j].items():
                    if key not in seen:
                        seen.add(key)
                        total += nbytes
                t[i][j + 1] = total
        return t


@dataclass
class PipelinePlan:
    """Stages balanced by memory and the ``split_spec`` that carries them out."""

    stages: list[Stage]
    schedule: str
    microbatches: int
    split_points: list[str]   # a stage begins at each: ``m`` before module m, ``m:end`` after it
    atoms: list[Atom]
    microbatch_args: tuple
    loss_fn: Callable | None = None
    _saved: _Saved | None = field(default=None, repr=False)
    dp: int = 1                       # data-parallel ranks per stage (FSDP2 over ``dp_mesh``)
    block_names: list[str] = field(default_factory=list)   # the model's FSDP2 block units
    precision: str | None = None      # FSDP2 MixedPrecisionPolicy on the stages ("bf16" / "fp16"; needs dp > 1)
    backend: str = "gloo"             # the process group's backend the per-rank bytes are for (gloo copies all-gathers)
    tp: int = 1                       # tensor-parallel ranks per stage (DTensor over ``tp_mesh``: stage_tp)
    tp_plan: Any = None               # the 1-D tensor-parallel plan its parameters are split by (tp > 1)

    @property
    def imbalance(self) -> float:
        """Largest stage over smallest, minus one (0.1: within 10% of each other)."""
        sizes = [s.bytes for s in self.stages]
        return max(sizes) / max(min(sizes), 1) - 1

    def split_spec(self) -> dict:
        """The split points as ``pipeline(split_spec=...)`` takes them: ``m`` → ``SplitPoint.BEGINNING``,
        ``m:end`` → ``SplitPoint.END`` (:meth:`build` marks them itself, which also allows both on one module)."""
        from torch.distributed.pipelining import SplitPoint

        spec = {}
        for point in self.split_points:
            name = point.removesuffix(END)
            if name in spec:
                raise ValueError(f"fxmem.shard.pipeline: stages begin both before and after {name}: split_spec "
                                 "holds one split point per module (PipelinePlan.build splits there)")
            spec[name] = SplitPoint.END if point.endswith(END) else SplitPoint.BEGINNING
        return spec

    def with_schedule(self, schedule: str) -> PipelinePlan:
        """The same measurement balanced for another schedule (same stages and microbatches)."""
        _check_schedule(schedule, len(self.stages), self.microbatches)
        return _plan(self.atoms, self._saved, len(self.stages), schedule, self.microbatches, self.microbatch_args,
                     self.loss_fn, self.dp, self.block_names, self.precision, self.backend, self.tp, self.tp_plan)

    def build(self, model: nn.Module, stage_index: int, device: torch.device | str = "cpu", group=None,
              loss_fn=None, dp_mesh=None, tp_mesh=None):
        """This rank's ``PipelineStage`` and schedule: ``(pipe, stage, schedule)``.

        ``torch.distributed.pipelining.pipeline`` exports the model on one microbatch and splits
        the graph at :attr:`split_points`; ``schedule.step(x)`` on the first stage,
        ``schedule.step(target=y, losses=losses)`` on the last (with ``loss_fn``, by default the
        one the plan measured), plain ``schedule.step()`` in between.

        ``dp_mesh`` (a plan made with ``dp=D``): the 1-D ``"dp"`` sub-mesh of a
        ``("pp", "dp")`` mesh this rank is in, ``group`` the ``"pp"`` one's process group
        (torchtitan's recipe). The stage's module is wrapped in FSDP2's ``fully_shard`` over
        ``dp_mesh`` before the ``PipelineStage`` is made: its block units (the model's
        :func:`fxmem.shard.mesh.blocks` it holds, resharded after forward) and the stage root.
        Each dp rank gives the schedule its own slice of the global batch
        (``x.chunk(D)[dp_rank]``); ``PipelineStage`` syncs the gradients on the last
        microbatch's backward.

        ``tp_mesh`` (a plan made with ``tp=T``): the 1-D ``"tp"`` sub-mesh of a ``("pp", "tp")``
        mesh, ``group`` the ``"pp"`` one's process group. The stage's parameters become DTensors
        split by the plan's tensor-parallel plan and its graph runs on DTensors
        (:func:`fxmem.shard.stage_tp.distribute_stage`); the returned schedule's ``step`` runs with
        DTensor's implicit replication on (the tensors the graph makes itself are the same on
        every tp rank) and leaves each gradient in its parameter's placement. Every tp rank of a
        stage gets the same batch.
        """
        from torch.distributed.pipelining import Schedule1F1B, ScheduleGPipe

        if (dp_mesh is None) != (self.dp == 1):
            raise ValueError(f"fxmem.shard.pipeline: the plan is for dp={self.dp}; give dp_mesh= a 1-D DeviceMesh of "
                             f"{self.dp} ranks (mesh['dp'] of init_device_mesh(device, (stages, dp), "
                             "mesh_dim_names=('pp', 'dp')))" if self.dp > 1 else
                             "fxmem.shard.pipeline: dp_mesh= needs a plan made with dp=D "
                             "(fxmem.shard.pipeline(model, x, stages=S, dp=D, ...))")
        if dp_mesh is not None and (dp_mesh.ndim != 1 or dp_mesh.size() != self.dp):
            raise ValueError(f"fxmem.shard.pipeline: dp_mesh has shape {tuple(dp_mesh.shape)}; accepted: a 1-D "
                             f"DeviceMesh of dp={self.dp} ranks (mesh['dp'])")
        if (tp_mesh is None) != (self.tp == 1) or (tp_mesh is not None and (tp_mesh.ndim != 1
                                                                               or tp_mesh.size() != self.tp)):
            raise ValueError(f"fxmem.shard.pipeline: the plan is for tp={self.tp}; accepted: " + (
                f"tp_mesh= a 1-D DeviceMesh of {self.tp} ranks (mesh['tp'] of init_device_mesh(device, (stages, "
                f"{self.tp}), mesh_dim_names=('pp', 'tp')))" if self.tp > 1 else
                "no tp_mesh (a plan made with tp=T takes one: fxmem.shard.pipeline(model, x, stages=S, tp=T, ...))"))
        # with precision the graph is exported with low-precision parameters (the computation
        # FSDP2's MixedPrecisionPolicy runs, and the dtypes PipelineStage sizes its buffers by);
        # the stage then gets the fp32 masters back before fully_shard
        source = model if self.precision is None else _compute_copy(model, self.precision)
        pipe = _pipe(source, self.microbatch_args, self.split_points)
        if pipe.num_stages != len(self.stages):
            raise RuntimeError(f"fxmem.shard.pipeline: torch.distributed.pipelining made {pipe.num_stages} stages "
                               f"from split points {self.split_points}, the plan has {len(self.stages)}")
        if dp_mesh is not None:
            module = pipe.get_stage_module(stage_index)
            if self.precision is not None:
                for name, p in module.named_parameters():
                    p.data = model.get_parameter(name).data
            _fully_shard_stage(module, self.block_names, dp_mesh, mixed_precision_policy(self.precision))
        if tp_mesh is not None:
            from fxmem.shard.stage_tp import distribute_stage

            distribute_stage(pipe.get_stage_module(stage_index), self.tp_plan.param_shard_dims, tp_mesh)
        stage = pipe.build_stage(stage_index, torch.device(device), group)
        if _torch_before(2, 13):
            _only_floating_recv_buffers_require_grad(stage)
        cls = ScheduleGPipe if self.schedule == "gpipe" else Schedule1F1B
        schedule = cls(stage, n_microbatches=self.microbatches, loss_fn=loss_fn or self.loss_fn)
        if tp_mesh is not None:
            from fxmem.shard.stage_tp import step_on_dtensors

            schedule.step = step_on_dtensors(schedule.step, stage.submod)
        return pipe, stage, schedule

    def table(self) -> str:
        dp = (f" x FSDP2 over dp={self.dp} (bytes per rank; microbatches of the dp rank's slice of the batch)"
              if self.dp > 1 else "")
        if self.tp > 1:
            dp += (f" x tensor parallel over tp={self.tp} (parameters and gradients per rank; activations whole: an "
                   "upper bound)")
        out = [f"fxmem.shard pipeline: {len(self.stages)} stages, {self.schedule}, {self.microbatches} microbatches{dp}"]
        out.append("stage  first .. last                                params B  grads B   activations B/microbatch  "
                   "in flight  boundary B  bytes")
        for s in self.stages:
            span = f"{s.first} .. {s.last}"
            out.append(f"{s.index:<5d}  {span:<44s} {s.param_bytes:<9d} {s.grad_bytes:<9d} {s.activation_bytes:<25d} "
                       f"{s.in_flight:<10d} {s.boundary_bytes:<11d} {s.bytes}")
        if self.dp > 1:
            out.append("per rank with FSDP2: stage  params shard B  gathered B  state at rest B (params+grads+AdamW)")
            for s in self.stages:
                out.append(f"                     {s.index:<5d}  {s.shard_bytes:<14d} {s.gathered_bytes:<11d} {s.state_bytes}")
            precision = f", parameters gathered and computed in {self.precision}" if self.precision else ""
            out.append("(bytes: the rank's peak in schedule.step, its schedule replayed over FSDP2's units — pipelining "
                       "keeps units gathered after backward and the gradients whole until the reduce-scatter after the "
                       f"last microbatch; {self.backend} all-gathers{precision})")
        crossing = {a.module: a.boundary_bytes for a in self.atoms}
        points = [f"{p} ({crossing[p]} B/microbatch cross)" for p in self.split_points]
        out.append(f"split points: {', '.join(points) or 'none'}; largest / smallest stage: {1 + self.imbalance:.3f}")
        out.append("(a stage begins before module m at split point m, after it at m:end)")
        if self.loss_fn is None:
            out.append("loss not counted (no loss_fn given): the last stage holds its saved tensors too")
        return "\n".join(out)

    def __str__(self) -> str:
        return self.table()


def _torch_before(major: int, minor: int) -> bool:
    parts = torch.__version__.split("+")[0].split(".")
    return (int(parts[0]), int(parts[1])) < (major, minor)


def _only_floating_recv_buffers_require_grad(stage) -> None:
    """Let integer tensors cross a stage boundary on torch 2.11, as they do on 2.13.

    HF Llama passes its int64 ``position_ids`` / ``cache_position`` from the embeddings to every
    layer, so a later stage receives them. torch 2.11's graph-based ``_PipelineStage`` assumes
    every received tensor gets a gradient: it calls ``requires_grad_(True)`` on each receive
    buffer ("only Tensors of floating point dtype can require gradients" at the first
    ``schedule.step``), sends a gradient back for each received input ("has gradients None and is
    expecting to send gradients to stage 0") and waits for one for each output it sent. 2.13 makes
    only floating buffers require grad and sends and waits for no gradient where there is none.
    Here four 2.11 methods are wrapped to give 2.13's result: receive buffers made with
    backward off, the floating ones then marked; no gradient sent for a non-floating input; no
    gradient awaited for a non-floating output (its gradient None in backward). Only this stage object is changed (attributes on
    the instance, not the class): nothing process-wide.
    """
    from torch.distributed.pipelining.stage import _RecvInfo

    create_recv, create_send, create_grad_recv = (stage._create_act_recv_info, stage._create_grad_send_info,
                                                  stage._create_grad_recv_info)

    def create_act_recv_info():
        has_backward = stage.has_backward
        stage.has_backward = False
        try:
            infos = create_recv()
        finally:
            stage.has_backward = has_backward
        if has_backward:
            for info in infos:
                if isinstance(info, _RecvInfo) and info.buffer.is_floating_point():
                    info.buffer.requires_grad_(True)
        return infos

    def create_grad_send_info(args_recv_info):
        dests = create_send(args_recv_info)  # one entry per received input, in order
        return [None if isinstance(a, _RecvInfo) and not a.buffer.is_floating_point() else d
                for a, d in zip(args_recv_info, dests)]

    def create_grad_recv_info(act_send_info):
        # one entry per output that has a receiver, in act_send_info's order; an integer output's
        # entry becomes None: no recv op is posted for it (_get_recv_ops skips what is not a
        # _RecvInfo) and its gradient is None in backward (stage_backward skips such outputs)
        outputs = [v.meta["val"] for v in _flat_output_args(stage)]
        sent = [i for i, dsts in act_send_info.items() if dsts]
        return tuple(None if not outputs[i].is_floating_point() else info
                     for i, info in zip(sent, create_grad_recv(act_send_info), strict=True))

    def retrieve_recv_grads(bwd_chunk_id):
        return tuple(info.buffer if isinstance(info, _RecvInfo) else None
                     for info in stage.grad_recv_info[bwd_chunk_id])

    stage._create_act_recv_info = create_act_recv_info
    stage._create_grad_send_info = create_grad_send_info
    stage._create_grad_recv_info = create_grad_recv_info
    stage._retrieve_recv_grads = retrieve_recv_grads


def _flat_output_args(stage) -> list:
    from torch.distributed.pipelining._utils import flatten_args

    return flatten_args(stage._get_output_node().args)


def _chunk(args: tuple, microbatches: int) -> tuple:
    """The first microbatch of ``args`` (tensors split on dim 0, as the schedules split them)."""
    out = []
    for a in args:
        if isinstance(a, torch.Tensor):
            if a.shape[0] % microbatches:
                raise ValueError(f"fxmem.shard.pipeline: batch size {a.shape[0]} is not divisible by "
                                 f"microbatches={microbatches}")
            # a copy: a view would carry the whole batch's storage into the measurement
            out.append(a[: a.shape[0] // microbatches].clone())
        else:
            out.append(a)
    return tuple(out)


def _atom_names(model: nn.Module, args: tuple, refine: bool = True) -> tuple[list[str], str | None]:
    """Atoms in call order, and the first module with parameters after the last block.

    The atoms are the block children with parameters (an error unless each runs exactly once per
    forward) and, between them (unless ``refine=False``), the *inner* atoms: for each child with
    parameters of a block child (``attn.q_proj``, ``mlp.down_proj``, ...), in call order, a point
    before it (not for the first: that is where the block child begins) and one after it
    (``attn.q_proj:end``). A block child is not split inside unless each of its children with
    parameters runs exactly once.
    """
    coarse = [f"{b}.{c}" for b in blocks(model) for c, _ in model.get_submodule(b).named_children()]
    coarse = [n for n in coarse if any(True for _ in model.get_submodule(n).parameters())]
    if not coarse:
        raise ValueError("fxmem.shard.pipeline: the model has no repeated blocks (modules held by an nn.ModuleList) "
                         "to split between")
    inner = [f"{n}.{c}" for n in coarse for c, m in model.get_submodule(n).named_children()
             if any(True for _ in m.parameters())] if refine else []
    by_module = {id(m): n for n, m in model.named_modules()}
    order: list[str] = []
    calls: list[str] = []
    done = [None]

    def enter(name):
        def hook(module, args):
            order.append(name)
        return hook

    def leave(module, args, output):
        done[0] = len(calls)

    handles = [model.get_submodule(n).register_forward_pre_hook(enter(n)) for n in coarse + inner]
    handles.append(model.get_submodule(blocks(model)[-1]).register_forward_hook(leave))
    handles += [m.register_forward_pre_hook(lambda m, a: calls.append(by_module[id(m)])) for m in model.modules()]
    try:
        with torch.no_grad():
            model(*args)
    finally:
        for h in handles:
            h.remove()
    coarse_set = set(coarse)
    ran = [n for n in order if n in coarse_set]
    if sorted(ran) != sorted(coarse):
        raise ValueError("fxmem.shard.pipeline: every block's children must run exactly once per forward to be "
                         f"split points; ran {ran}")
    # a child whose inner children do not each run exactly once is not split inside: a boundary
    # between two calls of one module would put its parameters on two stages
    inside = {n for n in coarse if all(order.count(c) == 1 for c in inner if c.rsplit(".", 1)[0] == n)}
    names: list[str] = []
    parent: str | None = None
    seen_inner = False
    for n in order:  # call order (a layer may define its children in another order: HF Llama does)
        if n in coarse_set:
            names.append(n)
            parent, seen_inner = n, False
        elif n.rsplit(".", 1)[0] == parent and parent in inside:
            if seen_inner:
                names.append(n)
            names.append(n + END)
            seen_inner = True
    suffix = next((n for n in calls[done[0]:] if n and any(True for _ in model.get_submodule(n).parameters(recurse=False))),
                  None)
    return names, suffix


def measure_atoms(model: nn.Module, args: tuple, loss_fn: Callable | None = None, target: Any = None,
                  names: tuple[list[str], str | None] | None = None,
                  master: dict[str, int] | None = None) -> tuple[list[Atom], _Saved]:
    """Parameter and saved-activation bytes of every atom, on the exported graph (module docstring).

    ``names``: :func:`_atom_names`' answer, if the caller has it already. ``master``: where
    ``model``'s parameters are a low-precision copy, each parameter's bytes as the rank keeps it
    (fp32 masters), by name: an atom's ``param_bytes`` are those, its ``compute_param_bytes``
    the measured ones.
    """
    names, suffix = names or _atom_names(model, args)
    try:
        pipe = _split(model, args, names, suffix)
    except Exception as exc:  # noqa: BLE001 - export / split_module refused some inner split point
        names, suffix = _drop_refused(model, args, names, suffix, exc)
        pipe = _split(model, args, names, suffix)
    pieces = [pipe.get_stage_module(k) for k in range(pipe.num_stages)]
    params = {p.untyped_storage().data_ptr() for p in pipe.split_gm.parameters()}
    labels = [PREFIX] + names + ([SUFFIX] if suffix else []) + ([LOSS] if loss_fn is not None else [])
    # per piece, the tensors it takes: {key: (producing piece, bytes, contiguous)}; -1 = a root input
    produced: dict[tuple, int] = {}
    taken: list[dict[tuple, tuple[int, int, bool]]] = [{} for _ in pieces]
    out_bytes = [0]

    # the caller's batch and target: allocated before the step (the schedule's microbatches are views of them)
    caller = {a.untyped_storage().data_ptr() for a in (*args, target) if isinstance(a, torch.Tensor)}

    def run(received: bool) -> tuple[list[dict[int, int]], dict[int, tuple[int, int]]]:
        saved: list[dict[int, int]] = [{} for _ in labels]
        region = [0]
        keep: list[torch.Tensor] = []  # alive until the end: a freed storage's address would be reused
        made_by: dict[int, int] = {}                 # storage -> the piece whose output it is
        flow: dict[int, tuple[int, int]] = {}        # storage passed between pieces -> (made by, last taker)

        def pack(t: torch.Tensor):
            ptr = t.untyped_storage().data_ptr()
            if ptr not in params and ptr not in caller:
                keep.append(t)
                saved[region[0]][ptr] = t.untyped_storage().nbytes()
            return t

        def enter(k):
            def hook(module, inputs):
                region[0] = k
                for a in inputs:
                    if isinstance(a, torch.Tensor):
                        ptr = a.untyped_storage().data_ptr()
                        made = made_by.get(ptr, -1)
                        if made != k:
                            flow[ptr] = (made, max(k, flow.get(ptr, (made, k))[1]))
                if not received:
                    for a in inputs:
                        if isinstance(a, torch.Tensor):
                            taken[k][_key(a)] = (produced.get(_key(a), -1), a.numel() * a.element_size(), a.is_contiguous())
                if received and k:  # as PipelineStage makes its received activations
                    return tuple(a.detach().requires_grad_(True) if isinstance(a, torch.Tensor) and a.is_floating_point()
                                 else a for a in inputs)
                return None
            return hook

        def leave(k):
            def hook(module, inputs, output):
                for t in (output if isinstance(output, (tuple, list)) else (output,)):
                    if isinstance(t, torch.Tensor):
                        keep.append(t)  # its storage's address stays its own until the end
                        made_by.setdefault(t.untyped_storage().data_ptr(), k)
                        if not received:
                            produced[_key(t)] = k
            return hook

        handles = [m.register_forward_pre_hook(enter(k)) for k, m in enumerate(pieces)]
        handles += [m.register_forward_hook(leave(k)) for k, m in enumerate(pieces)]
        try:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                out = pipe(*args)  # its interpreter calls the pieces in order (split_gm refuses to run)
                out_bytes[0] = sum(t.numel() * t.element_size()
                                   for t in (out if isinstance(out, (tuple, list)) else (out,))
                                   if isinstance(t, torch.Tensor))
                if loss_fn is not None:
                    region[0] = len(labels) - 1
                    out = out[0] if isinstance(out, (tuple, list)) and len(out) == 1 else out
                    loss_fn(out, target)
        finally:
            for h in handles:
                h.remove()
        return saved, flow

    (first, first_flow), (received, received_flow) = run(False), run(True)
    saved = _Saved(first, received, first_flow, received_flow)
    atoms = []
    for k, label in enumerate(labels):
        p = sum(t.numel() * t.element_size() for t in pieces[k].parameters()) if k < len(pieces) else 0
        kept = p if master is None or k >= len(pieces) else sum(master[n] for n, _ in pieces[k].named_parameters())
        # what a stage beginning at piece k receives: tensors made before it, taken by it or later
        crossing = {i: v for j in range(k, len(pieces)) for i, v in taken[j].items() if v[0] < k} if k else {}
        atoms.append(Atom(label, kept, sum(saved.first[k].values()), sum(saved.received[k].values()),
                          # a stage cannot begin where a non-contiguous tensor would cross (a p2p
                          # send takes contiguous tensors)
                          splittable=label in names[1:] and all(c for _, _, c in crossing.values()),
                          boundary_bytes=sum(b for _, b, _ in crossing.values()),
                          compute_param_bytes=None if master is None else p))
    atoms[-1].output_bytes = out_bytes[0]
    return atoms, saved


def _key(t: torch.Tensor) -> tuple:
    """One tensor's identity across the pipe's interpreter (the pieces pass other Python objects
    for the same tensor): its storage, offset, shape and strides."""
    return t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride()


def _split(model: nn.Module, args: tuple, names: list[str], suffix: str | None):
    """``torch.distributed.pipelining.pipeline`` of a copy of ``model`` split before every atom."""
    starts = names + ([suffix] if suffix else [])
    # pipeline() exports the modules it is given: a copy keeps the user's model as is
    pipe = _pipe(copy.deepcopy(model), args, starts)
    if pipe.num_stages != len(starts) + 1:
        raise RuntimeError(f"fxmem.shard.pipeline: splitting before every atom gave {pipe.num_stages} pieces, "
                           f"expected {len(starts) + 1}")
    return pipe


def _pipe(model: nn.Module, args: tuple, points: list[str]):
    """``torch.distributed.pipelining.pipeline(model)`` split at ``points`` (``m``: before module
    ``m``, ``m:end``: after it).

    What ``split_spec={m: SplitPoint.BEGINNING / END}`` does — ``pipe_split()`` called before or
    after the module's forward — done here so that one module can have both (``split_spec`` is a
    dict: one kind per module); the model's ``forward`` attributes are restored after the export.
    """
    from torch.distributed.pipelining import pipe_split, pipeline

    where: dict[str, set[bool]] = {}
    for point in points:
        where.setdefault(point.removesuffix(END), set()).add(point.endswith(END))

    def bracket(forward, before: bool, after: bool):
        def split_forward(*a, **k):
            if before:
                pipe_split()
            out = forward(*a, **k)
            if after:
                pipe_split()
            return out
        return split_forward

    marked = []
    try:
        for name, ends in where.items():
            module = model.get_submodule(name)
            marked.append((module, module.__dict__.get("forward")))
            module.forward = bracket(module.forward, False in ends, True in ends)
        return pipeline(model, mb_args=args)
    finally:
        for module, own in reversed(marked):
            if own is None:
                del module.forward
            else:
                module.forward = own


def _drop_refused(model: nn.Module, args: tuple, names: list[str], suffix: str | None,
                  exc: Exception) -> tuple[list[str], str | None]:
    """The atoms without the inner split points ``torch.distributed.pipelining`` refuses.

    Inner split points are tried in groups, one per name inside a block (``attn.o_proj`` of every
    layer together: the layers are alike), each beside the block children; a group whose split
    fails is dropped with a warning. Block children that cannot be split between raise as before.
    """
    coarse, _ = _atom_names(model, args, refine=False)
    if names == coarse:
        raise exc
    groups: dict[str, list[str]] = {}
    for n in names:
        if n not in coarse:
            groups.setdefault(_in_block(model, n), []).append(n)
    kept: set[str] = set()
    for key, members in groups.items():
        try:
            _split(model, args, [n for n in names if n in coarse or n in members], suffix)
            kept.update(members)
        except Exception as err:  # noqa: BLE001 - this group is left out, the others are tried
            warnings.warn(f"fxmem.shard.pipeline: no stage begins at {key} (inside a block child): "
                          f"torch.distributed.pipelining refused the split ({type(err).__name__}: {err})",
                          stacklevel=4)
    return [n for n in names if n in coarse or n in kept], suffix


def _in_block(model: nn.Module, name: str) -> str:
    """``blocks.3.attn.o_proj`` → ``attn.o_proj``: the name inside its block."""
    block = max((b for b in blocks(model) if name.startswith(b + ".")), key=len)
    return name[len(block) + 1:]


def in_flight(schedule: str, stage: int, stages: int, microbatches: int) -> int:
    """Microbatches whose activations stage ``stage`` holds at once under ``schedule``."""
    return microbatches if schedule == "gpipe" else min(stages - stage, microbatches)


def with_grads(schedule: str, stage: int, stages: int, microbatches: int) -> int:
    """Microbatches whose activations stage ``stage`` holds beside its parameter gradients: GPipe
    runs every backward after every forward, so one fewer than in flight; 1F1B runs a forward
    between backwards once it has more microbatches than in flight, so as many as in flight."""
    f = in_flight(schedule, stage, stages, microbatches)
    return f if schedule == "1f1b" and microbatches > f else f - 1


def boundary_bytes(atoms: list[Atom], i: int, j: int, s: int, stages: int, schedule: str, microbatches: int) -> int:
    """What stage ``s`` (atoms[i:j]) holds at its peak because of its boundaries, beyond its
    parameters, their gradients and its saved activations (read from ``PipelineStage``):

    * a later stage: one receive buffer per microbatch (``args_recv_info[chunk]``, made for every
      chunk before the first forward and kept), ``microbatches × atoms[i].boundary_bytes``;
    * a stage that sends: its outputs, kept in ``fwd_cache`` until their backward
      (``in flight × atoms[j].boundary_bytes``), and one gradient receive buffer per microbatch
      (``grad_recv_info[chunk]``, all made before the first backward), ``microbatches × ...``;
    * the last stage: the model's output per microbatch (``output_chunks``, merged for the caller).
    """
    held = microbatches * atoms[i].boundary_bytes if s > 0 else 0
    if s < stages - 1:
        held += (in_flight(schedule, s, stages, microbatches) + microbatches) * atoms[j].boundary_bytes
    else:
        held += microbatches * atoms[-1].output_bytes
    return held


def balance(atoms: list[Atom], saved: _Saved, stages: int, schedule: str, microbatches: int, dp: int = 1,
            block_names: list[str] | tuple = (), collective_copy: bool = False) -> list[int]:
    """Start indices of stages 1..S-1 (into ``atoms``) minimizing the largest stage's bytes.

    Exact: dynamic programming over (stage, start atom); stages begin at splittable atoms (after
    the first block child, where only contiguous tensors cross), so stage 0 holds the prefix and
    a block child, the last the suffix and the loss. Among splits with the same largest stage,
    the one whose boundaries send the fewest bytes.
    """
    n = len(atoms)
    first, received = saved.table(False), saved.table(True)

    def cost(i, j, s):  # atoms[i:j] as stage s, per rank
        return _stage(atoms, saved, first if s == 0 else received, i, j, s, stages, schedule, microbatches, dp,
                      block_names, collective_copy).bytes

    starts = [i for i, a in enumerate(atoms) if a.splittable]
    if stages - 1 > len(starts):
        raise ValueError(f"fxmem.shard.pipeline: stages={stages} is more than the {len(starts) + 1} pieces the model "
                         "can be split into (at block children and the projections inside them)")
    if stages == 1:
        return []
    inf = (float("inf"), 0)
    # best[s][b]: (the smallest largest-stage bytes, then the fewest bytes crossing boundaries)
    # with stages 0..s covering atoms[:b] (b a start). Ties are common with fine atoms (after
    # ``o_proj`` and before the next norm hold the same bytes): the boundary that sends less wins.
    best = [{b: inf for b in starts} for _ in range(stages - 1)]
    choice = [{b: 0 for b in starts} for _ in range(stages - 1)]
    for b in starts:
        best[0][b] = (cost(0, b, 0), atoms[b].boundary_bytes)
    for s in range(1, stages - 1):
        for b in starts:
            for a in starts:
                if a < b and best[s - 1][a] < inf:
                    c = (max(best[s - 1][a][0], cost(a, b, s)), best[s - 1][a][1] + atoms[b].boundary_bytes)
                    if c < best[s][b]:
                        best[s][b], choice[s][b] = c, a
    last = min((b for b in starts if best[stages - 2][b] < inf),
               key=lambda b: (max(best[stages - 2][b][0], cost(b, n, stages - 1)), best[stages - 2][b][1]))
    out = [last]
    for s in range(stages - 2, 0, -1):
        out.append(choice[s][out[-1]])
    return out[::-1]


def _check_schedule(schedule: str, stages: int, microbatches: int) -> None:
    if schedule not in SCHEDULES:
        raise ValueError(f"fxmem.shard.pipeline: schedule={schedule!r}; accepted: {' | '.join(SCHEDULES)}")
    if schedule == "1f1b" and microbatches < stages:
        raise ValueError(f"fxmem.shard.pipeline: 1f1b needs microbatches >= stages, got {microbatches} < {stages}")


def _unit_key(atom: Atom, block_names: list[str]) -> str:
    """The FSDP2 unit an atom's parameters are in: the innermost block holding it, "" for the root."""
    name = atom.module.removesuffix(END)
    holders = [b for b in block_names if name == b or name.startswith(b + ".")]
    return max(holders, key=len) if holders else ""


def _fsdp_units(atoms: list[Atom], acts: list[int], i: int, j: int,
                block_names: list[str]) -> tuple[Unit, list[Unit], Unit, int]:
    """Stage ``atoms[i:j]`` as FSDP2 units: the root's atoms before the blocks (embeddings), each
    block unit (contiguous atoms of one block), the root's atoms after them (final norm, head,
    loss's own activations apart). ``acts``: :meth:`_Saved.stage_atoms` — a storage several units save (HF Llama's rotary
    tables, in every attention) is the first one's: it lives until that unit's backward, the
    last of them."""
    groups: list[tuple[str, int, int]] = []   # (unit key, first atom, end)
    for k in range(i, j):
        key = _unit_key(atoms[k], block_names)
        if groups and groups[-1][0] == key:
            groups[-1] = (key, groups[-1][1], k + 1)
        else:
            groups.append((key, k, k + 1))

    def unit(a: int, b: int) -> Unit:
        return Unit(sum(x.param_bytes for x in atoms[a:b]), sum(x.gathered_bytes for x in atoms[a:b]),
                    sum(acts[a - i:b - i]))

    loss = 0
    if atoms[j - 1].module == LOSS:   # the loss: its backward runs first, apart from the head's
        loss = acts[j - 1 - i]
        groups[-1] = (groups[-1][0], groups[-1][1], groups[-1][2] - 1)
        if groups[-1][1] == groups[-1][2]:
            groups.pop()
    empty = Unit(0, 0, 0)
    prefix = unit(groups[0][1], groups[0][2]) if groups and groups[0][0] == "" else empty
    suffix = unit(groups[-1][1], groups[-1][2]) if len(groups) > 1 and groups[-1][0] == "" else empty
    if any(g[0] == "" for g in groups[1:-1]):
        raise RuntimeError(f"fxmem.shard.pipeline: root parameters between blocks in {[g[0] for g in groups]}: "
                           "the FSDP2 replay expects them before and after the blocks")
    return prefix, [unit(a, b) for key, a, b in groups if key != ""], suffix, loss


def _stage(atoms: list[Atom], saved: _Saved, table: list[list[int]], i: int, j: int, s: int, stages: int,
           schedule: str, microbatches: int, dp: int, block_names, collective_copy: bool) -> Stage:
    """``atoms[i:j]`` as stage ``s``: its bytes as one rank holds them (with dp: the FSDP2 replay,
    on activations without the storages its boundary buffers hold already)."""
    p = sum(a.param_bytes for a in atoms[i:j])
    fsdp, gathered, act = None, 0, table[i][j]
    if dp > 1:
        acts = saved.stage_atoms(s > 0, i, j)
        act = sum(acts)
        prefix, units, suffix, loss = _fsdp_units(atoms, acts, i, j, list(block_names))
        fsdp = FSDPStage(prefix, tuple(units), suffix, tuple(order(schedule, s, stages, microbatches)), dp,
                         collective_copy, loss)
        gathered = prefix.gathered + suffix.gathered + max((u.gathered for u in units), default=0)
    return Stage(s, atoms[i].module, atoms[j - 1].module, p, act, in_flight(schedule, s, stages, microbatches),
                 grad_bytes=p, boundary_bytes=boundary_bytes(atoms, i, j, s, stages, schedule, microbatches),
                 with_grads=with_grads(schedule, s, stages, microbatches), dp=dp, gathered_bytes=gathered, fsdp=fsdp)


def _fully_shard_stage(module: nn.Module, block_names: list[str], dp_mesh, mp_policy=None) -> None:
    """``fully_shard`` the stage's block units, then its root, over ``dp_mesh`` (the units
    :func:`fxmem.shard.mesh.blocks` chose on the whole model, as far as this stage holds them —
    the stage's ``GraphModule`` rebuilds ``nn.ModuleList`` as plain modules), each with ``mp_policy``
    (FSDP2's ``MixedPrecisionPolicy``) when given."""
    from torch.distributed.fsdp import fully_shard

    kw = {} if mp_policy is None else {"mp_policy": mp_policy}
    for name in block_names:
        try:
            unit = module.get_submodule(name)
        except AttributeError:
            continue  # on another stage
        if any(True for _ in unit.parameters()):
            fully_shard(unit, mesh=dp_mesh, reshard_after_forward=True, **kw)
    fully_shard(module, mesh=dp_mesh, **kw)


def _plan(atoms, saved, stages, schedule, microbatches, mb, loss_fn, dp=1, block_names=(), precision=None,
          backend="gloo", tp=1, tp_plan=None) -> PipelinePlan:
    collective_copy = backend == "gloo"
    starts = balance(atoms, saved, stages, schedule, microbatches, dp, block_names, collective_copy)
    bounds = [0] + starts + [len(atoms)]
    first, received = saved.table(False), saved.table(True)
    out = [_stage(atoms, saved, first if s == 0 else received, bounds[s], bounds[s + 1], s, stages, schedule,
                  microbatches, dp, block_names, collective_copy) for s in range(stages)]
    return PipelinePlan(out, schedule, microbatches, [atoms[i].module for i in starts], atoms, mb, loss_fn, saved,
                        dp, list(block_names), precision, backend, tp, tp_plan)


def pipeline(model: nn.Module, *args: Any, stages: int, schedule: str = "1f1b", microbatches: int | None = None,
             loss_fn: Callable | None = None, target: Any = None, dp: int = 1, precision: str | None = None,
             backend: str | None = None, tp: int = 1) -> PipelinePlan:
    """Plan ``stages`` pipeline stages balanced by memory (see the module docstring).

    ``args``: the whole batch (split into ``microbatches`` on dim 0, as the schedules split it;
    default: ``stages``). ``schedule``: ``"gpipe"`` or ``"1f1b"``. ``loss_fn(output, target)``:
    the loss the last stage runs (the schedule's ``loss_fn``), with ``target`` the whole batch's
    target — its saved tensors are counted on the last stage. Returns a :class:`PipelinePlan`;
    print it for per-stage bytes, ``plan.build(model, rank)`` runs it.

    ``dp``: each stage data-parallel over ``dp`` ranks with FSDP2 (a ``("pp", "dp")`` mesh;
    ``plan.build(..., group=mesh["pp"].get_group(), dp_mesh=mesh["dp"])``). ``args`` stay the
    *global* batch: it splits over dp first, then each dp rank's slice into ``microbatches``, so
    the batch size must be divisible by ``dp × microbatches``; bytes are per rank.

    ``precision`` (``None``, ``"bf16"``, ``"fp16"``; with ``dp > 1``): FSDP2's
    ``MixedPrecisionPolicy(param_dtype=..., reduce_dtype=float32)`` on every unit of every stage,
    as ``fxmem.shard.plan(mesh=..., precision=...)`` does — parameters all-gathered and computed
    low, gradients reduced in fp32 onto fp32 master shards. The stages are exported and measured
    with their parameters in that dtype (so the graph, its saved activations and what crosses the
    boundaries are the low-precision ones). Without dp there is no FSDP2 to keep fp32 masters, so
    ``precision`` with ``dp=1`` is refused.

    ``backend``: the process group's backend the per-rank bytes are for (gloo's all-gather copies
    its output, NCCL's does not); default: the initialized process group's, else ``"nccl"`` where
    CUDA is available, else ``"gloo"``.

    ``tp``: each stage tensor-parallel over ``tp`` ranks (a ``("pp", "tp")`` mesh;
    ``plan.build(..., group=mesh["pp"].get_group(), tp_mesh=mesh["tp"])``): the parameters split
    as ``fxmem.shard.plan(model, *microbatch, world_size=tp, vocab=False)`` splits them, the
    stage's graph run on DTensors (:mod:`fxmem.shard.stage_tp`). Bytes: parameters and gradients
    per rank; activations and boundaries counted whole (an upper bound: a rank holds less of the
    sharded ones). Not with ``dp`` (pp × dp × tp is not composed) nor ``precision``.
    """
    if not isinstance(tp, int) or isinstance(tp, bool) or tp < 1:
        raise ValueError(f"fxmem.shard.pipeline: tp={tp!r}; accepted: a positive int (tensor-parallel ranks per stage)")
    if tp > 1 and (dp > 1 or precision is not None):
        raise ValueError(f"fxmem.shard.pipeline: tp={tp} with dp={dp}, precision={precision!r}: pipeline stages "
                         "compose with FSDP2 over dp or with tensor parallelism over tp, not both (pp x dp x tp is not "
                         "done); accepted: tp=T with dp=1 and precision=None, or dp=D with tp=1")
    if not isinstance(dp, int) or isinstance(dp, bool) or dp < 1:
        raise ValueError(f"fxmem.shard.pipeline: dp={dp!r}; accepted: a positive int (data-parallel ranks per stage)")
    if precision is not None and precision not in _PRECISIONS:
        raise ValueError(f"fxmem.shard.pipeline: precision={precision!r}; accepted: None | "
                         f"{' | '.join(repr(p) for p in _PRECISIONS)}")
    if precision is not None and dp == 1:
        raise ValueError(f"fxmem.shard.pipeline: precision={precision!r} needs dp >= 2: it is FSDP2's "
                         "MixedPrecisionPolicy on each stage (fp32 master shards, low-precision compute), and "
                         "without dp no FSDP2 wraps the stages; accepted: precision=None with dp=1, or dp=D >= 2 "
                         "(build(..., dp_mesh=mesh['dp']))")
    backend = _resolve_backend(backend)
    if not isinstance(stages, int) or isinstance(stages, bool) or stages < 1:
        raise ValueError(f"fxmem.shard.pipeline: stages={stages!r}; accepted: a positive int")
    microbatches = stages if microbatches is None else microbatches
    if not isinstance(microbatches, int) or isinstance(microbatches, bool) or microbatches < 1:
        raise ValueError(f"fxmem.shard.pipeline: microbatches={microbatches!r}; accepted: a positive int")
    _check_schedule(schedule, stages, microbatches)
    if loss_fn is not None and not callable(loss_fn):
        raise ValueError(f"fxmem.shard.pipeline: loss_fn={loss_fn!r}; accepted: None or a callable (output, target)")
    if (loss_fn is None) != (target is None):
        raise ValueError("fxmem.shard.pipeline: give loss_fn and target together (the loss the last stage runs and "
                         "the whole batch's target), or neither")
    for a in args:
        if isinstance(a, torch.Tensor) and a.shape[0] % (dp * microbatches):
            raise ValueError(f"fxmem.shard.pipeline: batch size {a.shape[0]} is not divisible by dp x microbatches = "
                             f"{dp} x {microbatches}; accepted: a global batch that splits over dp={dp} ranks, "
                             f"each slice into {microbatches} microbatches")
    mb = _chunk(args, dp * microbatches)   # one microbatch of one dp rank's slice
    target_mb = _chunk((target,), dp * microbatches)[0] if loss_fn is not None else None
    master, tp_plan = None, None
    if precision is not None:  # measured as it will run: parameters in the compute dtype
        master = {n: p.numel() * p.element_size() for n, p in model.named_parameters()}
        model = _compute_copy(model, precision)
    if tp > 1:
        from fxmem.shard.stage_tp import shard_bytes
        from fxmem.shard.tensor_parallel import plan as plan_tp

        # vocab=False: a vocabulary-split embedding is a module style (masking, all-reduce) that a
        # graph piece has no module for
        tp_plan = plan_tp(model, *mb, world_size=tp, vocab=False)
        master = shard_bytes(model, tp_plan.param_shard_dims, tp)  # each atom's parameters as one rank holds them
    names = _atom_names(model, mb)
    if stages - 1 > len(names[0]) - 1:  # checked before the (slower) export
        raise ValueError(f"fxmem.shard.pipeline: stages={stages} is more than the {len(names[0])} pieces the model "
                         "can be split into (at block children and the projections inside them)")
    atoms, saved = measure_atoms(model, mb, loss_fn, target_mb, names, master=master)
    return _plan(atoms, saved, stages, schedule, microbatches, mb, loss_fn, dp, blocks(model), precision, backend,
                 tp, tp_plan)


def _resolve_backend(backend: str | None) -> str:
    if backend is None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return str(dist.get_backend())
        return "nccl" if torch.cuda.is_available() else "gloo"
    if not isinstance(backend, str) or not backend:
        raise ValueError(f"fxmem.shard.pipeline: backend={backend!r}; accepted: None (the process group's) or a "
                         "torch.distributed backend name ('gloo', 'nccl', ...)")
    return backend


def _compute_copy(model: nn.Module, precision: str) -> nn.Module:
    """A copy of ``model`` with its *parameters* in ``precision``'s dtype, buffers as they are —
    what FSDP2's ``MixedPrecisionPolicy(param_dtype=...)`` computes with (it casts parameters only)."""
    low = copy.deepcopy(model)
    for p in low.parameters():
        p.data = p.data.to(_PRECISIONS[precision])
    return low
