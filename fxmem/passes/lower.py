"""``lower``: fuse memory-bound hotspots of an ATen graph into generated Triton kernels.

Before (a hand-written softmax: four intermediates of ``[B, T, T]`` written and read back)::

    amax = aten.amax(x, [-1], True)
    sub  = aten.sub.Tensor(x, amax)
    exp  = aten.exp(sub)
    sum_ = aten.sum.dim_IntList(exp, [-1], True)
    div  = aten.div.Tensor(exp, sum_)

After (one kernel reads ``x`` once and writes ``div``; nothing else is materialized)::

    fxk = fxmem.fused_kernel([x], "fxk_amax_sub_exp_<hash>")
    div = fxk[0]

What is fused. A *region* is a connected set of nodes over one iteration space ``rows × N``
(``N`` = the last dimension): pointwise ops (arithmetic, exp/log/sqrt/rsqrt, sigmoid/tanh, relu,
gelu, silu, comparisons, where/masked_fill, dtype casts), row reductions over the last dimension
(``sum``/``mean``/``amax``, ``_softmax``, ``_log_softmax``, ``native_layer_norm``, and RMS norm
written as pow → mean → add → rsqrt → mul) and their backward ops (``_softmax_backward_data``,
``_log_softmax_backward_data``, ``native_layer_norm_backward``'s input gradient, ``gelu_backward``,
``silu_backward``, ``threshold_backward``). Regions grow greedily in topological order; a node
joins its producer's region only if no path leaves the region and comes back (that would make the
kernel depend on its own output). Views and matmuls end regions. A region's cost is priced with
:func:`fxmem.analysis.node_bytes_moved` — the bytes the unfused nodes read and write — against
the fused kernel's (each external input read once, each output written once); the difference is
the traffic fusion saves, and the intermediates never materialized are listed beside it. Regions
that save nothing (a lone ``_softmax`` is already one kernel) are not lowered; the rest are
lowered best first, at most ``max_kernels``, each saving at least ``min_bytes``.

``native_layer_norm_backward`` computes its input gradient in the kernel; when the weight and
bias gradients are used (training), the ATen op stays for them with ``output_mask=[False, ...]``
(those are column reductions across rows, a different iteration space).

Preconditions: every ``call_function`` node carries ``meta["val"]`` (FakeTensors); shapes are
static. Nodes with symbolic shapes, integer or fp64 values are left alone.

When it runs (``lower``): ``"auto"`` lowers graphs whose tensors are on CUDA when Triton is
installed, and CPU graphs only when Triton runs in its interpreter (``TRITON_INTERPRET=1`` set
before Triton was imported); otherwise it returns the graph untouched without importing Triton.
``True`` forces lowering; on a CPU without the interpreter the pass is skipped with a warning
(``strict`` raises) — fxmem never sets ``TRITON_INTERPRET`` itself (no process-wide side effects).

Kernels are called through ``torch.ops.fxmem.fused_kernel(inputs, key)`` (one op, defined by
:mod:`fxmem.kernels.codegen` at import); the node holds its :class:`~fxmem.kernels.codegen.BoundKernel`
in ``meta["fxmem_kernel"]``, so a graph this pass built, or dropped, leaves nothing registered.

Numerical promise: kernels compute in fp32 and round to the output dtype; fp16/bf16 values are
rounded to their dtype after every fused op, as eager does. Results match eager to float rounding
(fp32: ≤ 1e-5 absolute on unit-scale inputs; reductions sum in a different order).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from fxmem.analysis.cost import node_bytes_moved
from fxmem.analysis.sizes import node_bytes, tensor_bytes
from fxmem.config import LowerConfig
from fxmem.kernels import codegen, interpreter
from fxmem.kernels.codegen import Program
from fxmem.passes.base import KernelRecord, PassContext, PassResult, UnsupportedGraph
from fxmem.passes.lower_rules import RULES, Rule, Translator, bind, rule_for, static_shape

aten = torch.ops.aten
P = Program.pw
_ROUND = {torch.float16: "tl.float16", torch.bfloat16: "tl.bfloat16"}


# --------------------------------------------------------------------------------------------
# Regions
# --------------------------------------------------------------------------------------------


def _space(node: fx.Node, rule: Rule) -> tuple[int, ...] | None:
    """The node's own iteration space: its output shape, or a reduction's input shape."""
    t = node.all_input_nodes[0].meta["val"] if rule.reduction else node.meta["val"]
    if isinstance(t, (tuple, list)):
        t = t[0]
    shape = static_shape(t)
    return shape if shape else None  # 0-d values are not worth a kernel


@dataclass(eq=False)
class Region:
    full: tuple[int, ...]
    nodes: list[fx.Node] = field(default_factory=list)
    kinds: dict[fx.Node, str] = field(default_factory=dict)  # "full" | "row" | "multi"

    @property
    def rows(self) -> tuple[int, ...]:
        return self.full[:-1]

    def add(self, node: fx.Node, kind: str) -> None:
        self.nodes.append(node)
        self.kinds[node] = kind

    def __contains__(self, node: object) -> bool:
        return node in self.kinds


def _reduction_kind(node: fx.Node, rule: Rule, full: tuple[int, ...]) -> str:
    """A row reduction's output: several ("multi"), one per element (softmax: "full") or one per
    row (sum/mean/amax: "row")."""
    if rule.outputs:
        return "multi"
    return "full" if static_shape(node.meta["val"]) == full else "row"


def _kind_in(node: fx.Node, rule: Rule, region: Region) -> str | None:
    """How ``node`` would sit in ``region``: "full", "row", "multi", or None if it cannot."""
    if _space(node, rule) is None:
        return None
    if rule.reduction:
        if _space(node, rule) != region.full:
            return None
        first = node.all_input_nodes[0]
        if first in region and region.kinds[first] != "full":
            return None
        return _reduction_kind(node, rule, region.full)
    shape = static_shape(node.meta["val"])
    if shape == region.full:
        return "full"
    inside = [a for a in node.all_input_nodes if a in region]
    if shape == region.rows + (1,) and inside and all(region.kinds[a] == "row" for a in inside):
        return "row"
    return None


def _is_getitem(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is operator.getitem


def find_regions(gm: fx.GraphModule) -> list[Region]:
    """Grow fusible regions in topological order (each node joins at most one region)."""
    region_of: dict[fx.Node, Region] = {}
    # the regions a node depends on, through any path (to refuse joins that would form a cycle)
    upstream: dict[fx.Node, set[int]] = {}
    regions: list[Region] = []
    for node in gm.graph.nodes:
        deps: set[int] = set()
        for a in node.all_input_nodes:
            deps |= upstream.get(a, set())
        chosen: Region | None = None
        kind: str | None = None
        if _is_getitem(node):
            parent = node.args[0]
            region = region_of.get(parent)
            if region is not None and node.args[1] in RULES[parent.target].outputs:
                val = node.meta.get("val")
                chosen = region
                kind = "full" if static_shape(val) == region.full else "row"
        else:
            rule = rule_for(node)
            if rule is not None:
                candidates = sorted({id(region_of[a]): region_of[a] for a in node.all_input_nodes if a in region_of}.values(),
                                    key=lambda r: -len(r.nodes))
                for region in candidates:
                    k = _kind_in(node, rule, region)
                    if k is None:
                        continue
                    # joining is legal only if no input outside the region depends on the region
                    if any(a not in region and id(region) in upstream.get(a, set()) for a in node.all_input_nodes):
                        continue
                    chosen, kind = region, k
                    break
                if chosen is None and _space(node, rule) is not None:
                    chosen = Region(_space(node, rule))  # a new region over this node's space
                    regions.append(chosen)
                    kind = _reduction_kind(node, rule, chosen.full) if rule.reduction else "full"
        if chosen is not None and kind is not None:
            chosen.add(node, kind)
            region_of[node] = chosen
            deps = deps | {id(chosen)}
        upstream[node] = deps
    return [r for r in regions if r.nodes]


_ASSERT_META = getattr(aten, "_assert_tensor_metadata", None)


def _is_meta_assert(node: fx.Node) -> bool:
    """``aten._assert_tensor_metadata`` (emitted by export for ``.to()``): it checks dtype and
    device, which a fused value keeps, so it does not force its input to be materialized."""
    return _ASSERT_META is not None and node.op == "call_function" and node.target is _ASSERT_META.default


def _split_lnb(node: fx.Node) -> bool:
    """A layer-norm backward whose weight/bias gradients are used keeps an ATen node for them."""
    return node.target is aten.native_layer_norm_backward.default and any(
        _is_getitem(u) and u.args[1] in (1, 2) for u in node.users)


@dataclass
class Plan:
    """A region priced: its inputs, outputs, and the bytes fusion saves."""

    region: Region
    inputs: list[fx.Node]
    outputs: list[fx.Node]
    bytes_unfused: int
    bytes_fused: int
    intermediate_bytes: int

    @property
    def bytes_saved(self) -> int:
        return self.bytes_unfused - self.bytes_fused


def plan_region(region: Region, output_node: fx.Node) -> Plan:
    members = set(region.nodes)
    values = [n for n in region.nodes if region.kinds[n] != "multi"]
    inputs: list[fx.Node] = []
    for n in region.nodes:
        if _is_getitem(n):
            continue
        for a in n.all_input_nodes:
            if a not in members and a not in inputs:
                inputs.append(a)
    must_keep: set[fx.Node] = set()
    residual = 0
    for n in region.nodes:
        if _split_lnb(n):
            # the ATen op kept for the weight/bias gradients reads its inputs again
            must_keep |= {a for a in n.all_input_nodes if a in members}
            residual += sum(tensor_bytes(a.meta["val"]) for a in n.all_input_nodes)
            residual += sum(node_bytes(u) for u in n.users if u.args[1] in (1, 2))
    outputs = [n for n in values if n in must_keep
               or any((u not in members and not _is_meta_assert(u)) or u is output_node for u in n.users)]
    unfused = sum(node_bytes_moved(n) for n in region.nodes if not _is_getitem(n))
    fused = sum(tensor_bytes(a.meta["val"]) for a in inputs) + sum(node_bytes(n) for n in outputs) + residual
    intermediates = sum(node_bytes(n) for n in values if n not in outputs)
    return Plan(region, inputs, outputs, unfused, fused, intermediates)


# --------------------------------------------------------------------------------------------
# Rewriting
# --------------------------------------------------------------------------------------------


def _translate(plan: Plan) -> tuple[Program, list[fx.Node]]:
    region = plan.region
    t = Translator(region.full)
    for node in region.nodes:
        if _is_getitem(node):
            t.env[node] = t.env[node.args[0]][node.args[1]]
            continue
        rule = RULES[node.target]
        value = rule.build(t, bind(node))
        for a in node.all_input_nodes:  # inputs a rule ignores (a layer-norm backward's bias) are
            t.val(a)  # still passed, so that the kernel and its CPU path take the same arguments
        if rule.outputs:
            value = {i: v for i, v in zip(rule.outputs, value)}
        else:
            dtype = node.meta["val"].dtype
            if dtype in _ROUND and not value.is_bool:  # eager rounds every intermediate to its dtype
                value = P(f"{{0}}.to({_ROUND[dtype]}).to(tl.float32)", value)
        t.env[node] = value
    for node in plan.outputs:
        val = node.meta["val"]
        expr = t.env[node]
        if val.dtype in _ROUND and _is_getitem(node) and not expr.is_bool:
            expr = P(f"{{0}}.to({_ROUND[val.dtype]}).to(tl.float32)", expr)
        t.program.output(expr, static_shape(val), val.dtype)
    return t.program, t.inputs


def _fake_outputs(program: Program, inputs: list[fx.Node]) -> list[torch.Tensor]:
    """FakeTensor values of the kernel's outputs, in the graph's fake mode when it has one."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    vals = [a.meta["val"] for a in inputs]
    try:
        mode = torch._guards.detect_fake_mode(vals)
    except AssertionError:  # values from several fake modes (e.g. make_fx without a shared mode)
        mode = None
    mode = mode or FakeTensorMode()
    device = vals[0].device if vals else torch.device("cpu")
    with mode:
        return [torch.empty(o.shape, dtype=o.dtype, device=device) for o in program.outputs]


