"""Structured pruning: remove MLP neurons, attention heads and conv channels from the graph.

Before (an MLP with 4 hidden neurons; neuron 2 has the lowest group norm)::

    up = self.up.weight            # [4, 8]
    h = aten.addmm(self.up.bias, x, aten.t(up))                       # [N, 4]
    y = aten.addmm(self.down.bias, aten.gelu(h), aten.t(self.down.weight))   # down: [8, 4]

After (ratio 0.25)::

    up = self.up.weight            # [3, 8]  new nn.Parameter: rows 0, 1, 3
    h = aten.addmm(self.up.bias, x, aten.t(up))                       # [N, 3]
    y = aten.addmm(self.down.bias, aten.gelu(h), aten.t(self.down.weight))   # down: [8, 3]

A group is a channel space of :mod:`fxmem.analysis.dependencies`: every weight slice and every
tensor dimension it lives in is removed at once, and every shape argument that depended on it —
``view``/``reshape``/``_unsafe_view``/``expand`` sizes, ``split`` sizes, the size of a created
tensor — is rewritten from the new sizes the analysis predicts. Head counts need no fixing: in
the ATen graph a head count is nothing but those sizes. ``meta["val"]`` is recomputed by fake
propagation and checked against the prediction; any disagreement leaves the graph unchanged.

Per group, ``ratio`` of the indices are removed (``keep = int(n * (1 - ratio))``, at least one),
chosen by ``importance``: ``"l2"``/``"l1"`` — the magnitude of the whole group (every weight slice
of the index), ``"activation"`` — the L2 norm of the channel's activation on the example inputs
(``PassContext.example_inputs``), ``"taylor"`` — ``Σ |w · ∂L/∂w|`` over the group with
``L = mean(output²)`` on the example inputs (no labels are known to a graph pass). Targets:
``"mlp"`` (neurons of a matrix dimension), ``"heads"`` (whole heads; with grouped-query
attention, whole kv groups when ``gqa="groups"``, or the same query heads in every kv group when
``gqa="queries"``), ``"channels"`` (conv output channels).

Preconditions: an inference graph (``ctx.stage == "inference"``), parameters frozen
as ``get_attr``, every node with ``meta["val"]``, static shapes.

Numerical promise: lossy. Output shapes never change. A group whose weights are all zero is
removed with outputs unchanged (to float rounding of the shorter sums). Frozen weights that were
``nn.Parameter`` are replaced by new ``nn.Parameter`` (same ``requires_grad``), so the module that
``fxmem.optimize`` returns trains.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from fxmem.analysis.cost import graph_cost
from fxmem.analysis.dependencies import DependencyGraph, Group, analyze, dim_index
from fxmem.analysis.sizes import fetch_attr, parameter_bytes
from fxmem.config import PruneConfig
from fxmem.freeze import set_attr
from fxmem.passes.base import PassContext, PassResult, UnsupportedGraph, normalize_void_ops

aten = torch.ops.aten

_SIZE_ARG1 = {aten.view, aten._unsafe_view, aten.reshape, aten.expand}
_SIZE_ARG0 = {aten.zeros, aten.ones, aten.full, aten.empty}
_ASSERT_META = getattr(aten, "_assert_tensor_metadata", None)


def _changed(node, predicted) -> bool:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return isinstance(val, torch.Tensor) and list(val.shape) != predicted.get(node)


def _restate_asserts(gm: fx.GraphModule, asserts: list[fx.Node]) -> None:
    """``_assert_tensor_metadata`` checks again the (new) size and stride of its input."""
    for node in asserts:
        val = node.args[0].meta["val"]
        node.kwargs = {**node.kwargs, "size": list(val.shape), "stride": list(val.stride())}
        del node.meta["fxmem_prune_restate"]


@dataclass
class Decision:
    """What the pass does to one group: keep ``kept`` of its indices, ranked by ``scores``."""

    group: Group
    scores: torch.Tensor      # importance per index
    kept: torch.Tensor        # sorted kept indices

    @property
    def removed(self) -> int:
        return self.group.size - len(self.kept)


# ------------------------------------------------------------------------------------ selection
def _selected(group: Group, config: PruneConfig) -> bool:
    if group.kind not in config.targets:
        return False
    if group.kind == "heads":
        wanted = {"groups": ("group", "head"), "queries": ("query", "head")}[config.gqa]
        return group.level in wanted
    return True


def _weight_mentions(gm: fx.GraphModule, group: Group):
    """The mentions that are trainable weights (parameters); all floating tensors if none are.
    A tensor read by several ``get_attr`` nodes (tied or reused weights) counts once."""
    unique, seen = [], set()
    for m in group.mentions:
        key = (id(fetch_attr(gm, m.node.target)), m.dim, m.position)
        if key not in seen:
            seen.add(key)
            unique.append(m)
    ms = [m for m in unique if isinstance(fetch_attr(gm, m.node.target), torch.nn.Parameter)]
    return ms or [m for m in unique if fetch_attr(gm, m.node.target).is_floating_point()]


def _per_index(t: torch.Tensor, mention, size: int) -> torch.Tensor:
    """``t`` (shaped like the mentioned weight) as ``[size, -1]``: one row per index of the space."""
    x = t.movedim(mention.dim, 0)
    x = x.reshape(*mention.sizes, *x.shape[1:]).movedim(mention.position, 0)
    return x.reshape(size, -1)


def _magnitude(gm: fx.GraphModule, group: Group, p: int) -> torch.Tensor:
    score = torch.zeros(group.size, dtype=torch.float64)
    for m in _weight_mentions(gm, group):
        w = fetch_attr(gm, m.node.target).detach().double()
        score += _per_index(w, m, group.size).abs().pow(p).sum(1)
    return score


class _Calibrate(fx.Interpreter):
    """Runs the graph on real inputs, with substitute tensors for some attributes."""

    def __init__(self, gm: fx.GraphModule, substitutes: dict[str, torch.Tensor], watch: set[fx.Node]):
        super().__init__(gm)
        self.substitutes = substitutes
        self.watch = watch
        self.seen: dict[fx.Node, torch.Tensor] = {}

    def get_attr(self, target, args, kwargs):
        return self.substitutes.get(target) if target in self.substitutes else super().get_attr(target, args, kwargs)

    def run_node(self, n):
        out = super().run_node(n)
        if n in self.watch:
            self.seen[n] = out.detach()
        return out


def _example_inputs(inputs: tuple | None) -> tuple:
    if inputs is None:
        raise UnsupportedGraph("importance", "activation/taylor importance needs example inputs (PassContext.example_inputs)")
    if any(isinstance(x, FakeTensor) for x in inputs):
        raise UnsupportedGraph("importance", "activation/taylor importance needs real example inputs; these are fake")
    return tuple(inputs)


def _activation_node(dg: DependencyGraph, group: Group) -> tuple[fx.Node, int] | None:
    """The node feeding the contraction that consumes the group (post-activation), and its dim."""
    candidates = []
    for node in dg.gm.graph.nodes:
        if node.op != "call_function" or not isinstance(node.meta.get("val"), torch.Tensor):
            continue
        dims = dg.node_dims(node)
        if not isinstance(dims, list):
            continue
        for d, factors in enumerate(dims):
            if group.space in factors:
                candidates.append((node, d))
                break
    contraction = {aten.mm, aten.addmm, aten.bmm, aten.convolution, aten.linear}
    for node, d in candidates:
        if any(getattr(u.target, "overloadpacket", None) in contraction for u in node.users):
            return node, d
    return candidates[-1] if candidates else None


def _activation(dg: DependencyGraph, groups: list[Group], inputs: tuple | None) -> dict[int, torch.Tensor]:
    where = {g.space: _activation_node(dg, g) for g in groups}
    watch = {w[0] for w in where.values() if w is not None}
    interp = _Calibrate(dg.gm, {}, watch)
    with torch.no_grad():
        interp.run(*_example_inputs(inputs))
    scores = {}
    for g in groups:
        if where[g.space] is None:
            continue
        node, d = where[g.space]
        factors = dg.node_dims(node)[d]
        act = interp.seen[node].double().movedim(d, 0)
        sizes = [dg.spaces.size[f] for f in factors]
        act = act.reshape(*sizes, *act.shape[1:]).movedim(factors.index(g.space), 0).reshape(g.size, -1)
        scores[g.space] = act.pow(2).sum(1).sqrt()
    return scores


def _taylor(dg: DependencyGraph, groups: list[Group], inputs: tuple | None) -> dict[int, torch.Tensor]:
    gm = dg.gm
    targets = {m.node.target for g in groups for m in _weight_mentions(gm, g)}
    # detached leaf copies: gradients land on them, never on the model's own parameters
    subs = {t: fetch_attr(gm, t).detach().clone().requires_grad_(True) for t in targets}
    interp = _Calibrate(gm, subs, set())
    with torch.enable_grad():
        out = interp.run(*_example_inputs(inputs))
        leaves = [o for o in torch.utils._pytree.tree_leaves(out) if isinstance(o, torch.Tensor) and o.is_floating_point() and o.requires_grad]
        if not leaves:
            raise UnsupportedGraph("importance", "taylor importance: no output depends on the weights")
        loss = sum(o.double().pow(2).mean() for o in leaves)
        grads = torch.autograd.grad(loss, list(subs.values()), allow_unused=True)
    grad = {t: (g if g is not None else torch.zeros_like(subs[t])) for t, g in zip(subs, grads)}
    scores = {}
    for g in groups:
        score = torch.zeros(g.size, dtype=torch.float64)
        for m in _weight_mentions(gm, g):
            w = subs[m.node.target].detach().double()
            score += _per_index((w * grad[m.node.target].double()).abs(), m, g.size).sum(1)
        scores[g.space] = score
    return scores


def importance(dg: DependencyGraph, groups: list[Group], kind: str, example_inputs: tuple | None = None) -> dict[int, torch.Tensor]:
    """Importance of every index of every group (higher: keep); ``activation`` and ``taylor``
    run the graph on ``example_inputs``."""
    if kind in ("l2", "l1"):
        p = 2 if kind == "l2" else 1
        return {g.space: _magnitude(dg.gm, g, p) for g in groups}
    if kind == "activation":
        return _activation(dg, groups, example_inputs)
    return _taylor(dg, groups, example_inputs)


def _keep(group: Group, config: PruneConfig) -> int:
    """How many of ``group``'s indices stay under ``config``: ``int(n · (1 - ratio))``, at least one."""
    return max(1, int(group.size * (1.0 - config.ratio)))


