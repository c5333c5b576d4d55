"""The "shard" pass: metadata on per-rank graphs with functional collectives; a no-op elsewhere."""

import torch
from torch.fx.experimental.proxy_tensor import make_fx

import fxmem
from fxmem.passes.shard import COLLECTIVE_KEY, PLACEMENT_KEY, annotate, collective_kind, propagate_placements
from fxmem.pipeline import _passes


def _rank_graph():
    def f(x, w):
        y = x @ w
        r = torch.ops._c10d_functional.all_reduce(y, "sum", "0")
        return torch.ops._c10d_functional.wait_tensor(r).relu()

    return make_fx(f, tracing_mode="fake")(torch.randn(4, 8), torch.randn(8, 8))


def test_registered_before_lower_in_every_graph_stage():
    spec = next(s for s in _passes() if s.name == "shard")
    assert spec.stages == ("inference", "forward", "backward")
    assert spec.option is None


def test_marks_placements_and_collectives_without_changing_code():
    gm = _rank_graph()
    code = gm.code
    result = annotate(gm)
    assert result.changed is False and result.gm.code == code
    nodes = {n.name: n for n in result.gm.graph.nodes}
    assert nodes["mm"].meta[PLACEMENT_KEY] == "Partial(sum)"
    assert nodes["wait_tensor"].meta[PLACEMENT_KEY] == "Replicate()"
    assert nodes["all_reduce"].meta[COLLECTIVE_KEY]["bytes"] == 4 * 8 * 4
    assert result.stats["collectives"] == {"all_reduce": 1}
    assert result.stats["rows"][0]["input"] == "mm"


def test_no_op_without_collectives():
    gm = make_fx(lambda x: (x * 2).relu(), tracing_mode="fake")(torch.randn(3))
    result = annotate(gm)
    assert result.changed is False and result.stats == {}
    assert all(PLACEMENT_KEY not in n.meta for n in gm.graph.nodes)


def test_explain_runs_the_pass_on_plain_models():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU())
    report = fxmem.explain(model, torch.randn(2, 8))
    rows = [r for r in report.records if r.name == "shard"]
    assert rows and all(r.status == "unchanged" and r.stats == {} for r in rows)


def test_propagation_uses_dtensor_rules_for_a_megatron_mlp():
    from torch.distributed.tensor import Replicate, Shard

    def mlp(x, w1, w2):
        return torch.nn.functional.gelu(x @ w1.t()) @ w2.t()

    gm = make_fx(mlp, tracing_mode="fake")(torch.randn(4, 8), torch.randn(16, 8), torch.randn(8, 16))
    names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    prop = propagate_placements(gm, {names[1]: Shard(0), names[2]: Shard(1)}, 2)
    assert prop.collectives() == {"all_reduce": 1}          # the row-parallel output, at the graph output
    gelu = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.gelu.default)
    assert gelu.meta[PLACEMENT_KEY] == "S(1)" or gelu.meta[PLACEMENT_KEY] == str(Shard(1))
    assert collective_kind(Shard(0), Replicate()) == "all_gather"
    assert collective_kind(Replicate(), Shard(0)) is None
