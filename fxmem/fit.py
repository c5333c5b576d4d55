"""``fxmem.fit``: name a memory limit, get the fastest options that fit it.

::

    result = fxmem.fit(model, idx, targets, memory="2GiB")            # training (the default)
    compiled = torch.compile(model, backend="fxmem", options=result.options)
    print(result)          # every candidate tried: options, estimated peak, time cost, fits?

How it works (docs/fit.md has the reasoning):

1. **One trace, no memory.** The model gets a twin on the ``meta`` device (parameters and buffers
   replaced by meta tensors of the same shapes, nothing copied); Dynamo traces the twin once.
   Everything after that runs on the captured graph and its meta values.
2. **Candidates.** Training: ``chunk`` on / off × ``remat`` off, free recompute, budgets
   :data:`REMAT_BUDGETS` × ``precision`` (only where the user allows it). Inference: the
   weight passes the user allows (``precision``, ``int8``, ``quantize`` 4 bit, ``prune``).
3. **Estimates.** Training: per ``chunk`` value Inductor's ``compile_fx`` traces the joint graph
   once, with FakeTensors on the model's device (:func:`on_device`), and is stopped once fit's
   partitioner has run; in it, per candidate, fxmem's own ``joint`` passes and partition run on
   a copy of the joint (exactly what ``torch.compile(backend="fxmem")`` would run), and
   :func:`fxmem.analysis.timeline.step_timeline` (``reuse=True``) walks the forward and backward
   as Inductor's code has them: fused, buffers reused in place and pooled. The estimate of a step is
   parameters + buffers + that timeline's peak (batch, activations, the backward's transients,
   gradients) + optimizer state, plus the chunked-loss op's own workspace. Inference: the
   weights each pass would leave plus the inference graph's peak. How close this comes to
   measured peaks: docs/fit.md, "Calibration".
4. **Time cost.** FLOPs and bytes moved of the forward and backward graphs
   (:mod:`fxmem.analysis.cost`), combined as a roofline: ``flops + balance · bytes``, with
   ``balance`` the FLOPs per byte of the device (:data:`MACHINE_BALANCE`). Recomputation shows up
   as the extra FLOPs and bytes of the backward graph.
5. **Choice.** Among the candidates whose estimate is at most ``memory · (1 - headroom)``, the
   one with the fewest options that change numerics, then the cheapest. None fits →
   :class:`FitError`, naming the smallest estimate and what it would take.

Lossy options (``int8``, ``quantize``, ``prune``, low-precision inference weights) are
candidates only when named in ``allow``; training ``precision`` (bf16 compute, fp32 master
weights) changes numerics too, so it is also a candidate only when allowed.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import inspect
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from fxmem.analysis.cost import graph_cost
from fxmem.analysis.timeline import step_timeline
from fxmem.analysis.workspace import cpu_matmul_widens
from fxmem.config import FxmemConfig, parse_options
from fxmem.measure import training_loss
from fxmem.passes.base import copy_graph
from fxmem.passes.remat import shared_cuts

MODES = ("training", "inference")
ALLOWABLE = ("precision", "int8", "quantize", "prune")
"""What ``allow=`` accepts: options fit does not choose unless the user names them."""

REMAT_BUDGETS = (0.75, 0.5, 0.25, 0.0)
"""Remat budgets tried in training, beside ``remat=False`` and ``remat=True`` (free recompute)."""


OPTIMIZER_STATE = {None: 0, "sgd": 0, "momentum": 1, "adam": 2, "adamw": 2}
"""fp32 state tensors per parameter the optimizer keeps (``optimizer=``)."""

MACHINE_BALANCE = {"cuda": 150.0, "cpu": 8.0}
"""FLOPs per byte of memory traffic at which compute and bandwidth take equal time (H100: about
500 TFLOP/s dense TF32-bf16 over 3.3 TB/s; a server CPU: about 200 GFLOP/s over 25 GB/s)."""

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


class FitError(ValueError):
    """No candidate fits the memory limit (or ``fit`` was called wrongly)."""


def parse_memory(value: int | float | str) -> int:
    """``12 * 2**30``, ``"12GiB"``, ``"500 MB"``, ``"1.5g"`` → bytes (KiB/MiB/GiB are powers of 2, kB/MB/GB of 10)."""
    if isinstance(value, bool):
        raise FitError(f"fxmem.fit: memory={value!r}; accepted: bytes as an int, or a string like '12GiB' or '500MB'")
    if isinstance(value, (int, float)):
        if value <= 0 or not math.isfinite(value):
            raise FitError(f"fxmem.fit: memory={value!r}; accepted: a positive number of bytes")
        return int(value)
    if isinstance(value, str):
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", value)
        if match and match.group(2).lower() in _UNITS and float(match.group(1)) > 0:
            return int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    raise FitError(f"fxmem.fit: memory={value!r}; accepted: bytes as an int, or a string like '12GiB', '500MB', "
                   f"'2.5GB' (units {sorted(u for u in _UNITS if u)})")


def _gib(n: float) -> str:
    if abs(n) >= 2**30:
        return f"{n / 2**30:.3f} GiB"
    return f"{n / 2**20:.1f} MiB" if abs(n) >= 2**20 else f"{n / 2**10:.1f} KiB"


@dataclass
class Candidate:
    """One combination of options, its estimated peak (bytes) and its time cost (FLOP-equivalents)."""

    label: str
    options: dict[str, Any]
    estimate: int = 0
    cost: float = 0.0
    parts: dict[str, int] = field(default_factory=dict)  # params, gradients, optimizer, activations, ...
    fits: bool = False
    lossy: tuple[str, ...] = ()
    error: str = ""
    same_as: bool = False  # "chunk off" where chunk rewrites nothing: identical to "chunk on", not listed


@dataclass
class FitResult:
    """What :func:`fit` returns: the chosen options and everything it compared."""

    options: dict[str, Any]
    estimate: int
    memory: int
    mode: str
    chosen: Candidate
    candidates: list[Candidate]
    headroom: float
    world_size: int = 1
    allow: tuple = ()
    dp: int = 1
    tp: int = 1
    # where the per-rank state figures come from (a line naming fxmem.shard.plan, or why not)
    per_rank_source: str = ""
    # training: whether the estimates hold the model's outputs through the backward (fit's
    # hold_outputs; measure_options(hold_outputs=...) measures the same step)
    hold_outputs: bool = True

    def refit(self, memory: int | float | str) -> FitResult:
        """The choice for another limit among the same candidates, without tracing again
        (:class:`FitError` if none fits it)."""
        return choose(self.candidates, memory, headroom=self.headroom, mode=self.mode, allow=self.allow,
                      dp=self.dp, tp=self.tp, per_rank_source=self.per_rank_source, hold_outputs=self.hold_outputs)

    @property
    def table(self) -> str:
        """The candidates tried, cheapest first, the chosen one marked ``*``."""
        rows = sorted(self.candidates, key=lambda c: (c.error != "", c.cost))
        fastest = min((c.cost for c in rows if not c.error), default=1.0) or 1.0
        lines = [f"{'':1} {'options':44} {'est. peak':>12} {'time × fastest':>15}  fits"]
        for c in rows:
            mark = "*" if c is self.chosen else " "
            if c.error:
                lines.append(f"{mark} {c.label:44} {'—':>12} {'—':>15}  error: {c.error[:60]}")
            else:
                lines.append(f"{mark} {c.label:44} {_gib(c.estimate):>12} {c.cost / fastest:>15.3f}  "
                             f"{'yes' if c.fits else 'no'}")
        return "\n".join(lines)

    def __str__(self) -> str:
        per_rank = f" per rank (world size {self.world_size})" if self.world_size > 1 else ""
        parts = ", ".join(f"{k} {_gib(v)}" for k, v in self.chosen.parts.items() if v)
        return (f"fxmem.fit ({self.mode}): limit {_gib(self.memory)}{per_rank}, headroom {self.headroom:.0%}\n"
                f"chosen: {self.chosen.label} → options={self.options}\n"
                f"estimated peak {_gib(self.estimate)} ({parts})\n"
                + (f"per rank: {self.per_rank_source}\n" if self.per_rank_source else "") + f"\n{self.table}")


# --------------------------------------------------------------------------------------------
# Tracing once, on the meta device.
# --------------------------------------------------------------------------------------------


def meta_twin(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` whose parameters and buffers are meta tensors (no memory, no copies).

    ``copy.deepcopy`` with the memo pre-filled: every parameter and buffer maps to its meta
    stand-in, so the real tensors are never copied; tied parameters stay tied.
    """
    memo: dict[int, Any] = {}
    for p in model.parameters():
        memo[id(p)] = torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(model, memo)