def decide(dg: DependencyGraph, config: PruneConfig, example_inputs: tuple | None = None) -> list[Decision]:
    """Which indices of which groups to keep under ``config``."""
    groups = [g for g in dg.groups() if _selected(g, config)]
    if not groups:
        return []
    scores = importance(dg, groups, config.importance, example_inputs)
    decisions = []
    for g in groups:
        if g.space not in scores:
            continue
        keep = _keep(g, config)
        if keep >= g.size:
            continue
        # stable ranking: ties (e.g. several all-zero channels) keep the lower indices
        order = torch.sort(scores[g.space], descending=True, stable=True).indices
        decisions.append(Decision(g, scores[g.space], torch.sort(order[:keep]).values))
    return decisions


# ------------------------------------------------------------------------------------ rewrite
def _new_shape(dg: DependencyGraph, factors_per_dim, kept: dict[int, torch.Tensor]) -> list[int]:
    return [math.prod(len(kept[f]) if f in kept else dg.spaces.size[f] for f in fs) for fs in factors_per_dim]


def _predicted(dg: DependencyGraph, node: fx.Node, kept) -> object:
    dims = dg.node_dims(node)
    if isinstance(dims, tuple):
        return tuple(None if d is None else _new_shape(dg, d, kept) for d in dims)
    return None if dims is None else _new_shape(dg, dims, kept)


