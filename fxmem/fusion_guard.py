"""Inductor fusion guard: a recomputed value is not fused sideways into a kernel that must wait.

Inductor fuses two kernels *horizontally* when they read the same buffer and neither depends on
the other. In a backward graph that recomputes a forward value, that pairs the recomputation
with the backward op that reads the same saved input — and the fused kernel can only run once
*both* kernels' inputs exist. Four GPT-2 blocks (the MLP's GELU recomputed from its saved
pre-activation ``pre``, for the down projection's weight gradient), as Inductor generated it::

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
not — the fusion would make the recomputation wait for it. Vertical fusion (producer into
consumer) is left alone: it never delays a producer. The cost is one more read of the shared
input (here ``pre``) per refused pair.

How it is installed: Inductor reads its heuristics from ``V.choices`` (an ``InductorChoices``),
a thread-local that ``V.set_choices_handler`` replaces inside a context. fxmem wraps the
``inner_compile`` it hands to ``compile_fx`` (:func:`guarded_inner_compile`), so the guard is
active exactly while Inductor compiles fxmem's forward or backward graph — also when
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


class RecomputeFusionGuard:
    """Mixin over an ``InductorChoices`` class: its ``can_fuse_horizontal`` first refuses the
    fusions :func:`delays_recomputation` names, then asks the wrapped class."""

    def can_fuse_horizontal(self, scheduler: Any, node1: Any, node2: Any, shared_data_score: int) -> bool:
        if delays_recomputation(node1, node2):
            from torch._inductor.scheduler import WhyNoFuse

            WhyNoFuse(node1, node2)("fxmem: would make a recomputed value wait (fxmem.fusion_guard)")
            return False
        return super().can_fuse_horizontal(scheduler, node1, node2, shared_data_score)  # type: ignore[misc]


@functools.cache
def _guarded_class(base: type) -> type:
    return type(f"FxmemGuarded{base.__name__}", (RecomputeFusionGuard, base), {})


@contextlib.contextmanager
def recompute_fusion_guard() -> Iterator[None]:
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
    """``compile_fx``'s ``inner_compile`` with :func:`recompute_fusion_guard` around each call."""

    @functools.wraps(inner_compile)
    def compile_with_guard(*args: Any, **kwargs: Any) -> Any:
        with recompute_fusion_guard():
            return inner_compile(*args, **kwargs)

    return compile_with_guard
