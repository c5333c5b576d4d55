"""``lower``: fuse memory-bound hotspots of an ATen graph into generated Triton kernels.

Before (a hand-written softmax: four intermediates of ``[B, T, T]`` written and read back)::

    amax = aten.amax(x, [-1], True)
    sub  = aten.sub.Tensor(x, amax)
    exp  = aten.exp(sub)
    sum_ = aten.sum.dim_IntList(exp, [-1], True)
    div  = aten.div.Tensor(exp, sum_)

After (one kernel reads ``x`` once and writes ``div``; nothing else is materialized)::

    fxk = fxmem_gen.fxk_amax_sub_exp_<hash>([x])
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
``True`` forces lowering on CPU (the interpreter; the pass is skipped with a warning if Triton was
already imported without it).

Numerical promise: kernels compute in fp32 and round to the output dtype; fp16/bf16 values are
rounded to their dtype after every fused op, as eager does. Results match eager to float rounding
(fp32: ≤ 1e-5 absolute on unit-scale inputs; reductions sum in a different order).
"""

from __future__ import annotations

import operator
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from fxmem.analysis.cost import node_bytes_moved
from fxmem.analysis.sizes import node_bytes, tensor_bytes
from fxmem.config import LowerConfig
from fxmem.pipeline import KernelRecord, PassResult, UnsupportedGraph
from fxmem.kernels import codegen
from fxmem.kernels.codegen import Expr, Program

aten = torch.ops.aten
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_ROUND = {torch.float16: "tl.float16", torch.bfloat16: "tl.bfloat16"}


# --------------------------------------------------------------------------------------------
# Shapes and values
# --------------------------------------------------------------------------------------------


def _val(x: Any) -> Any:
    return x.meta.get("val") if isinstance(x, fx.Node) else x


def _static_shape(t: torch.Tensor) -> tuple[int, ...] | None:
    if any(isinstance(s, torch.SymInt) for s in t.shape):
        return None
    return tuple(int(s) for s in t.shape)


def _tensor_ok(t: Any) -> bool:
    """A value the kernels handle: a static-shaped float (fp32/fp16/bf16) or bool tensor."""
    return isinstance(t, torch.Tensor) and (t.dtype in _FLOATS or t.dtype == torch.bool) and _static_shape(t) is not None


def _bind(node: fx.Node) -> dict[str, Any]:
    """The node's arguments by schema name, defaults filled in."""
    schema = node.target._schema
    bound: dict[str, Any] = {}
    for i, arg in enumerate(schema.arguments):
        if i < len(node.args) and not arg.kwarg_only:
            bound[arg.name] = node.args[i]
        elif arg.name in node.kwargs:
            bound[arg.name] = node.kwargs[arg.name]
        elif arg.has_default_value():
            bound[arg.name] = arg.default_value
    return bound


def _last_dim(dims: Any, rank: int) -> bool:
    """True when ``dims`` names only the last dimension (``-1`` or ``rank - 1``)."""
    if isinstance(dims, (list, tuple)):
        if len(dims) != 1:
            return False
        dims = dims[0]
    return isinstance(dims, int) and rank > 0 and dims % rank == rank - 1


# --------------------------------------------------------------------------------------------
# Translation rules: one per ATen op, each builds the op's value from its operands' values.
# --------------------------------------------------------------------------------------------


class _Translator:
    """Builds a :class:`Program` from a region's nodes; loads external inputs on first use."""

    def __init__(self, full_shape: tuple[int, ...]):
        self.program = Program(full_shape)
        self.env: dict[fx.Node, Any] = {}
        self.inputs: list[fx.Node] = []
        self._input_index: dict[fx.Node, int] = {}
        self._loads: dict[tuple[fx.Node, str], Expr] = {}

    def val(self, x: Any) -> Expr:
        """The expression of an operand: an in-region value, a loaded input or a constant."""
        if isinstance(x, fx.Node):
            if x in self.env:
                return self.env[x]
            t = x.meta["val"]
            shape = _static_shape(t)
            # a [..., 1] or 0-d operand is one value per row: load it once per program.
            kind = "row" if not shape or shape[-1] == 1 else "full"
            if x not in self._input_index:
                self._input_index[x] = self.program.add_input(t.dtype == torch.bool)
                self.inputs.append(x)
            key = (x, kind)
            if key not in self._loads:
                self._loads[key] = self.program.load(self._input_index[x], kind)
            return self._loads[key]
        if isinstance(x, (bool, int, float)):
            return Program.const(x)
        raise UnsupportedGraph(x, "not a tensor or a number")

    def num(self, x: Any) -> Expr:
        """An operand as a number (booleans become 0.0 / 1.0)."""
        e = self.val(x)
        return Program.pw("{0}.to(tl.float32)", e) if e.is_bool else e