def _resize_arg(old_arg, old_shape, new_shape) -> list:
    """A size list with the changed dimensions replaced (``-1`` and unchanged entries kept)."""
    out = list(old_arg)
    offset = len(old_shape) - len(out)
    for i in range(len(out)):
        j = i + offset
        if int(old_shape[j]) != new_shape[j]:
            out[i] = new_shape[j]
    return out


def _rewrite(gm: fx.GraphModule, dg: DependencyGraph, kept: dict[int, torch.Tensor]) -> dict[fx.Node, object]:
    sizes = dict(enumerate(dg.spaces.size))
    predicted = {n: _predicted(dg, n, kept) for n in gm.graph.nodes}
    replaced: dict[int, torch.Tensor] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            value = fetch_attr(gm, node.target)
            if not isinstance(value, torch.Tensor) or dg.node_dims(node) is None:
                continue
            if list(value.shape) == predicted[node]:
                continue
            if id(value) not in replaced:  # tied weights: one new tensor for every reader
                new = value.detach()
                for d, factors in enumerate(dg.node_dims(node)):
                    idx = dim_index(factors, sizes, kept)
                    if idx is not None:
                        new = new.index_select(d, idx)
                new = new.contiguous()
                if isinstance(value, torch.nn.Parameter):
                    new = torch.nn.Parameter(new, requires_grad=value.requires_grad)
                replaced[id(value)] = new
            set_attr(gm, node.target, replaced[id(value)])
            continue
        if node.op != "call_function":
            continue
        packet = getattr(node.target, "overloadpacket", None)
        val = node.meta.get("val")
        new = predicted[node]
        if packet in _SIZE_ARG1 and list(val.shape) != new:
            node.args = (node.args[0], _resize_arg(node.args[1], val.shape, new), *node.args[2:])
        elif packet in _SIZE_ARG0 and list(val.shape) != new:
            node.args = (_resize_arg(node.args[0], val.shape, new), *node.args[1:])
        elif packet is _ASSERT_META and _changed(node.args[0], predicted) and (
                any(a is not None for a in node.args[1:3]) or node.kwargs.get("size") is not None):
            # it asserts the old size: re-stated after fake propagation (see _restate_asserts)
            node.kwargs = {**node.kwargs, "size": None, "stride": None}
            node.args = node.args[:1] + node.args[3:4]
            node.meta["fxmem_prune_restate"] = True
        elif packet in (aten.split, aten.split_with_sizes) and isinstance(new, tuple):
            dim = (node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)) % val[0].dim()
            if packet is aten.split:
                node.args = (node.args[0], new[0][dim], *node.args[2:])
            else:
                node.args = (node.args[0], [s[dim] for s in new], *node.args[2:])
    return predicted


