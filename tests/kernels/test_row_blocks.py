"""The CPU int8 / low-bit linears dequantize a block of weight rows at a time: same results as
the whole-weight form, and a measured peak that no longer holds a whole fp32 copy of the weight."""

from __future__ import annotations

import pytest
import torch

from fxmem.kernels import int4_matmul, int8_matmul, row_blocks
from fxmem.measure import peak_memory

M, N, K = 8, 1000, 64


@pytest.fixture
def small_blocks(monkeypatch):
    # 64 KiB blocks: 256 rows of K = 64, so the 1000-row weight runs in 4 blocks (the last partial)
    monkeypatch.setattr(row_blocks, "DEQUANT_BLOCK_BYTES", 64 * 2**10)
    assert row_blocks.rows_per_block(N, K) == 256


def _whole_int8(x, q, s, b):
    if s.dim() == 1:
        return torch.mm(x, q.t().float()) * s + b
    return torch.mm(x, int8_matmul.dequantize_weight(q, s).t()) + b


@pytest.mark.parametrize("group", [None, 16])
def test_int8_blocks_equal_the_whole_weight_form_and_hold_one_block(small_blocks, group):
    torch.manual_seed(0)
    w, x, b = torch.randn(N, K), torch.randn(M, K), torch.randn(N)
    q, s = int8_matmul.quantize_weight(w, group)
    got = int8_matmul.weight_only_linear_aten(x, q, s, b)
    torch.testing.assert_close(got, _whole_int8(x, q, s, b), rtol=0, atol=0)  # same K sums, same order

    peak, _ = peak_memory(lambda: int8_matmul.weight_only_linear_aten(x, q, s, b))
    whole, _ = peak_memory(lambda: _whole_int8(x, q, s, b))
    expected = row_blocks.workspace_bytes(M, N, K, 4, dequant_peak=4 if group is None else 8, matmul_weight=4)
    assert peak.peak_bytes == M * N * 4 + expected  # the output plus one block's workspace, exactly
    assert peak.peak_bytes < 0.5 * whole.peak_bytes  # the whole form holds N × K fp32 (250 KiB here)


def test_lowbit_blocks_equal_the_whole_weight_form_and_hold_one_block(small_blocks):
    torch.manual_seed(0)
    w, x, b = torch.randn(N, K), torch.randn(M, K), torch.randn(N)
    qw = int4_matmul.quantize_lowbit(w, 4, "int", 32)
    args = (qw.qweight, qw.scales, qw.zeros, qw.codebook, None, b, 4)
    got = int4_matmul.lowbit_linear_aten(x, *args)
    torch.testing.assert_close(got, torch.mm(x, int4_matmul.dequantize(qw).t()) + b, rtol=0, atol=0)

    peak, _ = peak_memory(lambda: int4_matmul.lowbit_linear_aten(x, *args))
    whole, _ = peak_memory(lambda: torch.mm(x, int4_matmul.dequantize(qw).t()) + b)
    model = M * N * 4 + row_blocks.workspace_bytes(M, N, K, 4, dequant_peak=9, matmul_weight=4)
    # the model leaves out the block's fp32 scales and zeros (2 × 256 rows × 2 groups × 4 B)
    assert model <= peak.peak_bytes <= model + 2 * 256 * 2 * 4
    assert peak.peak_bytes < 0.5 * whole.peak_bytes


def test_a_weight_that_fits_one_block_runs_in_one_call():
    # the default 4 MiB block holds this weight: no preallocated output, no copy
    torch.manual_seed(0)
    x, w = torch.randn(M, K), torch.randn(N, K)
    q, s = int8_matmul.quantize_weight(w)
    assert row_blocks.rows_per_block(N, K) == N
    peak, _ = peak_memory(lambda: int8_matmul.weight_only_linear_aten(x, q, s, None))
    assert peak.peak_bytes == M * N * 4 + 4 * N * K
