"""Translation rules for :mod:`fxmem.passes.lower`: one per ATen op, each builds the op's value
in a fused kernel's expression program (:class:`fxmem.kernels.codegen.Program`) from its operands.

Every rule states the identity it implements in a comment or in its template; ``RULES`` maps an
``OpOverload`` to its :class:`Rule` (``reduction``: the op's iteration space is its first input's
shape; ``check``: extra conditions on its arguments; ``outputs``: the items a multi-output op
computes in the kernel). :func:`rule_for` answers whether a node can be fused at all.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from fxmem.kernels.codegen import Expr, Program
from fxmem.passes.base import UnsupportedGraph
from fxmem.passes.base import val as _val

aten = torch.ops.aten
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def static_shape(t: torch.Tensor) -> tuple[int, ...] | None:
    if any(isinstance(s, torch.SymInt) for s in t.shape):
        return None
    return tuple(int(s) for s in t.shape)


_MAX_NUMEL = 2**31 - 1  # kernels index with 32-bit offsets (row * N + cols)


def _tensor_ok(t: Any) -> bool:
    """A value the kernels handle: a static-shaped float (fp32/fp16/bf16) or bool tensor that
    32-bit offsets can address."""
    if not isinstance(t, torch.Tensor) or not (t.dtype in _FLOATS or t.dtype == torch.bool):
        return False
    shape = static_shape(t)
    return shape is not None and math.prod(shape) <= _MAX_NUMEL


def bind(node: fx.Node) -> dict[str, Any]:
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


class Translator:
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
            shape = static_shape(t)
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


def _binary(template: str) -> Callable[[Translator, dict], Expr]:
    def rule(t: Translator, a: dict) -> Expr:
        other = a.get("other")
        alpha = a.get("alpha", 1)
        y = t.num(other)
        if alpha != 1:
            y = P("({0} * {1})", y, Program.const(alpha))
        return P(template, t.num(a["self"]), y)
    return rule


def _unary(template: str) -> Callable[[Translator, dict], Expr]:
    return lambda t, a: P(template, t.num(a["self"]))


def _compare(op: str) -> Callable[[Translator, dict], Expr]:
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


def _gelu_backward(t: Translator, a: dict) -> Expr:
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


def _pow(t: Translator, a: dict) -> Expr:
    x, e = t.num(a["self"]), a["exponent"]
    table = {1: "{0}", 2: "({0} * {0})", 3: "({0} * {0} * {0})", 0.5: "tl.sqrt({0})", -0.5: "tl.math.rsqrt({0})",
             -1: "(1.0 / {0})", -2: "(1.0 / ({0} * {0}))"}
    return P(table[e], x)


def _pow_ok(a: dict, node: fx.Node) -> bool:
    e = a["exponent"]
    return isinstance(e, (int, float)) and not isinstance(e, bool) and e in (1, 2, 3, 0.5, -0.5, -1, -2)


def _to_copy(t: Translator, a: dict) -> Expr:
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


def _where(t: Translator, a: dict) -> Expr:
    return P("tl.where({0}, {1}, {2})", t.val(a["condition"]), t.num(a["self"]), t.num(a["other"]))


def _masked_fill(t: Translator, a: dict) -> Expr:
    return P("tl.where({0}, {1}, {2})", t.val(a["mask"]), t.num(a["value"]), t.num(a["self"]))


def _scalar_value_ok(a: dict, node: fx.Node) -> bool:
    v = _val(a["value"])
    return not isinstance(v, torch.Tensor) or v.dim() == 0


def _clamp(t: Translator, a: dict) -> Expr:
    x = t.num(a["self"])
    lo, hi = a.get("min", a.get("min_val")), a.get("max", a.get("max_val"))
    if lo is not None:
        x = P("tl.maximum({0}, {1})", x, Program.const(lo))
    if hi is not None:
        x = P("tl.minimum({0}, {1})", x, Program.const(hi))
    return x


def _row_sum(t: Translator, x: Expr) -> Expr:
    return t.program.reduce("sum", x)


def _row_max(t: Translator, x: Expr) -> Expr:
    return t.program.reduce("max", x)


def _softmax(t: Translator, a: dict) -> Expr:
    x = t.num(a["self"])
    e = P("tl.exp({0} - {1})", x, _row_max(t, x))
    return P("({0} / {1})", e, _row_sum(t, e))


def _log_softmax(t: Translator, a: dict) -> Expr:
    x = t.num(a["self"])
    m = _row_max(t, x)
    s = _row_sum(t, P("tl.exp({0} - {1})", x, m))
    return P("({0} - {1} - tl.log({2}))", x, m, s)


def _softmax_backward(t: Translator, a: dict) -> Expr:
    # dx = y (dy - Σ dy·y)
    go, y = t.num(a["grad_output"]), t.num(a["output"])
    return P("({0} * ({1} - {2}))", y, go, _row_sum(t, P("({0} * {1})", go, y)))


def _log_softmax_backward(t: Translator, a: dict) -> Expr:
    # dx = dy - exp(y) Σ dy
    go, y = t.num(a["grad_output"]), t.num(a["output"])
    return P("({0} - tl.exp({1}) * {2})", go, y, _row_sum(t, go))


def _layer_norm(t: Translator, a: dict) -> tuple[Expr, Expr, Expr]:
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


def _layer_norm_backward(t: Translator, a: dict) -> tuple[Expr]:
    # x̂ = (x - μ) σ⁻¹, g = dy·w;  dx = σ⁻¹ (g - mean(g) - x̂ mean(g x̂))
    go, x = t.num(a["grad_out"]), t.num(a["input"])
    mean, rstd = t.num(a["mean"]), t.num(a["rstd"])
    xhat = P("(({0} - {1}) * {2})", x, mean, rstd)
    g = P("({0} * {1})", go, t.num(a["weight"])) if a.get("weight") is not None else go
    mg = P("({0} / N)", _row_sum(t, g))
    mgx = P("({0} / N)", _row_sum(t, P("({0} * {1})", g, xhat)))
    return (P("({0} * ({1} - {2} - {3} * {4}))", rstd, g, mg, xhat, mgx),)


def _reduce_rule(how: str) -> Callable[[Translator, dict], Expr]:
    def rule(t: Translator, a: dict) -> Expr:
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
    build: Callable[[Translator, dict], Any]
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


def rule_for(node: fx.Node) -> Rule | None:
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
        a = bind(node)
        if rule.check is not None and not rule.check(a, node):
            return None
    except (KeyError, TypeError, AttributeError):
        return None
    return rule


def can_lower(node: fx.Node) -> bool:
    """True when a generated kernel can compute ``node`` (the kernel contract's ``can_lower``: docs/passes/lower.md)."""
    return rule_for(node) is not None


__all__ = ["RULES", "Rule", "Translator", "can_lower", "rule_for", "bind", "static_shape"]
