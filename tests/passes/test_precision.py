"""precision: autocast's op classes, low-precision weight storage, the overflow guard, training.

Stated tolerance (inference, on the example inputs): ``max|out - ref| <= RTOL[dtype] * max|ref|``
with the fp32 eager model as ``ref`` — bf16 has 8 mantissa bits (rounding 2^-9 ≈ 2e-3 per op),
fp16 has 11 (2^-12 ≈ 2.4e-4); a few ops in a row stay well inside these bounds.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings

import fxmem
from fxmem.backend import FxmemBackend
from fxmem.capture import capture_inference
from fxmem.config import OptionError, PrecisionConfig, parse_options
from fxmem.passes.base import PassContext
from fxmem.passes.precision import FP32_OPS, LOW_OPS, cast_precision, op_class
from fxmem.pipeline import Recorder, _output_signature, check_graph, shallow_copy
from fxmem.testing import SAMPLES, sample
from fxmem.testing.strategies import random_programs

RTOL = {torch.bfloat16: 3e-2, torch.float16: 5e-3}
aten = torch.ops.aten


def _captured(model, args):
    return capture_inference(model, args, {}, {})


def _ctx(c):
    """What the runner hands a pass on explain's inference graph: the example inputs."""
    return PassContext(stage="inference", example_inputs=c.example_tensors)


