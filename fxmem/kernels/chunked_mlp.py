"""Chunked position-wise MLP: ``down(act(up(x)[, gate(x)]))`` a chunk of rows at a time, forward and backward.

``fxmem::chunked_mlp(x [..., d], up_w, up_b?, gate_w?, gate_b?, down_w, down_b?, program, chunk_tokens)``
returns what

    u = F.linear(x, up_w, up_b)                    # [..., I]
    g = F.linear(x, gate_w, gate_b)                # [..., I], only for a gated MLP
    a = program(u, g)                              # element-wise: silu(g) * u, gelu(u), ...
    out = F.linear(a, down_w, down_b)              # [..., d_out]

returns, but walks the rows ``chunk_tokens`` at a time (MsT, "mini-sequence" MLP chunking): the
``[N, I]`` intermediates (``u``, ``g``, every step of ``program``) exist one chunk at a time. Its
autograd formula saves nothing but the inputs; the backward op
``fxmem::chunked_mlp_backward`` recomputes each chunk's intermediates and accumulates the
gradients of ``x`` and of the weights. Cost: the two (three, gated) up/gate matmuls of each
chunk are done again in the backward (+1/3 of the MLP's FLOPs, what activation checkpointing of
the MLP costs), in exchange for never holding the intermediates from forward to backward.

Weights are in ``F.linear``'s ``[out, in]`` layout; GPT-2's ``Conv1D`` (``addmm(b, x, W)`` with
``W`` ``[in, out]``) passes ``W.t()``, a view, and autograd maps the gradient back.

``program`` is the element-wise part, a JSON list of steps ``[name, [arg, ...], {kwarg: value}]``.
An argument is ``"$k"`` (value ``k``: ``$0`` is ``u``, ``$1`` is ``g``, then one value per step)
or a Python number; the last step's value is ``a``. Names are :data:`POINTWISE` — each with the
forward eager runs and the backward formula eager's autograd uses (``silu_backward``,
``gelu_backward``, ``tanh_backward``, ...), so the numbers equal eager's up to the rounding of
matmuls split by rows. The program travels in the op's arguments: nothing is registered per
graph, so the op keeps no state between calls.

The MLP's own tests: ``tests/kernels/test_chunked_mlp.py``; the pass that finds MLPs in a
graph: :mod:`fxmem.passes.chunk_mlp`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils import flop_counter

from fxmem.analysis.cost import register_internal_bytes
from fxmem.kernels import direct

aten = torch.ops.aten


# name -> (forward(*args, **kwargs), backward(grad, args, out, kwargs) -> one gradient per argument)
# Each backward is the formula eager's autograd applies to that op (derivatives.yaml), so the
# gradients round as eager's do.
POINTWISE: dict[str, tuple[Callable[..., Tensor], Callable[..., tuple]]] = {
    "add": (lambda a, b: a + b, lambda g, args, out, kw: (g, g)),
    "sub": (lambda a, b: a - b, lambda g, args, out, kw: (g, -g)),
    "mul": (lambda a, b: a * b, lambda g, args, out, kw: (g * args[1], g * args[0])),
    "div": (lambda a, b: a / b, lambda g, args, out, kw: (g / args[1], -g * args[0] / (args[1] * args[1]))),
    "neg": (lambda a: -a, lambda g, args, out, kw: (-g,)),
    # a ** c, c a Python number (derivatives.yaml: pow_backward = grad * c * a ** (c - 1))
    "pow": (lambda a, c: torch.pow(a, c), lambda g, args, out, kw: (g * args[1] * torch.pow(args[0], args[1] - 1), None)),
    "tanh": (torch.tanh, lambda g, args, out, kw: (aten.tanh_backward(g, out),)),
    "sigmoid": (torch.sigmoid, lambda g, args, out, kw: (aten.sigmoid_backward(g, out),)),
    "exp": (torch.exp, lambda g, args, out, kw: (g * out,)),
    "relu": (torch.relu, lambda g, args, out, kw: (aten.threshold_backward(g, out, 0),)),
    "silu": (F.silu, lambda g, args, out, kw: (aten.silu_backward(g, args[0]),)),
    "gelu": (lambda a, approximate="none": F.gelu(a, approximate=approximate),
             lambda g, args, out, kw: (aten.gelu_backward(g, args[0], approximate=kw.get("approximate", "none")),)),
}
"""The element-wise operations a program may use: forward, and the gradient of each argument."""


def parse_program(program: str) -> list[tuple[str, list, dict]]:
    """The steps of ``program``; raises ``ValueError`` naming what is wrong."""
    try:
        steps = json.loads(program)
    except json.JSONDecodeError as exc:
        raise ValueError(f"fxmem::chunked_mlp: program is not JSON ({exc})") from None
    if not isinstance(steps, list) or not steps:
        raise ValueError("fxmem::chunked_mlp: program must be a non-empty list of [name, args, kwargs] steps")
    out = []
    for i, step in enumerate(steps):
        if not (isinstance(step, list) and len(step) == 3 and step[0] in POINTWISE):
            raise ValueError(f"fxmem::chunked_mlp: step {i} {step!r}: accepted names {sorted(POINTWISE)}")
        out.append((step[0], list(step[1]), dict(step[2])))
    return out


def _arg(values: Sequence[Tensor], a: Any) -> Any:
    return values[int(a[1:])] if isinstance(a, str) and a.startswith("$") else a


def run_program(steps, inputs: Sequence[Tensor]) -> list[Tensor]:
    """Every value of the program (the inputs, then one per step); the last is the activation."""
    values = list(inputs)
    for name, args, kwargs in steps:
        values.append(POINTWISE[name][0](*[_arg(values, a) for a in args], **kwargs))
    return values


def program_backward(steps, values: Sequence[Tensor], grad: Tensor, n_inputs: int) -> list[Tensor | None]:
    """Gradients of the program's inputs for ``grad`` of its last value (reverse mode over the steps)."""
    grads: list[Tensor | None] = [None] * len(values)
    grads[-1] = grad
    for i in range(len(steps) - 1, -1, -1):
        g = grads[n_inputs + i]
        if g is None:
            continue
        grads[n_inputs + i] = None  # free the chunk's gradient as soon as it is spent
        name, args, kwargs = steps[i]
        vals = [_arg(values, a) for a in args]
        for a, ga in zip(args, POINTWISE[name][1](g, vals, values[n_inputs + i], kwargs)):
            if ga is None or not (isinstance(a, str) and a.startswith("$")):
                continue
            k = int(a[1:])
            # a broadcast scalar tensor never appears here: every tensor value is [rows, I]
            grads[k] = ga if grads[k] is None else grads[k] + ga
    return grads[:n_inputs]


