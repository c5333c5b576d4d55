"""The logits ops (kernels/logits_output.py) and their use by the chunk pass when the logits are an output.

HF causal LMs return the logits beside the loss. The step must then cost the head's three matmuls,
as an unchunked step does — not six (the output's linear, three in a chunked loss that multiplies
again, and two in the backward of an output nobody differentiates) — and stay exact whether or not
the caller differentiates the logits.
"""

import pytest
import torch
import torch.nn.functional as F

from fxmem.kernels import linear_ce, logits_output  # noqa: F401  (registers the ops)
from fxmem.testing import recording_backend

transformers = pytest.importorskip("transformers")

HEAD_OPS = {"aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm"}


def head_matmuls(fn, vocab: int) -> int:
    """Matmul calls in ``fn()`` with an operand whose shape has the vocabulary size."""
    with torch.profiler.profile(record_shapes=True) as prof:
        fn()
    return sum(1 for e in prof.events() if e.name in HEAD_OPS and any(vocab in list(s) for s in e.input_shapes if s))


def test_output_linear_equals_linear_and_skips_a_zero_gradient():
    torch.manual_seed(0)
    h = torch.randn(2, 5, 8, requires_grad=True)
    w = torch.randn(13, 8, requires_grad=True)
    b = torch.randn(13, requires_grad=True)
    out = torch.ops.fxmem.output_linear(h, w, b)
    want = F.linear(h, w, b)
    torch.testing.assert_close(out, want)
    g = torch.randn_like(want)
    got = torch.autograd.grad(out, (h, w, b), g)
    expected = torch.autograd.grad(want, (h, w, b), g)
    for a, e in zip(got, expected):
        torch.testing.assert_close(a, e)
    # a zero gradient (an output nobody differentiated): zeros, and no matmul runs
    out = torch.ops.fxmem.output_linear(h, w, b)
    zeros = torch.zeros_like(out)
    assert head_matmuls(lambda: torch.autograd.grad(out, (h, w, b), zeros), 13) == 0
    out = torch.ops.fxmem.output_linear(h, w, b)
    for grad in torch.autograd.grad(out, (h, w, b), zeros):
        assert not grad.any()
    # NaN is not zero: it reaches the gradients as it would through F.linear
    out = torch.ops.fxmem.output_linear(h, w, None)
    nan = zeros.clone()
    nan[0, 0, 0] = float("nan")
    assert torch.autograd.grad(out, h, nan)[0].isnan().any()


def test_soft_capped_output_linear_equals_the_models_cap_and_its_gradient():
    """``output_linear(..., softcap=c)`` is Gemma 2's ``c·tanh(linear / c)``; its backward is eager's
    through the cap, and a zero gradient still skips the matmuls."""
    torch.manual_seed(0)
    h = torch.randn(2, 5, 8, requires_grad=True)
    w = (4 * torch.randn(13, 8)).requires_grad_()
    out = torch.ops.fxmem.output_linear(h, w, None, 3.0)
    want = torch.tanh(F.linear(h, w) / 3.0) * 3.0
    torch.testing.assert_close(out, want)
    g = torch.randn_like(want)
    for a, e in zip(torch.autograd.grad(out, (h, w), g), torch.autograd.grad(want, (h, w), g)):
        torch.testing.assert_close(a, e)
    out = torch.ops.fxmem.output_linear(h, w, None, 3.0)
    assert head_matmuls(lambda: torch.autograd.grad(out, (h, w), torch.zeros_like(out)), 13) == 0
    torch.library.opcheck(torch.ops.fxmem.output_linear.default, (h, w, None, 3.0))