P = Program.pw


def _binary(template: str) -> Callable[[_Translator, dict], Expr]:
    def rule(t: _Translator, a: dict) -> Expr:
        other = a.get("other")
        alpha = a.get("alpha", 1)
        y = t.num(other)
        if alpha != 1:
            y = P("({0} * {1})", y, Program.const(alpha))
        return P(template, t.num(a["self"]), y)
    return rule


def _unary(template: str) -> Callable[[_Translator, dict], Expr]:
    return lambda t, a: P(template, t.num(a["self"]))


def _compare(op: str) -> Callable[[_Translator, dict], Expr]:
    return lambda t, a: P(f"({{0}} {op} {{1}})", t.num(a["self"]), t.num(a["other"]), is_bool=True)


def _tanh(x: Expr) -> Expr:
    # tanh(x) = 1 - 2 / (exp(2x) + 1): tl.math has no tanh outside libdevice; saturates to ±1.
    return P("(1.0 - 2.0 / (tl.exp(2.0 * {0}) + 1.0))", x)


def _gelu(x: Expr, approximate: str) -> Expr:
    if approximate == "tanh":
        # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
        inner = P("(0.7978845608028654 * ({0} + 0.044715 * {0} * {0} * {0}))", x)
        return P("(0.5 * {0} * (1.0 + {1}))", x, _tanh(inner))
    # 0.5 x (1 + erf(x / sqrt 2))
    return P("(0.5 * {0} * (1.0 + tl.math.erf({0} * 0.7071067811865476)))", x)


def _gelu_backward(t: _Translator, a: dict) -> Expr:
    go, x = t.num(a["grad_output"]), t.num(a["self"])
    if a.get("approximate", "none") == "tanh":
        # d/dx of the tanh form, as ATen's GeluBackward computes it.
        inner = P("(0.7978845608028654 * ({0} + 0.044715 * {0} * {0} * {0}))", x)
        th = _tanh(inner)
        left_d = P("(0.5 * (1.0 + {0}))", th)
        right_d = P("(0.5 * {0} * (1.0 - {1} * {1}) * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * {0} * {0}))", x, th)
        return P("({0} * ({1} + {2}))", go, left_d, right_d)
    # d/dx x Φ(x) = Φ(x) + x φ(x)
    return P("({0} * (0.5 * (1.0 + tl.math.erf({1} * 0.7071067811865476)) + {1} * 0.3989422804014327 * tl.exp(-0.5 * {1} * {1})))", go, x)


def _pow(t: _Translator, a: dict) -> Expr:
    x, e = t.num(a["self"]), a["exponent"]
    table = {1: "{0}", 2: "({0} * {0})", 3: "({0} * {0} * {0})", 0.5: "tl.sqrt({0})", -0.5: "tl.math.rsqrt({0})",
             -1: "(1.0 / {0})", -2: "(1.0 / ({0} * {0}))"}
    return P(table[e], x)


def _pow_ok(a: dict, node: fx.Node) -> bool:
    e = a["exponent"]
    return isinstance(e, (int, float)) and not isinstance(e, bool) and e in (1, 2, 3, 0.5, -0.5, -1, -2)


def _to_copy(t: _Translator, a: dict) -> Expr:
    x = t.val(a["self"])
    dtype = a.get("dtype")
    if dtype == torch.bool:
        return x if x.is_bool else P("({0} != 0)", x, is_bool=True)
    return P("{0}.to(tl.float32)", x) if x.is_bool else x


