"""Rematerialization: which forward activations are saved for backward, chosen by one min-cut.

The training path's partition function. AOTAutograd hands it the joint forward+backward graph;
it returns a forward graph (user outputs, then the tensors saved for backward) and a backward
graph that recomputes whatever was not saved. The smallest example — ``y = gelu(x @ w)``,
differentiated through gelu::

    joint:     mm = mm(x, w); g = gelu(mm); ...; gelu_backward(tangent, mm); mm(t(x), ...)
    eager:     forward saves x, mm                     (every forward value backward reads)
    remat:     forward saves x, mm — mm is a matmul; with y = gelu(relu(x) * 2) instead the
               forward saves only x and backward recomputes relu(x) * 2 (free: pointwise)

Objective. For a multiplier λ, minimise  saved bytes + λ · recompute cost  over all valid
splits, exactly, as one s-t minimum cut (each forward node ``v`` is an edge ``v_in → v_out``
whose capacity is its bytes — cutting it means saving it — and an edge ``source → v_in`` of
capacity λ · cost(v) that is cut when ``v`` is recomputed). Costs come from
:mod:`fxmem.analysis.cost`: FLOPs for matmul / convolution / attention (CPU flash attention
counted with its real FLOPs), plus one FLOP-equivalent per byte moved for everything else
(:data:`BYTE_COST`). Options (:class:`~fxmem.config.RematConfig`):

* ``remat=True`` (``budget=None``): recompute only what is free — matmul, convolution and
  attention are never recomputed; minimum saved bytes, then the least recompute among those.
* ``remat={"budget": b}``: keep at most ``b`` × eager's saved bytes (eager = PyTorch's
  ``default_partition``) with the least recompute cost: a search over λ (saved bytes fall as λ
  falls). If no split meets it, the split with the fewest saved bytes is taken and reported.
* ``remat=False``: ``default_partition`` (save everything the backward reads).

Peak guard. Saved bytes are a proxy: what a user meets is the *peak* of the step. Saving fewer
bytes can raise it — at budget 0.0 the backward recomputes the whole forward at once, and the
recomputed activations are all alive together (pytorch/pytorch#197838 has the same fault). So
after the cut is chosen, the step's peak is estimated for it and for the cuts of higher budgets
(the λ ladder :data:`PEAK_LADDER` and the no-recompute cut, each saving more bytes) and for the
free-recompute cut that ``budget=None`` chooses, with :func:`fxmem.analysis.timeline.step_timeline`;
if one of those peaks lower, it is taken instead (``stats["peak_guard"]`` says so, and
``budget_met`` turns False when it saves more than the budget). The rule makes a lower budget
never raise the estimated peak above a higher budget's among these cuts, nor above the default's.
Recomputation sits just before its first use in the backward
(``reordering_to_mimic_autograd_engine``), and the compiled backward frees it after its last.

Guarantees (each tested): saved bytes never exceed eager's (checked, falling back to
``default_partition`` otherwise); parameters are never saved as copies — a view, cast or copy
computed from parameters alone is always recomputed from the parameter, which is saved
instead at zero activation cost; random ops (``nondeterministic_seeded``) and impure ops are never
recomputed, so a dropout mask is the forward's mask; user checkpoint tags (``MUST_SAVE``,
``MUST_RECOMPUTE``) are honoured except that random ops stay saved.

Preconditions: an AOTAutograd joint graph (``primals_*``/``tangents_*`` placeholders) whose
nodes carry ``meta["val"]``. Numerical promise: exact — the forward and backward graphs run the
joint graph's own ops on the same values; recomputation repeats deterministic ops bit for bit.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import hashlib
import operator
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch._functorch import partitioners as P
from torch._functorch.compile_utils import raise_getitems

from fxmem.analysis.cost import is_compute_bound, node_bytes_moved, node_flops
from fxmem.analysis.saved import describe_saved, saved_activation_bytes
from fxmem.analysis.sizes import PARAM_META_KEY, is_alias_op, node_bytes, unique_storage_bytes
from fxmem.analysis.timeline import step_timeline
from fxmem.config import RematConfig
from fxmem.passes._flow import INF, SINK, SOURCE, FlowNetwork, min_cut
from fxmem.passes._sink import sink_compute
from fxmem.passes.base import RECOMPUTED_KEY, UnsupportedGraph

BYTE_COST = 1.0
"""Recompute cost of one byte moved by a memory-bound op, in FLOPs. Matmuls dominate at 1; the
figure only orders memory-bound recomputation against compute-bound recomputation."""

LAMBDA_RANGE = (1e-10, 1e4)
"""λ (bytes per FLOP) searched for a budget; beyond these ends the cut no longer changes on any
graph whose tensors are between 1 byte and 1 TB."""

LAMBDA_STEPS = 18

PEAK_LADDER = tuple(10.0 ** (k / 8) for k in range(-48, 17))
"""λ values whose cuts the peak guard compares a budget's cut with (see :func:`_peak_guard`)."""

PEAK_BUDGETS = (0.25, 0.5, 0.75, 1.0)
"""Budgets whose cuts the peak guard of every lower budget compares too (see :func:`_peak_guard`):
a budget sweep over them, or down from any of them, never raises the estimated peak."""

