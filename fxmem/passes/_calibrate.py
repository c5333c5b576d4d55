"""Calibration data for weight passes: the activations that reach chosen nodes on the example inputs.

Read-only: runs the graph once with a ``torch.fx.Interpreter`` on the example inputs the runner
hands the pass (``PassContext.real_example_inputs()``: the batch the module is specialized to) and keeps the values of the watched nodes, flattened to
``[rows, features]`` in fp32 and thinned to at most ``max_rows`` evenly spaced rows.
"""

from __future__ import annotations

import torch
import torch.fx as fx


class _Record(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, watch: set[fx.Node], max_rows: int):
        super().__init__(gm)
        self.watch = watch
        self.max_rows = max_rows
        self.seen: dict[fx.Node, torch.Tensor] = {}

    def run_node(self, n):
        out = super().run_node(n)
        if n in self.watch and isinstance(out, torch.Tensor):
            rows = out.detach().reshape(-1, out.shape[-1]).to(torch.float32)
            if rows.shape[0] > self.max_rows:  # evenly spaced rows: every token position and sentence is represented
                idx = torch.linspace(0, rows.shape[0] - 1, self.max_rows).round().long()
                rows = rows[idx]
            self.seen[n] = rows
        return out


def record_activations(gm: fx.GraphModule, nodes: set[fx.Node], inputs: tuple | None,
                       max_rows: int = 4096) -> dict[fx.Node, torch.Tensor] | None:
    """``{node: [rows, features] fp32}`` for each watched node on ``inputs`` (None: no inputs)."""
    if inputs is None:
        return None
    interp = _Record(gm, set(nodes), max_rows)
    with torch.no_grad():
        interp.run(*inputs)
    return interp.seen
