import copy

import pytest
import torch
import torch.fx as fx

import fxmem
from fxmem import pipeline
from fxmem.pipeline import PassFailure, PassResult, PassSpec, Recorder, UnsupportedGraph, run_pipeline
from fxmem.testing import recording_backend, sample
from fxmem.verify import VerificationError

aten = torch.ops.aten


def _inference_graph():
    s = sample("mlp")
    s.model.eval()
    from fxmem.capture import capture_inference

    captured = capture_inference(s.model, s.args, None, {})
    return s, captured


def _refuse(gm, config, ctx):
    node = next(n for n in gm.graph.nodes if n.target == aten.addmm.default)
    raise UnsupportedGraph(node.target, "this pass does not handle it")


def _double_weights(gm, config, ctx):
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


def _corrupt_outputs(gm, config, ctx):
    """A wrong pass: multiplies the output by 1.5 (same shape and dtype, wrong numbers)."""
    out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    value = out.args[0][0]
    with gm.graph.inserting_before(out):
        bad = gm.graph.call_function(aten.mul.Tensor, (value, 1.5))
    bad.meta["val"] = value.meta["val"]
    out.args = ((bad,) + tuple(out.args[0][1:]),)
    gm.recompile()
    return PassResult(gm, True, {})


def _drop_meta(gm, config, ctx):
    node = next(n for n in gm.graph.nodes if n.op == "call_function")
    del node.meta["val"]
    return PassResult(gm, True, {})


def test_records_time_nodes_and_statistics_per_pass():
    s, captured = _inference_graph()
    rec = Recorder()
    spec = PassSpec("double", ("inference",), _double_weights, real_tensors=True)
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
    specs = (PassSpec("double", ("inference",), _double_weights, real_tensors=True), PassSpec("refuser", ("inference",), _refuse))
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
    compiled = torch.compile(s.model, backend=fxmem.backend(verify=True, codegen="eager"))
    with torch.no_grad(), pytest.raises(Exception, match="differs from eager"):
        compiled(*s.args)


def test_verify_passes_on_a_correct_graph():
    s = sample("gpt_block_manual")
    compiled = torch.compile(s.model, backend=fxmem.backend(verify=True, codegen="eager"))
    out = compiled(*s.args)
    torch.testing.assert_close(out, s.model(*s.args))
    assert VerificationError is fxmem.VerificationError


def test_derived_weights_are_watched_in_the_backend_and_in_optimized_modules(monkeypatch):
    monkeypatch.setattr(pipeline, "_passes", lambda: (PassSpec("double", ("inference",), _double_weights, real_tensors=True),))
    s = sample("mlp")
    s.model.eval()
    compiled = torch.compile(s.model, backend=fxmem.backend(strict=True, codegen="eager"))  # the pass must run
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


# -- the runner owns the context ------------------------------------------------------------------


def test_the_runner_hands_each_pass_its_own_config_and_an_explicit_context():
    s, captured = _inference_graph()
    seen = []

    def look(gm, config, ctx):
        seen.append((config, ctx))
        return PassResult(gm, False, {})

    config = fxmem.parse_options(int8="weight_only")
    spec = PassSpec("int8_like", ("inference",), look, "int8")
    run_pipeline(captured.gm, "inference", config, Recorder(), example_inputs=list(captured.example_tensors),
                 graph_name="g", passes=(spec,))
    ((got_config, ctx),) = seen
    assert got_config is config.int8
    assert ctx.stage == "inference" and ctx.graph_name == "g"
    assert ctx.example_inputs == captured.example_tensors and isinstance(ctx.example_inputs, tuple)
    assert not {k for k in captured.gm.meta if str(k).startswith("fxmem")}  # nothing hidden in gm.meta


def test_every_pass_in_the_table_gets_its_own_config_never_the_whole_one():
    # int8 is quantize's shorthand (the two are exclusive options): two configs switch every pass on
    common = {"prune": {"ratio": 0.5}, "precision": "bf16", "lowrank": {"ratio": 0.8}}
    configs = (fxmem.parse_options(int8="weight_only", **common), fxmem.parse_options(quantize={"bits": 4}, **common))
    for spec in (*pipeline.PASSES, pipeline.REMAT):
        assert any(spec.enabled(c) for c in configs), spec.name
        for c in configs:
            assert not isinstance(spec.config_for(c), fxmem.FxmemConfig), spec.name
    config = configs[0]
    shard_spec = next(s for s in pipeline.PASSES if s.name == "shard")
    assert isinstance(shard_spec.config_for(config), fxmem.config.ShardConfig)


def test_a_stage_not_in_the_table_row_never_reaches_the_pass():
    _, captured = _inference_graph()
    calls = []
    spec = PassSpec("joint_only", ("joint",), lambda gm, config, ctx: calls.append(ctx) or PassResult(gm, False, {}))
    run_pipeline(captured.gm, "inference", fxmem.parse_options(), Recorder(), passes=(spec,))
    assert calls == []


def _fake_mode_seen(gm, config, ctx, box):
    from torch._subclasses.fake_tensor import FakeTensor

    box.append(isinstance(torch.empty(1), FakeTensor))  # a new tensor is fake while a fake mode is active
    return PassResult(gm, False, {})


