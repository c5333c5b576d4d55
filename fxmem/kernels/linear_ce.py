"""Chunked linear + cross-entropy: the loss of ``hidden @ weight.T (+ bias)`` without whole logits.

``fxmem::linear_cross_entropy(hidden [N, d], weight [V, d], bias [V]?, target [N] int, ...)``
returns ``(loss, grad_hidden, grad_weight, grad_bias)`` — a ``torch.library`` custom op with a
fake implementation (so AOTAutograd and Inductor trace and compile around it) and an autograd
formula (``register_autograd``). It computes exactly what

    logits = F.linear(hidden, weight, bias)               # [N, V], hidden's dtype
    logits = softcap * torch.tanh(logits / softcap)       # only when softcap > 0 (Gemma 2)
    logits = logits.float()                               # only when upcast=True
    loss = F.cross_entropy(logits, target, ignore_index=..., reduction=..., label_smoothing=...)

computes, up to float rounding, but walks the rows ``chunk_tokens`` at a time: only one chunk's
logits exist at a time, and its softmax and logit gradient overwrite them in place
(:func:`workspace_bytes` counts what a chunk holds).

The gradients are computed in the forward loop, at the same time as the loss (what Liger's
``FusedLinearCrossEntropy`` does): for a mean or sum reduction the loss is a scalar, so the
gradient of ``hidden`` and ``weight`` for an upstream gradient ``g`` is ``g`` times the gradient
for ``g = 1``. Computing them in the forward costs three matmuls per chunk (logits, dlogits @ W,
dlogits.T @ h) — the same three as the unchunked forward + backward — where recomputing the
logits in the backward would cost a fourth (+33 % of the head's FLOPs, which dominate a small
model with a large vocabulary). The price is that ``grad_hidden`` ``[N, d]`` and ``grad_weight``
``[V, d]`` are held from the forward to the backward (the size of the input and of the weight,
~V/d times smaller than the logits). A gradient that is not needed (``grad_hidden=False``,
e.g. a frozen head) is not computed and comes back as an empty tensor.

Per row ``i`` with target ``t`` (not ignored), ``x = logits[i]``, ``lse = logsumexp(x)``,
``eps = label_smoothing``:

    loss_i = lse - (1 - eps) * x[t] - eps / V * sum_j x[j]
    dloss_i / dx = softmax(x) - (1 - eps) * onehot(t) - eps / V

which is PyTorch's ``(1 - eps) * nll + eps * smooth`` with ``smooth = -mean_j log_softmax(x)_j``.
With soft-capping (``softcap = c > 0``, Gemma 2's ``final_logit_softcapping``) ``x = c·tanh(z / c)``
of the head's output ``z``, computed in place in the logits' own dtype before any upcast (as the
model computes it), and the gradient of ``z`` is that of ``x`` times ``1 - tanh(z / c)²``: one more
``[chunk, V]`` buffer per chunk, kept from the cap to the gradient.
``mean`` divides by the number of rows not ignored (NaN when every row is ignored, as eager).
The gradient of the logits is cast to ``hidden``'s dtype before its two matmuls, as eager's
backward does; ``grad_weight`` accumulates over chunks in fp32 and is cast to ``weight``'s dtype
at the end.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils import flop_counter

from fxmem.analysis.cost import register_internal_bytes
from fxmem.analysis.workspace import cpu_matmul_widens
from fxmem.kernels import direct, linear_ce_triton

REDUCTIONS = ("mean", "sum")


MIN_CHUNK_LOGIT_BYTES = 32 * 2**20
"""A chunk's fp32 logits are at least this large (rows rounded down to a power of two, and never
fewer than 64 rows). Why: each chunk costs a fixed handful of kernel launches (its matmuls, the
softmax/gradient kernel, the accumulations), each ~5–20 µs of host time. On a small model with a
large vocabulary (d 256, vocab 32k) Liger's rule alone gives 64-row chunks of 8 MiB, whose kernels
run in ~3 µs on an H100-class GPU, so the step waits on the host (the H200 measured fxmem's HF
Llama step at 3.5× torch.compile's with 32 such chunks; not broken down, see docs/passes/chunk.md).
32 MiB keeps each pass over a chunk ≥ ~10 µs of GPU memory traffic; on large models Liger's rule
already asks for bigger chunks, so the floor changes nothing there."""

MIN_CHUNKS = 8
"""The byte floor never makes fewer chunks than this: the loss still never holds more than 1/8 of
the logits (small shapes, where 32 MiB would be all of them, keep chunking)."""


def _pow2_floor(x: int) -> int:
    return 1 << (max(1, x).bit_length() - 1)


def auto_chunk_tokens(n_rows: int, vocab: int, hidden: int) -> int:
    """Rows per chunk so that a chunk's logits are about the size of the hidden states.

    Liger's rule (``next_power_of_2(N / ceil(V / d))``), with a floor of
    :data:`MIN_CHUNK_LOGIT_BYTES` of fp32 logits — but not above ``N / MIN_CHUNKS`` rows — so that
    a chunk's kernels outlast their launches on small models; never fewer than 64 rows.
    """
    ratio = max(1, -(-vocab // max(hidden, 1)))
    rows = max(1, -(-n_rows // ratio))
    # the floor never leaves fewer than MIN_CHUNKS chunks: chunking still removes 7/8 of the logits
    floor_rows = min(_pow2_floor(MIN_CHUNK_LOGIT_BYTES // (4 * max(vocab, 1))), _pow2_floor(n_rows // MIN_CHUNKS))
    return max(64, floor_rows, 1 << (rows - 1).bit_length())


def _forward_impl(hidden: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor, ignore_index: int,
                  reduction: str, label_smoothing: float, upcast: bool, chunk_tokens: int, need_hidden: bool,
                  need_weight: bool, need_bias: bool, logits: Tensor | None = None, *,
                  use_kernel: bool | None = None, softcap: float = 0.0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The loop of the module docstring. ``logits`` (``[N, V]``, already computed for another use,
    and already soft-capped when ``softcap`` is set: the model's output) replaces each chunk's
    ``linear``: the loop then reads them instead of multiplying again (and never writes them).
    ``use_kernel``: each chunk's softmax and gradient by the Triton kernel
    (:mod:`fxmem.kernels.linear_ce_triton`) instead of ATen ops — ``None``: on CUDA tensors.

    Host time: a small model's step waits on the host, and every ATen call here costs a few µs of
    it (a launch on a GPU). What depends on the row alone — the safe target, the row's weight in
    the gradient, the ``scatter_add_`` source, the weight in the gradient's dtype — is computed once
    for all ``N`` rows before the loop (``[N, 1]`` vectors, no ``[N, V]`` one); each chunk writes its
    row losses into one ``[N, 1]`` buffer, summed once at the end; a single chunk takes no slices;
    given logits (never written) take one fused ``log_softmax`` per chunk.
    """
    n, d = hidden.shape
    vocab = weight.shape[0]
    same = hidden.dtype == weight.dtype  # torch.promote_types is a dispatcher call: skipped when it is not needed
    out_dtype = torch.float32 if upcast else (hidden.dtype if same else torch.promote_types(hidden.dtype, weight.dtype))
    compute_dtype = torch.float32 if upcast else (logits.dtype if logits is not None else out_dtype)
    chunk = chunk_tokens if chunk_tokens > 0 else auto_chunk_tokens(n, vocab, d)
    device = hidden.device
    targets = target.unsqueeze(1)  # [N, 1]: the shape of a row reduction with keepdim
    valid = targets != ignore_index
    # mean: each kept row weighs 1/count (a 0-dim tensor: no host sync, NaN when count == 0)
    row_scale = (valid.sum(dtype=torch.float32).reciprocal() if reduction == "mean"
                 else torch.ones((), dtype=torch.float32, device=device))
    row_losses = torch.empty(n, 1, dtype=torch.float32, device=device)  # [N, 1], the shape a row reduction keeps
    grad_h = torch.empty_like(hidden) if need_hidden else hidden.new_empty(0)
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else weight.new_empty(0)
    need_bias = need_bias and bias is not None
    grad_b = torch.zeros(vocab, dtype=torch.float32, device=weight.device) if need_bias else weight.new_empty(0)
    any_grad = need_hidden or need_weight or need_bias
    full_logits = logits
    # computed logits are 2-D and contiguous: only given ones can keep the kernel from running
    kernel = use_kernel if use_kernel is not None else hidden.is_cuda and (
        linear_ce_triton.available(hidden.device) if full_logits is None else linear_ce_triton.can_run(full_logits))
    if not kernel:  # what the ATen path needs of each row, for all rows at once
        # an ignored row's target reads column 0 (its loss is masked out); any other stays as it
        # is, so that one out of range still fails in the gather
        safe_targets = targets * valid
        if any_grad:
            # d loss / d logits of a row is scaled by its weight: 1/count (mean) or 1, 0 when ignored
            row_weights = torch.where(valid, row_scale, 0.0)
            row_weights = row_weights if compute_dtype == torch.float32 else row_weights.to(compute_dtype)
            onehot_step = torch.full((min(chunk, n), 1), -(1.0 - label_smoothing), dtype=compute_dtype, device=device)
    grad_dtype = hidden.dtype
    weight_for_grad = weight.to(grad_dtype) if need_hidden and weight.dtype != grad_dtype else weight

    def chunk_loss(start: int, stop: int) -> None:
        """Rows ``start:stop``: their losses go into ``row_losses``, their share of the gradients
        into ``grad_h``, ``grad_w``, ``grad_b``. A call of its own, so that the chunk's ``[chunk, V]``
        buffer is freed when it returns, before the next chunk's is allocated (a loop body's
        locals would hold it until reassigned — two chunks alive at once, measured: 62.5 MiB of
        workspace instead of 31.25 at 256 × 32k)."""
        whole = start == 0 and stop == n

        def rows(t: Tensor) -> Tensor:
            return t if whole else t[start:stop]

        h = rows(hidden)
        logits = torch.nn.functional.linear(h, weight, bias) if full_logits is None else rows(full_logits)
        capped = None  # 1 - tanh(z / c)², the soft-cap's derivative, in the compute dtype
        if softcap and full_logits is None:
            logits = logits.div_(softcap).tanh_()
            capped = one_minus_square(logits, 1.0, compute_dtype) if any_grad else None
            logits = logits.mul_(softcap)
        elif softcap and any_grad:  # given: they are c·tanh(z / c) already
            capped = one_minus_square(logits, softcap, compute_dtype)
        if upcast and logits.dtype != torch.float32:
            logits = logits.float()
        # the chunk's logits are ours to overwrite unless they are a slice of logits given to us
        owned = full_logits is None or logits.untyped_storage().data_ptr() != full_logits.untyped_storage().data_ptr()
        if kernel:
            # one Triton program per row: row losses, and the logits overwritten by their gradient
            logits = logits if owned else logits.clone()
            linear_ce_triton.cross_entropy_rows_(logits, rows(target), row_scale, ignore_index, label_smoothing,
                                                 out=rows(row_losses))
            dlogits = logits
        else:
            t = rows(safe_targets)
            # `work`: the chunk's one [chunk, V] buffer, exp(x - max) (its sums in `sums`) or log_softmax(x)
            if owned:
                # what the loss needs of the logits themselves is read first, so that the exp can
                # then be taken in place: one [chunk, V] buffer per chunk, not two (the logits and
                # their exp); one exp pass serves the log-sum-exp and the softmax
                picked = logits.gather(1, t)
                smooth = logits.sum(dim=1, keepdim=True) if label_smoothing else None
                peak = logits.amax(dim=1, keepdim=True)
                work = logits.sub_(peak).exp_()
                del logits
                sums = work.sum(dim=1, keepdim=True)
                # loss = lse - (1 - eps) x[t] - eps / V Σx, ignored rows included (masked at the end)
                loss_rows = torch.sub(sums.log().add_(peak), picked, alpha=1.0 - label_smoothing,
                                      out=rows(row_losses))
            else:
                # logits given (read, never written): the chunk's one buffer is their log-softmax,
                # in one fused call (five fewer per chunk than the in-place chain above); with
                # lp = log_softmax(x), loss = -(1 - eps) lp[t] - eps / V Σ lp, the same value
                work, sums = torch.log_softmax(logits, dim=1), None
                del logits
                loss_rows = torch.mul(work.gather(1, t), -(1.0 - label_smoothing), out=rows(row_losses))
                smooth = work.sum(dim=1, keepdim=True) if label_smoothing else None
            if smooth is not None:
                loss_rows.sub_(smooth, alpha=label_smoothing / vocab)
            if not any_grad:
                return
            # d loss / d logits = softmax - (1 - eps) onehot - eps / V, times the row's weight
            dlogits = work.div_(sums) if sums is not None else work.exp_()
            dlogits.scatter_add_(1, t, onehot_step if stop - start == onehot_step.shape[0] else onehot_step[:stop - start])
            if label_smoothing:
                dlogits.sub_(label_smoothing / vocab)
            dlogits.mul_(rows(row_weights))
        if not any_grad:
            return
        if capped is not None:
            dlogits.mul_(capped)
        if dlogits.dtype != grad_dtype:
            dlogits = dlogits.to(grad_dtype)
        _accumulate(dlogits, h, weight_for_grad, rows(grad_h) if need_hidden else grad_h, grad_w, grad_b,
                    need_hidden, need_weight, need_bias)

    for start in range(0, n, chunk):
        chunk_loss(start, min(start + chunk, n))
    total = torch.where(valid, row_losses, 0.0).sum()
    loss = total * row_scale if reduction == "mean" else total
    if need_weight and grad_w.dtype != weight.dtype:
        grad_w = grad_w.to(weight.dtype)
    if grad_b.numel() and grad_b.dtype != bias.dtype:
        grad_b = grad_b.to(bias.dtype)
    return (loss if loss.dtype == out_dtype else loss.to(out_dtype)), grad_h, grad_w, grad_b


def one_minus_square(values: Tensor, scale: float, dtype: torch.dtype) -> Tensor:
    """``1 - (values / scale)²`` as a new ``dtype`` tensor: one buffer, the rest in place."""
    out = values.to(dtype, copy=True)
    if scale != 1.0:
        out.div_(scale)
    return out.square_().neg_().add_(1.0)


def workspace_bytes(chunk: int, vocab: int, d: int, *, hidden_dtype: torch.dtype, weight_dtype: torch.dtype,
                    upcast: bool, need_grad: bool, need_weight: bool, need_bias: bool = False,
                    logits_given: bool = False, on_cpu: bool = True, softcap: bool = False) -> int:
    """The most bytes the op holds at once beyond its inputs and outputs: one chunk's
    ``[chunk, V]`` block (``V = vocab``), whether the logits are computed per chunk or given, and
    the fp32 accumulators of ``grad_weight`` and ``grad_bias`` beyond their outputs' bytes (a
    narrower weight's gradient is cast to its dtype at the end).

    Per element, in the logits' dtype ``L = promote(hidden, weight)``, compute dtype ``C`` (fp32
    under ``upcast``, else ``L``) and ``H = hidden``'s dtype: the chunk's logits (computed, or
    ``logits - max`` of a given slice) are one ``C`` buffer, which the exp, the softmax and its
    gradient overwrite in place; ``upcast`` from a narrower ``L`` holds the ``L`` logits beside
    their fp32 copy for a moment. With a gradient: its cast to ``H`` (when ``C ≠ H``) beside
    it, and the fp32 copy ``grad_weight``'s ``addmm_`` (or ``grad_bias``'s sum) reads when ``H`` is
    not fp32, with that chunk's ``[chunk, d]`` hidden rows in fp32 for the ``addmm_``. Checked
    against the allocator in ``tests/kernels/test_linear_ce.py`` (fp32 and bf16, upcast or not,
    logits given or computed, with and without grads, soft-capped or not).

    Soft-capping with a gradient keeps ``1 - tanh²`` (compute dtype) beside the chunk's logits from
    the cap to the gradient.
    """
    f32 = 4
    logits_dtype = torch.promote_types(hidden_dtype, weight_dtype)
    compute_dtype = torch.float32 if upcast else logits_dtype
    per_element = compute_dtype.itemsize
    widens = on_cpu and cpu_matmul_widens(logits_dtype)
    if logits_dtype != torch.float32 and not logits_given and (widens or compute_dtype != logits_dtype):
        # our own logits beside an fp32 copy for a moment: their upcast, or (on a CPU whose bf16
        # matmul widens) the fp32 result ATen accumulates into before it rounds into the output
        per_element = logits_dtype.itemsize + f32
    extra_rows = 0
    if need_grad:
        cast = hidden_dtype.itemsize if compute_dtype != hidden_dtype else 0
        weight_copy = f32 if (need_weight or need_bias) and hidden_dtype != torch.float32 else 0
        per_element = max(per_element, compute_dtype.itemsize + cast + weight_copy)
        extra_rows = chunk * d * f32 if need_weight and weight_copy else 0
    if softcap and need_grad:
        per_element += compute_dtype.itemsize
    accumulators = 0
    if need_grad and weight_dtype != torch.float32:
        accumulators = (vocab * d * int(need_weight) + vocab * int(need_bias)) * (f32 - weight_dtype.itemsize)
    return chunk * vocab * per_element + extra_rows + accumulators


def _accumulate(dlogits: Tensor, h: Tensor, weight: Tensor, grad_h_rows: Tensor, grad_w: Tensor, grad_b: Tensor,
                need_hidden: bool, need_weight: bool, need_bias: bool) -> None:
    """A chunk's share of the gradients: ``dlogits @ W`` into its rows of ``grad_h`` (``weight``
    already in ``dlogits``' dtype); ``dlogits.T @ h`` and ``Σ dlogits`` added to ``grad_w`` and
    ``grad_b`` (fp32)."""
    if need_hidden:  # written into its rows: no [chunk, d] temporary and copy
        torch.mm(dlogits, weight, out=grad_h_rows)
    if need_weight:
        grad_w.addmm_(dlogits.t().float() if dlogits.dtype != torch.float32 else dlogits.t(),
                      h.float() if h.dtype != torch.float32 else h)
    if need_bias:
        grad_b.add_(dlogits.float().sum(0))


def _linear_cross_entropy(hidden: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor, ignore_index: int,
                          reduction: str, label_smoothing: float, upcast: bool, chunk_tokens: int, need_hidden: bool,
                          need_weight: bool, need_bias: bool, softcap: float = 0.0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(loss, grad_hidden, grad_weight, grad_bias)``; see the module docstring."""
    check_arguments("linear_cross_entropy", reduction, softcap)
    return _forward_impl(hidden, weight, bias, target, ignore_index, reduction, label_smoothing, upcast,
                         chunk_tokens, need_hidden, need_weight, need_bias, softcap=softcap)


def check_arguments(op: str, reduction: str, softcap: float) -> None:
    """The two arguments the op refuses: a reduction it does not chunk and a negative cap."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"fxmem::{op}: reduction {reduction!r}; accepted: {REDUCTIONS}")
    if softcap < 0:
        raise ValueError(f"fxmem::{op}: softcap {softcap!r}; accepted: 0 (none) or a positive cap")


linear_cross_entropy = torch.library.custom_op("fxmem::linear_cross_entropy", mutates_args=())(_linear_cross_entropy)


@linear_cross_entropy.register_fake
def _linear_cross_entropy_fake(hidden, weight, bias, target, ignore_index, reduction, label_smoothing, upcast,
                               chunk_tokens, need_hidden, need_weight, need_bias, softcap=0.0):
    out_dtype = torch.float32 if upcast else torch.promote_types(hidden.dtype, weight.dtype)
    loss = hidden.new_empty((), dtype=out_dtype)
    grad_h = torch.empty_like(hidden) if need_hidden else hidden.new_empty(0)
    grad_w = torch.empty_like(weight) if need_weight else weight.new_empty(0)
    grad_b = torch.empty_like(bias) if (need_bias and bias is not None) else weight.new_empty(0)
    return loss, grad_h, grad_w, grad_b


def save_loss_gradients(ctx, output, need_hidden: bool, need_weight: bool, need_bias: bool) -> None:
    """Keep the gradients the forward computed (for ``g_loss = 1``) for :func:`scaled_loss_gradients`."""
    _loss, grad_h, grad_w, grad_b = output
    ctx.mark_non_differentiable(grad_h, grad_w, grad_b)
    ctx.save_for_backward(grad_h, grad_w, grad_b)
    ctx.flags = (need_hidden, need_weight, need_bias)


def scaled_loss_gradients(ctx, g_loss) -> tuple:
    """``(grad_hidden, grad_weight, grad_bias)`` for the upstream gradient ``g_loss``; None where not needed."""
    grad_h, grad_w, grad_b = ctx.saved_tensors
    need_hidden, need_weight, need_bias = ctx.flags
    # the loss is a scalar: its gradient is g_loss times the gradient computed for g_loss = 1
    return (grad_h * g_loss if need_hidden else None,
            grad_w * g_loss if need_weight else None,
            grad_b * g_loss if need_bias else None)


def _setup_context(ctx, inputs, output):
    save_loss_gradients(ctx, output, inputs[9], inputs[10], inputs[11] and inputs[2] is not None)


def _backward(ctx, g_loss, _g_h, _g_w, _g_b):
    return (*scaled_loss_gradients(ctx, g_loss), None, None, None, None, None, None, None, None, None, None)


linear_cross_entropy.register_autograd(_backward, setup_context=_setup_context)


@flop_counter.register_flop_formula(torch.ops.fxmem.linear_cross_entropy)
def _flops(hidden_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:
    """One matmul for the logits, two more for the gradients (when any is asked for).

    Registered with ``torch.utils.flop_counter`` so that FlopCounterMode counts the op and
    partitioners that price recomputation by FLOPs (fxmem's remat) never recompute it in the
    backward as if it were free.
    """
    n, d = hidden_shape
    vocab = weight_shape[0]
    need_hidden, need_weight = args[7], args[8]
    return 2 * n * d * vocab * (1 + int(need_hidden) + int(need_weight))


def internal_bytes_moved(n: int, vocab: int, d: int, *, hidden_itemsize: int, upcast: bool, label_smoothing: float,
                         chunk_tokens: int, need_hidden: bool, need_weight: bool, need_bias: bool,
                         triton: bool, softcap: bool = False) -> int:
    """Bytes :func:`_forward_impl` moves beyond reading its inputs and writing its outputs once:
    what a cost model must charge for the loop (its logits never leave it, but each chunk's
    ``[chunk, V]`` logits are written and read again by every step below). Counted pass by pass
    from the loop above, in units of one chunk's logits (``L``, in the compute dtype):

    ATen (CPU): linear writes ``L``; upcast reads and writes; amax reads; ``sub_`` and ``exp_``
    read and write in place; sum reads (7 passes: the loss); with gradients ``div_`` and ``mul_``
    read and write, the cast to the hidden dtype reads and writes when it differs, the two
    gradient matmuls read (13 passes in fp32). Triton (CUDA): linear writes; the row kernel reads
    and writes in place; the same cast and matmul reads. Soft-capping: ``div_``, ``tanh_`` and
    ``mul_`` in place on the logits (in their own dtype); with gradients its derivative is copied
    out, squared, negated and shifted in place, and read again by the gradient's ``mul_``. Per chunk the weight is read by the
    linear and by the ``grad_hidden`` matmul, and the fp32 ``grad_weight`` accumulator is read and
    written by its ``addmm_``.
    """
    chunk = chunk_tokens if chunk_tokens > 0 else auto_chunk_tokens(n, vocab, d)
    chunks = -(-n // max(chunk, 1))
    itemsize = 4 if upcast else hidden_itemsize
    logits = n * vocab * itemsize                     # all chunks' logits together, in the compute dtype
    passes = 1.0                                      # the linear writes them
    if upcast and hidden_itemsize != 4:
        passes += hidden_itemsize / 4 + 1             # .float(): read the low-precision copy, write fp32
    any_grad = need_hidden or need_weight or need_bias
    if softcap:
        low_logits = hidden_itemsize / itemsize       # the cap runs in the logits' own dtype
        passes += 6 * low_logits                      # div_, tanh_, mul_: read and write
        if any_grad:
            passes += low_logits + 1 + 6 + 3          # copy out; square_, neg_, add_; the gradient's mul_
    if triton:
        passes += 2                                   # one program per row: read, write the gradient in place
    else:
        passes += 1 + 2 + 2 + 1                       # amax; sub_; exp_; sum
        passes += 1 if label_smoothing else 0         # logits.sum for the smoothing term
        if any_grad:
            passes += 2 + 2 + (2 if label_smoothing else 0)   # div_; mul_; sub_ (smoothing)
    if any_grad:
        if itemsize != hidden_itemsize:
            passes += 1 + hidden_itemsize / itemsize  # dlogits.to(hidden.dtype)
        low = hidden_itemsize / itemsize
        passes += low * (int(need_hidden) + int(need_weight) + int(need_bias))  # the gradient matmuls (and sum) read
        if need_weight and hidden_itemsize != 4:
            passes += low + 4 / itemsize              # dlogits.t().float() for the fp32 accumulation
    weight = vocab * d * hidden_itemsize
    per_chunk = weight * (1 + int(need_hidden)) + (2 * vocab * d * 4 if need_weight else 0)
    return int(passes * logits) + chunks * per_chunk


def _internal_bytes(node) -> int:
    """:func:`internal_bytes_moved` for a ``fxmem::linear_cross_entropy`` node of an FX graph."""
    hidden, weight = (a.meta.get("val") for a in node.args[:2])
    if not isinstance(hidden, Tensor) or not isinstance(weight, Tensor):
        return 0
    args = list(node.args) + [None] * (13 - len(node.args))
    (label_smoothing, upcast, chunk_tokens, need_hidden, need_weight, need_bias, softcap) = args[6:13]
    return internal_bytes_moved(int(hidden.shape[0]), int(weight.shape[0]), int(hidden.shape[-1]),
                                hidden_itemsize=hidden.element_size(), upcast=bool(upcast),
                                label_smoothing=float(label_smoothing or 0.0), chunk_tokens=int(chunk_tokens or 0),
                                need_hidden=bool(need_hidden), need_weight=bool(need_weight),
                                need_bias=bool(need_bias) and args[2] is not None,
                                triton=hidden.device.type == "cuda" and linear_ce_triton.triton is not None,
                                softcap=bool(softcap))


register_internal_bytes(torch.ops.fxmem.linear_cross_entropy, _internal_bytes)
# what compiled graphs call instead (fxmem.kernels.direct): the same kernel without custom_op's layers
direct.register(torch.ops.fxmem.linear_cross_entropy.default, {None: _linear_cross_entropy},
                _linear_cross_entropy_fake)


def chunked_linear_cross_entropy(hidden: Tensor, weight: Tensor, target: Tensor, bias: Tensor | None = None, *,
                                 ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
                                 upcast: bool = False, chunk_tokens: int = 0, softcap: float = 0.0) -> Tensor:
    """The loss alone, differentiable: ``cross_entropy(linear(hidden, weight, bias)[.float()], target)``,
    the logits soft-capped first (``softcap · tanh(logits / softcap)``) when ``softcap > 0``.

    ``hidden`` is ``[N, d]``, ``target`` ``[N]``; ``chunk_tokens=0`` picks :func:`auto_chunk_tokens`.
    """
    need_bias = bias is not None and bias.requires_grad
    return linear_cross_entropy(hidden, weight, bias, target, ignore_index, reduction, float(label_smoothing), upcast,
                                chunk_tokens, hidden.requires_grad, weight.requires_grad, need_bias, float(softcap))[0]
