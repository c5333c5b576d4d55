"""``tie_weights``: one storage for parameters that are the same tensor, or hold the same values.

Before (an inference graph; ``lm_head.weight`` is an untied copy of ``wte.weight``)::

    wte_weight = self.wte.weight                # 50257 x 768 fp32
    lm_head_weight = self.lm_head.weight        # another 50257 x 768 fp32, bitwise equal
    emb = aten.embedding(wte_weight, idx) ... mm(h, aten.t(lm_head_weight))

After::

    wte_weight = self.wte.weight
    lm_head_weight = self.wte.weight            # the same attribute: one storage, ~154 MB less
    emb = aten.embedding(wte_weight, idx) ... mm(h, aten.t(lm_head_weight))

Exact mode (default) ties

* ``get_attr`` nodes whose tensors are already one (the same tensor, or the same storage, offset,
  shape and strides) — they read one attribute afterwards, so later passes see one weight (int8
  quantizes it once, precision casts it once);
* tensors of two or more dimensions (matrices, embeddings) with equal dtype, shape and device and
  bitwise-equal values: a content hash first
  (BLAKE2b of the bytes on CPU, ``torch.hash_tensor`` elsewhere), then a bitwise comparison of the
  integer views (so ``-0.0`` and ``0.0``, or two NaN payloads, are never merged). The tensor read
  first in the graph is kept; the others' ``get_attr`` nodes are repointed at its attribute.

Similar mode (``{"mode": "similar", "rtol": r}``, lossy, opt-in) adds ALBERT-style cross-layer
sharing: modules (the owner of a weight: a Linear, a LayerNorm, ...) with the same parameter
names, shapes and dtypes whose every weight satisfies ``||a - b|| <= rtol * ||a||`` (Frobenius
norm) read the first such module's weights. With example inputs, the output error against the
untied graph is measured and reported.

Preconditions: an inference graph with frozen ``get_attr`` weights (the pass runs on the
inference stage only: tying two parameters that the user's model keeps separate in a training
graph would merge their gradients and updates; ties the model already has are one tensor there
anyway). Numerical promise: exact mode leaves every output bitwise identical (the tensors read are
bitwise identical); similar mode changes weights by at most ``rtol`` in relative norm and reports
the output error.
"""

from __future__ import annotations

import hashlib

import torch
import torch.fx as fx

from fxmem.analysis.sizes import fetch_attr, parameter_bytes, tensor_bytes
from fxmem.config import TieConfig
from fxmem.freeze import drop_unused_attrs
from fxmem.passes.base import PassContext, PassResult, copy_graph

_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes as integers of its element size (bitwise comparison, NaN-safe)."""
    flat = t.detach().contiguous().reshape(-1)
    if t.dtype == torch.bool:
        return flat.to(torch.uint8)
    return flat.view(_INT_VIEW[t.element_size()]) if t.element_size() in _INT_VIEW else flat.view(torch.uint8)


def content_hash(t: torch.Tensor) -> str:
    """A hash of the tensor's values (dtype and shape included)."""
    bits = _bits(t)
    head = f"{t.dtype}|{tuple(t.shape)}|{t.device}|"
    if t.device.type == "cpu":
        return head + hashlib.blake2b(bits.view(torch.uint8).numpy().tobytes(), digest_size=16).hexdigest()
    return head + str(int(torch.hash_tensor(bits.view(torch.int64) if bits.numel() * bits.element_size() % 8 == 0 else bits.to(torch.int64))))


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.device == b.device and torch.equal(_bits(a), _bits(b))


