"""The quantize pass: schemes on the sample models, packed bytes, embeddings, tied weights,
calibration (and its fallback), options, stale weights, and torch.compile == optimize."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import fxmem
from fxmem.analysis import parameter_bytes
from fxmem.config import OptionError, QuantizeConfig, parse_options
from fxmem.freeze import StaleWeightsError
from fxmem.passes.base import PassContext, UnsupportedGraph
from fxmem.passes.quantize import quantize
from fxmem.testing import SAMPLES, sample

LOWBIT_LINEAR = torch.ops.fxmem.lowbit_linear.default
LOWBIT_EMBEDDING = torch.ops.fxmem.lowbit_embedding.default
INT8_LINEAR = torch.ops.fxmem.int8_linear.default
INT8_EMBEDDING = torch.ops.fxmem.int8_embedding.default


def rel_err(out, ref) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12))


def record(report, name="quantize"):
    return next(r for r in report.records if r.name == name)


def targets(gm) -> list:
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


class Encoder(nn.Module):
    """Embedding → two Linears with a few outlier input channels (where activation-aware scales help)."""

    def __init__(self, vocab=96, d=64, hidden=128):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        with torch.no_grad():
            self.emb.weight[:, :4] *= 20.0  # outlier channels, as trained transformers have
        self.up = nn.Linear(d, hidden)
        self.down = nn.Linear(hidden, d)

    def forward(self, idx):
        return self.down(torch.relu(self.up(self.emb(idx))))


# -- options ---------------------------------------------------------------------------------


def test_options_parse_and_errors_name_the_key():
    cfg = parse_options(quantize={"bits": 4, "scheme": "nf4", "group_size": 32, "calibration": "awq", "skip": "head"}).quantize
    assert cfg == QuantizeConfig(bits=4, scheme="nf4", group_size=32, calibration="awq", skip=("head",))
    assert parse_options(quantize={}).quantize == QuantizeConfig()
    for bad, key in [({"bits": 3}, "quantize.bits"), ({"scheme": "fp4"}, "quantize.scheme"),
                     ({"bits": 8, "scheme": "nf4"}, "quantize.bits"), ({"group_size": 7}, "quantize.group_size"),
                     ({"calibration": "magic"}, "quantize.calibration"), ({"embeddings": "yes"}, "quantize.embeddings"),
                     ({"bitz": 4}, "quantize")]:
        with pytest.raises(OptionError, match=key):
            parse_options(quantize=bad)
    with pytest.raises(OptionError, match="int8.*quantize|shorthand"):
        parse_options(int8="weight_only", quantize={"bits": 4})
    assert "quantize" in parse_options(quantize={}).lossy_options()


# -- schemes on the sample models ----------------------------------------------------------------

# relative L2 output error on random-weight models: 4 bits give ≈ 20 dB per layer (log4 ≈ 16 dB on
# nn.Linear's uniform init), compounded over a few layers
TOL = {("int", 4): 0.2, ("nf4", 4): 0.2, ("log", 4): 0.3, ("int", 8): 0.03, ("log", 8): 0.03}


CASES = ([(name, "int", 4) for name in sorted(set(SAMPLES) - {"dropout_mlp"})]
         + [("gpt_gqa", "nf4", 4), ("tied_embeddings", "nf4", 4), ("conv_norm", "nf4", 4), ("gpt_gqa", "log", 4),
            ("shared_parameters", "log", 4), ("gpt_block_sdpa", "int", 8), ("tied_embeddings", "log", 8)])


@pytest.mark.parametrize("name,scheme,bits", CASES)
def test_sample_models_within_tolerance_and_smaller(name, scheme, bits):
    s = sample(name)
    model = s.model.eval()
    report = fxmem.explain(model, *s.args, kwargs=s.kwargs, quantize={"bits": bits, "scheme": scheme, "group_size": 16, "min_numel": 0},
                           strict=True)
    rec = record(report)
    with torch.no_grad():
        ref = model(*s.args, **s.kwargs)
        out = report.module(*s.args, **s.kwargs)
    assert rel_err(out, ref) < TOL[(scheme, bits)]
    assert rec.status == "changed" and rec.stats["layers_rewritten"] >= 1
    op = INT8_LINEAR if (bits, scheme) == (8, "int") else LOWBIT_LINEAR
    assert op in targets(report.module.graph_module)
    before = report.records[report.records.index(rec) - 1].param_bytes
    assert rec.param_bytes == before - rec.stats["param_bytes_saved"]
    for row in rec.stats["layers"]:
        assert row["bytes_after"] < row["bytes_before"] and row["bits"] == bits and row["scheme"] == scheme


def test_four_bit_bytes_are_packed():
    s = sample("mlp")
    report = fxmem.explain(s.model.eval(), *s.args, quantize={"bits": 4, "group_size": 16, "min_numel": 0})
    for row in record(report).stats["layers"]:
        n, k = row["shape"]
        # uint8 [N, K/2] codes + fp16 scales and zeros [N, K/16]
        assert row["bytes_after"] == n * k // 2 + 2 * 2 * n * (k // 16)
        assert row["bytes_before"] == 4 * n * k


def test_group_size_fallback_to_one_group_per_row():
    s = sample("mlp")  # K = 32 and 64
    report = fxmem.explain(s.model.eval(), *s.args, quantize={"bits": 4, "group_size": 48, "min_numel": 0})
    rows = record(report).stats["layers"]
    assert all(r["granularity"].startswith("per_channel (K=") for r in rows)


# -- embeddings, tied weights ------------------------------------------------------------------


def test_embeddings_are_quantized_per_row_and_dequantized_on_lookup():
    torch.manual_seed(0)
    model = Encoder().eval()
    idx = torch.randint(0, 96, (2, 8))
    with_emb = fxmem.explain(model, idx, quantize={"bits": 4, "group_size": 16})
    without = fxmem.explain(model, idx, quantize={"bits": 4, "group_size": 16, "embeddings": False})
    assert LOWBIT_EMBEDDING in targets(with_emb.module.graph_module)
    assert LOWBIT_EMBEDDING not in targets(without.module.graph_module)
    assert parameter_bytes(with_emb.module.graph_module) < parameter_bytes(without.module.graph_module)
    rows = {r["layer"]: r for r in record(with_emb).stats["layers"]}
    assert rows["emb"]["kind"] == "embedding" and rows["emb"]["shape"] == [96, 64]
    with torch.no_grad():
        assert rel_err(with_emb.module(idx), model(idx)) < 0.2


def test_tied_embedding_and_head_share_one_packed_buffer():
    s = sample("tied_embeddings")
    model = s.model.eval()
    report = fxmem.explain(model, *s.args, quantize={"bits": 4, "scheme": "nf4", "group_size": 16})
    gm = report.module.graph_module
    qnodes = [n for n in gm.graph.nodes if n.op == "get_attr" and n.meta.get("fxmem_int8") == "q"]
    assert len(qnodes) == 1
    assert {u.target for u in qnodes[0].users} == {LOWBIT_LINEAR, LOWBIT_EMBEDDING}
    row = record(report).stats["layers"][0]
    assert set(row["names"]) >= {"emb.weight", "head.weight"} and row["uses"] == 2
    vocab, d = model.emb.weight.shape
    codebook = 16 * 4
    assert parameter_bytes(gm) == vocab * d // 2 + vocab * (d // 16) * 2 + codebook + 2 * d * 4  # + the norm
    assert not any(t.shape == (vocab, d) and t.is_floating_point() for t in gm.state_dict().values())
    with torch.no_grad():
        assert rel_err(report.module(*s.args), model(*s.args)) < 0.12


def test_int8_format_with_embeddings_uses_the_int8_ops():
    s = sample("tied_embeddings")
    report = fxmem.explain(s.model.eval(), *s.args, quantize={"bits": 8, "group_size": None})
    assert {INT8_LINEAR, INT8_EMBEDDING} <= set(targets(report.module.graph_module))
    int8_only = fxmem.explain(s.model.eval(), *s.args, int8="weight_only")
    with torch.no_grad():  # the shorthand and quantize(bits=8, per channel) are the same numbers
        torch.testing.assert_close(report.module(*s.args), int8_only.module(*s.args))


# -- calibration -------------------------------------------------------------------------------


def test_awq_calibration_lowers_output_error_on_outlier_channels():
    torch.manual_seed(0)
    model = Encoder().eval()
    calib, judge = torch.randint(0, 96, (4, 16)), torch.randint(0, 96, (4, 16))
    errs = {}
    for how in ("none", "awq"):
        rep = fxmem.explain(model, calib, quantize={"bits": 4, "group_size": 32, "calibration": how, "embeddings": False})
        with torch.no_grad():
            # same shape, other tokens: judged on inputs it was not calibrated on
            errs[how] = rel_err(rep.module(judge), model(judge))
        rows = record(rep).stats["layers"]
        if how == "awq":
            assert all(r["calibration"].startswith("awq") for r in rows)
            assert all(r["output_sqnr_db"] is not None for r in rows)
            assert record(rep).stats["calibration"] == "awq"
        else:
            assert record(rep).stats["calibration"] == "none: round-to-nearest"
    assert errs["awq"] < errs["none"]


@pytest.mark.parametrize("scheme", ["int", "nf4"])
def test_gptq_is_round_to_nearest_under_identity_hessian_and_better_otherwise(scheme):
    from fxmem.kernels import int4_matmul as k4
    from fxmem.passes.quantize import _gptq

    torch.manual_seed(0)
    w = torch.randn(16, 128)
    rtn = k4.quantize_lowbit(w, 4, scheme, 32)
    same = _gptq(w, torch.eye(128) * 2.0, 4, scheme, 32, damping=0.0)  # XᵀX ∝ I: no error to spread
    assert torch.equal(same.qweight, rtn.qweight) and torch.equal(same.scales, rtn.scales)
    basis = torch.randn(128, 128) * torch.logspace(0, -1, 128)
    calib, judge = torch.randn(1024, 128) @ basis.t(), torch.randn(1024, 128) @ basis.t()
    gptq = _gptq(w, calib, 4, scheme, 32)
    err = {name: float((judge @ (k4.dequantize(q) - w).t()).norm()) for name, q in (("rtn", rtn), ("gptq", gptq))}
    assert err["gptq"] < 0.8 * err["rtn"]


def test_gptq_through_optimize():
    torch.manual_seed(0)
    model = Encoder().eval()
    calib, judge = torch.randint(0, 96, (4, 16)), torch.randint(0, 96, (4, 16))
    errs = {}
    for how in ("none", "gptq"):
        rep = fxmem.explain(model, calib, quantize={"bits": 4, "group_size": 32, "calibration": how, "embeddings": False})
        with torch.no_grad():
            errs[how] = rel_err(rep.module(judge), model(judge))
    assert all(r["calibration"] == "gptq" for r in record(rep).stats["layers"])
    assert errs["gptq"] < errs["none"]


def test_calibration_without_example_inputs_falls_back_to_round_to_nearest():
    s = sample("mlp")
    gm = fxmem.explain(s.model.eval(), *s.args).module.graph_module
    with pytest.warns(UserWarning, match="round-to-nearest"):
        result = quantize(gm, QuantizeConfig(bits=4, group_size=16, calibration="awq", min_numel=0))
    assert "round-to-nearest" in result.stats["calibration"]
    assert all(r["calibration"] == "round-to-nearest" for r in result.stats["layers"])


# -- explain, inference only, stale weights ------------------------------------------------------


def test_explain_lists_each_layer_and_the_kernel():
    s = sample("mlp")
    report = fxmem.explain(s.model.eval(), *s.args, quantize={"bits": 4, "scheme": "log", "group_size": 16, "min_numel": 0})
    for row in record(report).stats["layers"]:
        assert {"layer", "scheme", "bits", "bytes_before", "bytes_after", "sqnr_db"} <= set(row)
        assert row["sqnr_db"] > 10
    assert any(k.name == "fxmem_lowbit_dequant_matmul" and "tl.dot" in k.source for k in report.kernels)
    text = str(report)
    assert "fc1" in text and "log" in text  # the per-layer table is printed


def test_training_graph_is_a_clear_error():
    s = sample("mlp")
    model = s.model.train()
    with pytest.raises(OptionError, match="inference graphs only"):
        fxmem.explain(model, *s.args, quantize={"bits": 4})
    gm = torch.fx.symbolic_trace(model)
    with pytest.raises(UnsupportedGraph, match="inference graphs only"):  # skipped by the runner, like every pass
        quantize(gm, QuantizeConfig(), PassContext(stage="joint"))


def test_optimized_module_raises_on_stale_weights():
    s = sample("mlp")
    model = s.model.eval()
    optimized = fxmem.optimize(model, *s.args, quantize={"bits": 4, "group_size": 16, "min_numel": 0})
    with torch.no_grad():
        optimized(*s.args)
        model.fc2.weight.add_(1.0)
    with pytest.raises(StaleWeightsError, match="fc2.weight"):
        optimized(*s.args)


def test_tied_table_changed_in_place_is_stale_for_both_uses():
    # one packed buffer serves the lookup and the head: changing the table must stop both
    s = sample("tied_embeddings")
    model = s.model.eval()
    optimized = fxmem.optimize(model, *s.args, quantize={"bits": 4, "group_size": 16, "calibration": "gptq"})
    with torch.no_grad():
        optimized(*s.args)
        model.emb.weight.mul_(2.0)
    with pytest.raises(StaleWeightsError, match=r"emb\.weight.*head\.weight"):
        optimized(*s.args)


@pytest.fixture(scope="module")
def compiled_mlp():
    s = sample("mlp")
    model = s.model.eval()
    options = {"quantize": {"bits": 4, "group_size": 16, "calibration": "awq", "min_numel": 0}, "strict": True}
    return model, s.args, torch.compile(model, backend="fxmem", options=options), options


def test_torch_compile_equals_optimize(compiled_mlp):
    model, args, compiled, options = compiled_mlp
    optimized = fxmem.optimize(model, *args, **options)
    with torch.no_grad():
        torch.testing.assert_close(compiled(*args), optimized(*args), atol=1e-6, rtol=1e-6)


def test_backend_requantizes_after_in_place_update(compiled_mlp):
    model, args, compiled, _ = compiled_mlp
    with torch.no_grad():
        first = compiled(*args)
        old = model.fc1.weight.clone()
        model.fc1.weight.mul_(3.0)
        try:
            second = compiled(*args)
            assert rel_err(second, model(*args)) < 0.12
            assert rel_err(second, first) > 0.1  # the new weights were used
        finally:
            model.fc1.weight.copy_(old)
