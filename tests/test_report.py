import pytest
import torch

import fxmem
from fxmem.capture import SignatureError
from fxmem.models.gpt import GPT, GPTConfig, example_batch
from fxmem.report import graph_to_dot
from fxmem.testing import assert_equivalent, sample

CFG = GPTConfig(n_layer=2, d_model=64, n_head=4, block_size=16, vocab_size=128)


def test_inference_report_has_rows_graphs_and_a_module_with_the_models_signature():
    model = GPT(CFG).eval()
    idx, targets = example_batch(CFG, 2, seed=0), example_batch(CFG, 2, seed=1)
    report = fxmem.explain(model, idx, kwargs={"targets": targets})
    assert report.mode == "inference"
    first = report.rows()[0]
    assert {"pass", "time_ms", "nodes", "param_bytes", "saved_bytes", "peak_bytes"} <= set(first)
    assert first["param_bytes"] == report.eager_param_bytes  # tied lm_head counted once
    assert "inference" in report.graphs and "def forward" in report.graphs["input"]
    logits, loss = report.module(idx, targets=targets)
    ref_logits, ref_loss = model(idx, targets)
    torch.testing.assert_close(logits, ref_logits)
    torch.testing.assert_close(loss, ref_loss)
    text = str(report)
    assert "params MiB" in text and "peak MiB" in text and "input" in text
    assert report.kernels == []


def test_optimized_module_refuses_other_shapes_and_values():
    s = sample("gpt_block_manual")
    s.model.eval()
    module = fxmem.optimize(s.model, *s.args)
    with pytest.raises(SignatureError, match="traced for"):
        module(torch.randn(3, 16, 64))
    with pytest.raises(SignatureError, match="structured"):
        module(*s.args, extra=1)


def test_optimized_module_saves_loads_and_compiles():
    s = sample("mlp")
    s.model.eval()
    module = fxmem.optimize(s.model, *s.args)
    state = module.state_dict()
    assert any(k.endswith("fc1.weight") for k in state)
    clone = fxmem.optimize(sample("mlp").model.eval(), *s.args)
    clone.load_state_dict(state)
    torch.testing.assert_close(clone(*s.args), s.model(*s.args))
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(*s.args), s.model(*s.args))


def test_training_report_shows_the_partition_and_both_graphs():
    s = sample("gpt_block_sdpa")
    grad_before = s.model.ln_1.weight.grad
    report = fxmem.explain(s.model, *s.args)
    assert report.mode == "training"
    stages = {r.stage for r in report.records}
    assert {"joint", "forward", "backward"} <= stages
    assert report.partitions and report.partitions[0]["saved_bytes"] > 0
    saved_rows = [r for r in report.records if r.saved_bytes is not None]
    assert saved_rows and "saved MiB" in str(report)
    assert s.model.ln_1.weight.grad is grad_before  # explain leaves the model's grads alone
    assert_equivalent(s.model, report.module, s.args)


def test_html_report(tmp_path):
    s = sample("mlp")
    s.model.eval()
    report = fxmem.explain(s.model, *s.args)
    path = report.to_html(str(tmp_path / "report.html"))
    text = open(path, encoding="utf-8").read()
    assert "<table" in text and "fc1_weight" in text and "final graph" in text


def test_graph_to_dot_names_every_node_and_edge():
    s = sample("mlp")
    s.model.eval()
    report = fxmem.explain(s.model, *s.args)
    graph = next(iter(report.final_graphs.values()))
    dot = graph_to_dot(graph)
    for node in graph.nodes:
        assert f'"{node.name}"' in dot
    assert dot.count("->") == sum(len(n.users) for n in graph.nodes)


def test_bad_calls_are_clear_errors():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        fxmem.explain(lambda x: x, torch.randn(2))
    with pytest.raises(fxmem.OptionError, match="mode"):
        fxmem.explain(torch.nn.Linear(2, 2), torch.randn(1, 2), mode="serving")
    with pytest.raises(fxmem.OptionError, match="unknown fxmem option"):
        fxmem.explain(torch.nn.Linear(2, 2), torch.randn(1, 2), bogus=True)


def test_training_explain_reports_the_measured_peak_beside_the_estimate():
    # issue 11: the figure is the peak measured from outside; the estimate is shown beside it
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 8)).train()
    x = torch.randn(32, 64)
    report = fxmem.explain(model, x, codegen="eager")
    measured = report.measured_peak
    assert measured is not None and measured.method == "torch.profiler allocator events"
    # at least the weight gradients a step creates (the first Linear's is 64 KiB) ...
    assert measured.peak_bytes >= 256 * 64 * 4
    # ... and, op by op, what fxmem's timeline estimates to within 10%
    assert abs(measured.peak_bytes - report.timeline.peak_bytes) <= 0.1 * measured.peak_bytes
    assert "measured peak of a training step" in str(report)
    assert all(p.grad is None for p in model.parameters())  # explain leaves the parameters' grads as they were


def test_training_explain_of_an_hf_model_differentiates_its_loss_not_its_logits():
    """An HF causal LM with the loss inside returns ``loss`` and ``logits``; a training step calls
    ``out.loss.backward()``. explain's measured step is that one (it once summed the logits into
    the loss: a ``[B, T, V]`` gradient and two head matmuls no real step has, 45 MiB measured
    against 27 on Qwen2 at the benchmark's shapes), and the estimate is within 10 % of it."""
    from fxmem.measure import training_loss, training_step_peak
    from fxmem.testing.hf_zoo import build

    case = build("qwen2")
    report = fxmem.explain(case.model, kwargs=case.inputs, codegen="eager")
    params = list(case.model.parameters())

    def loss_only_step():
        for p in params:
            p.grad = None
        out = report.module(**case.inputs)
        out.loss.backward()

    loss_only_step()
    loss_only = training_step_peak(loss_only_step).peak_bytes
    measured = report.measured_peak.peak_bytes
    assert abs(measured - loss_only) <= 0.02 * loss_only, (measured, loss_only)
    assert abs(report.timeline.peak_bytes - measured) <= 0.10 * measured, (report.timeline.peak_bytes, measured)
    # the rule (fit and the benchmarks use it too): a mapping's loss; else the scalars; else the
    # mean of squares of every output that requires grad
    a, b = torch.ones(3, requires_grad=True), torch.ones((), requires_grad=True)
    assert training_loss({"loss": b, "logits": a}) is b
    assert training_loss((a * 2, b * 3)).item() == 3.0
    assert training_loss((a * 2, a * 3)).item() == 4.0 + 9.0
    assert training_loss(a * 2).item() == 4.0
    assert training_loss((torch.ones(2),)) is None


def test_inference_explain_has_no_measured_training_peak():
    model = torch.nn.Linear(8, 8).eval()
    assert fxmem.explain(model, torch.randn(2, 8)).measured_peak is None