def _region_module(plan: Plan, inputs: list[fx.Node]) -> fx.GraphModule:
    """The region's own ATen nodes as a module ``(*inputs) -> [outputs]`` (the kernel's CPU path).

    ``inputs`` are the kernel's inputs as the graph is now (an earlier rewrite may have replaced
    a producer by another kernel's output)."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for i, a in enumerate(inputs):
        env[a] = graph.placeholder(f"in{i}")
        env[a].meta = dict(a.meta)
    for n in plan.region.nodes:
        env[n] = graph.node_copy(n, lambda x: env[x])
    graph.output([env[o] for o in plan.outputs])
    return fx.GraphModule(torch.nn.Module(), graph)


def _short_name(region: Region) -> str:
    names: list[str] = []
    for n in region.nodes:
        if _is_getitem(n):
            continue
        op = getattr(n.target, "_opname", None) or getattr(n.target, "__name__", "op")
        op = op.lstrip("_")
        if op not in names:
            names.append(op)
    return "_".join(names[:3])


def _rewrite(gm: fx.GraphModule, plan: Plan, config: LowerConfig) -> tuple[KernelRecord, str]:
    program, inputs = _translate(plan)
    replaced = [n.name for n in plan.region.nodes]
    kernel = codegen.build_kernel(program, _short_name(plan.region), persistent_max=config.persistent_max,
                                  comment="fused " + " ".join(replaced))
    bound = codegen.bind_kernel(kernel, fallback=_region_module(plan, inputs))
    graph = gm.graph
    last = plan.region.nodes[-1]
    with graph.inserting_after(last):
        call = graph.call_function(torch.ops.fxmem.fused_kernel.default, (list(inputs), bound.key))
    call.meta[codegen.META_KEY] = bound  # the graph holds its kernel: it lives as long as the graph
    call.meta["val"] = _fake_outputs(program, inputs)
    new_values: dict[fx.Node, fx.Node] = {}
    anchor = call
    for j, out in enumerate(plan.outputs):
        with graph.inserting_after(anchor):
            item = graph.call_function(operator.getitem, (call, j))
        item.meta["val"] = call.meta["val"][j]
        new_values[out] = item
        anchor = item
    members = set(plan.region.nodes)
    for n in plan.region.nodes:
        if _split_lnb(n):
            # keep the ATen op for the weight/bias gradients only
            args = [new_values.get(a, a) if isinstance(a, fx.Node) else a for a in n.args]
            args[7] = [False, *n.args[7][1:]] if len(args) > 7 else [False, True, True]
            with graph.inserting_after(anchor):
                rest = graph.call_function(aten.native_layer_norm_backward.default, tuple(args), dict(n.kwargs))
            rest.meta = dict(n.meta)
            for u in list(n.users):
                if u.args[1] in (1, 2):
                    u.replace_input_with(n, rest)
            anchor = rest
    for out, item in new_values.items():
        for u in list(out.users):
            if u not in members:
                u.replace_input_with(out, item)
    for n in plan.region.nodes:  # checks of dtype/device on values that are no longer materialized
        for u in list(n.users):
            if _is_meta_assert(u):
                graph.erase_node(u)
    for n in reversed(plan.region.nodes):
        if not n.users:
            graph.erase_node(n)
    record = KernelRecord(name=kernel.name, nodes_replaced=replaced, bytes_saved=plan.bytes_saved, source=kernel.source)
    return record, kernel.form


# --------------------------------------------------------------------------------------------
# The pass
# --------------------------------------------------------------------------------------------


def _graph_devices(gm: fx.GraphModule) -> set[str]:
    devices = set()
    for node in gm.graph.nodes:
        val = node.meta.get("val")
        for v in val if isinstance(val, (list, tuple)) else [val]:
            if isinstance(v, torch.Tensor):
                devices.add(v.device.type)
    return devices


def can_run(gm: fx.GraphModule, config: LowerConfig) -> tuple[bool, str]:
    """Whether kernels can run for this graph under ``config.mode``, and why not.

    Cheap on the default path: on a CPU graph without ``TRITON_INTERPRET=1`` under ``"auto"``
    it answers from the environment without importing Triton.
    """
    if config.mode == "off":
        return False, "lower is off"
    devices = _graph_devices(gm)
    if "cuda" in devices:
        if not codegen.triton_available():
            return False, "Triton is not installed"
        return True, "CUDA"
    if codegen.interpreter_enabled():
        return True, "TRITON_INTERPRET=1"
    if config.mode == "auto":
        if interpreter.requested():
            return False, "auto: CPU graph and Triton was imported before TRITON_INTERPRET was set (its interpreter is off)"
        return False, "auto: CPU graph and TRITON_INTERPRET is not set (Triton runs natively on CUDA only)"
    # forced on a CPU: fxmem does not switch the interpreter on (that would be process-wide
    # state, and Triton reads it at import); the user sets it before starting Python.
    return False, ("lower=True on a CPU graph needs Triton's interpreter: set TRITON_INTERPRET=1 in the "
                   "environment before Python starts (fxmem never sets it), or run on CUDA")


def lower(gm: fx.GraphModule, config: LowerConfig, ctx: PassContext = PassContext()) -> PassResult:
    """Lower the regions that save the most bytes to generated Triton kernels."""
    ok, why = can_run(gm, config)
    if not ok:
        if config.mode == "on":
            first = next((n for n in gm.graph.nodes if rule_for(n) is not None), None)
            raise UnsupportedGraph(first.target if first is not None else "graph", why)
        return PassResult(gm, False, {"lowered": 0, "reason": why})
    output_node = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    plans = [plan_region(r, output_node) for r in find_regions(gm)]
    plans = [p for p in plans if p.bytes_saved > 0 and p.bytes_saved >= config.min_bytes and p.outputs]
    plans.sort(key=lambda p: -p.bytes_saved)
    if config.max_kernels is not None:
        plans = plans[: config.max_kernels]
    kernels: list[KernelRecord] = []
    rows: list[dict[str, Any]] = []
    for plan in plans:
        record, form = _rewrite(gm, plan, config)
        kernels.append(record)
        rows.append({"kernel": record.name, "nodes": record.nodes_replaced, "traffic_bytes_saved": plan.bytes_saved,
                     "bytes_unfused": plan.bytes_unfused, "bytes_fused": plan.bytes_fused,
                     "intermediate_bytes": plan.intermediate_bytes, "form": form})
    if kernels:
        torch.fx.passes.tools_common.legalize_graph(gm)
        gm.graph.lint()
        gm.recompile()
    stats = {
        "lowered": len(kernels),
        "reason": why,
        "traffic_bytes_saved": sum(r["traffic_bytes_saved"] for r in rows),
        "intermediate_bytes": sum(r["intermediate_bytes"] for r in rows),
        "regions": rows,
        "kernels": kernels,
    }
    return PassResult(gm, bool(kernels), stats)


__all__ = ["lower", "find_regions", "plan_region", "can_run", "RULES", "Region", "Plan"]
