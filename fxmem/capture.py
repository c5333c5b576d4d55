"""Model → frozen ATen inference graph, and back to a module with the model's call signature.

``fxmem.explain`` / ``fxmem.optimize`` need a standalone result, so they do not go through
Dynamo: the model is traced by AOTAutograd's ``aot_export_module`` (the same ATen IR, the same
decompositions as the backend's graphs), its parameters are frozen in (:mod:`fxmem.freeze`), and
:class:`OptimizedModule` gives the transformed graph back the model's call signature (positional
and keyword arguments, nested outputs) through ``torch.utils._pytree``.

The graph is specialized to the example inputs' shapes and to their non-tensor values; a call
with other shapes or values raises :class:`SignatureError` instead of computing on a graph traced
for something else. (``torch.compile(backend="fxmem")`` handles dynamic shapes.)

An HF KV cache in the outputs is dropped (:func:`drop_caches`; docs/architecture.md says why),
and a cache among the inputs is a :class:`CaptureError`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch._functorch.aot_autograd import aot_export_module

from fxmem.freeze import WeightWatch, freeze_parameters
from fxmem.passes.base import normalize_void_ops


class CaptureError(RuntimeError):
    """The model cannot be traced to a standalone graph (it mutates its buffers or inputs)."""


class SignatureError(TypeError):
    """An optimized module was called with inputs unlike the ones it was traced for."""


def is_hf_cache(x: Any) -> bool:
    """True for a Hugging Face KV cache (``DynamicCache``, ``EncoderDecoderCache``, ...).

    Recognized by class, without importing transformers: a class (or base) defined in
    ``transformers.*`` whose name ends in ``Cache``."""
    return any(c.__module__.startswith("transformers.") and c.__name__.endswith("Cache") for c in type(x).__mro__)


def _path(key_path) -> str:
    return "output" + pytree.keystr(key_path)


def drop_caches(out: Any) -> tuple[Any, list[str]]:
    """``out`` with every HF KV cache in it replaced by ``None``, and the paths of those caches.

    Why drop rather than return the cache: the module fxmem builds is specialized to the example
    inputs' shapes and takes no cache input, so it cannot continue generation from one; keeping
    every layer's keys and values as graph outputs would only hold memory. The cache is found
    with ``is_leaf`` rather than through a pytree registration, so the outcome is the same
    whether or not someone registered ``DynamicCache`` with pytree (transformers'
    ``register_dynamic_cache_export_support`` does, process-wide)."""
    try:
        with_paths, _ = pytree.tree_flatten_with_path(out, is_leaf=is_hf_cache)
        paths = [_path(kp) for kp, leaf in with_paths if is_hf_cache(leaf)]
    except (ValueError, NotImplementedError):  # a container registered without key paths
        paths = [f"output leaf {i}" for i, leaf in enumerate(pytree.tree_leaves(out, is_leaf=is_hf_cache)) if is_hf_cache(leaf)]
    if not paths:
        return out, []
    return pytree.tree_map(lambda x: None if is_hf_cache(x) else x, out, is_leaf=is_hf_cache), paths


class _FlatCall(torch.nn.Module):
    """Calls ``model`` from a flat list of tensor leaves and returns a flat tuple of outputs."""

    def __init__(self, model: torch.nn.Module, leaves: list, tensor_positions: list[int], in_spec):
        super().__init__()
        self.model = model
        self._leaves = leaves
        self._positions = tensor_positions
        self._in_spec = in_spec
        self.out_spec = None

    def forward(self, *tensors):
        leaves = list(self._leaves)
        for pos, t in zip(self._positions, tensors):
            leaves[pos] = t
        args, kwargs = pytree.tree_unflatten(leaves, self._in_spec)
        out, self.dropped_caches = drop_caches(self.model(*args, **kwargs))
        flat, self.out_spec = pytree.tree_flatten(out)
        self.out_constants = {}
        for i, leaf in enumerate(flat):
            if isinstance(leaf, torch.Tensor):
                continue
            if leaf is not None and not isinstance(leaf, (bool, int, float, str)):
                raise CaptureError(
                    f"fxmem.explain/optimize: output leaf {i} is a {type(leaf).__name__}, which torch.utils._pytree "
                    "cannot look into; return tensors, tuples, lists, dicts or registered pytree containers"
                )
            self.out_constants[i] = leaf
        return tuple(t for t in flat if isinstance(t, torch.Tensor))


@dataclass
class Captured:
    gm: fx.GraphModule                   # ATen graph, parameters frozen as get_attr
    originals: dict[str, torch.Tensor]   # qualified name → the model's tensor that was frozen
    in_spec: Any
    out_spec: Any
    out_constants: dict[int, Any]        # output leaf index → a non-tensor output (None, numbers)
    leaves: list                         # the flattened (args, kwargs); tensors replaced at call
    tensor_positions: list[int]
    example_tensors: tuple
    dropped_caches: list[str]            # where the model returned an HF KV cache, now None (see drop_caches)


def _owned(model: torch.nn.Module, prefix: str = "model.") -> dict[str, torch.Tensor]:
    tensors = {}
    for name, t in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False)):
        tensors[prefix + name] = t
    return tensors


@contextlib.contextmanager
def _tracing_flag():
    """``torch.compiler.is_compiling()`` is True while fxmem traces, as under ``torch.export``:
    model code (HF transformers' mask helpers, say) then skips eager-only data-dependent checks
    that a tracer cannot evaluate."""
    previous = torch.compiler._is_compiling_flag
    torch.compiler._is_compiling_flag = True
    try:
        yield
    finally:
        torch.compiler._is_compiling_flag = previous


def capture_inference(model: torch.nn.Module, args: Sequence[Any], kwargs: dict | None, decompositions: dict) -> Captured:
    """Trace ``model(*args, **kwargs)`` to a frozen ATen inference graph."""
    leaves, in_spec = pytree.tree_flatten((tuple(args), dict(kwargs or {})))
    caches = [type(leaf).__name__ for leaf in leaves if is_hf_cache(leaf)]
    if caches:
        raise CaptureError(
            f"fxmem.explain/optimize: a KV cache ({', '.join(caches)}) was passed as an input; the optimized module is "
            "specialized to the example inputs' shapes and cannot take one. Call it without past_key_values (a prefill), "
            "or use torch.compile(backend='fxmem') for decoding steps"
        )
    positions = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]
    tensors = tuple(leaves[i] for i in positions)
    flat = _FlatCall(model, leaves, positions, in_spec)
    with torch.no_grad(), _tracing_flag():
        gm, sig = aot_export_module(flat, tensors, trace_joint=False, decompositions=decompositions)
    if getattr(sig, "buffers_to_mutate", None) or getattr(sig, "user_inputs_to_mutate", None):
        raise CaptureError(
            "fxmem.explain/optimize: the model mutates buffers or inputs in its forward "
            f"({dict(sig.buffers_to_mutate) or dict(sig.user_inputs_to_mutate)}); use torch.compile(backend='fxmem') for it"
        )
    owned = _owned(model)
    frozen = {}
    for ph_name, fqn in {**sig.inputs_to_parameters, **sig.inputs_to_buffers}.items():
        frozen[ph_name] = (fqn.removeprefix("model."), owned[fqn])
    freeze_parameters(gm, frozen)
    normalize_void_ops(gm)  # graph quirks normalized once, here: ops that return nothing get val None
    originals = {fqn: t for fqn, t in frozen.values()}
    return Captured(gm, originals, in_spec, flat.out_spec, flat.out_constants, leaves, positions, tensors,
                    flat.dropped_caches)


def _describe(x: Any) -> Any:
    return (tuple(x.shape), x.dtype) if isinstance(x, torch.Tensor) else x


class OptimizedModule(torch.nn.Module):
    """A transformed graph with the original model's call signature.

    ``self.graph_module`` holds the ATen graph and its (possibly transformed) weights, so
    ``state_dict()`` / ``load_state_dict()`` save and load them; the module can be called,
    exported and compiled like any module. ``dropped_caches`` lists the outputs where the model
    returned an HF KV cache, which this module returns as ``None`` (:func:`drop_caches`).
    """

    def __init__(self, gm: fx.GraphModule, captured: Captured, watch: WeightWatch):
        super().__init__()
        self.graph_module = gm
        self._in_spec = captured.in_spec
        self._out_spec = captured.out_spec
        self._out_constants = captured.out_constants
        self._leaves = [None if isinstance(x, torch.Tensor) else x for x in captured.leaves]
        self._expected = [_describe(x) for x in captured.leaves]
        self._positions = captured.tensor_positions
        self._watch = watch
        self.dropped_caches = list(captured.dropped_caches)

    @property
    def code(self) -> str:
        return self.graph_module.code

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        leaves, spec = pytree.tree_flatten((tuple(args), dict(kwargs)))
        if spec != self._in_spec:
            raise SignatureError(f"fxmem: this module was traced for inputs structured as {self._in_spec}; got {spec}")
        got = [_describe(x) for x in leaves]
        if got != self._expected:
            bad = next(i for i, (g, e) in enumerate(zip(got, self._expected)) if g != e)
            raise SignatureError(
                f"fxmem: input leaf {bad} is {got[bad]}, but this module was traced for {self._expected[bad]} "
                "(optimized modules are specialized to the example inputs' shapes and values; run "
                "fxmem.optimize with the new inputs, or use torch.compile(backend='fxmem'))"
            )
        if not torch.compiler.is_compiling():
            self._watch.check()
        tensors = iter(self.graph_module(*[leaves[i] for i in self._positions]))
        n = self._out_spec.num_leaves
        flat = [self._out_constants[i] if i in self._out_constants else next(tensors) for i in range(n)]
        return pytree.tree_unflatten(flat, self._out_spec)
