import torch

from fxmem.analysis import estimate_peak, parameter_bytes, storage_root, unique_storage_bytes
from fxmem.capture import capture_inference
from fxmem.testing import sample
from fxmem.testing.graphs import inference_graph

aten = torch.ops.aten


def test_peak_of_a_chain_by_hand():
    # x (4 KiB, live throughout) → a = x+1 (4 KiB) → b = a*2 (a freed after) → c = b.sum()
    gm = inference_graph(lambda x: ((x + 1) * 2).sum(), torch.randn(32, 32))
    est = estimate_peak(gm)
    assert est.input_bytes == 4096
    assert est.peak_bytes == 3 * 4096  # x, a and b are live together while b is computed


def test_views_allocate_nothing():
    gm = inference_graph(lambda x: (x + 1).view(-1).unsqueeze(0).sum(), torch.randn(32, 32))
    assert estimate_peak(gm).peak_bytes == 2 * 4096 + 4  # x, x + 1 and the 4-byte sum; no view adds
    views = [n for n in gm.graph.nodes if n.target in (aten.view.default, aten.unsqueeze.default)]
    add = next(n for n in gm.graph.nodes if n.target == aten.add.Tensor)
    assert views and all(storage_root(v) is add for v in views)
    assert unique_storage_bytes(views + [add]) == 4096


def test_parameter_bytes_count_tied_storage_once():
    s = sample("tied_embeddings")
    s.model.eval()
    gm = capture_inference(s.model, s.args, None, {}).gm
    model_bytes = sum(p.numel() * 4 for p in s.model.parameters())  # parameters() dedups ties
    assert parameter_bytes(gm) == model_bytes
