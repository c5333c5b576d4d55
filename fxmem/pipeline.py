"""The one ordered pass runner: context, fake mode, verification, statistics, failure handling.

A pass is ``verb(gm, config, ctx) -> PassResult`` (the contract: :mod:`fxmem.passes.base`). The
runner runs the passes of a stage in the order of :data:`PASSES`, each with its own config and a
:class:`~fxmem.passes.base.PassContext` (stage, example inputs) that the caller hands to
:func:`run_pipeline` explicitly; it leaves AOTAutograd's fake mode around the passes the table
marks ``real_tensors``. For each pass it records its time, the node counts before and after, its
statistics and the memory figures of the graph after it. After every pass it lints the graph,
checks that every computing node still carries ``meta["val"]`` and that the outputs keep their
shapes and dtypes. A pass that raises — or leaves a graph that fails those checks — is skipped
with a warning that names it and the op it stopped at (the graph before it is kept: the pass ran
on a copy), or, with ``strict=True``, raises :class:`PassFailure` naming the pass and the passes
that ran before it.

:func:`run_partition` runs the partition of a joint graph (:data:`REMAT`) under the same policy:
a failing remat falls back to PyTorch's ``default_partition`` with a warning.

Stages: ``"dynamo"`` (the torch-level graph of a training call as Dynamo hands it to the
backend, before AOTAutograd; nodes carry ``meta["example_value"]``), ``"inference"``
(parameters frozen as ``get_attr``), ``"joint"`` (AOTAutograd's joint
forward+backward graph, before partitioning), ``"forward"`` and ``"backward"`` (after
partitioning). See docs/architecture.md, "The pipeline".
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch._functorch import partitioners
from torch._subclasses.fake_tensor import unset_fake_temporarily

from fxmem.analysis.liveness import estimate_peak
from fxmem.analysis.saved import saved_activation_bytes
from fxmem.analysis.sizes import PARAM_META_KEY, parameter_bytes
from fxmem.config import FxmemConfig, ShardConfig
from fxmem.passes import chunk, int8, lower, lowrank, precision, prune, quantize, remat, shard, tying
from fxmem.passes.base import (  # noqa: F401  (re-exported: the contract's old home)
    STAGES,
    KernelRecord,
    PassContext,
    PassResult,
    UnsupportedGraph,
    normalize_void_ops,
    returns_nothing,
    shallow_copy,
)


class PassFailure(RuntimeError):
    """A pass failed under ``strict=True``; names the pass and the history before it."""


@dataclass
class PassRecord:
    """One row of the report: a pass run on one graph."""

    name: str
    graph: str
    stage: str
    status: str  # "changed" | "unchanged" | "skipped" | "failed"
    time_s: float
    nodes_before: int
    nodes_after: int
    param_bytes: int
    peak_bytes: int
    saved_bytes: int | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    message: str = ""
    code: str = ""


@dataclass(frozen=True)
class PassSpec:
    """A row of the pass table: everything the runner needs to know to run a pass.

    ``name`` is the report's name (and the option key); ``stages`` the graphs it runs on (its
    precondition: the runner never hands it another stage); ``option`` the ``FxmemConfig``
    attribute holding its config (``None``: always on, with ``fixed`` as its config);
    ``real_tensors``: the pass computes real tensors (quantized, cast, sliced weights, or a run
    on the example inputs), so the runner leaves AOTAutograd's fake mode around it.
    """

    name: str
    stages: tuple[str, ...]
    fn: Callable[..., PassResult]
    option: str | None = None
    real_tensors: bool = False
    fixed: Any = None

    def enabled(self, config: FxmemConfig) -> bool:
        """False when the options switch the pass off."""
        if self.option is None:
            return True
        value = getattr(config, self.option)
        return not (value is None or getattr(value, "enabled", True) is False or getattr(value, "mode", None) == "off")

    def config_for(self, config: FxmemConfig) -> Any:
        """The pass's own config (never the whole ``FxmemConfig``)."""
        return self.fixed if self.option is None else getattr(config, self.option)


PASSES: tuple[PassSpec, ...] = (
    PassSpec("chunk", ("dynamo",), chunk.chunk, "chunk"),
    PassSpec("tie_weights", ("inference",), tying.tie_weights, "tie_weights", real_tensors=True),
    PassSpec("prune", ("inference",), prune.prune, "prune", real_tensors=True),
    PassSpec("lowrank", ("inference",), lowrank.factorize, "lowrank", real_tensors=True),
    PassSpec("int8", ("inference",), int8.quantize_int8, "int8", real_tensors=True),
    PassSpec("quantize", ("inference",), quantize.quantize, "quantize", real_tensors=True),
    PassSpec("precision", ("inference", "joint"), precision.cast_precision, "precision", real_tensors=True),
    PassSpec("shard", ("inference", "forward", "backward"), shard.annotate, None, fixed=ShardConfig()),
    PassSpec("lower", ("inference", "forward", "backward"), lower.lower, "lower"),
)
"""The graph passes in pipeline order (docs/architecture.md, "The pipeline"): the torch-level
rewrite of a training call first (chunk, on Dynamo's graph before AOTAutograd), then weight passes
(tie, then prune, then lowrank factors, before int8/quantize quantize what is left, then precision), then the metadata and
kernel passes. A new pass adds one line here."""