class _Propagate(FakeTensorProp):
    """Fake propagation that reads the graph's real attributes as fake tensors."""

    def __init__(self, gm: fx.GraphModule, mode: FakeTensorMode, device: torch.device):
        super().__init__(gm, mode)
        self._device = device

    def get_attr(self, target, args, kwargs):
        value = super().get_attr(target, args, kwargs)
        if not isinstance(value, torch.Tensor):
            return value
        if value.device.type == "meta":  # fxmem.fit's weights (prune_shapes): on the graph's device
            with self._mode:
                return torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device=self._device)
        return self._mode.from_tensor(value)


def refresh_vals(gm: fx.GraphModule) -> None:
    """Recompute every node's ``meta["val"]`` by fake propagation from the placeholders' values.

    In the fake mode the graph's values are in (inside a compile: AOTAutograd's, which the later
    passes find with ``detect_fake_mode`` and run ops in — a mode of its own here made
    ``precision`` after ``prune`` fail on "Mixing fake modes"); a fresh one for a graph without."""
    vals = [n.meta.get("val") for n in gm.graph.nodes if isinstance(n.meta.get("val"), torch.Tensor)]
    mode = detect_fake_mode(vals) or FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        inputs = [torch.empty_strided(n.meta["val"].shape, n.meta["val"].stride(), dtype=n.meta["val"].dtype,
                                      device=n.meta["val"].device) if isinstance(n.meta.get("val"), torch.Tensor) else n.meta.get("val")
                  for n in gm.graph.nodes if n.op == "placeholder"]
    # no_grad: an inference graph, and a parameter that requires grad may reach an op that is not
    # differentiable in that argument (T5's relative position bias is SDPA's attn_mask); with
    # grad mode on, fake propagation would raise where the real graph runs fine.
    with torch.no_grad():
        device = next((v.device for v in inputs if isinstance(v, torch.Tensor)), torch.device("cpu"))
        _Propagate(gm, mode, device).propagate_dont_convert_inputs(*inputs)
    normalize_void_ops(gm)  # propagation gives ops that return nothing no value: None, as at capture


def _check(gm: fx.GraphModule, predicted: dict[fx.Node, object]) -> None:
    for node in gm.graph.nodes:
        want, val = predicted.get(node), node.meta.get("val")
        if want is None:
            continue
        if isinstance(val, torch.Tensor):
            got = list(val.shape)
        elif isinstance(val, (list, tuple)):
            got = tuple(list(v.shape) if isinstance(v, torch.Tensor) else None for v in val)
            want = tuple(w if isinstance(v, torch.Tensor) else None for w, v in zip(want, val))
        else:
            continue
        if got != want:
            raise UnsupportedGraph(node.target, f"after pruning {node.name} has shape {got}, the analysis predicted {want}")