def _flat(out):
    return [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def _within(out, ref, dtype):
    for o, r in zip(_flat(out), _flat(ref)):
        assert o.dtype == r.dtype
        scale = float(r.abs().max())
        err = float((o.double() - r.double()).abs().max())
        assert err <= RTOL[dtype] * scale + 1e-6, f"error {err} > {RTOL[dtype]} x {scale}"


def test_op_classes_follow_autocast_lists():
    assert op_class(aten.mm.default) == "low" and op_class(aten.addmm.default) == "low"
    assert op_class(aten._scaled_dot_product_flash_attention_for_cpu.default) == "low"
    for op in (aten._softmax.default, aten._log_softmax.default, aten.native_layer_norm.default, aten.exp.default,
               aten.rsqrt.default, aten.pow.Tensor_Scalar, aten.sum.dim_IntList, aten.cumsum.default,
               aten.nll_loss_forward.default, aten._softmax_backward_data.default, aten.native_layer_norm_backward.default):
        assert op_class(op) == "fp32", op
    assert op_class(aten.gelu.default) == "follow" and op_class(aten.add.Tensor) == "follow"
    assert op_class(aten.gelu.default, frozenset({"gelu"})) == "fp32"
    assert {"mm", "bmm", "convolution"} <= LOW_OPS and {"_softmax", "native_layer_norm", "mse_loss"} <= FP32_OPS


_FAST_FP16 = {"mlp", "gpt_block_sdpa", "conv_norm", "tied_embeddings"}
_CASES = [(n, torch.bfloat16) for n in sorted(set(SAMPLES) - {"gpt_gqa"})] + [
    pytest.param(n, torch.float16, marks=() if n in _FAST_FP16 else pytest.mark.slow) for n in sorted(SAMPLES)]


@pytest.mark.parametrize("name,dtype", _CASES)  # gpt_gqa bf16: the weights test; fp16: explain
def test_samples_inference(name, dtype):
    s = sample(name)
    model = s.model.eval()
    c = _captured(model, s.args)
    expected = _output_signature(c.gm)
    result = cast_precision(shallow_copy(c.gm), PrecisionConfig(dtype=dtype), _ctx(c))
    check_graph(result.gm, expected_outputs=expected)  # output dtypes unchanged, every node has meta["val"]
    st = result.stats
    assert result.changed and st["ops_low"] > 0
    # matrices are stored low: parameter bytes close to half (1-D weights stay fp32)
    assert st["param_bytes_after"] <= 0.56 * st["param_bytes_before"], st
    lows = [n for n in result.gm.graph.nodes if n.op == "get_attr" and n.meta["val"].dtype == dtype]
    assert lows and all(n.meta["val"].dim() >= 2 for n in lows)
    with torch.no_grad():
        ref = model(*s.args)
        out = result.gm(*c.example_tensors)
    _within(out, ref, dtype)
    assert st["max_abs_error"] == pytest.approx(float((out[0] - ref).abs().max()), rel=1e-6, abs=1e-9)
    # matmuls compute in the low dtype, softmax / layer norm in fp32
    for node in result.gm.graph.nodes:
        if node.op == "call_function" and node.target in (aten.mm.default, aten.addmm.default, aten.bmm.default):
            assert node.meta["val"].dtype == dtype
        if node.op == "call_function" and node.target in (aten._softmax.default, aten.native_layer_norm.default):
            assert all(a.meta["val"].dtype == torch.float32 for a in node.all_input_nodes if isinstance(a.meta.get("val"), torch.Tensor))


def test_tied_weight_gets_one_low_copy():
    s = sample("tied_embeddings")
    c = _captured(s.model.eval(), s.args)
    before = cast_precision(shallow_copy(c.gm), PrecisionConfig(), _ctx(c))
    targets = {n.target for n in before.gm.graph.nodes if n.op == "get_attr" and n.meta["val"].dim() == 2}
    assert len(targets) == 1  # emb.weight and head.weight were one tensor: one bf16 copy
    assert before.stats["param_bytes_after"] < 0.55 * before.stats["param_bytes_before"]


def test_explain_reports_precision_and_saves_bytes():
    s = sample("gpt_gqa")
    report = fxmem.explain(s.model.eval(), *s.args, precision="fp16", strict=True)
    rec = next(r for r in report.records if r.name == "precision")
    assert rec.status == "changed" and rec.stats["dtype"] == "float16"
    assert rec.param_bytes < 0.55 * report.records[0].param_bytes
    assert "ran on the example inputs" in rec.stats["overflow_guard"]
    with torch.no_grad():
        _within(report.module(*s.args), s.model(*s.args), torch.float16)


def test_keep_fp32_option():
    s = sample("mlp")
    c = _captured(s.model.eval(), s.args)
    res = cast_precision(shallow_copy(c.gm), parse_options(precision={"dtype": "bf16", "keep_fp32": ["aten.gelu"]}).precision, _ctx(c))
    gelus = [n for n in res.gm.graph.nodes if n.target == aten.gelu.default]
    assert gelus and all(n.meta["val"].dtype == torch.float32 for n in gelus)
    assert any(k["why"] == "keep_fp32 option" for k in res.stats["kept_fp32"])


def test_options_are_parsed():
    cfg = parse_options(precision={"dtype": "fp16", "weights": "autocast", "overflow_guard": False}).precision
    assert cfg.dtype == torch.float16 and cfg.weights == "autocast" and not cfg.overflow_guard
    with pytest.raises(OptionError, match="precision.weights"):
        parse_options(precision={"weights": "half"})
    with pytest.raises(OptionError, match="precision"):
        parse_options(precision="int4")


class T5LikeFF(nn.Module):
    """A block whose ``wo`` projection exceeds fp16's range, like T5's (transformers#5651)."""

    def __init__(self, d=16):
        super().__init__()
        self.wi = nn.Linear(d, 4 * d)
        self.wo = nn.Linear(4 * d, d)
        self.norm = nn.LayerNorm(d)
        with torch.no_grad():
            self.wo.weight.mul_(50000.0)  # outputs reach ~1e5 > 65504

    def forward(self, x):
        h = self.wo(torch.relu(self.wi(x)))
        return self.norm(x + h)


def test_overflow_guard_keeps_the_overflowing_op_in_fp32():
    torch.manual_seed(0)
    model, x = T5LikeFF().eval(), torch.randn(4, 16) * 4
    c = _captured(model, (x,))
    with torch.no_grad():
        ref = model(x)
        assert float(model.wo(torch.relu(model.wi(x))).abs().max()) > 65504
    unguarded = cast_precision(shallow_copy(c.gm), PrecisionConfig(dtype=torch.float16, overflow_guard=False), _ctx(c))
    with torch.no_grad():
        assert not torch.isfinite(unguarded.gm(x)[0]).all()  # fp16 overflows without the guard
    guarded = cast_precision(shallow_copy(c.gm), PrecisionConfig(dtype=torch.float16), _ctx(c))
    with torch.no_grad():
        out = guarded.gm(x)[0]
    assert torch.isfinite(out).all()
    _within(out, ref, torch.float16)
    rows = guarded.stats["overflow_kept"]
    assert rows and all(r["absmax"] > 65504 / 2 for r in rows)
    assert any(r["op"] == "addmm" for r in rows) and all("|x|max" in r["why"] for r in rows)
    assert [w["weight"] for w in guarded.stats["weights_kept_fp32"]] == ["wo.weight"]  # like _keep_in_fp32_modules
    # the first projection does not overflow: it still runs in fp16
    addmms = [n for n in guarded.gm.graph.nodes if n.target == aten.addmm.default]
    assert sorted(str(n.meta["val"].dtype) for n in addmms) == ["torch.float16", "torch.float32"]


def test_overflow_guard_says_when_it_cannot_run():
    s = sample("mlp")
    c = _captured(s.model.eval(), s.args)
    gm = shallow_copy(c.gm)
    res = cast_precision(gm, PrecisionConfig(dtype=torch.float16), PassContext(stage="inference"))  # no example inputs
    assert res.stats["overflow_guard"].startswith("not run") and "max_abs_error" not in res.stats


def test_weights_autocast_mode_keeps_gather_only_tables_fp32():
    s = sample("gpt_gqa")
    c = _captured(s.model.eval(), s.args)
    res = cast_precision(shallow_copy(c.gm), parse_options(precision={"dtype": "bf16", "weights": "autocast"}).precision, _ctx(c))
    dtypes = {n.meta.get("fxmem_fqn"): n.meta["val"].dtype for n in res.gm.graph.nodes if n.op == "get_attr"}
    assert dtypes["wpe.weight"] == torch.float32          # only gathered: autocast never rounds it
    assert dtypes["blocks.0.mlp.up_proj.weight"] == torch.bfloat16


# -- training ---------------------------------------------------------------------------------

def _grads(model, args, run):
    for p in model.parameters():
        p.grad = None
    out = run(*args)
    out.float().pow(2).mean().backward()
    return out, [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("name,codegen", [pytest.param("mlp", "eager", marks=pytest.mark.slow),
                                          ("gpt_block_manual", "eager"), ("gpt_block_manual", "inductor")])
def test_training_keeps_fp32_master_weights_and_matches_autocast(name, codegen):
    # strict: an Inductor failure raises instead of falling back to codegen="eager" (precision's
    # casts once tripped Inductor's "both a fallback and a decomp" for aten._to_copy)
    s = sample(name)
    model = s.model.train()
    twin = copy.deepcopy(model)
    rec = Recorder()
    compiled = torch.compile(model, backend=FxmemBackend(parse_options(precision="bf16", codegen=codegen, strict=True), rec))
    out, grads = _grads(model, s.args, compiled)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, auto = _grads(twin, s.args, twin)
    ref32 = copy.deepcopy(twin)
    _, exact = _grads(ref32, s.args, ref32)
    assert out.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(g.dtype == torch.float32 for g in grads)
    joint = next(r for r in rec.records if r.name == "precision" and r.stage == "joint")
    assert joint.status == "changed" and joint.stats["ops_low"] > 0
    # the gradient reaches every fp32 parameter, as close to fp32's as autocast's is
    overall = max(float(e.abs().max()) for e in exact)
    for g, a, e in zip(grads, auto, exact):
        scale = max(float(e.abs().max()), 1e-2 * overall)
        assert float(g.abs().max()) > 0 or float(e.abs().max()) == 0
        assert float((g - e).abs().max()) <= max(2.0 * float((a - e).abs().max()), 1e-2 * scale)
        assert float((g - a).abs().max()) <= 3e-2 * scale


# -- HF models from small configs ----------------------------------------------------------------

def _hf_model(name):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    ids = torch.randint(0, 128, (2, 12))
    if name == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=128, n_positions=32, n_embd=32, n_layer=1, n_head=2,
                                      bos_token_id=0, eos_token_id=0, attn_implementation="eager")
        return transformers.GPT2LMHeadModel(cfg), ids, {"use_cache": False}
    if name == "llama":
        cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                       attn_implementation="sdpa")
        return transformers.LlamaForCausalLM(cfg), ids, {"use_cache": False}
    cfg = transformers.BertConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                  num_attention_heads=2, max_position_embeddings=32, attn_implementation="eager")
    return transformers.BertModel(cfg), ids, {}


