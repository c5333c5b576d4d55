"""Find the position-wise MLPs of a torch-level graph and describe each as one ``fxmem::chunked_mlp``.

Used by :mod:`fxmem.passes.chunk` when ``chunk={"mlp": True}``. Before (HF Llama)::

    linear = torch._C._nn.linear(x, gate_proj_weight, None)         # [B, T, I]
    silu = torch.nn.functional.silu(linear)
    linear_1 = torch._C._nn.linear(x, up_proj_weight, None)         # [B, T, I]
    mul = silu * linear_1
    down_proj = torch._C._nn.linear(mul, down_proj_weight, None)    # [B, T, d]

After::

    down_proj = torch.ops.fxmem.chunked_mlp.default(x, gate_proj_weight, None, up_proj_weight, None,
        down_proj_weight, None, '[["silu", ["$0"], {}], ["mul", ["$2", "$1"], {}]]', 0)

An MLP is a *down* projection whose input is computed, through element-wise operations
(:data:`fxmem.kernels.chunked_mlp.POINTWISE`) and reshapes that keep the last dimension, from
one or two *up* projections of the same input ``x`` — and from nothing else but Python numbers.
Projections are ``F.linear`` (``nn.Linear``: the built-in GPT, Llama's gated SiLU MLP) and
``torch.addmm(bias, x, W)`` (GPT-2's ``Conv1D``, ``W`` ``[in, out]``: the op gets ``W.t()``).
Every intermediate must be used only inside the MLP (one used elsewhere would have to exist
whole anyway). Anything else — a constant tensor, a dropout, an op not in the list — means
"not an MLP" and the graph is left as it is.
"""

from __future__ import annotations

import json
import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

from fxmem.kernels import chunked_mlp  # noqa: F401  (registers fxmem::chunked_mlp)
from fxmem.passes.base import traced_value

_LINEAR = {F.linear, torch._C._nn.linear}
_RESHAPES = {"view", "reshape"}

# torch-level spellings (functions, then Tensor methods) of each element-wise operation
_FUNCTIONS = {
    operator.add: "add", torch.add: "add", operator.sub: "sub", torch.sub: "sub",
    operator.mul: "mul", torch.mul: "mul", operator.truediv: "div", torch.div: "div",
    operator.neg: "neg", torch.neg: "neg", operator.pow: "pow", torch.pow: "pow",
    torch.tanh: "tanh", F.tanh: "tanh", torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid", torch.exp: "exp",
    torch.relu: "relu", F.relu: "relu", F.silu: "silu", F.gelu: "gelu",
}
_METHODS = {"add", "sub", "mul", "div", "neg", "pow", "tanh", "sigmoid", "exp", "relu"}
_INPLACE_FLAG = {"relu": 1, "silu": 1}  # positional index of ``inplace`` in F.relu / F.silu



@dataclass
class MLPMatch:
    down: fx.Node
    ups: list[fx.Node]           # one or two projections of ``x``, in graph order
    steps: list[fx.Node]         # the element-wise nodes, in graph order
    views: list[fx.Node]         # reshapes between them (no-ops on the rows)
    x: fx.Node
    program: str

    @property
    def label(self) -> str:
        return f"{', '.join(n.name for n in self.ups)} → {self.down.name} (mlp)"

    def intermediate_bytes(self) -> int:
        """Bytes of the ``[N, I]`` tensors the op never makes whole (up/gate outputs and every step)."""
        return sum(traced_value(n).numel() * traced_value(n).element_size() for n in [*self.ups, *self.steps])


def projection(node: fx.Node) -> tuple[fx.Node, fx.Node, Any, bool] | None:
    """``(input, weight, bias, transposed)`` for ``F.linear(x, W, b)`` or ``torch.addmm(b, x, W)``."""
    if node.op != "call_function":
        return None
    if node.target in _LINEAR:
        args = list(node.args) + [None] * (3 - len(node.args))
        x, w, b = (node.kwargs.get(k, a) for k, a in zip(("input", "weight", "bias"), args))
        return (x, w, b, False) if isinstance(w, fx.Node) and isinstance(x, fx.Node) else None
    if node.target is torch.addmm and len(node.args) == 3 and not node.kwargs:
        b, x, w = node.args
        bval = traced_value(b)
        if isinstance(x, fx.Node) and isinstance(w, fx.Node) and isinstance(bval, torch.Tensor) and bval.dim() == 1:
            return x, w, b, True
    return None


def _pointwise(node: fx.Node) -> tuple[str, list, dict] | None:
    """``(name, args, kwargs)`` of an element-wise node a program can replay, or None."""
    if node.op == "call_function" and node.target in _FUNCTIONS:
        name, args, kwargs = _FUNCTIONS[node.target], list(node.args), dict(node.kwargs)
    elif node.op == "call_method" and node.target in _METHODS:
        name, args, kwargs = node.target, list(node.args), dict(node.kwargs)
    else:
        return None
    if name in _INPLACE_FLAG:
        inplace = kwargs.pop("inplace", args[_INPLACE_FLAG[name]] if len(args) > 1 else False)
        args = args[:1]
        if inplace:
            return None
    if name == "gelu":
        kwargs = {"approximate": kwargs.get("approximate", args[1] if len(args) > 1 else "none")}
        args = args[:1]
    elif kwargs:
        return None  # alpha=, rounding_mode=, out=: not a plain element-wise operation
    if name == "pow" and not (isinstance(args[0], fx.Node) and isinstance(args[1], (int, float))):
        return None
    if any(not isinstance(a, (fx.Node, int, float)) or isinstance(a, bool) for a in args):
        return None
    return name, args, kwargs