def _to_meta(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().to("meta").requires_grad_(value.requires_grad)
    if isinstance(value, (list, tuple)):
        return type(value)(_to_meta(v) for v in value)
    if isinstance(value, Mapping):
        return {k: _to_meta(v) for k, v in value.items()}
    return value


def without_kv_cache(model: torch.nn.Module, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """``kwargs`` with ``use_cache=False`` added for a Hugging Face model whose config turns its KV
    cache on (every ``*ForCausalLM`` built from a config) and whose ``forward`` takes ``use_cache``,
    unless the caller chose it.

    Why: the cache's layers start as ``torch.tensor([], device=keys.device)``, and Dynamo, tracing
    the meta twin, makes that a real meta tensor its fake tensors refuse (the trace fails in
    ``torch.cat``; torch 2.11 and 2.13). What the estimate loses is small: in training the cache's
    keys and values are the ones attention saves for the backward anyway (the cache holds them
    from the forward to the end of the step instead of to their last use), and fxmem's optimized
    inference module returns no cache (``explain``'s note). An explicit ``use_cache=True`` is kept,
    and fails to trace with :class:`FitError` saying so."""
    kwargs = dict(kwargs)
    if "use_cache" in kwargs or not getattr(getattr(model, "config", None), "use_cache", False):
        return kwargs
    try:
        accepts = "use_cache" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        accepts = False
    return {**kwargs, "use_cache": False} if accepts else kwargs


def capture_graphs(model: torch.nn.Module, args: Sequence[Any], kwargs: Mapping[str, Any], *, training: bool,
                   on_graph) -> int:
    """Trace ``model(*args, **kwargs)`` with Dynamo on the meta device; ``on_graph(gm, example_inputs)``
    runs for every graph Dynamo makes. Returns the number of graphs. ``kwargs`` as :func:`fit`
    passes them: an HF model's KV cache already left off (:func:`without_kv_cache`)."""
    twin = meta_twin(model).train(training)
    count = [0]

    def backend(gm: fx.GraphModule, example_inputs):
        count[0] += 1
        on_graph(gm, list(example_inputs))
        return gm.forward  # the twin runs on meta tensors: nothing is computed, nothing allocated

    compiled = torch.compile(twin, backend=backend, dynamic=False)
    with torch.set_grad_enabled(training):
        try:
            compiled(*_to_meta(tuple(args)), **_to_meta(dict(kwargs)))
        except torch._dynamo.exc.TorchRuntimeError as exc:
            if kwargs.get("use_cache"):
                raise FitError("fxmem.fit: Dynamo cannot trace this model's KV cache on the meta device (its layers "
                               "start as torch.tensor([]), which stays a real meta tensor); pass use_cache=False "
                               "(a training step does not read the cache)") from exc
            raise
    if count[0] == 0:
        raise FitError("fxmem.fit: Dynamo captured no graph of this model (it ran entirely in eager); nothing to fit")
    return count[0]


def trace_device(model: torch.nn.Module) -> torch.device:
    """The device whose kernels the estimate traces: the model's (the CPU for a model on ``meta``)."""
    dev = next((t.device for t in [*model.parameters(), *model.buffers()]), torch.device("cpu"))
    return torch.device("cpu") if dev.type == "meta" else dev


def on_device(gm: fx.GraphModule, example_inputs: Sequence[Any], device: torch.device
              ) -> tuple[fx.GraphModule, list[Any]]:
    """A copy of Dynamo's meta-device graph, and fake inputs on ``device``, for AOTAutograd to trace.

    Why not the meta tensors themselves: AOTAutograd's joint trace of ``F.cross_entropy`` over
    meta tensors records no backward (the loss comes out with no gradient path; torch 2.13 warns
    "aten::nll_loss: an autograd kernel was not registered"), so every graph whose loss is the
    plain ``cross_entropy`` was estimated as a forward with no backward at all. Fake tensors
    (:class:`torch._subclasses.fake_tensor.FakeTensorMode`) on the model's own device allocate
    nothing either, and trace the same graph, with its gradients, that the real device gets.
    Device constants the trace baked in (``torch.arange(T, device=idx.device)``) are moved to
    ``device`` too.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.node import map_aggregate

    def move(value: Any) -> Any:
        if isinstance(value, torch.device) and value.type == "meta":
            return device
        return value

    new = fx.GraphModule(gm, copy_graph(gm.graph))
    mode = FakeTensorMode()

    def fake(t: torch.Tensor) -> torch.Tensor:
        with mode:
            out = torch.empty_strided(tuple(t.shape), tuple(t.stride()), dtype=t.dtype,
                                      device=device if t.device.type == "meta" else t.device)
        return out.requires_grad_(t.requires_grad) if t.is_floating_point() or t.is_complex() else out

    for node in new.graph.nodes:
        node.args = map_aggregate(node.args, move)
        node.kwargs = map_aggregate(node.kwargs, move)
        if node.op == "get_attr":
            owner_path, _, name = node.target.rpartition(".")
            owner = new.get_submodule(owner_path) if owner_path else new
            value = getattr(owner, name, None)
            if isinstance(value, torch.Tensor) and value.device.type == "meta":
                setattr(owner, name, fake(value))  # the copy's own attribute: Dynamo's graph keeps its tensor
    new.recompile()
    inputs = [fake(x) if isinstance(x, torch.Tensor) else x for x in example_inputs]
    return new, inputs


# --------------------------------------------------------------------------------------------
# Training estimates.
# --------------------------------------------------------------------------------------------


def training_candidates(allow: Iterable[str], budgets: Sequence[float] = REMAT_BUDGETS) -> list[tuple[str, dict[str, Any]]]:
    """(label, options) of every training combination tried."""
    remats: list[tuple[str, Any]] = [("remat off", False), ("remat free", True)]
    remats += [(f"remat {b}", {"budget": b}) for b in budgets]
    precisions: list[tuple[str, Any]] = [("", None)] + ([("bf16", "bf16")] if "precision" in allow else [])
    out = []
    for chunk_label, chunk in (("", True), ("no chunk", False)):
        for remat_label, remat in remats:
            for prec_label, prec in precisions:
                options: dict[str, Any] = {}
                if remat is not True:
                    options["remat"] = remat
                if not chunk:
                    options["chunk"] = False
                if prec is not None:
                    options["precision"] = prec
                label = ", ".join(x for x in (remat_label, prec_label, chunk_label) if x)
                out.append((label, options))
    return out


def _with_inductor_estimates(config: FxmemConfig) -> FxmemConfig:
    # the backend turns this on for codegen="inductor": remat's peak guard models fused code
    return dataclasses.replace(config, remat=dataclasses.replace(config.remat, fused=True))


def _tp_local(joint: fx.GraphModule, names: dict[int, str], tp_plan, tp: int, num_fwd_outputs: int,
              notes: list[str]):
    """:func:`fxmem.analysis.local_sizes.tp_local_sizes` of ``joint``, or None (and why, in
    ``notes``) where the propagation fails: the activations then stay whole (an upper bound)."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    from fxmem.analysis.local_sizes import tp_local_sizes

    try:
        # the partitioner runs under Inductor's FakeTensorMode; DTensor's planning mesh and
        # propagator work on real (CPU) metadata
        with unset_fake_temporarily():
            local = tp_local_sizes(joint, names, tp_plan, tp, num_fwd_outputs)
    except Exception as e:  # noqa: BLE001 - an estimate without the split, said so, beats none
        notes.append(f"activations not divided by tp ({type(e).__name__}: {' '.join(str(e).split())[:160]})")
        return None
    if local.no_rule:
        notes.append(f"counted whole, no DTensor rule: {', '.join(local.no_rule[:4])}")
    return local


def ban_collective_recompute(joint: fx.GraphModule, local) -> int:
    """Mark the nodes of fit's joint graph whose output a collective makes on a tensor-parallel rank
    (``local.collective_outputs``) and that are not matmuls — the vocabulary split's embedding
    lookup, all-reduced — as not recomputable (``meta["recompute"] = MUST_SAVE``, the checkpoint
    tag remat honours). On one process that lookup is free to recompute from the parameters and
    the token ids, and fit's remat did; the rank saves the all-reduced ``[B, T, d]`` embedding
    instead (0.25 MB per rank fit missed on the medium GPT, read off the rank's Inductor code).

    Matmul outputs (a row-parallel product all-reduced) are left alone: without a budget remat never
    recomputes a matmul anyway, and banning them too changed no measured case by more than 4 KB.
    The cost: under a remat budget the rank does not always save the lookup — HF Llama tiny with
    remat 0.5 estimates 1.079 of its measured rank with the ban, 1.023 without (docs/fit.md,
    "Distributed"). fit's own traced copy is marked (nothing the user
    compiles). Returns how many nodes."""
    from torch.utils.checkpoint import CheckpointPolicy

    from fxmem.analysis.local_sizes import _MATMULS

    names = set(local.collective_outputs)
    marked = 0
    for node in joint.graph.nodes:
        if node.name in names and node.target not in _MATMULS and node.meta.get("recompute") is None:
            node.meta["recompute"] = CheckpointPolicy.MUST_SAVE
            marked += 1
    return marked


def _estimate_training_graph(gm: fx.GraphModule, example_inputs: list, candidates: list[Candidate],
                             device: torch.device, tp_plan=None, tp: int = 1, tp_notes: list | None = None,
                             dp: int = 1, hold_outputs: bool = True) -> None:
    """Add one Dynamo graph's activation peak and time cost to each training candidate (the joint
    graph traced with fake tensors on ``device``: :func:`on_device`). With ``tp_plan`` (a
    :class:`fxmem.shard.tensor_parallel.ShardPlan` over ``tp`` ranks) the estimate is one rank's:
    every node's local share (:func:`fxmem.analysis.local_sizes.tp_local_sizes`); with ``dp`` > 1
    also the peak with each gradient ÷ dp from where it is made (:func:`_estimate_partition`)."""
    from torch._functorch.aot_autograd import aot_module_simplified
    from torch._functorch.partitioners import default_partition

    from fxmem.backend import DECOMPOSITIONS, parameter_inputs
    from fxmem.codegen import inductor_training
    from fxmem.detached_logits import detach_logits_outputs
    from fxmem.pipeline import Recorder, run_pipeline

    # Dynamo lifts parameters and buffers to graph inputs; AOTAutograd keeps their positions as
    # primals. Inductor tells the partitioner which are static; plain AOTAutograd does not.
    names = parameter_inputs(gm, example_inputs)
    params = sorted(names)

    by_chunk: dict[bool, list[Candidate]] = {}
    for cand in candidates:
        by_chunk.setdefault(parse_options(cand.options).chunk.enabled, []).append(cand)
    chunked = False
    for chunk, group in sorted(by_chunk.items(), reverse=True):  # chunk on first
        if not chunk and not chunked and True in by_chunk:
            # chunk found nothing to rewrite in this graph: "chunk off" is the same graph, same estimate
            for cand in group:
                cand.same_as = True
            continue
        # the dynamo stage (chunk) rewrites the torch-level graph; the rest share one joint trace
        recorder = Recorder()
        device_gm, device_inputs = on_device(gm, example_inputs, device)
        dynamo_gm = run_pipeline(device_gm, "dynamo",
                                 _with_inductor_estimates(parse_options(group[0].options)), recorder)
        if chunk:
            chunked = any(r.status == "changed" for r in recorder.records)
        # as the backend does: logits returned beside a chunked loss leave without a gradient path,
        # else the joint graph has a tangent for them — a [B, T, V] gradient of zeros the real step
        # never allocates (fit's estimate of a model returning its logits was 1.47 of the measured)
        detach_logits_outputs(dynamo_gm)

        def partition_fn(joint, joint_inputs, *, num_fwd_outputs, static_lifetime_input_indices=None,
                         group=group, stop=False, **kw):
            local = None
            if tp_plan is not None:  # one propagation per joint graph, shared by its candidates
                local = _tp_local(joint, names, tp_plan, tp, num_fwd_outputs, tp_notes)
                if local is not None:
                    ban_collective_recompute(joint, local)
            with shared_cuts():  # the budgets' peak guards compare the same cuts: build each once
                _estimate_group(group, joint, joint_inputs, num_fwd_outputs,
                                static_lifetime_input_indices or params, local, dp, hold_outputs)
            if stop:  # Inductor need not lower or generate code: the estimates are all fit wanted
                raise _Estimated
            return default_partition(joint, joint_inputs, num_fwd_outputs=num_fwd_outputs,
                                     static_lifetime_input_indices=static_lifetime_input_indices)

        try:
            # the joint graph Inductor would partition: its decompositions and joint-graph passes
            # (pattern rewrites) applied, exactly as torch.compile(backend="fxmem") gets it
            inductor_training(dynamo_gm, device_inputs, functools.partial(partition_fn, stop=True))
        except _Estimated:
            continue
        except Exception:  # noqa: BLE001 - Inductor cannot trace this graph: AOTAutograd alone, fxmem's decompositions
            for cand in group:
                cand.parts.clear()
                cand.error = ""

        def keep(g, _args):
            return g.forward

        aot_module_simplified(dynamo_gm, device_inputs,
                              fw_compiler=keep, bw_compiler=keep, partition_fn=partition_fn,
                              decompositions=DECOMPOSITIONS)


class _Estimated(Exception):
    """Raised by fit's partitioner inside Inductor once every candidate is estimated: stops the compile."""


def _peak_with_collectives(timeline, extra: Mapping[str, int] | None = None,
                           grads_made: Mapping[str, int] | None = None, dp: int = 1) -> int:
    """The timeline's peak (each op's own workspace is in it: :mod:`fxmem.analysis.workspace`),
    or higher where a collective's buffers sit on top of the live bytes.
    ``extra``: node name → bytes alive while it runs beyond its output (a collective's buffers).
    ``grads_made``: backward node name → bytes of the gradient it makes; each then counts ÷ ``dp``
    from that node on (FSDP2's reduce-scatter after each unit's backward)."""

    peak = timeline.peak_bytes if grads_made is None else 0
    made = 0
    for stage, name, live in timeline.points:
        if grads_made is not None:
            made += grads_made.get(name, 0) if stage == "backward" else 0
            live = live - made + made // dp
            peak = max(peak, live)
        if extra and name in extra:
            peak = max(peak, live + extra[name])
    return peak


def _estimate_group(group: list[Candidate], joint: fx.GraphModule, joint_inputs, num_fwd_outputs: int,
                    static, local=None, dp: int = 1, hold_outputs: bool = True) -> None:
    """Each candidate of ``group`` partitions (a copy of) the same joint graph; its estimate is added
    (one rank's, under ``local``: :class:`fxmem.analysis.local_sizes.LocalSizes`)."""
    from fxmem.analysis.sizes import local_sizes

    for cand in group:
        if cand.error:
            continue
        config = _with_inductor_estimates(parse_options(cand.options))
        try:
            with local_sizes(local) if local is not None else contextlib.nullcontext():
                # the partition too: a rank's remat weighs its local tensors
                _estimate_partition(cand, joint, joint_inputs, config, num_fwd_outputs, static, local, dp,
                                    hold_outputs)
        except Exception as exc:  # noqa: BLE001 - a candidate that cannot compile is reported, not chosen
            cand.error = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]


def _estimate_partition(cand: Candidate, joint: fx.GraphModule, joint_inputs, config: FxmemConfig,
                        num_fwd_outputs: int, static, local=None, dp: int = 1, hold_outputs: bool = True) -> None:
    """Add one candidate's partition of ``joint`` to ``cand.parts``: the timeline's peak above the
    inputs (``activations``: saved activations, temporaries and every gradient, held to the end),
    the gradients it holds (``_grads``, with ``local``), FLOPs and bytes moved. With ``dp`` > 1,
    ``_dp_activations`` instead: the walk with each gradient counted ÷ dp from the node that makes it
    on — FSDP2 reduce-scatters a unit's gradients right after its backward, so a rank never holds
    them all whole, and its peak is earlier, where the activations are (on the dp 2 × tp 2 GPT
    the single-process peak is at the end of the backward, every gradient alive; a rank's is at
    its start). ``hold_outputs``: the caller holds the model's outputs through the backward, else
    it keeps only the loss (``StepTimeline.outputs_held``)."""
    from fxmem.analysis.saved import forward_outputs
    from fxmem.analysis.sizes import PARAM_META_KEY, node_bytes, storage_root
    from fxmem.backend import partition
    from fxmem.pipeline import Recorder, run_pipeline

    recorder = Recorder()
    joint_copy = fx.GraphModule(joint, copy_graph(joint.graph))
    fw, bw = partition(joint_copy, joint_inputs, config, recorder, num_fwd_outputs=num_fwd_outputs,
                       static_lifetime_input_indices=static)
    static_set = set(static or ())
    for i, node in enumerate(n for n in fw.graph.nodes if n.op == "placeholder"):
        if i in static_set:
            node.meta[PARAM_META_KEY] = True
    fw = run_pipeline(fw, "forward", config, recorder)
    bw = run_pipeline(bw, "backward", config, recorder)
    timeline = step_timeline(fw, bw, num_fwd_outputs, fused=True, reuse=True, outputs_held=hold_outputs)
    # Inductor generates the code: the bytes its kernels move, not the ATen graph's op by op
    fw_cost, bw_cost = graph_cost(fw, fused=True), graph_cost(bw, fused=True)
    parts = cand.parts
    parts["batch"] = max(parts.get("batch", 0), timeline.input_bytes)
    roots = {storage_root(n) for n in forward_outputs(bw) if isinstance(n, fx.Node)}
    # one walk: with dp > 1 each gradient ÷ dp from where it is made (fit then takes it as is),
    # else every gradient held to the end (fit swaps in the per-rank figure)
    grads_made = {r.name: node_bytes(r) for r in roots} if dp > 1 else None
    key = "_dp_activations" if dp > 1 else "activations"
    peak = _peak_with_collectives(timeline, local.transients if local is not None else None, grads_made, dp)
    parts[key] = parts.get(key, 0) + peak - timeline.input_bytes
    if local is not None:  # the gradients the timeline holds are this rank's (fit swaps in the plan's)
        parts["_grads"] = parts.get("_grads", 0) + sum(node_bytes(r) for r in roots)
    parts["_flops"] = parts.get("_flops", 0) + fw_cost.flops + bw_cost.flops
    parts["_bytes"] = parts.get("_bytes", 0) + fw_cost.bytes_moved + bw_cost.bytes_moved


def _gradient_bytes(model: torch.nn.Module) -> int:
    """Bytes of the gradients a backward leaves: one per trainable parameter (tied ones once), fp32 master dtype."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            total += p.numel() * p.element_size()
    return total


def _state_bytes(model: torch.nn.Module) -> int:
    """Parameters and buffers, each storage once."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


# --------------------------------------------------------------------------------------------
# Inference estimates.
# --------------------------------------------------------------------------------------------


def inference_candidates(allow: Iterable[str]) -> list[tuple[str, dict[str, Any]]]:
    """(label, options) of every inference combination tried: the lossless default, then what is allowed."""
    weights: list[tuple[str, dict[str, Any]]] = [("defaults (tie_weights)", {})]
    if "int8" in allow:
        weights.append(("int8 weight_only", {"int8": "weight_only"}))
    if "quantize" in allow:
        weights.append(("quantize 4 bit, group 64", {"quantize": {"bits": 4, "group_size": 64}}))
    prunes: list[tuple[str, dict[str, Any]]] = [("", {})]
    if "prune" in allow:
        prunes += [(_prune_label(r), {"prune": {"ratio": r}}) for r in PRUNE_RATIOS]
    precisions: list[tuple[str, dict[str, Any]]] = [("", {})]
    if "precision" in allow:
        precisions.append(("bf16", {"precision": "bf16"}))
    out = []
    for wl, wo in weights:
        for pl, po in prunes:
            for ql, qo in precisions:
                label = ", ".join(x for x in (wl if wo or not (po or qo) else "", pl, ql) if x)
                out.append((label, {**wo, **po, **qo}))
    # chunking is lossless: tried without the weight options, which the backend does not combine
    # with it in inference (fxmem.backend.inference_chunks: they rewrite the Linears it would hide)
    return out[:1] + [(label, {"chunk": chunk}) for label, chunk in INFERENCE_CHUNKS[1:]] + out[1:]


#: The pruning ratios fit tries in inference when ``"prune"`` is allowed. Each is estimated on its
#: own pruned graph (:func:`fxmem.passes.prune.prune_shapes`): its weights and its activations.
PRUNE_RATIOS = (0.3, 0.5)


def _tensor_parallel_weights_error(options: Mapping[str, Any], tp: int) -> str:
    """Why an inference candidate's weight options are not estimated on a ``tp``-way tensor-parallel
    model ("" when they are). A tensor-parallel rank's parameters are DTensors, which the backend
    does not freeze into the inference graph (:meth:`fxmem.backend.FxmemBackend._compile_inference`:
    tensor subclasses are desugared into more placeholders): int8, quantize, lowrank and prune then
    find no weights and leave the graph as it was (int8, quantize and prune checked on a fake
    process group: 0 layers, 0 groups, no warning), and precision computes in bf16 with the
    weights kept fp32, cast at each use, which fit's estimate (weights stored bf16) does not model."""
    from fxmem.backend import inference_weight_options

    weights = inference_weight_options(parse_options(dict(options))) if tp > 1 else []
    lossy = [w for w in weights if w != "precision"]
    if lossy:
        return (f"{' and '.join(lossy)} {'does' if len(lossy) == 1 else 'do'} not apply with tp {tp}: the "
                "tensor-parallel weights are DTensors, which the backend does not freeze into the inference "
                "graph, so the pass finds no weights (0 layers / groups, no warning)")
    if weights:
        return (f"precision is not estimated with tp {tp}: the backend does not freeze the DTensor weights, so "
                "they stay fp32 and are cast at each use, which fit does not model")
    return ""


def _prune_label(ratio: float) -> str:
    return f"prune {ratio}"


#: The ``chunk`` settings fit tries in inference, with their labels: the default (an evaluation
#: loss chunked), the position-wise MLPs chunked along the tokens as well, and nothing chunked.
#: A setting that rewrites no graph differently from the default is not listed.
INFERENCE_CHUNKS: tuple[tuple[str, Any], ...] = (("", None), ("chunk mlp", {"mlp": True}), ("no chunk", False))


def _graph_label(options: Mapping[str, Any]) -> str:
    """Which estimated inference graph ``options`` compile to: a pruned one
    (:data:`PRUNE_RATIOS`), else the chunk setting's (:func:`_chunk_label`)."""
    prune = parse_options(dict(options)).prune
    return _prune_label(prune.ratio) if prune is not None else _chunk_label(options)


def _chunk_label(options: Mapping[str, Any]) -> str:
    """Which :data:`INFERENCE_CHUNKS` graph ``options`` compile to: with a weight option nothing
    is chunked (:func:`fxmem.backend.inference_chunks`)."""
    from fxmem.backend import inference_weight_options

    if inference_weight_options(parse_options(dict(options))):
        return "no chunk"
    chunk = options.get("chunk")
    return next(label for label, value in INFERENCE_CHUNKS if value == chunk)


def _weight_bytes(model: torch.nn.Module, options: Mapping[str, Any], pruned: Mapping[int, int] | None = None) -> int:
    """The bytes of weights the inference passes would leave for ``options`` (the quantized formats'
    own sizes: int8 codes + one fp32 scale per row; 4-bit codes + a 16-bit scale and zero point per
    group; bf16 halves every fp32 weight with two or more dimensions). ``pruned``: the element
    count of each weight (by ``id``) that pruning shrinks, from the pruned graph itself."""
    config = parse_options(dict(options))
    linears = {id(m.weight): m for m in model.modules() if isinstance(m, torch.nn.Linear)}
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    total, seen = 0, set()
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) in seen:
            continue
        seen.add(id(t))
        numel, size = t.numel(), t.element_size()
        lin = linears.get(id(t))
        if config.prune is not None and pruned:
            numel = pruned.get(id(t), numel)
        low = size
        if config.precision is not None and t.dim() >= 2 and t.dtype == torch.float32:
            low = 2
        quantized = 0.0
        if config.int8 is not None and lin is not None and numel >= config.int8.min_numel:
            quantized = numel + lin.out_features * 4
        if config.quantize is not None and numel >= config.quantize.min_numel and (
                lin is not None or (config.quantize.embeddings and id(t) in embeddings)):
            group = config.quantize.group_size or t.shape[-1]
            quantized = numel * config.quantize.bits / 8 + numel / group * 4
        if quantized:  # a tied table too: its lookup reads the int8 rows (fxmem::int8_embedding)
            total += quantized
        else:
            total += numel * low
    return int(total)


