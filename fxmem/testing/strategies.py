"""Hypothesis strategies that build random, valid FX graphs for property tests.

:func:`random_programs` draws a straight-line program over 2-D and 3-D activations — pointwise
ops, row reductions (sum, softmax, layer norm), matmuls with parameters, views and transposes,
residual adds — as a module; :func:`random_graphs` traces it with ``torch.fx.symbolic_trace`` so a
test gets a ``GraphModule`` with its example input. Every program is valid by construction (the
strategy tracks shapes), so a failure is a failure of the pass under test.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import strategies as st

UNARY = {
    "relu": F.relu,
    "gelu": F.gelu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "silu": F.silu,
    "neg": torch.neg,
}


@dataclass(frozen=True)
class Op:
    kind: str          # "unary" | "add" | "mul" | "linear" | "softmax" | "layer_norm" | "sum" | "transpose2" | "reshape"
    src: int           # index of the value read
    other: int = -1    # second operand (add/mul)
    name: str = ""     # unary op name
    width: int = 0     # linear output width


class RandomProgram(nn.Module):
    """Interprets a list of :class:`Op` over a list of values; ``symbolic_trace`` unrolls it."""

    def __init__(self, ops: list[Op], widths: list[int]):
        super().__init__()
        self.ops = ops
        self.linears = nn.ModuleList()
        self.norms = nn.ModuleList()
        for op in ops:
            w_in = widths[op.src]
            if op.kind == "linear":
                self.linears.append(nn.Linear(w_in, op.width))
            elif op.kind == "layer_norm":
                self.norms.append(nn.LayerNorm(w_in))

    def forward(self, x):
        values = [x]
        li = ni = 0
        for op in self.ops:
            a = values[op.src]
            if op.kind == "unary":
                y = UNARY[op.name](a)
            elif op.kind == "add":
                y = a + values[op.other]
            elif op.kind == "mul":
                y = a * values[op.other]
            elif op.kind == "linear":
                y = self.linears[li](a)
                li += 1
            elif op.kind == "layer_norm":
                y = self.norms[ni](a)
                ni += 1
            elif op.kind == "softmax":
                y = torch.softmax(a, dim=-1)
            elif op.kind == "sum":
                y = a.sum(dim=-1, keepdim=True).expand_as(a) * 0.1
            elif op.kind == "reshape":
                y = a.reshape(a.shape[0], -1, 2).reshape(a.shape)
            else:  # "transpose2": a transpose pair, a view chain that must round-trip
                y = a.transpose(0, 1).contiguous().transpose(0, 1)
            values.append(y)
        return values[-1] + values[len(values) // 2]


@st.composite
def random_programs(draw, max_ops: int = 12, batch: int = 4):
    """A ``(RandomProgram, example_input)`` pair with 2..max_ops ops; widths are even."""
    width0 = draw(st.sampled_from([4, 8, 16]))
    widths = [width0]  # width of each value (last dim)
    # the first op is a linear, so every program has parameters to differentiate
    first_width = draw(st.sampled_from([4, 8, 16, 32]))
    ops: list[Op] = [Op("linear", 0, width=first_width)]
    widths.append(first_width)
    n = draw(st.integers(1, max_ops - 1))
    for _ in range(n):
        # read only values computed after the first linear, so every output depends on parameters
        src = draw(st.integers(1, len(widths) - 1))
        w = widths[src]
        same = [i for i, wi in enumerate(widths) if wi == w and i >= 1]
        kind = draw(st.sampled_from(["unary", "unary", "add", "mul", "linear", "linear", "softmax", "layer_norm", "sum", "reshape", "transpose2"]))
        if kind in ("add", "mul"):
            ops.append(Op(kind, src, other=draw(st.sampled_from(same))))
            widths.append(w)
        elif kind == "linear":
            out = draw(st.sampled_from([4, 8, 16, 32]))
            ops.append(Op(kind, src, width=out))
            widths.append(out)
        elif kind == "unary":
            ops.append(Op(kind, src, name=draw(st.sampled_from(sorted(UNARY)))))
            widths.append(w)
        else:
            ops.append(Op(kind, src))
            widths.append(w)
    # forward() ends with values[-1] + values[len // 2]: if the widths differ, append a linear
    # that projects the last value to the width of the value that will then be in the middle
    if widths[-1] != widths[len(widths) // 2]:
        target = widths[(len(widths) + 1) // 2]
        ops.append(Op("linear", len(widths) - 1, width=target))
        widths.append(target)
    seed = draw(st.integers(0, 2**16))
    torch.manual_seed(seed)
    module = RandomProgram(ops, widths)
    x = torch.randn(batch, width0)
    return module, x


@st.composite
def random_graphs(draw, max_ops: int = 12):
    """A ``(GraphModule, example_input)`` pair: a :func:`random_programs` program, traced."""
    module, x = draw(random_programs(max_ops=max_ops))
    gm = fx.symbolic_trace(module)
    return gm, x
