"""fxmem::chunked_mlp equals eager's up [+ gate] → activation → down (output and every gradient)."""

import json

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from fxmem.kernels.chunked_mlp import auto_chunk_tokens, chunked_mlp

SILU_GATED = json.dumps([["silu", ["$1"], {}], ["mul", ["$2", "$0"], {}]])  # Llama: silu(gate) * up
# GPT-2's NewGELU as Dynamo records it: 0.5 * u * (1 + tanh(sqrt(2/pi) * (u + 0.044715 * u ** 3)))
GELU_NEW = json.dumps([["mul", [0.5, "$0"], {}], ["pow", ["$0", 3.0], {}], ["mul", [0.044715, "$2"], {}],
                       ["add", ["$0", "$3"], {}], ["mul", [0.7978845608028654, "$4"], {}], ["tanh", ["$5"], {}],
                       ["add", [1.0, "$6"], {}], ["mul", ["$1", "$7"], {}]])


def gelu_new(u):
    return 0.5 * u * (1.0 + torch.tanh(0.7978845608028654 * (u + 0.044715 * torch.pow(u, 3.0))))


def _params(d, inner, *, gated, bias, seed=0):
    g = torch.Generator().manual_seed(seed)

    def p(*shape):
        return (torch.randn(*shape, generator=g) / shape[-1] ** 0.5).requires_grad_()

    return {"up_w": p(inner, d), "up_b": p(inner) if bias else None, "gate_w": p(inner, d) if gated else None,
            "gate_b": None, "down_w": p(d, inner), "down_b": p(d) if bias else None}


def _rel(got, want):
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def _check(x, w, program, reference, chunk):
    want = F.linear(reference(F.linear(x, w["up_w"], w["up_b"]),
                              F.linear(x, w["gate_w"]) if w["gate_w"] is not None else None), w["down_w"], w["down_b"])
    got = chunked_mlp(x, w["up_w"], w["up_b"], w["gate_w"], w["gate_b"], w["down_w"], w["down_b"], program, chunk)
    assert got.shape == want.shape
    assert _rel(got, want) <= 1e-5
    leaves = [x, *[t for t in w.values() if t is not None]]
    g = torch.randn(want.shape, generator=torch.Generator().manual_seed(9))
    for g_got, g_want in zip(torch.autograd.grad(got, leaves, g), torch.autograd.grad(want, leaves, g)):
        assert _rel(g_got, g_want) <= 1e-5


@pytest.mark.parametrize("kind", ["silu_gated", "gelu_new", "gelu_erf", "relu"])
def test_equals_eager_fp32(kind):
    programs = {
        "silu_gated": (SILU_GATED, lambda u, g: F.silu(g) * u, True),
        "gelu_new": (GELU_NEW, lambda u, g: gelu_new(u), False),
        "gelu_erf": (json.dumps([["gelu", ["$0"], {"approximate": "none"}]]), lambda u, g: F.gelu(u), False),
        "relu": (json.dumps([["relu", ["$0"], {}], ["div", ["$1", 2.0], {}], ["sub", ["$2", "$0"], {}]]),
                 lambda u, g: F.relu(u) / 2.0 - u, False),
    }
    program, reference, gated = programs[kind]
    x = torch.randn(3, 13, 16, requires_grad=True)
    _check(x, _params(16, 40, gated=gated, bias=not gated), program, reference, chunk=8)


@settings(max_examples=15, deadline=None)
@given(n=st.integers(1, 30), chunk=st.integers(1, 40))
def test_any_chunk_size_equals_eager(n, chunk):
    """Chunk sizes that do not divide the token count (and larger than it) give eager's numbers."""
    x = torch.randn(n, 8, generator=torch.Generator().manual_seed(n)).requires_grad_()
    _check(x, _params(8, 20, gated=True, bias=False, seed=chunk), SILU_GATED, lambda u, g: F.silu(g) * u, chunk)


def test_opcheck_forward_and_backward_with_a_transposed_weight():
    """GPT-2's Conv1D passes ``W.t()``: the fake implementations must give the real ops' strides."""
    w = _params(8, 24, gated=False, bias=True)
    down_t = torch.randn(24, 8).t().requires_grad_()  # [8, 24] with transposed strides
    x = torch.randn(2, 5, 8, requires_grad=True)
    args = (x, w["up_w"], w["up_b"], None, None, down_t, w["down_b"], GELU_NEW, 4)
    torch.library.opcheck(torch.ops.fxmem.chunked_mlp.default, args)
    grad = torch.randn(2, 5, 8)
    torch.library.opcheck(torch.ops.fxmem.chunked_mlp_backward.default, (grad, *args[:-2], GELU_NEW, 4, True, True),
                          test_utils=("test_schema", "test_faketensor"))


def test_a_program_with_an_unknown_step_is_refused():
    w = _params(8, 16, gated=False, bias=False)
    with pytest.raises(ValueError, match="accepted names"):
        chunked_mlp(torch.randn(4, 8), w["up_w"], None, None, None, w["down_w"], None, '[["softplus", ["$0"], {}]]', 2)


def test_auto_chunk_is_msts_rule():
    # MsT: ceil(I / d) mini-sequences; 2048 tokens, d 256, I 1024 -> 4 chunks of 512 rows
    assert auto_chunk_tokens(2048, 1024, 256) == 512
    assert auto_chunk_tokens(10, 128, 32) == 64


@pytest.mark.parametrize("gated", [False, True], ids=["gelu", "silu_gated"])
def test_forward_workspace_is_what_the_op_allocates_beside_its_output(gated):
    """fit adds :func:`forward_workspace_bytes` on top of the live bytes where the op runs: it must
    be what the op really allocates (measured by the allocator), and a chunk's activation must be
    gone before the next chunk's projections are made (it used to stay: one chunk more)."""
    from fxmem.kernels.chunked_mlp import forward_workspace_bytes
    from fxmem.measure import peak_memory

    d, inner, rows = 64, 256, 4096
    w = {k: (v.detach() if v is not None else None) for k, v in _params(d, inner, gated=gated, bias=not gated).items()}
    x = torch.randn(rows, d)
    program = SILU_GATED if gated else json.dumps([["gelu", ["$0"], {}]])
    args = (x, w["up_w"], w["up_b"], w["gate_w"], w["gate_b"], w["down_w"], w["down_b"], program, 0)
    with torch.no_grad():
        chunked_mlp(*args)
        peak, out = peak_memory(lambda: chunked_mlp(*args), device="cpu")
    assert auto_chunk_tokens(rows, inner, d) < rows  # several chunks, so the previous one matters
    assert peak.peak_bytes == out.numel() * out.element_size() + forward_workspace_bytes(*args)
