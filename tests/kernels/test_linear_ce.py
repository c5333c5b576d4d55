"""fxmem::linear_cross_entropy equals eager's linear + cross_entropy (loss and every gradient)."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from fxmem.kernels.linear_ce import auto_chunk_tokens, chunked_linear_cross_entropy, linear_cross_entropy


def _inputs(n, d, vocab, *, bias=False, ignored=0.3, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(vocab, d, generator=g) / d**0.5).to(dtype).requires_grad_()
    b = torch.randn(vocab, generator=g).to(dtype).requires_grad_() if bias else None
    t = torch.randint(0, vocab, (n,), generator=g)
    t[torch.rand(n, generator=g) < ignored] = -100
    return h, w, b, t


def _grads(loss, tensors):
    return torch.autograd.grad(loss * 1.7, [x for x in tensors if x is not None])  # upstream gradient != 1


def _assert_close_rel(got, want, rtol):
    scale = want.abs().max().clamp_min(1e-30)
    assert ((got - want).abs().max() / scale).item() <= rtol, (got, want)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("upcast", [False, True])
def test_equals_eager_fp32(reduction, label_smoothing, bias, upcast):
    h, w, b, t = _inputs(37, 16, 50, bias=bias)
    logits = F.linear(h, w, b)
    want = F.cross_entropy(logits.float() if upcast else logits, t, reduction=reduction, label_smoothing=label_smoothing)
    got = chunked_linear_cross_entropy(h, w, t, b, reduction=reduction, label_smoothing=label_smoothing,
                                       upcast=upcast, chunk_tokens=8)
    _assert_close_rel(got, want, 1e-5)
    for g_got, g_want in zip(_grads(got, (h, w, b)), _grads(want, (h, w, b))):
        _assert_close_rel(g_got, g_want, 1e-5)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 40), chunk=st.integers(1, 48), ignored=st.sampled_from([0.0, 0.5, 0.9]))
def test_any_chunk_size_equals_eager(n, chunk, ignored):
    """Chunk sizes that do not divide the token count (and larger than it) give eager's numbers."""
    h, w, _, t = _inputs(n, 8, 19, ignored=ignored, seed=n * 100 + chunk)
    if (t == -100).all():
        t[0] = 3
    want = F.cross_entropy(F.linear(h, w).float(), t)
    got = chunked_linear_cross_entropy(h, w, t, upcast=True, chunk_tokens=chunk)
    _assert_close_rel(got, want, 1e-5)
    for g_got, g_want in zip(_grads(got, (h, w)), _grads(want, (h, w))):
        _assert_close_rel(g_got, g_want, 1e-5)


@pytest.mark.parametrize("dtype,upcast,bias", [(torch.float32, False, False), (torch.float32, True, True),
                                               (torch.bfloat16, True, False)])
@pytest.mark.parametrize("use_kernel", [False, None])
def test_soft_capped_logits_equal_eager(dtype, upcast, bias, use_kernel):
    """Gemma 2's ``c·tanh(logits / c)`` before the loss, capped in the logits' own dtype before the
    upcast as the model does: eager's loss and gradients (fp32 exact up to rounding, bf16 within
    its rounding); the given-logits op (HF returns the capped logits) the same."""
    h, w, b, t = _inputs(37, 16, 50, bias=bias, dtype=dtype)
    w = (w.detach() * 4).requires_grad_()  # logits well past the cap, where tanh bends
    cap = 3.0
    capped = torch.tanh(F.linear(h, w, b) / cap) * cap
    want = F.cross_entropy(capped.float() if upcast else capped, t)
    got = chunked_linear_cross_entropy(h, w, t, b, upcast=upcast, chunk_tokens=8, softcap=cap)
    rtol = 1e-5 if dtype == torch.float32 else 2e-2
    _assert_close_rel(got.float(), want.float(), rtol)
    wants = _grads(want, (h, w, b))
    for g_got, g_want in zip(_grads(got, (h, w, b)), wants):
        _assert_close_rel(g_got.float(), g_want.float(), rtol)
    args = (t, -100, "mean", 0.0, upcast, 8, True, True, bias)
    given = torch.ops.fxmem.logits_cross_entropy(capped.detach(), h.detach(), w.detach(), None if b is None else b.detach(),
                                                 *args, cap)
    _assert_close_rel(given[0].float(), want.float(), rtol)
    for g_got, g_want in zip(given[1:], wants):
        _assert_close_rel(g_got.float() * 1.7, g_want.float(), rtol)
    without_cap = chunked_linear_cross_entropy(h, w, t, b, upcast=upcast, chunk_tokens=8)
    assert (without_cap - got).abs().item() > 0.1  # the cap changes the loss: the test sees it