@pytest.mark.parametrize("reduction,upcast", [("mean", False), ("sum", True)])
def test_logits_cross_entropy_equals_the_chunked_op(reduction, upcast):
    torch.manual_seed(1)
    dtype = torch.bfloat16 if upcast else torch.float32
    h = torch.randn(37, 16, dtype=dtype)
    w = torch.randn(50, 16, dtype=dtype)
    t = torch.randint(0, 50, (37,))
    t[::3] = -100
    logits = F.linear(h, w)
    args = (t, -100, reduction, 0.1, upcast, 8, True, True, False)
    got = torch.ops.fxmem.logits_cross_entropy(logits, h, w, None, *args)
    want = torch.ops.fxmem.linear_cross_entropy(h, w, None, *args)
    for a, e in zip(got[:3], want[:3]):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)
    # and against the plain loss
    hh, ww = h.float().requires_grad_(), w.float().requires_grad_()
    ref = F.cross_entropy(F.linear(hh, ww), t, ignore_index=-100, reduction=reduction, label_smoothing=0.1)
    ref.backward()
    tol = dict(rtol=2e-2, atol=2e-2) if upcast else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[0].float(), ref, **tol)
    torch.testing.assert_close(got[1].float(), hh.grad, **tol)
    with pytest.raises(ValueError, match="logits"):
        torch.ops.fxmem.logits_cross_entropy(logits[:5], h, w, None, *args)


VOCAB, TOKENS = 96, 24


@pytest.fixture(scope="module")
def llama_and_compiled():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=32,
                                   attn_implementation="sdpa")
    model = transformers.LlamaForCausalLM(cfg)
    backend = recording_backend(chunk={"chunk_tokens": 8})
    return model, torch.compile(model, backend=backend), backend


def _batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (2, TOKENS // 2), generator=g)
    labels = ids.clone()
    labels[torch.rand(labels.shape, generator=g) < 0.3] = -100
    return ids, labels


def _grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return grads


def _assert_equal_grads(got, want):
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)


def test_compiled_hf_model_runs_the_head_three_times_not_six(llama_and_compiled):
    """The compiled model returns the logits; the step reads only the loss (the usual training step)."""
    model, compiled, backend = llama_and_compiled
    ids, labels = _batch()
    want = _grads(model, model(input_ids=ids, labels=labels).loss)
    got = _grads(model, compiled(input_ids=ids, labels=labels).loss)
    _assert_equal_grads(got, want)
    stats = [r.stats for r in backend.recorder.records if r.name == "chunk"][-1]
    assert len(stats["regions"]) == 1
    chunks = -(-TOKENS // 8)

    def step():
        model.zero_grad(set_to_none=True)
        compiled(input_ids=ids, labels=labels).loss.backward()

    # the output's linear, then per chunk dlogits @ W and dlogits.T @ h; no zero-gradient matmuls
    assert head_matmuls(step, VOCAB) == 1 + 2 * chunks
    # eager runs the head three times too (forward, two in the backward)
    assert head_matmuls(lambda: model(input_ids=ids, labels=labels).loss.backward(), VOCAB) == 3


def test_logits_differentiated_by_the_caller_still_equal_eager(llama_and_compiled):
    """A loss that also uses the returned logits (a z-loss): their gradient is not zero, and counts."""
    model, compiled, _ = llama_and_compiled
    ids, labels = _batch()

    def total(m):
        out = m(input_ids=ids, labels=labels)
        return out.loss + 1e-2 * out.logits.logsumexp(-1).square().mean()

    _assert_equal_grads(_grads(model, total(compiled)), _grads(model, total(model)))


def test_compiled_step_calls_the_direct_twin_and_the_recorded_graph_keeps_the_op(llama_and_compiled):
    """Inductor's code calls ``fxmem::logits_cross_entropy_direct`` (no custom_op layers on the
    host, fxmem.kernels.direct); the forward graph explain shows keeps the op users know."""
    model, compiled, backend = llama_and_compiled
    ids, labels = _batch()
    compiled(input_ids=ids, labels=labels).loss.backward()  # compiled (once for the module)
    with torch.profiler.profile() as prof:
        compiled(input_ids=ids, labels=labels).loss.backward()
    names = {e.name for e in prof.events()}
    assert "fxmem::logits_cross_entropy_direct" in names and "fxmem::logits_cross_entropy" not in names
    targets = {str(n.target) for g in backend.recorder.final_graphs.values() for n in g.nodes}
    assert "fxmem.logits_cross_entropy.default" in targets
    assert not any(t.endswith("_direct.default") for t in targets)
