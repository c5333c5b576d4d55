"""Placement propagation (``fxmem.analysis.placement``): DTensor's rules over a global graph,
read-only; and the DTensor rules fxmem adds, registered only when asked."""

import subprocess
import sys

import torch
from torch.fx.experimental.proxy_tensor import make_fx

from fxmem.analysis.placement import PLACEMENT_KEY, REDISTRIBUTE_KEY, collective_kind, propagate_placements


def _mlp_graph():
    def mlp(x, w1, w2):
        return torch.nn.functional.gelu(x @ w1.t()) @ w2.t()

    return make_fx(mlp, tracing_mode="fake")(torch.randn(4, 8), torch.randn(16, 8), torch.randn(8, 16))


def test_propagation_uses_dtensor_rules_for_a_megatron_mlp():
    from torch.distributed.tensor import Replicate, Shard

    gm = _mlp_graph()
    names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    prop = propagate_placements(gm, {names[1]: Shard(0), names[2]: Shard(1)}, 2)
    assert prop.collectives() == {"all_reduce": 1}          # the row-parallel output, at the graph output
    gelu = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.gelu.default)
    assert prop.placements[gelu.name] == Shard(1)
    assert collective_kind(Shard(0), Replicate()) == "all_gather"
    assert collective_kind(Replicate(), Shard(0)) is None


def test_propagation_is_read_only_and_annotate_writes_it():
    from torch.distributed.tensor import Shard

    gm = _mlp_graph()
    code = gm.code
    metas = [dict(n.meta) for n in gm.graph.nodes]
    names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    prop = propagate_placements(gm, {names[1]: Shard(0), names[2]: Shard(1)}, 2)
    assert gm.code == code and [dict(n.meta) for n in gm.graph.nodes] == metas
    prop.annotate(gm)
    gelu = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.gelu.default)
    assert gelu.meta[PLACEMENT_KEY] == str(Shard(1))
    output = next(n for n in gm.graph.nodes if n.op == "output")
    assert [r.kind for r in output.meta[REDISTRIBUTE_KEY]] == ["all_reduce"]
    prop.annotate(gm)  # again: the same, not appended twice
    assert [r.kind for r in output.meta[REDISTRIBUTE_KEY]] == ["all_reduce"]


def test_dtensor_rules_are_registered_only_when_asked_and_once():
    code = (
        "import fxmem, fxmem.shard, fxmem.passes.shard, fxmem.analysis.placement\n"
        "from fxmem import dtensor_rules\n"
        "assert not dtensor_rules.registered(), 'importing fxmem registered DTensor rules'\n"
        "dtensor_rules.register(); dtensor_rules.register()\n"
        "assert dtensor_rules.registered()\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