def test_the_runner_leaves_fake_mode_only_for_passes_that_compute_real_tensors(monkeypatch):
    real_box, meta_box = [], []
    specs = (PassSpec("real", ("inference",), lambda g, c, x: _fake_mode_seen(g, c, x, real_box), real_tensors=True),
             PassSpec("meta", ("inference",), lambda g, c, x: _fake_mode_seen(g, c, x, meta_box)))
    monkeypatch.setattr(pipeline, "_passes", lambda: specs)
    s = sample("mlp")
    s.model.eval()
    with torch.no_grad():
        torch.compile(s.model, backend=fxmem.backend(strict=True))(*s.args)
    assert real_box == [False]  # left AOTAutograd's fake mode
    assert meta_box == [True]   # metadata-only passes stay in it


def test_a_failing_pass_leaves_no_state_behind():
    s, captured = _inference_graph()
    gm = captured.gm
    before_code, before_attrs = gm.code, dict(gm.named_buffers())

    def half_done(gm, config, ctx):
        gm.register_buffer("scratch", torch.zeros(3))
        attr = next(n for n in gm.graph.nodes if n.op == "get_attr")
        attr.target = "scratch"  # its graph reads another tensor now
        raise UnsupportedGraph(attr.target, "gave up half-way")

    rec = Recorder()
    with pytest.warns(UserWarning, match="half_done"):
        out = run_pipeline(gm, "inference", fxmem.parse_options(), rec,
                           passes=(PassSpec("half_done", ("inference",), half_done, real_tensors=True),))
    assert out is gm and gm.code == before_code
    assert not hasattr(gm, "scratch") and dict(gm.named_buffers()).keys() == before_attrs.keys()
    assert [r.status for r in rec.records] == ["unchanged", "skipped"] and "gave up" in rec.records[-1].message
    torch.testing.assert_close(out(*s.args)[0], s.model(*s.args))


# -- remat runs through the same runner -----------------------------------------------------------


def _remat_refuses(monkeypatch):
    from fxmem.passes import remat

    def refuse(joint, *args, **kwargs):
        raise UnsupportedGraph(aten.mm.default, "this joint graph is beyond the min-cut")

    monkeypatch.setattr(remat, "_classify", refuse)


def test_a_failing_remat_falls_back_to_default_partition_with_a_warning(monkeypatch):
    _remat_refuses(monkeypatch)
    torch._dynamo.reset()
    s = sample("mlp")
    be = recording_backend(remat=True)
    compiled = torch.compile(s.model, backend=be)
    with pytest.warns(UserWarning, match=r"pass 'remat'.*aten\.mm\.default.*default_partition was used instead"):
        out = compiled(*s.args)
    torch.testing.assert_close(out, s.model(*s.args))
    out.sum().backward()  # the fallback partition trains
    (info,) = be.recorder.partitions
    assert info["partitioner"] == "default_partition (remat failed)" and info["saved_bytes"] > 0
    (row,) = [r for r in be.recorder.records if r.name == "remat"]
    assert row.status == "skipped" and "min-cut" in row.message and row.graph == "forward"
    assert row.saved_bytes == info["saved_bytes"]


def test_a_failing_remat_raises_under_strict_and_leaves_the_joint_graph_alone(monkeypatch):
    from fxmem.passes import remat

    s = sample("mlp")
    j = remat.trace_joint(s.model, *s.args)
    code = j.graph_module.code
    _remat_refuses(monkeypatch)
    with pytest.raises(PassFailure, match=r"'remat'.*aten\.mm\.default"):
        pipeline.run_partition(j.graph_module, j.inputs, fxmem.parse_options(strict=True), Recorder(),
                               num_fwd_outputs=j.num_fwd_outputs, static_lifetime_input_indices=j.static_lifetime_input_indices)
    assert j.graph_module.code == code
    rec = Recorder()
    with pytest.warns(UserWarning, match="'remat'"):
        fw, bw = pipeline.run_partition(j.graph_module, j.inputs, fxmem.parse_options(), rec, num_fwd_outputs=j.num_fwd_outputs,
                                        static_lifetime_input_indices=j.static_lifetime_input_indices)
    eager_fw, _ = torch._functorch.partitioners.default_partition(
        copy.deepcopy(j.graph_module), j.inputs, num_fwd_outputs=j.num_fwd_outputs,
        static_lifetime_input_indices=j.static_lifetime_input_indices)
    assert fw.code == eager_fw.code  # exactly PyTorch's partition


def test_the_remat_report_row_is_made_by_the_runner():
    torch._dynamo.reset()
    s = sample("gpt_block_manual")
    be = recording_backend(remat={"budget": 0.5})
    torch.compile(s.model, backend=be)(*s.args).sum().backward()
    (row,) = [r for r in be.recorder.records if r.name == "remat"]
    (info,) = be.recorder.partitions
    assert row.status == "changed" and row.stage == "forward" and row.stats["partitioner"] == "fxmem min-cut"
    assert row.saved_bytes == info["saved_bytes"] <= info["eager_saved_bytes"]
    forward_rows = [r.name for r in be.recorder.records if r.graph == "forward"]
    assert forward_rows[:2] == ["remat", "input"]  # the partition's row heads the forward graph it made