def test_a_negative_soft_cap_is_refused():
    h, w, _, t = _inputs(4, 8, 12)
    with pytest.raises(ValueError, match="softcap -1.0; accepted: 0 \\(none\\) or a positive cap"):
        chunked_linear_cross_entropy(h, w, t, softcap=-1.0)


def test_every_row_ignored_gives_nan_like_eager():
    h, w, _, t = _inputs(6, 8, 11, ignored=1.0)
    assert torch.isnan(F.cross_entropy(F.linear(h, w), t))
    assert torch.isnan(chunked_linear_cross_entropy(h, w, t, chunk_tokens=4))
    assert chunked_linear_cross_entropy(h, w, t, reduction="sum") == 0
    # and, as eager, zero gradients (not NaN: an ignored row weighs 0 even when 1/count is inf)
    (g,) = torch.autograd.grad(chunked_linear_cross_entropy(h, w, t, chunk_tokens=4), [h])
    assert torch.equal(g, torch.zeros_like(h))


@pytest.mark.parametrize("bad", [11, -5])
def test_a_target_out_of_range_raises_as_eager_does(bad):
    # an ignored row reads column 0; any other target is used as it is, so a bad one still fails
    h, w, _, _ = _inputs(6, 8, 11)
    t = torch.tensor([1, 2, bad, 0, -100, 3])
    with pytest.raises(IndexError, match="out of bounds"):
        F.cross_entropy(F.linear(h, w), t)
    with pytest.raises(RuntimeError, match=f"index {bad} is out of bounds"):
        chunked_linear_cross_entropy(h, w, t, chunk_tokens=4)


def test_bf16_compute_with_fp32_loss_matches_eager_within_bf16_rounding():
    h, w, _, t = _inputs(64, 32, 100, dtype=torch.bfloat16)
    want = F.cross_entropy(F.linear(h, w).float(), t)
    got = chunked_linear_cross_entropy(h, w, t, upcast=True, chunk_tokens=24)
    assert got.dtype == want.dtype == torch.float32
    _assert_close_rel(got, want, 1e-5)  # the loss is computed in fp32 either way
    for g_got, g_want in zip(_grads(got, (h, w)), _grads(want, (h, w))):
        assert g_got.dtype == torch.bfloat16
        _assert_close_rel(g_got.float(), g_want.float(), 2e-2)


def test_a_frozen_weight_gets_no_gradient_buffer():
    h, w, _, t = _inputs(10, 8, 12)
    loss, grad_h, grad_w, grad_b = linear_cross_entropy(h.detach(), w.detach(), None, t, -100, "mean", 0.0, False, 4,
                                                        True, False, False)
    assert grad_h.shape == h.shape and grad_w.numel() == 0 and grad_b.numel() == 0
    w.requires_grad_(False)
    (g,) = torch.autograd.grad(chunked_linear_cross_entropy(h, w, t), [h])
    (g_want,) = torch.autograd.grad(F.cross_entropy(F.linear(h, w), t), [h])
    _assert_close_rel(g, g_want, 1e-5)


