"""What an op allocates inside itself, beyond its inputs and outputs: the bytes the graph does not show.

Read-only. :func:`fxmem.analysis.timeline.step_timeline` adds an op's workspace on top of the
live bytes where the op runs, so ``explain``'s peak, remat's peak guard and ``fxmem.fit`` all
count it. Each figure is checked against the allocator: the chunked loss in
``tests/kernels/test_linear_ce.py``, the chunked MLP in ``tests/kernels/test_chunked_mlp.py``,
a CPU convolution in ``tests/test_fit.py``.

Before (the timeline of HF GPT-2, B 4 × T 512, with the chunked loss): the estimated peak 0.85
of the measured one — the loss op's workspace missing (two ``[256, 32000]`` fp32 chunks then,
62.5 MiB; one since each chunk is freed before the next). After: that chunk on top of the live
bytes where the loss op runs, 1.000 of the measured peak.
"""

from __future__ import annotations

import torch
import torch.fx as fx


def cpu_matmul_widens(dtype: torch.dtype) -> bool:
    """ATen's CPU matmul in ``dtype`` writes an fp32 ``[M, N]`` result first and rounds it into its
    output: one fp32 buffer of the output's size more, for the matmul's duration.

    bf16 does where oneDNN has no bf16 kernel for this CPU (no AVX-512 BF16 / AMX): ATen then goes
    through MKL's bf16 GEMM, which accumulates into fp32. Measured with torch 2.13: a
    ``[128, 32] × [32, 4096]`` bf16 ``F.linear`` peaks at its output plus 2 MiB of fp32 on the earlier
    development and CI machines (``tests/kernels/test_linear_ce.py`` held it there), at its output
    plus oneDNN's packing scratch (37 KiB) on an AMD EPYC with AVX-512 BF16, where
    ``torch.ops.mkldnn._is_mkldnn_bf16_supported()`` is true. fp16 measured there at its output alone.
    """
    return dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported()


def op_workspace(node: fx.Node, copies: bool = True) -> int:
    """Bytes an op allocates inside itself, beyond its outputs (what the graph does not show).

    * ``fxmem::linear_cross_entropy`` and ``fxmem::logits_cross_entropy`` hold one chunk's
      logits, overwritten in place by their softmax and its gradient (``chunk_tokens × vocab``
      fp32 values), and more in a narrower dtype (:func:`fxmem.kernels.linear_ce.workspace_bytes`).
    * ``fxmem::chunked_mlp`` holds one chunk's projections and every value of its activation
      program, and the chunk's down projection before it is copied into the output
      (:func:`fxmem.kernels.chunked_mlp.forward_workspace_bytes`).
    * a convolution on the CPU: oneDNN's weight reorder and scratchpad, and Inductor's
      channels-last copies of its graph inputs (``copies``; :func:`_cpu_conv_workspace`).
    """
    if node.op != "call_function":
        return 0
    if node.target in (torch.ops.aten.convolution.default, torch.ops.aten.convolution_backward.default):
        return _cpu_conv_workspace(node, copies)
    target = str(node.target)
    if "chunked_mlp" in target and "backward" not in target:
        from fxmem.kernels.chunked_mlp import forward_workspace_bytes

        vals = [a.meta.get("val") if isinstance(a, fx.Node) else a for a in node.args]
        return forward_workspace_bytes(*vals) if isinstance(vals[0], torch.Tensor) else 0
    if "linear_cross_entropy" in target or "logits_cross_entropy" in target:
        return _chunked_loss_workspace(node, logits_given="logits_cross_entropy" in target)
    return 0


