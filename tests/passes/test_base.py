"""The pass contract is a leaf module: passes import it, never the pipeline that runs them."""

import ast
import pathlib
import subprocess
import sys

import pytest
import torch
import torch.fx as fx

from fxmem.passes import remat
from fxmem.passes.base import PassContext, UnsupportedGraph, copy_graph, normalize_void_ops, shallow_copy
from fxmem.testing import sample

PASSES_DIR = pathlib.Path(__file__).resolve().parents[2] / "fxmem" / "passes"


def _imported_modules(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):  # also imports inside functions (the old lazy ones)
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def test_base_imports_nothing_of_fxmem():
    imported = _imported_modules(PASSES_DIR / "base.py")
    assert imported, "the scan found no import at all"
    assert not {m for m in imported if m == "fxmem" or m.startswith("fxmem.")}, imported


def test_no_pass_module_imports_the_pipeline():
    modules = sorted(PASSES_DIR.glob("*.py"))
    assert len(modules) >= 8  # the scan sees the pass modules
    offenders = {p.name: m for p in modules for m in _imported_modules(p) if m in ("fxmem.pipeline", "fxmem.backend", "fxmem.report")}
    assert not offenders, f"pass modules import the runner: {offenders}"


def test_base_imports_alone_in_a_fresh_interpreter():
    code = ("import sys, importlib.util; "
            "spec = importlib.util.spec_from_file_location('base', sys.argv[1]); "
            "m = importlib.util.module_from_spec(spec); sys.modules['base'] = m; spec.loader.exec_module(m); "
            "assert not [k for k in sys.modules if k.startswith('fxmem')]; "
            "print(m.PassContext(stage='joint').stage)")
    out = subprocess.run([sys.executable, "-c", code, str(PASSES_DIR / "base.py")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "joint"


def test_context_rejects_an_unknown_stage_and_states_preconditions():
    with pytest.raises(ValueError, match="unknown stage 'train'.*accepted"):
        PassContext(stage="train")
    with pytest.raises(UnsupportedGraph, match="inference graphs only; this is a 'joint' graph"):
        PassContext(stage="joint").require_stage("prune", "inference")
    PassContext(stage="inference").require_stage("prune", "inference")  # no error


def test_context_hides_fake_example_inputs():
    from torch._subclasses.fake_tensor import FakeTensorMode

    real = (torch.randn(2),)
    assert PassContext(example_inputs=[real[0]]).real_example_inputs() == real
    with FakeTensorMode() as mode:
        fake = (mode.from_tensor(real[0]),)
    assert PassContext(example_inputs=fake).example_inputs == fake
    assert PassContext(example_inputs=fake).real_example_inputs() is None
    assert PassContext().real_example_inputs() is None


def test_copy_graph_keeps_the_output_description_and_codegen():
    """AOTAutograd's partitioners read the joint graph's output ``meta["desc"]``: a copy keeps it."""
    s = sample("mlp")
    joint = remat.trace_joint(s.model, *s.args).graph_module
    out = next(n for n in reversed(joint.graph.nodes) if n.op == "output")
    copied = copy_graph(joint.graph)
    new_out = next(n for n in reversed(copied.nodes) if n.op == "output")
    assert new_out.meta.keys() == out.meta.keys() and new_out.meta is not out.meta
    assert type(copied._codegen) is type(joint.graph._codegen)
    assert [n.name for n in copied.nodes] == [n.name for n in joint.graph.nodes]
    assert all(a is not b for a, b in zip(copied.nodes, joint.graph.nodes))


def test_shallow_copy_shares_weights_and_drops_what_the_graph_does_not_read():
    root = torch.nn.Module()
    root.register_buffer("w", torch.randn(3))
    graph = fx.Graph()
    graph.output(graph.call_function(torch.ops.aten.mul.Tensor, (graph.placeholder("x"), graph.get_attr("w"))))
    gm = fx.GraphModule(root, graph)
    gm.register_buffer("unused", torch.zeros(1))
    new = shallow_copy(gm)
    assert new.w is gm.w and not hasattr(new, "unused")
    assert new.graph is not gm.graph and new.code == gm.code


def test_void_ops_get_a_none_value_once():
    graph = fx.Graph()
    x = graph.placeholder("x")
    x.meta["val"] = torch.empty(2)
    check = graph.call_function(torch.ops.aten._assert_tensor_metadata.default, (x,), {"dtype": torch.float32})
    graph.output(x)
    gm = normalize_void_ops(fx.GraphModule(torch.nn.Module(), graph))
    assert "val" in check.meta and check.meta["val"] is None
    assert gm.graph is graph


def test_no_pass_reads_hidden_inputs_from_the_graph_modules_meta():
    """Stage and example inputs come in the PassContext; ``gm.meta`` carries nothing to a pass."""
    import re

    modules = sorted(PASSES_DIR.glob("*.py"))
    readers = {p.name for p in modules if p.name != "base.py" and re.search(r"\bgm\.meta\b", p.read_text(encoding="utf-8"))}
    assert not readers, readers
