"""Triton kernel for one chunk of the chunked cross-entropy: row losses and the logits' gradient, in place.

:func:`fxmem.kernels.linear_ce._forward_impl` computes a chunk's logits with cuBLAS
(``F.linear``), then — on CUDA tensors — calls :func:`cross_entropy_rows_` instead of its chain
of ATen ops (``amax``, ``sub``, ``exp``, ``sum``, ``log``, ``gather``, ``div``, ``scatter_add``,
``mul``: each one a pass over the ``[rows, V]`` chunk). One program per row reads its logits twice
and writes them once, as Liger's ``liger_cross_entropy_kernel`` does:

1. an online max and sum of ``exp`` over the vocabulary in blocks (and ``Σx`` for label
   smoothing), and the target's logit: ``lse = m + log(d)``,
   ``loss = lse - (1-ε)·x[t] - ε/V·Σx`` (0 on an ignored row);
2. the gradient ``(softmax(x) - (1-ε)·onehot(t) - ε/V) · scale`` written over the logits,
   where ``scale`` is ``1/count`` for ``mean`` (read from a 0-dim tensor: no host sync) or 1,
   and 0 on an ignored row.

The two matmuls of the gradient stay with cuBLAS. Math in fp32 whatever the logits' dtype.
The kernel uses Triton's standard library (``tl.max``, ``tl.sum``), so under
``TRITON_INTERPRET=1`` it runs on CPU tensors only when the variable was set before Triton was
imported (:func:`fxmem.kernels.interpreter.enabled`); that is how the tests run it.
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor

from fxmem.kernels import interpreter

try:  # Triton is optional: without it the op runs its ATen path everywhere
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is installed with torch on Linux
    triton = None
    tl = None


def cross_entropy_rows_kernel(
    logits_ptr, stride_row, target_ptr, loss_ptr, scale_ptr,
    n_cols, ignore_index, label_smoothing,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    ptr = logits_ptr + row * stride_row
    t = tl.load(target_ptr + row)
    keep = t != ignore_index
    safe_t = tl.where(keep, t, 0)
    cols = tl.arange(0, BLOCK)
    # pass 1: online log-sum-exp (and the row sum for label smoothing); Python scalars as the
    # loop-carried start values, as Liger's kernel has them (compiled and interpreted alike)
    m = float("-inf")
    d = 0.0
    sx = 0.0
    for off in range(0, n_cols, BLOCK):
        mask = off + cols < n_cols
        x = tl.load(ptr + off + cols, mask=mask, other=float("-inf")).to(tl.float32)
        new_m = tl.maximum(m, tl.max(x, 0))
        d = d * tl.exp(m - new_m) + tl.sum(tl.exp(x - new_m), 0)
        m = new_m
        sx += tl.sum(tl.where(mask, x, 0.0), 0)
    lse = m + tl.log(d)
    x_t = tl.load(ptr + safe_t).to(tl.float32)
    loss = lse - (1.0 - label_smoothing) * x_t - label_smoothing / n_cols * sx
    tl.store(loss_ptr + row, tl.where(keep, loss, 0.0))
    # pass 2: the gradient of the logits, written over them
    scale = tl.where(keep, tl.load(scale_ptr).to(tl.float32), 0.0)
    for off in range(0, n_cols, BLOCK):
        c = off + cols
        mask = c < n_cols
        x = tl.load(ptr + c, mask=mask, other=0.0).to(tl.float32)
        g = tl.exp(x - m) / d - label_smoothing / n_cols
        g = tl.where(c == safe_t, g - (1.0 - label_smoothing), g)
        tl.store(ptr + c, (g * scale).to(logits_ptr.dtype.element_ty), mask=mask)


KERNEL_NAME = "fxmem_cross_entropy_rows"


def kernel_source() -> str:
    """The kernel's Triton source."""
    return inspect.getsource(cross_entropy_rows_kernel)


def available(device: torch.device) -> bool:
    """Triton is installed, and ``device`` is CUDA (or the interpreter is on)."""
    return triton is not None and (device.type == "cuda" or interpreter.enabled())


def can_run(logits: Tensor) -> bool:
    """The kernel runs on ``logits``: 2-D with contiguous rows, where :func:`available`."""
    return logits.dim() == 2 and logits.stride(1) == 1 and available(logits.device)


def cross_entropy_rows_(logits: Tensor, target: Tensor, row_scale: Tensor, ignore_index: int,
                        label_smoothing: float, out: Tensor | None = None) -> Tensor:
    """Row losses ``[rows]`` (fp32, 0 where ignored; written into ``out``, fp32 and contiguous with
    ``rows`` elements, when given); ``logits`` is overwritten with the gradient of
    ``Σ scale·loss_row`` (``row_scale``: a 0-dim tensor, ``1/count`` or 1)."""
    rows, vocab = logits.shape
    loss = torch.empty(rows, dtype=torch.float32, device=logits.device) if out is None else out
    if out is not None and (out.dtype != torch.float32 or out.numel() != rows or not out.is_contiguous()):
        raise ValueError(f"cross_entropy_rows_: out {out.dtype} {tuple(out.shape)}; accepted: a contiguous "
                         f"float32 tensor of {rows} elements")
    if rows == 0:
        return loss
    block = min(4096 if logits.is_cuda else 64, triton.next_power_of_2(vocab))
    kernel = interpreter.jit(cross_entropy_rows_kernel, "chunked cross-entropy kernel")
    scale = row_scale if row_scale.dtype == torch.float32 else row_scale.float()
    kernel[(rows,)](logits, logits.stride(0), target if target.is_contiguous() else target.contiguous(), loss,
                    scale, vocab, ignore_index, float(label_smoothing), BLOCK=block)
    return loss
