"""One tensor-parallel rank's share of every node of a joint graph (fit's per-rank activations)."""

from __future__ import annotations

import torch

import fxmem
from fxmem.analysis.local_sizes import tp_local_sizes
from fxmem.analysis.sizes import local_sizes, node_bytes
from fxmem.passes.remat import trace_joint
from fxmem.testing.tp import TwoLayerMLP

aten = torch.ops.aten


def _shares():
    torch.manual_seed(0)
    model = TwoLayerMLP()  # the Megatron MLP: fc_in (column-parallel) → GELU → fc_out
    x = torch.randn(8, 16, requires_grad=True)  # as in a model: the MLP's input has a gradient
    plan = fxmem.shard.plan(model, x, world_size=2)
    assert [g.rowwise for g in plan.groups] == ["fc_out"]  # fc_in → fc_out, the Megatron pair
    joint = trace_joint(model, x)
    names = dict(enumerate(dict(model.named_parameters(remove_duplicate=False))))
    local = tp_local_sizes(joint.graph_module, names, plan, 2, joint.num_fwd_outputs)
    return model, joint, local


def _matmuls_of(gm, w):
    """The matmuls reading a weight through its transposes, in graph order (forward, then backward)."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    found, todo = set(), [w]
    while todo:
        for u in todo.pop().users:
            if u.target in (aten.mm.default, aten.addmm.default):
                found.add(u)
            elif u.target in (aten.t.default, aten.permute.default):
                todo.append(u)
    return sorted(found, key=order.__getitem__)


def test_megatron_mlp_shares_against_a_hand_count():
    model, joint, local = _shares()
    gm = joint.graph_module
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    weight = {name: placeholders[i] for i, name in enumerate(dict(model.named_parameters()))}

    up_fwd, up_bwd = _matmuls_of(gm, weight["fc_in.weight"])
    (down_fwd, down_bwd) = _matmuls_of(gm, weight["fc_out.weight"])
    share = {n: local.fractions[n][1] for n in local.fractions}
    # forward: the column-parallel product and its GELU are half on each rank; the row-parallel
    # product is all-reduced: whole
    assert share[up_fwd.name] == 0.5
    gelu_nodes = [n for n in gm.graph.nodes if n.target in (aten.gelu.default, aten.erf.default)]
    assert gelu_nodes and all(share[n.name] == 0.5 for n in gelu_nodes)
    assert share[down_fwd.name] == 1.0
    # backward: the hidden gradient (row-parallel layer's input) is half; the input gradient of
    # the column-parallel layer is all-reduced at its boundary: whole
    assert share[down_bwd.name] == 0.5
    assert share[up_bwd.name] == 1.0
    # one all-reduce in the forward (down's output), one in the backward (up's input gradient),
    # both in place (Inductor's clone reuses the dying partial product): no buffer beside them
    assert local.collectives == {"all_reduce": 2}
    assert not local.transients and not local.no_rule
    # the gradients: sharded parameters' are shards, the row-parallel bias's is whole
    (output,) = [n for n in gm.graph.nodes if n.op == "output"]
    grads = dict(zip(dict(model.named_parameters()), output.args[0][joint.num_fwd_outputs:]))
    assert [share[grads[k].name] for k in ("fc_in.weight", "fc_in.bias", "fc_out.weight", "fc_out.bias")] == [0.5, 0.5, 0.5, 1.0]


def test_node_bytes_is_a_ranks_share_only_inside_local_sizes():
    _, joint, local = _shares()
    (up_fwd,) = [n for n in joint.graph_module.graph.nodes if n.name in local.fractions
                 and n.target == aten.addmm.default and local.fractions[n.name][1] == 0.5][:1]
    whole = 8 * 64 * 4
    assert node_bytes(up_fwd) == whole
    with local_sizes(local):
        assert node_bytes(up_fwd) == whole // 2
    assert node_bytes(up_fwd) == whole


def test_collective_outputs_listed_and_the_embeddings_banned_from_recompute():
    """The nodes a collective makes on a rank (the row-parallel product all-reduced in the forward,
    the column-parallel input gradient all-reduced in the backward) are listed; fit marks the
    non-matmul ones (the vocabulary split's embedding lookup, all-reduced) not recomputable in its
    own joint graph, as the rank's partitioner cannot recompute them: fit recomputed the lookup
    where the rank saves it (0.25 MB low on the medium GPT). Matmuls are left to remat."""
    from torch.utils.checkpoint import CheckpointPolicy

    from fxmem.analysis.local_sizes import LocalSizes
    from fxmem.fit import ban_collective_recompute

    model, joint, local = _shares()
    gm = joint.graph_module
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    weight = {name: placeholders[i] for i, name in enumerate(dict(model.named_parameters()))}
    down_fwd = _matmuls_of(gm, weight["fc_out.weight"])[0]
    up_bwd = _matmuls_of(gm, weight["fc_in.weight"])[1]
    assert sorted(local.collective_outputs) == sorted([down_fwd.name, up_bwd.name])
    assert ban_collective_recompute(gm, local) == 0  # both matmuls

    emb_model = torch.nn.Sequential(torch.nn.Embedding(64, 16), torch.nn.Linear(16, 16))
    ids = torch.randint(0, 64, (2, 8))
    emb_joint = trace_joint(emb_model, ids).graph_module
    (lookup,) = [n for n in emb_joint.graph.nodes if n.target == aten.embedding.default]
    (product,) = [n for n in emb_joint.graph.nodes if n.target in (aten.mm.default, aten.addmm.default)][:1]
    listed = LocalSizes(collective_outputs=[lookup.name, product.name])
    assert ban_collective_recompute(emb_joint, listed) == 1
    marked = {n.name for n in emb_joint.graph.nodes if n.meta.get("recompute") == CheckpointPolicy.MUST_SAVE}
    assert marked == {lookup.name}