REMAT = PassSpec("remat", ("joint",), remat.partition_with_info, "remat")
"""The partition of a joint graph into forward and backward (:func:`run_partition`): run after the
joint passes, with the same failure policy; when it fails or is off, PyTorch's
``default_partition`` partitions the graph instead."""


def _passes() -> tuple[PassSpec, ...]:
    """The table :func:`run_pipeline` runs when it is given none (tests replace this function)."""
    return PASSES


def count_nodes(gm: fx.GraphModule) -> int:
    return sum(1 for n in gm.graph.nodes if n.op not in ("placeholder", "output"))


def _output_signature(gm: fx.GraphModule) -> list[tuple]:
    out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    sig = []
    for arg in torch.utils._pytree.tree_leaves(out.args[0]):
        # Dynamo graphs (stage "dynamo") carry meta["example_value"] instead of meta["val"]
        val = arg.meta.get("val", arg.meta.get("example_value")) if isinstance(arg, fx.Node) else arg
        sig.append((tuple(val.shape), val.dtype) if isinstance(val, torch.Tensor) else (type(val).__name__,))
    return sig


def check_graph(gm: fx.GraphModule, *, expected_outputs: list[tuple] | None = None, require_values: bool = True) -> None:
    """Lint a graph and check the invariants every pass must keep. Raises ``AssertionError``.

    ``require_values=False`` (Dynamo graphs, whose side-effect calls such as
    ``_log_api_usage_once`` carry no fake value) skips the ``meta["val"]`` check.
    """
    gm.graph.lint()
    for node in gm.graph.nodes if require_values else ():
        if node.op == "call_function" and "val" not in node.meta and not returns_nothing(node):
            raise AssertionError(f"node {node.name} ({node.target}) has no meta['val']")
    if expected_outputs is not None:
        got = _output_signature(gm)
        if got != expected_outputs:
            raise AssertionError(f"graph outputs changed: {expected_outputs} -> {got}")


def _failing_op(exc: BaseException) -> str:
    op = getattr(exc, "op", None)
    return f" at op {op}" if op is not None else ""


@dataclass
class Recorder:
    """Collects the pass records and graph codes of every graph a pipeline run touches."""

    records: list[PassRecord] = field(default_factory=list)
    graphs: dict[str, str] = field(default_factory=dict)
    final_graphs: dict[str, fx.Graph] = field(default_factory=dict)  # for drawing
    partitions: list[dict[str, Any]] = field(default_factory=list)
    timelines: list[Any] = field(default_factory=list)  # analysis.timeline.StepTimeline, one per partition
    kernels: list[Any] = field(default_factory=list)
    _counter: dict[str, int] = field(default_factory=dict)
    _forward_names: list[str] = field(default_factory=list)

    def new_graph_name(self, stage: str) -> str:
        i = self._counter.get(stage, 0)
        self._counter[stage] = i + 1
        return stage if i == 0 else f"{stage}#{i}"

    def forward_graph_name(self) -> str:
        """The name :func:`run_partition` gave the forward graph it made (a new one otherwise)."""
        return self._forward_names.pop(0) if self._forward_names else self.new_graph_name("forward")


def make_record(name: str, graph: str, gm: fx.GraphModule, *, stage: str, status: str, time_s: float, nodes_before: int,
                stats: dict | None = None, message: str = "", saved_bytes: int | None = None) -> PassRecord:
    return PassRecord(
        name=name, graph=graph, stage=stage, status=status, time_s=time_s,
        nodes_before=nodes_before, nodes_after=count_nodes(gm), param_bytes=parameter_bytes(gm),
        peak_bytes=estimate_peak(gm).peak_bytes, saved_bytes=saved_bytes, stats=stats or {},
        message=message, code=gm.code,
    )


def _on_failure(name: str, graph_name: str, exc: BaseException, config: FxmemConfig, history: list[str], fallback: str) -> str:
    """The failure policy, one for every pass: raise :class:`PassFailure` under ``strict``, else
    warn (naming the pass, the graph and the op) and return the message for the report row."""
    message = f"fxmem: pass {name!r} on graph {graph_name!r} failed{_failing_op(exc)}: {exc}"
    if config.strict:
        ran = ", ".join(history) or "none"
        raise PassFailure(f"{message} (passes that ran before it: {ran})") from exc
    warnings.warn(f"{message}; {fallback}", stacklevel=3)
    return str(exc)


