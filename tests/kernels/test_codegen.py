"""Generated Triton kernels: source, sanitizing, caching, and numerics under the interpreter.

Triton reads ``TRITON_INTERPRET`` when it is first imported (Dynamo imports it), so it is set at
the very top of this module. When an earlier test module already imported Triton without it,
the kernel tests here are skipped in-process and :func:`test_in_interpreter_subprocess` runs
this file again in a fresh interpreter with the variable set.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import ast  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from fxmem.kernels import codegen  # noqa: E402
from fxmem.kernels.codegen import Program  # noqa: E402
from fxmem.testing.interpreter import rerun_under_interpreter  # noqa: E402

INTERPRETER = codegen.interpreter_enabled()
needs_interpreter = pytest.mark.skipif(not INTERPRETER, reason="Triton was imported without TRITON_INTERPRET=1 "
                                       "in this process; test_in_interpreter_subprocess runs these")
P = Program.pw


def test_in_interpreter_subprocess():
    rerun_under_interpreter(__file__, interpreter_on=INTERPRETER, timeout=300)


def _softmax_program(shape) -> Program:
    prog = Program(tuple(shape))
    x = prog.load(prog.add_input(False), "full")
    e = P("tl.exp({0} - {1})", x, prog.reduce("max", x))
    prog.output(P("({0} / {1})", e, prog.reduce("sum", e)), tuple(shape), torch.float32)
    return prog


def test_sanitize_makes_safe_identifiers():
    hostile = 'x"); import os; os.system("rm -rf /") #\n\tdef'
    ident = codegen.sanitize(hostile)
    assert ident.isidentifier() and '"' not in ident and "\n" not in ident
    assert codegen.sanitize("3abc").isidentifier()
    assert codegen.sanitize("def") != "def" and codegen.sanitize("def").isidentifier()
    assert codegen.sanitize("") == "x"
    comment = codegen.sanitize_comment("a\nb\"c")
    assert "\n" not in comment and '"' not in comment


def test_float_literals_cover_inf_and_nan():
    assert codegen.float_literal(float("-inf")) == 'float("-inf")'
    assert codegen.float_literal(float("inf")) == 'float("inf")'
    assert codegen.float_literal(float("nan")) == 'float("nan")'
    assert codegen.float_literal(0.25) == "0.25"
    assert codegen.float_literal(True) == "1"


@pytest.mark.parametrize("persistent_max,form", [(1024, "persistent"), (4, "looped")])
def test_source_is_plain_triton(persistent_max, form):
    kernel = codegen.build_kernel(_softmax_program((3, 10)), "softmax", persistent_max=persistent_max,
                                  loop_block=4, comment='evil"\nimport os')
    tree = ast.parse(kernel.source)  # valid Python
    assert kernel.form == form and f"# form: {form}" in kernel.source
    assert "libdevice" not in kernel.source
    imports = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert imports == {"triton", "triton.language"}
    # every call is triton.jit, tl.*, tl.math.*, float() or range()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            text = ast.unparse(node.func)
            assert text.startswith(("tl.", "triton.jit")) or text in ("float", "range"), text
    first, second = kernel.source.splitlines()[:2]  # the hostile comment stayed one comment line
    assert first.startswith("# evil") and '"' not in first and second.startswith("# form:")
    assert kernel.name.startswith("fxk_softmax_") and kernel.name.isidentifier()
    if form == "looped":
        assert "for start in range(0, N, BLOCK)" in kernel.source


def test_kernel_name_is_keyed_by_source_hash():
    a = codegen.build_kernel(_softmax_program((3, 10)), "softmax")
    b = codegen.build_kernel(_softmax_program((5, 10)), "softmax")
    assert a.source == b.source  # shapes are runtime arguments: one source for both
    prog = Program((3, 10))
    x = prog.load(prog.add_input(False), "full")
    prog.output(P("tl.exp({0})", x), (3, 10), torch.float32)
    c = codegen.build_kernel(prog, "softmax")
    assert c.name != a.name


def _run(prog: Program, inputs, **kw):
    kernel = codegen.build_kernel(prog, "t", **kw)
    return kernel.launch(list(inputs))


@needs_interpreter
@pytest.mark.parametrize("persistent_max,loop_block", [(1024, 1024), (4, 4)])
def test_softmax_persistent_and_looped(persistent_max, loop_block):
    x = torch.randn(2, 3, 10)
    (out,) = _run(_softmax_program(x.shape), [x], persistent_max=persistent_max, loop_block=loop_block)
    torch.testing.assert_close(out, torch.softmax(x, -1), atol=1e-6, rtol=1e-5)


@needs_interpreter
def test_pointwise_grid_and_strided_broadcast_inputs():
    full = (4, 6, 10)
    base = torch.randn(6, 4, 10)
    x = base.transpose(0, 1)  # strided view, read in place
    w = torch.randn(10)  # a row vector, broadcast over rows
    r = torch.randn(4, 6, 1)  # one value per row
    prog = Program(full)
    ex, ew, er = (prog.load(prog.add_input(False), k) for k in ("full", "full", "row"))
    prog.output(P("(tl.sigmoid({0}) * {1} + {2})", ex, ew, er), full, torch.float32)
    (out,) = _run(prog, [x, w, r], loop_block=4)  # 3 column blocks per row
    torch.testing.assert_close(out, torch.sigmoid(x) * w + r, atol=1e-6, rtol=1e-5)


@needs_interpreter
def test_bool_inputs_and_outputs():
    x = torch.randn(3, 7)
    m = torch.rand(1, 7) > 0.5
    prog = Program((3, 7))
    ex, em = prog.load(prog.add_input(False), "full"), prog.load(prog.add_input(True), "full")
    filled = P("tl.where({0}, {1}, {2})", em, prog.const(float("-inf")), ex)
    prog.output(filled, (3, 7), torch.float32)
    prog.output(P("({0} > 0.0)", ex, is_bool=True), (3, 7), torch.bool)
    out, pos = _run(prog, [x, m])
    torch.testing.assert_close(out, x.masked_fill(m, float("-inf")))
    assert torch.equal(pos, x > 0)


@needs_interpreter
@pytest.mark.parametrize("persistent_max", [1024, 4])
def test_row_outputs_and_two_stage_reduction(persistent_max):
    # layer norm statistics: mean, then variance around it (a reduction that needs a reduction)
    x = torch.randn(5, 9)
    prog = Program((5, 9))
    ex = prog.load(prog.add_input(False), "full")
    mean = P("({0} / N)", prog.reduce("sum", ex))
    xc = P("({0} - {1})", ex, mean)
    rstd = P("tl.math.rsqrt({0} / N + 1e-5)", prog.reduce("sum", P("({0} * {0})", xc)))
    prog.output(P("({0} * {1})", xc, rstd), (5, 9), torch.float32)
    prog.output(mean, (5, 1), torch.float32)
    prog.output(rstd, (5, 1), torch.float32)
    out, m, rs = _run(prog, [x], persistent_max=persistent_max, loop_block=4)
    ref, ref_m, ref_rs = torch.ops.aten.native_layer_norm(x, [9], None, None, 1e-5)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(m, ref_m, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(rs, ref_rs, atol=1e-5, rtol=1e-5)


@needs_interpreter
def test_low_precision_output_is_rounded():
    x = torch.randn(4, 8).to(torch.bfloat16)
    prog = Program((4, 8))
    ex = prog.load(prog.add_input(False), "full")
    prog.output(P("({0} * 3.0)", ex), (4, 8), torch.bfloat16)
    (out,) = _run(prog, [x])
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, x * 3)


@needs_interpreter
def test_bound_kernel_is_traceable_and_shared_while_alive():
    prog = _softmax_program((3, 10))
    kernel = codegen.build_kernel(prog, "softmax")
    op = codegen.bind_kernel(kernel)
    assert op is codegen.bind_kernel(codegen.build_kernel(_softmax_program((3, 10)), "softmax"))
    assert op.key in codegen.live_kernels()
    x = torch.randn(3, 10)
    (out,) = op([x])
    torch.testing.assert_close(out, torch.softmax(x, -1), atol=1e-6, rtol=1e-5)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        (fake_out,) = op([mode.from_tensor(x)])
    assert fake_out.shape == (3, 10) and fake_out.dtype == torch.float32
    compiled = torch.compile(lambda t: op([t])[0] * 2, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), out * 2)
