"""The int8 pass: rewriting, tolerance, memory, tied weights, options, training errors, stale weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, settings

import fxmem
from fxmem.analysis import parameter_bytes
from fxmem.config import Int8Config, OptionError, parse_options
from fxmem.freeze import StaleWeightsError
from fxmem.kernels import int8_matmul
from fxmem.kernels import int8_matmul as k8
from fxmem.passes.base import PassContext, UnsupportedGraph
from fxmem.passes.int8 import quantize_int8
from fxmem.testing import SAMPLES, recording_backend, sample
from fxmem.testing.strategies import random_programs

INT8_LINEAR = torch.ops.fxmem.int8_linear.default
INT8_EMBEDDING = torch.ops.fxmem.int8_embedding.default
REL_TOL = 0.03  # relative L2 error of the output (weight SQNR ≈ 45 dB; dynamic adds activation rounding)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12))


def int8_record(report):
    return next(r for r in report.records if r.name == "int8")


def targets(gm) -> list:
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


# -- options ---------------------------------------------------------------------------------


def test_options_parse_and_errors_name_the_key():
    assert parse_options(int8="dynamic").int8 == Int8Config(mode="dynamic")
    cfg = parse_options(int8={"granularity": "per_group", "group_size": 32, "skip": "lm_head", "min_numel": 0}).int8
    assert (cfg.granularity, cfg.group_size, cfg.skip, cfg.min_numel) == ("per_group", 32, ("lm_head",), 0)
    with pytest.raises(OptionError, match="int8.granularity"):
        parse_options(int8={"mode": "dynamic", "granularity": "per_group"})
    with pytest.raises(OptionError, match="int8"):
        parse_options(int8="int4")


# -- the sample models -----------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["weight_only", "dynamic"])
@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_sample_models_within_tolerance_and_smaller(name, mode):
    s = sample(name)
    model = s.model.eval()
    report = fxmem.explain(model, *s.args, kwargs=s.kwargs, int8={"mode": mode, "min_numel": 0}, strict=True)
    rec = int8_record(report)
    with torch.no_grad():
        ref = model(*s.args, **s.kwargs)
        out = report.module(*s.args, **s.kwargs)
    assert rel_err(out, ref) < REL_TOL
    # every sample has at least one Linear: all of them are rewritten and parameters shrink
    assert rec.status == "changed" and rec.stats["layers_rewritten"] >= 1
    assert INT8_LINEAR in targets(report.module.graph_module)
    # the pass before int8 (tie_weights: the causal-mask buffers of the blocks are equal) is the baseline
    before = report.records[report.records.index(rec) - 1].param_bytes
    assert rec.param_bytes == before - rec.stats["param_bytes_saved"]
    for row in rec.stats["layers"]:
        n, k = row["shape"]
        assert row["bytes_after"] == n * k + 4 * n < row["bytes_before"]
        assert row["sqnr_db"] > 35


def test_linear_weights_become_a_quarter_plus_scales():
    s = sample("gpt_block_sdpa")
    report = fxmem.explain(s.model.eval(), *s.args, int8="weight_only")
    for row in int8_record(report).stats["layers"]:
        n, k = row["shape"]
        assert row["bytes_before"] == 4 * n * k
        assert row["bytes_after"] == n * k + 4 * n  # int8 [N, K] + fp32 scales [N]


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_programs(max_ops=8))
def test_random_programs_within_tolerance(program):
    module, x = program
    module.eval()
    out_module = fxmem.optimize(module, x, int8={"min_numel": 0}, strict=True)
    with torch.no_grad():
        ref = module(x)
        out = out_module(x)
    assert out.shape == ref.shape
    # a program whose output is zero in exact arithmetic (a layer norm of a row-constant value:
    # both sides were ±1.8e-8 of rounding, rel_err 1.41) has no accuracy to compare
    assume(float(ref.norm()) > 1e-4 * float(x.norm()))
    assert rel_err(out, ref) < 0.05


# -- tied and shared weights -----------------------------------------------------------------


def test_tied_embedding_and_head_share_one_int8_buffer():
    s = sample("tied_embeddings")
    model = s.model.eval()
    report = fxmem.explain(model, *s.args, int8="weight_only")
    gm = report.module.graph_module
    qnodes = [n for n in gm.graph.nodes if n.op == "get_attr" and n.meta.get("fxmem_int8") == "qweight"]
    assert len(qnodes) == 1
    users = {u.target for u in qnodes[0].users}
    assert users == {INT8_LINEAR, INT8_EMBEDDING}
    row = int8_record(report).stats["layers"][0]
    assert set(row["names"]) >= {"emb.weight", "head.weight"} and row["uses"] == 2
    vocab, d = model.emb.weight.shape
    norm_bytes = 2 * d * 4
    assert parameter_bytes(gm) == vocab * d + vocab * 4 + norm_bytes
    # no fp32 copy of the weight is kept on the module (nothing to save or hold)
    assert not any(t.shape == (vocab, d) and t.is_floating_point() for t in gm.state_dict().values())


def test_layer_applied_twice_is_quantized_once():
    s = sample("shared_parameters")
    report = fxmem.explain(s.model.eval(), *s.args, int8={"min_numel": 0})
    gm = report.module.graph_module
    assert sum(t is INT8_LINEAR for t in targets(gm)) == 2
    assert len([n for n in gm.graph.nodes if n.meta.get("fxmem_int8") == "qweight"]) == 1


class Conv1DStyle(nn.Module):
    """HF GPT-2's Conv1D: ``addmm(bias, x, W)`` with ``W`` stored ``[in, out]`` (no transpose)."""

    def __init__(self, nx: int = 32, nf: int = 48):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.02)
        self.bias = nn.Parameter(torch.randn(nf) * 0.02)

    def forward(self, x):
        return torch.addmm(self.bias, x.view(-1, x.shape[-1]), self.weight).view(*x.shape[:-1], -1)