def test_bad_reduction_is_refused():
    h, w, _, t = _inputs(4, 8, 12)
    with pytest.raises(ValueError, match="reduction 'none'.*accepted"):
        chunked_linear_cross_entropy(h, w, t, reduction="none")


def test_opcheck_fake_and_autograd_registrations():
    """torch.library's own checks: fake implementation, schema, autograd registration."""
    h, w, b, t = _inputs(9, 8, 12, bias=True)
    args = (h, w, b, t, -100, "mean", 0.0, True, 4, True, True, True)
    torch.library.opcheck(torch.ops.fxmem.linear_cross_entropy.default, args)
    torch.library.opcheck(torch.ops.fxmem.linear_cross_entropy.default, (*args, 30.0))  # soft-capped


def test_auto_chunk_keeps_a_chunk_near_the_hidden_size():
    # Llama-like head: 2048 tokens, vocab 32000, d 256 -> a chunk's logits ~ the hidden states
    rows = auto_chunk_tokens(2048, 32000, 256)
    assert 64 <= rows <= 256 and rows & (rows - 1) == 0
    assert auto_chunk_tokens(10, 100, 64) == 64


def test_auto_chunk_floor_keeps_small_models_off_the_launch_bound_but_still_chunked():
    # d 256, vocab 32k: Liger's rule alone gives 64 rows (32 chunks of 8 MiB); the 32 MiB floor
    # makes 256-row chunks (8 of them, 31 MiB of fp32 logits each)
    assert auto_chunk_tokens(2048, 32000, 256) == 256
    # vocab 128k: 64 rows are already 31 MiB, the floor adds nothing
    assert auto_chunk_tokens(2048, 128256, 256) == 64
    # a large model: Liger's rule is above the floor
    assert auto_chunk_tokens(16384, 128256, 4096) == 512
    # small shapes: the floor never leaves fewer than 8 chunks (512 rows of vocab 4096: 64)
    assert auto_chunk_tokens(512, 4096, 32) == 64
    assert 2048 // auto_chunk_tokens(2048, 50257, 256) >= 8


