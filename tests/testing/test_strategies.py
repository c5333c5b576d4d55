import torch
import torch.fx as fx
from hypothesis import given, settings

import fxmem
from fxmem.testing import assert_equivalent
from fxmem.testing.strategies import random_graphs


@settings(max_examples=5, deadline=None)
@given(random_graphs(max_ops=8))
def test_random_graphs_are_valid_and_compile_exactly(pair):
    gm, x = pair
    assert isinstance(gm, fx.GraphModule)
    assert any(n.op == "call_module" for n in gm.graph.nodes)
    torch._dynamo.reset()
    assert_equivalent(gm, torch.compile(gm, backend=fxmem.backend(codegen="eager")), (x,))
