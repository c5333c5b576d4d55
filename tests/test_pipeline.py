import pytest
import torch
import torch.fx as fx

import fxmem
from fxmem import pipeline
from fxmem.pipeline import PassFailure, PassResult, PassSpec, Recorder, UnsupportedGraph, run_pipeline
from fxmem.testing import sample
from fxmem.verify import VerificationError

aten = torch.ops.aten


def _inference_graph():
    s = sample("mlp")
    s.model.eval()
    from fxmem.capture import capture_inference

    captured = capture_inference(s.model, s.args, None, {})
    return s, captured


def _refuse(gm, config):
    node = next(n for n in gm.graph.nodes if n.target == aten.addmm.default)
    raise UnsupportedGraph(node.target, "this pass does not handle it")


def _double_weights(gm, config):
    """A weight pass: replaces each frozen weight by a derived tensor (2 × w, then / 2 → exact)."""
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            t = getattr(gm, node.target.split(".")[0])
            for part in node.target.split(".")[1:]:
                t = getattr(t, part)
            derived = (t.detach() * 2) / 2
            name = node.target.replace(".", "_") + "_derived"
            gm.register_buffer(name, derived)
            node.target = name
    gm.recompile()
    return PassResult(gm, True, {"derived": 1})


def _corrupt_outputs(gm, config):
    """A wrong pass: multiplies the output by 1.5 (same shape and dtype, wrong numbers)."""
    out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    value = out.args[0][0]
    with gm.graph.inserting_before(out):
        bad = gm.graph.call_function(aten.mul.Tensor, (value, 1.5))
    bad.meta["val"] = value.meta["val"]
    out.args = ((bad,) + tuple(out.args[0][1:]),)
    gm.recompile()
    return PassResult(gm, True, {})


def _drop_meta(gm, config):
    node = next(n for n in gm.graph.nodes if n.op == "call_function")
    del node.meta["val"]
    return PassResult(gm, True, {})


def test_records_time_nodes_and_statistics_per_pass():
    s, captured = _inference_graph()
    rec = Recorder()
    spec = PassSpec("double", ("inference",), _double_weights)
    gm = run_pipeline(captured.gm, "inference", fxmem.parse_options(), rec, passes=(spec,))
    names = [r.name for r in rec.records]
    assert names == ["input", "double"]
    row = rec.records[-1]
    assert row.status == "changed" and row.stats == {"derived": 1} and row.time_s >= 0
    assert row.nodes_before == row.nodes_after > 0
    assert "derived" in rec.graphs["inference"]
    torch.testing.assert_close(gm(*s.args)[0], s.model(*s.args))


def test_a_failing_pass_is_skipped_with_a_warning_naming_it_and_the_op():
    s, captured = _inference_graph()
    rec = Recorder()
    spec = PassSpec("refuser", ("inference",), _refuse)
    before = captured.gm.code
    with pytest.warns(UserWarning, match=r"pass 'refuser'.*aten\.addmm\.default.*skipped"):
        gm = run_pipeline(captured.gm, "inference", fxmem.parse_options(), rec, passes=(spec,))
    assert gm.code == before
    assert rec.records[-1].status == "skipped"
    torch.testing.assert_close(gm(*s.args)[0], s.model(*s.args))


def test_strict_raises_with_the_pass_history():
    _, captured = _inference_graph()
    specs = (PassSpec("double", ("inference",), _double_weights), PassSpec("refuser", ("inference",), _refuse))
    with pytest.raises(PassFailure, match=r"'refuser'.*passes that ran before it: double"):
        run_pipeline(captured.gm, "inference", fxmem.parse_options(strict=True), Recorder(), passes=specs)


def test_graph_checks_catch_a_pass_that_drops_metadata():
    _, captured = _inference_graph()
    with pytest.raises(PassFailure, match="has no meta"):
        run_pipeline(captured.gm, "inference", fxmem.parse_options(strict=True), Recorder(),
                     passes=(PassSpec("dropper", ("inference",), _drop_meta),))


def test_verify_raises_when_the_compiled_graph_is_wrong(monkeypatch):
    monkeypatch.setattr(pipeline, "_passes", lambda: (PassSpec("corrupt", ("inference",), _corrupt_outputs),))
    s = sample("mlp")
    s.model.eval()
    compiled = torch.compile(s.model, backend=fxmem.backend(verify=True))
    with torch.no_grad(), pytest.raises(Exception, match="differs from eager"):
        compiled(*s.args)


def test_verify_passes_on_a_correct_graph():
    s = sample("gpt_block_manual")
    compiled = torch.compile(s.model, backend=fxmem.backend(verify=True))
    out = compiled(*s.args)
    torch.testing.assert_close(out, s.model(*s.args))
    assert VerificationError is fxmem.VerificationError


def test_derived_weights_are_watched_in_the_backend_and_in_optimized_modules(monkeypatch):
    monkeypatch.setattr(pipeline, "_passes", lambda: (PassSpec("double", ("inference",), _double_weights),))
    s = sample("mlp")
    s.model.eval()
    compiled = torch.compile(s.model, backend=fxmem.backend(strict=True))  # the pass must run
    module = fxmem.optimize(s.model, *s.args, strict=True)
    with torch.no_grad():
        compiled(*s.args)
        s.model.fc2.weight.add_(0.5)  # in place: the derived copies are stale now
        # the backend derives its weights again ...
        torch.testing.assert_close(compiled(*s.args), s.model(*s.args))
    # ... and a standalone module refuses to compute with the old ones
    with pytest.raises(fxmem.StaleWeightsError, match="fc2.weight"):
        module(*s.args)


def test_shallow_copy_shares_weights_and_not_the_graph():
    _, captured = _inference_graph()
    copy = pipeline.shallow_copy(captured.gm)
    assert copy.graph is not captured.gm.graph
    assert copy.fc1.weight is captured.gm.fc1.weight
    assert isinstance(copy, fx.GraphModule)
