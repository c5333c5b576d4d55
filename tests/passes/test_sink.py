"""fxmem.passes._sink: a backward's input-gradient matmul waits until the recomputed activation
is consumed, the estimated peak never rises, and the numbers are the same."""

from __future__ import annotations

import copy
import operator

import torch
import torch.fx as fx

from fxmem.analysis.timeline import step_timeline
from fxmem.passes import remat
from fxmem.passes._sink import sink_compute

D, H, N = 16, 256, 64


def _mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(D, H), torch.nn.GELU(), torch.nn.Linear(H, D))


def _mms(bw: fx.GraphModule) -> list[fx.Node]:
    return [n for n in bw.graph.nodes if n.target is torch.ops.aten.mm.default]


def _partition(monkeypatch=None):
    model, x = _mlp(), torch.randn(N, D)
    j = remat.trace_joint(model, x)
    if monkeypatch is not None:
        monkeypatch.setattr(remat, "sink_compute", lambda graph, params: 0)
    res = remat.rematerialize(copy.deepcopy(j.graph_module), remat.RematConfig(), num_fwd_outputs=j.num_fwd_outputs,
                              static_lifetime_input_indices=j.static_lifetime_input_indices)
    return model, x, j, res


def _recomputed_gelu(bw: fx.GraphModule) -> fx.Node:
    return next(n for n in bw.graph.nodes if n.meta.get("fxmem_recomputed") and n.target is torch.ops.aten.gelu.default)


def test_input_gradient_matmul_sinks_below_the_recomputed_activations_consumer(monkeypatch):
    _, _, _, after = _partition()
    bw = after.backward
    order = {n: i for i, n in enumerate(bw.graph.nodes)}
    gelu = _recomputed_gelu(bw)
    (wgrad,) = [m for m in _mms(bw) if any(a is gelu or gelu in a.all_input_nodes for a in m.all_input_nodes)]
    dgrad = next(m for m in _mms(bw) if m.args[0].op == "placeholder" and m is not wgrad and order[m] < order[gelu] + 10)
    # the recomputed GELU is read by the down projection's weight gradient before the input
    # gradient of that projection (a [N, H] tensor) is computed
    assert order[gelu] < order[wgrad] < order[dgrad], [n.name for n in bw.graph.nodes]

    with monkeypatch.context() as m:
        _, _, _, before = _partition(m)
    before_order = {n.name: i for i, n in enumerate(before.backward.graph.nodes)}
    assert before_order[dgrad.name] < before_order[gelu.name]  # autograd's order: what the pass changed

    def backward_peak(res) -> int:
        timeline = step_timeline(res.forward, res.backward, 1, fused=True, reuse=True)  # as Inductor runs it
        return max(p[2] for p in timeline.points if p[0] == "backward")

    # one [N, H] buffer fewer at the backward's peak (less the [H, D] weight gradient, now earlier)
    assert backward_peak(after) <= backward_peak(before) - N * H * 4 + H * D * 4, (backward_peak(before), backward_peak(after))


def test_sunk_backward_gives_the_same_gradients():
    model, x, j, res = _partition()
    fw_out = res.forward(*j.primals)
    out, saved = fw_out[: j.num_fwd_outputs], fw_out[j.num_fwd_outputs:]
    tangent = 2 * out[0] / out[0].numel()
    grads = res.backward(*saved, tangent)
    model(x).pow(2).mean().backward()
    expected = [p.grad for p in model.parameters()]
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_nothing_moves_when_an_input_would_live_longer():
    """``a`` dies at ``mm``: sinking ``mm`` below ``b`` would keep ``a`` alive longer, so it stays."""
    graph = fx.Graph()
    a = graph.placeholder("a")
    w = graph.placeholder("w")
    mm = graph.call_function(torch.ops.aten.mm.default, (a, w))
    b = graph.call_function(torch.ops.aten.mul.Tensor, (w, 2.0))
    out = graph.call_function(torch.ops.aten.add.Tensor, (mm, b))
    graph.output((out,))
    for node, shape in ((a, (8, 8)), (w, (8, 8)), (mm, (8, 8)), (b, (8, 8)), (out, (8, 8))):
        node.meta["val"] = torch.empty(shape, device="meta")
    assert sink_compute(graph, parameters={w}) == 0
    assert sink_compute(graph, parameters={a, w}) == 1  # with ``a`` a parameter it is free to sink
    assert list(graph.nodes)[2:4] == [b, mm]


def _attention_between(barrier: bool) -> tuple[fx.Graph, fx.Node, fx.Node]:
    """``mm`` then a recomputed SDPA (``dropout_p=0``; the op is tagged random all the same), then
    ``mm``'s reader; with ``barrier`` an in-place op sits between them too."""
    graph = fx.Graph()
    a, w, q = graph.placeholder("a"), graph.placeholder("w"), graph.placeholder("q")
    mm = graph.call_function(torch.ops.aten.mm.default, (a, w))
    attn = graph.call_function(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default, (q, q, q, 0.0, True))
    out_attn = graph.call_function(operator.getitem, (attn, 0))
    nodes = [(a, (8, 8)), (w, (8, 8)), (q, (1, 2, 8, 4)), (mm, (8, 8)), (out_attn, (1, 2, 8, 4))]
    if barrier:
        mutated = graph.call_function(torch.ops.aten.add_.Tensor, (q, 1.0))
        nodes.append((mutated, (1, 2, 8, 4)))
    out = graph.call_function(torch.ops.aten.add.Tensor, (mm, a))  # ``a`` lives down there anyway
    nodes.append((out, (8, 8)))
    graph.output((out, out_attn))
    for node, shape in nodes:
        node.meta["val"] = torch.empty(shape, device="meta")
    attn.meta["val"] = (torch.empty(1, 2, 8, 4, device="meta"), torch.empty(1, 2, 8, device="meta"))
    return graph, mm, out


def test_a_matmul_sinks_past_a_recomputed_attention_but_not_past_a_mutation():
    """4 SDPA blocks at budget 0.0: every SDPA forward op is tagged ``nondeterministic_seeded``
    (for its dropout), and the recomputed attention pinned the input gradient above it — 9 MiB on
    the step's peak (210.2 against 186.2 MiB). Moving a pure matmul across a random op changes no
    value nor the order of the draws; across a mutation it could."""
    graph, mm, out = _attention_between(barrier=False)
    assert sink_compute(graph, parameters={graph.find_nodes(op="placeholder")[1]}) == 1
    assert mm.next is out
    graph, mm, out = _attention_between(barrier=True)
    assert sink_compute(graph, parameters={graph.find_nodes(op="placeholder")[1]}) == 0