@dataclass
class _InferenceGraph:
    """One inference graph's timeline, kept so that each candidate can add its own ops' workspace."""

    peak: int                                   # the timeline's peak (with the batch)
    input_bytes: int
    linears: list[tuple[int, int, tuple[int, int]]]  # (live bytes after the Linear, its output bytes, weight [N, K])
    end: int = 0                                # live bytes after the last node (the outputs, the batch)
    outputs: int = 0                            # bytes of the floating-point outputs


def _linear_weight(node: fx.Node) -> fx.Node | None:
    """The parameter a ``mm``/``addmm`` multiplies by (through its transpose), i.e. a Linear's
    weight — what the int8 and quantize passes replace by their own op; else None."""
    from fxmem.analysis.sizes import is_parameter_node, storage_root

    aten = torch.ops.aten
    if node.op != "call_function" or node.target not in (aten.mm.default, aten.addmm.default):
        return None
    weight = node.args[-1]
    return storage_root(weight) if isinstance(weight, fx.Node) and is_parameter_node(weight) else None


def _estimate_inference_graph(gm: fx.GraphModule, example_inputs: list, sinks: dict, device: torch.device,
                              prune_ratios: Sequence[float] = (), tp_plan=None, tp: int = 1,
                              tp_notes: list | None = None) -> None:
    """Per ``chunk`` setting of :data:`INFERENCE_CHUNKS` (``sinks[label]``): the dynamo stage
    (chunk) rewrites the torch-level graph as the backend would, then the inference graph is
    estimated (:func:`_estimate_inference_trace`). Settings that give the same graph share one
    estimate; ``sinks[label]["_differs"]`` records that a setting changed some graph. With
    ``tp_plan`` the activations are one tensor-parallel rank's, as in training."""
    from fxmem.backend import parameter_inputs
    from fxmem.pipeline import Recorder, run_pipeline

    params = parameter_inputs(gm, example_inputs)
    tp_sizing = {"tp_plan": tp_plan, "tp": tp, "tp_notes": tp_notes if tp_notes is not None else []}
    device_gm, device_inputs = on_device(gm, example_inputs, device)
    estimated: dict[str, dict] = {}
    default_code = None
    variants = {}
    for label, chunk in INFERENCE_CHUNKS:
        recorder = Recorder()
        variant = run_pipeline(device_gm, "dynamo", parse_options({} if chunk is None else {"chunk": chunk}), recorder)
        if not any(r.status == "changed" for r in recorder.records):
            variant = device_gm
        variants[label] = variant
        code = variant.code
        default_code = code if default_code is None else default_code
        if code not in estimated:
            estimated[code] = {}
            _estimate_inference_trace(variant, device_inputs, params, estimated[code], **tp_sizing)
        sink = sinks.setdefault(label, {})
        sink["_differs"] = sink.get("_differs", False) or code != default_code
        _add_graph_figures(sink, estimated[code])
    # pruning is a weight option: its graph is the unchunked one (fxmem.backend.inference_chunks)
    for ratio in prune_ratios:
        figures: dict = {}
        _estimate_inference_trace(variants["no chunk"], device_inputs, params, figures,
                                  prune=parse_options({"prune": {"ratio": ratio}}).prune, **tp_sizing)
        _add_graph_figures(sinks.setdefault(_prune_label(ratio), {}), figures)


