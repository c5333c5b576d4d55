"""Int8 linear: a hand-written Triton weight-only int8 matmul, its ATen paths, and the ops.

The ops (``torch.library`` custom ops, each with a fake implementation so graphs that use them
stay traceable, exportable and compilable by Inductor):

* ``fxmem::int8_linear(x, qweight, scales, bias, mode) -> y`` computes ``x @ W.T + bias`` where
  ``W = qweight * scales`` (``qweight``: int8 ``[N, K]``; ``scales``: fp32 ``[N]`` per output
  channel, or ``[N, K // group_size]`` per group). ``x`` is ``[..., K]`` in fp32/fp16/bf16 and
  ``y`` has ``x``'s dtype.

  - ``mode="weight_only"``: on CUDA the Triton kernel below (int8 tiles dequantized to the compute
    dtype inside the K loop, the per-channel scale applied once in the epilogue); elsewhere
    ``torch._weight_int8pack_mm`` (CPU, bf16, per channel, K % 16 == 0: where it is correct and
    fast) or the ATen form torchao's ``Int8WeightOnlyConfig`` uses,
    ``mm(x, qweight.T.to(x.dtype)) * scales``.
  - ``mode="dynamic"``: per-token symmetric int8 activations, int32 accumulation with
    ``torch._int_mm`` (CPU: any shape; CUDA: K, N multiples of 8, M padded with zero rows to 17
    when smaller; otherwise an exact float64 accumulation of the same integers), fp32 rescaling
    (int32 sums reach 127²·K, beyond fp16's range), then cast back to ``x``'s dtype.

* ``fxmem::int8_embedding(qweight, scales, indices, dtype) -> rows``: ``embedding(W, indices)``
  for the same int8 ``W``, so a weight tied between an embedding and an output projection keeps
  one int8 buffer.

The Triton kernel uses only ``tl.*`` so it runs under ``TRITON_INTERPRET=1`` on the CPU (tests).
Triton reads ``TRITON_INTERPRET`` when a function is decorated with ``triton.jit``, so the kernel
is decorated on first use (:func:`jitted_kernel`), once per interpreter setting, rather than at
import: importing fxmem never fixes the mode for the rest of the process. For the same reason the
kernel calls only ``tl`` builtins (``tl.full``, not the ``@triton.jit`` library function
``tl.zeros``, which is decorated when triton is first imported): it then runs under the
interpreter even when triton was imported before ``TRITON_INTERPRET=1`` was set.
"""

from __future__ import annotations

import inspect

import torch

from fxmem.kernels import direct, interpreter
from fxmem.kernels.row_blocks import blocked_linear

try:  # Triton is optional: without it the ops run their ATen paths everywhere.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is installed with torch on Linux
    triton = None
    tl = None

QMAX = 127  # symmetric int8: [-127, 127], so that -q never overflows and 0 is exact


# ---------------------------------------------------------------------------------------------
# Quantization of a weight (done once, at compile time, by the int8 pass).
# ---------------------------------------------------------------------------------------------