def _to_copy_ok(a: dict, node: fx.Node) -> bool:
    return (a.get("layout") in (None, torch.strided) and a.get("device") in (None, _val(a["self"]).device)
            and a.get("memory_format") in (None, torch.preserve_format, torch.contiguous_format))


def _clone_ok(a: dict, node: fx.Node) -> bool:
    return a.get("memory_format") in (None, torch.preserve_format, torch.contiguous_format)


def _where(t: _Translator, a: dict) -> Expr:
    return P("tl.where({0}, {1}, {2})", t.val(a["condition"]), t.num(a["self"]), t.num(a["other"]))


def _masked_fill(t: _Translator, a: dict) -> Expr:
    return P("tl.where({0}, {1}, {2})", t.val(a["mask"]), t.num(a["value"]), t.num(a["self"]))


def _scalar_value_ok(a: dict, node: fx.Node) -> bool:
    v = _val(a["value"])
    return not isinstance(v, torch.Tensor) or v.dim() == 0


def _clamp(t: _Translator, a: dict) -> Expr:
    x = t.num(a["self"])
    lo, hi = a.get("min", a.get("min_val")), a.get("max", a.get("max_val"))
    if lo is not None:
        x = P("tl.maximum({0}, {1})", x, Program.const(lo))
    if hi is not None:
        x = P("tl.minimum({0}, {1})", x, Program.const(hi))
    return x


def _row_sum(t: _Translator, x: Expr) -> Expr:
    return t.program.reduce("sum", x)


def _row_max(t: _Translator, x: Expr) -> Expr:
    return t.program.reduce("max", x)


def _softmax(t: _Translator, a: dict) -> Expr:
    x = t.num(a["self"])
    e = P("tl.exp({0} - {1})", x, _row_max(t, x))
    return P("({0} / {1})", e, _row_sum(t, e))


def _log_softmax(t: _Translator, a: dict) -> Expr:
    x = t.num(a["self"])
    m = _row_max(t, x)
    s = _row_sum(t, P("tl.exp({0} - {1})", x, m))
    return P("({0} - {1} - tl.log({2}))", x, m, s)


def _softmax_backward(t: _Translator, a: dict) -> Expr:
    # dx = y (dy - Σ dy·y)
    go, y = t.num(a["grad_output"]), t.num(a["output"])
    return P("({0} * ({1} - {2}))", y, go, _row_sum(t, P("({0} * {1})", go, y)))


def _log_softmax_backward(t: _Translator, a: dict) -> Expr:
    # dx = dy - exp(y) Σ dy
    go, y = t.num(a["grad_output"]), t.num(a["output"])
    return P("({0} - tl.exp({1}) * {2})", go, y, _row_sum(t, go))


def _layer_norm(t: _Translator, a: dict) -> tuple[Expr, Expr, Expr]:
    x = t.num(a["input"])
    mean = P("({0} / N)", _row_sum(t, x))
    xc = P("({0} - {1})", x, mean)
    var = P("({0} / N)", _row_sum(t, P("({0} * {0})", xc)))
    rstd = P("tl.math.rsqrt({0} + {1})", var, Program.const(a["eps"]))
    out = P("({0} * {1})", xc, rstd)
    if a.get("weight") is not None:
        out = P("({0} * {1})", out, t.num(a["weight"]))
    if a.get("bias") is not None:
        out = P("({0} + {1})", out, t.num(a["bias"]))
    return out, mean, rstd


def _layer_norm_backward(t: _Translator, a: dict) -> tuple[Expr]:
    # x̂ = (x - μ) σ⁻¹, g = dy·w;  dx = σ⁻¹ (g - mean(g) - x̂ mean(g x̂))
    go, x = t.num(a["grad_out"]), t.num(a["input"])
    mean, rstd = t.num(a["mean"]), t.num(a["rstd"])
    xhat = P("(({0} - {1}) * {2})", x, mean, rstd)
    g = P("({0} * {1})", go, t.num(a["weight"])) if a.get("weight") is not None else go
    mg = P("({0} / N)", _row_sum(t, g))
    mgx = P("({0} / N)", _row_sum(t, P("({0} * {1})", g, xhat)))
    return (P("({0} * ({1} - {2} - {3} * {4}))", rstd, g, mg, xhat, mgx),)