class _Traffic(torch.utils._python_dispatch.TorchDispatchMode):
    """Bytes each ATen op reads and writes (views move nothing; a gather or scatter touches its
    index-sized part of the big operand, not all of it)."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            tensors = [a for a in torch.utils._pytree.tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
            if func.overloadpacket in (torch.ops.aten.gather, torch.ops.aten.scatter_add_):
                tensors = tensors[1:]  # the [rows, V] operand: one element per row is touched
            else:
                tensors += [o for o in torch.utils._pytree.tree_flatten(out)[0] if isinstance(o, torch.Tensor)]
            self.bytes += sum(t.numel() * t.element_size() for t in tensors)
        return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("label_smoothing,softcap", [(0.0, 0.0), (0.1, 0.0), (0.0, 30.0)])
def test_internal_bytes_formula_matches_the_loops_traffic(dtype, label_smoothing, softcap):
    """fit's cost model charges the chunked loss :func:`internal_bytes_moved`: it must be the
    traffic the loop really has (counted op by op), or fit picks chunking for speed wrongly."""
    from fxmem.kernels.linear_ce import _forward_impl, internal_bytes_moved

    n, vocab, d, chunk = 256, 1024, 32, 64
    h, w = torch.randn(n, d, dtype=dtype), torch.randn(vocab, d, dtype=dtype)
    target = torch.randint(0, vocab, (n,))
    with _Traffic() as traffic:
        _forward_impl(h, w, None, target, -100, "mean", label_smoothing, True, chunk, True, True, False,
                      use_kernel=False, softcap=softcap)
    inputs_and_outputs = 2 * h.nbytes + 2 * w.nbytes + target.nbytes  # hidden, weight, target; their gradients
    formula = internal_bytes_moved(n, vocab, d, hidden_itemsize=h.element_size(), upcast=True,
                                   label_smoothing=label_smoothing, chunk_tokens=chunk, need_hidden=True,
                                   need_weight=True, need_bias=False, triton=False, softcap=bool(softcap))
    assert formula == pytest.approx(traffic.bytes - inputs_and_outputs, rel=0.05)


@pytest.mark.parametrize("dtype,upcast", [(torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True)])
@pytest.mark.parametrize("need_grad", [True, False])
@pytest.mark.parametrize("logits_given", [False, True])
@pytest.mark.parametrize("softcap", [0.0, 30.0])
def test_the_workspace_formula_is_what_the_allocator_sees(dtype, upcast, need_grad, logits_given, softcap):
    # fit, explain and the peak guard count the chunked loss's workspace from this formula; one
    # chunk's buffers at a time (the loop once held two: the previous chunk's until reassigned)
    from fxmem.kernels.linear_ce import workspace_bytes
    from fxmem.measure import peak_memory

    n, d, vocab, chunk = 512, 32, 4096, 128
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, d, generator=g).to(dtype)
    weight = torch.randn(vocab, d, generator=g).to(dtype)
    target = torch.randint(0, vocab, (n,), generator=g)
    logits = F.linear(hidden, weight) if logits_given else None
    args = (-100, "mean", 0.0, upcast, chunk, need_grad, need_grad, False, softcap)

    def run():
        if logits_given:
            return torch.ops.fxmem.logits_cross_entropy(logits, hidden, weight, None, target, *args)
        return torch.ops.fxmem.linear_cross_entropy(hidden, weight, None, target, *args)

    run()
    peak, out = peak_memory(run, device="cpu")
    outputs = sum(t.untyped_storage().nbytes() for t in out)
    # beside the workspace: the [N] row vectors (validity mask, safe targets, row losses, row
    # weights: 17 bytes a row), the loss's scalars, a chunk's row vectors, and oneDNN's own scratch
    # where it runs the bf16 matmul (37 KiB measured at these shapes on an AVX-512 BF16 CPU)
    small = 17 * n + 64 * chunk * 4 + 40 * 1024
    expected = workspace_bytes(chunk, vocab, d, hidden_dtype=dtype, weight_dtype=dtype, upcast=upcast,
                                     need_grad=need_grad, need_weight=need_grad, logits_given=logits_given,
                                     softcap=bool(softcap))
    assert expected <= peak.peak_bytes - outputs <= expected + small, (peak.peak_bytes - outputs, expected)


@pytest.mark.gpu
@pytest.mark.parametrize("softcap", [0.0, 30.0])
def test_cuda_kernel_path_equals_the_aten_path_and_eager(softcap):
    # runs only where a GPU is lent: the compiled (not interpreted) Triton row kernel, bf16 logits
    # upcast to fp32 as HF's loss does, with and without Gemma 2's soft-cap
    from fxmem.kernels.linear_ce import _forward_impl

    g = torch.Generator(device="cuda").manual_seed(0)
    n, d, vocab = 512, 256, 32000
    h = torch.randn(n, d, device="cuda", generator=g).to(torch.bfloat16)
    w = (torch.randn(vocab, d, device="cuda", generator=g) / d**0.5 * 8).to(torch.bfloat16)
    t = torch.randint(0, vocab, (n,), device="cuda", generator=g)
    t[::7] = -100
    args = (h, w, None, t, -100, "mean", 0.0, True, 128, True, True, False)
    kernel = _forward_impl(*args, use_kernel=None, softcap=softcap)  # None: the kernel on CUDA tensors
    aten = _forward_impl(*args, use_kernel=False, softcap=softcap)
    for a, b in zip(kernel[:3], aten[:3]):
        _assert_close_rel(a.float(), b.float(), 1e-2)
    logits = F.linear(h, w)
    logits = torch.tanh(logits / softcap) * softcap if softcap else logits
    _assert_close_rel(kernel[0], F.cross_entropy(logits.float(), t), 1e-4)