def _identity(t: torch.Tensor) -> tuple:
    """Two tensors with this key are one tensor: same storage, offset, shape, strides and dtype."""
    storage = t.untyped_storage()
    return (storage.data_ptr(), storage.nbytes(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype, t.device)


def _weights(gm: fx.GraphModule) -> list[tuple[fx.Node, torch.Tensor]]:
    out = []
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            value = fetch_attr(gm, node.target)
            if isinstance(value, torch.Tensor) and not value.is_meta:
                out.append((node, value))
    return out


def _fqn(node: fx.Node) -> str:
    return node.meta.get("fxmem_fqn", node.target)


def _repoint(node: fx.Node, keep: fx.Node) -> None:
    node.target = keep.target
    node.meta["fxmem_tied_to"] = _fqn(keep)


def _exact(gm: fx.GraphModule, ties: list[dict]) -> None:
    first_by_identity: dict[tuple, tuple[fx.Node, torch.Tensor]] = {}
    candidates: dict[str, list[tuple[fx.Node, torch.Tensor]]] = {}
    for node, value in _weights(gm):
        ident = _identity(value)
        if ident in first_by_identity:
            keep, _ = first_by_identity[ident]
            if node.target != keep.target:
                ties.append({"kept": _fqn(keep), "tied": _fqn(node), "how": "same storage", "param_bytes_saved": 0})
                _repoint(node, keep)
            continue
        first_by_identity[ident] = (node, value)
        if value.dim() < 2:
            # 1-D tensors (biases, norm scales) are not tied by value: a freshly initialized model
            # has many bitwise-equal ones (zeros, ones), the bytes are negligible, and a tie would
            # couple unrelated layers for the passes after this one (pruning groups, training)
            continue
        bucket = candidates.setdefault(content_hash(value), [])
        match = next(((k, v) for k, v in bucket if bitwise_equal(v, value)), None)
        if match is None:
            bucket.append((node, value))
            continue
        keep, kept_value = match
        ties.append({"kept": _fqn(keep), "tied": _fqn(node), "how": "bitwise-equal values", "param_bytes_saved": tensor_bytes(value)})
        _repoint(node, keep)
        first_by_identity[ident] = (keep, kept_value)


def _modules(gm: fx.GraphModule) -> dict[str, dict[str, tuple[fx.Node, torch.Tensor]]]:
    """Owner module name → {parameter leaf name → (first get_attr node, tensor)}."""
    out: dict[str, dict[str, tuple[fx.Node, torch.Tensor]]] = {}
    for node, value in _weights(gm):
        if not value.is_floating_point():
            continue
        owner, _, leaf = _fqn(node).rpartition(".")
        out.setdefault(owner, {}).setdefault(leaf, (node, value))
    return out


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float) -> bool:
    a, b = a.detach().double(), b.detach().double()
    return float(torch.linalg.vector_norm(a - b)) <= rtol * float(torch.linalg.vector_norm(a))


def _similar(gm: fx.GraphModule, rtol: float, ties: list[dict]) -> None:
    modules = _modules(gm)
    groups: dict[tuple, list[str]] = {}
    for owner, params in modules.items():
        sig = tuple(sorted((leaf, tuple(v.shape), v.dtype) for leaf, (_, v) in params.items()))
        groups.setdefault(sig, []).append(owner)
    nodes_by_target: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            nodes_by_target.setdefault(node.target, []).append(node)
    for owners in groups.values():
        reps: list[str] = []
        for owner in owners:
            params = modules[owner]
            rep = next((r for r in reps if all(_close(modules[r][leaf][1], v, rtol) for leaf, (_, v) in params.items())), None)
            if rep is None:
                reps.append(owner)
                continue
            for leaf, (node, value) in params.items():
                keep_node, keep_value = modules[rep][leaf]
                if node.target == keep_node.target:
                    continue
                v, k = value.detach().double(), keep_value.detach().double()
                rel = float(torch.linalg.vector_norm(v - k)) / max(float(torch.linalg.vector_norm(k)), 1e-30)
                for n in nodes_by_target.get(node.target, []):
                    _repoint(n, keep_node)
                ties.append({"kept": _fqn(keep_node), "tied": _fqn(node), "how": f"similar (relative difference {rel:.3g})",
                             "param_bytes_saved": tensor_bytes(value)})


def _output_error(before: fx.GraphModule, after: fx.GraphModule, example) -> float:
    with torch.no_grad():
        ref, out = before(*example), after(*example)
    leaves = zip(torch.utils._pytree.tree_leaves(ref), torch.utils._pytree.tree_leaves(out))
    errs = [float((o.double() - r.double()).abs().max()) for r, o in leaves
            if isinstance(r, torch.Tensor) and r.is_floating_point() and r.numel()]
    return max(errs) if errs else 0.0


def tie_weights(gm: fx.GraphModule, config: TieConfig, ctx: PassContext = PassContext()) -> PassResult:
    """Make identical (or, in similar mode, near-identical) weights read one attribute.

    Reads and compares real weights: the pipeline runs it outside AOTAutograd's fake mode
    (``real_tensors`` in :data:`fxmem.pipeline.PASSES`). ``ctx.example_inputs``, when given,
    measure similar mode's output error."""
    bytes_before = parameter_bytes(gm)
    attrs_before = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    reference = None
    example = ctx.real_example_inputs()
    if config.mode == "similar" and example is not None:
        reference = fx.GraphModule(gm, copy_graph(gm.graph))
    ties: list[dict] = []
    _exact(gm, ties)
    if config.mode == "similar":
        _similar(gm, config.rtol, ties)
    changed = bool(ties)
    if changed:
        gm.graph.lint()
        gm.recompile()
        drop_unused_attrs(gm, attrs_before)
    bytes_after = parameter_bytes(gm)
    stats: dict = {"mode": config.mode, "ties": ties, "tied": len(ties), "param_bytes_saved": bytes_before - bytes_after,
                   "param_bytes_before": bytes_before, "param_bytes_after": bytes_after}
    if config.mode == "similar":
        stats["rtol"] = config.rtol
        if reference is not None:
            stats["max_abs_error"] = _output_error(reference, gm, example)
        else:
            stats["max_abs_error"] = "not measured: no example inputs (PassContext.example_inputs)"
    return PassResult(gm, changed, stats)


__all__ = ["tie_weights", "content_hash", "bitwise_equal", "TieConfig"]
