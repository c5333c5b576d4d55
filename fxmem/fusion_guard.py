"""Inductor fusion guard: fusing two kernels side by side must not keep a large buffer alive longer.

Inductor fuses two kernels *horizontally* when they read the same buffer and neither depends on
the other. The fused kernel runs where the earlier of the two ran, once both kernels' inputs
exist; what it saves is one read of the shared input. fxmem refuses two kinds of such fusion,
because each moves memory onto the peak for that saving.

**1. A recomputation made to wait.** In a backward graph that recomputes a forward value,
horizontal fusion pairs the recomputation with the backward op that reads the same saved input.
Four GPT-2 blocks (the MLP's GELU recomputed from its saved pre-activation ``pre``, for the down
projection's weight gradient), as Inductor generated it::

    before (fused):                                   after (guarded):
    buf0 = mm(grad_out, w_down)       # 24 MiB        buf1 = gelu(pre)                 # 24 MiB, recomputed
    fused_gelu_gelu_backward(buf0, pre, buf1)         mm(grad_out.T, buf1, out=dw_down); del buf1
    mm(grad_out.T, buf1, out=dw_down); del buf1       buf0 = mm(grad_out, w_down)      # 24 MiB
                                                      gelu_backward(buf0, pre)         # in place
    alive together: pre, buf0, buf1 (3 x 24 MiB)      alive together: pre + one of buf0 / buf1

Fused, the recomputed ``gelu(pre)`` waits for ``buf0``'s matmul, so the weight gradient that
consumes it cannot run before ``buf0`` is allocated: three 24 MiB buffers meet on the step's
peak. Unfused, Inductor's scheduler runs the recomputation and its consumer first and frees the
recomputed output before ``buf0`` exists (measured: docs/benchmarks.md, "The recomputed GELU
unfused").

Rule (:func:`delays_recomputation`): refuse a horizontal fusion of a *recomputed* kernel (every
FX node it came from is tagged ``meta[RECOMPUTED_KEY]`` by :mod:`fxmem.passes.remat`) with a
kernel that is not, when the other kernel depends on an operation that the recomputed one does
not — the fusion would make the recomputation wait for it.

**2. A later kernel's output made early.** Several kernels that expand one small input into a
large buffer — an attention mask ``[B, T]`` made ``[B, 1, T, T]`` again for every layer's
attention, which needs it dense — read the same input and nothing else, so Inductor fuses them
into one kernel at the first layer, and every layer's mask is alive from there. all-MiniLM-L6-v2
on torch 2.11 (32 × 128 tokens; torch 2.13 happened not to fuse these, but fuses the same pattern
elsewhere: ``tests/test_fusion_guard.py``)::

    before (fused):                                   after (guarded):
    buf8 = empty((32, 1, 128, 128))   # 2 MiB each    buf8 = empty((32, 1, 128, 128))
    buf27 = empty(...); ... buf84 = empty(...)        cpp_fused_1(mask, buf8)
    cpp_fused_1(mask, buf8, buf27, buf46, buf65, buf84)  sdpa(q, k, v, attn_mask=buf8); del buf8
    sdpa(q, k, v, attn_mask=buf8); del buf8           ... layer 2 ...
    ... layer 2 ... (buf27..buf84 alive throughout)   buf27 = empty(...); cpp_fused_1(mask, buf27)

    forward peak 44 MiB                               36 MiB

Rule (:func:`hoists_outputs`): refuse a horizontal fusion when other operations run between the
two kernels and the later kernel's outputs (those read outside it) are larger than the bytes the
fusion saves (Inductor's ``shared_data_score``). The cost is one more read of the shared input
(here a ``[B, T]`` mask) per refused pair, and one more kernel launch.

Vertical fusion (producer into consumer) is left alone by both rules: it never delays a producer
nor allocates an output earlier.

How it is installed: Inductor reads its heuristics from ``V.choices`` (an ``InductorChoices``),
a thread-local that ``V.set_choices_handler`` replaces inside a context. fxmem wraps the
``inner_compile`` it hands to ``compile_fx`` (:func:`guarded_inner_compile`), and its inference
graphs' ``compile_fx_inner`` the same way, so the guard is active exactly while Inductor
compiles fxmem's forward, backward or inference graph — also when
AOTAutograd compiles the backward lazily, at the first backward call, since ``compile_fx``
calls the same ``inner_compile`` then — and the previous handler (Inductor's default, or the
class a user set in ``torch._inductor.config.inductor_choices_class``) is back afterwards, and
serves every other decision. Both exist in torch 2.11 and 2.13.
"""

