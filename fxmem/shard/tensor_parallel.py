"""Tensor parallelism planned from the graph, carried out by ``torch.distributed``.

``plan(model, *example_inputs, world_size=N)`` traces the model to the frozen ATen graph fxmem
works on (:func:`fxmem.capture.capture_inference`; through ``torch.export`` first for models that
branch on tensor values, like transformers' mask code), finds its linear layers (``aten.t`` of a
weight feeding ``mm``/``addmm``) and embeddings, and pairs them the way Megatron-LM does — without
being told module names:

* a *row-parallel* layer R (weight ``Shard(1)``) is paired with the *column-parallel* layers G
  (weights ``Shard(0)``) that produce its input through non-linear code: MLP up/gate → down,
  attention q/k/v → o. DTensor's sharding propagator (the rules DTensor itself runs) is asked for
  the placement of every node in between; the pair is kept only if no collective is needed
  inside it, so attention is split by whole heads (a ``view`` to ``[B, T, heads, head_dim]`` keeps
  ``Shard`` on the heads dimension only if the world size divides the heads). Members of G whose
  view cannot be split because they have a single head (grouped-query k/v with one kv head) are
  computed whole on every rank and the rest is split (``ReplicatedParallel``); with 1 < kv heads <
  ranks the model is traced again with one virtual kv head per rank (``VirtualHeadsParallel``:
  k/v weights whole, each rank computing the kv head its q heads use), or, where that does not
  hold, the pair is left replicated and the reason is recorded. GPT-2's ``Conv1D`` (weight
  ``[in, out]``) is paired like ``nn.Linear``; its fused ``c_attn`` is split by blocks
  (``_StridedShard``), see :mod:`fxmem.shard.styles`.
* embeddings and a LM head are split over the vocabulary where it pays: when the parameter bytes
  saved per rank are at least the activation bytes the extra collective needs per rank.

The plan prints as a table (module, placement, per-rank parameter bytes, collectives per forward
and backward) and exports the equivalent ``parallelize_module`` plan (:meth:`ShardPlan.parallelize_plan`).
``apply(model, plan, mesh)`` carries it out with ``parallelize_module``; see ``docs/shard.md`` for
how views of local heads are kept right without touching the model's attributes.
"""

from __future__ import annotations

import contextlib
import functools
import operator
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from fxmem import dtensor_rules
from fxmem.analysis.placement import propagate_placements
from fxmem.analysis.sizes import node_bytes, tensor_bytes
from fxmem.capture import capture_inference

aten = torch.ops.aten
_VIEWS = {aten.view.default, aten._unsafe_view.default, aten.reshape.default}
# Ops whose args hold a shape: a region that has them needs global (DTensor) shapes.
_SHAPE_OPS = _VIEWS | {aten.expand.default, aten.split.Tensor, aten.split_with_sizes.default,
                       aten.slice.Tensor, aten.narrow.default}


class ShardPlanError(ValueError):
    """The plan cannot be carried out as asked (wrong mesh size, model changed since planning)."""


@dataclass
class Linear:
    """A linear layer as it appears in the graph."""

    module: str
    weight: fx.Node
    bias: fx.Node | None
    x: fx.Node          # its input (before the 3-D → 2-D view)
    mm: fx.Node
    out: fx.Node        # its output (after the 2-D → 3-D view)
    conv1d: bool = False  # GPT-2's Conv1D: weight [in, out] (nn.Linear: [out, in])
    fused: int = 1        # output split into this many equal blocks right after (GPT-2 c_attn: q | k | v)
    # k/v of grouped-query attention with 1 < kv heads < ranks, traced with one virtual kv head
    # per rank: (kv heads, head_dim); ``weight``/``bias`` are then the virtual (repeated) tensors
    virtual: tuple[int, int] | None = None

    @property
    def out_dim(self) -> int:
        """The weight dim of the output features (column-parallel split)."""
        return 1 if self.conv1d else 0

    @property
    def in_dim(self) -> int:
        """The weight dim of the input features (row-parallel split)."""
        return 0 if self.conv1d else 1

    def split_outputs(self) -> list[fx.Node]:
        """The ``getitem`` nodes of the fused output's split (empty when not fused)."""
        if self.fused == 1:
            return []
        (split,) = self.out.users
        return sorted(split.users, key=lambda n: n.args[1])


@dataclass
class Row:
    """One row of the plan's table: a module and what happens to it."""

    module: str
    style: str            # colwise | rowwise | replicated | vocab_embedding | vocab_head | replicate
    role: str
    placement: str
    param_bytes: int
    per_rank_bytes: int
    forward: list[str] = field(default_factory=list)
    backward: list[str] = field(default_factory=list)
    note: str = ""


@dataclass
class Group:
    """A Megatron pair: column-parallel layers feeding one row-parallel layer."""

    colwise: list[str]
    rowwise: str
    parent: str              # the innermost module holding all of them
    global_views: bool       # the code between them reshapes: keep DTensor outputs (views stay global)
    # where ``shared_module`` receives the column-parallel layers' shared input: ("arg", i) or
    # ("kwarg", name); None when no module does (or there is one column-parallel layer)
    shared_input: tuple[str, Any] | None = None
    # layers of the group computed whole on every rank (k/v of grouped-query attention with a
    # single kv head): Replicate() weights, ReplicatedParallel
    replicated: list[str] = field(default_factory=list)
    conv1d: list[str] = field(default_factory=list)          # GPT-2 Conv1D layers of the group
    fused: dict[str, int] = field(default_factory=dict)      # fused column-parallel layer → blocks (c_attn: 3)
    # (module, attribute, whole value, per-rank value) that apply sets: the fused split size
    local_attrs: list[tuple[str, str, int, int]] = field(default_factory=list)
    # k/v with 1 < kv heads < ranks: module → (kv heads, head_dim); VirtualHeadsParallel
    virtual: dict[str, tuple[int, int]] = field(default_factory=dict)
    replicate_bias: bool = False  # fused layers keep their bias whole on every rank (under FSDP2)
    # how many positional arguments ``parent`` was called with when traced: PyTorch's
    # ``PrepareModuleInput`` wants one layout per positional input (None: left as is), so a shared
    # input at ``("arg", 0)`` of a parent also given a mask positionally (HF BERT's
    # ``BertAttention(hidden_states, attention_mask)``) needs two
    positional_args: int = 0
    # the module made to take the shared input as one Replicate() DTensor: the innermost module,
    # from the column-parallel layers' own parent up to ``parent``, that receives it — not the
    # group's parent where a smaller module will do: HF BERT's ``BertAttention`` (the group's
    # parent) also adds its input to the row-parallel output (the residual, in ``BertSelfOutput``);
    # a DTensor there meets that plain output, and its gradient (a DTensor) reaches
    # ``RowwiseParallel``'s ``to_local``, which fails in backward. ``BertSelfAttention`` (q/k/v's
    # parent) receives the same input and uses it only for q/k/v.
    shared_module: str = ""