def _apply(gm: fx.GraphModule, dg: DependencyGraph, kept: dict[int, torch.Tensor]) -> None:
    """Keep ``kept[space]`` of each pruned space, in place; fake propagation checks every new
    shape against the analysis's prediction (:class:`UnsupportedGraph` where one differs)."""
    predicted = _rewrite(gm, dg, kept)
    asserts = [n for n in gm.graph.nodes if n.op == "call_function" and n.meta.get("fxmem_prune_restate")]
    refresh_vals(gm)
    _restate_asserts(gm, asserts)
    gm.recompile()
    _check(gm, predicted)


def prune_shapes(gm: fx.GraphModule, config: PruneConfig) -> int:
    """Prune ``gm`` as :func:`prune` would, but keep each group's *first* indices: the result has
    the pruned graph's shapes, not its weights' values. Returns the number of groups pruned.

    For estimates (:func:`fxmem.fit`): which indices the importance keeps changes no shape, so
    the parameter bytes and activations of this graph are those the pass gives. Its weights may
    be meta tensors (no memory); :func:`refresh_vals` propagates them on the graph's device.
    Raises :class:`UnsupportedGraph` exactly where :func:`prune` would (the pass is then skipped,
    so an estimate must not count it).
    """
    _require_static(gm)
    dg = analyze(gm)
    kept = {g.space: torch.arange(_keep(g, config)) for g in dg.groups()
            if _selected(g, config) and _keep(g, config) < g.size}
    if kept:
        _apply(gm, dg, kept)
    return len(kept)


# ------------------------------------------------------------------------------------ the pass
def _require_static(gm: fx.GraphModule) -> None:
    if not _static(gm):
        raise UnsupportedGraph("prune", "the graph has symbolic shapes; pruning needs static shapes")


def _static(gm: fx.GraphModule) -> bool:
    for node in gm.graph.nodes:
        val = node.meta.get("val")
        for v in (val if isinstance(val, (list, tuple)) else [val]):
            if isinstance(v, torch.Tensor) and any(isinstance(s, torch.SymInt) for s in v.shape):
                return False
            if isinstance(v, torch.SymInt):
                return False
    return True


def _param_count(gm: fx.GraphModule) -> int:
    seen = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            v = fetch_attr(gm, node.target)
            if isinstance(v, torch.Tensor):
                seen[id(v)] = v.numel()
    return sum(seen.values())


def prune(gm: fx.GraphModule, config: PruneConfig, ctx: PassContext = PassContext()) -> PassResult:
    """Remove the least important ``config.ratio`` of every selected group (see module doc).

    Weights are scored and sliced for real: the pipeline runs it outside AOTAutograd's fake mode
    (``real_tensors`` in :data:`fxmem.pipeline.PASSES`)."""
    ctx.require_stage("prune", "inference")  # frozen weights only
    _require_static(gm)
    dg = analyze(gm)
    decisions = decide(dg, config, ctx.example_inputs)
    stats: dict = {"groups_found": len(dg.groups()), "groups_pruned": 0}
    if not decisions:
        return PassResult(gm, False, stats)
    before_cost, before_bytes, before_params = graph_cost(gm), parameter_bytes(gm), _param_count(gm)
    _apply(gm, dg, {d.group.space: d.kept for d in decisions})
    after_cost, after_bytes, after_params = graph_cost(gm), parameter_bytes(gm), _param_count(gm)
    rows = []
    for d in decisions:
        removed = torch.tensor(sorted(set(range(d.group.size)) - set(d.kept.tolist())), dtype=torch.long)
        rows.append({
            "layer": d.group.layer,
            "kind": d.group.kind + (f" ({d.group.level})" if d.group.kind == "heads" and d.group.level != "head" else ""),
            "dimension": f"{d.group.size}→{len(d.kept)}",
            "count": d.removed,
            "importance": float(d.scores[removed].max()) if len(removed) else 0.0,
            "importance_kept_min": float(d.scores[d.kept].min()),
            "weights": d.group.weights,
        })
    stats.update({
        "groups_pruned": len(decisions),
        "channels_removed": sum(d.removed for d in decisions),
        "importance": config.importance,
        "params_before": before_params, "params_after": after_params,
        "param_bytes_saved": before_bytes - after_bytes,
        "flops_before": before_cost.flops, "flops_after": after_cost.flops,
        "flops_saved": before_cost.flops - after_cost.flops,
        "groups": rows,
    })
    return PassResult(gm, True, stats)


__all__ = ["prune", "prune_shapes", "decide", "importance", "refresh_vals", "Decision"]