def test_untransposed_conv1d_weight():
    model = Conv1DStyle().eval()
    x = torch.randn(2, 5, 32)
    report = fxmem.explain(model, x, int8="weight_only", strict=True)
    row = int8_record(report).stats["layers"][0]
    assert row["shape"] == [48, 32]  # quantized as W.T: one scale per output feature
    with torch.no_grad():
        assert rel_err(report.module(x), model(x)) < REL_TOL


def test_untransposed_weight_through_the_backend():
    # the backend runs passes inside AOTAutograd's fake mode: W.T must be taken on the real weight
    model = Conv1DStyle().eval()
    x = torch.randn(2, 5, 32)
    compiled = torch.compile(model, backend=fxmem.backend(int8="weight_only", strict=True))
    with torch.no_grad():
        assert rel_err(compiled(x), model(x)) < REL_TOL


class WeightAlsoRead(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(32, 32)

    def forward(self, x):
        return self.fc(x) + self.fc.weight.sum(0)


def test_weight_with_another_use_stays_fp32():
    model = WeightAlsoRead().eval()
    x = torch.randn(4, 32)
    report = fxmem.explain(model, x, int8="weight_only")
    rec = int8_record(report)
    assert rec.status == "unchanged"
    assert rec.stats["skipped"][0]["reason"].startswith("kept fp32")
    with torch.no_grad():
        torch.testing.assert_close(report.module(x), model(x))


# -- options: skip, min_numel, per-group -----------------------------------------------------


def test_skip_patterns_and_min_numel():
    s = sample("mlp")  # fc1 32→64, fc2 64→64, fc3 64→16
    report = fxmem.explain(s.model.eval(), *s.args, int8={"skip": ["fc2"], "min_numel": 2048})
    stats = int8_record(report).stats
    assert [r["layer"] for r in stats["layers"]] == ["fc1"]
    reasons = {r["layer"]: r["reason"] for r in stats["skipped"]}
    assert reasons["fc2.weight"] == "skipped by pattern 'fc2'"
    assert "min_numel" in reasons["fc3.weight"]
    gm = report.module.graph_module
    assert sum(t is INT8_LINEAR for t in targets(gm)) == 1
    assert sum(t is torch.ops.aten.addmm.default for t in targets(gm)) == 2


def test_skip_matches_glob_on_module_path():
    s = sample("gpt_gqa")
    report = fxmem.explain(s.model.eval(), *s.args, int8={"skip": ["*.attn.*"], "min_numel": 0})
    layers = [r["layer"] for r in int8_record(report).stats["layers"]]
    assert layers and not any(".attn." in name for name in layers)
    assert any(".mlp." in name for name in layers)


def test_per_group_scales_and_fallback():
    s = sample("mlp")
    report = fxmem.explain(s.model.eval(), *s.args, int8={"granularity": "per_group", "group_size": 32, "min_numel": 0})
    rows = {r["layer"]: r for r in int8_record(report).stats["layers"]}
    assert rows["fc1"]["granularity"] == "per_group(32)"
    gm = report.module.graph_module
    assert gm.fc1_weight_scales.shape == (64, 1) and gm.fc2_weight_scales.shape == (64, 2)
    # group_size that does not divide K: that layer falls back to per-channel, and says so
    report = fxmem.explain(s.model.eval(), *s.args, int8={"granularity": "per_group", "group_size": 48, "min_numel": 0})
    rows = {r["layer"]: r for r in int8_record(report).stats["layers"]}
    assert rows["fc1"]["granularity"].startswith("per_channel (K=32 not a multiple")
    with torch.no_grad():
        assert rel_err(report.module(*s.args), s.model(*s.args)) < REL_TOL


# -- the report ------------------------------------------------------------------------------


def test_explain_lists_layers_and_the_kernel():
    s = sample("mlp")
    report = fxmem.explain(s.model.eval(), *s.args, int8="weight_only")
    rec = int8_record(report)
    for row in rec.stats["layers"]:
        assert {"layer", "bytes_before", "bytes_after", "sqnr_db"} <= set(row)
    kernels = [k for k in report.kernels if "int8" in k.name]
    assert len(kernels) == 1
    k = kernels[0]
    assert k.source.startswith("def int8_weight_only_matmul_kernel(") and "tl.dot" in k.source
    assert k.bytes_saved == rec.stats["param_bytes_saved"] > 0 and len(k.nodes_replaced) == 3
    assert "int8" in str(report)


# -- inference only, stale weights -----------------------------------------------------------


def test_training_graph_is_a_clear_error():
    s = sample("mlp")
    model = s.model.train()
    compiled = torch.compile(model, backend="fxmem", options={"int8": "weight_only"})
    with pytest.raises(Exception, match="inference graphs only"):
        compiled(*s.args)
    with pytest.raises(OptionError, match="inference graphs only"):
        fxmem.explain(model, *s.args, int8="weight_only")
    gm = torch.fx.symbolic_trace(model)
    with pytest.raises(UnsupportedGraph, match="inference graphs only"):  # skipped by the runner, like every pass
        quantize_int8(gm, Int8Config(), PassContext(stage="joint"))


def test_backend_requantizes_after_in_place_update():
    s = sample("mlp")
    model = s.model.eval()
    x = s.args[0]
    compiled = torch.compile(model, backend=fxmem.backend(int8="weight_only", strict=True))
    with torch.no_grad():
        first = compiled(x)
        assert rel_err(first, model(x)) < REL_TOL
        model.fc1.weight.mul_(3.0)
        second = compiled(x)
        assert rel_err(second, model(x)) < REL_TOL
        assert rel_err(second, first) > 0.1  # the new weights were used


def test_optimized_module_raises_on_stale_weights():
    s = sample("mlp")
    model = s.model.eval()
    optimized = fxmem.optimize(model, *s.args, int8="weight_only")
    with torch.no_grad():
        optimized(*s.args)
        model.fc2.weight.add_(1.0)
    with pytest.raises(StaleWeightsError, match="fc2.weight"):
        optimized(*s.args)


# -- the graph stays a graph: export, Inductor, dynamic shapes --------------------------------


def test_exportable():
    s = sample("mlp")
    optimized = fxmem.optimize(s.model.eval(), *s.args, int8="weight_only")
    ep = torch.export.export(optimized, s.args)
    assert any(n.target is INT8_LINEAR for n in ep.graph.nodes)
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(*s.args), optimized(*s.args))