def _row_view(node: fx.Node) -> bool:
    """A reshape that keeps the last dimension: a no-op on the rows the op walks."""
    reshape = (node.op == "call_method" and node.target in _RESHAPES) or (
        node.op == "call_function" and node.target is torch.reshape)
    if not reshape or not isinstance(node.args[0], fx.Node):
        return False
    src, out = traced_value(node.args[0]), traced_value(node)
    return isinstance(src, torch.Tensor) and isinstance(out, torch.Tensor) and src.shape[-1] == out.shape[-1]


def find_mlp(down: fx.Node) -> MLPMatch | None:
    """The MLP whose down projection is ``down``, or None."""
    proj = projection(down)
    if proj is None:
        return None
    ups: list[fx.Node] = []
    region: set[fx.Node] = set()
    stack = [proj[0]]
    while stack:
        n = stack.pop()
        if n in region or n in ups:
            continue
        if projection(n) is not None:
            ups.append(n)
            continue
        if _row_view(n):
            region.add(n)
            stack.append(n.args[0])
            continue
        pw = _pointwise(n)
        if pw is None:
            return None
        region.add(n)
        stack.extend(a for a in pw[1] if isinstance(a, fx.Node))
        if len(region) > 64:
            return None  # an activation is a handful of ops; this is something else
    steps = [n for n in region if not _row_view(n)]
    if not steps or not 1 <= len(ups) <= 2:
        return None
    position = {n: i for i, n in enumerate(down.graph.nodes)}
    ups.sort(key=position.__getitem__)
    xs = {projection(u)[0] for u in ups}
    if len(xs) != 1:
        return None
    (x,) = xs
    # every intermediate is [rows, I] of one dtype, and used only inside the MLP
    first = traced_value(ups[0])
    rows, width = first.numel() // first.shape[-1], first.shape[-1]
    for n in [*ups, *region]:
        v = traced_value(n)
        if not isinstance(v, torch.Tensor) or v.shape[-1] != width or v.numel() != rows * width or v.dtype != first.dtype:
            return None
        if any(u is not down and u not in region for u in n.users):
            return None
    if projection(down)[0] not in region:
        return None
    steps.sort(key=position.__getitem__)
    views = sorted(region - set(steps), key=position.__getitem__)
    return MLPMatch(down=down, ups=ups, steps=steps, views=views, x=x, program=_program(ups, steps))


def _program(ups: list[fx.Node], steps: list[fx.Node]) -> str:
    """The JSON program of :mod:`fxmem.kernels.chunked_mlp`: ``$0``/``$1`` the ups, then one value per step."""
    index = {u: i for i, u in enumerate(ups)}
    for i, s in enumerate(steps):
        index[s] = len(ups) + i

    def ref(a: Any) -> Any:
        while isinstance(a, fx.Node) and a not in index:  # a row view: the value it reshapes
            a = a.args[0]
        return f"${index[a]}" if isinstance(a, fx.Node) else a

    out = []
    for s in steps:
        name, args, kwargs = _pointwise(s)
        out.append([name, [ref(a) for a in args], kwargs])
    return json.dumps(out)


def rewrite_mlp(gm: fx.GraphModule, m: MLPMatch, chunk_tokens: int, set_value) -> set[fx.Node]:
    """Replace the MLP by one ``fxmem::chunked_mlp`` node; return the nodes erased.

    ``set_value(node)`` gives a new node its fake value (the caller's fake mode).
    """
    graph = gm.graph

    def add(op: str, target: Any, args: tuple) -> fx.Node:
        node = graph.create_node(op, target, args)
        set_value(node)
        return node

    with graph.inserting_before(m.down):
        weights: list[Any] = []
        for p in [*m.ups, m.down]:
            _, w, b, transposed = projection(p)
            weights += [add("call_method", "t", (w,)) if transposed else w, b]
        if len(m.ups) == 1:
            weights[2:2] = [None, None]
        out = add("call_function", torch.ops.fxmem.chunked_mlp.default, (m.x, *weights, m.program, chunk_tokens))
        if tuple(traced_value(out).shape) != tuple(traced_value(m.down).shape):
            out = add("call_method", "reshape", (out, *traced_value(m.down).shape))
    m.down.replace_all_uses_with(out)
    out.meta.update({k: v for k, v in m.down.meta.items() if k not in ("example_value", "val")})
    position = {n: i for i, n in enumerate(graph.nodes)}
    erased = set()
    for node in sorted([m.down, *m.steps, *m.views, *m.ups], key=position.__getitem__, reverse=True):
        if not node.users:
            graph.erase_node(node)
            erased.add(node)
    return erased