def _first(out):
    return out.logits if hasattr(out, "logits") and out.logits is not None else out.last_hidden_state


@pytest.mark.parametrize("name", ["gpt2", pytest.param("llama", marks=pytest.mark.slow), pytest.param("bert", marks=pytest.mark.slow)])
def test_hf_models_inference(name):
    model, ids, kw = _hf_model(name)
    model.eval()
    with torch.no_grad():
        ref = _first(model(ids, **kw))
    rec = Recorder()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")
        out = _first(torch.compile(model, backend=FxmemBackend(parse_options(precision="bf16", codegen="eager", strict=True), rec))(ids, **kw))
    rec_p = next(r for r in rec.records if r.name == "precision")
    assert rec_p.status == "changed"
    assert rec_p.stats["param_bytes_after"] <= 0.56 * rec_p.stats["param_bytes_before"]
    assert out.dtype == torch.float32
    _within(out, ref, torch.bfloat16)


# -- random graphs ------------------------------------------------------------------------------

@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_programs(max_ops=8))
def test_random_graphs_within_tolerance(program):
    module, x = program
    module.eval()
    c = _captured(module, (x,))
    expected = _output_signature(c.gm)
    for dtype in (torch.bfloat16, torch.float16):
        res = cast_precision(shallow_copy(c.gm), PrecisionConfig(dtype=dtype), _ctx(c))
        check_graph(res.gm, expected_outputs=expected)
        with torch.no_grad():
            ref = module(x)
            out = res.gm(x)[0]
        # a random program can cancel (x - x-like sums): bound the error by the largest
        # intermediate the reference sees rather than by the output alone
        scale = max(float(ref.abs().max()), 1.0)
        assert float((out - ref).abs().max()) <= 4 * RTOL[dtype] * scale