def _add_graph_figures(sink: dict, figures: dict) -> None:
    """Add one Dynamo graph's estimate to a candidate graph's running totals (graphs add up)."""
    sink.setdefault("_graphs", []).extend(figures["_graphs"])
    for key in ("_flops", "_bytes"):
        sink[key] = sink.get(key, 0) + figures[key]
    sink.setdefault("_pruned", {}).update(figures.get("_pruned", {}))
    sink["_pruned_groups"] = sink.get("_pruned_groups", 0) + figures.get("_pruned_groups", 0)
    if figures.get("_error"):
        sink["_error"] = figures["_error"]


def _estimate_inference_trace(gm: fx.GraphModule, device_inputs: list, params: Mapping[int, str], sink: dict,
                              prune: Any = None, tp_plan=None, tp: int = 1, tp_notes: list | None = None) -> None:
    """The inference graph's timeline as Inductor runs it (its decompositions; fused, buffers
    reused: ``step_timeline(reuse=True)``, as for training; chunked ops' own workspace on top),
    its Linears, and its FLOPs and bytes. ``params``: index → name of the inputs that are
    parameters. ``prune`` (a :class:`~fxmem.config.PruneConfig`): estimate the graph the prune
    pass leaves (:func:`_pruned_graph`) instead. ``tp_plan``: every node sized as one of ``tp``
    tensor-parallel ranks holds it (:func:`_tp_local`, the same propagation as training's over the
    forward graph alone: no backward all-reduce to force; what it cannot size, in ``tp_notes``)."""
    from torch._functorch.aot_autograd import aot_module_simplified
    from torch._inductor.decomposition import select_decomp_table

    from fxmem.analysis.saved import forward_outputs
    from fxmem.analysis.sizes import PARAM_META_KEY, local_sizes, node_bytes, storage_root, unique_storage_bytes
    from fxmem.backend import DECOMPOSITIONS

    def compiler(aten_gm: fx.GraphModule, _args):
        for i, node in enumerate(n for n in aten_gm.graph.nodes if n.op == "placeholder"):
            if i in params:
                node.meta[PARAM_META_KEY] = True
        if prune is not None:
            aten_gm = _pruned_graph(aten_gm, params, prune, sink)
        local = None
        notes = tp_notes if tp_notes is not None else []
        if tp_plan is not None:  # (fit estimates no pruned graph with tp > 1)
            (output,) = [n for n in aten_gm.graph.nodes if n.op == "output"]
            n_out = len(output.args[0]) if isinstance(output.args[0], (list, tuple)) else 1
            local = _tp_local(aten_gm, params, tp_plan, tp, n_out, notes)  # every output a forward one
        with local_sizes(local) if local is not None else contextlib.nullcontext():
            _inference_timeline(aten_gm, local)
        cost = graph_cost(aten_gm, fused=True)  # what Inductor's kernels move, as in training
        sink["_flops"] = sink.get("_flops", 0) + cost.flops
        sink["_bytes"] = sink.get("_bytes", 0) + cost.bytes_moved
        return aten_gm.forward

    def _inference_timeline(aten_gm: fx.GraphModule, local) -> None:
        outputs = [n for n in forward_outputs(aten_gm) if isinstance(n, fx.Node)]
        timeline = step_timeline(aten_gm, None, len(outputs), fused=True, reuse=True)
        live_after = {name: live for _, name, live in timeline.points}
        linears = []
        for node in aten_gm.graph.nodes:
            weight = _linear_weight(node)
            if weight is not None and node.name in live_after:
                linears.append((live_after[node.name], node_bytes(node), tuple(weight.meta["val"].shape)))
        floats = {n for n in outputs if isinstance(n.meta.get("val"), torch.Tensor) and n.meta["val"].is_floating_point()}
        # when the graph returns: its inputs and outputs (a point is marked where its node runs,
        # before that node's dead inputs are freed, so the last point is not the end)
        end = timeline.input_bytes + unique_storage_bytes(n for n in outputs if storage_root(n).op != "placeholder")
        peak = _peak_with_collectives(timeline, local.transients if local is not None else None)
        sink.setdefault("_graphs", []).append(_InferenceGraph(peak, timeline.input_bytes, linears, end,
                                                              unique_storage_bytes(floats)))

    # the graph Inductor compiles: the backend traces with fxmem's decompositions, then
    # codegen.inductor_inference retraces with Inductor's (``_unsafe_view`` becomes a view there,
    # where fxmem's trace alone would count it as a copy)
    with torch.no_grad():
        aot_module_simplified(gm, device_inputs, fw_compiler=compiler,
                              decompositions={**DECOMPOSITIONS, **select_decomp_table()})


