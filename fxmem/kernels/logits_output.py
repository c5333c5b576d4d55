"""The chunked loss when the logits are also an output: three head matmuls per step, not six.

HF causal LMs return ``logits`` beside ``loss``, so a compiled model (``torch.compile(model)``,
``model(input_ids, labels=labels).loss``) has the whole logits as a graph output even when the
training step reads only the loss. The logits must then be computed once for that output. Two ops
keep the rest of the step as cheap as an unchunked one:

``fxmem::logits_cross_entropy(logits [N, V], hidden [N, d], weight [V, d], bias?, target [N], ...)``
    :func:`fxmem.kernels.linear_ce.linear_cross_entropy`, reading each chunk's rows from the
    logits already computed instead of multiplying ``hidden @ weight.T`` again. It returns the
    loss and the gradients of ``hidden``, ``weight`` and ``bias`` (the loss's path to them runs
    through ``logits``; the op declares ``logits`` non-differentiable so that path is counted once).

``fxmem::output_linear(hidden, weight, bias?)``
    ``F.linear``, whose backward first asks whether the logits' gradient is all zeros. A graph
    output nobody differentiates gets a zero gradient from autograd (the engine materializes one
    for every output of the compiled function); the two ``[N, V] × [V, d]`` matmuls of the linear's
    backward then produce zeros, so they are skipped. The check reads the gradient once and, on
    CUDA, synchronizes with the host once per step; the matmuls it skips cost ``2·N·V·d`` FLOPs each.

Before (HF Llama, loss inside, logits returned; six ``[N, V]`` head matmuls per step: the output's
linear, three in the chunked loss, two in the backward of the output's linear)::

    logits = linear(hidden, W)                                  # output
    lce = fxmem.linear_cross_entropy(hidden_2d, W, None, target, ...)

After (three: the output's linear, ``dlogits @ W`` and ``dlogits.T @ h`` per chunk)::

    logits = fxmem.output_linear(hidden, W, None)               # output
    lce = fxmem.logits_cross_entropy(logits_2d, hidden_2d, W, None, target, ...)

Soft-capped logits (Gemma 2's ``final_logit_softcapping``): ``output_linear(..., softcap=c)`` returns
``c·tanh(linear / c)`` (its backward scales the gradient by ``1 - (logits / c)²`` first, from the
logits it returned), and ``logits_cross_entropy(..., softcap=c)`` reads those capped logits and
carries the same factor into the head's gradients.

Numerical promise: exact up to float rounding, as ``fxmem::linear_cross_entropy``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.utils import flop_counter

from fxmem.kernels import direct, linear_ce


def _logits_cross_entropy(logits: Tensor, hidden: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor,
                          ignore_index: int, reduction: str, label_smoothing: float, upcast: bool, chunk_tokens: int,
                          need_hidden: bool, need_weight: bool, need_bias: bool,
                          softcap: float = 0.0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(loss, grad_hidden, grad_weight, grad_bias)`` of ``cross_entropy(logits[.float()], target)``,
    where ``logits == linear(hidden, weight, bias)`` (soft-capped: ``c·tanh(linear / c)``, ``c = softcap``)."""
    linear_ce.check_arguments("logits_cross_entropy", reduction, softcap)
    if logits.shape != (hidden.shape[0], weight.shape[0]):
        raise ValueError(f"fxmem::logits_cross_entropy: logits {tuple(logits.shape)} are not "
                         f"[rows of hidden, rows of weight] = [{hidden.shape[0]}, {weight.shape[0]}]")
    return linear_ce._forward_impl(hidden, weight, bias, target, ignore_index, reduction, label_smoothing, upcast,
                                   chunk_tokens, need_hidden, need_weight, need_bias, logits=logits, softcap=softcap)


logits_cross_entropy = torch.library.custom_op("fxmem::logits_cross_entropy", mutates_args=())(_logits_cross_entropy)


@logits_cross_entropy.register_fake
def _logits_cross_entropy_fake(logits, hidden, weight, bias, *args):
    return torch.ops.fxmem.linear_cross_entropy.default(hidden, weight, bias, *args)


def _setup_context(ctx, inputs, output):
    linear_ce.save_loss_gradients(ctx, output, inputs[10], inputs[11], inputs[12] and inputs[3] is not None)


def _backward(ctx, g_loss, _g_h, _g_w, _g_b):
    # logits: None — the loss reaches hidden/weight/bias through them, and that gradient is returned
    # here directly (the linear producing the logits adds only its other users' gradient)
    return (None, *linear_ce.scaled_loss_gradients(ctx, g_loss), None, None, None, None, None, None, None, None, None,
            None)


logits_cross_entropy.register_autograd(_backward, setup_context=_setup_context)
# what compiled graphs call instead (fxmem.kernels.direct): the same kernel without custom_op's layers
direct.register(torch.ops.fxmem.logits_cross_entropy.default, {None: _logits_cross_entropy}, _logits_cross_entropy_fake)


