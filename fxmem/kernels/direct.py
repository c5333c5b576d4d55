"""fxmem's custom ops as a compiled graph calls them: without ``torch.library.custom_op``'s Python layers.

An op made with ``torch.library.custom_op`` runs, at every call, three Python layers around its
kernel: the autograd kernel (``autograd_impl`` → ``forward_no_grad`` → ``redispatch``), the backend
wrapper that checks its outputs alias no input, and a ``torch._disable_dynamo`` wrapper. Measured
on the chunked loss at the tiny shapes of ``benchmarks/host_overhead.py``: ~40 µs per call on the
host, beside ~90 µs of kernel — host time that a small model's GPU step waits on, once per call.

A compiled graph needs none of them: AOTAutograd traced the ops' autograd formulas into the
backward graph already (the compiled forward and backward run without grad), and the kernels'
outputs are fresh tensors (checked by ``torch.library.opcheck`` in the kernels' tests). So the
graphs fxmem hands Inductor call each op's *direct twin*: the same schema, kernels and fake
implementation, registered on a plain ``torch.library.Library`` — the dispatcher's C++ autograd
fallthrough, then one Python call into the kernel. Users and passes only ever see the original
ops: the twin replaces them in a copy of the graph made for Inductor (:func:`for_inductor`).

Before (a compiled forward, as the partition returns it)::

    lce = torch.ops.fxmem.logits_cross_entropy.default(logits, hidden, weight, ...)

After (what Inductor compiles)::

    lce = torch.ops.fxmem.logits_cross_entropy_direct.default(logits, hidden, weight, ...)

The twin has no autograd formula: called with grad on inputs that require it, the dispatcher's
fallback marks its outputs as not differentiable (an error at ``backward()``), which is why only
compiled graphs call it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.fx as fx

_LIB = torch.library.Library("fxmem", "FRAGMENT")
_TWINS: dict[torch._ops.OpOverload, torch._ops.OpOverload] = {}
SUFFIX = "_direct"


def register(op: torch._ops.OpOverload, kernels: Mapping[str | None, Callable], fake: Callable) -> torch._ops.OpOverload:
    """Register ``op``'s direct twin ``fxmem::<name>_direct``: ``kernels`` by device type (``None``:
    every device; ``"cuda"``: CUDA tensors) and ``fake``, as they were given to ``custom_op``,
    ``register_kernel`` and ``register_fake``. Returns the twin."""
    schema = str(op._schema)
    qualified = op._schema.name  # "fxmem::logits_cross_entropy"
    namespace, name = qualified.split("::")
    if namespace != "fxmem":
        raise ValueError(f"fxmem.kernels.direct.register: {qualified}; accepted: an fxmem:: op")
    twin_name = name + SUFFIX
    _LIB.define(schema.replace(qualified, twin_name, 1))
    for device, kernel in kernels.items():
        key = "CompositeExplicitAutograd" if device is None else device.upper()  # "cuda" -> "CUDA"
        _LIB.impl(twin_name, kernel, key)
    torch.library.register_fake(f"fxmem::{twin_name}", fake, lib=_LIB)
    twin = getattr(torch.ops.fxmem, twin_name).default
    _TWINS[op] = twin
    return twin


def twin_of(target: object) -> torch._ops.OpOverload | None:
    """The direct twin of ``target``, or None when it has none."""
    return _TWINS.get(target)  # type: ignore[arg-type]


def for_inductor(gm: fx.GraphModule) -> fx.GraphModule:
    """``gm`` itself when it calls no op with a twin; else a copy (nodes and ``meta`` shallow-copied,
    attribute tensors shared) whose calls go to the twins. ``gm`` is left as it is: the recorded
    graphs that ``explain`` and the analyses read keep the ops users know."""
    if not any(n.op == "call_function" and n.target in _TWINS for n in gm.graph.nodes):
        return gm
    from fxmem.passes.base import shallow_copy

    new = shallow_copy(gm)
    new.meta = dict(gm.meta)
    for node in new.graph.nodes:
        if node.op == "call_function" and node.target in _TWINS:
            node.target = _TWINS[node.target]
    new.recompile()
    return new
