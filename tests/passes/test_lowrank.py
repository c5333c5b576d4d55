"""The lowrank pass: factor shapes and bytes, whitened vs plain SVD, where it applies, options,
composition with quantize, stale weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import fxmem
from fxmem.config import LowRankConfig, OptionError, parse_options
from fxmem.freeze import StaleWeightsError
from fxmem.passes import lowrank
from fxmem.testing import sample


def rel_err(out, ref) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12))


def record(report, name="lowrank"):
    return next(r for r in report.records if r.name == name)


class Wide(nn.Module):
    """Inputs with a few dominant directions (as transformer activations have) into two Linears."""

    def __init__(self, d=64, hidden=96):
        super().__init__()
        self.mix = nn.Parameter(torch.randn(d, d) * torch.logspace(0, -2, d)[None, :], requires_grad=False)
        self.up = nn.Linear(d, hidden)
        self.down = nn.Linear(hidden, d)

    def forward(self, z):
        return self.down(torch.tanh(self.up(z @ self.mix.t())))


def test_options():
    assert parse_options(lowrank={"ratio": 0.6, "method": "svd"}).lowrank == LowRankConfig(ratio=0.6, method="svd")
    for bad, key in [({"ratio": 0}, "lowrank.ratio"), ({"ratio": 1.5}, "lowrank.ratio"), ({"method": "qr"}, "lowrank.method"),
                     ({"damping": -1}, "lowrank.damping"), ({"rank": 3}, "lowrank"), (0.5, "lowrank")]:
        with pytest.raises(OptionError, match=key):
            parse_options(lowrank=bad)


def test_rank_and_factors():
    assert lowrank.rank_for(384, 1536, 0.8) == 245 and lowrank.rank_for(64, 64, 0.5) == 16
    torch.manual_seed(0)
    w = torch.randn(40, 24)
    a, b = lowrank.factorize_weight(w, 24, None)  # full rank: exact
    torch.testing.assert_close(a @ b, w.double(), atol=1e-9, rtol=0)
    a, b = lowrank.factorize_weight(w, 5, None)
    assert a.shape == (40, 5) and b.shape == (5, 24)
    # plain truncated SVD is the best rank-5 approximation of W (Eckart–Young)
    s = torch.linalg.svdvals(w.double())
    torch.testing.assert_close((w.double() - a @ b).norm(), s[5:].norm())


def test_whitened_svd_has_lower_output_error_on_held_out_inputs():
    torch.manual_seed(0)
    d = 48
    basis = torch.randn(d, d) * torch.logspace(0, -2, d)[None, :]
    calib, judge = torch.randn(512, d) @ basis.t(), torch.randn(512, d) @ basis.t()
    w = torch.randn(64, d)
    errs = {}
    for name, x in (("svd", None), ("whitened", calib)):
        a, b = lowrank.factorize_weight(w, 12, x, damping=1e-6)
        errs[name] = rel_err(judge.double() @ (a @ b).t(), judge.double() @ w.double().t())
    assert errs["whitened"] < 0.5 * errs["svd"]


def test_pass_factors_only_where_bytes_are_saved():
    s = sample("mlp")  # 64x32, 64x64, 16x64
    model = s.model.eval()
    report = fxmem.explain(model, *s.args, lowrank={"ratio": 0.5, "min_numel": 0})
    rec = record(report)
    rows = {r["layer"]: r for r in rec.stats["layers"]}
    for row in rows.values():
        n, k = row["shape"]
        assert row["rank"] == lowrank.rank_for(n, k, 0.5)
        assert row["bytes_after"] == 4 * row["rank"] * (n + k) < row["bytes_before"] == 4 * n * k
        assert "output_sqnr_db" in row and row["method"] == "whitened"
    assert rec.param_bytes == report.records[report.records.index(rec) - 1].param_bytes - rec.stats["param_bytes_saved"]
    # ratio 1: fc2 (64x64) at rank 32 holds 32·128 = 64·64 parameters, no saving, so it stays whole;
    # fc1 (64x32) at rank ⌊2048/96⌋ = 21 holds 2016 < 2048 and is factored
    full = fxmem.explain(model, *s.args, lowrank={"ratio": 1.0, "min_numel": 0})
    skipped = {r["layer"]: r["reason"] for r in record(full).stats["skipped"]}
    assert "saves no bytes" in skipped["fc2.weight"]
    assert "fc1" in {r["layer"] for r in record(full).stats["layers"]}


def test_whitened_beats_plain_svd_through_optimize():
    torch.manual_seed(0)
    model = Wide().eval()
    calib, judge = torch.randn(64, 64), torch.randn(64, 64)
    with torch.no_grad():
        ref = model(judge)
    errs = {}
    for method in ("svd", "whitened"):
        optimized = fxmem.optimize(model, calib, lowrank={"ratio": 0.5, "method": method}, strict=True)
        with torch.no_grad():
            errs[method] = rel_err(optimized(judge), ref)
    assert errs["whitened"] < 0.7 * errs["svd"]


def test_factors_are_quantized_by_a_later_quantize():
    s = sample("mlp")
    report = fxmem.explain(s.model.eval(), *s.args, lowrank={"ratio": 0.5, "min_numel": 0},
                           quantize={"bits": 8, "group_size": None, "min_numel": 0}, strict=True)
    n_factored = len(record(report).stats["layers"])
    quantized = record(report, "quantize").stats["layers"]
    assert n_factored == 3 and sum(".lowrank_" in r["layer"] for r in quantized) == 2 * n_factored
    with torch.no_grad():
        assert rel_err(report.module(*s.args), s.model(*s.args)) < 0.5


def test_no_example_inputs_falls_back_to_plain_svd():
    s = sample("mlp")
    gm = fxmem.explain(s.model.eval(), *s.args).module.graph_module
    with pytest.warns(UserWarning, match="plain truncated SVD"):
        result = lowrank.factorize(gm, LowRankConfig(ratio=0.5, min_numel=0))
    assert result.stats["method"].startswith("svd")


def test_stale_weights_and_training():
    s = sample("mlp")
    model = s.model.eval()
    optimized = fxmem.optimize(model, *s.args, lowrank={"ratio": 0.5, "min_numel": 0})
    with torch.no_grad():
        optimized(*s.args)
        model.fc1.weight.add_(1.0)
    with pytest.raises(StaleWeightsError, match="fc1.weight"):
        optimized(*s.args)
    with pytest.raises(OptionError, match="inference graphs only"):
        fxmem.explain(model.train(), *s.args, lowrank={"ratio": 0.5})