def _pruned_graph(aten_gm: fx.GraphModule, params: Mapping[int, str], config: Any, sink: dict) -> fx.GraphModule:
    """A copy of the inference graph as the prune pass leaves it, for the estimate.

    The parameters are frozen into it as the backend freezes them (as meta tensors: nothing is
    allocated) and :func:`fxmem.passes.prune.prune_shapes` prunes it: the same analysis, the same
    rewrite and the same shape check as the pass, so the shapes are the pass's. Which indices the
    pass keeps depends on the weights' values; no shape does. Records ``sink["_pruned"]`` (name →
    element count of each weight pruning shrank) and ``sink["_pruned_groups"]``; where the pass
    would be skipped, ``sink["_error"]`` (its reason) and the graph is returned unchanged.
    """
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    from fxmem.freeze import freeze_parameters
    from fxmem.passes.base import UnsupportedGraph, copy_graph
    from fxmem.passes.prune import prune_shapes

    # AOTAutograd's fake mode is active in its compiler: left while the meta weights are made;
    # the pass's propagation (refresh_vals) runs in the mode the graph's values are in
    with unset_fake_temporarily():
        pruned = fx.GraphModule(aten_gm, copy_graph(aten_gm.graph))
        placeholders = [n for n in pruned.graph.nodes if n.op == "placeholder"]
        frozen = {}
        for i, fqn in params.items():
            val = placeholders[i].meta["val"]
            frozen[placeholders[i].name] = (fqn, torch.empty_strided(val.shape, val.stride(), dtype=val.dtype,
                                                                     device="meta"))
        freeze_parameters(pruned, frozen)
        before = {n.meta["fxmem_fqn"]: n.meta["val"].numel() for n in pruned.graph.nodes if n.op == "get_attr"}
        try:
            sink["_pruned_groups"] = prune_shapes(pruned, config)
        except Exception as exc:  # noqa: BLE001 - the pipeline skips the pass on any failure, with a warning
            reason = str(exc) if isinstance(exc, UnsupportedGraph) else f"{type(exc).__name__}: {exc}"
            sink["_error"] = f"prune does not apply: {reason}".splitlines()[0][:300]
            return aten_gm
    for node in pruned.graph.nodes:
        fqn = node.meta.get("fxmem_fqn") if node.op == "get_attr" else None
        if fqn in before and node.meta["val"].numel() != before[fqn]:
            sink.setdefault("_pruned", {})[fqn] = node.meta["val"].numel()
    return pruned


def _weight_format(options: Mapping[str, Any], numel: int) -> str:
    """What a Linear weight of ``numel`` elements becomes under ``options``: ``"quantize"``,
    ``"int8"`` or ``"dense"`` (fp32, or bf16 under ``precision``)."""
    config = parse_options(dict(options))
    if config.quantize is not None and numel >= config.quantize.min_numel:
        return "quantize"
    if config.int8 is not None and numel >= config.int8.min_numel:
        return "int8"
    return "dense"


def _linear_workspace(options: Mapping[str, Any], device: torch.device, out_bytes: int, shape: tuple[int, int]) -> int:
    """Bytes a Linear rewritten by ``options`` allocates inside its op on top of its output (the
    CPU paths of :mod:`fxmem.kernels`, which dequantize a block of weight rows at a time:
    :func:`fxmem.kernels.row_blocks.workspace_bytes`; on CUDA the Triton kernels dequantize in
    registers: 0). Per weight element of a block:

    * ``int8`` weight-only (``weight_only_linear_aten``): ``qweight.t().float()``, one fp32 copy
      through the ``mm`` (the scales and bias are applied in place on the product). Its input
      stays fp32 under ``precision`` too (the precision pass leaves fxmem's int8 ops as they
      are; measured), so never the bf16 ``_weight_int8pack_mm`` path. Per group: the fp32 codes
      and their scaled copy (8 bytes) while dequantizing.
    * ``quantize`` (``lowbit_linear_aten``): unpacking and scaling hold the codes and two fp32
      copies (9 bytes), then one fp32 copy through the ``mm``.
    """
    from fxmem.kernels.row_blocks import workspace_bytes

    n, k = shape
    if device.type != "cpu" or not n or not k:
        return 0
    fmt = _weight_format(options, n * k)
    m = out_bytes // (4 * n)  # the activations stay fp32 around these ops (see above)
    if fmt == "quantize":
        return workspace_bytes(m, n, k, 4, dequant_peak=9, matmul_weight=4)
    if fmt == "int8":
        group = parse_options(dict(options)).int8.granularity != "per_channel"
        return workspace_bytes(m, n, k, 4, dequant_peak=8 if group else 4, matmul_weight=4)
    return 0


def _linear_traffic(options: Mapping[str, Any], device: torch.device, out_bytes: int, shape: tuple[int, int]) -> int:
    """Bytes a Linear rewritten by ``options`` moves beyond reading its stored weight once (the
    cost model's ``bytes_moved`` counts that read from the weights' formats): on the CPU, writing
    and reading back the fp32 dequantized weight (and, for int8, the ``* scales`` pass over the
    output; for 4 bit, unpacking and two scaling passes). On CUDA the kernels read the codes
    once: 0. Without this, int8 looked cheaper than fp32 on the CPU, where it measured 1.4–2.9× slower on HF Llama's 32000×128 head."""
    from fxmem.kernels.row_blocks import rows_per_block

    n, k = shape
    numel = n * k
    if device.type != "cpu":
        return 0
    fmt = _weight_format(options, numel)
    # a weight dequantized in several row blocks also copies each block's product into the output
    blocks = 2 * out_bytes if rows_per_block(n, k) < n else 0
    if fmt == "int8":
        return 8 * numel + 2 * out_bytes + blocks
    if fmt == "quantize":
        return numel + 4 * (4 * numel) + 4 * numel + blocks
    return 0


