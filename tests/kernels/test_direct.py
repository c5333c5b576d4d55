"""fxmem.kernels.direct: the ops' twins that compiled graphs call, without custom_op's Python layers."""

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F

from fxmem.kernels import direct, linear_ce, logits_output  # noqa: F401  (registers the ops and twins)


def _inputs():
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(12, 8, generator=g), torch.randn(20, 8, generator=g)
    t = torch.randint(0, 20, (12,), generator=g)
    t[::4] = -100
    return h, w, t


@pytest.mark.parametrize("name", ["linear_cross_entropy", "logits_cross_entropy"])
def test_the_twin_returns_what_the_op_returns_and_has_its_fake(name):
    h, w, t = _inputs()
    op = getattr(torch.ops.fxmem, name).default
    twin = direct.twin_of(op)
    assert twin is getattr(torch.ops.fxmem, name + "_direct").default
    head = (F.linear(h, w),) if name == "logits_cross_entropy" else ()
    args = (*head, h, w, None, t, -100, "mean", 0.1, False, 4, True, True, False, 0.0)
    for a, b in zip(op(*args), twin(*args)):
        assert torch.equal(a, b)  # the same kernel: bit for bit
    # schema and fake implementation agree with the kernel (no autograd formula: compiled graphs only)
    torch.library.opcheck(twin, args, test_utils=("test_schema", "test_faketensor"))


def test_for_inductor_retargets_a_copy_and_leaves_the_graph():
    h, w, t = _inputs()
    graph = fx.Graph()
    ph = [graph.placeholder(n) for n in ("h", "w", "t")]
    call = graph.call_function(torch.ops.fxmem.linear_cross_entropy.default,
                               (ph[0], ph[1], None, ph[2], -100, "mean", 0.0, False, 4, True, True, False))
    graph.output(call)
    gm = fx.GraphModule(torch.nn.Module(), graph)
    copied = direct.for_inductor(gm)
    assert copied is not gm
    assert [n.target for n in gm.graph.nodes if n.op == "call_function"] == [torch.ops.fxmem.linear_cross_entropy.default]
    assert [n.target for n in copied.graph.nodes if n.op == "call_function"] == [
        torch.ops.fxmem.linear_cross_entropy_direct.default]
    for a, b in zip(gm(h, w, t), copied(h, w, t)):
        assert torch.equal(a, b)
    plain = fx.symbolic_trace(torch.nn.Linear(3, 3))
    assert direct.for_inductor(plain) is plain  # nothing to retarget: no copy


def test_only_fxmem_ops_get_twins():
    with pytest.raises(ValueError, match="aten::relu; accepted: an fxmem:: op"):
        direct.register(torch.ops.aten.relu.default, {None: torch.relu}, torch.relu)


def test_every_op_a_compiled_graph_calls_has_a_twin():
    # fused_kernel is left out: only the eager codegen calls it, op by op, outside Inductor
    from fxmem.kernels import chunked_mlp, int4_matmul, int8_matmul  # noqa: F401  (register theirs)

    twinned = {str(op).removeprefix("fxmem.").removesuffix(".default") for op in direct._TWINS}
    assert twinned == {"linear_cross_entropy", "logits_cross_entropy", "output_linear", "output_linear_backward",
                       "chunked_mlp", "chunked_mlp_backward", "int8_linear", "int8_embedding", "int8_grouped_mm",
                       "lowbit_linear", "lowbit_embedding"}


def test_the_int8_linear_twin_is_the_op():
    from fxmem.kernels import int8_matmul  # noqa: F401

    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 16, generator=g)
    qweight = torch.randint(-127, 128, (8, 16), generator=g, dtype=torch.int8)
    scales = torch.rand(8, generator=g) / 100
    args = (x, qweight, scales, None, "weight_only")
    assert torch.equal(torch.ops.fxmem.int8_linear(*args), torch.ops.fxmem.int8_linear_direct(*args))
    torch.library.opcheck(torch.ops.fxmem.int8_linear_direct.default, args, test_utils=("test_schema", "test_faketensor"))
