"""The dependency analysis: which dimensions are coupled, which spaces are prunable groups."""

import pytest
import torch
import torch.nn as nn

from fxmem.analysis.dependencies import Spaces, analyze, dim_index
from fxmem.backend import DECOMPOSITIONS
from fxmem.capture import capture_inference
from fxmem.testing.samples import sample


def _graph(model, *args, kwargs=None):
    model.eval()
    return capture_inference(model, args, kwargs, DECOMPOSITIONS).gm


def _groups(model, *args, kwargs=None):
    return analyze(_graph(model, *args, kwargs=kwargs)).groups()


def _weights(group):
    return {(m.node.meta["fxmem_fqn"], m.dim) for m in group.mentions}


def test_spaces_refine_and_unify():
    sp = Spaces()
    a = sp.new(64)
    h, d = sp.new(4), sp.new(16)
    assert sp.unify([a], [h, d])          # a 64-wide dim viewed as [4, 16]
    assert sp.resolve([a]) == [sp.find(h), sp.find(d)]
    g, r = sp.new(2), sp.new(2)
    assert sp.unify([h], [g, r])          # heads = kv groups × repeats (GQA)
    assert sp.resolve([a]) == [sp.find(g), sp.find(r), sp.find(d)]
    sp.block([r], "test")
    assert sp.is_blocked(r) and not sp.is_blocked(g)
    assert not sp.unify([sp.new(6)], [sp.new(4)])  # 6 does not factor through 4


def test_dim_index_keeps_whole_blocks():
    sizes = {0: 4, 1: 16}
    idx = dim_index([0, 1], sizes, {0: torch.tensor([1, 3])})
    assert idx.tolist() == list(range(16, 32)) + list(range(48, 64))
    assert dim_index([0, 1], sizes, {}) is None


def test_mlp_groups_couple_producer_bias_and_consumer():
    s = sample("mlp")
    groups = _groups(s.model, *s.args)
    assert [g.kind for g in groups] == ["mlp", "mlp"]
    assert _weights(groups[0]) == {("fc1.weight", 0), ("fc1.bias", 0), ("fc2.weight", 1)}
    assert _weights(groups[1]) == {("fc2.weight", 0), ("fc2.bias", 0), ("fc3.weight", 1)}
    assert groups[0].size == 64 and groups[0].layer == "fc1"


@pytest.mark.parametrize("name", ["gpt_block_manual", "gpt_block_sdpa"])
def test_heads_through_view_transpose_and_attention(name):
    s = sample(name)
    groups = _groups(s.model, *s.args)
    heads = [g for g in groups if g.kind == "heads"]
    mlp = [g for g in groups if g.kind == "mlp"]
    assert len(heads) == 1 and heads[0].size == 4 and heads[0].level == "head"
    assert {w for w, _ in _weights(heads[0])} >= {"attn.q_proj.weight", "attn.k_proj.weight", "attn.v_proj.weight", "attn.o_proj.weight"}
    assert ("attn.o_proj.weight", 1) in _weights(heads[0])
    assert len(mlp) == 1 and mlp[0].size == 256
    # the residual stream is normalized by layer norm: never a group
    assert all(g.size != 64 for g in groups)


def test_gqa_heads_split_into_kv_groups_and_queries():
    s = sample("gpt_gqa")
    groups = [g for g in _groups(s.model, *s.args) if g.kind == "heads"]
    levels = sorted((g.layer, g.level, g.size) for g in groups)
    assert levels == [("blocks.0.attn", "group", 2), ("blocks.0.attn", "query", 2),
                      ("blocks.1.attn", "group", 2), ("blocks.1.attn", "query", 2)]
    group = next(g for g in groups if g.level == "group")
    query = next(g for g in groups if g.level == "query")
    assert any("k_proj" in w for w, _ in _weights(group))      # a kv group owns k and v rows
    assert not any("k_proj" in w for w, _ in _weights(query))  # query heads within it do not


def test_conv_channels_couple_batch_norm_and_next_conv():
    s = sample("conv_norm")
    groups = _groups(s.model, *s.args)
    assert [g.kind for g in groups] == ["channels"]
    assert _weights(groups[0]) >= {("conv1.weight", 0), ("conv1.bias", 0), ("bn.weight", 0), ("bn.bias", 0),
                                   ("bn.running_mean", 0), ("conv2.weight", 1)}
    # conv2's output channels feed group norm: blocked
    assert all(("conv2.weight", 0) not in _weights(g) for g in groups)


@pytest.mark.parametrize("name", ["tied_embeddings", "shared_parameters"])
def test_no_groups_where_every_dim_reaches_norm_output_or_input(name):
    s = sample(name)
    assert _groups(s.model, *s.args) == []


class _Normed(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.norm, self.down = nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 8)

    def forward(self, x):
        return self.down(self.norm(self.up(x)))


def test_norm_blocks_the_hidden_dim_and_names_the_op():
    dg = analyze(_graph(_Normed(), torch.randn(2, 8)))
    assert dg.groups() == []
    up = next(n for n in dg.gm.graph.nodes if n.op == "get_attr" and n.target == "up.weight")
    assert dg.blocked_reason(dg.node_dims(up)[0][0]) == "layer norm"


class _Concat(nn.Module):
    """Two equal halves concatenated, then projected: the halves' channels are one space."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.out = nn.Linear(8, 6), nn.Linear(8, 6), nn.Linear(12, 4)

    def forward(self, x):
        return self.out(torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], dim=-1))


class _Unequal(_Concat):
    def __init__(self):
        super().__init__()
        self.b, self.out = nn.Linear(8, 5), nn.Linear(11, 4)


def test_equal_cat_couples_the_halves_unequal_cat_blocks():
    groups = _groups(_Concat(), torch.randn(3, 8))
    assert len(groups) == 1
    assert _weights(groups[0]) >= {("a.weight", 0), ("b.weight", 0), ("out.weight", 1)}
    assert _groups(_Unequal(), torch.randn(3, 8)) == []


def _hf(kind):
    transformers = pytest.importorskip("transformers")
    if kind == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=4, n_positions=16,
                                      attn_implementation="eager", use_cache=False)
        return transformers.GPT2LMHeadModel(cfg)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16,
                                   attn_implementation="eager", use_cache=False)
    return transformers.LlamaForCausalLM(cfg)


def test_hf_gpt2_fused_qkv_split_couples_q_k_v_heads():
    ids = torch.randint(0, 64, (1, 8))
    groups = _groups(_hf("gpt2"), ids, kwargs={"attention_mask": torch.ones_like(ids)})
    heads = [g for g in groups if g.kind == "heads"]
    assert len(heads) == 1 and heads[0].size == 4
    # one c_attn weight [32, 96] split into q, k, v: the head space sits in its output dim
    assert ("transformer.h.0.attn.c_attn.weight", 1) in _weights(heads[0])
    assert ("transformer.h.0.attn.c_proj.weight", 0) in _weights(heads[0])


def test_hf_llama_gqa_rotary_and_repeat_kv():
    ids = torch.randint(0, 64, (1, 8))
    groups = _groups(_hf("llama"), ids, kwargs={"attention_mask": torch.ones_like(ids)})
    kinds = sorted((g.kind, g.level, g.size) for g in groups)
    assert kinds == [("heads", "group", 2), ("heads", "query", 2), ("mlp", "", 64)]
    mlp = next(g for g in groups if g.kind == "mlp")
    assert {w.split(".")[-2] for w, _ in _weights(mlp)} == {"gate_proj", "up_proj", "down_proj"}