@pytest.mark.slow
def test_compilable_by_inductor():
    s = sample("mlp")
    optimized = fxmem.optimize(s.model.eval(), *s.args, int8="weight_only")
    compiled = torch.compile(optimized, backend="inductor")
    with torch.no_grad():
        torch.testing.assert_close(compiled(*s.args), optimized(*s.args), atol=1e-5, rtol=1e-5)


def test_backend_dynamic_mode_with_changing_batch():
    s = sample("mlp")
    model = s.model.eval()
    compiled = torch.compile(model, backend="fxmem", options={"int8": "dynamic"})
    with torch.no_grad():
        for batch in (8, 5, 3):
            x = torch.randn(batch, 32)
            assert rel_err(compiled(x), model(x)) < REL_TOL


def test_dynamic_mode_is_integer_accumulation():
    torch.manual_seed(0)
    x = torch.randn(6, 40)
    qweight, scales = int8_matmul.quantize_weight(torch.randn(24, 40))
    got = torch.ops.fxmem.int8_linear(x, qweight, scales, None, "dynamic")
    xq, xs = int8_matmul.quantize_per_token(x)
    exact = (xq.to(torch.int64) @ qweight.to(torch.int64).t()).to(torch.float32) * xs * scales
    torch.testing.assert_close(got, exact, atol=0, rtol=1e-6)