def auto_chunk_tokens(n_rows: int, intermediate: int, hidden: int) -> int:
    """Rows per chunk so that a chunk's intermediate is about the size of the input (MsT's rule:
    ``ceil(I / d)`` mini-sequences), as a power of two, at least 64 rows."""
    pieces = max(1, -(-intermediate // max(hidden, 1)))
    rows = max(1, -(-n_rows // pieces))
    return max(64, 1 << (rows - 1).bit_length())


def _chunk_rows(x2d: Tensor, up_w: Tensor, chunk_tokens: int) -> int:
    return chunk_tokens if chunk_tokens > 0 else auto_chunk_tokens(x2d.shape[0], up_w.shape[0], x2d.shape[1])


def forward_workspace_bytes(x: Tensor, up_w: Tensor, up_b, gate_w: Tensor | None, gate_b, down_w: Tensor,
                            down_b, program: str, chunk_tokens: int) -> int:
    """Bytes :func:`chunked_mlp` allocates beyond its output, at its largest: one chunk's
    projections and every value of the activation program (alive together until the program
    returns), or later the activation and its down projection's ``[rows, out]`` before that is
    copied into the output. Works on fake or meta tensors (fit's estimate)."""
    _, rows, itemsize = _geometry(x, up_w, chunk_tokens)
    values = (1 if gate_w is None else 2) + len(parse_program(program))
    inter = int(up_w.shape[0])
    return rows * max(values * inter, inter + int(down_w.shape[0])) * itemsize


def _geometry(x: Tensor, up_w: Tensor, chunk_tokens: int) -> tuple[int, int, int]:
    """(rows of ``x``, rows per chunk as the op walks them, the compute dtype's item size)."""
    x2d = x.reshape(-1, x.shape[-1])
    rows = int(x2d.shape[0])
    itemsize = torch.empty((), dtype=torch.result_type(x, up_w)).element_size()
    return rows, min(rows, _chunk_rows(x2d, up_w, int(chunk_tokens or 0))), itemsize


def _projections(xc: Tensor, up_w, up_b, gate_w, gate_b) -> list[Tensor]:
    ins = [F.linear(xc, up_w, up_b)]
    if gate_w is not None:
        ins.append(F.linear(xc, gate_w, gate_b))
    return ins


def _chunked_mlp(x: Tensor, up_w: Tensor, up_b: Tensor | None, gate_w: Tensor | None, gate_b: Tensor | None,
                 down_w: Tensor, down_b: Tensor | None, program: str, chunk_tokens: int) -> Tensor:
    """``down(program(up(x), gate(x)))`` a chunk of rows at a time; see the module docstring."""
    steps = parse_program(program)
    x2d = x.reshape(-1, x.shape[-1])
    out = x2d.new_empty((x2d.shape[0], down_w.shape[0]), dtype=torch.result_type(x2d, down_w))
    rows = _chunk_rows(x2d, up_w, chunk_tokens)
    for start in range(0, x2d.shape[0], rows):
        xc = x2d[start:start + rows]
        act = run_program(steps, _projections(xc, up_w, up_b, gate_w, gate_b))[-1]
        out[start:start + rows] = F.linear(act, down_w, down_b)
        del act  # else it lives on beside the next chunk's projections: one chunk's [rows, I] more
    return out.reshape(*x.shape[:-1], down_w.shape[0])


chunked_mlp = torch.library.custom_op("fxmem::chunked_mlp", mutates_args=())(_chunked_mlp)


@chunked_mlp.register_fake
def _chunked_mlp_fake(x, up_w, up_b, gate_w, gate_b, down_w, down_b, program, chunk_tokens):
    return x.new_empty((*x.shape[:-1], down_w.shape[0]), dtype=torch.result_type(x, down_w))


# what compiled graphs call instead (fxmem.kernels.direct): the same kernels without custom_op's layers
direct.register(torch.ops.fxmem.chunked_mlp.default, {None: _chunked_mlp}, _chunked_mlp_fake)


def _chunked_mlp_backward(grad_out: Tensor, x: Tensor, up_w: Tensor, up_b: Tensor | None, gate_w: Tensor | None,
                          gate_b: Tensor | None, down_w: Tensor, down_b: Tensor | None, program: str, chunk_tokens: int,
                          need_x: bool, need_weights: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients ``(x, up_w, up_b, gate_w, gate_b, down_w, down_b)``, recomputing each chunk's intermediates.

    Absent or unwanted gradients come back as empty tensors. Weight gradients accumulate over the
    chunks in fp32 and are cast to the weight's dtype at the end.
    """
    steps = parse_program(program)
    x2d = x.reshape(-1, x.shape[-1])
    g2d = grad_out.reshape(-1, grad_out.shape[-1])
    weights = (up_w, up_b, gate_w, gate_b, down_w, down_b)
    acc = [torch.zeros(w.shape, dtype=torch.float32, device=w.device) if (need_weights and w is not None) else None
           for w in weights]
    grad_x = torch.empty_like(x2d) if need_x else x2d.new_empty(0)
    rows = _chunk_rows(x2d, up_w, chunk_tokens)
    n_inputs = 1 if gate_w is None else 2
    for start in range(0, x2d.shape[0], rows):
        xc, gc = x2d[start:start + rows], g2d[start:start + rows]
        values = run_program(steps, _projections(xc, up_w, up_b, gate_w, gate_b))
        act = values[-1]
        if acc[4] is not None:  # down: grad_W += g.T @ a, grad_b += sum(g)
            acc[4].addmm_(gc.t().float(), act.float())
            if acc[5] is not None:
                acc[5].add_(gc.float().sum(0))
        grad_in = program_backward(steps, values, gc @ down_w.to(gc.dtype), n_inputs)
        del values, act
        if need_x:
            gx = grad_in[0] @ up_w
            if gate_w is not None:
                gx = gx + grad_in[1] @ gate_w
            grad_x[start:start + rows] = gx
        for k, (w_i, b_i) in enumerate(((0, 1), (2, 3))[:n_inputs]):
            if acc[w_i] is not None:
                acc[w_i].addmm_(grad_in[k].t().float(), xc.float())
                if acc[b_i] is not None:
                    acc[b_i].add_(grad_in[k].float().sum(0))
    out = [a.to(w.dtype) if a is not None else x2d.new_empty(0) for a, w in zip(acc, weights)]
    return (grad_x.reshape(x.shape) if need_x else grad_x, *out)


chunked_mlp_backward = torch.library.custom_op("fxmem::chunked_mlp_backward", mutates_args=())(_chunked_mlp_backward)


@chunked_mlp_backward.register_fake
def _chunked_mlp_backward_fake(grad_out, x, up_w, up_b, gate_w, gate_b, down_w, down_b, program, chunk_tokens, need_x,
                               need_weights):
    # contiguous, as the real op returns them (a weight may be a transposed view: GPT-2's Conv1D)
    def like(w):
        return w.new_empty(w.shape) if (need_weights and w is not None) else x.new_empty(0)

    return (x.new_empty(x.shape) if need_x else x.new_empty(0), *[like(w) for w in (up_w, up_b, gate_w, gate_b, down_w, down_b)])


# what compiled graphs call instead (fxmem.kernels.direct): the same kernels without custom_op's layers
direct.register(torch.ops.fxmem.chunked_mlp_backward.default, {None: _chunked_mlp_backward},
                _chunked_mlp_backward_fake)


def _setup_context(ctx, inputs, output):
    x, up_w, up_b, gate_w, gate_b, down_w, down_b, program, chunk_tokens = inputs
    ctx.save_for_backward(x, up_w, up_b, gate_w, gate_b, down_w, down_b)  # the inputs only: no intermediate
    ctx.program, ctx.chunk_tokens = program, chunk_tokens


def _backward(ctx, grad_out):
    x, up_w, up_b, gate_w, gate_b, down_w, down_b = ctx.saved_tensors
    needs = ctx.needs_input_grad
    need_weights = any(needs[1:7])
    grads = chunked_mlp_backward(grad_out, x, up_w, up_b, gate_w, gate_b, down_w, down_b, ctx.program,
                                 ctx.chunk_tokens, bool(needs[0]), need_weights)
    return (*[g if need else None for g, need in zip(grads, needs[:7])], None, None)


chunked_mlp.register_autograd(_backward, setup_context=_setup_context)


def _matmul_flops(x_shape, *weight_shapes) -> int:
    rows = math.prod(x_shape[:-1])
    return sum(2 * rows * w[0] * w[1] for w in weight_shapes if w is not None)


@flop_counter.register_flop_formula(torch.ops.fxmem.chunked_mlp)
def _flops(x_shape, up_w_shape, up_b_shape, gate_w_shape, gate_b_shape, down_w_shape, *args, out_shape=None, **kwargs) -> int:
    """The up (and gate) and down matmuls. Registered with ``torch.utils.flop_counter`` so that a
    partitioner pricing recomputation by FLOPs (fxmem's remat) never recomputes it as if it were free."""
    return _matmul_flops(x_shape, up_w_shape, gate_w_shape, down_w_shape)


@flop_counter.register_flop_formula(torch.ops.fxmem.chunked_mlp_backward)
def _flops_backward(grad_shape, x_shape, up_w_shape, up_b_shape, gate_w_shape, gate_b_shape, down_w_shape, *args,
                    out_shape=None, **kwargs) -> int:
    """The recomputed up (and gate) matmuls, and two matmuls per projection for the gradients."""
    return 3 * _matmul_flops(x_shape, up_w_shape, gate_w_shape) + 2 * _matmul_flops(x_shape, down_w_shape)


def forward_internal_bytes(node) -> int:
    """Bytes :func:`chunked_mlp` moves beyond reading its inputs and writing its output once (for
    :mod:`fxmem.analysis.cost`), in units of the whole ``[N, I]`` intermediate: each projection
    written, each program step reading its tensor arguments and writing its value, the down
    projection reading the activation — the same passes as the unchunked ops — plus what chunking
    adds: the weights read again by every chunk after the first, and each chunk's down projection
    written and copied into the output."""
    vals = [a.meta.get("val") if hasattr(a, "meta") else a for a in node.args]
    x, up_w, gate_w, down_w, program, chunk_tokens = vals[0], vals[1], vals[3], vals[5], vals[7], vals[8]
    if not isinstance(x, Tensor) or not isinstance(up_w, Tensor):
        return 0
    rows, chunk, itemsize = _geometry(x, up_w, chunk_tokens)
    inter, out = int(up_w.shape[0]), int(down_w.shape[0])
    passes = 1 if gate_w is None else 2
    for _name, args, _kwargs in parse_program(program):
        passes += 1 + sum(1 for a in args if isinstance(a, str) and a.startswith("$"))
    passes += 1
    chunks = -(-rows // max(chunk, 1))
    weights = sum(w.numel() * w.element_size() for w in (up_w, gate_w, down_w) if isinstance(w, Tensor))
    return int(passes * rows * inter * itemsize + (chunks - 1) * weights + 2 * rows * out * itemsize)


register_internal_bytes(torch.ops.fxmem.chunked_mlp, forward_internal_bytes)
