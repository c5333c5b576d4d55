"""Grouped matmuls of mixture-of-experts layers: which nodes are one, and their operands.

A grouped matmul multiplies the tokens of each expert (``x`` ``[S, K]``, sorted by expert; ``offs``
``[E]`` the cumulative end row of each expert's tokens) by that expert's weight (``w``
``[E, K, N]``). Two spellings reach fxmem's graphs: transformers' ``grouped_mm_fallback(x, w,
offs)`` (HF MoE layers on the CPU, or for non-bf16 weights) and ``aten._grouped_mm(x, w, offs)``
(what ``torch.nn.functional.grouped_mm`` runs). The int8 pass and the pruning dependency
analysis both read them through :func:`grouped_mm_operands`.
"""

from __future__ import annotations

import torch
import torch.fx as fx

aten = torch.ops.aten


def grouped_mm_operands(node: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node] | None:
    """``(x, w, offs)`` when ``node`` is a 2-D × 3-D grouped matmul by expert offsets, without a
    bias or an ``out_dtype``; else None."""
    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
        return None
    t = node.target
    if t.namespace == "transformers" and t._opname == "grouped_mm_fallback" and len(node.args) == 3 and not node.kwargs:
        x, w, offs = node.args
    elif t.namespace == "aten" and t._opname == "_grouped_mm":
        args = list(node.args) + [None] * (5 - len(node.args))
        x, w, offs, bias, out_dtype = args[:5]
        offs = node.kwargs.get("offs", offs)
        if node.kwargs.get("bias", bias) is not None or node.kwargs.get("out_dtype", out_dtype) is not None:
            return None
    else:
        return None
    if not all(isinstance(a, fx.Node) for a in (x, w, offs)):
        return None
    xv, wv = x.meta.get("val"), w.meta.get("val")
    if not isinstance(xv, torch.Tensor) or xv.dim() != 2 or not isinstance(wv, torch.Tensor) or wv.dim() != 3:
        return None
    return x, w, offs


def is_last_two_transpose(node: fx.Node) -> bool:
    """``aten.transpose(w, -2, -1)`` (or ``1, 2``) of a 3-D tensor: ``[E, N, K]`` read as ``[E, K, N]``."""
    return (node.op == "call_function" and node.target is aten.transpose.int
            and sorted(d % 3 for d in node.args[1:3]) == [1, 2])


__all__ = ["grouped_mm_operands", "is_last_two_transpose"]
