"""Whether Triton runs kernels on CPU tensors (its interpreter): the one place that reads
``TRITON_INTERPRET``.

Triton decides at two moments: when ``triton.language`` is first imported (its standard library,
``tl.sum`` and friends, is built from interpreted functions or not) and whenever ``triton.jit``
decorates a function. fxmem never sets the variable (the user or the test harness does, before
Triton is imported); it only reads it, here, parsed exactly as Triton parses it
(``triton._C.libtriton.getenv_bool``: ``1``, ``true``, ``on``, ``yes``, ``y``, any case).

* :func:`requested` — the variable is set: a kernel decorated *now* is interpreted. The
  hand-written int8 kernel is decorated on first use and calls only ``tl`` builtins, so this is
  all it needs.
* :func:`enabled` — kernels that call Triton's standard library (the generated ones) can run on
  CPU tensors: requested, and ``triton.language`` was not imported before the variable was set.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
from collections.abc import Callable
from typing import Any

VARIABLE = "TRITON_INTERPRET"
_TRUE = ("1", "true", "on", "yes", "y")  # triton._C.libtriton.getenv_bool's true values


def requested() -> bool:
    """True when ``TRITON_INTERPRET`` asks for Triton's interpreter (Triton's own parsing)."""
    return os.environ.get(VARIABLE, "").lower() in _TRUE


def enabled() -> bool:
    """True when generated kernels run on CPU tensors: :func:`requested`, and Triton's standard
    library was built interpreted (Triton not yet imported, or imported with the variable set)."""
    if not requested():
        return False
    if "triton" not in sys.modules:
        return True
    import triton.language as tl

    return type(getattr(tl, "sum", None)).__name__ == "InterpretedFunction"


def jit(kernel: Callable, what: str) -> Any:
    """``triton.jit(kernel)`` for the current ``TRITON_INTERPRET`` setting.

    Hand-written kernels are decorated on first use, not at import, because ``triton.jit`` reads
    the variable while decorating: importing fxmem never fixes the mode for the process. One
    decoration per (kernel, setting) is kept. ``what`` names the kernel in the error raised
    when Triton is not installed.
    """
    if importlib.util.find_spec("triton") is None:
        raise RuntimeError(f"fxmem {what}: triton is not installed")
    return _jit(kernel, requested())


@functools.lru_cache(maxsize=None)
def _jit(kernel: Callable, interpret: bool) -> Any:
    # ``interpret`` is part of the cache key: triton.jit reads TRITON_INTERPRET while decorating
    import triton

    return triton.jit(kernel)
