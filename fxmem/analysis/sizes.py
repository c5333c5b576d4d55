"""Tensor sizes and storage identity in FX graphs — read-only.

Everything here is storage-aware: a view or an alias of a tensor shares its storage, so a set of
nodes is counted once per storage (the storage's full size), never once per view. A node's
storage root is found from the op's schema (an output with alias info and no write aliases its
first tensor input), which holds for every ATen view op, so the analysis needs no list of views.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterable, Iterator

import torch
import torch.fx as fx

PARAM_META_KEY = "fxmem_param"
"""``node.meta[PARAM_META_KEY] = True`` marks a placeholder that is a parameter or buffer
(static lifetime: it lives beside the graph anyway, so it is parameter memory, not activation)."""


def _hint(x) -> int:
    """A concrete int for a possibly symbolic size (its hint under dynamic shapes)."""
    if isinstance(x, torch.SymInt):
        return x.node.hint if x.node.has_hint() else 8192
    return int(x)


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes of the elements this tensor spans (numel × element size)."""
    numel = 1
    for s in t.shape:
        numel *= _hint(s)
    return numel * t.element_size()


def node_tensors(node: fx.Node) -> list[torch.Tensor]:
    """The tensor values a node produces (``meta['val']``, flattened), empty if none."""
    val = node.meta.get("val", node.meta.get("example_value"))
    if isinstance(val, torch.Tensor):
        return [val]
    if isinstance(val, (list, tuple)):
        return [v for v in val if isinstance(v, torch.Tensor)]
    return []


_LOCAL_SIZES: contextvars.ContextVar = contextvars.ContextVar("fxmem_local_sizes", default=None)


@contextlib.contextmanager
def local_sizes(sizes) -> Iterator[None]:
    """Within the block :func:`node_bytes` is one rank's share: ``sizes.local_bytes(node, nbytes)``
    (:class:`fxmem.analysis.local_sizes.LocalSizes`, tensor parallelism). A context variable, so
    nothing outside the block — another thread, a later compile — sees it."""
    token = _LOCAL_SIZES.set(sizes)
    try:
        yield
    finally:
        _LOCAL_SIZES.reset(token)


def node_bytes(node: fx.Node) -> int:
    """Bytes of the storage a node allocates (one rank's share inside :func:`local_sizes`).

    A node with several outputs (``native_layer_norm`` → out, mean, rstd) counts 0 here: each
    output is read through its own ``getitem`` node, which counts its own bytes, so saving only
    ``mean`` and ``rstd`` for backward is not charged for ``out``.
    """
    val = node.meta.get("val", node.meta.get("example_value"))
    if not isinstance(val, torch.Tensor):
        return 0
    local = _LOCAL_SIZES.get()
    return tensor_bytes(val) if local is None else local.local_bytes(node, tensor_bytes(val))


def is_alias_op(node: fx.Node) -> bool:
    """True when the node's output aliases its first input (a view, or an in-place/out op)."""
    if node.op != "call_function":
        return False
    target = node.target
    if target is getattr:  # pragma: no cover - not produced by AOT graphs
        return False
    if target.__module__ == "_operator" and target.__name__ == "getitem":
        return False
    schema = getattr(target, "_schema", None)
    if schema is None or not schema.returns:
        return False
    alias = schema.returns[0].alias_info
    return alias is not None


def storage_root(node: fx.Node) -> fx.Node:
    """The node that owns the storage ``node``'s output lives in (itself unless it is a view)."""
    seen = 0
    while is_alias_op(node) and seen < 10_000:
        first = next((a for a in node.args if isinstance(a, fx.Node)), None)
        if first is None:
            break
        node, seen = first, seen + 1
    return node


def is_parameter_node(node: fx.Node) -> bool:
    """A frozen constant (``get_attr``) or a placeholder marked as a parameter/buffer."""
    root = storage_root(node)
    return root.op == "get_attr" or bool(root.meta.get(PARAM_META_KEY, False))


def unique_storage_bytes(nodes: Iterable[fx.Node], *, exclude_parameters: bool = True) -> int:
    """Bytes of the distinct storages behind ``nodes`` (views and aliases counted once)."""
    roots: dict[fx.Node, int] = {}
    for node in nodes:
        if exclude_parameters and is_parameter_node(node):
            continue
        root = storage_root(node)
        if root not in roots:
            roots[root] = node_bytes(root)
    return sum(roots.values())


def parameter_bytes(gm: fx.GraphModule) -> int:
    """Bytes of the distinct parameter/buffer/constant storages a graph uses.

    Counts ``get_attr`` tensors (frozen weights) by their real storage — so two attributes that
    share one storage (tied weights) count once — plus placeholders marked as parameters.
    """
    seen: dict[tuple[int, int] | fx.Node, int] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            value = _fetch_attr(gm, node.target)
            if isinstance(value, torch.Tensor):
                storage = value.untyped_storage()
                try:
                    key = (storage.data_ptr(), storage.nbytes())
                    nbytes = storage.nbytes()
                except (RuntimeError, NotImplementedError):  # fake or meta tensors have no data
                    key, nbytes = node, tensor_bytes(value)
                if key == (0, 0) or (isinstance(key, tuple) and key[0] == 0):
                    key, nbytes = node, tensor_bytes(value)
                seen[key] = nbytes
        elif node.op == "placeholder" and node.meta.get(PARAM_META_KEY, False):
            seen[node] = node_bytes(node)
    return sum(seen.values())


def module_parameter_bytes(module: torch.nn.Module) -> int:
    """Bytes of the distinct parameter and buffer storages of an eager module (per rank for
    DTensor parameters: the local shard)."""
    seen: dict[int, int] = {}
    for t in list(module.parameters()) + list(module.buffers()):
        if hasattr(t, "to_local"):  # a DTensor: this rank's shard is what it holds
            t = t.to_local()
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def _fetch_attr(gm: torch.nn.Module, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


fetch_attr = _fetch_attr