def _inference_activations(graphs: list[_InferenceGraph], options: Mapping[str, Any], device: torch.device) -> int:
    """Activation bytes of a candidate: per graph, the timeline's peak or a Linear's op workspace
    on top of the bytes live there, whichever is higher (graphs added: an upper bound).

    ``precision``: activations in bf16 take half the bytes, but the graph's outputs are cast back
    to their fp32 dtype (the precision pass keeps the caller's dtypes): at the end of the graph
    the bf16 outputs and their fp32 copies are both alive. With ``int8`` or ``quantize`` the
    activations stay fp32 (measured: the precision pass leaves their ops' fp32 inputs)."""
    low = "precision" in options and not any(k in options for k in ("int8", "quantize"))  # see _linear_workspace
    # ATen's bf16 matmul on a CPU without native bf16 accumulates into an fp32 [M, N] buffer beside
    # its low-precision output (measured: MiniLM's [8192, 1536] addmm holds 48 MiB more than its
    # 24 MiB output; on a CPU with AVX-512 BF16 it does not)
    widens = low and device.type == "cpu" and cpu_matmul_widens(parse_options(dict(options)).precision.dtype)
    total = 0
    for g in graphs:
        peak = max([g.peak] + [live + _linear_workspace(options, device, out, shape) for live, out, shape in g.linears])
        acts = peak - g.input_bytes
        if low:
            acts = max(acts // 2, (g.end - g.input_bytes - g.outputs) // 2 + g.outputs // 2 + g.outputs)
            if widens:
                acts = max([acts] + [(live - g.input_bytes) // 2 + out for live, out, _ in g.linears])
        total += acts
    return total


# --------------------------------------------------------------------------------------------
# Distributed: per-rank state.
# --------------------------------------------------------------------------------------------


def _ranks(world_size: int | None, mesh: Mapping[str, int] | None) -> tuple[int, int]:
    """(data-parallel ranks that shard state FSDP-style, tensor-parallel ranks)."""
    if mesh is not None:
        if world_size is not None:
            raise FitError("fxmem.fit: give world_size= or mesh=, not both")
        if not isinstance(mesh, Mapping) or set(mesh) - {"dp", "tp"} or not mesh or any(
                not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in mesh.values()):
            raise FitError(f"fxmem.fit: mesh={mesh!r}; accepted: {{'dp': int >= 1, 'tp': int >= 1}}")
        return mesh.get("dp", 1), mesh.get("tp", 1)
    if world_size is None:
        return 1, 1
    if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
        raise FitError(f"fxmem.fit: world_size={world_size!r}; accepted: a positive int")
    return world_size, 1


def _plan_ranks(plan: Any, model: torch.nn.Module, world_size: int | None, mesh: Mapping[str, int] | None
                ) -> tuple[int, int]:
    """(dp, tp) of a caller's ``plan=`` (a :class:`fxmem.shard.mesh.MeshPlan`), after checking that it
    is one, that ``mesh=`` (if given) is its mesh, and that it was made for this model."""
    # imported here, as in _mesh_state: fxmem.shard pulls torch.distributed's tensor-parallel modules
    from fxmem.shard.mesh import MeshPlan

    accepted = ("accepted: the MeshPlan that fxmem.shard.plan(model, *args, mesh={'dp': D, 'tp': T}, ...) "
                "returns (for tensor parallelism alone, mesh={'dp': 1, 'tp': N})")
    if not isinstance(plan, MeshPlan):
        raise FitError(f"fxmem.fit: plan= is a {type(plan).__name__}; {accepted}")
    if world_size is not None:
        raise FitError("fxmem.fit: give plan= (its mesh sets the ranks) or world_size=, not both")
    planned = {"dp": plan.dp, "tp": plan.tp}
    if mesh is not None and _ranks(None, mesh) != (plan.dp, plan.tp):
        raise FitError(f"fxmem.fit: mesh={dict(mesh)!r} but plan= was made for mesh={planned!r}; accepted: "
                       "mesh= absent (the plan's mesh is used) or equal to the plan's")
    if plan.precision is not None:
        raise FitError(f"fxmem.fit: plan= has precision={plan.precision!r} (FSDP2's mixed precision), which fit "
                       "does not model; accepted: a plan without precision= (fit's own bf16 candidates are "
                       "tried with allow=['precision'])")
    unique = {id(p): p for p in model.parameters()}
    params = sum(p.numel() * p.element_size() for p in unique.values())
    if params != plan.single.params:
        raise FitError(f"fxmem.fit: plan= was made for a model of {plan.single.params} parameter bytes, this model "
                       f"has {params}; accepted: fxmem.shard.plan's plan of this model")
    return plan.dp, plan.tp


@dataclass
class _PerRank:
    """Per-rank model-state bytes under a mesh, and where they come from."""

    params: int
    grads: int
    unit: int      # the largest FSDP unit as all-gathered on one rank (tensor-parallel local shard)
    source: str
    tp_plan: Any = None  # the plan's ShardPlan: which nodes a rank holds a shard of (activations ÷ tp)
    root: int = 0  # the root unit (parameters no block holds) as all-gathered on one rank


def _mesh_state(model: torch.nn.Module, args: tuple, kwargs: dict, dp: int, tp: int, given: Any = None
                ) -> _PerRank | None:
    """Per-rank state from :func:`fxmem.shard.plan` with ``mesh={"dp": dp, "tp": tp}`` (or from
    ``given``, the caller's own plan of that mesh: with ``vocab=False``, say): parameters and
    gradients as the plan splits them (replicated layers whole, the vocabulary split or not,
    FSDP2's padded dim-0 shards), and the tensor-parallel shards of the largest block unit and of
    the root unit, which FSDP2 all-gathers. ``None`` with ``tp == 1`` and no plan given (FSDP alone: state ÷ dp is exact up
    to padding). A model the plan cannot shard keeps fit's ÷ dp·tp bound; the returned source says why."""
    if tp == 1 and given is None:
        return None
    # imported here: fxmem.shard pulls torch.distributed's tensor-parallel modules, which a
    # single-process fit does not need
    from fxmem.shard import plan as shard_plan
    p = given
    if p is None:
        try:
            p = shard_plan(model, *args, kwargs=kwargs, mesh={"dp": dp, "tp": tp})
        except Exception as e:  # the plan's own errors name the op / module it cannot shard
            msg = " ".join(str(e).split())[:160]
            return _PerRank(0, 0, 0, f"fxmem.shard.plan failed ({type(e).__name__}: {msg}); "
                                     f"state ÷ {dp * tp} and activations undivided: an upper bound")
    unit = max((u.per_rank_bytes * dp for u in p.units if u.module), default=0)
    root = sum(u.per_rank_bytes * dp for u in p.units if not u.module)
    # buffers (rotary tables, masks) are not parameters: every rank holds them whole
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    split = p.per_rank.params / max(p.single.params, 1)
    vocab = "" if p.tp_plan is None else f", vocabulary split: {'yes' if p.tp_plan.vocab else 'no'}"
    return _PerRank(p.per_rank.params + buffers, p.per_rank.grads, unit,
                    f"fxmem.shard.plan{' given' if given is not None else ''} (dp {dp} × tp {tp}{vocab}): "
                    f"parameters {p.per_rank.params} B of {p.single.params} B per rank ({split:.3f})", p.tp_plan,
                    root)


def _fsdp_units(model: torch.nn.Module) -> tuple[int, int]:
    """Parameter bytes of the largest FSDP unit — a member of a ModuleList/Sequential (a transformer
    block, usually), as ``fxmem.shard.plan`` wraps them; 0 where the model has no such list — and
    of the root unit (the parameters no member holds: embeddings, final norm, head; all of them
    where there is no list)."""
    members = [m for lst in model.modules() if isinstance(lst, (torch.nn.ModuleList, torch.nn.Sequential)) for m in lst]
    units = [sum(p.numel() * p.element_size() for p in m.parameters()) for m in members]
    held = {id(p) for m in members for p in m.parameters()}
    root = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values()
               if id(p) not in held)
    return max(units, default=0), root


def _fsdp_gathered(unit: int, root: int, training: bool, activations: int) -> int:
    """Bytes FSDP2 holds gathered beside the sharded state at a rank's peak, read from
    ``torch.distributed.fsdp._fully_shard`` (torch 2.13) and measured (docs/fit.md, "Distributed"):

    * the root unit's parameters, whole over dp (``root``): FSDP2 does not reshard the root after
      forward; in training it reshards at the end of backward, in inference never (the next call
      finds them gathered);
    * a block unit (``unit``) twice while it computes: its copied-out parameters and the flat
      all-gather buffer they came from, which FSDP2 keeps until the next unit's all-gather is
      waited on (``comm_ctx.all_gather_state``);
    * a third ``unit`` — in training the next unit's all-gather, prefetched in the backward, or the
      previous unit's reduce-scatter input, held until this unit's reduce-scatter
      (``reduce_scatter_states``); in inference the next unit's all-gather, made beside the
      previous one's buffer with only the hidden state alive, so it adds where it exceeds the
      estimated activations.
    """
    if training:
        return root + 3 * unit
    return root + 2 * unit + max(0, unit - activations)


# --------------------------------------------------------------------------------------------
# fit
# --------------------------------------------------------------------------------------------


def fit(model: torch.nn.Module, *args: Any, kwargs: Mapping[str, Any] | None = None, memory: int | float | str,
        mode: str = "training", allow: Iterable[str] = (), optimizer: str | None = None,
        world_size: int | None = None, mesh: Mapping[str, int] | None = None, plan: Any = None,
        headroom: float = 0.10, device: str | torch.device | None = None,
        budgets: Sequence[float] = REMAT_BUDGETS, hold_outputs: bool = True) -> FitResult:
    """The fastest fxmem options whose estimated peak fits ``memory`` (bytes, or ``"12GiB"``).

    ``mode``: ``"training"`` (a step: forward, backward, gradients; ``optimizer`` ``"sgd"``,
    ``"momentum"``, ``"adam"``/``"adamw"`` adds its fp32 state, ``None`` leaves it out) or
    ``"inference"``. ``allow``: options that change numerics which may be chosen — ``"precision"``,
    and for inference ``"int8"``, ``"quantize"``, ``"prune"``; nothing lossy is chosen otherwise.
    ``world_size`` (FSDP over that many ranks) or ``mesh={"dp": D, "tp": T}``: estimates per rank,
    parameters, gradients and optimizer state divided as FSDP / tensor parallelism shard them —
    with ``tp`` > 1 as :func:`fxmem.shard.plan` splits them (``FitResult.per_rank_source`` says
    so, or why the plan failed and the even split was kept); in training the activations are one
    rank's share of every node, the plan's placements propagated over the joint graph, with the
    all-gathers' buffers, in training and inference alike (docs/fit.md, "Distributed"). ``plan``:
    the :class:`~fxmem.shard.mesh.MeshPlan` the caller will ``fxmem.shard.apply`` (from
    ``fxmem.shard.plan(model, ..., mesh=...)``, e.g. with ``vocab=False``), used instead of fit's
    own plan; its mesh sets dp and tp (``mesh=``, if given, must equal it). With tp > 1, inference
    candidates that rewrite weights (int8, quantize, prune, precision) are listed with an error and
    never chosen: the backend does not freeze DTensor weights, so those passes find none. ``headroom``: the
    fraction of ``memory`` kept free for what the estimate does not see (allocator rounding,
    the caller's own tensors). ``device``: whose speeds rank the candidates (default: the model's).
    ``budgets``: the remat budgets tried beside remat off and free recompute (each costs a min-cut
    search; fewer make the fit faster). ``hold_outputs`` (training): the loop holds the model's
    outputs through the backward (``out = model(**batch); out.loss.backward()``), the default;
    ``False``: it keeps only the loss (``loss = model(**batch).loss``, HF's ``Trainer``), so the
    logits a model returns beside its loss are freed before the backward and not estimated there.

    The model is never run and no memory is allocated: Dynamo traces a meta-device twin. Raises
    :class:`FitError` when no candidate fits, naming the smallest estimate and what it would take.
    """
    limit = parse_memory(memory)
    if mode not in MODES:
        raise FitError(f"fxmem.fit: mode={mode!r}; accepted: {' | '.join(repr(m) for m in MODES)}")
    allow = (allow,) if isinstance(allow, str) else tuple(allow)
    bad = [a for a in allow if a not in ALLOWABLE]
    if bad:
        raise FitError(f"fxmem.fit: allow={list(allow)} has {bad}; accepted: {list(ALLOWABLE)}")
    if mode == "training" and set(allow) - {"precision"}:
        raise FitError(f"fxmem.fit: allow={list(allow)}: {sorted(set(allow) - {'precision'})} change weights and "
                       "run on inference graphs only; in training only 'precision' may be allowed")
    if optimizer not in OPTIMIZER_STATE:
        raise FitError(f"fxmem.fit: optimizer={optimizer!r}; accepted: {list(OPTIMIZER_STATE)}")
    if isinstance(headroom, bool) or not isinstance(headroom, (int, float)) or not 0 <= headroom < 1:
        raise FitError(f"fxmem.fit: headroom={headroom!r}; accepted: a float in [0, 1)")
    if not isinstance(model, torch.nn.Module):
        raise FitError(f"fxmem.fit: model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(hold_outputs, bool):
        raise FitError(f"fxmem.fit: hold_outputs={hold_outputs!r}; accepted: True (the loop holds the model's "
                       "outputs through the backward) or False (it keeps only the loss)")
    dp, tp = _ranks(world_size, mesh) if plan is None else _plan_ranks(plan, model, world_size, mesh)
    ranks = dp * tp
    kwargs = without_kv_cache(model, kwargs or {})  # every trace below: the plan's and the estimates'
    dev_type = torch.device(device).type if device is not None else next(
        (p.device.type for p in model.parameters()), "cpu")
    balance = MACHINE_BALANCE.get(dev_type, MACHINE_BALANCE["cuda"])
    training = mode == "training"

    for b in budgets:
        parse_options(remat={"budget": b})  # a bad budget fails here, naming what is accepted
    specs = training_candidates(allow, budgets) if training else inference_candidates(allow)
    # parse_options here also checks that fit's own output is options the backend accepts
    candidates = [Candidate(label, options, lossy=tuple(parse_options(options).lossy_options())
                            + (("precision",) if "precision" in options else ())) for label, options in specs]
    sinks: dict[str, dict] = {}
    traced_on = trace_device(model)
    # the plan first: in training its placements make the activations one rank's
    mesh_state = _mesh_state(model, args, kwargs, dp, tp, plan) if mesh is not None or plan is not None else None
    planned = mesh_state is not None and mesh_state.params > 0
    tp_plan = mesh_state.tp_plan if planned else None
    tp_notes: list[str] = []
    if training:
        capture_graphs(model, args, kwargs, training=True,
                       on_graph=lambda gm, ex: _estimate_training_graph(gm, ex, candidates, traced_on, tp_plan, tp,
                                                                        tp_notes, dp, hold_outputs))
    else:
        capture_graphs(model, args, kwargs, training=False,
                       on_graph=lambda gm, ex: _estimate_inference_graph(
                           gm, ex, sinks, traced_on, PRUNE_RATIOS if "prune" in allow and tp == 1 else (),
                           tp_plan, tp, tp_notes))
        chunked = sinks["no chunk"]["_differs"]  # the default chunked something (an evaluation loss)
        for cand in candidates:
            cand.error = _tensor_parallel_weights_error(cand.options, tp)
            if "prune" in cand.options and not cand.error:
                pruned = sinks[_graph_label(cand.options)]
                if pruned.get("_error"):  # the pass would be skipped: never estimate it as applied
                    cand.error = pruned["_error"]
                elif not pruned["_pruned_groups"]:  # nothing to prune: the same as without it
                    cand.same_as = True
            if "chunk" in cand.options:  # a chunk setting that rewrote no graph differently is the default's twin
                cand.same_as = not sinks[_chunk_label(cand.options)]["_differs"]
            elif chunked and _chunk_label(cand.options) == "no chunk":
                cand.options["chunk"] = False  # said, so that the backend need not warn that it drops it

    candidates = [c for c in candidates if not c.same_as]
    if training and dp > 1 and any(not parse_options(c.options).chunk.enabled for c in candidates):
        # the loss chunk rewrote a graph here (its "no chunk" twins were kept), but under FSDP2 it
        # never runs: FSDP2's hooks are dynamo-disabled, so calling a block inside the model's loop
        # over its blocks breaks the graph in a loop and Dynamo runs the whole frame — the
        # embeddings, head and loss — eagerly, compiling only the blocks (docs/fit.md, "dp 2 × tp 2")
        for cand in candidates:
            if parse_options(cand.options).chunk.enabled and not cand.error:
                cand.error = (f"chunk does not apply with dp {dp}: under FSDP2 the model's own code (its loss) runs "
                              "eagerly and only the blocks are compiled")
    state = _state_bytes(model)
    grads = _gradient_bytes(model)
    # per-rank state: the shard plan's split when there is one, else an even ÷ ranks
    rank_state = mesh_state.params if planned else state // ranks
    rank_grads = mesh_state.grads if planned else grads // ranks
    source = mesh_state.source if mesh_state is not None else ""
    if tp_plan is not None:
        source += ("; activations: each node's local share (DTensor's placements over the joint graph)"
                   + ("; except: " + "; ".join(dict.fromkeys(tp_notes)) if tp_notes else ""))
    # the weights by name, as the pruned graphs name them (a conv net's batch-norm statistics are
    # pruned with its channels: buffers too)
    named = {**dict(model.named_parameters(remove_duplicate=False)), **dict(model.named_buffers(remove_duplicate=False))}
    for cand in candidates:
        if cand.error:
            continue
        parts = cand.parts if training else {k: v for k, v in sinks[_graph_label(cand.options)].items()
                                             if k not in ("_differs", "_pruned_groups", "_error")}
        flops, moved = parts.pop("_flops", 0), parts.pop("_bytes", 0)
        if training:
            # the timeline holds every gradient (a tp rank's share with a plan); FSDP keeps 1/dp
            # of them after each unit's reduce-scatter: with dp > 1 the walk that shards each
            # gradient where it is made, else the plan's per-rank figure replaces them
            held = parts.pop("_grads", grads)
            sharded = parts.pop("_dp_activations", None)
            new = {"parameters": rank_state, "optimizer": OPTIMIZER_STATE[optimizer] * rank_grads,
                   "batch": parts.get("batch", 0),
                   "activations+gradients": sharded if sharded is not None
                   else parts.get("activations", 0) - held + rank_grads}
        else:
            graphs = parts.pop("_graphs", [])
            # a name not found keeps its whole size: the estimate errs high, never low
            pruned = {id(named[fqn]): numel for fqn, numel in parts.pop("_pruned", {}).items() if fqn in named}
            weights = _weight_bytes(model, cand.options, pruned)
            # the plan's split applies to the weights as stored (int8 / 4-bit shrink them by the same factor)
            new = {"parameters": weights * rank_state // max(state, 1) if planned else weights // ranks,
                   "batch": max((g.input_bytes for g in graphs), default=0),
                   "activations": _inference_activations(graphs, cand.options, traced_on)}
            moved = moved - state + new["parameters"] * ranks  # the weights read are the stored ones
            moved += sum(_linear_traffic(cand.options, torch.device(dev_type), out, shape)
                         for g in graphs for _, out, shape in g.linears)
        if ranks > 1 and dp > 1:  # FSDP2's gathered root, and its all-gather / reduce-scatter buffers of a unit
            unit, root = (mesh_state.unit, mesh_state.root) if planned else (b // tp for b in _fsdp_units(model))
            new["fsdp gathered"] = _fsdp_gathered(unit, root, training, new.get("activations", 0))
        cand.parts = new
        cand.estimate = int(sum(new.values()))
        cand.cost = float(flops + balance * moved)
    return choose(candidates, limit, headroom=headroom, mode=mode, allow=allow, dp=dp, tp=tp,
                  per_rank_source=source, hold_outputs=hold_outputs)


def choose(candidates: list[Candidate], memory: int | float | str, *, headroom: float, mode: str,
           allow: tuple = (), dp: int = 1, tp: int = 1, per_rank_source: str = "",
           hold_outputs: bool = True) -> FitResult:
    """The candidate within ``memory · (1 - headroom)`` with the fewest lossy options, then the
    cheapest (:class:`FitError` if none fits)."""
    limit = parse_memory(memory)
    effective = limit * (1 - headroom)
    candidates = [dataclasses.replace(c, fits=not c.error and c.estimate <= effective)
                  for c in candidates]
    fitting = [c for c in candidates if c.fits]
    if not fitting:
        raise FitError(_impossible_message(candidates, limit, headroom, mode, allow, dp * tp, dp, tp))
    # numerics first: an option that changes results is taken only where nothing exact fits
    chosen = min(fitting, key=lambda c: (len(c.lossy), c.cost, c.estimate))
    return FitResult(options=copy.deepcopy(chosen.options), estimate=chosen.estimate, memory=limit, mode=mode,
                     chosen=chosen, candidates=candidates, headroom=headroom, world_size=dp * tp,
                     allow=allow, dp=dp, tp=tp, per_rank_source=per_rank_source, hold_outputs=hold_outputs)


def _impossible_message(candidates: list[Candidate], limit: int, headroom: float, mode: str, allow: tuple,
                        ranks: int, dp: int, tp: int) -> str:
    """What an impossible limit tells the user: the smallest estimate, and what would make it fit."""
    valid = [c for c in candidates if not c.error]
    if not valid:
        errors = "; ".join(f"{c.label}: {c.error}" for c in candidates[:3])
        return f"fxmem.fit: no candidate could be estimated ({errors})"
    best = min(valid, key=lambda c: c.estimate)
    parts = ", ".join(f"{k} {_gib(v)}" for k, v in best.parts.items() if v)
    need = best.estimate / (1 - headroom)
    ways = [f"a limit of at least {_gib(need)}"]
    lossy_left = [a for a in (ALLOWABLE if mode == "inference" else ("precision",)) if a not in allow]
    if lossy_left:
        ways.append(f"allowing options that change numerics (allow={lossy_left}), which this fit did not try")
    state = best.parts.get("parameters", 0) + best.parts.get("optimizer", 0)
    rest = best.estimate - state
    effective = limit * (1 - headroom)
    if state and rest < effective:
        # sharding divides parameters, gradients and optimizer state; the activations stay
        total_state = state * ranks
        needed = math.ceil(total_state / max(effective - rest, 1))
        if needed > ranks:
            ways.append(f"sharding state over at least {needed} ranks (world_size={needed}, FSDP)")
    act = best.parts.get("activations+gradients", best.parts.get("activations", 0))
    if act:
        ways.append(f"a smaller batch or sequence (activations are {_gib(act)} of it)")
    where = f" per rank (dp {dp} × tp {tp})" if ranks > 1 else ""
    return (f"fxmem.fit: nothing fits {_gib(limit)}{where} ({mode}, {headroom:.0%} kept as headroom): the smallest "
            f"estimate is {_gib(best.estimate)} with options={best.options} ({parts}). It would take "
            + "; or ".join(ways) + ".")


# --------------------------------------------------------------------------------------------
# Checking a fit by measurement.
# --------------------------------------------------------------------------------------------


def _sync(dev: torch.device) -> None:
    """Wait for the device, so that a timing covers the work it launched."""
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def training_step(model: torch.nn.Module, *args: Any, kwargs: Mapping[str, Any] | None = None,
                  options: Mapping[str, Any] | None, loss_of=None, hold_outputs: bool = True):
    """A training step of ``model`` compiled with ``backend="fxmem"`` and ``options`` (``None``:
    plain ``torch.compile``): gradients set to None, forward, backward — the output held through
    the backward, as a training loop holds it (and fit assumes) — or, with ``hold_outputs=False``,
    dropped before the backward, the loss kept (HF's ``Trainer``; ``fit(hold_outputs=False)``).
    ``loss_of``: the loss of the output (default :func:`fxmem.measure.training_loss`, the rule
    explain uses too). Compiles on its first call."""
    kwargs = dict(kwargs or {})
    fn = torch.compile(model) if options is None else torch.compile(model, backend="fxmem", options=dict(options))
    params = [p for p in model.parameters() if p.requires_grad]

    def step() -> None:
        for p in params:
            p.grad = None
        out = fn(*args, **kwargs)
        loss = (loss_of or training_loss)(out)
        if not hold_outputs:
            del out  # the loss alone outlives the forward
        if loss is None:
            raise FitError("fxmem.fit: no output of the model requires grad, so a training step has no backward "
                           "(is the model in eval mode, or are its parameters frozen? mode='inference' fits a forward)")
        loss.backward()

    return step


def measure_options(model: torch.nn.Module, *args: Any, kwargs: Mapping[str, Any] | None = None,
                    options: Mapping[str, Any] | None, loss_of=None, steps: int = 3,
                    device: str | torch.device | None = None, keep: dict | None = None,
                    hold_outputs: bool = True) -> dict[str, float]:
    """Compile ``model`` with ``backend="fxmem"`` and ``options`` (``None``: plain ``torch.compile``),
    run training steps, and measure what :func:`fit` estimates: the whole step's peak in bytes
    (``peak_bytes``: parameters, buffers and the batch that exist before the step, plus the peak
    above them measured by :func:`fxmem.measure.peak_memory`) and the median step time
    (``step_s``). Gradients are set to None before each step, as ``optimizer.zero_grad()`` does.
    The model is compiled in place of nothing: the caller's module is left as it was. ``keep``: a
    dict that receives the compiled step (``keep["step"]``), to time it again later.
    ``hold_outputs``: as :func:`training_step` (pass the fit's ``FitResult.hold_outputs``)."""
    import statistics
    import time

    from fxmem.measure import peak_memory

    kwargs = dict(kwargs or {})
    dev = torch.device(device) if device is not None else next((p.device for p in model.parameters()), torch.device("cpu"))
    step = training_step(model, *args, kwargs=kwargs, options=options, loss_of=loss_of, hold_outputs=hold_outputs)
    if keep is not None:
        keep["step"] = step
    params = [p for p in model.parameters() if p.requires_grad]

    step()
    step()  # compiled, and no recompilation left to hide in the measured step
    for p in params:
        p.grad = None
    before = _state_bytes(model) + sum(t.numel() * t.element_size() for t in
                                       [*args, *kwargs.values()] if isinstance(t, torch.Tensor))
    peak, _ = peak_memory(step, device=dev)
    times = []
    for _ in range(steps):
        _sync(dev)
        start = time.perf_counter()
        step()
        _sync(dev)
        times.append(time.perf_counter() - start)
    for p in params:
        p.grad = None
    return {"peak_bytes": float(before + peak.peak_bytes), "step_s": statistics.median(times)}


def measure_inference(model: torch.nn.Module, *args: Any, kwargs: Mapping[str, Any] | None = None,
                      options: Mapping[str, Any] | None, steps: int = 3,
                      device: str | torch.device | None = None, compiled: Any = None) -> dict[str, Any]:
    """What :func:`fit` estimates for ``mode="inference"``, measured: the weights the options leave
    plus the batch plus the peak of a no-grad forward.

    * ``weights_bytes``: the distinct storages of the weights the transformed graph reads
      (``fxmem.optimize(model, *args, **options)``: the module whose weights fit estimates, the
      fp32 originals not counted) — counted from the tensors, not from their formats;
    * ``forward_peak_bytes``: :func:`fxmem.measure.peak_memory` of the third no-grad call of
      ``torch.compile(model, backend="fxmem", options=options)`` (``None``: plain
      ``torch.compile``), above what was allocated before it (its output included);
    * ``peak_bytes``: their sum with the batch; ``step_s``: the median of ``steps`` calls;
      ``warnings``: what the compile warned (a pass that was skipped, say).

    ``compiled``: the callable to measure, when the caller keeps it (to read its outputs too)
    instead of a compile made here — ``torch.compile(model, backend="fxmem", options=options)``,
    plain ``torch.compile(model)`` for ``options=None``, or ``model`` itself for eager.
    """
    import statistics
    import time
    import warnings

    from fxmem.freeze import frozen_tensors
    from fxmem.measure import peak_memory
    from fxmem.report import optimize

    kwargs = dict(kwargs or {})
    dev = torch.device(device) if device is not None else next((p.device for p in model.parameters()), torch.device("cpu"))
    if options is None:
        weights = _state_bytes(model)
        fn = compiled if compiled is not None else torch.compile(model)
    else:
        module = optimize(model, *args, kwargs=kwargs, **dict(options))
        seen, weights = set(), 0
        for t in frozen_tensors(module.graph_module).values():
            key = (t.untyped_storage().data_ptr(), t.device)
            if key not in seen:
                seen.add(key)
                weights += t.untyped_storage().nbytes()
        del module
        fn = compiled if compiled is not None else torch.compile(model, backend="fxmem", options=dict(options))
    batch = sum(t.numel() * t.element_size() for t in [*args, *kwargs.values()] if isinstance(t, torch.Tensor))

    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn(*args, **kwargs)
        fn(*args, **kwargs)
        peak, out = peak_memory(lambda: fn(*args, **kwargs), device=dev)
        del out
        times = []
        for _ in range(steps):
            _sync(dev)
            start = time.perf_counter()
            fn(*args, **kwargs)
            _sync(dev)
            times.append(time.perf_counter() - start)
    notes = sorted({str(w.message).splitlines()[0][:200] for w in caught if "fxmem" in str(w.message)})
    return {"peak_bytes": float(weights + batch + peak.peak_bytes), "weights_bytes": weights,
            "forward_peak_bytes": peak.peak_bytes, "step_s": statistics.median(times), "warnings": notes}
