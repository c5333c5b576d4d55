import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from fxmem.analysis import graph_cost, is_compute_bound, node_bytes_moved, node_flops
from fxmem.testing.graphs import inference_graph

aten = torch.ops.aten


def _nodes(gm, target):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target == target]


def test_matmul_flops_are_2mnk():
    gm = inference_graph(lambda a, b: a @ b, torch.randn(8, 16), torch.randn(16, 4))
    (mm,) = _nodes(gm, aten.mm.default)
    assert node_flops(mm) == 2 * 8 * 16 * 4
    assert is_compute_bound(mm)


def test_addmm_bmm_and_convolution():
    lin = torch.nn.Linear(16, 4)
    gm = inference_graph(lambda x: lin(x), torch.randn(8, 16), module=lin)
    (addmm,) = _nodes(gm, aten.addmm.default)
    assert node_flops(addmm) == 2 * 8 * 16 * 4
    gm = inference_graph(lambda a, b: torch.bmm(a, b), torch.randn(3, 8, 16), torch.randn(3, 16, 4))
    assert node_flops(_nodes(gm, aten.bmm.default)[0]) == 3 * 2 * 8 * 16 * 4
    conv = torch.nn.Conv2d(3, 8, 3)
    gm = inference_graph(lambda x: conv(x), torch.randn(1, 3, 10, 10), module=conv)
    (c,) = _nodes(gm, aten.convolution.default)
    assert node_flops(c) == 2 * (8 * 8 * 8) * (3 * 3 * 3)


def test_cpu_flash_attention_is_priced_where_flop_counter_says_zero():
    q, k, v = (torch.randn(2, 4, 16, 8) for _ in range(3))
    with FlopCounterMode(display=False) as counter:
        F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert counter.get_total_flops() == 0  # the blind spot fxmem's cost model covers
    gm = inference_graph(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), q, k, v)
    (sdpa,) = _nodes(gm, aten._scaled_dot_product_flash_attention_for_cpu.default)
    # two matmuls (QK^T and PV) of B·H·T·T·D multiply-adds each
    assert node_flops(sdpa) == 2 * (2 * 2 * 4 * 16 * 16 * 8)
    assert is_compute_bound(sdpa)


def test_pointwise_ops_cost_bytes_not_flops():
    gm = inference_graph(lambda x: torch.relu(x) * 2, torch.randn(32, 32))
    (relu,) = _nodes(gm, aten.relu.default)
    assert node_flops(relu) == 0 and not is_compute_bound(relu)
    assert node_bytes_moved(relu) == 2 * 32 * 32 * 4
    cost = graph_cost(gm)
    assert cost.flops == 0 and cost.matmul_nodes == 0 and cost.bytes_moved == 4 * 32 * 32 * 4


def test_fused_cost_charges_what_inductors_kernels_move():
    """A pointwise chain is one kernel: it reads x once and writes its output once; a view moves
    nothing; a matmul reads its inputs (through the views in front of it) and writes its output."""
    x, w = torch.randn(64, 32), torch.randn(16, 32)
    n = 64 * 32 * 4
    gm = inference_graph(lambda x: (torch.relu(x) * 2 + 1).sin(), x)
    assert graph_cost(gm).bytes_moved == 4 * 2 * n  # op by op: four ops, each reads and writes
    assert graph_cost(gm, fused=True).bytes_moved == 2 * n
    gm = inference_graph(lambda x, w: (x.exp() @ w.t()).t().contiguous(), x, w)
    out = 64 * 16 * 4
    # exp: reads x, writes its buffer (the matmul is an extern kernel: its input must exist);
    # mm: reads exp's buffer and w through the transpose, writes; the copy after .t(): reads, writes
    assert graph_cost(gm, fused=True).bytes_moved == 2 * n + (n + w.nbytes + out) + 2 * out


def test_an_op_that_moves_more_inside_itself_says_so():
    from fxmem.analysis.cost import internal_bytes
    from fxmem.kernels.linear_ce import chunked_linear_cross_entropy

    h, w, t = torch.randn(128, 16), torch.randn(512, 16), torch.randint(0, 512, (128,))
    gm = inference_graph(lambda h, w, t: chunked_linear_cross_entropy(h, w, t), h, w, t)
    (op,) = [n for n in gm.graph.nodes if "linear_cross_entropy" in str(n.target)]
    assert internal_bytes(op) > 128 * 512 * 4  # at least the logits written once
    assert node_bytes_moved(op) > internal_bytes(op)
    assert graph_cost(gm, fused=True).bytes_moved >= internal_bytes(op)
