"""The "shard" pass: metadata on per-rank graphs with functional collectives; a no-op elsewhere."""

import torch
from torch.fx.experimental.proxy_tensor import make_fx

import fxmem
from fxmem.analysis.placement import PLACEMENT_KEY
from fxmem.passes.shard import COLLECTIVE_KEY, annotate
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