@flop_counter.register_flop_formula(torch.ops.fxmem.logits_cross_entropy)
def _flops(logits_shape, hidden_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:
    """Two matmuls (the gradients of hidden and weight, when asked for); the logits are an input."""
    n, d = hidden_shape
    vocab = weight_shape[0]
    need_hidden, need_weight = args[8], args[9]
    return 2 * n * d * vocab * (int(need_hidden) + int(need_weight))


def _output_linear(hidden: Tensor, weight: Tensor, bias: Tensor | None, softcap: float = 0.0) -> Tensor:
    """``F.linear(hidden, weight, bias)``, soft-capped to ``softcap·tanh(· / softcap)`` when
    ``softcap > 0``; its backward skips the matmuls for an all-zero gradient."""
    out = torch.nn.functional.linear(hidden, weight, bias)
    # in place on its own result, in its dtype: what the model's div → tanh → mul computes
    return out.div_(softcap).tanh_().mul_(softcap) if softcap else out


output_linear = torch.library.custom_op("fxmem::output_linear", mutates_args=())(_output_linear)


@output_linear.register_fake
def _output_linear_fake(hidden, weight, bias, softcap=0.0):
    return torch.nn.functional.linear(hidden, weight, bias)


# what compiled graphs call instead (fxmem.kernels.direct): the same kernels without custom_op's layers
direct.register(torch.ops.fxmem.output_linear.default, {None: _output_linear}, _output_linear_fake)


def _output_linear_backward(grad: Tensor, hidden: Tensor, weight: Tensor, has_bias: bool, need_hidden: bool,
                            need_weight: bool, need_bias: bool, capped: Tensor | None = None,
                            softcap: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """``(grad_hidden, grad_weight, grad_bias)`` of ``linear``; zeros without a matmul when ``grad`` is all zeros.

    ``capped``: the soft-capped output (``softcap > 0``), whose cap's derivative ``1 - (capped /
    softcap)²`` scales ``grad`` first. A gradient that is not asked for comes back empty.
    """
    flat_grad = grad.reshape(-1, grad.shape[-1])
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    # one read of the gradient decides; a graph output nobody differentiated has a zero gradient.
    # aminmax, not any(): on the CPU any() of a float tensor first copies it to bool. A NaN makes
    # both comparisons false, so NaN gradients go through the matmuls as they would unchecked.
    if flat_grad.numel() == 0:
        zero = True
    else:
        low, high = torch.aminmax(flat_grad)
        zero = bool((low == 0) & (high == 0))
    if softcap and not zero:
        if capped is None:
            raise ValueError("fxmem::output_linear_backward: softcap without the capped output it differentiates")
        flat_grad = flat_grad * linear_ce.one_minus_square(capped.reshape(flat_grad.shape), softcap, flat_grad.dtype)
    grad_h = (torch.zeros_like(hidden) if zero else (flat_grad @ weight).reshape(hidden.shape)) if need_hidden \
        else hidden.new_empty(0)
    grad_w = (torch.zeros_like(weight) if zero else flat_grad.t() @ flat_hidden) if need_weight else weight.new_empty(0)
    grad_b = (weight.new_zeros(weight.shape[0]) if zero else flat_grad.sum(0)) if (has_bias and need_bias) \
        else weight.new_empty(0)
    return grad_h, grad_w, grad_b


output_linear_backward = torch.library.custom_op("fxmem::output_linear_backward", mutates_args=())(_output_linear_backward)


@output_linear_backward.register_fake
def _output_linear_backward_fake(grad, hidden, weight, has_bias, need_hidden, need_weight, need_bias, capped=None, softcap=0.0):
    return (torch.empty_like(hidden) if need_hidden else hidden.new_empty(0),
            torch.empty_like(weight) if need_weight else weight.new_empty(0),
            weight.new_empty(weight.shape[0]) if (has_bias and need_bias) else weight.new_empty(0))


# what compiled graphs call instead (fxmem.kernels.direct): the same kernels without custom_op's layers
direct.register(torch.ops.fxmem.output_linear_backward.default, {None: _output_linear_backward}, _output_linear_backward_fake)


def linear_setup_context(ctx, inputs, output):
    hidden, weight, bias, *rest = inputs
    ctx.softcap = float(rest[0]) if rest and rest[0] else 0.0
    # the capped output is what the cap's derivative is computed from (it is an output: no copy)
    ctx.save_for_backward(hidden, weight, output if ctx.softcap else None)
    ctx.has_bias = bias is not None


def linear_gradients(ctx, grad, need_hidden: bool, need_weight: bool, need_bias: bool) -> tuple:
    """``(grad_hidden, grad_weight, grad_bias)`` of the linear whose ``hidden`` and ``weight``
    :func:`linear_setup_context` saved in ``ctx``; ``None`` for a gradient not asked for."""
    hidden, weight, capped = ctx.saved_tensors
    grad_h, grad_w, grad_b = torch.ops.fxmem.output_linear_backward(grad, hidden, weight, ctx.has_bias,
                                                                    need_hidden, need_weight, bool(need_bias),
                                                                    capped, ctx.softcap)
    return (grad_h if need_hidden else None, grad_w if need_weight else None,
            grad_b if (ctx.has_bias and need_bias) else None)


def _linear_backward(ctx, grad):
    return (*linear_gradients(ctx, grad, *ctx.needs_input_grad[:3]), None)


output_linear.register_autograd(_linear_backward, setup_context=linear_setup_context)


@flop_counter.register_flop_formula(torch.ops.fxmem.output_linear)
def _linear_flops(hidden_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * math.prod(hidden_shape) * weight_shape[0]


@flop_counter.register_flop_formula(torch.ops.fxmem.output_linear_backward)
def _linear_backward_flops(grad_shape, hidden_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:
    """Priced as if the gradient were non-zero (the worst case), so remat never counts it as free."""
    return 4 * math.prod(hidden_shape) * weight_shape[0]