def _reduce_rule(how: str) -> Callable[[_Translator, dict], Expr]:
    def rule(t: _Translator, a: dict) -> Expr:
        x = t.num(a["self"])
        if how == "max":
            return _row_max(t, x)
        s = _row_sum(t, x)
        return P("({0} / N)", s) if how == "mean" else s
    return rule


def _reduce_ok(a: dict, node: fx.Node) -> bool:
    x = _val(a["self"])
    return bool(a.get("keepdim")) and a.get("dtype") is None and _last_dim(a.get("dim"), x.dim())


def _softmax_ok(a: dict, node: fx.Node) -> bool:
    return _last_dim(a["dim"], _val(a["self"]).dim())


def _softmax_backward_ok(a: dict, node: fx.Node) -> bool:
    return _last_dim(a["dim"], _val(a["output"]).dim())


def _layer_norm_ok(a: dict, node: fx.Node) -> bool:
    x = _val(a["input"])
    return len(a["normalized_shape"]) == 1 and x.dim() >= 1


@dataclass(frozen=True)
class Rule:
    build: Callable[[_Translator, dict], Any]
    reduction: bool = False  # iteration space = first tensor input's shape (else: the output's)
    check: Callable[[dict, fx.Node], bool] | None = None
    outputs: tuple[int, ...] = ()  # multi-output ops: the getitem indices computed in the kernel


