"""fxmem changes nothing process-wide: no environment writes, one reading of ``TRITON_INTERPRET``
(parsed as Triton parses it), ops defined at import only, and a pass that fails or a graph that
is dropped leaves nothing registered."""

import ast
import gc
import os
import pathlib

import pytest
import torch

import fxmem
from fxmem.config import LowerConfig
from fxmem.kernels import codegen, interpreter
from fxmem.passes import lower as lower_mod

PACKAGE = pathlib.Path(fxmem.__file__).parent
_WRITES = {"setdefault", "update", "pop", "popitem", "clear", "__setitem__", "__delitem__"}


def _is_os_environ(node) -> bool:
    return isinstance(node, ast.Attribute) and node.attr == "environ" and isinstance(node.value, ast.Name) \
        and node.value.id == "os"


def _env_writes(tree) -> list[int]:
    lines = []
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        elif isinstance(node, ast.Delete):
            targets = node.targets
        if any(isinstance(t, ast.Subscript) and _is_os_environ(t.value) for t in targets):
            lines.append(node.lineno)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            f = node.func
            if (_is_os_environ(f.value) and f.attr in _WRITES) or \
                    (isinstance(f.value, ast.Name) and f.value.id == "os" and f.attr in ("putenv", "unsetenv")):
                lines.append(node.lineno)
    return sorted(lines)


def test_the_checker_finds_environment_writes():
    code = ("import os\nos.environ['A'] = '1'\nos.environ.setdefault('B', '1')\nos.putenv('C', '1')\n"
            "del os.environ['A']\nos.environ.update(D='1')\nx = os.environ.get('E')\n")
    assert _env_writes(ast.parse(code)) == [2, 3, 4, 5, 6]


def test_no_module_of_the_package_writes_the_environment():
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text()
        lines = _env_writes(ast.parse(text))
        if lines or "putenv" in text:
            found[str(path.relative_to(PACKAGE))] = lines
    assert found == {}


@pytest.mark.parametrize("value", ["1", "true", "True", "ON", "yes", "y", "0", "false", "off", "", "2", " 1"])
def test_triton_interpret_is_parsed_as_triton_parses_it(monkeypatch, value):
    libtriton = pytest.importorskip("triton._C.libtriton")
    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert interpreter.requested() == libtriton.getenv_bool("TRITON_INTERPRET", False)


def test_forced_lowering_on_cpu_leaves_the_environment_alone(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    before = dict(os.environ)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8), torch.nn.GELU()).eval()
    x = torch.randn(2, 8)
    with pytest.warns(UserWarning, match="TRITON_INTERPRET"):
        report = fxmem.explain(model, x, lower=True)
    assert dict(os.environ) == before
    assert [r.status for r in report.records if r.name == "lower"] == ["skipped"]
    with torch.no_grad():
        torch.testing.assert_close(report.module(x), model(x))


def _fake_cuda_graph():
    """Two lowerable regions (pointwise chains around a matmul) on fake CUDA tensors: "auto"
    lowers them without launching anything (no GPU needed)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    def f(x, w):
        y = torch.relu(x * 2.0) + 1.0
        return torch.sigmoid(y @ w) * 3.0

    with FakeTensorMode(allow_non_fake_inputs=True):
        args = (torch.empty(4, 8, device="cuda"), torch.empty(8, 8, device="cuda"))
        return torch.fx.experimental.proxy_tensor.make_fx(f, tracing_mode="fake")(*args)


def _all_ops() -> set[str]:
    return set(torch._C._dispatch_get_all_op_names())


def test_a_lowered_graph_holds_its_kernels_and_nothing_outlives_it():
    gc.collect()
    live, ops = set(codegen.live_kernels()), _all_ops()
    result = lower_mod.lower(_fake_cuda_graph(), LowerConfig())
    assert result.stats["lowered"] == 2
    calls = [n for n in result.gm.graph.nodes if n.target is torch.ops.fxmem.fused_kernel.default]
    assert len(calls) == 2 and all(n.meta[codegen.META_KEY].key == n.args[1] for n in calls)
    assert {n.args[1] for n in calls} <= set(codegen.live_kernels())
    assert _all_ops() == ops  # no op registered for a kernel: the one op was defined at import
    del result, calls
    gc.collect()
    assert set(codegen.live_kernels()) == live


def test_a_failing_lower_pass_leaves_nothing_registered(monkeypatch):
    real = lower_mod._rewrite
    calls = []

    def fail_on_second(gm, plan, config):
        calls.append(1)
        if len(calls) == 2:
            raise lower_mod.UnsupportedGraph("test", "injected failure after one kernel was built")
        return real(gm, plan, config)

    monkeypatch.setattr(lower_mod, "_rewrite", fail_on_second)
    gc.collect()
    live, ops = set(codegen.live_kernels()), _all_ops()
    with pytest.raises(lower_mod.UnsupportedGraph, match="injected"):
        lower_mod.lower(_fake_cuda_graph(), LowerConfig())
    assert len(calls) == 2
    gc.collect()
    assert set(codegen.live_kernels()) == live
    assert _all_ops() == ops


def test_a_kernel_whose_graph_was_freed_is_a_clear_error():
    with pytest.raises(RuntimeError, match="not held by any graph"):
        torch.ops.fxmem.fused_kernel([torch.randn(2)], "fxk_gone_0000")


def test_the_ops_are_defined_by_their_modules_at_import():
    import fxmem.kernels.int8_matmul  # noqa: F401

    assert hasattr(torch.ops.fxmem, "fused_kernel") and hasattr(torch.ops.fxmem, "int8_linear")