@dataclass
class ShardPlan:
    """A tensor-parallel plan: per-module styles, node placements, bytes and collectives."""

    world_size: int
    rows: list[Row]
    groups: list[Group]
    vocab: dict[str, str]                    # module -> "embedding" | "head"
    fallbacks: list[tuple[str, str]]         # (module(s), reason) left replicated
    tied: list[list[str]]                    # parameter names that share one tensor
    placements: dict[str, str]               # graph node -> placement
    graph: fx.GraphModule
    param_bytes: int
    per_rank_param_bytes: int
    forward_collectives: dict[str, int]
    backward_collectives: dict[str, int]
    propagated_collectives: dict[str, int]   # what DTensor's propagator found on the forward graph
    # every parameter name (tied ones under each name) → the dim it is split on, None if replicated
    param_shard_dims: dict[str, int | None] = field(default_factory=dict)

    @property
    def needs_dtensor_regions(self) -> bool:
        return any(g.global_views for g in self.groups)

    def parallelize_plan(self) -> dict[str, Any]:
        """The equivalent ``parallelize_module`` plan: module name → ``ParallelStyle``."""
        from torch.distributed.tensor import Replicate, Shard
        from torch.distributed.tensor.parallel import ColwiseParallel, PrepareModuleInput, RowwiseParallel

        from fxmem.shard.styles import Conv1DColwiseParallel, Conv1DRowwiseParallel, ReplicatedParallel, VirtualHeadsParallel

        styles: dict[str, Any] = {}
        for g in self.groups:
            if g.shared_input is not None:
                # one Replicate DTensor for all of q/k/v (gate/up): their input gradients add up
                # as Partial DTensors and are all-reduced once, not once per layer
                kind, where = g.shared_input
                if kind == "arg":
                    count = max(g.positional_args, where + 1)
                    layouts = tuple(Replicate() if i == where else None for i in range(count))
                    styles[g.shared_module] = PrepareModuleInput(input_layouts=layouts, desired_input_layouts=layouts,
                                                                 use_local_output=False)
                else:
                    styles[g.shared_module] = PrepareModuleInput(input_kwarg_layouts={where: Replicate()},
                                                                 desired_input_kwarg_layouts={where: Replicate()},
                                                                 use_local_output=False)
            for name in g.colwise:
                if name in g.conv1d:
                    styles[name] = Conv1DColwiseParallel(use_local_output=not g.global_views, fused=g.fused.get(name, 1),
                                                         replicate_bias=g.replicate_bias and name in g.fused)
                else:
                    styles[name] = ColwiseParallel(use_local_output=not g.global_views)
            for name in g.replicated:
                styles[name] = ReplicatedParallel(use_local_output=not g.global_views)
            for name, (kv, head_dim) in g.virtual.items():
                styles[name] = VirtualHeadsParallel(kv_heads=kv, head_dim=head_dim, use_local_output=not g.global_views)
            row_style = Conv1DRowwiseParallel if g.rowwise in g.conv1d else RowwiseParallel
            styles[g.rowwise] = row_style(input_layouts=Shard(-1), output_layouts=Replicate())
        for name, kind in self.vocab.items():
            if kind == "embedding":
                styles[name] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate())
            else:
                styles[name] = ColwiseParallel(input_layouts=Replicate(), output_layouts=Replicate())
        return styles

    def table(self) -> str:
        head = ("module", "style", "placement", "bytes", "bytes/rank", "forward", "backward")
        lines = [head]
        for r in self.rows:
            lines.append((r.module, r.style, r.placement, str(r.param_bytes), str(r.per_rank_bytes),
                          ", ".join(r.forward) or "-", ", ".join(r.backward) or "-"))
        widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
        out = [f"fxmem.shard plan for world_size={self.world_size}"]
        for i, line in enumerate(lines):
            out.append("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip())
            if i == 0:
                out.append("  ".join("-" * w for w in widths))
        out.append(f"parameters: {self.param_bytes} B in all, {self.per_rank_param_bytes} B per rank "
                   f"({self.per_rank_param_bytes / max(self.param_bytes, 1):.3f} of the whole)")
        out.append(f"collectives per forward: {_fmt(self.forward_collectives)}; per backward: {_fmt(self.backward_collectives)}")
        for what, reason in self.fallbacks:
            out.append(f"replicated: {what}: {reason}")
        return "\n".join(out)

    def __str__(self) -> str:
        return self.table()


def _fmt(c: dict) -> str:
    return ", ".join(f"{v} {k}" for k, v in sorted(c.items())) or "none"


# --------------------------------------------------------------------------------------------
# Finding layers in the graph
# --------------------------------------------------------------------------------------------


def _aliases(model: nn.Module) -> dict[int, list[str]]:
    """id(parameter) → every name it has in the model (tied parameters have several)."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return names


def _owner(model: nn.Module, param_names: list[str], kind: type) -> str | None:
    """The module of type ``kind`` that owns one of these parameter names as its ``weight``."""
    for name in param_names:
        module_name, _, leaf = name.rpartition(".")
        if leaf != "weight":
            continue
        module = model.get_submodule(module_name) if module_name else model
        if isinstance(module, kind):
            return module_name
    return None


def _param_names(gm: fx.GraphModule, node: fx.Node, captured_originals: dict, aliases: dict) -> list[str]:
    fqn = node.meta.get("fxmem_fqn")
    if fqn is None:
        return []
    tensor = captured_originals.get(fqn)
    return aliases.get(id(tensor), [fqn]) if tensor is not None else [fqn]


def find_linears(gm: fx.GraphModule, model: nn.Module, originals: dict) -> list[Linear]:
    """Every ``nn.Linear`` call in the graph: ``[view →] (add)mm(x, t(W)) [→ view]``, and every
    GPT-2 ``Conv1D`` call: ``view → addmm(b, x, W) → view`` (the weight is ``[in, out]``, not transposed)."""
    from fxmem.shard.styles import is_conv1d

    aliases = _aliases(model)
    found = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in (aten.mm.default, aten.addmm.default):
            continue
        x, wt = (node.args[0], node.args[1]) if node.target is aten.mm.default else (node.args[1], node.args[2])
        conv1d = False
        if isinstance(wt, fx.Node) and wt.target is aten.t.default and wt.args[0].op == "get_attr":
            weight = wt.args[0]
            module = _owner(model, _param_names(gm, weight, originals, aliases), nn.Linear)
        elif isinstance(wt, fx.Node) and wt.op == "get_attr":
            weight = wt
            module = _owner(model, _param_names(gm, weight, originals, aliases), nn.Module)
            conv1d = module is not None and is_conv1d(model.get_submodule(module))
            module = module if conv1d else None
        else:
            continue
        if module is None:
            continue
        bias = node.args[0] if node.target is aten.addmm.default and node.args[0].op == "get_attr" else None
        if isinstance(x, fx.Node) and x.target in _VIEWS:
            x = x.args[0]
        out = node
        users = list(node.users)
        if len(users) == 1 and users[0].target in _VIEWS:
            out = users[0]
        found.append(Linear(module, weight, bias, x, node, out, conv1d, _fused_blocks(out)))
    return found


def _fused_blocks(out: fx.Node) -> int:
    """k when the layer's output is split right away into k > 1 equal blocks on its last dim, else 1."""
    users = list(out.users)
    val = out.meta.get("val")
    if len(users) != 1 or users[0].target is not aten.split.Tensor or not isinstance(val, torch.Tensor):
        return 1
    split = users[0]
    size, dim = split.args[1], (split.args[2] if len(split.args) > 2 else 0)
    if not isinstance(size, int) or dim not in (-1, val.dim() - 1) or val.shape[-1] % size:
        return 1
    if not all(u.target is operator.getitem for u in split.users):
        return 1
    return val.shape[-1] // size


def _not_linear(gm: fx.GraphModule, model: nn.Module, linears: list[Linear]) -> list[tuple[str, str]]:
    """Modules whose weights feed a matmul but that ``parallelize_module`` cannot split."""
    seen = {lin.weight for lin in linears}
    out = {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in (aten.mm.default, aten.addmm.default):
            for w in node.all_input_nodes:
                src = w.args[0] if w.target is aten.t.default and w.args else w
                fqn = src.meta.get("fxmem_fqn") if isinstance(src, fx.Node) and src.op == "get_attr" else None
                if fqn is None or src in seen or not fqn.endswith(".weight"):
                    continue
                module_name = fqn.rpartition(".")[0]
                module = model.get_submodule(module_name)
                if not isinstance(module, nn.Linear):
                    out[module_name] = (f"{type(module).__name__} is not nn.Linear: ColwiseParallel / "
                                        "RowwiseParallel split only nn.Linear and nn.Embedding")
    return list(out.items())


def find_embeddings(gm: fx.GraphModule, model: nn.Module, originals: dict) -> dict[str, fx.Node]:
    """``nn.Embedding`` module name → its ``aten.embedding`` node."""
    aliases = _aliases(model)
    found = {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is aten.embedding.default and node.args[0].op == "get_attr":
            module = _owner(model, _param_names(gm, node.args[0], originals, aliases), nn.Embedding)
            if module is not None:
                found[module] = node
    return found


def _ancestors_until(start: fx.Node, stops: set[fx.Node]) -> set[fx.Node]:
    """Nodes ``start`` depends on, not walking past ``stops`` (which are included)."""
    seen: set[fx.Node] = set()
    todo = [start]
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if n in stops:
            continue
        todo.extend(n.all_input_nodes)
    return seen


def _descendants(starts: list[fx.Node]) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    todo = list(starts)
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        todo.extend(n.users)
    return seen


def _parent(names: list[str]) -> str:
    """The innermost module that holds all of ``names``."""
    common: list[str] = []
    for level in zip(*(n.split(".")[:-1] for n in names)):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return ".".join(common)


# --------------------------------------------------------------------------------------------
# Planning
# --------------------------------------------------------------------------------------------


def plan(model: nn.Module, *args: Any, kwargs: dict | None = None, world_size: int, vocab: str | bool = "auto",
         state_factor: float = 1.0, split_fused: str | None = None,
         _virtual: VirtualHeads | None = None) -> ShardPlan:
    """Plan tensor parallelism for ``model`` over ``world_size`` ranks (no process group needed).

    ``vocab``: ``"auto"`` splits embeddings / the LM head over the vocabulary where the parameter
    bytes saved per rank exceed the activation bytes the split adds per rank (its collective's
    share, and for a head the local logits beside the gathered ones); ``True`` always, ``False``
    never, or a list of the embedding / head module names to split.

    ``state_factor``: bytes of model state per rank each parameter byte saved by a split stands
    for — 1 for the weights alone; the mesh plan passes ``4 / dp`` (weights, gradients and two AdamW
    moments, further sharded over ``dp`` by FSDP2).

    ``split_fused``: ``None`` splits fused projections (GPT-2's ``c_attn``) by blocks; a string
    leaves them replicated with that string as the reason; ``"replicate_bias"`` splits the weight by
    blocks and keeps the bias whole on every rank (the mesh plan does, under FSDP2).

    ``_virtual`` (internal, :class:`VirtualHeads`): k/v projections to trace with one virtual kv
    head per rank, and attributes to set meanwhile — the second planning pass for grouped-query
    attention with 1 < kv heads < ranks (see :func:`_plan_virtual_heads`).
    """
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"fxmem.shard.plan: world_size must be a positive int, got {world_size!r}")
    if isinstance(vocab, (list, tuple, set, frozenset)):
        vocab = frozenset(vocab)
    elif vocab not in ("auto", True, False):
        raise ValueError(f"fxmem.shard.plan: vocab={vocab!r}; accepted: 'auto' | True | False | a list of module names")
    from torch.distributed.tensor import Replicate, Shard

    dtensor_rules.register()
    calls = _CallRecorder(model)
    try:
        with _virtual_forwards(model, _virtual, world_size):
            captured = _capture(model, args, kwargs, on_retry=calls.calls.clear)
    finally:
        calls.remove()
    gm = captured.gm
    linears = find_linears(gm, model, captured.originals) + _virtual_linears(gm, _virtual.layers if _virtual else {})
    fallbacks: list[tuple[str, str]] = _not_linear(gm, model, linears)
    by_out = {lin.out: lin for lin in linears}
    by_module: dict[str, list[Linear]] = {}
    for lin in linears:
        by_module.setdefault(lin.module, []).append(lin)

    # 1. candidate pairs: the linears that feed a linear's input through non-linear code.
    stops = set(by_out)
    candidates: list[tuple[list[Linear], Linear]] = []
    taken: set[str] = set()
    for r in linears:
        if r.module in taken or len(by_module[r.module]) > 1:
            continue
        feeding = [by_out[n] for n in _ancestors_until(r.x, stops) if n in by_out]
        feeding = [f for f in feeding if f.module != r.module]
        if not feeding or r.x in by_out:
            continue  # a linear right after a linear (nothing in between) or nothing to pair with
        if any(f.module in taken or len(by_module[f.module]) > 1 for f in feeding):
            continue
        inputs = {f.x for f in feeding}
        if len(inputs) != 1:
            fallbacks.append((", ".join(sorted(f.module for f in feeding)) + " → " + r.module,
                              "the column-parallel candidates read different inputs"))
            continue
        candidates.append((sorted(feeding, key=lambda f: f.module), r))
        taken.update(f.module for f in feeding)
        taken.add(r.module)

    # 2. keep a pair only if DTensor's rules need no collective inside it.
    def divisible(lin: Linear, dim: int) -> bool:  # dim 0: output features, 1: input features
        d = lin.out_dim if dim == 0 else lin.in_dim
        return lin.weight.meta["val"].shape[d] // (lin.fused if dim == 0 else 1) % world_size == 0

    pairs: list[tuple[list[Linear], Linear]] = []
    replicated_kv: dict[str, list[Linear]] = {}  # row-parallel module → members computed whole on every rank
    virtual_kv = VirtualHeads({}, [])  # k/v layers to plan again with one virtual kv head per rank
    for feeding, r in candidates:
        if not divisible(r, 1):
            fallbacks.append((r.module, f"input features {r.weight.meta['val'].shape[r.in_dim]} not divisible by {world_size}"))
            continue
        members = [f for f in feeding if divisible(f, 0)]
        for f in feeding:
            if f not in members:
                fallbacks.append((f.module, f"output features {f.weight.meta['val'].shape[f.out_dim]} not divisible by {world_size}"))
        if split_fused in (None, "replicate_bias") and _torch_before(2, 13):
            # run on the 2.11 venv: DTensor's addmm with the _StridedShard(1, 3) weight raises
            # "ValueError: use_strided_shard_as_shard_order is True, but placements:
            # (_StridedShard(dim=1, sf=3),) is unable to be interpreted into a corresponding shard_order"
            split_fused = (f"fused projection (q | k | v) not split: DTensor of torch {torch.__version__} cannot "
                           "redistribute its _StridedShard blocks (ValueError: ... unable to be interpreted into a "
                           "corresponding shard_order); split with torch 2.13")
        if split_fused not in (None, "replicate_bias"):
            for f in [f for f in members if f.fused > 1]:
                fallbacks.append((f.module, split_fused))
                members.remove(f)
        if members:
            kept, replicated, reason, virtual = _check_pair(gm, members, r, world_size, Shard, Replicate,
                                                            virtual_ok=_virtual is None)
            if kept:
                pairs.append((kept, r))
                if replicated:
                    replicated_kv[r.module] = replicated
            else:
                fallbacks.append((", ".join(m.module for m in members) + " → " + r.module, reason))
                if virtual:
                    virtual_kv.add(model, virtual, members, r, world_size)

    # 3. vocabulary-parallel embeddings / LM head where it pays.
    embeddings = find_embeddings(gm, model, captured.originals)
    paired = {m.module for g, r in pairs for m in g} | {r.module for _, r in pairs}
    vocab_choice: dict[str, str] = {}
    mms = {lin.mm for lin in linears}
    # an LM head: a linear with no linear after it (its output goes to the outputs or the loss)
    heads = [lin for lin in linears if lin.module not in paired and len(by_module[lin.module]) == 1
             and not (mms - {lin.mm}) & _descendants([lin.out]) and divisible(lin, 0) and not lin.conv1d]
    # (module, kind, weight node, cost per rank): the activation bytes a split adds per rank —
    # the bytes its collective moves per rank, plus, for a head, the local logits [.., V/N] that
    # live beside the gathered ones
    vocab_candidates: list[tuple[str, str, fx.Node, int]] = []
    for name, node in embeddings.items():
        if node.args[0].meta["val"].shape[0] % world_size == 0:
            vocab_candidates.append((name, "embedding", node.args[0], node_bytes(node) // world_size))
    for lin in heads:
        vocab_candidates.append((lin.module, "head", lin.weight, 2 * node_bytes(lin.out) // world_size))
    # tied weights (one tensor read by an embedding and a head) are split together or not at all
    def tensor_key(w: fx.Node) -> int:
        t = captured.originals.get(w.meta.get("fxmem_fqn"))
        return id(t) if t is not None else id(w)

    reads: dict[int, list[fx.Node]] = {}
    for w in gm.graph.find_nodes(op="get_attr"):
        reads.setdefault(tensor_key(w), []).append(w)
    by_weight: dict[int, list[tuple[str, str, int]]] = {}
    weight_nodes: dict[int, fx.Node] = {}
    for name, kind, w, extra in vocab_candidates:
        by_weight.setdefault(tensor_key(w), []).append((name, kind, extra))
        weight_nodes[tensor_key(w)] = w
    candidate_ops = {embeddings[n] for n, k, _, _ in vocab_candidates if k == "embedding"} | \
        {lin.mm.args[-1] for lin in heads}  # the embedding ops and the heads' aten.t
    for key, users in by_weight.items():
        w = weight_nodes[key]
        names = ", ".join(n for n, _, _ in users)
        if any(u not in candidate_ops for r in reads[key] for u in r.users):
            fallbacks.append((names, "the weight is also read by other code (a tie to a layer that is not split)"))
            continue
        saved = int((node_bytes(w) - node_bytes(w) // world_size) * state_factor)
        extra = sum(e for _, _, e in users)
        chosen = vocab is True or (isinstance(vocab, frozenset) and any(n in vocab for n, _, _ in users))
        if chosen or (vocab == "auto" and saved > extra and world_size > 1):
            for name, kind, _ in users:
                vocab_choice[name] = kind
        elif vocab == "auto":
            fallbacks.append((names, f"vocabulary split does not pay: saves {saved} B/rank, needs {extra} B/rank of activations"))

    # 4. propagate the whole plan once, annotate every node.
    seeds = _seeds(pairs, Shard, Replicate)
    force = _force(pairs, Shard, Replicate)
    for name, kind in vocab_choice.items():
        if kind == "embedding":
            for w in reads[tensor_key(embeddings[name].args[0])]:
                seeds[w.name] = Shard(0)
            force[embeddings[name].name] = Replicate()
        else:
            lin = by_module[name][0]
            for w in reads[tensor_key(lin.weight)]:
                seeds[w.name] = Shard(0)
            force[lin.out.name] = Replicate()
    prop = propagate_placements(gm, seeds, world_size, force=force)
    prop.annotate(gm)  # the plan's graph shows the final placements (plan.graph)
    result = _build(model, gm, captured, world_size, pairs, vocab_choice, embeddings, by_module, fallbacks, prop, calls,
                    replicated_kv, _virtual, replicate_fused_bias=split_fused == "replicate_bias")
    if virtual_kv.layers:
        return _plan_virtual_heads(result, virtual_kv, model, args, kwargs, world_size=world_size, vocab=vocab,
                                   state_factor=state_factor, split_fused=split_fused)
    return result


@dataclass
class VirtualHeads:
    """Grouped-query k/v layers planned with one virtual kv head per rank, and the attention attributes
    their code repeats k by (set to the per-rank value while tracing, and by ``apply``)."""

    layers: dict[str, tuple[int, int]]                 # k/v module → (kv heads, head_dim)
    attrs: list[tuple[str, str, int, int]]             # (attention module, attribute, whole, virtual value)

    def add(self, model: nn.Module, virtual: dict[str, tuple[int, int]], members: list[Linear], r: Linear,
            world_size: int) -> None:
        (kv, head_dim), = set(virtual.values())
        queries = [m for m in members if m.module not in virtual]
        heads = sum(m.weight.meta["val"].shape[m.out_dim] for m in queries) // head_dim if len(queries) == 1 else 0
        if not heads or heads % world_size:
            return  # q heads must split over the ranks
        self.layers.update(virtual)
        parent = _parent([m.module for m in members] + [r.module])
        module = model.get_submodule(parent)
        ints = {k: v for k, v in vars(module).items() if isinstance(v, int) and not isinstance(v, bool)}
        # HF: num_key_value_groups = H / kv (repeat_kv's factor) → H / N; the built-in GPT:
        # n_kv_head = kv (its views of k) → N. Which attribute is which is verified by the trace
        # and by comparing the virtual model's outputs with the model's (_plan_virtual_heads).
        groups = [k for k, v in ints.items() if v == heads // kv and ("group" in k or "rep" in k)]
        kv_heads = [k for k, v in ints.items() if v == kv and ("kv" in k or "key_value" in k) and "head" in k
                    and "group" not in k]
        if len(groups) == 1:
            self.attrs.append((parent, groups[0], heads // kv, heads // world_size))
        if len(kv_heads) == 1:
            self.attrs.append((parent, kv_heads[0], kv, world_size))


def _plan_virtual_heads(first: ShardPlan, virtual: VirtualHeads, model, args, kwargs, **options) -> ShardPlan:
    """Plan again with the k/v projections of ``virtual`` traced as one *virtual* kv head per rank.

    Grouped-query attention with 1 < kv heads < ranks: rank r's q heads use real kv head
    ``r // (N / kv)``, which no split of k's ``kv`` heads gives it. Traced with the weight
    repeated per head (``repeat_interleave(W, N / kv)`` over heads: N virtual heads, the global
    value :class:`fxmem.shard.styles.VirtualHeadsParallel` computes) the attention code runs on
    N kv heads, which split by heads like any attention — DTensor's rules check it as for every
    other pair, on the model's own code, with the attention's repeat attribute (HF's
    ``num_key_value_groups``, the built-in GPT's ``n_kv_head``) at its per-rank value. The virtual
    weight is placed ``Shard(0)``, a local slice of the ``Replicate()`` weight. Accepted only if
    that trace and its check pass and the model's outputs on the example inputs are unchanged
    (:func:`_virtual_output_error`); otherwise ``first`` (attention replicated) stands, with why.
    """
    names = ", ".join(virtual.layers)
    try:
        second = plan(model, *args, kwargs=kwargs, _virtual=virtual, **options)
        error = _virtual_output_error(model, virtual, args, kwargs, options["world_size"])
    except Exception as exc:  # noqa: BLE001 - the first plan stands, with the reason
        first.fallbacks.append((names, f"virtual kv heads: the model does not run with its k/v repeated per rank "
                                       f"({type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]})"))
        return first
    if error is not None:
        first.fallbacks.append((names, f"virtual kv heads: the model's outputs change with its k/v repeated per rank "
                                       f"(max error {error:.2e}; attributes set: {virtual.attrs})"))
        return first
    done = {name for g in second.groups for name in g.virtual}
    if set(virtual.layers) <= done:
        return second
    first.fallbacks.extend((what, "virtual kv heads: " + why) for what, why in second.fallbacks
                           if any(name in what for name in virtual.layers))
    return first


def _virtual_output_error(model, virtual: VirtualHeads, args, kwargs, world_size: int) -> float | None:
    """None when the model computes the same outputs with one virtual kv head per rank (the
    repeated weights and the attributes set) as without, on the example inputs; else the error.
    The repetition is exact in arithmetic; kernels may order sums differently (1e-5 relative)."""
    from torch.utils._pytree import tree_leaves

    modes = {m: m.training for m in model.modules()}
    model.eval()  # dropout would make two runs differ for its own reasons
    try:
        with torch.no_grad():
            whole = [t for t in tree_leaves(model(*args, **(kwargs or {}))) if isinstance(t, torch.Tensor)]
            with _virtual_forwards(model, virtual, world_size):
                virt = [t for t in tree_leaves(model(*args, **(kwargs or {}))) if isinstance(t, torch.Tensor)]
    finally:
        for m, mode in modes.items():
            m.training = mode
    if len(whole) != len(virt) or any(a.shape != b.shape for a, b in zip(whole, virt)):
        return float("inf")
    errors = [float((a.double() - b.double()).abs().max()) if a.numel() else 0.0 for a, b in zip(whole, virt)]
    ok = all(torch.allclose(a.double(), b.double(), rtol=1e-5, atol=1e-6) for a, b in zip(whole, virt))
    return None if ok else max(errors)


def _check_pair(gm, members: list[Linear], r: Linear, world_size: int, Shard, Replicate, *, virtual_ok: bool = False):
    """``(kept, replicated, reason, virtual)``: the members split column-wise, those computed whole,
    why not, and (pair refused) the k/v members worth planning again with virtual kv heads.

    The pair is propagated with DTensor's rules; it is kept when no collective is needed between
    the column-parallel outputs and the row-parallel input. When one is needed only because some
    members cannot stay sharded — grouped-query k/v with a single kv head, which no split of the
    heads can keep — those members are computed whole on every rank (``Replicate()`` weights,
    :class:`fxmem.shard.styles.ReplicatedParallel`) and the rest (q) are checked again: each rank
    then attends with its own q heads to the one kv head. With more kv heads than one but fewer
    than ranks, the pair is not split as traced: SDPA's ``enable_gqa`` runs the kernel on the kv
    heads themselves, and rank r's q heads would need kv heads that no DTensor placement of k gives
    it (``docs/shard.md``, "GQA"). When the kv heads divide the ranks, those k/v members are
    returned as ``virtual`` (module → (kv heads, head_dim)) and ``plan`` tries again with one
    virtual kv head per rank (:func:`_plan_virtual_heads`).
    """
    kept, replicated = list(members), []
    while True:
        seeds = _seeds([(kept, r)], Shard, Replicate)
        prop = propagate_placements(gm, seeds, world_size, force=_force([(kept, r)], Shard, Replicate))
        region = _descendants([m.out for m in members]) & _ancestors_until(r.x, set())
        names = {n.name for n in region} | {r.mm.name}
        # the all-reduce of R's own output (forced, as RowwiseParallel does) is the one expected
        inside = [x for x in prop.redistributions if x.node in names and not (x.node == r.out.name and x.arg == "output")]
        if not inside:
            return kept, replicated, "", {}
        blamed = _blame(inside, kept, gm)
        if not blamed:
            return [], [], f"DTensor needs {inside[0].kind} at {inside[0].node} ({inside[0].src} → {inside[0].dst})", {}
        heads = _heads(blamed)
        if heads and heads % world_size == 0 and inside[0].kind == "all_gather" and _torch_before(2, 12):
            # whole heads per rank, yet DTensor refuses: torch 2.11's view rules do not keep Shard
            # through the views of the heads dim (2.13's do) — say so, naming the version
            return [], [], (f"DTensor of torch {torch.__version__} needs {inside[0].kind} at {inside[0].node} although "
                            f"{heads} heads divide {world_size} ranks: its view rules do not keep Shard through the "
                            "views of the heads dim (attention is split with torch 2.13)"), {}
        if heads != 1 or len(blamed) == len(kept):
            # grouped-query k/v with 1 < kv heads < ranks (or nothing left to split): not as traced;
            # where the kv heads divide the ranks, plan tries one virtual kv head per rank
            virtual = {}
            if (virtual_ok and heads and 1 < heads < world_size and world_size % heads == 0
                    and len(blamed) < len(kept) and not replicated
                    and all(not m.conv1d and m.fused == 1 for m in blamed)):
                # k and v both (the first collective blames the one that reaches it first)
                shape = blamed[0].weight.meta["val"].shape
                same = [m for m in kept if m.weight.meta["val"].shape == shape and _heads([m]) == heads]
                if len(same) < len(kept):
                    virtual = {m.module: (heads, shape[0] // heads) for m in same}
            return [], [], (f"{', '.join(m.module for m in blamed)}: output cannot stay sharded on {world_size} ranks "
                            f"(DTensor needs {inside[0].kind} at {inside[0].node}: fewer heads than ranks"
                            + (f"; {heads} kv heads: only a single shared kv head is split around" if heads else "")
                            + ")"), virtual
        replicated += blamed
        kept = [m for m in kept if m not in blamed]


def _torch_before(major: int, minor: int) -> bool:
    parts = torch.__version__.split("+")[0].split(".")
    return (int(parts[0]), int(parts[1])) < (major, minor)


def _split_attribute(module: nn.Module, block: int) -> str:
    """The int attribute of ``module`` its code splits a fused output by (GPT-2: ``split_size``)."""
    found = [k for k, v in vars(module).items() if isinstance(v, int) and not isinstance(v, bool) and v == block]
    named = [k for k in found if "split" in k]
    if len(named) == 1 or len(found) == 1:
        return (named or found)[0]
    raise ShardPlanError(f"fxmem.shard.plan: {type(module).__name__} splits a fused projection into blocks of "
                         f"{block}, but no single int attribute holds that size (found {found}); "
                         "plan with the fused layer replicated (it is not split)")


def _heads(members: list[Linear]) -> int | None:
    """The heads count of these layers' outputs: ``H`` of the first ``view(B, T, H, head_dim)`` after each (one value for all)."""
    found = set()
    for m in members:
        frontier, seen, heads = [m.out], set(), None
        while frontier and heads is None:
            node = frontier.pop(0)
            for user in node.users:
                if user in seen:
                    continue
                seen.add(user)
                val = user.meta.get("val")
                if user.target in _VIEWS and isinstance(val, torch.Tensor) and val.dim() >= 4:
                    heads = int(val.shape[-2])
                    break
                frontier.append(user)
        found.add(heads)
    return found.pop() if len(found) == 1 else None


class _CallRecorder:
    """Records, while the model is traced, which tensors each module was called with.

    Used to find where a column-parallel group's parent module receives the group's shared input
    (a positional index or a keyword), so it can be made a DTensor once for the whole group.
    """

    def __init__(self, model: nn.Module):
        self.calls: dict[str, list[tuple[tuple, dict]]] = {}
        self.handles = []
        for name, module in model.named_modules():
            self.handles.append(module.register_forward_pre_hook(self._hook(name), with_kwargs=True))

    def _hook(self, name: str):
        def hook(module, args, kwargs):
            self.calls.setdefault(name, []).append((tuple(id(a) for a in args), {k: id(v) for k, v in kwargs.items()}))
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def positional_args(self, name: str) -> int:
        """How many positional arguments module ``name`` got in its last traced call (0: not called)."""
        calls = self.calls.get(name, [])
        return len(calls[-1][0]) if calls else 0

    def shared_input_within(self, inner: str, outer: str, members: list[str]) -> tuple[str, tuple[str, Any] | None]:
        """The innermost module from ``inner`` up to ``outer`` (an ancestor of it, or itself) that
        receives ``members``' shared input, and where (:meth:`shared_input`); ``(outer, None)``
        when none does."""
        name = inner
        while True:
            where = self.shared_input(name, members)
            if where is not None or name == outer or not name:
                return (name, where) if where is not None else (outer, None)
            name = name.rpartition(".")[0]

    def shared_input(self, parent: str, members: list[str]) -> tuple[str, Any] | None:
        # the tracer may run the model more than once (AOTAutograd does, to collect metadata):
        # a module must be called as often as its parent, and the last run decides
        parent_calls = self.calls.get(parent, [])
        member_calls = [self.calls.get(m, []) for m in members]
        if (len(members) < 2 or not parent_calls or any(len(c) != len(parent_calls) or not c[-1][0] for c in member_calls)
                or len({len(c) for c in self.calls.values() if c}) != 1):
            return None
        ids = {c[-1][0][0] for c in member_calls}
        if len(ids) != 1:
            return None
        (x,) = ids
        args, kwargs = parent_calls[-1]
        if x in args:
            return ("arg", args.index(x))
        for k, v in kwargs.items():
            if v == x:
                return ("kwarg", k)
        return None


def _between(members: list[Linear], r: Linear) -> set[fx.Node]:
    """The code strictly between the column-parallel outputs and the row-parallel input."""
    region = _descendants([m.out for m in members]) & _ancestors_until(r.x, set())
    return region - {m.out for m in members}


def _capture(model: nn.Module, args: tuple, kwargs: dict | None, on_retry=lambda: None):
    """fxmem's inference capture; through ``torch.export`` first when the model branches on data.

    ``capture_inference`` traces with ``make_fx``, which stops at Python branches on tensor values
    (transformers' mask helpers check whether a mask is all ones, or whether position ids are
    packed). ``torch.export`` (non-strict) resolves those branches the way ``torch.compile`` does;
    its module, which holds the model's own parameter tensors under the same names, is then
    traced to the same ATen IR.
    """
    try:
        return capture_inference(model, args, kwargs, decompositions={})
    except Exception as first:  # noqa: BLE001 - retried through torch.export below
        on_retry()  # module calls recorded by the failed trace are partial; export's are whole
        try:
            exported = torch.export.export(model, tuple(args), kwargs=dict(kwargs or {}), strict=False).module()
        except Exception:  # noqa: BLE001 - report the first failure, the one about the model
            raise first from None
        return capture_inference(exported, args, kwargs, decompositions={})


@contextlib.contextmanager
def _virtual_forwards(model: nn.Module, virtual: VirtualHeads | None, world_size: int):
    """While planning: the k/v layers of ``virtual`` compute one virtual kv head per rank.

    Their forward (an instance attribute, removed on exit) repeats each kv head's rows of the
    weight ``world_size / kv`` times — ``repeat_interleave`` over heads as a view, an expand and a
    reshape — so the model runs its attention on ``world_size`` kv heads; the attention's
    attributes that say how to repeat k (``virtual.attrs``) hold the per-rank values meanwhile,
    as ``apply`` sets them. Everything is restored on exit; no parameter is replaced.
    """
    patched, saved = [], []
    try:
        if virtual is not None:
            for name, (kv, head_dim) in virtual.layers.items():
                module = model.get_submodule(name)
                module.forward = functools.partial(_repeated_heads_forward, module, kv, head_dim, world_size // kv)
                patched.append(module)
            for parent, attr, _, value in virtual.attrs:
                module = model.get_submodule(parent)
                saved.append((module, attr, getattr(module, attr)))
                setattr(module, attr, value)
        yield
    finally:
        for module in patched:
            del module.forward
        for module, attr, value in saved:
            setattr(module, attr, value)


def _repeated_heads_forward(module: nn.Linear, kv: int, head_dim: int, repeat: int, x):
    w = module.weight.unflatten(0, (kv, 1, head_dim)).expand(kv, repeat, head_dim, module.in_features)
    b = None if module.bias is None else module.bias.unflatten(0, (kv, 1, head_dim)).expand(kv, repeat, head_dim)
    return torch.nn.functional.linear(x, w.reshape(kv * repeat * head_dim, module.in_features),
                                      None if b is None else b.reshape(kv * repeat * head_dim))


def _virtual_linears(gm: fx.GraphModule, virtual: dict[str, tuple[int, int]]) -> list[Linear]:
    """The k/v layers traced by :func:`_repeated_heads_forward`: ``t(reshape(expand(W))) → (add)mm``;
    their ``weight`` / ``bias`` are the repeated tensors (the reshape outputs)."""
    found = []
    for name, kv_dim in virtual.items():
        params = {n.meta.get("fxmem_fqn"): n for n in gm.graph.find_nodes(op="get_attr")}
        chain = params.get(f"{name}.weight")
        # the weight's own chain: view → expand → (clone →) reshape, each used once, then aten.t
        for _ in range(8):
            if chain is None or len(chain.users) != 1:
                chain = None
                break
            (user,) = chain.users
            if user.target is aten.t.default:
                break
            chain = user
        t = next(iter(chain.users)) if chain is not None else None
        mm = next((u for u in t.users if u.target in (aten.mm.default, aten.addmm.default)), None) if t else None
        if mm is None:
            raise ShardPlanError(f"fxmem.shard.plan: {name} traced with virtual kv heads is not (add)mm(x, t(W))")
        bias = mm.args[0] if mm.target is aten.addmm.default else None
        x = mm.args[0] if mm.target is aten.mm.default else mm.args[1]
        x = x.args[0] if isinstance(x, fx.Node) and x.target in _VIEWS else x
        users = list(mm.users)
        out = users[0] if len(users) == 1 and users[0].target in _VIEWS else mm
        found.append(Linear(name, chain, bias, x, mm, out, virtual=kv_dim))
    return found


def _seeds(pairs, Shard, Replicate) -> dict[str, Any]:
    seeds: dict[str, Any] = {}
    for members, r in pairs:
        for m in members:
            if m.fused > 1 or m.virtual:
                continue  # placed by _force (fused: DTensor's split would gather a split dim; virtual: not a parameter)
            seeds[m.weight.name] = Shard(m.out_dim)
            if m.bias is not None:
                seeds[m.bias.name] = Shard(0)
        seeds[r.weight.name] = Shard(r.in_dim)
    return seeds


def _force(pairs, Shard, Replicate) -> dict[str, Any]:
    """Placements forced at node outputs: the row-parallel output all-reduced to ``Replicate()``;
    each block of a fused column-parallel output (GPT-2's q | k | v) ``Shard`` on its last dim —
    what :class:`fxmem.shard.styles.Conv1DColwiseParallel` gives each rank (its heads of q, k and v)."""
    force: dict[str, Any] = {}
    for members, r in pairs:
        for m in members:
            for block in m.split_outputs():
                force[block.name] = Shard(block.meta["val"].dim() - 1)
            if m.virtual:
                # the repeated weight [N * head_dim, in] is Replicate; rank r's rows are its slice
                # (Replicate → Shard: local, no collective) — what VirtualHeadsParallel computes
                force[m.weight.name] = Shard(0)
                if m.bias is not None:
                    force[m.bias.name] = Shard(0)
        force[r.out.name] = Replicate()
    return force


def _blame(inside, members: list[Linear], gm: fx.GraphModule) -> list[Linear]:
    """The members whose outputs reach the first needed collective while others do not."""
    by_name = {n.name: n for n in gm.graph.nodes}
    first = by_name[inside[0].node]
    arg = by_name.get(inside[0].arg, first)
    reaching = [m for m in members if arg in _descendants([m.out])]
    return reaching if len(reaching) < len(members) else []


def _needs_grad(x: fx.Node, gm: fx.GraphModule) -> bool:
    """Whether ``x`` depends on a trainable parameter (so its gradient is computed)."""
    from fxmem.analysis.sizes import fetch_attr

    for n in _ancestors_until(x, set()):
        if n.op == "get_attr":
            value = fetch_attr(gm, n.target)
            if isinstance(value, torch.Tensor) and value.requires_grad:
                return True
    return False


def _build(model, gm, captured, world_size, pairs, vocab_choice, embeddings, by_module, fallbacks, prop, calls,
           replicated_kv, virtual: VirtualHeads | None = None, replicate_fused_bias: bool = False) -> ShardPlan:
    rows: list[Row] = []
    groups: list[Group] = []
    sharded_params: dict[int, int] = {}  # id(tensor) -> shard dim

    def param_rows(module_name: str):
        module = model.get_submodule(module_name)
        return [(n, p) for n, p in module.named_parameters(recurse=False)]

    def add_row(module_name, style, role, dims: dict[str, int | None], fwd, bwd, note="", strided=1):
        total = per_rank = 0
        parts = []
        for n, p in param_rows(module_name):
            b = tensor_bytes(p)
            total += b
            d = dims.get(n)
            if d is None:
                per_rank += b
                parts.append(f"{n} Replicate()")
            else:
                per_rank += b // world_size
                sharded_params[id(p)] = d
                parts.append(f"{n} Shard({d})" if strided == 1 else f"{n} _StridedShard({d}, split_factor={strided})")
        rows.append(Row(module_name, style, role, ", ".join(parts), total, per_rank, fwd, bwd, note))

    fwd_total: Counter = Counter()
    bwd_total: Counter = Counter()
    for members, r in pairs:
        names = [m.module for m in members]
        whole = [m.module for m in replicated_kv.get(r.module, [])]
        region = _between(members + replicated_kv.get(r.module, []), r)
        global_views = any(n.target in _SHAPE_OPS for n in region if n.op == "call_function") or \
            any(n.target not in _ELEMENTWISE_OK and n.op == "call_function" for n in region)
        role = "attention" if global_views else "mlp"
        local_attrs: list[tuple[str, str, int, int]] = []
        if any(m.fused > 1 for m in members):
            # GPT-2's c_attn: its code splits the fused output by an attribute (split_size);
            # DTensor's split rule gathers a split dimension, so this group runs on local
            # tensors and the attribute is set to the local block size (docs/shard.md, "Conv1D")
            global_views = False
            parent_name = _parent(names + whole + [r.module])
            for m in members:
                if m.fused > 1:
                    block = m.split_outputs()[0].meta["val"].shape[-1]
                    attr = _split_attribute(model.get_submodule(parent_name), block)
                    local_attrs.append((parent_name, attr, block, block // world_size))
        # each column-parallel layer turns its replicated input's gradient from Partial to
        # Replicate in backward (the f operator of Megatron): one all-reduce, when that input
        # needs a gradient at all (it does inside a network; a model input does not)
        bwd = ["all_reduce"] if _needs_grad(members[0].x, gm) else []
        parent = _parent(names + whole + [r.module])
        shared_module, shared = calls.shared_input_within(_parent(names + whole), parent, names + whole)
        if shared is not None:
            # the group's input enters as one DTensor: its gradient is all-reduced once
            rows.append(Row(shared_module, "prepare_input", f"{role} input", f"{shared[0]} {shared[1]} Replicate()", 0, 0,
                            [], list(bwd), "one DTensor input for the whole column-parallel group"))
            bwd_total.update(bwd)
            bwd = []
        for m in members:
            if m.virtual:
                # whole weight on every rank, one head computed; the weight's (and bias's) gradient is
                # each rank's share, summed over the ranks by DTensor: one all-reduce per parameter
                kv, _ = m.virtual
                n_params = len(param_rows(m.module))
                add_row(m.module, "virtual_heads", f"{role} in (virtual kv head)", {}, [], list(bwd) + ["all_reduce"] * n_params,
                        f"whole on every rank; rank r computes kv head r // {world_size // kv}")
                bwd_total.update(list(bwd) + ["all_reduce"] * n_params)
                continue
            if m.fused > 1 and replicate_fused_bias:
                # the bias whole on every rank; DTensor slices it (local) and gathers its gradient
                extra = ["all_gather"] if m.bias is not None else []
                add_row(m.module, "colwise", f"{role} in", {"weight": m.out_dim}, [], list(bwd) + extra, strided=m.fused,
                        note="bias whole on every tp rank (FSDP2 shards it over dp)")
                bwd_total.update(list(bwd) + extra)
                continue
            add_row(m.module, "colwise", f"{role} in", {"weight": m.out_dim, "bias": 0}, [], list(bwd), strided=m.fused)
            bwd_total.update(bwd)
        for name in whole:
            # computed whole on every rank; its gradient arrives Partial (each rank's q heads'
            # share, DTensor's SDPA rule for one kv head) and is all-reduced by the style
            add_row(name, "replicated", f"{role} in (shared kv head)", {}, [], list(bwd) + ["all_reduce"],
                    "whole on every rank: a single kv head serves every rank's q heads")
            bwd_total.update(list(bwd) + ["all_reduce"])
        add_row(r.module, "rowwise", f"{role} out", {"weight": r.in_dim, "bias": None}, ["all_reduce"], [])
        fwd_total["all_reduce"] += 1
        if any(m.virtual for m in members) and virtual is not None:
            local_attrs += [a for a in virtual.attrs if a[0] == parent]
        groups.append(Group([m.module for m in members if not m.virtual], r.module, parent, global_views, shared, whole,
                            conv1d=[m.module for m in members + [r] if m.conv1d],
                            fused={m.module: m.fused for m in members if m.fused > 1}, local_attrs=local_attrs,
                            virtual={m.module: m.virtual for m in members if m.virtual},
                            replicate_bias=replicate_fused_bias and any(m.fused > 1 for m in members),
                            positional_args=calls.positional_args(shared_module), shared_module=shared_module))
    for name, kind in vocab_choice.items():
        if kind == "embedding":
            add_row(name, "vocab_embedding", "embedding", {"weight": 0}, ["all_reduce"], [])
            fwd_total["all_reduce"] += 1
        else:
            bwd = ["all_reduce"] if _needs_grad(by_module[name][0].x, gm) else []
            add_row(name, "vocab_head", "output head", {"weight": 0, "bias": 0}, ["all_gather"], bwd)
            fwd_total["all_gather"] += 1
            bwd_total.update(bwd)
    done = {r.module for r in rows}
    for name, module in model.named_modules():
        if name in done or not list(module.parameters(recurse=False)):
            continue
        add_row(name, "replicate", "-", {}, [], [])
    # tied parameters: count once, placement of the sharded alias
    aliases = [names for names in _aliases(model).values() if len(names) > 1]
    unique = {id(p): p for p in model.parameters()}
    total = sum(tensor_bytes(p) for p in unique.values())
    per_rank = sum(tensor_bytes(p) // world_size if pid in sharded_params else tensor_bytes(p) for pid, p in unique.items())
    for row in rows:
        if row.style == "replicate":
            module = model.get_submodule(row.module)
            row.per_rank_bytes = sum(tensor_bytes(p) // world_size if id(p) in sharded_params else tensor_bytes(p)
                                     for p in module.parameters(recurse=False))
            if row.per_rank_bytes != row.param_bytes:
                row.note = "tied to a sharded parameter"
                row.placement = ", ".join(f"{n} Shard({sharded_params[id(p)]})" if id(p) in sharded_params else f"{n} Replicate()"
                                          for n, p in module.named_parameters(recurse=False))
    return ShardPlan(
        world_size=world_size, rows=rows, groups=groups, vocab=dict(vocab_choice), fallbacks=fallbacks, tied=aliases,
        placements={n: str(p) for n, p in prop.placements.items()}, graph=gm, param_bytes=total,
        per_rank_param_bytes=per_rank, forward_collectives=dict(fwd_total), backward_collectives=dict(bwd_total),
        propagated_collectives=dict(prop.collectives()),
        param_shard_dims={n: sharded_params.get(id(p)) for n, p in model.named_parameters(remove_duplicate=False)},
    )


# Pointwise ops a column-parallel output can pass through as a plain local tensor (no shapes).
_ELEMENTWISE_OK = {
    aten.gelu.default, aten.relu.default, aten.silu.default, aten.sigmoid.default, aten.tanh.default,
    aten.mul.Tensor, aten.add.Tensor, aten.sub.Tensor, aten.div.Tensor, aten.mul.Scalar, aten.add.Scalar,
    aten.pow.Tensor_Scalar, aten.clone.default, aten.native_dropout.default, operator.getitem,
}


# --------------------------------------------------------------------------------------------
# Carrying a plan out
# --------------------------------------------------------------------------------------------


def apply(model: nn.Module, plan: ShardPlan, device_mesh) -> nn.Module:
    """Parallelize ``model`` in place by ``plan`` with ``parallelize_module``; returns the model.

    Attention code reshapes with the model's own head counts (``view(B, T, self.n_head, -1)``).
    Rather than patching such attributes, the column-parallel layers of a group whose code
    reshapes keep DTensor outputs (``use_local_output=False``): the views, transposes, matmuls,
    softmax and SDPA between them run on DTensors with *global* shapes, DTensor's rules keep the
    heads dimension sharded, and the row-parallel layer takes the DTensor back. Plain tensors that
    meet those DTensors (a causal-mask buffer, rotary tables) are treated as replicated:
    ``apply`` switches on DTensor's implicit replication for the process
    (``torch.distributed.tensor.experimental.implicit_replication``, as a process-wide setting so
    that it also holds in backward and under ``torch.compile``).
    """
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.parallel import parallelize_module

    if device_mesh.size() != plan.world_size:
        raise ShardPlanError(f"fxmem.shard.apply: the plan is for world_size={plan.world_size}, "
                             f"the device mesh has {device_mesh.size()} ranks; plan again for this mesh")
    missing = [name for name in plan.parallelize_plan() if _get(model, name) is None]
    if missing:
        raise ShardPlanError(f"fxmem.shard.apply: modules {missing} of the plan are not in this model")
    dtensor_rules.register()
    parallelize_module(model, device_mesh, plan.parallelize_plan())
    # parallelize_module gives each module its own new parameter; tie them again, to the sharded one
    for names in plan.tied:
        params = [_get(model, n) for n in names]
        keep = next((p for p in params if isinstance(p, DTensor)), params[0])
        for n in names:
            module_name, _, leaf = n.rpartition(".")
            setattr(model.get_submodule(module_name) if module_name else model, leaf, keep)
    # a fused projection's blocks are local: the code splitting it must use the local block size
    for g in plan.groups:
        for module_name, attr, whole, local in g.local_attrs:
            module = model.get_submodule(module_name)
            if getattr(module, attr) != whole:
                raise ShardPlanError(f"fxmem.shard.apply: {module_name}.{attr} is {getattr(module, attr)}, the plan "
                                     f"expects {whole} (applied twice, or the model changed since planning)")
            setattr(module, attr, local)
    if plan.needs_dtensor_regions:
        DTensor._op_dispatcher._allow_implicit_replication = True
    return model


def _get(model: nn.Module, name: str):
    try:
        return model.get_submodule(name)
    except AttributeError:
        module_name, _, leaf = name.rpartition(".")
        try:
            return getattr(model.get_submodule(module_name) if module_name else model, leaf)
        except AttributeError:
            return None