@pytest.mark.slow
@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_programs(max_ops=6))
def test_random_graphs_training_gradients(program):
    module, x = program
    module.train()
    twin = copy.deepcopy(module)
    torch._dynamo.reset()
    rec = Recorder()
    compiled = torch.compile(module, backend=FxmemBackend(parse_options(precision="fp16", codegen="eager", strict=True), rec))
    ref = twin(x)
    if not ref.requires_grad:  # a program whose output does not depend on its parameters
        return
    ref.sum().backward()
    compiled(x).sum().backward()
    assert any(r.name == "precision" and r.stage == "joint" for r in rec.records)
    overall = max(float(q.grad.abs().max()) for q in twin.parameters() if q.grad is not None) + 1e-6
    rows = x.reshape(-1, x.shape[-1]).shape[0]
    for p, q in zip(module.parameters(), twin.parameters()):
        assert (p.grad is None) == (q.grad is None)
        if q.grad is not None:
            assert p.grad.dtype == torch.float32
            # fp16 keeps values below 2**-14 as subnormals 2**-24 apart: a weight gradient that small
            # (no loss scaling here) is a sum over the rows of products each rounded to that step
            assert float((p.grad - q.grad).abs().max()) <= 4 * RTOL[torch.float16] * overall + 2 * rows * 2.0**-24


def test_overflow_guard_finds_t5_wo_like_keep_in_fp32_modules():
    """HF T5 with ``wo`` outputs beyond fp16's range: NaN without the guard; the guard keeps
    exactly the ``wo`` projections (and their weights) in fp32 — HF's ``_keep_in_fp32_modules``."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.T5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
    model = transformers.T5EncoderModel(cfg).eval()
    with torch.no_grad():
        for block in model.encoder.block:
            block.layer[1].DenseReluDense.wo.weight.mul_(30000.0)
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        ref = model(ids).last_hidden_state
    c = _captured(model, (ids,))
    off = cast_precision(shallow_copy(c.gm), PrecisionConfig(dtype=torch.float16, overflow_guard=False), _ctx(c))
    on = cast_precision(shallow_copy(c.gm), PrecisionConfig(dtype=torch.float16), _ctx(c))
    with torch.no_grad():
        assert not torch.isfinite(off.gm(ids)[0]).all()
        out = on.gm(ids)[0]
    _within(out, ref, torch.float16)
    kept_weights = {w["weight"] for w in on.stats["weights_kept_fp32"]}
    assert kept_weights == {f"encoder.block.{i}.layer.1.DenseReluDense.wo.weight" for i in range(2)}
    assert {r["op"] for r in on.stats["overflow_kept"]} >= {"mm"}
    assert model._keep_in_fp32_modules == {"wo"} or "wo" in model._keep_in_fp32_modules