def run_pipeline(
    gm: fx.GraphModule,
    stage: str,
    config: FxmemConfig,
    recorder: Recorder | None = None,
    *,
    example_inputs: Sequence[Any] | None = None,
    graph_name: str | None = None,
    passes: tuple[PassSpec, ...] | None = None,
) -> fx.GraphModule:
    """Run every enabled pass of ``stage`` over ``gm`` in order; return the final graph module.

    ``example_inputs`` (the graph's user inputs, real tensors) reach the passes through their
    :class:`PassContext`; passes that calibrate on values use them.
    """
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; accepted: {STAGES}")
    recorder = recorder if recorder is not None else Recorder()
    graph_name = graph_name or recorder.new_graph_name(stage)
    ctx = PassContext(stage=stage, example_inputs=example_inputs, graph_name=graph_name)
    normalize_void_ops(gm)
    expected = _output_signature(gm) if stage in ("dynamo", "inference", "joint") else None
    recorder.records.append(make_record("input", graph_name, gm, stage=stage, status="unchanged", time_s=0.0,
                                        nodes_before=count_nodes(gm)))
    history: list[str] = []
    for spec in passes if passes is not None else _passes():
        if stage not in spec.stages or not spec.enabled(config):
            continue
        before = count_nodes(gm)
        work = shallow_copy(gm)  # a failing pass is dropped with its copy: nothing to undo
        start = time.perf_counter()
        try:
            # AOTAutograd compiles under its fake mode; passes that compute real tensors leave it
            with unset_fake_temporarily() if spec.real_tensors else contextlib.nullcontext():
                result = spec.fn(work, spec.config_for(config), ctx)
            check_graph(result.gm, expected_outputs=expected, require_values=stage != "dynamo")
            result.gm.recompile()
        except Exception as exc:  # noqa: BLE001 - any failure of a pass skips it (or raises when strict)
            elapsed = time.perf_counter() - start
            message = _on_failure(spec.name, graph_name, exc, config, history, "the pass was skipped and the graph left unchanged")
            recorder.records.append(make_record(spec.name, graph_name, gm, stage=stage, status="skipped", time_s=elapsed,
                                                nodes_before=before, message=message))
            continue
        elapsed = time.perf_counter() - start
        gm = result.gm
        history.append(spec.name)
        kernels = result.stats.pop("kernels", None)
        if kernels:
            for k in kernels:
                k.graph = graph_name
            recorder.kernels.extend(kernels)
            result.stats["kernels"] = len(kernels)
        recorder.records.append(make_record(spec.name, graph_name, gm, stage=stage, status="changed" if result.changed else "unchanged",
                                            time_s=elapsed, nodes_before=before, stats=result.stats))
    recorder.graphs[graph_name] = gm.code
    recorder.final_graphs[graph_name] = gm.graph
    return gm


def run_partition(
    joint_gm: fx.GraphModule,
    joint_inputs: Any,
    config: FxmemConfig,
    recorder: Recorder | None = None,
    *,
    num_fwd_outputs: int,
    static_lifetime_input_indices: Sequence[int] | None = None,
) -> tuple[fx.GraphModule, fx.GraphModule]:
    """Partition a joint graph by the ``remat`` option (:data:`REMAT`); return ``(forward, backward)``.

    The same failure policy as every pass: if remat fails, PyTorch's ``default_partition`` splits
    the graph instead, with a warning naming the op (``strict=True``: :class:`PassFailure`). The
    partition's description goes to ``recorder.partitions`` and its report row (named ``remat``,
    on the forward graph it made, with the saved-activation bytes) to ``recorder.records``.
    """
    recorder = recorder if recorder is not None else Recorder()
    kwargs = dict(num_fwd_outputs=num_fwd_outputs, static_lifetime_input_indices=static_lifetime_input_indices)
    message, status = "", "changed"
    start = time.perf_counter()
    if not REMAT.enabled(config):
        fw, bw = partitioners.default_partition(joint_gm, joint_inputs, **kwargs)
        info: dict[str, Any] = {"partitioner": "default_partition (remat=False)"}
    else:
        try:
            # remat prunes and re-tags the joint graph it is given: a copy, so that the fallback
            # partitions the graph as it came
            fw, bw, info = REMAT.fn(shallow_copy(joint_gm), joint_inputs, REMAT.config_for(config), **kwargs)
        except Exception as exc:  # noqa: BLE001 - any failure falls back to PyTorch's partition (or raises when strict)
            message = _on_failure(REMAT.name, "joint", exc, config, [], "PyTorch's default_partition was used instead")
            status = "skipped"
            fw, bw = partitioners.default_partition(joint_gm, joint_inputs, **kwargs)
            info = {"partitioner": "default_partition (remat failed)", "message": message}
    elapsed = time.perf_counter() - start
    static = set(static_lifetime_input_indices or ())
    for i, node in enumerate(n for n in fw.graph.nodes if n.op == "placeholder"):
        if i in static:
            node.meta[PARAM_META_KEY] = True  # parameters are not activations
    info["saved_bytes"] = saved = saved_activation_bytes(fw, num_fwd_outputs)
    recorder.partitions.append(info)
    name = recorder.new_graph_name("forward")
    recorder._forward_names.append(name)
    recorder.records.append(make_record(REMAT.name, name, fw, stage="forward", status=status, time_s=elapsed,
                                        nodes_before=count_nodes(fw), saved_bytes=saved, message=message,
                                        stats={"partitioner": info["partitioner"]}))
    return fw, bw
