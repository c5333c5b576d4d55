"""Low-bit weights: 4-bit packing, the ``int`` / ``nf4`` / ``log`` schemes, a Triton int4
dequantize-matmul, its ATen path, and the ops.

A weight ``W [N, K]`` is stored as

* ``qweight``: ``uint8 [N, K // 2]`` for 4 bits (two codes per byte: column ``2j`` in the low
  nibble, ``2j + 1`` in the high one), or ``uint8 [N, K]`` for 8-bit codes;
* ``scales``: ``[N, G]`` in fp16 (bf16 for a bf16 weight), one per group of ``K // G`` columns;
* ``zeros``: ``[N, G]`` same dtype, for the affine ``int`` scheme only (else ``None``);
* ``codebook``: ``fp32 [2**bits]`` levels for the ``nf4`` / ``log`` schemes (else ``None``);
* ``act_scale``: ``[K]`` (optional; activation-aware calibration): the stored weight is
  ``W * act_scale`` per input column, so the op divides ``x`` by it.

Dequantized element ``(n, k)`` in group ``g``::

    int   : q * scales[n, g] + zeros[n, g]         q ∈ [0, 2**bits - 1] (affine, min/max)
    nf4   : codebook[q] * scales[n, g]             codebook = QLoRA's 16 NormalFloat levels
    log   : codebook[q] * scales[n, g]             codebook = 0, ±r^-i (sign kept, log-spaced)

The ops (``torch.library`` custom ops with fake implementations, so graphs stay traceable,
exportable and compilable by Inductor):

* ``fxmem::lowbit_linear(x, qweight, scales, zeros, codebook, act_scale, bias, bits) -> y``:
  ``x @ W.T + bias``. On CUDA (and on the CPU under ``TRITON_INTERPRET=1`` when called directly)
  the Triton kernel below: packed tiles are loaded (an eighth of fp32's bytes), unpacked,
  looked up / scaled in registers inside the K loop and fed to ``tl.dot``. On the CPU: dequantize
  the whole weight, then ``torch.mm`` (``torch._weight_int4pack_mm_for_cpu`` needs tinygemm's
  own packing and bf16 scale-and-zero layout and has no codebook form; see docs/passes/quantize.md).
* ``fxmem::lowbit_embedding(qweight, scales, zeros, codebook, indices, bits, dtype) -> rows``:
  ``embedding(W, indices)``: only the looked-up rows are unpacked and dequantized, so a tied
  embedding/head keeps one packed buffer.

Like :mod:`fxmem.kernels.int8_matmul`, the kernel is decorated with ``triton.jit`` on first use,
once per ``TRITON_INTERPRET`` setting, and calls only ``tl`` builtins.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import torch

from fxmem.kernels import direct, int8_matmul, interpreter
from fxmem.kernels.int8_matmul import interpreting, sqnr_db  # noqa: F401 - sqnr_db re-exported for the pass
from fxmem.kernels.row_blocks import blocked_linear

try:  # Triton is optional: without it the ops run their ATen paths everywhere.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is installed with torch on Linux
    triton = None
    tl = None

SCHEMES = ("int", "nf4", "log")

# QLoRA's NormalFloat4 levels (Dettmers et al. 2023, appendix E; bitsandbytes' table): the
# quantiles of N(0, 1) normalized to [-1, 1], with an exact 0 and 8 positive / 7 negative levels.
NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)


def log_levels(bits: int) -> torch.Tensor:
    """The ``log`` scheme's ``2**bits`` levels in ``[-1, 1]``: one sign bit, the other bits index
    magnitudes ``r**-i`` (``i = 0 .. 2**(bits-1) - 2``) and an exact 0 (twice: ``±0``).

    ``r`` is ``√2`` for 4 bits (magnitudes 1, 0.707, 0.5, …, 0.125: a 3-octave range) and
    ``2**(1/16)`` for 8 bits (126 log-spaced magnitudes down to ``2**-7.9``).
    """
    if bits not in (4, 8):
        raise ValueError(f"log levels: bits={bits}; accepted: 4 | 8")
    half = 2 ** (bits - 1)
    r = math.sqrt(2.0) if bits == 4 else 2.0 ** (1.0 / 16.0)
    mags = [r ** -i for i in range(half - 1)] + [0.0]      # code 0 .. half-1: large → 0
    pos = torch.tensor(mags, dtype=torch.float32)
    return torch.cat([pos, -pos])                           # sign bit = code // half


def codebook_for(scheme: str, bits: int) -> torch.Tensor | None:
    """The level table of a codebook scheme (``None`` for the affine ``int`` scheme)."""
    if scheme == "int":
        return None
    if scheme == "nf4":
        if bits != 4:
            raise ValueError(f"nf4 is a 4-bit scheme; got bits={bits}")
        return torch.tensor(NF4_LEVELS, dtype=torch.float32)
    if scheme == "log":
        return log_levels(bits)
    raise ValueError(f"unknown low-bit scheme {scheme!r}; accepted: {SCHEMES}")


# ---------------------------------------------------------------------------------------------
# Packing: two 4-bit codes per byte.
# ---------------------------------------------------------------------------------------------


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """``uint8 [N, K]`` codes in ``[0, 15]`` → ``uint8 [N, K // 2]`` (even column in the low nibble)."""
    if codes.shape[-1] % 2:
        raise ValueError(f"pack_int4: the last dimension ({codes.shape[-1]}) must be even")
    c = codes.to(torch.uint8)
    return (c[..., 0::2] | (c[..., 1::2] << 4)).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: ``uint8 [..., K // 2]`` → ``uint8 [..., K]``."""
    low = packed & 0xF
    high = packed >> 4
    return torch.stack([low, high], dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def unpack_codes(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    return unpack_int4(qweight) if bits == 4 else qweight


# ---------------------------------------------------------------------------------------------
# Quantization of a weight (once, at compile time, by the quantize pass).
# ---------------------------------------------------------------------------------------------


@dataclass
class LowBitWeight:
    """A quantized ``[N, K]`` weight (see the module docstring for each field)."""

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    codebook: torch.Tensor | None
    bits: int
    shape: tuple[int, int]

    @property
    def group_size(self) -> int:
        return self.shape[1] // self.scales.shape[1]

    def nbytes(self, *, count_codebook: bool = True) -> int:
        parts = [self.qweight, self.scales] + [t for t in (self.zeros,) if t is not None]
        if count_codebook and self.codebook is not None:
            parts.append(self.codebook)
        return sum(t.numel() * t.element_size() for t in parts)


def _param_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    # scales and zeros in the weight's 16-bit family: bf16 keeps a bf16 model's range, else fp16
    return torch.bfloat16 if weight_dtype == torch.bfloat16 else torch.float16


def quantize_lowbit(weight: torch.Tensor, bits: int, scheme: str, group_size: int,
                    clip: torch.Tensor | float = 1.0, codebook: torch.Tensor | None = None) -> LowBitWeight:
    """Round-to-nearest quantization of ``weight [N, K]`` in groups of ``group_size`` columns.

    ``clip`` (a float, or ``[N, G]``) shrinks each group's range before the scale is computed
    (calibration searches it; 1.0 is plain round-to-nearest). Scales (and zeros) are rounded to
    their 16-bit dtype *before* the codes are chosen, so the codes are the nearest ones for the
    scales actually stored.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown low-bit scheme {scheme!r}; accepted: {SCHEMES}")
    if bits not in (4, 8):
        raise ValueError(f"low-bit quantization: bits={bits}; accepted: 4 | 8")
    w = weight.detach().to(torch.float32)
    n, k = w.shape
    if k % group_size:
        raise ValueError(f"low-bit quantization: K={k} is not a multiple of group_size={group_size}")
    if bits == 4 and k % 2:
        raise ValueError(f"4-bit packing needs an even K; got K={k}")
    g = k // group_size
    wg = w.reshape(n, g, group_size)
    clip_t = clip if isinstance(clip, torch.Tensor) else torch.full((n, g), float(clip), device=w.device)
    clip_t = clip_t.to(device=w.device, dtype=torch.float32)[:, :, None]
    pdtype = _param_dtype(weight.dtype)
    tiny = torch.finfo(pdtype).tiny
    if scheme == "int":
        levels = 2 ** bits - 1
        hi = (wg.amax(dim=2, keepdim=True) * clip_t).clamp(min=0)
        lo = (wg.amin(dim=2, keepdim=True) * clip_t).clamp(max=0)  # the range holds 0: zero-padded rows stay exact-ish
        scale = ((hi - lo) / levels).clamp(min=tiny).to(pdtype)
        zero = lo.to(pdtype)
        q = torch.round((wg - zero.float()) / scale.float()).clamp_(0, levels)
        codes = q.to(torch.uint8).reshape(n, k)
        scales, zeros, book = scale[:, :, 0], zero[:, :, 0], None
    else:
        book = (codebook if codebook is not None else codebook_for(scheme, bits)).to(w.device)
        amax = wg.abs().amax(dim=2, keepdim=True) * clip_t
        scale = amax.clamp(min=tiny).to(pdtype)
        normed = (wg / scale.float()).clamp(-1.0, 1.0)
        codes = nearest_level(normed, book).to(torch.uint8).reshape(n, k)
        scales, zeros = scale[:, :, 0], None
    qweight = pack_int4(codes) if bits == 4 else codes.contiguous()
    return LowBitWeight(qweight, scales.contiguous(), None if zeros is None else zeros.contiguous(), book, bits, (n, k))


def group_params(wg: torch.Tensor, bits: int, scheme: str, clip: float = 1.0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(scale [N], zero [N] or None)`` of one group ``wg [N, group]``, exactly as
    :func:`quantize_lowbit` computes them (rounded to fp16)."""
    pdtype = _param_dtype(wg.dtype if wg.dtype == torch.bfloat16 else torch.float32)
    tiny = torch.finfo(pdtype).tiny
    w = wg.to(torch.float32)
    if scheme == "int":
        hi = (w.amax(dim=1) * clip).clamp(min=0)
        lo = (w.amin(dim=1) * clip).clamp(max=0)
        return ((hi - lo) / (2 ** bits - 1)).clamp(min=tiny).to(pdtype), lo.to(pdtype)
    return (w.abs().amax(dim=1) * clip).clamp(min=tiny).to(pdtype), None


def encode_column(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, codebook: torch.Tensor | None,
                  bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (``uint8``) and dequantized values of a column ``w [N]`` under given group parameters."""
    s = scale.to(torch.float32)
    if codebook is None:
        q = torch.round((w - zero.to(torch.float32)) / s).clamp_(0, 2 ** bits - 1)
        return q.to(torch.uint8), q * s + zero.to(torch.float32)
    q = nearest_level((w / s).clamp(-1.0, 1.0), codebook)
    return q.to(torch.uint8), codebook[q] * s


def nearest_level(values: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Index of the nearest entry of ``levels`` (any order) for each value (ties: the lower level)."""
    order = torch.argsort(levels)
    sorted_levels = levels[order]
    mids = (sorted_levels[1:] + sorted_levels[:-1]) / 2
    idx = torch.bucketize(values.contiguous(), mids)
    return order[idx]


def dequantize_lowbit(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                      codebook: torch.Tensor | None, bits: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The ``[N, K]`` weight the codes stand for (the reference the kernel matches)."""
    codes = unpack_codes(qweight, bits)
    n, k = codes.shape
    g = scales.shape[1]
    if codebook is None:
        v = codes.to(torch.float32)
    else:
        v = codebook.to(device=codes.device, dtype=torch.float32)[codes.long()]
    v = v.reshape(n, g, k // g) * scales.to(torch.float32)[:, :, None]
    if zeros is not None:
        v = v + zeros.to(torch.float32)[:, :, None]
    return v.reshape(n, k).to(dtype)


def dequantize(qw: LowBitWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return dequantize_lowbit(qw.qweight, qw.scales, qw.zeros, qw.codebook, qw.bits, dtype)


# ---------------------------------------------------------------------------------------------
# The Triton kernel: y[M, N] = (x[M, K] / act_scale) @ dequant(q[N, K]).T (+ bias)
# ---------------------------------------------------------------------------------------------


def lowbit_dequant_matmul_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, cb_ptr, a_ptr, b_ptr, o_ptr,
    M, N, K, K_PER_SPLIT,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_sn, stride_sg, stride_os, stride_om, stride_on,
    GROUP_SIZE: tl.constexpr, BITS: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_CODEBOOK: tl.constexpr,
    HAS_ACT_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, USE_DOT: tl.constexpr,
    SCALE_PER_TILE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # grid (M tiles, N tiles, K splits): program (i, j, s) sums columns [s·K_PER_SPLIT, (s+1)·K_PER_SPLIT)
    # into slice s of the output (one split: the output itself; several: fp32 partials the
    # wrapper adds up). At decode sizes (M ≤ 16) the N tiles alone are too few programs to keep
    # every SM streaming weight bytes; splitting K multiplies them.
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    k_start = pid_k * K_PER_SPLIT
    k_end = tl.minimum(k_start + K_PER_SPLIT, K)
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)  # tl.full, not tl.zeros: see int8_matmul
    for k0 in range(k_start, k_end, BLOCK_K):
        kk = k0 + rk
        kmask = kk < k_end
        x = tl.load(x_ptr + rm[:, None] * stride_xm + kk[None, :] * stride_xk,
                    mask=(rm[:, None] < M) & kmask[None, :], other=0.0)
        if HAS_ACT_SCALE:
            a = tl.load(a_ptr + kk, mask=kmask, other=1.0).to(tl.float32)
            x = (x.to(tl.float32) / a[None, :]).to(x_ptr.dtype.element_ty)
        wmask = kmask[:, None] & (rn[None, :] < N)
        if BITS == 4:
            # a byte holds columns 2j (low nibble) and 2j+1 (high nibble): each lane reads its byte
            # and shifts by 0 or 4 (the two lanes of a byte hit the same cache line)
            byte = tl.load(w_ptr + (kk[:, None] // 2) * stride_wk + rn[None, :] * stride_wn, mask=wmask, other=0)
            q = (byte.to(tl.int32) >> ((kk[:, None] % 2) * 4)) & 0xF
        else:
            q = tl.load(w_ptr + kk[:, None] * stride_wk + rn[None, :] * stride_wn, mask=wmask, other=0).to(tl.int32)
        if HAS_CODEBOOK:
            v = tl.load(cb_ptr + q, mask=wmask, other=0.0).to(tl.float32)  # 16 (or 256) levels: cached
        else:
            v = q.to(tl.float32)
        if SCALE_PER_TILE:
            # BLOCK_K divides GROUP_SIZE and splits start on tile boundaries: the whole K tile is in
            # one group, so one scale (and zero) per column of the tile, BLOCK_N loads not BLOCK_K·BLOCK_N
            sidx = rn * stride_sn + (k0 // GROUP_SIZE) * stride_sg
            s = tl.load(s_ptr + sidx, mask=rn < N, other=0.0).to(tl.float32)
            w = v * s[None, :]
            if HAS_ZEROS:
                w += tl.load(z_ptr + sidx, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        else:
            sidx = rn[None, :] * stride_sn + (kk[:, None] // GROUP_SIZE) * stride_sg
            s = tl.load(s_ptr + sidx, mask=wmask, other=0.0).to(tl.float32)
            w = v * s
            if HAS_ZEROS:
                w += tl.load(z_ptr + sidx, mask=wmask, other=0.0).to(tl.float32)
        if USE_DOT:
            # the dequantized tile goes to the compute dtype (bf16/fp16 on a GPU: tensor cores)
            acc += tl.dot(x, w.to(x_ptr.dtype.element_ty), input_precision=DOT_PRECISION)
        else:
            # GEMV form for a few rows (BLOCK_M < 16, below tl.dot's minimum): multiply and
            # reduce over K in fp32 registers, no tensor-core tile padded from 1 row to 16
            acc += tl.sum(x.to(tl.float32)[:, :, None] * w[None, :, :], axis=1)
    if HAS_BIAS:
        # the bias once, in split 0 only (the other splits' partials are added to it): the mask
        # rn + pid_k·N < N is rn < N for split 0 and false for the others (the interpreter
        # rejects a mask built with `& (pid_k == 0)`)
        b = tl.load(b_ptr + rn, mask=rn + pid_k * N < N, other=0.0)
        acc += b.to(tl.float32)[None, :]
    tl.store(o_ptr + pid_k * stride_os + rm[:, None] * stride_om + rn[None, :] * stride_on,
             acc.to(o_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


KERNEL_NAME = "fxmem_lowbit_dequant_matmul"


def kernel_source() -> str:
    """The kernel's Triton source (shown in ``report.kernels``)."""
    return inspect.getsource(lowbit_dequant_matmul_kernel)


def jitted_kernel():
    """``triton.jit(lowbit_dequant_matmul_kernel)`` for the current ``TRITON_INTERPRET`` setting."""
    return interpreter.jit(lowbit_dequant_matmul_kernel, "low-bit kernel")


_COMPUTE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def can_lower(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bits: int,
              bias: torch.Tensor | None = None) -> bool:
    """Whether the Triton kernel computes ``lowbit_linear`` for these inputs: Triton can run (a
    CUDA tensor, or the CPU interpreter), a float compute dtype, a ``uint8`` weight that matches
    ``x`` on K, and a per-group scale table that divides K."""
    if triton is None or x.dtype not in _COMPUTE_DTYPES or qweight.dtype != torch.uint8 or qweight.dim() != 2:
        return False
    if not (x.is_cuda or (x.device.type == "cpu" and interpreting())):
        return False
    k = qweight.shape[1] * (2 if bits == 4 else 1)
    if x.shape[-1] != k or scales.dim() != 2 or scales.shape[0] != qweight.shape[0] or k % scales.shape[1]:
        return False
    return bias is None or bias.shape == (qweight.shape[0],)


@dataclass(frozen=True)
class Launch:
    """How :func:`lowbit_dequant_matmul` runs the kernel for one shape: tiles, K splits, and
    whether the inner product is ``tl.dot`` (tensor cores) or the GEMV form (``tl.sum``)."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int
    use_dot: bool

    @property
    def variant(self) -> str:
        if self.split_k == 1:
            return "tiled"
        return "split-k" if self.use_dot else "split-k gemv"


def plan_launch(m: int, n: int, k: int, device: torch.device | str = "cuda", *, block_m: int | None = None,
                block_n: int | None = None, block_k: int | None = None, split_k: int | None = None,
                use_dot: bool | None = None) -> Launch:
    """The launch for ``x [m, k] @ W[n, k].T``, dispatched by ``m`` (any argument given overrides).

    ``m > int8_matmul.SMALL_M`` (16): the tiled kernel, one program per (64-row, 64-column) output tile, each over
    all of K. ``m ≤ 16`` (decode): 16-row tiles (``tl.dot``'s minimum), 32 columns, and K
    split so that about two programs per SM stream the weight (each split ≥ 2 K tiles); the
    splits' fp32 partials are summed after. ``use_dot=False`` asks for the GEMV form
    (``BLOCK_M`` = the next power of two ≥ m, ``tl.sum`` instead of ``tl.dot``) — the benchmark
    times both, since which wins at M = 1 is a measurement, not a guess.
    """
    device = torch.device(device)
    small = m <= int8_matmul.SMALL_M
    use_dot = True if use_dot is None else use_dot
    if block_m is None:
        block_m = (16 if small else 64) if use_dot else min(16, triton.next_power_of_2(m))
    block_n = block_n or (32 if small else 64)
    block_k = block_k or 64
    if k < block_k:
        block_k = max(16, triton.next_power_of_2(k))
    if split_k is None:
        split_k = int8_matmul.decode_splits(m, n, k, block_m, block_n, block_k, device)
    split_k = max(1, min(split_k, triton.cdiv(k, block_k)))
    return Launch(block_m, block_n, block_k, split_k, use_dot)


def lowbit_dequant_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                          codebook: torch.Tensor | None, act_scale: torch.Tensor | None, bias: torch.Tensor | None,
                          bits: int, *, block_m: int | None = None, block_n: int | None = None, block_k: int | None = None,
                          split_k: int | None = None, use_dot: bool | None = None) -> torch.Tensor:
    """Launch the Triton kernel: ``(x / act_scale) @ dequant(W).T + bias`` in ``x``'s dtype.

    The launch (tiles, K splits, ``tl.dot`` or GEMV) is :func:`plan_launch`'s for this shape;
    keyword arguments override it (the benchmark's sweeps, the tests)."""
    if not can_lower(x, qweight, scales, bits, bias):
        raise ValueError("fxmem low-bit kernel: these inputs cannot run the Triton kernel (see can_lower)")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    m, k = x2.shape
    n = qweight.shape[0]
    plan = plan_launch(m, n, k, x.device, block_m=block_m, block_n=block_n, block_k=block_k, split_k=split_k,
                       use_dot=use_dot)
    if not plan.use_dot and x.device.type == "cpu" and not interpreter.enabled():
        raise ValueError("fxmem low-bit kernel: the GEMV form calls tl.sum, which runs on the CPU only when "
                         "TRITON_INTERPRET=1 was set before Triton was imported")
    # each split covers whole K tiles (a multiple of BLOCK_K), so every tile lies in one split
    k_per_split = triton.cdiv(triton.cdiv(k, plan.split_k), plan.block_k) * plan.block_k
    splits = triton.cdiv(k, k_per_split)
    if splits == 1:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
        stride_os = 0
    else:
        out = torch.empty((splits, m, n), dtype=torch.float32, device=x.device)
        stride_os = out.stride(0)
    grid = (triton.cdiv(m, plan.block_m), triton.cdiv(n, plan.block_n), splits)
    group_size = k // scales.shape[1]
    dummy = scales
    jitted_kernel()[grid](
        x2, qweight, scales, zeros if zeros is not None else dummy, codebook if codebook is not None else dummy,
        act_scale if act_scale is not None else dummy, bias if bias is not None else dummy, out,
        m, n, k, k_per_split,
        x2.stride(0), x2.stride(1), qweight.stride(0), qweight.stride(1), scales.stride(0), scales.stride(1),
        stride_os, out.stride(-2), out.stride(-1),
        GROUP_SIZE=group_size, BITS=bits, HAS_ZEROS=zeros is not None, HAS_CODEBOOK=codebook is not None,
        HAS_ACT_SCALE=act_scale is not None, HAS_BIAS=bias is not None,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32", USE_DOT=plan.use_dot,
        SCALE_PER_TILE=group_size % plan.block_k == 0, BLOCK_M=plan.block_m, BLOCK_N=plan.block_n, BLOCK_K=plan.block_k,
    )
    if splits > 1:
        out = out.sum(0).to(x.dtype)  # the splits' fp32 partials (split 0 holds the bias)
    return out.reshape(*lead, n)


# ---------------------------------------------------------------------------------------------
# ATen path and the ops.
# ---------------------------------------------------------------------------------------------


def lowbit_linear_aten(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                       codebook: torch.Tensor | None, act_scale: torch.Tensor | None, bias: torch.Tensor | None,
                       bits: int) -> torch.Tensor:
    """Dequantize the weight (folding ``1 / act_scale`` into its columns), then ``torch.mm`` — a
    block of weight rows at a time (:mod:`fxmem.kernels.row_blocks`), so a large head is never
    held dequantized whole."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    n = qweight.shape[0]
    inv = None if act_scale is None else act_scale.to(torch.float32)[None, :]

    def block(r0: int, r1: int) -> torch.Tensor:
        w = dequantize_lowbit(qweight[r0:r1], scales[r0:r1], None if zeros is None else zeros[r0:r1], codebook,
                              bits, torch.float32)
        if inv is not None:
            w = w / inv
        return torch.mm(x2, w.to(x.dtype).t())

    out = blocked_linear(x2, n, block)
    if bias is not None:
        out = out.add_(bias.to(out.dtype))  # the op's own fresh output: no second output-sized buffer
    return out.reshape(*lead, n)


def _check_bits(bits: int) -> None:
    if bits not in (4, 8):
        raise ValueError(f"fxmem::lowbit_linear: bits={bits}; accepted: 4 | 8")


def _lowbit_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                   codebook: torch.Tensor | None, act_scale: torch.Tensor | None, bias: torch.Tensor | None,
                   bits: int) -> torch.Tensor:
    """``(x / act_scale) @ dequant(qweight).T + bias`` (see the module docstring)."""
    _check_bits(bits)
    return lowbit_linear_aten(x, qweight, scales, zeros, codebook, act_scale, bias, bits)


lowbit_linear = torch.library.custom_op("fxmem::lowbit_linear", mutates_args=())(_lowbit_linear)


@lowbit_linear.register_kernel("cuda")
def _lowbit_linear_cuda(x, qweight, scales, zeros, codebook, act_scale, bias, bits):
    _check_bits(bits)
    if can_lower(x, qweight, scales, bits, bias):
        return lowbit_dequant_matmul(x, qweight, scales, zeros, codebook, act_scale, bias, bits)
    return lowbit_linear_aten(x, qweight, scales, zeros, codebook, act_scale, bias, bits)


@lowbit_linear.register_fake
def _lowbit_linear_fake(x, qweight, scales, zeros, codebook, act_scale, bias, bits):
    k = qweight.shape[1] * (2 if bits == 4 else 1)
    torch._check(x.shape[-1] == k, lambda: "lowbit_linear: x and qweight disagree on K")
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


# what compiled graphs call instead (fxmem.kernels.direct): the same kernels without custom_op's layers
direct.register(torch.ops.fxmem.lowbit_linear.default, {None: _lowbit_linear, "cuda": _lowbit_linear_cuda},
                _lowbit_linear_fake)


def _lowbit_embedding(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                      codebook: torch.Tensor | None, indices: torch.Tensor, bits: int, dtype: torch.dtype) -> torch.Tensor:
    """``embedding(dequant(qweight), indices)`` in ``dtype``: only the looked-up rows are unpacked."""
    _check_bits(bits)
    flat = indices.reshape(-1)
    rows = dequantize_lowbit(qweight[flat], scales[flat], None if zeros is None else zeros[flat], codebook, bits, dtype)
    return rows.reshape(*indices.shape, rows.shape[-1])


lowbit_embedding = torch.library.custom_op("fxmem::lowbit_embedding", mutates_args=())(_lowbit_embedding)


@lowbit_embedding.register_fake
def _lowbit_embedding_fake(qweight, scales, zeros, codebook, indices, bits, dtype):
    k = qweight.shape[1] * (2 if bits == 4 else 1)
    return qweight.new_empty((*indices.shape, k), dtype=dtype)


# what compiled graphs call instead (fxmem.kernels.direct): the same kernels without custom_op's layers
direct.register(torch.ops.fxmem.lowbit_embedding.default, {None: _lowbit_embedding}, _lowbit_embedding_fake)
