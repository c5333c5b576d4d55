"""Bytes saved for backward — from a partition (inside) and from saved-tensor hooks (outside).

Inside: an AOTAutograd forward graph returns the user outputs first and then the tensors it saves
for backward. Saved-activation bytes are the distinct storages among those saved tensors,
parameters excluded (a saved parameter is the parameter itself, alive anyway). Symbolic-size
ints saved beside them cost nothing and are not counted.

Outside: :func:`measure_saved_bytes` runs any callable (eager, any ``torch.compile`` backend)
under ``torch.autograd.graph.saved_tensors_hooks`` and counts the distinct storages packed,
excluding the storages of the parameters given. The two agree on fxmem's graphs; the tests
check that.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from fxmem.analysis.sizes import is_parameter_node, node_bytes, storage_root, unique_storage_bytes


def forward_outputs(fw_gm: fx.GraphModule) -> list:
    """The arguments of a graph's output node, flattened (forward: user outputs, then saved)."""
    out = next(n for n in reversed(fw_gm.graph.nodes) if n.op == "output")
    args = out.args[0]
    return list(args) if isinstance(args, (list, tuple)) else [args]


def saved_nodes(fw_gm: fx.GraphModule, num_fwd_outputs: int) -> list[fx.Node]:
    """The tensor nodes a forward graph saves for backward (outputs after the user outputs)."""
    saved = forward_outputs(fw_gm)[num_fwd_outputs:]
    return [n for n in saved if isinstance(n, fx.Node) and isinstance(n.meta.get("val"), torch.Tensor)]


def saved_activation_bytes(fw_gm: fx.GraphModule, num_fwd_outputs: int) -> int:
    """Distinct-storage bytes saved for backward, parameters excluded."""
    return unique_storage_bytes(saved_nodes(fw_gm, num_fwd_outputs), exclude_parameters=True)


@dataclass(frozen=True)
class SavedTensor:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    bytes: int
    is_parameter: bool


def describe_saved(fw_gm: fx.GraphModule, num_fwd_outputs: int) -> list[SavedTensor]:
    """One row per saved tensor: name, shape, bytes of its storage (0 for a second view)."""
    rows, seen = [], set()
    for node in saved_nodes(fw_gm, num_fwd_outputs):
        root = storage_root(node)
        param = is_parameter_node(node)
        nbytes = 0 if (param or root in seen) else node_bytes(root)
        seen.add(root)
        val = node.meta["val"]
        rows.append(SavedTensor(node.name, tuple(int(s) if not isinstance(s, torch.SymInt) else -1 for s in val.shape), val.dtype, nbytes, param))
    return rows


@dataclass
class SavedMeasurement:
    """What ``saved_tensors_hooks`` saw: distinct storages packed, parameters excluded."""

    bytes: int = 0
    count: int = 0
    storages: dict[int, int] = field(default_factory=dict)


def measure_saved_bytes(
    fn: Callable[[], object], parameters: Iterable[torch.Tensor] | torch.nn.Module = ()
) -> SavedMeasurement:
    """Run ``fn()`` (a forward) under saved-tensor hooks and count the distinct storages saved.

    ``parameters``: tensors whose storages are not activations — give the model itself to
    exclude all its parameters and buffers (a causal-mask buffer is model state, like a weight).

    Keep the forward's result alive until after this returns if you want to run backward; the
    storages are identified by data pointer while the tensors are alive.
    """
    if isinstance(parameters, torch.nn.Module):
        parameters = list(parameters.parameters()) + list(parameters.buffers())
    param_ptrs = {p.untyped_storage().data_ptr() for p in parameters}
    result = SavedMeasurement()
    keep: list[torch.Tensor] = []

    def pack(t: torch.Tensor):
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr not in param_ptrs and ptr not in result.storages:
                result.storages[ptr] = storage.nbytes()
            keep.append(t)  # keep it alive so pointers are not reused during the forward
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    result.bytes = sum(result.storages.values())
    result.count = len(result.storages)
    result.output = out  # type: ignore[attr-defined]
    return result