def quantize_weight(weight: torch.Tensor, group_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 quantization of a ``[N, K]`` weight: ``(qweight int8 [N, K], scales fp32)``.

    ``scales`` is ``[N]`` (one per output channel, ``group_size=None``) or ``[N, K // group_size]``.
    ``scale = amax(|w|) / 127`` over the channel (group); an all-zero channel gets scale 1 so that
    it dequantizes to exact zeros.
    """
    w = weight.detach().to(torch.float32)
    n, k = w.shape
    if group_size is None:
        amax = w.abs().amax(dim=1)
        scales = torch.where(amax > 0, amax / QMAX, torch.ones_like(amax))
        q = torch.round(w / scales[:, None]).clamp_(-QMAX, QMAX).to(torch.int8)
        return q.contiguous(), scales.contiguous()
    if k % group_size:
        raise ValueError(f"int8 per-group quantization: K={k} is not a multiple of group_size={group_size}")
    wg = w.reshape(n, k // group_size, group_size)
    amax = wg.abs().amax(dim=2)
    scales = torch.where(amax > 0, amax / QMAX, torch.ones_like(amax))
    q = torch.round(wg / scales[:, :, None]).clamp_(-QMAX, QMAX).to(torch.int8).reshape(n, k)
    return q.contiguous(), scales.contiguous()


def dequantize_weight(qweight: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``qweight * scales`` as a ``[N, K]`` tensor of ``dtype`` (the reference the kernels match)."""
    n, k = qweight.shape
    if scales.dim() == 1:
        return (qweight.to(torch.float32) * scales[:, None]).to(dtype)
    groups = scales.shape[1]
    w = qweight.reshape(n, groups, k // groups).to(torch.float32) * scales[:, :, None]
    return w.reshape(n, k).to(dtype)


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio ``10·log10(‖ref‖² / ‖ref − approx‖²)`` in dB (inf if exact)."""
    ref = reference.detach().to(torch.float64)
    noise = (ref - approx.detach().to(torch.float64)).pow(2).sum()
    signal = ref.pow(2).sum()
    if noise == 0:
        return float("inf")
    return float(10.0 * torch.log10(signal / noise))


# ---------------------------------------------------------------------------------------------
# The Triton kernel (weight-only): y[M, N] = (x[M, K] @ dequant(q[N, K]).T) (+ bias)
# ---------------------------------------------------------------------------------------------


def int8_weight_only_matmul_kernel(
    x_ptr, w_ptr, s_ptr, b_ptr, o_ptr,
    M, N, K, K_PER_SPLIT,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_sn, stride_sg, stride_os, stride_om, stride_on,
    GROUP_SIZE: tl.constexpr, PER_GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    # grid (M tiles, N tiles, K splits): program (i, j, s) sums columns [s·K_PER_SPLIT, (s+1)·K_PER_SPLIT)
    # into slice s of the output (several splits: fp32 partials the wrapper adds up; decode M)
    pid_k = tl.program_id(2)
    k_start = pid_k * K_PER_SPLIT
    k_end = tl.minimum(k_start + K_PER_SPLIT, K)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    # tl.full, not tl.zeros: tl.zeros is itself a @triton.jit function, decorated when triton is
    # imported, so the interpreter cannot call it unless TRITON_INTERPRET was set before that import
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        kk = k0 + rk
        x = tl.load(x_ptr + rm[:, None] * stride_xm + kk[None, :] * stride_xk,
                    mask=(rm[:, None] < M) & (kk[None, :] < k_end), other=0.0)
        # the weight tile is read as int8 (a quarter of fp32's bytes) and dequantized here, in
        # registers: int8 → compute dtype is exact for |q| ≤ 127
        w = tl.load(w_ptr + kk[:, None] * stride_wk + rn[None, :] * stride_wn,
                    mask=(kk[:, None] < k_end) & (rn[None, :] < N), other=0)
        part = tl.dot(x, w.to(x.dtype), input_precision=DOT_PRECISION)
        if PER_GROUP:
            # BLOCK_K divides GROUP_SIZE (checked by can_lower): the whole K tile has one scale
            s = tl.load(s_ptr + rn * stride_sn + (k0 // GROUP_SIZE) * stride_sg, mask=rn < N, other=0.0)
            acc += part * s[None, :]
        else:
            acc += part
    if not PER_GROUP:
        # per-channel: the scale factors out of the K sum, so it is applied once, in the epilogue
        s = tl.load(s_ptr + rn * stride_sn, mask=rn < N, other=0.0)
        acc = acc * s[None, :]
    if HAS_BIAS:
        # once, in split 0 (rn + pid_k·N < N: rn < N there, false in the other splits)
        b = tl.load(b_ptr + rn, mask=rn + pid_k * N < N, other=0.0)
        acc += b.to(tl.float32)[None, :]
    tl.store(o_ptr + pid_k * stride_os + rm[:, None] * stride_om + rn[None, :] * stride_on,
             acc.to(o_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


KERNEL_NAME = "fxmem_int8_weight_only_matmul"


def kernel_source() -> str:
    """The kernel's Triton source (shown in ``report.kernels``)."""
    return inspect.getsource(int8_weight_only_matmul_kernel)


def interpreting() -> bool:
    """True when a kernel decorated now runs in Triton's CPU interpreter (``TRITON_INTERPRET``,
    read by :func:`fxmem.kernels.interpreter.requested`)."""
    return interpreter.requested()


def jitted_kernel():
    """``triton.jit(int8_weight_only_matmul_kernel)`` for the current ``TRITON_INTERPRET`` setting."""
    return interpreter.jit(int8_weight_only_matmul_kernel, "int8 kernel")


_COMPUTE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _block_k(k: int, group_size: int | None) -> int:
    block = 64 if group_size is None else min(64, group_size)
    return block if k >= block else max(16, triton.next_power_of_2(k))


def can_lower(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """Whether the Triton kernel computes ``int8_linear(x, qweight, scales, bias, 'weight_only')``.

    Needs Triton able to run (a CUDA tensor, or the CPU interpreter), a float compute dtype, 2-D
    int8 weight, and, per group, a power-of-two group size ≥ 16 (a K tile then never straddles
    two groups).
    """
    if triton is None or x.dtype not in _COMPUTE_DTYPES or qweight.dtype != torch.int8 or qweight.dim() != 2:
        return False
    if not (x.is_cuda or (x.device.type == "cpu" and interpreting())):
        return False
    if x.shape[-1] != qweight.shape[1] or (bias is not None and bias.shape != (qweight.shape[0],)):
        return False
    if scales.dim() == 2:
        groups = scales.shape[1]
        k = qweight.shape[1]
        group_size = k // groups if groups else 0
        if group_size * groups != k or group_size < 16 or group_size & (group_size - 1):
            return False
    return True


#: Rows at or below which the kernels split K (decode: one token per sequence, a few sequences).
SMALL_M = 16


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 4 for the interpreter (a few splits, enough to
    exercise the partial sums)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def decode_splits(m: int, n: int, k: int, block_m: int, block_n: int, block_k: int, device: torch.device) -> int:
    """How many ways to split K at decode sizes (``m ≤ SMALL_M``; else 1): enough for about two
    programs per SM, each split at least two K tiles. The int4 kernel's plan uses the same rule."""
    if m > SMALL_M:
        return 1
    programs = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    return max(1, min(triton.cdiv(2 * sm_count(device), programs), triton.cdiv(k, block_k) // 2))


def int8_weight_only_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                            bias: torch.Tensor | None = None, *, split_k: int | None = None,
                            block_n: int | None = None) -> torch.Tensor:
    """Launch the Triton kernel: ``x [..., K] @ (qweight * scales).T + bias`` in ``x``'s dtype.

    At decode sizes (``M ≤ SMALL_M``) K is split (:func:`decode_splits`; ``split_k`` overrides,
    1 turns it off) and the splits' fp32 partials are summed after the kernel."""
    if not can_lower(x, qweight, scales, bias):
        raise ValueError("fxmem int8 kernel: these inputs cannot run the Triton kernel (see can_lower)")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    m, k = x2.shape
    n = qweight.shape[0]
    per_group = scales.dim() == 2
    group_size = k // scales.shape[1] if per_group else k
    small = m <= SMALL_M
    block_m = 16 if small else 64  # decode (M small): don't waste a 64-row tile
    block_n = block_n or (32 if small else 64)
    block_k = _block_k(k, group_size if per_group else None)
    if split_k is None:
        split_k = decode_splits(m, n, k, block_m, block_n, block_k, x.device)
    # each split covers whole K tiles, so a tile never straddles two splits (nor two groups)
    k_per_split = triton.cdiv(triton.cdiv(k, max(1, split_k)), block_k) * block_k
    splits = triton.cdiv(k, k_per_split)
    if splits == 1:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    else:
        out = torch.empty((splits, m, n), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n), splits)
    stride_sg = scales.stride(1) if per_group else 0
    jitted_kernel()[grid](
        x2, qweight, scales, bias if bias is not None else scales, out,
        m, n, k, k_per_split,
        x2.stride(0), x2.stride(1), qweight.stride(0), qweight.stride(1), scales.stride(0), stride_sg,
        out.stride(0) if splits > 1 else 0, out.stride(-2), out.stride(-1),
        GROUP_SIZE=group_size, PER_GROUP=per_group, HAS_BIAS=bias is not None,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
    )
    if splits > 1:
        out = out.sum(0).to(x.dtype)  # the splits' fp32 partials (split 0 holds the bias)
    return out.reshape(*lead, n)


# ---------------------------------------------------------------------------------------------
# ATen paths (CPU, and CUDA where the kernel does not apply).
# ---------------------------------------------------------------------------------------------


def _int8pack_applies(x2: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> bool:
    # torch._weight_int8pack_mm (CPU) is per-channel only, and worth it for bf16 only (as in
    # Inductor's pattern): measured on torch 2.13, 1 thread, 1024x1024, it runs at 0.48x fp32 mm
    # for bf16 but 13-62x for fp32 and 10-18x for fp16, where the dequantize-then-mm form is
    # 1.0-1.8x. bf16 with K not a multiple of 16 gives wrong results or crashes: excluded.
    return (x2.device.type == "cpu" and scales.dim() == 1 and x2.dtype == torch.bfloat16
            and x2.shape[1] % 16 == 0)


def weight_only_linear_aten(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                            bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ (qweight * scales).T + bias`` with ATen ops, in ``x``'s dtype."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    n = qweight.shape[0]
    if _int8pack_applies(x2, qweight, scales):
        out = torch._weight_int8pack_mm(x2, qweight, scales.to(x.dtype))
    elif scales.dim() == 1:
        # torchao Int8WeightOnlyConfig's form: the scale factors out of the K sum. A block of
        # weight rows at a time (row_blocks): never a whole dequantized copy of a large head.
        s = scales.to(x.dtype)
        out = blocked_linear(x2, n, lambda r0, r1: torch.mm(x2, qweight[r0:r1].t().to(x.dtype)).mul_(s[r0:r1]))
    else:
        out = blocked_linear(x2, n, lambda r0, r1: torch.mm(
            x2, dequantize_weight(qweight[r0:r1], scales[r0:r1], x.dtype).t()))
    if bias is not None:
        out = out.add_(bias.to(out.dtype))  # the op's own fresh output: no second output-sized buffer
    return out.reshape(*lead, n)


def _int_mm_applies(a: torch.Tensor, b: torch.Tensor) -> bool:
    # torch._int_mm: CPU takes any shape; CUDA wants M > 16 (rows are padded up to 17 below)
    # and K, N multiples of 8
    if a.device.type == "cpu":
        return True
    return a.is_cuda and a.shape[1] % 8 == 0 and b.shape[1] % 8 == 0


def _int_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    m = a.shape[0]
    if a.is_cuda and m <= 16:  # decode: pad with zero rows (exact) to meet CUDA's M > 16
        a = torch.cat([a, a.new_zeros(17 - m, a.shape[1])])
    return torch._int_mm(a, b)[:m]


def quantize_per_token(x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8 activations: ``(xq int8 [M, K], scales fp32 [M, 1])``."""
    xf = x2.to(torch.float32)
    amax = xf.abs().amax(dim=1, keepdim=True)
    scales = torch.where(amax > 0, amax / QMAX, torch.ones_like(amax))
    return torch.round(xf / scales).clamp_(-QMAX, QMAX).to(torch.int8), scales


def dynamic_linear_aten(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                        bias: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token int8 ``x`` × per-channel int8 weight, int32 accumulation, fp32 rescale."""
    if scales.dim() != 1:
        raise ValueError("fxmem int8 dynamic mode needs per-channel weight scales ([N])")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    xq, xs = quantize_per_token(x2)
    wt = qweight.t()
    if _int_mm_applies(xq, wt):
        acc = _int_mm(xq, wt).to(torch.float32)
    else:
        # the same integer sums, exactly: |sum| ≤ 127²·K < 2^53
        acc = torch.mm(xq.to(torch.float64), wt.to(torch.float64)).to(torch.float32)
    out = acc * xs * scales[None, :]
    if bias is not None:
        out = out + bias.to(torch.float32)
    return out.to(x.dtype).reshape(*lead, qweight.shape[0])


# ---------------------------------------------------------------------------------------------
# The ops.
# ---------------------------------------------------------------------------------------------

MODES = ("weight_only", "dynamic")


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"fxmem::int8_linear: mode={mode!r}; accepted: {MODES}")


def _int8_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
                 mode: str) -> torch.Tensor:
    """``x @ (qweight * scales).T + bias`` with int8 weights (see the module docstring)."""
    _check_mode(mode)
    if mode == "dynamic":
        return dynamic_linear_aten(x, qweight, scales, bias)
    return weight_only_linear_aten(x, qweight, scales, bias)


int8_linear = torch.library.custom_op("fxmem::int8_linear", mutates_args=())(_int8_linear)


@int8_linear.register_kernel("cuda")
def _int8_linear_cuda(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
                      mode: str) -> torch.Tensor:
    _check_mode(mode)
    if mode == "dynamic":
        return dynamic_linear_aten(x, qweight, scales, bias)
    if can_lower(x, qweight, scales, bias):
        return int8_weight_only_matmul(x, qweight, scales, bias)
    return weight_only_linear_aten(x, qweight, scales, bias)


@int8_linear.register_fake
def _int8_linear_fake(x, qweight, scales, bias, mode):
    torch._check(x.shape[-1] == qweight.shape[1], lambda: "int8_linear: x and qweight disagree on K")
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


# what compiled graphs call instead (fxmem.kernels.direct): the same kernels without custom_op's layers
direct.register(torch.ops.fxmem.int8_linear.default, {None: _int8_linear, "cuda": _int8_linear_cuda},
                _int8_linear_fake)


def _int8_embedding(qweight: torch.Tensor, scales: torch.Tensor, indices: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``embedding(qweight * scales, indices)`` in ``dtype``: only the looked-up rows are dequantized."""
    rows = torch.nn.functional.embedding(indices, qweight).to(torch.float32)
    if scales.dim() == 1:
        rows = rows * torch.nn.functional.embedding(indices, scales[:, None])
    else:
        s = torch.nn.functional.embedding(indices, scales)  # [..., G]
        k = qweight.shape[1]
        rows = (rows.reshape(*indices.shape, s.shape[-1], k // s.shape[-1]) * s[..., None]).reshape(*indices.shape, k)
    return rows.to(dtype)


int8_embedding = torch.library.custom_op("fxmem::int8_embedding", mutates_args=())(_int8_embedding)


@int8_embedding.register_fake
def _int8_embedding_fake(qweight, scales, indices, dtype):
    return qweight.new_empty((*indices.shape, qweight.shape[1]), dtype=dtype)


# what compiled graphs call instead (fxmem.kernels.direct): the same kernels without custom_op's layers
direct.register(torch.ops.fxmem.int8_embedding.default, {None: _int8_embedding}, _int8_embedding_fake)


def _int8_grouped_mm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Mixture-of-experts grouped matmul with int8 expert weights, weight-only.

    ``x`` ``[S, K]`` holds the tokens sorted by expert; ``offs`` ``[E]`` the cumulative end row of
    each expert's tokens (as ``torch._grouped_mm`` / transformers' ``grouped_mm_fallback`` take
    it); ``qweight`` int8 ``[E, N, K]`` and ``scales`` fp32 ``[E, N]`` (per expert and output
    channel). Row block ``i`` is ``x[start:end] @ (qweight[i] * scales[i, :, None]).T``; rows past
    ``offs[-1]`` are zero, as in both reference ops. Computed in ``x``'s dtype."""
    out = x.new_zeros((x.shape[0], qweight.shape[1]))
    start = 0
    for i, end in enumerate(offs.tolist()):  # one host sync, as the reference fallback does
        if end > start:
            out[start:end] = torch.mm(x[start:end], qweight[i].t().to(x.dtype)) * scales[i].to(x.dtype)
        start = end
    return out


int8_grouped_mm = torch.library.custom_op("fxmem::int8_grouped_mm", mutates_args=())(_int8_grouped_mm)


@int8_grouped_mm.register_fake
def _int8_grouped_mm_fake(x, qweight, scales, offs):
    torch._check(x.shape[-1] == qweight.shape[2], lambda: "int8_grouped_mm: x and qweight disagree on K")
    return x.new_empty((x.shape[0], qweight.shape[1]))


# what compiled graphs call instead (fxmem.kernels.direct): the same kernels without custom_op's layers
direct.register(torch.ops.fxmem.int8_grouped_mm.default, {None: _int8_grouped_mm}, _int8_grouped_mm_fake)