RULES: dict[Any, Rule] = {
    # x + α y, x - α y, x · y, x / y  (Tensor and Scalar overloads)
    aten.add.Tensor: Rule(_binary("({0} + {1})")),
    aten.add.Scalar: Rule(_binary("({0} + {1})")),
    aten.sub.Tensor: Rule(_binary("({0} - {1})")),
    aten.sub.Scalar: Rule(_binary("({0} - {1})")),
    aten.rsub.Scalar: Rule(lambda t, a: P("({1} - {0} * {2})", t.num(a["self"]), t.num(a["other"]), Program.const(a.get("alpha", 1)))),
    aten.mul.Tensor: Rule(_binary("({0} * {1})")),
    aten.mul.Scalar: Rule(_binary("({0} * {1})")),
    aten.div.Tensor: Rule(_binary("({0} / {1})")),
    aten.div.Scalar: Rule(_binary("({0} / {1})")),
    aten.neg.default: Rule(_unary("(-{0})")),
    aten.exp.default: Rule(_unary("tl.exp({0})")),
    aten.log.default: Rule(_unary("tl.log({0})")),
    aten.sqrt.default: Rule(_unary("tl.sqrt({0})")),
    aten.rsqrt.default: Rule(_unary("tl.math.rsqrt({0})")),
    aten.abs.default: Rule(_unary("tl.abs({0})")),
    aten.reciprocal.default: Rule(_unary("(1.0 / {0})")),
    aten.sigmoid.default: Rule(_unary("tl.sigmoid({0})")),
    aten.tanh.default: Rule(lambda t, a: _tanh(t.num(a["self"]))),
    aten.relu.default: Rule(_unary("tl.maximum({0}, 0.0)")),
    aten.silu.default: Rule(_unary("({0} * tl.sigmoid({0}))")),
    aten.gelu.default: Rule(lambda t, a: _gelu(t.num(a["self"]), a.get("approximate", "none"))),
    aten.pow.Tensor_Scalar: Rule(_pow, check=_pow_ok),
    aten.maximum.default: Rule(lambda t, a: P("tl.maximum({0}, {1})", t.num(a["self"]), t.num(a["other"]))),
    aten.minimum.default: Rule(lambda t, a: P("tl.minimum({0}, {1})", t.num(a["self"]), t.num(a["other"]))),
    aten.clamp.default: Rule(_clamp),
    aten.hardtanh.default: Rule(_clamp),
    aten.where.self: Rule(_where),
    aten.masked_fill.Scalar: Rule(_masked_fill),
    aten.masked_fill.Tensor: Rule(_masked_fill, check=_scalar_value_ok),
    aten.eq.Scalar: Rule(_compare("==")), aten.eq.Tensor: Rule(_compare("==")),
    aten.ne.Scalar: Rule(_compare("!=")), aten.ne.Tensor: Rule(_compare("!=")),
    aten.lt.Scalar: Rule(_compare("<")), aten.lt.Tensor: Rule(_compare("<")),
    aten.le.Scalar: Rule(_compare("<=")), aten.le.Tensor: Rule(_compare("<=")),
    aten.gt.Scalar: Rule(_compare(">")), aten.gt.Tensor: Rule(_compare(">")),
    aten.ge.Scalar: Rule(_compare(">=")), aten.ge.Tensor: Rule(_compare(">=")),
    # not b == (b == 0) for booleans
    aten.bitwise_not.default: Rule(lambda t, a: P("({0} == 0)", t.val(a["self"]), is_bool=True),
                                   check=lambda a, n: _val(a["self"]).dtype == torch.bool),
    aten.logical_not.default: Rule(lambda t, a: P("({0} == 0)", t.val(a["self"]), is_bool=True)),
    aten.clone.default: Rule(lambda t, a: t.val(a["self"]), check=_clone_ok),
    aten._to_copy.default: Rule(_to_copy, check=_to_copy_ok),
    # backward ops of the pointwise activations
    aten.gelu_backward.default: Rule(_gelu_backward),
    # d silu = dy σ(x) (1 + x (1 - σ(x)))
    aten.silu_backward.default: Rule(lambda t, a: P("({0} * tl.sigmoid({1}) * (1.0 + {1} * (1.0 - tl.sigmoid({1}))))",
                                                    t.num(a["grad_output"]), t.num(a["self"]))),
    # d relu: dy where x > threshold else 0
    aten.threshold_backward.default: Rule(lambda t, a: P("tl.where({1} <= {2}, 0.0, {0})", t.num(a["grad_output"]),
                                                         t.num(a["self"]), Program.const(a["threshold"]))),
    aten.sigmoid_backward.default: Rule(lambda t, a: P("({0} * {1} * (1.0 - {1}))", t.num(a["grad_output"]), t.num(a["output"]))),
    aten.tanh_backward.default: Rule(lambda t, a: P("({0} * (1.0 - {1} * {1}))", t.num(a["grad_output"]), t.num(a["output"]))),
    # row reductions over the last dimension
    aten.sum.dim_IntList: Rule(_reduce_rule("sum"), reduction=True, check=_reduce_ok),
    aten.mean.dim: Rule(_reduce_rule("mean"), reduction=True, check=_reduce_ok),
    aten.amax.default: Rule(_reduce_rule("max"), reduction=True, check=_reduce_ok),
    aten._softmax.default: Rule(_softmax, reduction=True, check=_softmax_ok),
    aten._log_softmax.default: Rule(_log_softmax, reduction=True, check=_softmax_ok),
    aten._softmax_backward_data.default: Rule(_softmax_backward, reduction=True, check=_softmax_backward_ok),
    aten._log_softmax_backward_data.default: Rule(_log_softmax_backward, reduction=True, check=_softmax_backward_ok),
    aten.native_layer_norm.default: Rule(_layer_norm, reduction=True, check=_layer_norm_ok, outputs=(0, 1, 2)),
    aten.native_layer_norm_backward.default: Rule(_layer_norm_backward, reduction=True, check=_layer_norm_ok, outputs=(0,)),
}


def _rule(node: fx.Node) -> Rule | None:
    """The rule for a node the kernels can compute, or None."""
    if node.op != "call_function" or node.target not in RULES:
        return None
    rule = RULES[node.target]
    vals = [node.meta.get("val")]
    if isinstance(vals[0], (tuple, list)):
        vals = [v for i, v in enumerate(vals[0]) if i in rule.outputs]
    vals += [a.meta.get("val") for a in node.all_input_nodes]
    if not all(_tensor_ok(v) for v in vals):
        return None
    devices = {v.device for v in vals}
    if len(devices) > 1:
        return None
    try:
        a = _bind(node)
        if rule.check is not None and not rule.check(a, node):
            return None
    except (KeyError, TypeError, AttributeError):
        return None
    return rule