PEAK_TOLERANCE = 0.0
"""A cut that saves more bytes replaces the budget's cut only if its estimated step peak is lower
by more than this fraction: equal peaks keep the budget's choice. Zero: with 1 % (until
2026-11-28) HF GPT-2 at budget 0.5 kept a cut estimated 0.9 % above the default's, and measured
1.3 % above it (393.0 against 387.9 MiB) — a budget must never raise the peak."""

POLISH_SECONDS = 10.0
"""Time limit of the exact ILP that follows the λ search under a budget (0 disables it)."""

__all__ = ["RematConfig", "RematResult", "rematerialize", "partition", "partition_with_info", "shared_cuts",
           "trace_joint"]


@dataclass
class RematResult:
    """What :func:`rematerialize` returns: the two graphs and what was decided."""

    forward: fx.GraphModule
    backward: fx.GraphModule
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def saved_bytes(self) -> int:
        return self.stats["saved_bytes"]


# --------------------------------------------------------------------------------------------
# Per-node facts the cut needs.
# --------------------------------------------------------------------------------------------


def _is_random(node: fx.Node) -> bool:
    """Draws random numbers. Attention ops are tagged random for their dropout; with
    ``dropout_p == 0`` (every inference and most training calls) they are deterministic."""
    tags = getattr(node.target, "tags", ())
    if torch.Tag.nondeterministic_seeded not in tags:
        return False
    schema = getattr(node.target, "_schema", None)
    names = [a.name for a in schema.arguments] if schema is not None else []
    if "dropout_p" in names:
        i = names.index("dropout_p")
        p = node.args[i] if i < len(node.args) else node.kwargs.get("dropout_p", schema.arguments[i].default_value)
        return not (isinstance(p, (int, float)) and p == 0)
    return True


