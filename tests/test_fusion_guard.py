"""fxmem.fusion_guard, measured: (1, with remat's matmul sinking) the recomputed activation of an
MLP is consumed and freed before the input gradient is allocated; (2) a layer's attention-mask-like
buffer, made from a small input, is not allocated at the first layer by a fusion with the other
layers' ones; and the guard is Inductor's only while it compiles fxmem's graphs.

The model for (1) is the smallest that shows it: ``Linear(D, H) → GELU → Linear(H, D)``; fxmem
saves the pre-activation and recomputes the GELU in the backward, for the second layer's weight
gradient. The model for (2) is :class:`_Masked`.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch._inductor import config as inductor_config

import fxmem
import fxmem.fusion_guard as fusion_guard
from fxmem.measure import peak_memory, training_step_peak
from fxmem.passes import remat

N, D, H = 1024, 64, 512
HIDDEN_BYTES = N * H * 4


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(D, H), torch.nn.GELU(), torch.nn.Linear(H, D))


def _run(model: torch.nn.Module, fn) -> tuple[int, dict]:
    x = torch.randn(N, D, generator=torch.Generator().manual_seed(1))

    def step() -> None:
        for p in model.parameters():
            p.grad = None
        fn(x).pow(2).mean().backward()

    step()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return training_step_peak(step).peak_bytes, grads


def _fxmem(model: torch.nn.Module):
    torch._dynamo.reset()
    return torch.compile(model, backend=fxmem.backend())


@pytest.fixture(scope="module")
def measured():
    """Peaks and gradients: eager, fxmem, and fxmem with the guard and the sinking turned off."""
    eager_model = _model()
    eager = _run(eager_model, eager_model)
    model = _model()
    on = _run(model, _fxmem(model))
    # a cache hit would serve the guarded compile's code: the patched guard is not in the key
    with pytest.MonkeyPatch.context() as mp, inductor_config.patch(fx_graph_cache=False):
        mp.setattr(fusion_guard, "delays_recomputation", lambda node1, node2: False)
        mp.setattr(remat, "sink_compute", lambda graph, parameters: 0)
        model = _model()
        off = _run(model, _fxmem(model))
    return {"eager": eager, "on": on, "off": off}


def test_recomputed_activation_is_freed_before_the_input_gradient_exists(measured):
    on, off = measured["on"][0], measured["off"][0]
    # without: the recomputed GELU, the input gradient and the pre-activation ([N, H] each) are
    # alive together; with: two of them (the [H, D] weight gradient, 1/16 of one, exists earlier)
    assert on <= off - 0.9 * HIDDEN_BYTES, (off, on)


def test_gradients_equal_eager(measured):
    for key, want in measured["eager"][1].items():
        torch.testing.assert_close(measured["on"][1][key], want, atol=1e-5, rtol=1e-4)


class _Masked(torch.nn.Module):
    """Each layer makes its own ``[B, T, T]`` mixing matrix from the small ``[B, T]`` input ``x``
    (as an attention layer makes its dense mask) and applies it with a matmul, which needs it
    materialized. The matrices read only ``x``, so Inductor fuses them side by side into one
    kernel at the first layer: all ``L`` alive from there (torch 2.11 and 2.13)."""

    B, T, D, L = 8, 128, 64, 4
    MASK_BYTES = B * T * T * 4

    def __init__(self) -> None:
        super().__init__()
        self.ws = torch.nn.ParameterList(torch.nn.Parameter(torch.randn(self.D, self.D) / self.D**0.5) for _ in range(self.L))

    def forward(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        for i, w in enumerate(self.ws):
            mix = (x[:, :, None] * x[:, None, :] * (i + 1)).tanh() / self.T
            h = torch.relu(torch.bmm(mix, h) @ w)
        return h


def _masked_inference_peak(model: torch.nn.Module, fn) -> tuple[int, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    h, x = torch.randn(_Masked.B, _Masked.T, _Masked.D, generator=g), torch.randn(_Masked.B, _Masked.T, generator=g)
    with torch.no_grad():
        fn(h, x)
        peak, out = peak_memory(lambda: fn(h, x))
        torch.testing.assert_close(out, model(h, x), atol=1e-5, rtol=1e-4)
    return peak.peak_bytes, out


def test_a_layers_mask_is_not_made_at_the_first_layer(monkeypatch):
    torch.manual_seed(0)
    model = _Masked().eval()
    with inductor_config.patch(fx_graph_cache=False):  # the patched rule is not in the cache key
        guarded, _ = _masked_inference_peak(model, _fxmem(model))
        monkeypatch.setattr(fusion_guard, "hoists_outputs", lambda node1, node2, shared: False)
        unguarded, _ = _masked_inference_peak(model, _fxmem(model))
    # unguarded: the L masks alive together at the first layer (measured 4.5 masks' bytes);
    # guarded: one at a time, with h's buffers (quarter-size) and the matmuls' scratch (2.0)
    assert unguarded >= _Masked.L * _Masked.MASK_BYTES, unguarded
    assert guarded <= 2.5 * _Masked.MASK_BYTES, (guarded, unguarded)


def test_guard_is_installed_for_fxmems_compiles_only(monkeypatch):
    from torch._inductor.choices import InductorChoices
    from torch._inductor.graph import GraphLowering
    from torch._inductor.virtualized import V

    seen = []
    codegen = GraphLowering.codegen

    def recording(self, *args, **kwargs):
        seen.append(isinstance(V.choices, fusion_guard.MemoryFusionGuard))
        return codegen(self, *args, **kwargs)

    monkeypatch.setattr(GraphLowering, "codegen", recording)
    model = _model()
    x = torch.randn(8, D)
    with inductor_config.patch(fx_graph_cache=False):  # a cache hit skips codegen
        _fxmem(model)(x).sum().backward()  # the backward is compiled here, possibly lazily
    assert seen == [True, True], seen  # forward and backward
    seen.clear()
    torch._dynamo.reset()
    with inductor_config.patch(fx_graph_cache=False), torch.no_grad():
        _fxmem(model)(x)
    assert seen == [True], seen  # an inference graph
    assert not isinstance(V.choices, fusion_guard.MemoryFusionGuard)  # nothing left behind
    assert type(V.choices) is InductorChoices

    seen.clear()
    torch._dynamo.reset()
    with inductor_config.patch(fx_graph_cache=False):  # a cache hit skips codegen
        torch.compile(copy.deepcopy(model))(x).sum().backward()
    assert seen and not any(seen), seen  # plain torch.compile: Inductor's own heuristics
