"""Freeze parameters into an inference graph, and detect stale frozen weights.

Before (AOTAutograd inference graph, parameters are inputs)::

    def forward(self, arg0_1, arg1_1, x):          # arg0_1 = fc.weight, arg1_1 = fc.bias
        t = aten.t(arg0_1); addmm = aten.addmm(arg1_1, x, t)

After::

    def forward(self, x):
        fc_weight = self.fc.weight; fc_bias = self.fc.bias
        t = aten.t(fc_weight); addmm = aten.addmm(fc_bias, x, t)

The frozen attributes *are* the model's tensors (no copy), so an exact graph keeps computing with
the current weights. Weight passes (tie, prune, lowrank, int8/quantize, precision) replace attributes with derived
tensors; those derived tensors go stale if the source changes in place, which
:class:`WeightWatch` detects through ``tensor._version``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.fx as fx

from fxmem.analysis.sizes import fetch_attr


def set_attr(gm: fx.GraphModule, target: str, value: torch.Tensor) -> None:
    """Set the tensor attribute at a dotted ``target`` (creating submodules on the way): an
    ``nn.Parameter`` is registered as a parameter (it trains), anything else as a buffer."""
    *path, leaf = target.split(".")
    module = gm
    for part in path:
        if not hasattr(module, part):
            module.add_module(part, torch.nn.Module())
        module = getattr(module, part)
    if isinstance(value, torch.nn.Parameter):
        module.register_parameter(leaf, value)
    else:
        module.register_buffer(leaf, value)


def _safe_target(fqn: str, taken: set[str]) -> str:
    parts = [re.sub(r"\W", "_", p) or "_" for p in fqn.split(".")]
    parts = [("_" + p if p[0].isdigit() else p) for p in parts]
    target = ".".join(parts)
    base, i = target, 1
    while target in taken:
        target, i = f"{base}_{i}", i + 1
    taken.add(target)
    return target


def freeze_parameters(gm: fx.GraphModule, frozen: dict[str, tuple[str, torch.Tensor]]) -> fx.GraphModule:
    """Turn placeholders into ``get_attr`` of the given tensors, in place.

    ``frozen`` maps a placeholder name to ``(fully qualified name, tensor)``. The placeholder is
    removed from the signature; its ``get_attr`` keeps its ``meta`` (``val``) and records
    ``meta["fxmem_fqn"]``, the parameter's name in the user's model.
    """
    placeholders = {n.name: n for n in gm.graph.nodes if n.op == "placeholder"}
    taken: set[str] = set()
    first = next(n for n in gm.graph.nodes if n.op != "placeholder")  # never erased below
    for name, (fqn, tensor) in frozen.items():
        ph = placeholders[name]
        target = _safe_target(fqn, taken)
        set_attr(gm, target, tensor)
        with gm.graph.inserting_before(first):
            attr = gm.graph.get_attr(target)
        attr.meta.update(ph.meta)
        attr.meta["fxmem_fqn"] = fqn
        ph.replace_all_uses_with(attr)
        gm.graph.erase_node(ph)
    gm.graph.lint()
    gm.recompile()
    return gm


def drop_unused_attrs(gm: fx.GraphModule, before: set[str]) -> None:
    """Delete the attributes among ``before`` that no ``get_attr`` reads any more, so the module
    no longer holds the tensors a pass replaced."""
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for target in sorted(before - used):
        *path, leaf = target.split(".")
        module = gm
        for part in path:
            module = getattr(module, part)
        delattr(module, leaf)


def frozen_tensors(gm: fx.GraphModule) -> dict[str, torch.Tensor]:
    """Attribute name → tensor, for every ``get_attr`` tensor the graph reads."""
    out = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            value = fetch_attr(gm, node.target)
            if isinstance(value, torch.Tensor):
                out[node.target] = value
    return out


class StaleWeightsError(RuntimeError):
    """A frozen weight changed in place after fxmem derived tensors from it."""


@dataclass
class WeightWatch:
    """The ``_version`` of each source tensor that a transformed graph no longer reads directly.

    A graph that reads a model tensor by identity sees in-place updates; a graph that reads a
    tensor derived from it (int8, a pruned slice, a tied twin, a cast) does not. This records the
    sources of the second kind and tells when one of them changed.
    """

    sources: list[tuple[str, torch.Tensor, int]]

    @classmethod
    def after(cls, originals: dict[str, torch.Tensor], gm: fx.GraphModule) -> WeightWatch:
        still_read = {id(t) for t in frozen_tensors(gm).values()}
        sources = [(name, t, t._version) for name, t in originals.items() if id(t) not in still_read]
        return cls(sources)

    @classmethod
    def every(cls, originals: dict[str, torch.Tensor]) -> WeightWatch:
        """Watch every source: code generated from the graph (Inductor's) holds its constants
        apart from the model's tensors, so even a weight the graph read directly goes stale."""
        return cls([(name, t, t._version) for name, t in originals.items()])

    def changed(self) -> list[str]:
        return [name for name, t, version in self.sources if t._version != version]

    def check(self) -> None:
        names = self.changed()
        if names:
            raise StaleWeightsError(
                f"fxmem: weights {names[:5]}{'...' if len(names) > 5 else ''} changed in place after "
                "fxmem derived int8/pruned/tied/low-precision copies of them; the transformed module "
                "would compute with the old values. Re-run fxmem.optimize/explain on the updated model "
                "(torch.compile(backend='fxmem') re-derives them automatically)."
            )
