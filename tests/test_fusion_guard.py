"""fxmem.fusion_guard (with remat's matmul sinking): the recomputed activation of an MLP is consumed
and freed before the input gradient is allocated — measured — and the guard is Inductor's only
while it compiles fxmem's graphs.

The model is the smallest that shows it: ``Linear(D, H) → GELU → Linear(H, D)``; fxmem saves the
pre-activation and recomputes the GELU in the backward, for the second layer's weight gradient.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch._inductor import config as inductor_config

import fxmem
import fxmem.fusion_guard as fusion_guard
from fxmem.measure import training_step_peak
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


def test_guard_is_installed_for_fxmems_compiles_only(monkeypatch):
    from torch._inductor.choices import InductorChoices
    from torch._inductor.graph import GraphLowering
    from torch._inductor.virtualized import V

    seen = []
    codegen = GraphLowering.codegen

    def recording(self, *args, **kwargs):
        seen.append(isinstance(V.choices, fusion_guard.RecomputeFusionGuard))
        return codegen(self, *args, **kwargs)

    monkeypatch.setattr(GraphLowering, "codegen", recording)
    model = _model()
    x = torch.randn(8, D)
    with inductor_config.patch(fx_graph_cache=False):  # a cache hit skips codegen
        _fxmem(model)(x).sum().backward()  # the backward is compiled here, possibly lazily
    assert seen == [True, True], seen  # forward and backward
    assert not isinstance(V.choices, fusion_guard.RecomputeFusionGuard)  # nothing left behind
    assert type(V.choices) is InductorChoices

    seen.clear()
    torch._dynamo.reset()
    with inductor_config.patch(fx_graph_cache=False):  # a cache hit skips codegen
        torch.compile(copy.deepcopy(model))(x).sum().backward()
    assert seen and not any(seen), seen  # plain torch.compile: Inductor's own heuristics
