"""The pass contract: what every pass imports, and nothing else of fxmem (a leaf module).

A pass is a function ``verb(gm, config, ctx=PassContext()) -> PassResult``:

* ``gm`` — an ATen graph module (every computing node carries ``meta["val"]``); the pass may
  change it in place or return a new one, and keeps no module-level state;
* ``config`` — the pass's own frozen config dataclass (:mod:`fxmem.config`), never the whole
  ``FxmemConfig``;
* ``ctx`` — a :class:`PassContext`: the stage of the graph and the example inputs, made by the
  runner (:func:`fxmem.pipeline.run_pipeline`) and handed over explicitly. Nothing a pass needs is
  read from ``gm.meta``.

A pass that cannot handle a graph raises :class:`UnsupportedGraph` naming the op; the runner
then keeps the graph from before the pass (skipped with a warning, or an error under
``strict=True``). Which stages a pass runs in, the option that switches it, and whether it
computes real tensors (so the runner leaves AOTAutograd's fake mode for it) are columns of the
pass table, :data:`fxmem.pipeline.PASSES` — see docs/architecture.md, "The pipeline".

This module imports only torch: the pipeline imports the passes, the passes import this.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

STAGES = ("dynamo", "inference", "joint", "forward", "backward")
"""``dynamo``: the torch-level graph of a training call (Dynamo's, before AOTAutograd; nodes carry
``meta["example_value"]``); ``inference``: parameters frozen as ``get_attr``; ``joint``: AOTAutograd's forward+backward
graph before partitioning; ``forward`` / ``backward``: the two halves after it."""

# Node meta keys that cross module boundaries (written by one module, read by another).
FQN_KEY = "fxmem_fqn"
"""On a frozen weight's ``get_attr`` node: its qualified name in the user's model."""
RECOMPUTED_KEY = "fxmem_recomputed"
"""On a node of a backward graph that remat produced: True when the node computes a forward value
again (rematerialization). Read by the Inductor code generator's fusion guard
(:mod:`fxmem.fusion_guard`)."""


@dataclass(frozen=True)
class PassContext:
    """What the runner tells a pass about the graph it runs on (explicit, never ``gm.meta``).

    ``example_inputs`` are the graph's user inputs as real tensors, when the caller has them
    (explain/optimize, the backend's inference graphs); passes that calibrate on values (the
    precision overflow guard, activation/Taylor importance, similar tying's error) use them and
    say so in their statistics when they are missing.
    """

    stage: str = "inference"
    example_inputs: tuple | None = None
    graph_name: str = ""

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"unknown stage {self.stage!r}; accepted: {STAGES}")
        if self.example_inputs is not None:
            object.__setattr__(self, "example_inputs", tuple(self.example_inputs))

    @property
    def inference(self) -> bool:
        return self.stage == "inference"

    def require_stage(self, pass_name: str, *stages: str) -> None:
        """Raise :class:`UnsupportedGraph` unless the graph is in one of ``stages``."""
        if self.stage not in stages:
            raise UnsupportedGraph(pass_name, f"runs on {' / '.join(stages)} graphs only; this is a {self.stage!r} graph")

    def real_example_inputs(self) -> tuple | None:
        """The example inputs when they hold values (None when absent or fake)."""
        if self.example_inputs is None or not _all_real(self.example_inputs):
            return None
        return self.example_inputs


def _all_real(values: tuple) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return not any(isinstance(x, FakeTensor) for x in values)


@dataclass
class PassResult:
    """What a pass returns: the graph module, whether it changed, and its statistics.

    Statistic names are documented in docs/passes/README.md; a name means the same in every pass
    (``param_bytes_saved``: parameter bytes; ``traffic_bytes_saved``: memory traffic).
    """

    gm: fx.GraphModule
    changed: bool
    stats: dict[str, Any] = field(default_factory=dict)


class UnsupportedGraph(Exception):
    """Raised by a pass that cannot handle a graph; names the op. The pipeline skips the pass."""

    def __init__(self, op: object, reason: str):
        self.op = op
        super().__init__(f"unsupported op {op}: {reason}")


@dataclass
class KernelRecord:
    """A generated or hand-written kernel a pass put in the graph (shown in ``report.kernels``).

    A pass that emits kernels lists them in ``PassResult.stats["kernels"]``; the pipeline moves
    them into the report and leaves a count in the statistics.
    """

    name: str
    nodes_replaced: list[str]
    bytes_saved: int
    source: str
    graph: str = ""


# -- helpers every pass shares (one copy each) --------------------------------------------------


def copy_graph(graph: fx.Graph) -> fx.Graph:
    """A node-for-node copy of ``graph``: new nodes with the same targets and (shallow-copied)
    ``meta``, the output node's ``meta`` too (AOTAutograd's joint graphs describe their outputs
    there, ``meta["desc"]``, and the partitioners read it), and the graph's pytree codegen."""
    new = fx.Graph(tracer_cls=graph._tracer_cls)
    copied = new.graph_copy(graph, {}, return_output_node=True)
    new._codegen = graph._codegen  # shared, not deep-copied: passes never mutate it (set_codegen replaces it)
    if copied is not None:
        value, old_output = copied
        out = new.output(value, type_expr=getattr(old_output, "type", None))
        out.meta = copy.copy(old_output.meta)
    return new


def shallow_copy(gm: fx.GraphModule) -> fx.GraphModule:
    """A new GraphModule over a copy of the graph that shares the attribute tensors (no copies).

    Only the attributes the graph reads are carried over (``fx.GraphModule`` copies what its
    ``get_attr`` nodes name), so a weight a pass replaced is no longer held.
    """
    new = fx.GraphModule(gm, copy_graph(gm.graph))
    new.meta = dict(gm.meta)
    return new


def val(x: Any) -> Any:
    """The value an argument stands for at trace time: a node's ``meta["val"]`` (a FakeTensor, a
    tuple of them, a SymInt; None when it has none), or the argument itself (a constant)."""
    return x.meta.get("val") if isinstance(x, fx.Node) else x


def traced_value(x: Any) -> Any:
    """``val`` for the torch-level graph too: Dynamo's graph carries ``meta["example_value"]``,
    AOTAutograd's ``meta["val"]`` (the ``dynamo``-stage passes, chunk and chunk_mlp, read both)."""
    if isinstance(x, fx.Node):
        return x.meta.get("example_value", x.meta.get("val"))
    return x


def tensor_val(x: Any) -> torch.Tensor | None:
    """``val(x)`` when it is one tensor, else None."""
    v = val(x)
    return v if isinstance(v, torch.Tensor) else None


def returns_nothing(node: fx.Node) -> bool:
    """Ops run for their checks alone (``aten._assert_tensor_metadata``) produce no value.

    The capture gives such nodes ``meta["val"] = None`` (:func:`normalize_void_ops`), so every
    computing node has the key."""
    schema = getattr(node.target, "_schema", None)
    return node.op == "call_function" and schema is not None and len(schema.returns) == 0


def normalize_void_ops(gm: fx.GraphModule) -> fx.GraphModule:
    """Give every op that returns nothing ``meta["val"] = None`` (graph quirk, normalized once)."""
    for node in gm.graph.nodes:
        if returns_nothing(node):
            node.meta.setdefault("val", None)
    return gm


__all__ = [
    "STAGES", "FQN_KEY", "PassContext", "PassResult", "UnsupportedGraph", "KernelRecord",
    "copy_graph", "shallow_copy", "val", "tensor_val", "returns_nothing", "normalize_void_ops",
]