def test_fake_tensor_and_meta_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(2, 7, 32, dtype=torch.bfloat16)
        out = torch.ops.fxmem.int8_linear(x, torch.empty(16, 32, dtype=torch.int8), torch.empty(16), None, "weight_only")
        emb = torch.ops.fxmem.int8_embedding(torch.empty(10, 32, dtype=torch.int8), torch.empty(10),
                                             torch.empty(3, 4, dtype=torch.long), torch.float16)
    assert out.shape == (2, 7, 16) and out.dtype == torch.bfloat16
    assert emb.shape == (3, 4, 32) and emb.dtype == torch.float16


class TinyLM(nn.Module):
    """A linear after a view with a GELU in between (3-D linear), for the dtype test below."""

    def __init__(self):
        super().__init__()
        self.up = nn.Linear(32, 64)
        self.down = nn.Linear(64, 32)

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_models(dtype):
    model = TinyLM().eval().to(dtype)
    x = torch.randn(2, 3, 32, dtype=dtype)
    optimized = fxmem.optimize(model, x, int8={"min_numel": 0}, strict=True)
    with torch.no_grad():
        out = optimized(x)
        assert out.dtype == dtype
        assert rel_err(out, model(x)) < REL_TOL


# -- HF models from small configs (random weights, no downloads) -----------------------------


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_layer=1, n_embd=64, n_head=4, vocab_size=128, n_positions=32, bos_token_id=0, eos_token_id=0,
                     attn_implementation="eager")
    ids = torch.randint(0, 128, (1, 8))
    return GPT2LMHeadModel(cfg).eval(), ids, {"use_cache": False, "attention_mask": torch.ones(1, 8, dtype=torch.long)}


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=64, intermediate_size=176, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                      vocab_size=128, max_position_embeddings=32, bos_token_id=0, eos_token_id=0, pad_token_id=0,
                      attn_implementation="eager")
    ids = torch.randint(1, 128, (1, 8))
    return LlamaForCausalLM(cfg).eval(), ids, {"use_cache": False, "attention_mask": torch.ones(1, 8, dtype=torch.long)}


def _bert():
    from transformers import BertConfig, BertModel

    cfg = BertConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=1, num_attention_heads=4, vocab_size=128,
                     max_position_embeddings=32, attn_implementation="eager")
    return BertModel(cfg, add_pooling_layer=False).eval(), torch.randint(1, 128, (1, 8)), {}


def _hf_check(build, expect_tied: bool):
    model, ids, kwargs = build()
    report = fxmem.explain(model, ids, kwargs=kwargs, int8={"min_numel": 0}, strict=True)
    stats = int8_record(report).stats
    with torch.no_grad():
        ref = model(ids, **kwargs)[0]
        out = report.module(ids, **kwargs)[0]
    assert rel_err(out, ref) < REL_TOL
    assert stats["layers_rewritten"] >= 4 and not [s for s in stats["skipped"] if "kept fp32" in s["reason"]]
    tied = [r for r in stats["layers"] if {"transformer.wte.weight", "lm_head.weight"} <= set(r["names"])]
    assert bool(tied) == expect_tied
    if expect_tied:
        assert tied[0]["uses"] == 2  # the embedding and the LM head read one int8 buffer


def test_hf_gpt2_conv1d_and_tied_head():
    pytest.importorskip("transformers")
    _hf_check(_gpt2, expect_tied=True)


@pytest.mark.slow
@pytest.mark.parametrize("build", [_llama, _bert], ids=["llama_gqa", "bert"])
def test_hf_llama_and_bert(build):
    pytest.importorskip("transformers")
    _hf_check(build, expect_tied=False)


def test_hand_built_aten_graph_with_permute_and_dead_transpose():
    # the pass on its own, on a graph written by hand: permute(W, [1, 0]) as the transpose, a dead
    # aten.t(W) beside it (removed with the fp32 weight), and no meta["val"] needed to rewrite
    root = nn.Module()
    root.register_buffer("w", torch.randn(48, 64))
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    w = graph.get_attr("w")
    graph.call_function(torch.ops.aten.t.default, (w,))
    wt = graph.call_function(torch.ops.aten.permute.default, (w, [1, 0]))
    graph.output(graph.call_function(torch.ops.aten.mm.default, (x, wt)))
    gm = torch.fx.GraphModule(root, graph)
    result = quantize_int8(gm, Int8Config(min_numel=0))
    assert result.changed and targets(result.gm) == [INT8_LINEAR]
    assert not hasattr(result.gm, "w")  # the fp32 weight is not held by the new module
    xin = torch.randn(5, 64)
    assert rel_err(result.gm(xin), xin @ root.w.t()) < REL_TOL


