"""The chunked cross-entropy's Triton kernel under ``TRITON_INTERPRET=1`` against the op's ATen path.

The kernel calls Triton's standard library (``tl.max``, ``tl.sum``), which runs on CPU tensors only
when the variable was set before Triton was imported: this module sets it when it is imported first;
otherwise the kernel tests are skipped here and :func:`test_in_interpreter_subprocess` runs this file
again in a fresh process with it set.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from fxmem.kernels import interpreter, linear_ce_triton  # noqa: E402
from fxmem.kernels.linear_ce import _forward_impl  # noqa: E402
from fxmem.testing.interpreter import rerun_under_interpreter  # noqa: E402

pytest.importorskip("triton")
INTERPRETER = interpreter.enabled()
needs_interpreter = pytest.mark.skipif(not INTERPRETER, reason="Triton was imported without TRITON_INTERPRET=1 "
                                       "in this process; test_in_interpreter_subprocess runs these")


def test_in_interpreter_subprocess():
    rerun_under_interpreter(__file__, interpreter_on=INTERPRETER, timeout=300)


def _inputs(n, d, vocab, *, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g)
    w = torch.randn(vocab, d, generator=g) / d**0.5
    b = torch.randn(vocab, generator=g) if bias else None
    t = torch.randint(0, vocab, (n,), generator=g)
    t[torch.rand(n, generator=g) < 0.3] = -100
    return h, w, b, t


@needs_interpreter
@pytest.mark.parametrize("reduction,label_smoothing,bias,vocab,softcap", [
    ("mean", 0.0, False, 50, 0.0), ("sum", 0.1, True, 50, 0.0), ("mean", 0.1, False, 130, 0.0),
    ("sum", 0.0, True, 64, 0.0), ("mean", 0.0, False, 50, 1.5)])
def test_kernel_path_equals_the_aten_path(reduction, label_smoothing, bias, vocab, softcap):
    """Loss and the three gradients, with vocabularies that are and are not a multiple of the block,
    and with Gemma 2's soft-cap (applied before the kernel, its derivative after)."""
    h, w, b, t = _inputs(19, 16, vocab, bias=bias)
    args = (h, w, b, t, -100, reduction, label_smoothing, True, 8, True, True, bias)
    got = _forward_impl(*args, use_kernel=True, softcap=softcap)
    want = _forward_impl(*args, use_kernel=False, softcap=softcap)
    for g_got, g_want in zip(got, want):
        torch.testing.assert_close(g_got, g_want, rtol=1e-5, atol=1e-6)
    logits = F.linear(h, w, b)
    logits = torch.tanh(logits / softcap) * softcap if softcap else logits
    eager = F.cross_entropy(logits, t, reduction=reduction, label_smoothing=label_smoothing)
    torch.testing.assert_close(got[0], eager, rtol=1e-5, atol=1e-6)


@needs_interpreter
def test_kernel_rows_overwrite_the_logits_with_their_gradient():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 70, generator=g)
    target = torch.tensor([3, -100, 69, 0, 12, -100])
    scale = torch.tensor(0.25)
    want_rows = F.cross_entropy(logits, target, reduction="none")
    x = logits.clone().requires_grad_()
    (F.cross_entropy(x, target, reduction="none") * 0.25).sum().backward()
    work = logits.clone()
    rows = linear_ce_triton.cross_entropy_rows_(work, target, scale, -100, 0.0)
    torch.testing.assert_close(rows, want_rows, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(work, x.grad, rtol=1e-5, atol=1e-7)


def test_the_op_uses_the_kernel_only_on_cuda_tensors(monkeypatch):
    """On CPU tensors the op runs its ATen path even with the interpreter on."""
    h, w, b, t = _inputs(5, 8, 12, bias=False)
    calls = []
    real = linear_ce_triton.cross_entropy_rows_
    monkeypatch.setattr(linear_ce_triton, "cross_entropy_rows_", lambda *a: calls.append(a) or real(*a))
    torch.ops.fxmem.linear_cross_entropy(h, w, b, t, -100, "mean", 0.0, True, 4, True, True, False)
    assert calls == []