from __future__ import annotations

import contextlib
import copy
import functools
from collections.abc import Callable, Iterator
from typing import Any

from fxmem.passes.base import RECOMPUTED_KEY


def _origins(snode: Any) -> list:
    nodes = []
    for part in snode.get_nodes():
        ir_node = getattr(part, "node", None)
        if ir_node is not None:
            nodes.extend(ir_node.get_origins())
    return nodes


def is_recomputed(snode: Any) -> bool:
    """Every FX node the scheduler node ``snode`` (fused or not) was lowered from recomputes a
    forward value."""
    origins = _origins(snode)
    return bool(origins) and all(o.meta.get(RECOMPUTED_KEY, False) for o in origins)


def delays_recomputation(node1: Any, node2: Any) -> bool:
    """Fusing ``node1`` and ``node2`` side by side would make a recomputed kernel wait for an
    operation it does not depend on (see the module docstring)."""
    for recomputed, other in ((node1, node2), (node2, node1)):
        if is_recomputed(recomputed) and not is_recomputed(other):
            if other.ancestors - recomputed.ancestors - recomputed.get_operation_names():
                return True
    return False


def _output_bytes(snode: Any) -> int:
    """Bytes of the buffers ``snode`` writes that something outside it reads (a fused kernel's
    internal buffers are never allocated); a size without a hint (an unbacked symbol) counts 0."""
    from torch._inductor.virtualized import V

    inside = snode.get_operation_names()
    total = 0
    for buf in snode.get_outputs():
        if not buf.node.has_tensor_output():
            continue
        if all(getattr(use.node, "get_name", lambda: None)() in inside for use in buf.users):
            continue
        try:
            numel = buf.node.get_numel()
        except NotImplementedError:  # a layout without a numel (a list's): nothing allocated here
            continue
        # optimization_hint: the name both 2.11 and 2.13 have (2.13 dropped size_hint)
        numel = V.graph.sizevars.optimization_hint(numel, fallback=0)
        total += int(numel) * buf.node.get_dtype().itemsize
    return total


def hoists_outputs(node1: Any, node2: Any, shared_data_score: int) -> bool:
    """Fusing ``node1`` and ``node2`` side by side would allocate the later kernel's outputs
    before operations that run between the two, for a saving of ``shared_data_score`` bytes
    read (see the module docstring)."""
    early, late = sorted((node1, node2), key=lambda n: n.min_order)
    if late.min_order <= early.max_order + 1:  # adjacent: nothing runs between them
        return False
    return _output_bytes(late) > shared_data_score


class MemoryFusionGuard:
    """Mixin over an ``InductorChoices`` class: its ``can_fuse_horizontal`` first refuses the
    fusions :func:`delays_recomputation` and :func:`hoists_outputs` name, then asks the wrapped
    class."""

    def can_fuse_horizontal(self, scheduler: Any, node1: Any, node2: Any, shared_data_score: int) -> bool:
        reason = None
        if delays_recomputation(node1, node2):
            reason = "fxmem: would make a recomputed value wait (fxmem.fusion_guard)"
        elif hoists_outputs(node1, node2, shared_data_score):
            reason = "fxmem: would allocate the later kernel's output early (fxmem.fusion_guard)"
        if reason is not None:
            from torch._inductor.scheduler import WhyNoFuse

            WhyNoFuse(node1, node2)(reason)
            return False
        return super().can_fuse_horizontal(scheduler, node1, node2, shared_data_score)  # type: ignore[misc]


@functools.cache
def _guarded_class(base: type) -> type:
    return type(f"FxmemGuarded{base.__name__}", (MemoryFusionGuard, base), {})


@contextlib.contextmanager
def memory_fusion_guard() -> Iterator[None]:
    """Inside: Inductor's heuristics are the current ones plus the guard (this thread only)."""
    from torch._inductor.virtualized import V

    current = V.choices
    # a shallow copy of the current handler with the guard as its class's first base: the user's
    # own InductorChoices subclass (and any state it holds) keeps deciding everything else
    guarded = copy.copy(current)
    guarded.__class__ = _guarded_class(type(current))
    with V.set_choices_handler(guarded):
        yield


def guarded_inner_compile(inner_compile: Callable[..., Any]) -> Callable[..., Any]:
    """``compile_fx``'s ``inner_compile`` with :func:`memory_fusion_guard` around each call."""

    @functools.wraps(inner_compile)
    def compile_with_guard(*args: Any, **kwargs: Any) -> Any:
        with memory_fusion_guard():
            return inner_compile(*args, **kwargs)

    return compile_with_guard
