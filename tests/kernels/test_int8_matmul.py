"""The weight-only int8 Triton kernel under ``TRITON_INTERPRET=1``, and the op's ATen CPU paths.

Triton reads ``TRITON_INTERPRET`` when a function is decorated; the kernel module decorates on
first use per setting and calls only ``tl`` builtins, so these tests set the variable only around
their own calls (monkeypatch) and leave the rest of the pytest process as it was — and they run
after this module imported triton and fxmem with the variable unset, which is the hazard checked.
"""

from __future__ import annotations

import pytest
import torch

from fxmem.kernels import int8_matmul as k8
from fxmem.testing.interpreter import require_working_interpreter

triton = pytest.importorskip("triton")


def test_interpreting_follows_the_environment(monkeypatch):
    # read at call time, not at import: this module imported triton before any test set it
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not k8.interpreting()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert k8.interpreting()


@pytest.fixture
def interpret(monkeypatch):
    require_working_interpreter()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    yield


def reference(x, qweight, scales, bias=None):
    out = x.double() @ k8.dequantize_weight(qweight, scales, torch.float64).t()
    return out if bias is None else out + bias.double()


@pytest.mark.parametrize(
    "m,k,n,group_size,with_bias",
    [(1, 64, 32, None, True), (5, 48, 20, None, False), (17, 64, 40, None, True), (3, 128, 24, 32, True), (2, 64, 8, 64, False)],
)
def test_kernel_matches_dequantized_reference_fp32(interpret, m, k, n, group_size, with_bias):
    torch.manual_seed(0)
    x = torch.randn(m, k)
    qweight, scales = k8.quantize_weight(torch.randn(n, k), group_size)
    bias = torch.randn(n) if with_bias else None
    assert k8.can_lower(x, qweight, scales, bias)
    out = k8.int8_weight_only_matmul(x, qweight, scales, bias)
    assert out.shape == (m, n) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), reference(x, qweight, scales, bias), atol=1e-4, rtol=1e-4)


def test_kernel_fp16_and_3d_input(interpret):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, dtype=torch.float16)
    qweight, scales = k8.quantize_weight(torch.randn(16, 64))
    out = k8.int8_weight_only_matmul(x, qweight, scales)
    assert out.shape == (2, 3, 16) and out.dtype == torch.float16
    torch.testing.assert_close(out.double(), reference(x.reshape(6, 64), qweight, scales).reshape(2, 3, 16), atol=2e-2, rtol=1e-2)


@pytest.mark.parametrize("m,k,n,group_size,split_k", [
    (1, 256, 40, None, 3),   # per-channel: the scale applied to each split's partial
    (4, 320, 24, 32, 2),     # per group; K = 5 tiles: a short last split
    (2, 128, 16, None, None),  # the automatic decode plan (interpreter: splits for 4 "SMs")
])
def test_split_k_matches_dequantized_reference(interpret, m, k, n, group_size, split_k):
    torch.manual_seed(0)
    x = torch.randn(m, k)
    qweight, scales = k8.quantize_weight(torch.randn(n, k), group_size)
    bias = torch.randn(n)  # added once (split 0), not once per split
    out = k8.int8_weight_only_matmul(x, qweight, scales, bias, split_k=split_k)
    assert out.shape == (m, n) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), reference(x, qweight, scales, bias), atol=1e-4, rtol=1e-4)


def test_decode_splits_rule(monkeypatch):
    monkeypatch.setattr(k8, "sm_count", lambda device: 132)
    cuda = torch.device("cuda")
    assert k8.decode_splits(1, 4096, 4096, 16, 32, 64, cuda) == 3    # 128 tiles → ≥ 264 programs
    assert k8.decode_splits(16, 11008, 4096, 16, 32, 64, cuda) == 1  # 344 tiles already
    assert k8.decode_splits(17, 4096, 4096, 64, 64, 64, cuda) == 1   # not decode
    assert k8.decode_splits(1, 64, 128, 16, 32, 64, cuda) == 1       # two K tiles: no split


def test_can_lower_rules(monkeypatch):
    x = torch.randn(2, 64)
    qweight, scales = k8.quantize_weight(torch.randn(8, 64))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not k8.can_lower(x, qweight, scales)  # a CPU tensor and no interpreter: nothing to run it
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert k8.can_lower(x, qweight, scales)
    _, odd_groups = k8.quantize_weight(torch.randn(8, 48), 24)
    assert not k8.can_lower(torch.randn(2, 48), torch.zeros(8, 48, dtype=torch.int8), odd_groups)  # 24 is not a power of 2
    assert not k8.can_lower(x.to(torch.int32), qweight, scales)
    with pytest.raises(ValueError, match="can_lower"):
        k8.int8_weight_only_matmul(x.to(torch.int32), qweight, scales)


# -- the op's CPU paths ----------------------------------------------------------------------


@pytest.mark.parametrize("dtype,k", [(torch.float32, 40), (torch.float16, 24), (torch.bfloat16, 32), (torch.bfloat16, 24)])
def test_cpu_weight_only_path(dtype, k):
    torch.manual_seed(0)
    x = torch.randn(4, k, dtype=dtype)
    qweight, scales = k8.quantize_weight(torch.randn(12, k))
    bias = torch.randn(12, dtype=dtype)
    out = torch.ops.fxmem.int8_linear(x, qweight, scales, bias, "weight_only")
    assert out.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out.double(), reference(x, qweight, scales, bias), atol=tol * k, rtol=tol)


def test_cpu_per_group_path_and_embedding():
    torch.manual_seed(0)
    w = torch.randn(10, 64)
    qweight, scales = k8.quantize_weight(w, 16)
    assert scales.shape == (10, 4)
    x = torch.randn(3, 64)
    torch.testing.assert_close(torch.ops.fxmem.int8_linear(x, qweight, scales, None, "weight_only").double(),
                               reference(x, qweight, scales), atol=1e-4, rtol=1e-4)
    idx = torch.tensor([[0, 9, 3]])
    rows = torch.ops.fxmem.int8_embedding(qweight, scales, idx, torch.float32)
    torch.testing.assert_close(rows, k8.dequantize_weight(qweight, scales)[idx])


def test_quantization_error_bound_and_zero_rows():
    torch.manual_seed(0)
    w = torch.randn(8, 32)
    w[3] = 0
    qweight, scales = k8.quantize_weight(w)
    deq = k8.dequantize_weight(qweight, scales)
    assert torch.all(deq[3] == 0)
    # symmetric rounding: each element moves at most half a step of its channel's scale
    assert torch.all((deq - w).abs() <= scales[:, None] / 2 + 1e-7)
    assert qweight.abs().max() <= 127
    assert 35 < k8.sqnr_db(w, deq) < 50


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 16])
def test_cuda_kernel_and_op(m):
    # runs only where a GPU is lent: the compiled (not interpreted) kernel, bf16, decode shapes
    torch.manual_seed(0)
    x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
    qweight, scales = k8.quantize_weight(torch.randn(4096, 4096, device="cuda"))
    out = torch.ops.fxmem.int8_linear(x, qweight, scales, None, "weight_only")
    ref = reference(x.float().cpu(), qweight.cpu(), scales.cpu())
    torch.testing.assert_close(out.double().cpu(), ref, atol=0.5, rtol=2e-2)
    dyn = torch.ops.fxmem.int8_linear(x, qweight, scales, None, "dynamic")  # _int_mm with M padded to 17
    assert k8.sqnr_db(ref, dyn.cpu()) > 25