def _chunked_loss_workspace(node: fx.Node, logits_given: bool) -> int:
    """``fxmem::linear_cross_entropy`` / ``fxmem::logits_cross_entropy`` (its arguments shifted by
    the given logits): :func:`fxmem.kernels.linear_ce.workspace_bytes` for the node's shapes,
    dtypes, chunk and the gradients it makes."""
    from fxmem.kernels.linear_ce import auto_chunk_tokens, workspace_bytes

    args = node.args[1:] if logits_given else node.args
    hidden, weight = (a.meta.get("val") if isinstance(a, fx.Node) else None for a in args[:2])
    if not isinstance(hidden, torch.Tensor) or not isinstance(weight, torch.Tensor):
        return 0
    rows, d = int(hidden.shape[0]), int(hidden.shape[-1])
    vocab = int(weight.shape[0])
    chunk = args[8] if len(args) > 8 and isinstance(args[8], int) and args[8] > 0 else 0
    chunk = min(rows, chunk or auto_chunk_tokens(rows, vocab, d))
    need_hidden, need_weight, need_bias = (bool(a) for a in args[9:12])
    has_bias = isinstance(args[2], fx.Node)
    return workspace_bytes(chunk, vocab, d, hidden_dtype=hidden.dtype, weight_dtype=weight.dtype,
                           upcast=bool(args[7]), need_grad=need_hidden or need_weight or (need_bias and has_bias),
                           need_weight=need_weight, need_bias=need_bias and has_bias, logits_given=logits_given,
                           on_cpu=hidden.device.type == "cpu", softcap=bool(args[12]) if len(args) > 12 else False)


# oneDNN's convolution scratchpad on the CPU: a fixed page plus one per thread, whatever the
# shape (measured with torch 2.13's oneDNN on x86: 8216 B at 1 thread, 12336 at 2, 20576 at 4,
# for 3×3 and 5×5 kernels from 3 to 256 channels; its backward 128 B more per thread)
_ONEDNN_SCRATCH_BASE, _ONEDNN_SCRATCH_PER_THREAD = 4096, 4120


def _cpu_conv_workspace(node: fx.Node, copies: bool = True) -> int:
    """What a convolution allocates on the CPU beside its outputs when Inductor runs it.

    Inductor always lays a CPU graph with convolutions out channels-last
    (``GraphLowering.decide_layout_opt``, where mkldnn is available): it copies each weight that is
    not channels-last, and a graph input it convolves, to channels-last before the op, and frees
    the copies after it. Inside, oneDNN reorders a spatial kernel's weight into its blocked format
    (one weight's bytes; twice in the backward) and takes a scratchpad. A 1×1 kernel runs as a
    plain matmul: no reorder, no scratchpad. Measured against the allocator on the ``conv_norm``
    sample (docs/fit.md); 0 off the CPU (cuDNN's workspaces are not modelled). ``copies=False``:
    leave the channels-last copies out — in training Inductor saves them for the backward
    instead of freeing them (:func:`fxmem.analysis.timeline.step_timeline` holds them there).
    """
    vals = [a.meta.get("val") if isinstance(a, fx.Node) else None for a in node.args[:3]]
    backward = node.target is torch.ops.aten.convolution_backward.default
    x, w = (vals[1], vals[2]) if backward else (vals[0], vals[1])
    if not isinstance(x, torch.Tensor) or not isinstance(w, torch.Tensor) or x.device.type != "cpu" or w.dim() != 4:
        return 0
    if not (torch.backends.mkldnn.enabled and torch.backends.mkldnn.is_available()):
        return 0
    w_bytes = w.numel() * w.element_size()
    workspace = sum(layout_copies(node).values()) if copies and not backward else 0
    if w.shape[2] * w.shape[3] > 1:
        threads = torch.get_num_threads()
        workspace += (2 if backward else 1) * w_bytes + _ONEDNN_SCRATCH_BASE + _ONEDNN_SCRATCH_PER_THREAD * threads
    return workspace


def layout_copies(node: fx.Node) -> dict[fx.Node, int]:
    """The graph inputs a CPU convolution reads that Inductor copies to channels-last: its weight
    and its data where they are placeholders not laid out channels-last (what a kernel of Inductor's
    produces already is). None without oneDNN: Inductor's CPU layout rule
    (``GraphLowering.decide_layout_opt``) needs it."""
    copies = {}
    if not (torch.backends.mkldnn.enabled and torch.backends.mkldnn.is_available()):
        return copies
    for arg in node.args[:2]:
        val = arg.meta.get("val") if isinstance(arg, fx.Node) else None
        if (isinstance(val, torch.Tensor) and val.dim() == 4 and val.device.type == "cpu" and arg.op == "placeholder"
                and not val.is_contiguous(memory_format=torch.channels_last)):
            copies[arg] = val.numel() * val.element_size()
    return copies
