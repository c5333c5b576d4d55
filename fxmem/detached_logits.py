"""The logits output of a chunked loss leaves the compiled graph without a gradient path.

HF causal LMs return ``logits`` beside ``loss``. After the chunk pass the loss never needs the
logits' gradient (``fxmem::logits_cross_entropy`` computes the head's gradients itself), but the
logits are still a differentiable output of the compiled function, and autograd hands every
output of one ``autograd.Function`` a gradient: for an output nobody differentiates it
*materializes a zero tensor of its size* — ``[B, T, V]``, 250 MiB for B 4 × T 512 at vocab 32k,
allocated in the backward and on the step's peak. (``fxmem::output_linear``'s backward then skips
its matmuls for it, but the zeros exist.)

So the training graph returns the logits computed from detached inputs (no gradient path, no
zeros) and the head's input as one more output, and the backend puts the gradient path back
outside the compiled function, as its own autograd node (:class:`LinearOutput`). Autograd runs
that node only when the caller differentiates the logits (a z-loss, distillation): then its
backward is the linear's (``grad @ W``, ``grad.T @ h``) and flows into the compiled backward
through the head input's gradient. Otherwise nothing runs and nothing is allocated, except a
zero gradient of the head input (``[B, T, d]``, V/d times smaller).

Before (the Dynamo graph after the chunk pass)::

    logits = fxmem.output_linear(hidden, W, None)             # output 1, differentiable
    lce = fxmem.logits_cross_entropy(logits.view(N, V), hidden.view(N, d), W, None, target, ...)
    return (loss, logits)

After::

    logits = aten.linear(hidden.detach(), W.detach(), None)    # no gradient path (soft-capped: output_linear)
    lce = ...                                                  # unchanged: logits read as values
    return (loss, logits, hidden)                              # the caller sees (loss, LinearOutput(logits, hidden, W))

Exact: the same values; the logits' gradient, when asked for, is the linear's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from fxmem.kernels.logits_output import linear_gradients, linear_setup_context  # registers fxmem::output_linear


class LinearOutput(torch.autograd.Function):
    """``logits`` (computed without a gradient path) with ``linear(hidden, weight, bias)``'s gradient
    (``fxmem::output_linear``'s own backward)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                softcap: float = 0.0):
        linear_setup_context(ctx, (hidden, weight, bias, softcap), logits)
        return logits

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return None, *linear_gradients(ctx, grad, *ctx.needs_input_grad[1:4]), None


@dataclass(frozen=True)
class Reattach:
    """Output ``output`` of the graph is linear logits; ``hidden_output`` is the extra output holding
    the head's input; ``weight`` / ``bias`` are positions of the graph's inputs."""

    output: int
    hidden_output: int
    weight: int
    bias: int | None
    softcap: float = 0.0  # the logits are c·tanh(linear / c) (Gemma 2), their gradient scaled by 1 - tanh²


def detach_logits_outputs(gm: fx.GraphModule) -> list[Reattach]:
    """Rewrite ``gm`` in place (see the module docstring); returns what the caller must put back.

    Only logits that are a graph output themselves, computed by ``fxmem::output_linear`` (the
    chunk pass's head) from a weight (and bias) that are graph inputs; anything else is left as it is.
    """
    out = gm.graph.output_node()
    values = list(out.args[0]) if isinstance(out.args[0], (tuple, list)) else []
    position = {n: i for i, n in enumerate(gm.graph.find_nodes(op="placeholder"))}
    target = torch.ops.fxmem.output_linear.default
    plan = []
    for i, node in enumerate(values[:]):
        if not (isinstance(node, fx.Node) and node.op == "call_function" and node.target is target):
            continue
        hidden, weight, bias, *softcap = node.args
        if weight not in position or (bias is not None and bias not in position):
            continue
        with gm.graph.inserting_before(node):
            detached = [None if a is None else gm.graph.call_function(torch.ops.aten.detach.default, (a,))
                        for a in (hidden, weight, bias)]
        for d, a in zip(detached, (hidden, weight, bias)):
            if d is not None:
                d.meta.update({k: v for k, v in a.meta.items() if k in ("example_value", "val", "stack_trace")})
        if softcap:
            node.args = (*detached, *softcap)
        else:
            # no gradient path left, so nothing needs the custom op's backward: a plain linear,
            # which Inductor lowers to its own matmul call (one dispatcher and Python layer less
            # per step than a custom op: host time that a small model's GPU step waits on)
            node.target, node.args = torch.ops.aten.linear.default, tuple(detached)
        plan.append(Reattach(i, len(values), position[weight], None if bias is None else position[bias],
                             float(softcap[0]) if softcap else 0.0))
        values.append(hidden)
    if plan:
        out.args = (tuple(values),)
        gm.graph.lint()
        gm.recompile()
    return plan


def reattaching(compiled: Callable, plan: Sequence[Reattach]) -> Callable:
    """``compiled`` (a Dynamo backend's callable: ``compiled(*args)``), returning the graph's
    original outputs (those before the first extra one) with each logits output given back its
    gradient path."""
    num_outputs = min(r.hidden_output for r in plan)

    def run(*args: Any) -> Any:
        result = compiled(*args)
        outputs = list(result)
        for r in plan:
            bias = None if r.bias is None else args[r.bias]
            outputs[r.output] = LinearOutput.apply(outputs[r.output], outputs[r.hidden_output], args[r.weight], bias,
                                                   r.softcap)
        del outputs[num_outputs:]
        return outputs if isinstance(result, list) else tuple(outputs)

    return run