def _space(node: fx.Node, rule: Rule) -> tuple[int, ...] | None:
    """The node's own iteration space: its output shape, or a reduction's input shape."""
    t = node.all_input_nodes[0].meta["val"] if rule.reduction else node.meta["val"]
    if isinstance(t, (tuple, list)):
        t = t[0]
    shape = _static_shape(t)
    return shape if shape else None  # 0-d values are not worth a kernel


# --------------------------------------------------------------------------------------------
# Regions
# --------------------------------------------------------------------------------------------


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
        return "multi" if rule.outputs else "row"
    shape = _static_shape(node.meta["val"])
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
                kind = "full" if _static_shape(val) == region.full else "row"
        else:
            rule = _rule(node)
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
                    chosen = Region(_space(node, rule))
                    regions.append(chosen)
                    kind = "multi" if rule.outputs else "full"
                    if not rule.reduction and _static_shape(node.meta["val"]) != chosen.full:
                        chosen, kind = None, None
                        regions.pop()
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
    t = _Translator(region.full)
    for node in region.nodes:
        if _is_getitem(node):
            t.env[node] = t.env[node.args[0]][node.args[1]]
            continue
        rule = RULES[node.target]
        value = rule.build(t, _bind(node))
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
        t.program.output(expr, _static_shape(val), val.dtype)
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


def _rewrite(gm: fx.GraphModule, plan: Plan, config: LowerConfig) -> KernelRecord:
    program, inputs = _translate(plan)
    replaced = [n.name for n in plan.region.nodes]
    kernel = codegen.build_kernel(program, _short_name(plan.region), persistent_max=config.persistent_max,
                                  comment="fused " + " ".join(replaced))
    op = codegen.register_kernel(kernel)
    graph = gm.graph
    last = plan.region.nodes[-1]
    with graph.inserting_after(last):
        call = graph.call_function(op, (list(inputs),))
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
    return KernelRecord(name=kernel.name, nodes_replaced=replaced, bytes_saved=plan.bytes_saved, source=kernel.source)


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
        return False, "auto: CPU graph and TRITON_INTERPRET is not set (Triton runs natively on CUDA only)"
    # forced on a CPU: the interpreter must be switched on before Triton is first imported.
    if not codegen.triton_available():
        return False, "Triton is not installed"
    if "triton" not in sys.modules and not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
        return True, "TRITON_INTERPRET=1 (set by lower=True)"
    return False, ("lower=True on a CPU graph needs Triton's interpreter, but Triton was imported without "
                   "TRITON_INTERPRET=1; set it in the environment before importing torch._dynamo or fxmem")


def lower(gm: fx.GraphModule, config: LowerConfig) -> PassResult:
    """Lower the regions that save the most bytes to generated Triton kernels."""
    for node in gm.graph.nodes:
        if _is_meta_assert(node):
            # export leaves these checks without meta["val"]; the op returns None: say so (the
            # pipeline requires a value on every call_function node after a pass)
            node.meta.setdefault("val", None)
    ok, why = can_run(gm, config)
    if not ok:
        if config.mode == "on":
            first = next((n for n in gm.graph.nodes if _rule(n) is not None), None)
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
        record = _rewrite(gm, plan, config)
        kernels.append(record)
        rows.append({"kernel": record.name, "nodes": record.nodes_replaced, "bytes_saved": plan.bytes_saved,
                     "bytes_unfused": plan.bytes_unfused, "bytes_fused": plan.bytes_fused,
                     "intermediate_bytes": plan.intermediate_bytes, "form": record.source.split("# form: ")[1].split("\n")[0]})
    if kernels:
        torch.fx.passes.tools_common.legalize_graph(gm)
        gm.graph.lint()
        gm.recompile()
    stats = {
        "lowered": len(kernels),
        "reason": why,
        "bytes_saved": sum(r["bytes_saved"] for r in rows),
        "intermediate_bytes": sum(r["intermediate_bytes"] for r in rows),
        "regions": rows,
        "kernels": kernels,
    }
    return PassResult(gm, bool(kernels), stats)


__all__ = ["lower", "find_regions", "plan_region", "can_run", "RULES", "Region", "Plan"]
