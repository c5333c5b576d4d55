"""The one ordered pass runner: statistics, verification after every pass, failure handling.

A pass is ``verb(gm, config) -> PassResult`` (design.md §4). The pipeline runs the passes of a
stage in the order of :data:`PASSES` (design.md §2), and for each one records its time, the node
counts before and after, its statistics and the memory figures of the graph after it. After
every pass it lints the graph, checks that every computing node still carries ``meta["val"]`` and
that the outputs keep their shapes and dtypes. A pass that raises — or leaves a graph that fails
those checks — is skipped with a warning that names it and the op it stopped at (the graph before
it is kept), or, with ``strict=True``, raises :class:`PassFailure` naming the pass and the passes
that ran before it.

Stages (``gm.meta["fxmem_stage"]``): ``"inference"`` (parameters frozen as ``get_attr``),
``"joint"`` (AOTAutograd's joint forward+backward graph, before partitioning), ``"forward"`` and
``"backward"`` (after partitioning).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from fxmem.analysis.liveness import estimate_peak
from fxmem.analysis.sizes import parameter_bytes
from fxmem.config import FxmemConfig
from fxmem.passes import int8, lower, precision, prune, shard, tying
from fxmem.passes.base import (  # noqa: F401  (re-exported: the contract's old home)
    EXAMPLE_INPUTS_KEY,
    STAGE_KEY,
    STAGES,
    KernelRecord,
    PassContext,
    PassResult,
    UnsupportedGraph,
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
    """A pass in the pipeline: its name (= option key), the stages it runs in, its function."""

    name: str
    stages: tuple[str, ...]
    fn: Callable[[fx.GraphModule, Any], PassResult]
    option: str | None = None  # FxmemConfig attribute holding its config; None: always on

    def config_for(self, config: FxmemConfig) -> Any:
        """The pass's own config, or None when the options switch it off."""
        if self.option is None:
            return config
        value = getattr(config, self.option)
        if value is None or getattr(value, "enabled", True) is False or getattr(value, "mode", None) == "off":
            return None
        return value


PASSES: tuple[PassSpec, ...] = (
    PassSpec("tie_weights", ("inference",), tying.tie_weights, "tie_weights"),
    PassSpec("prune", ("inference",), prune.prune, "prune"),
    PassSpec("int8", ("inference",), int8.quantize_int8, "int8"),
    PassSpec("precision", ("inference", "joint"), precision.cast_precision, "precision"),
    PassSpec("shard", ("inference", "forward", "backward"), shard.annotate, None),
    PassSpec("lower", ("inference", "forward", "backward"), lower.lower, "lower"),
)
"""The passes in pipeline order (design.md §2). A new pass adds one line here."""


def _passes() -> tuple[PassSpec, ...]:
    """The table :func:`run_pipeline` runs when it is given none (tests replace this function)."""
    return PASSES


def count_nodes(gm: fx.GraphModule) -> int:
    return sum(1 for n in gm.graph.nodes if n.op not in ("placeholder", "output"))


def _output_signature(gm: fx.GraphModule) -> list[tuple]:
    out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    sig = []
    for arg in torch.utils._pytree.tree_leaves(out.args[0]):
        val = arg.meta.get("val") if isinstance(arg, fx.Node) else arg
        sig.append((tuple(val.shape), val.dtype) if isinstance(val, torch.Tensor) else (type(val).__name__,))
    return sig


def check_graph(gm: fx.GraphModule, *, expected_outputs: list[tuple] | None = None) -> None:
    """Lint a graph and check the invariants every pass must keep. Raises ``AssertionError``."""
    gm.graph.lint()
    for node in gm.graph.nodes:
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
    kernels: list[Any] = field(default_factory=list)
    _counter: dict[str, int] = field(default_factory=dict)

    def new_graph_name(self, stage: str) -> str:
        i = self._counter.get(stage, 0)
        self._counter[stage] = i + 1
        return stage if i == 0 else f"{stage}#{i}"


def make_record(name: str, graph: str, gm: fx.GraphModule, *, status: str, time_s: float, nodes_before: int,
                stats: dict | None = None, message: str = "", saved_bytes: int | None = None) -> PassRecord:
    return PassRecord(
        name=name, graph=graph, stage=gm.meta.get(STAGE_KEY, "?"), status=status, time_s=time_s,
        nodes_before=nodes_before, nodes_after=count_nodes(gm), param_bytes=parameter_bytes(gm),
        peak_bytes=estimate_peak(gm).peak_bytes, saved_bytes=saved_bytes, stats=stats or {},
        message=message, code=gm.code,
    )


def run_pipeline(
    gm: fx.GraphModule,
    stage: str,
    config: FxmemConfig,
    recorder: Recorder | None = None,
    *,
    graph_name: str | None = None,
    passes: tuple[PassSpec, ...] | None = None,
) -> fx.GraphModule:
    """Run every enabled pass of ``stage`` over ``gm`` in order; return the final graph module."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; accepted: {STAGES}")
    recorder = recorder if recorder is not None else Recorder()
    graph_name = graph_name or recorder.new_graph_name(stage)
    gm.meta[STAGE_KEY] = stage
    expected = _output_signature(gm) if stage in ("inference", "joint") else None
    recorder.records.append(make_record("input", graph_name, gm, status="unchanged", time_s=0.0, nodes_before=count_nodes(gm)))
    history: list[str] = []
    for spec in passes if passes is not None else _passes():
        if stage not in spec.stages:
            continue
        pass_config = spec.config_for(config)
        if pass_config is None:
            continue
        before = count_nodes(gm)
        work = shallow_copy(gm)
        start = time.perf_counter()
        try:
            result = spec.fn(work, pass_config)
            check_graph(result.gm, expected_outputs=expected)
            result.gm.recompile()
        except Exception as exc:  # noqa: BLE001 - any failure of a pass skips it (or raises when strict)
            elapsed = time.perf_counter() - start
            message = f"fxmem: pass {spec.name!r} on graph {graph_name!r} failed{_failing_op(exc)}: {exc}"
            if config.strict:
                ran = ", ".join(history) or "none"
                raise PassFailure(f"{message} (passes that ran before it: {ran})") from exc
            warnings.warn(message + "; the pass was skipped and the graph left unchanged", stacklevel=2)
            recorder.records.append(make_record(spec.name, graph_name, gm, status="skipped", time_s=elapsed, nodes_before=before, message=str(exc)))
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
        recorder.records.append(make_record(spec.name, graph_name, gm, status="changed" if result.changed else "unchanged",
                                            time_s=elapsed, nodes_before=before, stats=result.stats))
    recorder.graphs[graph_name] = gm.code
    recorder.final_graphs[graph_name] = gm.graph
    return gm
