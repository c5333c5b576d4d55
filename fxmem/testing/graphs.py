"""Small graphs for analysis and pass tests: a function traced to fxmem's frozen inference IR."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.fx as fx

from fxmem.capture import capture_inference


def inference_graph(fn: Callable, *args: torch.Tensor, module: torch.nn.Module | None = None) -> fx.GraphModule:
    """Trace ``fn(*args)`` the way ``fxmem.explain`` traces a model; ``module`` (if given) is
    registered, so its parameters are frozen into the graph like a model's weights."""

    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.module = module

        def forward(self, *a):
            return fn(*a)

    return capture_inference(Wrap(), args, None, {}).gm
