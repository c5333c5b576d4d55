"""Dequantize-then-matmul on the CPU, one block of weight rows at a time.

The CPU paths of fxmem's int8 and low-bit linears (:mod:`fxmem.kernels.int8_matmul`,
:mod:`fxmem.kernels.int4_matmul`) have no fused kernel: they dequantize the weight to the
compute dtype and call ``torch.mm``. Dequantizing a whole ``[N, K]`` weight at once holds an
fp32 copy of it for the length of the matmul — for a ``32000 × 128`` head 16 MiB, more than the
int8 codes save, so int8 *raised* the peak on the CPU (measured on HF Llama: 39.7 vs 37.0 MiB).
Here the output columns are computed ``rows`` at a time: each block's dequantized rows and
its ``[M, rows]`` product live only while that block runs, so the workspace is bounded by
:data:`DEQUANT_BLOCK_BYTES` plus one block of the output, whatever ``N`` is.

Before (``N = 32000``, ``K = 128``)::

    w = dequant(q)                 # [32000, 128] fp32: 16 MiB
    y = mm(x, w.T)                 # [M, 32000]

After::

    y = empty(M, 32000)
    for r0 in range(0, 32000, 8192):   # 8192 rows × 128 × 4 B = 4 MiB
        y[:, r0:r0+8192] = mm(x, dequant(q[r0:r0+8192]).T)

Numerics: each output element is the same K-sum of the same products; only which weight rows
``torch.mm`` sees together changes (measured bitwise equal for fp32 on this CPU's MKL, and
within the op's own tolerances otherwise). A weight whose fp32 copy fits in one block runs
unchanged, in one call.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

DEQUANT_BLOCK_BYTES = 4 * 2**20
"""Most fp32 bytes of dequantized weight alive at once in a CPU linear (a few MKL panels: big
enough that blocking costs no measurable time, small beside any weight worth quantizing)."""


def rows_per_block(n: int, k: int) -> int:
    """Weight rows dequantized together for an ``[n, k]`` weight: ``n`` when it fits one block."""
    return max(1, min(n, DEQUANT_BLOCK_BYTES // (4 * max(k, 1))))


def blocked_linear(x2: torch.Tensor, n: int, block: Callable[[int, int], torch.Tensor]) -> torch.Tensor:
    """``[M, n]``: the columns ``r0:r1`` from ``block(r0, r1)`` (``x2 @ W[r0:r1].T``, any epilogue
    applied), computed a block at a time into one preallocated output; a weight that fits one
    block is a single ``block(0, n)`` call (no copy)."""
    rows = rows_per_block(n, x2.shape[1])
    if rows >= n:
        return block(0, n)
    out = None
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        part = block(r0, r1)
        if out is None:
            out = part.new_empty((x2.shape[0], n))
        out[:, r0:r1] = part
        del part  # the next block's product is allocated only after this one is freed
    return out


def workspace_bytes(m: int, n: int, k: int, out_itemsize: int, dequant_peak: int, matmul_weight: int) -> int:
    """Bytes :func:`blocked_linear` allocates beyond its ``[m, n]`` output, for a weight whose
    dequantize step peaks at ``dequant_peak`` bytes per weight element (codes and temporaries) and
    whose matmul reads ``matmul_weight`` bytes per element (4: an fp32 copy).

    One block (the weight fits): the weight is dequantized before the output exists, then the
    matmul writes the output — ``max(dequant − output, matmul weight)``. Several blocks: the
    output exists from the first block on, and each block adds its dequantized rows, then those
    rows and its ``[m, rows]`` product."""
    rows = rows_per_block(n, k)
    weights = rows * k
    if rows >= n:
        return max(dequant_peak * weights - m * n * out_itemsize, matmul_weight * weights)
    return max(dequant_peak * weights, matmul_weight * weights + m * rows * out_itemsize)
