"""Low-bit weights: packing, each scheme's error bound per group, the ops' ATen paths, and the
Triton int4 dequantize-matmul against the dequantized reference under the interpreter.

The kernel tests need Triton's interpreter: this module sets ``TRITON_INTERPRET`` before Triton
is imported when it runs first; when an earlier module already imported Triton without it, they
are skipped here and :func:`test_in_interpreter_subprocess` runs this file again with it set.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from fxmem.kernels import codegen  # noqa: E402
from fxmem.kernels import int4_matmul as k4  # noqa: E402
from fxmem.testing.interpreter import rerun_under_interpreter  # noqa: E402

INTERPRETER = codegen.interpreter_enabled()
needs_interpreter = pytest.mark.skipif(not INTERPRETER, reason="Triton was imported without TRITON_INTERPRET=1 "
                                       "in this process; test_in_interpreter_subprocess runs these")


def test_in_interpreter_subprocess():
    rerun_under_interpreter(__file__, interpreter_on=INTERPRETER, timeout=300)


# -- packing ---------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 5), st.integers(1, 8), st.integers(0, 2**31 - 1))
def test_pack_unpack_round_trip(n, half_k, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (n, 2 * half_k), generator=g, dtype=torch.uint8)
    packed = k4.pack_int4(codes)
    assert packed.shape == (n, half_k) and packed.dtype == torch.uint8  # two codes per byte
    assert torch.equal(k4.unpack_int4(packed), codes)


def test_pack_layout_low_nibble_first():
    packed = k4.pack_int4(torch.tensor([[1, 2, 15, 0]], dtype=torch.uint8))
    assert packed.tolist() == [[1 | (2 << 4), 15]]
    with pytest.raises(ValueError, match="even"):
        k4.pack_int4(torch.zeros(2, 3, dtype=torch.uint8))


def test_levels():
    nf4 = k4.codebook_for("nf4", 4)
    assert nf4.shape == (16,) and nf4.min() == -1 and nf4.max() == 1 and (nf4 == 0).sum() == 1
    log4 = k4.log_levels(4)
    mags = log4[:8]
    assert log4.shape == (16,) and torch.equal(log4[8:], -mags)   # sign bit kept: code ≥ 8 is negative
    ratios = mags[:6] / mags[1:7]                                 # magnitudes are log-spaced: constant ratio √2
    torch.testing.assert_close(ratios, torch.full((6,), 2 ** 0.5))
    assert mags[7] == 0
    assert k4.log_levels(8).shape == (256,)
    with pytest.raises(ValueError, match="nf4"):
        k4.codebook_for("nf4", 8)


# -- error bound per group, each scheme ----------------------------------------------------------


def _max_gap(levels: torch.Tensor) -> float:
    s = torch.sort(levels.unique()).values
    return float((s[1:] - s[:-1]).max())


@pytest.mark.parametrize("bits,scheme", [(4, "int"), (4, "nf4"), (4, "log"), (8, "int"), (8, "log")])
@pytest.mark.parametrize("group", [16, 64])
def test_error_bound_per_group(bits, scheme, group):
    torch.manual_seed(0)
    w = torch.randn(12, 128) * torch.logspace(-2, 0, 12)[:, None]  # rows of very different ranges
    qw = k4.quantize_lowbit(w, bits, scheme, group)
    deq = k4.dequantize(qw)
    err = (deq - w).abs().reshape(12, 128 // group, group).amax(2)
    wg = w.reshape(12, 128 // group, group)
    scales = qw.scales.float()
    if scheme == "int":
        # affine: half a step of the group's (max - min) / (2^bits - 1), plus the fp16 rounding of the zero
        bound = scales / 2 + qw.zeros.float().abs() * 2 ** -10 + 1e-7
        assert torch.allclose(scales, (wg.amax(2) - wg.amin(2).clamp(max=0)).clamp(min=0) / (2 ** bits - 1), rtol=1e-3)
    else:
        # codebook × absmax: half the largest gap between neighbouring levels, in units of the scale
        bound = scales * _max_gap(qw.codebook) / 2 + 1e-7
        torch.testing.assert_close(scales, wg.abs().amax(2), rtol=1e-3, atol=0)
    assert (err <= bound * 1.001).all(), (err / bound).max()
    assert qw.scales.dtype == torch.float16


def test_zero_rows_and_bf16_scales():
    w = torch.zeros(4, 32, dtype=torch.bfloat16)
    w[1] = torch.linspace(-1, 1, 32)
    qw = k4.quantize_lowbit(w, 4, "int", 32)
    assert qw.scales.dtype == torch.bfloat16  # a bf16 weight keeps bf16's range for its scales
    deq = k4.dequantize(qw)
    assert torch.equal(deq[0], torch.zeros(32)) and torch.equal(deq[2:], torch.zeros(2, 32))
    for scheme in ("nf4", "log"):
        assert torch.equal(k4.dequantize(k4.quantize_lowbit(w, 4, scheme, 16))[0], torch.zeros(32))


def test_nbytes_are_packed():
    qw = k4.quantize_lowbit(torch.randn(64, 256), 4, "int", 64)
    assert qw.qweight.numel() == 64 * 128 and qw.nbytes() == 64 * 128 + 2 * (64 * 4 * 2)  # codes + fp16 scales, zeros
    assert qw.nbytes() / (64 * 256 * 4) < 0.15


# -- the ops' ATen paths ---------------------------------------------------------------------


def _reference(x, qw, act_scale=None, bias=None):
    w = k4.dequantize(qw, torch.float64)
    if act_scale is not None:
        w = w / act_scale.double()[None, :]
    out = x.double() @ w.t()
    return out if bias is None else out + bias.double()


@pytest.mark.parametrize("bits,scheme", [(4, "int"), (4, "nf4"), (4, "log"), (8, "log")])
def test_linear_op_cpu_matches_reference(bits, scheme):
    torch.manual_seed(0)
    qw = k4.quantize_lowbit(torch.randn(20, 64), bits, scheme, 32)
    x = torch.randn(2, 3, 64)
    a = (torch.rand(64) + 0.5).half()
    b = torch.randn(20)
    out = torch.ops.fxmem.lowbit_linear(x, qw.qweight, qw.scales, qw.zeros, qw.codebook, a, b, bits)
    assert out.shape == (2, 3, 20)
    torch.testing.assert_close(out.double(), _reference(x.reshape(6, 64), qw, a, b).reshape(2, 3, 20), atol=1e-4, rtol=1e-4)


def test_embedding_op_dequantizes_looked_up_rows():
    torch.manual_seed(0)
    qw = k4.quantize_lowbit(torch.randn(50, 32), 4, "nf4", 16)
    idx = torch.tensor([[3, 0, 49], [7, 7, 1]])
    rows = torch.ops.fxmem.lowbit_embedding(qw.qweight, qw.scales, qw.zeros, qw.codebook, idx, 4, torch.float32)
    assert rows.shape == (2, 3, 32)
    assert torch.equal(rows, torch.nn.functional.embedding(idx, k4.dequantize(qw)))


def test_fake_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    qw = k4.quantize_lowbit(torch.randn(20, 64), 4, "int", 32)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        x = mode.from_tensor(torch.randn(5, 64))
        out = torch.ops.fxmem.lowbit_linear(x, qw.qweight, qw.scales, qw.zeros, None, None, None, 4)
        ids = mode.from_tensor(torch.zeros(2, 3, dtype=torch.long))
        rows = torch.ops.fxmem.lowbit_embedding(qw.qweight, qw.scales, qw.zeros, None, ids, 4, torch.float16)
    assert out.shape == (5, 20) and rows.shape == (2, 3, 64) and rows.dtype == torch.float16


# -- the Triton kernel under the interpreter ---------------------------------------------------


@needs_interpreter
@pytest.mark.parametrize("m,k,n,group,bits,scheme,act,bias", [
    (1, 64, 32, 32, 4, "int", False, True),
    (5, 96, 20, 32, 4, "nf4", True, False),     # K not a multiple of BLOCK_K, N not of BLOCK_N
    (17, 128, 40, 64, 4, "log", True, True),    # M beyond one decode tile
    (3, 64, 24, 16, 8, "log", False, True),     # 8-bit codes (one a byte)
    (2, 128, 8, 128, 4, "int", False, False),   # one group per row
])
def test_kernel_matches_dequantized_reference(m, k, n, group, bits, scheme, act, bias):
    torch.manual_seed(0)
    qw = k4.quantize_lowbit(torch.randn(n, k), bits, scheme, group)
    x = torch.randn(m, k)
    a = (torch.rand(k) + 0.5).half() if act else None
    b = torch.randn(n) if bias else None
    assert k4.can_lower(x, qw.qweight, qw.scales, bits, b)
    out = k4.lowbit_dequant_matmul(x, qw.qweight, qw.scales, qw.zeros, qw.codebook, a, b, bits)
    assert out.shape == (m, n) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), _reference(x, qw, a, b), atol=1e-4, rtol=1e-4)


@needs_interpreter
def test_kernel_fp16_3d_and_tile_sizes():
    torch.manual_seed(0)
    qw = k4.quantize_lowbit(torch.randn(16, 64), 4, "int", 32)
    x = torch.randn(2, 3, 64, dtype=torch.float16)
    ref = _reference(x.reshape(6, 64), qw).reshape(2, 3, 16)
    for tiles in ({}, {"block_m": 16, "block_n": 32, "block_k": 32}):
        out = k4.lowbit_dequant_matmul(x, qw.qweight, qw.scales, qw.zeros, None, None, None, 4, **tiles)
        assert out.shape == (2, 3, 16) and out.dtype == torch.float16
        torch.testing.assert_close(out.double(), ref, atol=3e-2, rtol=1e-2)


@needs_interpreter
@pytest.mark.parametrize("m,k,n,group,bits,scheme,split_k,use_dot", [
    (1, 192, 40, 32, 4, "int", 3, True),      # decode row, K in 3 splits, ragged N
    (3, 256, 24, 64, 4, "nf4", 2, True),
    (1, 192, 40, 32, 4, "int", 2, False),     # GEMV form (tl.sum), 1-row tile
    (5, 160, 20, 32, 8, "log", 3, False),     # GEMV, 8-row tile, 8-bit codes, K = 2.5 tiles: a short last split
    (16, 128, 33, 16, 4, "int", None, None),  # the automatic plan at the small-M boundary
])
def test_split_k_and_gemv_match_dequantized_reference(m, k, n, group, bits, scheme, split_k, use_dot):
    torch.manual_seed(0)
    qw = k4.quantize_lowbit(torch.randn(n, k), bits, scheme, group)
    x = torch.randn(m, k)
    a = (torch.rand(k) + 0.5).half()
    b = torch.randn(n)  # the bias is added once (in split 0), not once per split
    out = k4.lowbit_dequant_matmul(x, qw.qweight, qw.scales, qw.zeros, qw.codebook, a, b, bits,
                                   split_k=split_k, use_dot=use_dot)
    assert out.shape == (m, n) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), _reference(x, qw, a, b), atol=1e-4, rtol=1e-4)


def test_plan_launch_dispatches_by_m(monkeypatch):
    monkeypatch.setattr(k4.int8_matmul, "sm_count", lambda device: 132)  # an H100's SMs, without one
    decode = k4.plan_launch(1, 4096, 4096)
    assert decode.variant == "split-k" and decode.block_m == 16 and decode.split_k > 1
    # about two programs per SM: 1 × 128 output tiles × splits ≥ 264
    assert 128 * decode.split_k >= 2 * 132 > 128 * (decode.split_k - 1)
    assert k4.plan_launch(16, 4096, 4096).variant == "split-k"
    prefill = k4.plan_launch(17, 4096, 4096)
    assert prefill.variant == "tiled" and prefill.split_k == 1 and prefill.block_m == 64
    gemv = k4.plan_launch(3, 4096, 4096, use_dot=False)
    assert gemv.variant == "split-k gemv" and gemv.block_m == 4
    assert k4.plan_launch(1, 64, 128).split_k == 1  # K of two tiles: not worth splitting
    assert k4.plan_launch(1, 4096, 4096, split_k=1000).split_k == 4096 // 64  # at most one tile a split


def test_can_lower_rules(monkeypatch):
    qw = k4.quantize_lowbit(torch.randn(8, 64), 4, "int", 32)
    x = torch.randn(2, 64)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not k4.can_lower(x, qw.qweight, qw.scales, 4)  # a CPU tensor and no interpreter
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert k4.can_lower(x, qw.qweight, qw.scales, 4)
    assert not k4.can_lower(torch.randn(2, 32), qw.qweight, qw.scales, 4)  # K disagrees (packed K = 64)
    assert not k4.can_lower(x.to(torch.int32), qw.qweight, qw.scales, 4)
    with pytest.raises(ValueError, match="can_lower"):
        k4.lowbit_dequant_matmul(x.to(torch.int32), qw.qweight, qw.scales, qw.zeros, None, None, None, 4)


@needs_interpreter
def test_gpu_benchmark_script_runs_every_launch(monkeypatch):
    """benchmarks/kernels_int4.py is what the next lent GPU runs: a dry run on the CPU (interpreter,
    one tiny shape, timings stubbed) must produce every column, so a GPU minute is not lost to a typo."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "kernels_int4.py"
    spec = importlib.util.spec_from_file_location("kernels_int4_dry_run", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setattr(bench, "DEVICE", "cpu")
    monkeypatch.setattr(bench, "SHAPES", ((40, 256),))
    monkeypatch.setattr(bench, "MS", (1,))
    monkeypatch.setattr(bench, "_bench", lambda fn: (fn(), 1.0)[1])
    result = bench.time_int4()
    (row,) = result["rows"]
    for launch in ("tiled", "splitk", "gemv"):
        assert f"fxmem_int4_{launch}_ms" in row and f"fxmem_int4_{launch}_rel_err" in row
    assert row["fxmem_int4_tiled_plan"][3] == 1 and row["fxmem_int4_splitk_plan"][3] > 1
    assert {"fxmem_nf4_ms", "fxmem_int8_tiled_ms", "fxmem_int8_splitk_ms"} <= set(row)
    assert row["fxmem_int4_gemv_rel_err"] < 1e-2  # bf16 through tl.sum is right in the interpreter (tl.dot's is not)
    assert result["complete"]