@pytest.mark.slow
def test_hf_gpt2_sdpa_through_the_backend():
    # torch.compile handles the mask logic that a whole-graph capture cannot (graph breaks)
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_layer=1, n_embd=64, n_head=4, vocab_size=128, n_positions=32, bos_token_id=0, eos_token_id=0,
                     attn_implementation="sdpa")
    model = GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(0, 128, (1, 8))
    backend = recording_backend(int8="weight_only", strict=True)
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        assert rel_err(compiled(ids, use_cache=False).logits, model(ids, use_cache=False).logits) < REL_TOL
    rows = [r for rec in backend.recorder.records if rec.name == "int8" for r in rec.stats.get("layers", [])]
    assert any(r["layer"] == "transformer.wte" and r["uses"] == 2 for r in rows)  # tied: one buffer


# --- mixture-of-experts weights (3-D, read by a grouped matmul) -----------------------------


def test_int8_grouped_mm_op_matches_the_dequantized_reference():
    torch.manual_seed(0)
    e, n, k = 3, 8, 16
    w = torch.randn(e, n, k)
    q, s = k8.quantize_weight(w.reshape(e * n, k))
    q, s = q.reshape(e, n, k), s.reshape(e, n)
    deq = k8.dequantize_weight(q.reshape(e * n, k), s.reshape(e * n)).reshape(e, n, k)
    x = torch.randn(10, k)
    offs = torch.tensor([3, 3, 8], dtype=torch.int32)  # expert 1 gets no token; rows 8, 9 none
    out = torch.ops.fxmem.int8_grouped_mm(x, q, s, offs)
    ref = torch.zeros(10, n)
    ref[:3], ref[3:8] = x[:3] @ deq[0].T, x[3:8] @ deq[2].T
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake = torch.ops.fxmem.int8_grouped_mm(mode.from_tensor(x), mode.from_tensor(q), mode.from_tensor(s),
                                               mode.from_tensor(offs))
    assert fake.shape == (10, n)


class _GroupedExperts(torch.nn.Module):
    """Experts stored [E, N, K] and read through ``aten._grouped_mm`` on their transpose (bf16:
    what its meta function accepts; HF uses it for bf16 experts)."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(4, 32, 64) / 8)

    def forward(self, x, offs):
        return torch._grouped_mm(x, self.w.transpose(-2, -1), offs)


def test_aten_grouped_mm_experts_are_quantized():
    torch.manual_seed(0)
    model = _GroupedExperts().to(torch.bfloat16).eval()
    x, offs = torch.randn(24, 64, dtype=torch.bfloat16), torch.tensor([5, 5, 16, 24], dtype=torch.int32)
    with torch.no_grad():
        ref = model(x, offs)
    report = fxmem.explain(model, x, offs, int8="weight_only", strict=True)
    rec = next(r for r in report.records if r.name == "int8")
    (layer,) = rec.stats["layers"]
    assert layer["kind"].startswith("experts") and layer["shape"] == [4, 32, 64] and layer["sqnr_db"] > 40
    gm = report.module.graph_module
    assert any(n.target is torch.ops.fxmem.int8_grouped_mm.default for n in gm.graph.nodes)
    assert not any(v.is_floating_point() and v.dim() == 3 for v in gm.state_dict().values())
    with torch.no_grad():
        assert rel_err(report.module(x, offs), ref) < REL_TOL


def test_mixtral_experts_are_quantized():
    """HF Mixtral (transformers' ``grouped_mm_fallback`` on the CPU): the experts, where an MoE's
    bytes are, are int8 — the state drops to ~0.35× of fp32 (was 0.81× with the experts skipped)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                     num_experts_per_tok=2, max_position_embeddings=16, use_cache=False)
    model = transformers.MixtralForCausalLM(cfg).eval()
    ids = torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        ref = model(ids).logits
    report = fxmem.explain(model, ids, int8="weight_only", strict=True)
    rec = next(r for r in report.records if r.name == "int8")
    experts = {layer["layer"] for layer in rec.stats["layers"] if layer.get("kind", "").startswith("experts")}
    assert experts == {"model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.down_proj"}
    assert report.records[-1].param_bytes < 0.4 * report.records[0].param_bytes
    with torch.no_grad():
        assert rel_err(report.module(ids).logits, ref) < REL_TOL