def _is_getitem(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is operator.getitem


def _is_tensor(node: fx.Node) -> bool:
    return isinstance(node.meta.get("val"), torch.Tensor)


def recompute_cost(node: fx.Node) -> float:
    """FLOPs, plus :data:`BYTE_COST` per byte moved; views and tuple reads move nothing."""
    if node.op != "call_function" or _is_getitem(node) or is_alias_op(node):
        return 0.0
    return float(node_flops(node)) + BYTE_COST * node_bytes_moved(node)


def _is_param(node: fx.Node, static: set[fx.Node]) -> bool:
    return node.op == "get_attr" or node in static or bool(node.meta.get(PARAM_META_KEY, False))


def _parameter_derived(graph: fx.Graph, static: set[fx.Node]) -> set[fx.Node]:
    """Nodes computed from parameters alone by cheap ops (views, casts, copies, transposes).

    Saving one of them would save a copy of a weight (pytorch/pytorch#141881); they are always
    recomputed from the parameter instead. Compute-bound and random ops are not included.
    """
    derived: set[fx.Node] = set()
    for node in graph.nodes:
        if node.op != "call_function" or is_compute_bound(node) or _is_random(node) or node.is_impure(impure_random=False):
            continue
        inputs = node.all_input_nodes
        if inputs and all(_is_param(a, static) or a in derived for a in inputs):
            derived.add(node)
    return derived


@dataclass
class _Problem:
    """The joint graph, classified once; each λ builds one flow network from it."""

    joint: fx.GraphModule
    info: Any                          # torch's NodeInfo
    nodes: list[fx.Node]               # candidates: every node not computed from tangents
    index: dict[fx.Node, int]
    save_cap: list[float]              # bytes to save the node (inf: cannot be saved)
    cost: list[float]                  # recompute cost (0 for nodes computed once anyway)
    banned: list[bool]                 # never recomputed
    forced: list[bool]                 # must be recomputed (user tag)
    compute_bound: list[bool]
    sinks: list[int]                   # candidates whose value the backward reads
    edges: list[tuple[int, int]]       # data dependencies among candidates
    static: set[fx.Node]
    eager_saved: list[fx.Node]
    eager_bytes: int
    key: str | None = None             # fingerprint inside :func:`shared_cuts`, else None


# --------------------------------------------------------------------------------------------
# Cuts and peaks shared between calls on equal joint graphs (fxmem.fit).
# --------------------------------------------------------------------------------------------

_SHARED: contextvars.ContextVar[dict | None] = contextvars.ContextVar("fxmem_remat_shared", default=None)


@contextlib.contextmanager
def shared_cuts():
    """Within this block, :func:`rematerialize` calls on equal joint graphs share their min-cut
    solves and step-peak estimates.

    ``fxmem.fit`` partitions one joint graph once per remat budget; every budget's peak guard
    compares the same λ-ladder cuts, and building a cut's two graphs to estimate its peak is
    most of a partition's time. Equal graphs (same nodes, targets, arguments, shapes, dtypes,
    checkpoint tags, parameters) give equal cuts and equal peaks, so each is computed once. The
    cache lives only for the block (a context variable): nothing is shared outside it.
    """
    token = _SHARED.set({})
    try:
        yield
    finally:
        _SHARED.reset(token)


def _fingerprint(joint: fx.GraphModule, num_fwd_outputs: int, static_indices: Sequence[int]) -> str:
    """A digest of everything a cut or a peak estimate reads from the joint graph."""
    digest = hashlib.sha1(f"{num_fwd_outputs}|{sorted(static_indices)}".encode())
    for node in joint.graph.nodes:
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            val_desc = f"{tuple(val.shape)}{val.dtype}{val.stride()}{val.device}"
        else:
            val_desc = type(val).__name__
        digest.update(f"{node.name}|{node.op}|{node.target}|{node.args}|{node.kwargs}|{val_desc}|"
                      f"{node.meta.get('recompute')}|{node.meta.get(PARAM_META_KEY, False)}\n".encode())
    return digest.hexdigest()


def _shared(prob: _Problem, key: tuple, compute):
    """``compute()``, or the value an equal graph already computed for ``key`` in :func:`shared_cuts`."""
    cache = _SHARED.get()
    if cache is None or prob.key is None:
        return compute()
    full = (prob.key, *key)
    if full not in cache:
        cache[full] = compute()
    return cache[full]


def _eager_saved(joint: fx.GraphModule, info: Any) -> list[fx.Node]:
    """What ``default_partition`` saves: forward-placed tensors that a backward node reads."""
    last = None
    for node in joint.graph.nodes:
        if P._has_tag_is_forward(node) or P._is_primal(node) or P._is_fwd_seed_offset(node):
            last = node
    forward: set[fx.Node] = set()
    for node in joint.graph.nodes:
        if not P._is_tangent(node) and node.op != "output":
            forward.add(node)
        if node is last:
            break
    saved = []
    for node in forward:
        if not _is_tensor(node):
            continue
        if any(u not in forward and u.op != "output" for u in node.users):
            saved.append(node)
    return saved


def _mutated_inputs(joint: fx.GraphModule) -> set[fx.Node]:
    """Primals the graph writes to (BatchNorm running stats, in-place input updates).

    AOTAutograd copies their new values into them after the forward, so the backward must not
    read them: a recomputation from a mutated input would see the new value (and trip autograd's
    version check). Found from the output descriptors AOTAutograd attaches to the joint graph.
    """
    out = joint.graph.output_node()
    descs = out.meta.get("desc") or []
    targets = [getattr(d, "mutated_input", None) for d in descs]
    targets = [t for t in targets if t is not None]
    return {n for n in joint.graph.nodes if n.op == "placeholder" and n.meta.get("desc") in targets}


def _classify(joint: fx.GraphModule, num_fwd_outputs: int, static_indices: Sequence[int] | None) -> _Problem:
    static_indices = list(static_indices or [])
    info = P.classify_nodes(joint, static_indices, num_fwd_outputs)
    primals = [n for n in joint.graph.nodes if P._is_primal(n)]
    static = set(info.static_lifetime_input_nodes) | {n for n in primals if n.meta.get(PARAM_META_KEY, False)}
    mutated = _mutated_inputs(joint)
    derived = _parameter_derived(joint.graph, static - mutated)
    closure = info.tangents_closure
    nodes = [n for n in joint.graph.nodes if n.op != "output" and n not in closure]
    index = {n: i for i, n in enumerate(nodes)}
    save_cap, cost, banned, forced, compute, sinks, edges = [], [], [], [], [], [], []
    for i, node in enumerate(nodes):
        fw = info.is_required_fw(node)
        val = node.meta.get("val")
        if node.op in ("placeholder", "get_attr"):
            save = 0.0 if (_is_param(node, static) or not isinstance(val, torch.Tensor)) else float(node_bytes(node))
            ban = True
        else:
            if isinstance(val, torch.Tensor):
                save = INF if (is_alias_op(node) or node in derived) else float(node_bytes(node))
            elif isinstance(val, (torch.SymInt, int, float, bool)) or P.is_sym_node(node):
                save = 1.0  # a symbolic size: saved beside the tensors, nearly free
            else:
                save = INF  # a tuple: its getitems are saved instead
            policy = node.meta.get("recompute")
            must_save = policy == P.CheckpointPolicy.MUST_SAVE
            ban = fw and (_is_random(node) or node.is_impure(impure_random=False) or must_save)
        save_cap.append(save)
        cost.append(recompute_cost(node) if fw else 0.0)
        banned.append(ban)
        forced.append(not ban and P.must_recompute(node))
        compute.append(fw and is_compute_bound(node))
        if node in info.required_bw_nodes:  # a backward output that needs no tangent
            sinks.append(i)
        for user in node.users:
            if user.op == "output":
                continue  # a forward output stays in the forward; gradients are sinks above
            if user in closure:
                sinks.append(i)
            elif user in index:
                edges.append((i, index[user]))
    # a mutated input is saved only where nothing else works (then eager would save it too)
    avoid = float(sum(c for c in save_cap if c != INF)) + 1.0
    for node in mutated:
        if node in index:
            save_cap[index[node]] = avoid
    eager = _eager_saved(joint, info)
    for n in primals:
        if n in static:
            n.meta[PARAM_META_KEY] = True
    eager_bytes = unique_storage_bytes(eager, exclude_parameters=True)
    return _Problem(joint, info, nodes, index, save_cap, cost, banned, forced, compute, sorted(set(sinks)),
                    edges, static, eager, eager_bytes)


# --------------------------------------------------------------------------------------------
# One cut for one λ.
# --------------------------------------------------------------------------------------------


@dataclass
class _Choice:
    saved: list[fx.Node]
    recomputed: list[fx.Node]
    saved_bytes: int
    cost: float
    flops: int
    lam: float | None


def _solve(prob: _Problem, lam: float | None, *, allow_compute: bool) -> _Choice:
    """The exact minimiser of saved bytes + λ·cost (``lam=None``: λ → 0⁺, i.e. fewest bytes, then
    least recompute; ``lam=inf``: nothing with a cost is recomputed)."""
    if prob.key is None or _SHARED.get() is None:
        return _solve_once(prob, lam, allow_compute)
    # shared by node *names*: an equal graph in another call has other node objects
    return _unnamed(prob, _shared(prob, ("solve", lam, allow_compute), lambda: _named(_solve_once(prob, lam, allow_compute))))


def _named(choice: _Choice) -> tuple:
    return ([n.name for n in choice.saved], [n.name for n in choice.recomputed], choice.saved_bytes, choice.cost,
            choice.flops, choice.lam)


def _saved_key(choice: _Choice) -> frozenset:
    """The saved set by node names: equal cuts (of equal graphs) have equal keys."""
    return frozenset(n.name for n in choice.saved)


def _unnamed(prob: _Problem, names: tuple) -> _Choice:
    """:func:`_named`'s choice on ``prob``'s own nodes."""
    by_name = {n.name: n for n in prob.nodes}
    saved, recomputed, *rest = names
    return _Choice([by_name[n] for n in saved], [by_name[n] for n in recomputed], *rest)


def _solve_once(prob: _Problem, lam: float | None, allow_compute: bool) -> _Choice:
    n = len(prob.nodes)
    net = FlowNetwork.empty(2 + 2 * n)
    # Recomputing a node costs at most "save everything eager saves", beyond which a cut that
    # recomputes it can never be minimal: clamping keeps capacities small without changing the cut.
    clamp = float(prob.eager_bytes + sum(c for c in prob.save_cap if c != INF and c > 0) + 1)
    for i in range(n):
        v_in, v_out = 2 + 2 * i, 3 + 2 * i
        net.add(v_in, v_out, prob.save_cap[i])
        cost = prob.cost[i]
        ban = prob.banned[i] or (prob.compute_bound[i] and not allow_compute)
        if ban:
            net.add(SOURCE, v_in, INF)
        elif prob.forced[i]:
            net.add(v_in, SINK, INF)
        elif cost > 0 and lam is not None:
            net.add(SOURCE, v_in, min(lam * cost, clamp))  # λ = inf: recompute only where unavoidable
    for i in prob.sinks:
        net.add(3 + 2 * i, SINK, INF)
    for i, j in prob.edges:
        net.add(3 + 2 * i, 2 + 2 * j, INF)
    cut = min_cut(net)
    if cut.value == INF:
        raise UnsupportedGraph("remat", "no finite cut: a value backward needs can be neither saved nor recomputed")
    side = cut.source_side
    saved, recomputed = [], []
    for i, node in enumerate(prob.nodes):
        if side[2 + 2 * i] and not side[3 + 2 * i]:
            saved.append(node)
        elif not side[2 + 2 * i] and prob.info.is_required_fw(node) and node.op == "call_function":
            recomputed.append(node)
    tensors = [s for s in saved if _is_tensor(s)]
    return _Choice(saved, recomputed, unique_storage_bytes(tensors, exclude_parameters=True),
                   sum(prob.cost[prob.index[r]] for r in recomputed), sum(node_flops(r) for r in recomputed), lam)


def _polish(prob: _Problem, target: float, incumbent: _Choice, time_limit: float) -> _Choice | None:
    """The exact constrained optimum (least recompute cost with bytes ≤ target) as an ILP.

    The λ search only reaches points on the lower convex hull of (bytes, cost); a budget that
    falls between two hull points can have a cheaper split that no λ finds. This is the same
    cut model as :func:`_solve` written as a mixed-integer program — vertex sides ``x`` (1 =
    sink side, i.e. recomputed / needed by backward) and cut indicators ``y`` — solved by HiGHS
    (``scipy.optimize.milp``) within ``time_limit``; ``None`` if it does not finish better.
    """
    import numpy as np
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import coo_matrix

    n = len(prob.nodes)
    nv = 2 + 2 * n
    rows, cols, vals, lo, hi = [], [], [], [], []

    def constraint(entries, low, high):
        r = len(lo)
        for c, v in entries:
            rows.append(r)
            cols.append(c)
            vals.append(v)
        lo.append(low)
        hi.append(high)

    cost = np.zeros(nv + n)
    budget = []
    fixed_zero, fixed_one = [0], [1]
    for i in range(n):
        v_in, v_out = 2 + 2 * i, 3 + 2 * i
        if prob.save_cap[i] == INF:
            constraint([(v_out, 1), (v_in, -1)], -np.inf, 0)          # cannot be saved
        else:
            constraint([(nv + i, 1), (v_out, -1), (v_in, 1)], 0, np.inf)  # y ≥ x_out − x_in
            budget.append((nv + i, prob.save_cap[i]))
        if prob.banned[i]:
            fixed_zero.append(v_in)
        elif prob.forced[i]:
            fixed_one.append(v_in)
        cost[v_in] = prob.cost[i]
    for i in prob.sinks:
        fixed_one.append(3 + 2 * i)
    for i, k in prob.edges:
        constraint([(2 + 2 * k, 1), (3 + 2 * i, -1)], -np.inf, 0)      # data dependency
    constraint(budget, -np.inf, target)
    lb, ub = np.zeros(nv + n), np.ones(nv + n)
    ub[nv:] = np.inf
    lb[fixed_one] = 1
    ub[fixed_zero] = 0
    matrix = coo_matrix((vals, (rows, cols)), shape=(len(lo), nv + n)).tocsr()
    integrality = np.r_[np.ones(nv), np.zeros(n)]
    res = milp(cost, constraints=LinearConstraint(matrix, lo, hi), bounds=Bounds(lb, ub), integrality=integrality,
               options={"time_limit": time_limit, "mip_rel_gap": 1e-6})
    if res.x is None or res.fun >= incumbent.cost - 1e-9:
        return None
    sink_side = res.x[:nv] > 0.5
    saved, recomputed = [], []
    for i, node in enumerate(prob.nodes):
        if not sink_side[2 + 2 * i] and sink_side[3 + 2 * i]:
            saved.append(node)
        elif sink_side[2 + 2 * i] and prob.info.is_required_fw(node) and node.op == "call_function":
            recomputed.append(node)
    tensors = [s for s in saved if _is_tensor(s)]
    choice = _Choice(saved, recomputed, unique_storage_bytes(tensors, exclude_parameters=True),
                     sum(prob.cost[prob.index[r]] for r in recomputed), sum(node_flops(r) for r in recomputed), None)
    return choice if choice.saved_bytes <= target else None


def _search(prob: _Problem, target: float) -> tuple[_Choice, int]:
    """Least recompute cost with saved bytes ≤ target (:func:`_search_once`), shared like
    :func:`_solve` (fit's candidates, and the peak guard's higher budgets, search the same
    targets on the same graph)."""
    if prob.key is None or _SHARED.get() is None:
        return _search_once(prob, target)

    def search() -> tuple[tuple, int]:
        choice, solves = _search_once(prob, target)
        return _named(choice), solves

    names, solves = _shared(prob, ("search", target), search)
    return _unnamed(prob, names), solves


def _search_once(prob: _Problem, target: float) -> tuple[_Choice, int]:
    """Least recompute cost with saved bytes ≤ target: λ bisection in log space, then the ILP
    polish where the hull point is not already exact."""
    solves = 1
    cheapest = _solve(prob, INF, allow_compute=True)  # no recompute that costs anything
    if cheapest.saved_bytes <= target:
        return cheapest, solves
    smallest = _solve(prob, None, allow_compute=True)  # fewest bytes at any cost
    solves += 1
    if smallest.saved_bytes > target:
        return smallest, solves  # infeasible: the closest feasible point
    lo, hi = LAMBDA_RANGE  # feasible at lo (bytes small), infeasible at hi
    best = smallest
    for _ in range(LAMBDA_STEPS):
        mid = (lo * hi) ** 0.5
        choice = _solve(prob, mid, allow_compute=True)
        solves += 1
        if choice.saved_bytes <= target:
            lo = mid
            if choice.cost < best.cost or (choice.cost == best.cost and choice.saved_bytes < best.saved_bytes):
                best = choice
        else:
            hi = mid
    if POLISH_SECONDS > 0:
        polished = _polish(prob, target, best, POLISH_SECONDS)
        if polished is not None:
            return polished, solves + 1
    return best, solves


# --------------------------------------------------------------------------------------------
# Forward and backward graphs from a chosen saved set.
# --------------------------------------------------------------------------------------------


# torch 2.11's partitioner (the GPU machines) has neither helper; 2.13 added both, with saved
# opaque nodes. Without them no node is opaque or an assert-only symbool, as 2.11 itself assumes.
def _is_opaque_node(node: fx.Node) -> bool:
    check = getattr(P, "is_opaque_node", None)
    return bool(check is not None and check(node))


def _is_assert_only_symbool(node: fx.Node) -> bool:
    check = getattr(P, "_is_assert_only_symbool", None)
    return bool(check is not None and check(node))


def _build(joint: fx.GraphModule, prob: _Problem, saved: list[fx.Node], num_fwd_outputs: int):
    order = {n: i for i, n in enumerate(joint.graph.nodes)}
    saved = sorted(saved, key=order.__getitem__)
    sym = [n for n in saved if P.is_sym_node(n) and not _is_assert_only_symbool(n)]
    values = [n for n in saved if not P.is_sym_node(n) and _is_tensor(n)]
    # opaque objects (a DTensor's mesh and placements after subclass desugaring) pass through
    opaque = [n for n in saved if _is_opaque_node(n)]
    extra = {"saved_opaque_nodes": opaque} if opaque else {}
    fw, bw = P._extract_fwd_bwd_modules(joint, values, saved_sym_nodes=sym, num_fwd_outputs=num_fwd_outputs,
                                        static_lifetime_input_nodes=prob.info.static_lifetime_input_nodes, **extra)
    fw.graph.eliminate_dead_code(is_impure_node=P.is_not_collective)
    bw.graph.eliminate_dead_code(is_impure_node=P.is_not_collective)
    fw.recompile()
    bw.recompile()
    bw = P.reordering_to_mimic_autograd_engine(bw)
    static = {n.name for n in prob.static}
    if sink_compute(bw.graph, {n for n in bw.graph.nodes if n.op == "placeholder" and n.name in static}):
        bw.recompile()
    return raise_getitems(fw), raise_getitems(bw)


def _step_peak(prob: _Problem, choice: _Choice, num_fwd_outputs: int, fused: bool = False) -> int:
    """Estimated peak of a training step (forward then backward) under ``choice``'s split."""
    key = ("peak", _saved_key(choice), num_fwd_outputs, fused)
    return _shared(prob, key, lambda: _step_peak_once(prob, choice, num_fwd_outputs, fused))


def _step_peak_once(prob: _Problem, choice: _Choice, num_fwd_outputs: int, fused: bool) -> int:
    from torch.fx._lazy_graph_module import _use_lazy_graph_module

    with _use_lazy_graph_module(True):  # the graphs are read, never run: skip generating their code
        fw, bw = _build(prob.joint, prob, choice.saved, num_fwd_outputs)
    _mark_params(fw, prob)
    return step_timeline(fw, bw, num_fwd_outputs, fused=fused, reuse=fused).peak_bytes


def _peak_guard(prob: _Problem, choice: _Choice, num_fwd_outputs: int, *, budget: float | None,
                fused: bool = False) -> tuple[_Choice, dict[str, Any]]:
    """Replace ``choice`` by a compared cut (see below) if that cut's estimated step peak is lower.

    Candidates: the cuts of the λ ladder and the no-recompute cut, kept when they save more bytes
    than ``choice`` (the cuts a higher budget would pick from), and the free-recompute cut — what
    ``budget=None`` chooses, no matmul recomputed — whatever it saves, so that a budget never
    peaks above the default (it can save fewer bytes than a budget's cut: HF GPT-2 saves 47 % of
    eager's bytes by default, and budget 0.5's least-recompute cut 50 %); one cut per distinct
    saved set. And the cut each budget of :data:`PEAK_BUDGETS` above ``budget`` chooses (its
    λ search and ILP polish): the λ ladder holds only the hull's cuts, and a lower budget's
    ladder cut could peak above a higher budget's polished one (the built-in GPT at fit's quick
    shape: budget 0.0 took a ladder cut measured at 8.26 MiB, budget 0.25's cut measured 7.85).
    Since each grid budget's own candidates are among a lower budget's, the peak never rises down
    the grid. The lowest peak wins, then the fewest saved bytes, then the lowest recompute cost;
    the budget's own cut stays on a tie. With ``budget=None`` (free recomputation only) only the
    no-recompute cut is compared.
    Each comparison builds the two graphs (about as long as one partition), the solves are cheap.
    """
    peak = _step_peak(prob, choice, num_fwd_outputs, fused)
    ladder = budget is not None
    candidates: dict[frozenset, _Choice] = {}
    solves = 0
    trials = ([(lam, True) for lam in PEAK_LADDER] if ladder else []) + [(None, False), (INF, True)]
    choice_key = _saved_key(choice)
    for lam, allow in trials:
        cut = _solve(prob, lam, allow_compute=allow)
        solves += 1
        key = _saved_key(cut)
        # the free-recompute cut (what budget=None chooses, no matmul recomputed) may save fewer
        # bytes than a budget's cut: it is compared too, so a budget never peaks above the default
        default_cut = ladder and lam is None and not allow
        if (cut.saved_bytes > choice.saved_bytes or default_cut) and key != choice_key and key not in candidates:
            candidates[key] = cut
    for higher in (b for b in PEAK_BUDGETS if ladder and b > budget):
        cut, n = _search(prob, higher * prob.eager_bytes)
        solves += n
        key = _saved_key(cut)
        if key != choice_key and key not in candidates:
            candidates[key] = cut
    best, best_peak = choice, peak
    for cut in sorted(candidates.values(), key=lambda c: (c.saved_bytes, c.cost)):
        cut_peak = _step_peak(prob, cut, num_fwd_outputs, fused)
        # equal estimated peaks: the cut saving fewer bytes (what a budget asks for; the estimate
        # ties where the saved tensors are not on the peak, and the allocator then tells them
        # apart by what the smaller set frees), then the cheaper one
        if cut_peak < best_peak * (1 - PEAK_TOLERANCE) or (
                best is not choice and cut_peak == best_peak
                and (cut.saved_bytes, cut.cost) < (best.saved_bytes, best.cost)):
            best, best_peak = cut, cut_peak
    facts = {"solves": solves, "budget_cut_peak_bytes": peak, "budget_cut_saved_bytes": choice.saved_bytes}
    if best is choice:
        return choice, {**facts, "peak_bytes": peak, "taken": False,
                        "message": f"kept: no compared cut peaks lower than {peak / 2**20:.2f} MiB ({len(candidates)} compared)"}
    message = (f"the budget's cut would peak at {peak / 2**20:.2f} MiB; a cut saving "
               f"{best.saved_bytes / 2**20:.2f} MiB (instead of {choice.saved_bytes / 2**20:.2f}) peaks at "
               f"{best_peak / 2**20:.2f} MiB: taken")
    return best, {**facts, "peak_bytes": best_peak, "taken": True, "message": message}


def _mark_params(fw: fx.GraphModule, prob: _Problem) -> None:
    names = {n.name for n in prob.static}
    for node in fw.graph.nodes:
        if node.op == "placeholder" and node.name in names:
            node.meta[PARAM_META_KEY] = True


def _recomputed_rows(prob: _Problem, bw: fx.GraphModule) -> list[dict[str, Any]]:
    """Forward nodes that the backward graph computes again, with their cost."""
    by_name = {n.name: n for n in prob.nodes}
    rows = []
    for node in bw.graph.nodes:
        src = by_name.get(node.name)
        if node.op != "call_function" or src is None or not prob.info.is_required_fw(src):
            continue
        rows.append({"name": node.name, "op": str(getattr(src.target, "__name__", src.target)),
                     "flops": node_flops(src),
                     "bytes_moved": 0 if (_is_getitem(src) or is_alias_op(src)) else node_bytes_moved(src),
                     "bytes": node_bytes(src) if _is_tensor(src) and not is_alias_op(src) else 0})
    return rows


def _mark_recomputed(bw: fx.GraphModule, names: set[str]) -> None:
    """Tag the backward's recomputing nodes (``meta[RECOMPUTED_KEY]``): code generators read it."""
    for node in bw.graph.nodes:
        if node.name in names:
            node.meta[RECOMPUTED_KEY] = True


def rematerialize(joint_gm: fx.GraphModule, config: RematConfig = RematConfig(), *, num_fwd_outputs: int | None = None,
                  static_lifetime_input_indices: Sequence[int] | None = None, joint_inputs: Any = None) -> RematResult:
    """Partition ``joint_gm`` by ``config``; returns the graphs and the statistics explain shows.

    ``num_fwd_outputs`` defaults to the joint graph's outputs minus one gradient per primal
    input (AOTAutograd's layout). ``static_lifetime_input_indices`` (primal positions of the
    parameters and buffers) default to the primals marked ``meta["fxmem_param"]``.
    """
    t0 = time.perf_counter()
    primals = [n for n in joint_gm.graph.nodes if P._is_primal(n)]
    if num_fwd_outputs is None:
        out = next(n for n in reversed(joint_gm.graph.nodes) if n.op == "output")
        num_fwd_outputs = len(out.args[0]) - len(primals)
    if static_lifetime_input_indices is None:
        static_lifetime_input_indices = [i for i, n in enumerate(primals) if n.meta.get(PARAM_META_KEY, False)]
    kwargs = dict(num_fwd_outputs=num_fwd_outputs, static_lifetime_input_indices=list(static_lifetime_input_indices))
    if not config.enabled:
        fw, bw = P.default_partition(joint_gm, joint_inputs, **kwargs)
        return RematResult(fw, bw, _default_stats(fw, num_fwd_outputs, "default_partition (remat=False)", t0))

    joint_gm.graph.eliminate_dead_code()
    joint_gm.recompile()
    if P.has_recomputable_ops(joint_gm):
        joint_gm = P.cleanup_recompute_tags(joint_gm, is_default_partition=False)
    prob = _classify(joint_gm, num_fwd_outputs, static_lifetime_input_indices)
    if _SHARED.get() is not None:
        prob.key = _fingerprint(joint_gm, num_fwd_outputs, static_lifetime_input_indices)
    if not prob.sinks:  # nothing reaches the backward: nothing to save
        fw, bw = P.default_partition(joint_gm, joint_inputs, **kwargs)
        return RematResult(fw, bw, _default_stats(fw, num_fwd_outputs, "default_partition (no backward)", t0))

    if config.budget is None:
        choice, solves, target = _solve(prob, None, allow_compute=False), 1, None
    else:
        target = config.budget * prob.eager_bytes
        choice, solves = _search(prob, target)
    choice, guard = _peak_guard(prob, choice, num_fwd_outputs, budget=config.budget, fused=config.fused)
    solve_s = time.perf_counter() - t0
    fw, bw = _build(joint_gm, prob, choice.saved, num_fwd_outputs)
    _mark_params(fw, prob)
    saved = saved_activation_bytes(fw, num_fwd_outputs)
    partitioner = "fxmem min-cut"
    if saved > prob.eager_bytes:  # the guarantee, enforced: never above eager
        fw, bw = P.default_partition(joint_gm, joint_inputs, **kwargs)
        _mark_params(fw, prob)
        saved = saved_activation_bytes(fw, num_fwd_outputs)
        partitioner = "default_partition (min-cut above eager)"
    rows = _recomputed_rows(prob, bw) if partitioner == "fxmem min-cut" else []
    _mark_recomputed(bw, {r["name"] for r in rows})
    stats = {
        "partitioner": partitioner,
        "budget": config.budget,
        "mode": "free recompute only" if config.budget is None else f"budget {config.budget:g}",
        "eager_saved_bytes": prob.eager_bytes,
        "target_bytes": None if target is None else int(target),
        "saved_bytes": saved,
        "budget_met": True if target is None else saved <= target,
        "saved_fraction": saved / prob.eager_bytes if prob.eager_bytes else 0.0,
        "saved": [_saved_row(r) for r in describe_saved(fw, num_fwd_outputs)],
        "recomputed": rows,
        "recompute_flops": sum(r["flops"] for r in rows),
        "recompute_bytes_moved": sum(r["bytes_moved"] for r in rows),
        "recomputed_bytes": sum(r["bytes"] for r in rows),
        "lambda": choice.lam,
        "peak_estimate_bytes": guard["peak_bytes"],
        "peak_guard": guard["message"],
        "peak_guard_taken": guard["taken"],
        "budget_cut_saved_bytes": guard["budget_cut_saved_bytes"],
        "budget_cut_peak_bytes": guard["budget_cut_peak_bytes"],
        "min_cut_solves": solves + guard["solves"],
        "solve_s": solve_s,
        "time_s": time.perf_counter() - t0,
    }
    return RematResult(fw, bw, stats)


def _saved_row(row) -> dict[str, Any]:
    return {"name": row.name, "shape": list(row.shape), "dtype": str(row.dtype).replace("torch.", ""),
            "bytes": row.bytes, "parameter": row.is_parameter}


def _default_stats(fw: fx.GraphModule, num_fwd_outputs: int, partitioner: str, t0: float) -> dict[str, Any]:
    saved = saved_activation_bytes(fw, num_fwd_outputs)
    return {"partitioner": partitioner, "budget": None, "eager_saved_bytes": saved, "saved_bytes": saved,
            "target_bytes": None, "budget_met": True, "saved_fraction": 1.0,
            "saved": [_saved_row(r) for r in describe_saved(fw, num_fwd_outputs)], "recomputed": [],
            "recompute_flops": 0, "recompute_bytes_moved": 0, "recomputed_bytes": 0, "lambda": None,
            "min_cut_solves": 0, "solve_s": 0.0, "time_s": time.perf_counter() - t0}


def partition_with_info(joint_gm: fx.GraphModule, joint_inputs: Any, config: RematConfig, *, num_fwd_outputs: int,
                        static_lifetime_input_indices: Sequence[int] | None = None):
    """``(forward, backward, stats)`` — what the backend uses."""
    result = rematerialize(joint_gm, config, num_fwd_outputs=num_fwd_outputs,
                           static_lifetime_input_indices=static_lifetime_input_indices, joint_inputs=joint_inputs)
    return result.forward, result.backward, result.stats


def partition(joint_gm: fx.GraphModule, joint_inputs: Any, *, num_fwd_outputs: int,
              static_lifetime_input_indices: Sequence[int] | None = None, config: RematConfig | None = None,
              **unused: Any) -> tuple[fx.GraphModule, fx.GraphModule]:
    """AOTAutograd's ``partition_fn`` signature: ``aot_function(..., partition_fn=remat.partition)``."""
    fw, bw, _ = partition_with_info(joint_gm, joint_inputs, config or RematConfig(), num_fwd_outputs=num_fwd_outputs,
                                    static_lifetime_input_indices=static_lifetime_input_indices)
    return fw, bw


# --------------------------------------------------------------------------------------------
# Getting a joint graph to partition (tests, benchmarks, pass-level use).
# --------------------------------------------------------------------------------------------


@dataclass
class Joint:
    """A joint graph as AOTAutograd hands it to a partition function."""

    graph_module: fx.GraphModule
    inputs: Any
    num_fwd_outputs: int
    static_lifetime_input_indices: list[int]
    primals: list[torch.Tensor]  # the real values of the primal inputs: parameters, buffers, args


def trace_joint(module: torch.nn.Module, *args: torch.Tensor) -> Joint:
    """Trace ``module(*args)``'s joint forward+backward graph with AOTAutograd.

    Parameters and buffers become the first primals and are marked as parameters; works on the
    ``meta`` device (no memory, no compute) as well as on real tensors.
    """
    from torch._functorch.aot_autograd import aot_module_simplified

    captured: dict[str, Any] = {}

    class _TupleOut(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *xs):
            out = self.inner(*xs)
            return tuple(out) if isinstance(out, (tuple, list)) else (out,)

    # AOTAutograd lifts parameters and buffers in this order, tied ones once per name
    lifted = [*dict(module.named_parameters(remove_duplicate=False)).values(),
              *dict(module.named_buffers(remove_duplicate=False)).values()]
    n_params = len(lifted)

    def capture(joint, joint_inputs, *, num_fwd_outputs, static_lifetime_input_indices=None, **kw):
        primals = [*lifted, *args]
        captured["joint"] = Joint(joint, joint_inputs, num_fwd_outputs, list(range(n_params)), primals)
        for i, node in enumerate(n for n in joint.graph.nodes if P._is_primal(n)):
            if i < n_params:
                node.meta[PARAM_META_KEY] = True
        return P.default_partition(copy.deepcopy(joint), joint_inputs, num_fwd_outputs=num_fwd_outputs)

    fn = aot_module_simplified(_TupleOut(module), args, fw_compiler=lambda g, a: g, bw_compiler=lambda g, a: g,
                               partition_fn=capture)
    del fn
    if "joint" not in captured:
        raise ValueError("trace_joint: no output of the module requires grad, so there is no backward to partition")
    return captured["joint"]

