"""analysis.workspace: an op's own allocations, counted by the timeline where the op runs."""

from __future__ import annotations

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

import fxmem  # noqa: F401  (registers fxmem's custom ops)
from fxmem.analysis.timeline import step_timeline
from fxmem.analysis.workspace import op_workspace
from fxmem.kernels.linear_ce import workspace_bytes
from fxmem.measure import peak_memory

N, D, VOCAB, CHUNK = 512, 32, 4096, 128


def _loss_graph(logits_given: bool):
    def chunked_loss(hidden, weight, target):
        args = (-100, "mean", 0.0, False, CHUNK, True, True, False)
        if logits_given:
            logits = torch.nn.functional.linear(hidden, weight)
            return torch.ops.fxmem.logits_cross_entropy(logits, hidden, weight, None, target, *args)
        return torch.ops.fxmem.linear_cross_entropy(hidden, weight, None, target, *args)

    g = torch.Generator().manual_seed(0)
    inputs = (torch.randn(N, D, generator=g), torch.randn(VOCAB, D, generator=g), torch.randint(0, VOCAB, (N,), generator=g))
    return make_fx(chunked_loss, tracing_mode="fake")(*inputs), inputs


@pytest.mark.parametrize("logits_given", [False, True], ids=["linear_cross_entropy", "logits_cross_entropy"])
def test_the_timeline_counts_the_chunked_loss_workspace_as_the_allocator_sees_it(logits_given):
    gm, inputs = _loss_graph(logits_given)
    loss_node = next(n for n in gm.graph.nodes if "cross_entropy" in str(n.target))
    expected = workspace_bytes(CHUNK, VOCAB, D, hidden_dtype=torch.float32, weight_dtype=torch.float32, upcast=False,
                               need_grad=True, need_weight=True, logits_given=logits_given)
    assert op_workspace(loss_node) == expected == CHUNK * VOCAB * 4  # one fp32 chunk of logits

    timeline = step_timeline(gm, None, 1)
    at_loss = dict((name, live) for _, name, live in timeline.points)[loss_node.name]
    assert timeline.peak_node == loss_node.name and timeline.peak_bytes == at_loss
    assert "workspace" in {t.kind for t in timeline.live_at_peak}
    gm(*inputs)
    measured, _ = peak_memory(lambda: gm(*inputs), device="cpu")
    estimate = timeline.peak_bytes - timeline.input_bytes
    # op by op (codegen="eager") the estimate is the allocator's count, up to a chunk's row vectors
    assert estimate <= measured.peak_bytes <= estimate + 64 * CHUNK * 4, (estimate, measured.peak_bytes)


def test_an_op_without_workspace_adds_nothing():
    gm = make_fx(lambda x: torch.nn.functional.linear(x, x), tracing_mode="fake")(torch.randn(4, 4))
    assert all(op_workspace(n) == 0 for n in gm.graph.nodes)
