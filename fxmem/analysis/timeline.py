"""Live bytes over a whole training step — forward, then backward — and what is alive at its peak.

Read-only. It answers the question asked after an out-of-memory error ("what is alive at the
peak?") and gives remat a peak to compare splits by. The model of a step, run op by op:

* the caller's inputs (the batch) live through the step; parameters are excluded (parameter
  memory, reported apart);
* a node's output storage is allocated when it runs (views allocate nothing) and freed after
  the last use of any alias of it;
* the forward's outputs — user outputs, held by the caller through the backward, and the tensors
  saved for backward — outlive the forward;
* the backward receives the saved tensors and the tangents and releases each after its last use
  (fxmem's compiled backward is called boxed, so it can); its outputs, the gradients, stay
  (autograd accumulates them into ``.grad``). On torch releases whose AOTAutograd runtime holds
  the incoming gradients until the backward returns (2.11; :data:`RUNTIME_RELEASES_TANGENTS`),
  the tangents stay alive through the whole backward, as measured there.

An op's own workspace (what it allocates inside itself: fxmem's chunked loss and MLP, a CPU
convolution; :mod:`fxmem.analysis.workspace`) sits on top of the live bytes at its point. The
estimate is exact for ``codegen="eager"`` up to other ops' internal allocations (an ATen kernel's
scratch) and the caller's own ops outside the graph (the loss of ``model(x).sum()``). Inductor fuses
pointwise chains, so their intermediates never exist and its peak is lower where transients
dominate; the saved tensors — what remat chooses — are the same in both.
"""

from __future__ import annotations

import operator
import os
import re
from dataclasses import dataclass, field, replace

import torch
import torch.fx as fx

from fxmem.analysis.liveness import last_uses
from fxmem.analysis.saved import forward_outputs
from fxmem.analysis.sizes import is_alias_op, is_parameter_node, node_bytes, storage_root
from fxmem.analysis.workspace import layout_copies, op_workspace
from fxmem.codegen import INDUCTOR_BUFFER_POOL

COMPUTING = ("call_function", "call_module", "call_method")


def _runtime_releases_tangents() -> bool:
    # torch 2.13's AOTAutograd generates its CompiledFunction.backward
    # (_codegen_compiled_backward), which hands the incoming gradients on in a list it clears;
    # 2.11's backward keeps them in its own frame until it returns (measured: the output's
    # gradient stays alive through the compiled backward on 2.11, not on 2.13)
    from torch._functorch._aot_autograd import runtime_wrappers

    return hasattr(runtime_wrappers, "_codegen_compiled_backward")


RUNTIME_RELEASES_TANGENTS = _runtime_releases_tangents()
"""Whether this torch's compiled backward can release a tangent after its last use."""
_FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\S+)')


@dataclass(frozen=True)
class LiveTensor:
    """A storage alive at some point of the step."""

    name: str
    stage: str            # "forward" | "backward": the graph that made it (or received it)
    kind: str             # "input" | "saved" | "output" | "transient" | "tangent" | "gradient" | "workspace"
    shape: tuple[int, ...]
    dtype: str
    bytes: int
    op: str
    source: str           # the user's source line that made it (from node.meta["stack_trace"]), or ""


@dataclass
class StepTimeline:
    """Live activation bytes after each node of the forward and then the backward graph."""

    points: list[tuple[str, str, int]] = field(default_factory=list)  # (stage, node name, live bytes)
    peak_bytes: int = 0
    peak_index: int = 0
    input_bytes: int = 0
    live_at_peak: list[LiveTensor] = field(default_factory=list)
    outputs_held: bool = True  # the caller holds the forward's outputs through the backward
    # the same step when the caller keeps only the loss (set by the backend beside a held one)
    outputs_dropped: StepTimeline | None = None

    @property
    def peak_stage(self) -> str:
        return self.points[self.peak_index][0] if self.points else ""

    @property
    def peak_node(self) -> str:
        return self.points[self.peak_index][1] if self.points else ""

    @property
    def forward_end(self) -> int:
        """Index of the first backward point (= the number of forward points)."""
        return sum(1 for p in self.points if p[0] == "forward")

    def sparkline(self, width: int = 60) -> str:
        """The live bytes as one line of block characters, forward | backward, peak marked ``^``."""
        if not self.points:
            return ""
        bars = "▁▂▃▄▅▆▇█"
        n = len(self.points)
        cols = min(width, n)
        top = max(p[2] for p in self.points) or 1
        chars, peak_col = [], None
        split = None
        for c in range(cols):
            lo, hi = c * n // cols, max(c * n // cols + 1, (c + 1) * n // cols)
            value = max(p[2] for p in self.points[lo:hi])
            chars.append(bars[min(len(bars) - 1, int(value / top * (len(bars) - 1) + 0.5))])
            if lo <= self.peak_index < hi:
                peak_col = c
            if split is None and self.points[hi - 1][0] == "backward":
                split = c
        line = "".join(chars)
        if split is not None and 0 < split < len(line):
            line = line[:split] + "|" + line[split:]
            peak_col = peak_col + 1 if peak_col is not None and peak_col >= split else peak_col
        marker = " " * (peak_col or 0) + "^"
        return f"{line}\n{marker} peak {self.peak_bytes / 2**20:.2f} MiB at {self.peak_stage} {self.peak_node}"


def _source_line(node: fx.Node) -> str:
    """The innermost frame of ``node.meta["stack_trace"]`` as ``file.py:line in fn: code``."""
    trace = node.meta.get("stack_trace") or ""
    lines = [ln.strip() for ln in trace.strip().splitlines() if ln.strip()]
    for i in range(len(lines) - 1, -1, -1):
        match = _FRAME.match(lines[i])
        if match:
            code = lines[i + 1] if i + 1 < len(lines) and not _FRAME.match(lines[i + 1]) else ""
            path, line, fn = match.groups()
            return f"{os.path.basename(path)}:{line} in {fn}: {code}".rstrip(": ")
    return ""


def _describe(node: fx.Node, stage: str, kind: str) -> LiveTensor:
    val = node.meta.get("val")
    shape = tuple(int(s) if not isinstance(s, torch.SymInt) else -1 for s in getattr(val, "shape", ()))
    dtype = str(getattr(val, "dtype", "")).replace("torch.", "")
    op = node.op if node.op != "call_function" else str(getattr(node.target, "__name__", node.target))
    return LiveTensor(node.name, stage, kind, shape, dtype, node_bytes(node), op, _source_line(node))


def _workspace(node: fx.Node, stage: str, copies: bool) -> LiveTensor | None:
    """The op's own workspace (:func:`fxmem.analysis.workspace.op_workspace`) as a tensor alive
    while it runs, or None."""
    nbytes = op_workspace(node, copies=copies)
    if not nbytes:
        return None
    return replace(_describe(node, stage, "workspace"), name=f"{node.name} (workspace)", shape=(), dtype="",
                   bytes=nbytes)


class _Live:
    """The live set: storage key → (bytes, description).

    ``pool``: Inductor's buffer pool (``(parked, reuse)`` from :func:`_pool_plan`). Inductor's
    wrapper does not release a freed buffer that a later allocation of the same dtype and size
    will reuse (``buf86 = buf26; del buf26  # reuse``): it stays allocated, parked, until then.
    A drop of a parked key keeps it; the add that reuses it takes its place. ``events`` records
    the pooled allocations and frees, in order, to make that plan from.
    """

    def __init__(self, timeline: StepTimeline, pool: tuple[set, dict] | None = None):
        self.timeline = timeline
        self.items: dict[object, LiveTensor] = {}
        self.total = 0
        self.parked, self.reuse = pool if pool is not None else (set(), {})
        self.events: list[tuple[str, str, object, tuple[str, int]]] = []
        self.stage = "forward"

    def add(self, key: object, tensor: LiveTensor, *, pooled: bool = False) -> None:
        if key in self.items or tensor.bytes == 0:
            return
        if pooled:
            self.events.append((self.stage, "alloc", key, (tensor.dtype, tensor.bytes)))
            old = self.reuse.get(key)
            if old is not None:
                self._remove(old)
        self.items[key] = tensor
        self.total += tensor.bytes

    def drop(self, key: object, *, pooled: bool = False) -> None:
        tensor = self.items.get(key)
        if tensor is None:
            return
        if pooled:
            self.events.append((self.stage, "free", key, (tensor.dtype, tensor.bytes)))
            if key in self.parked:
                return  # still allocated: a later buffer of its dtype and size reuses it
        self._remove(key)

    def _remove(self, key: object) -> None:
        tensor = self.items.pop(key, None)
        if tensor is not None:
            self.total -= tensor.bytes

    def mark(self, stage: str, name: str, workspace: LiveTensor | None = None) -> None:
        """A point after ``name`` ran; its ``workspace`` (what the op allocated inside itself, gone
        after it) on top of the live bytes: the most the op held at once."""
        tl = self.timeline
        total = self.total + (workspace.bytes if workspace is not None else 0)
        tl.points.append((stage, name, total))
        if total > tl.peak_bytes or len(tl.points) == 1:
            tl.peak_bytes, tl.peak_index = total, len(tl.points) - 1
            alive = list(self.items.values()) + ([workspace] if workspace is not None else [])
            tl.live_at_peak = sorted(alive, key=lambda t: -t.bytes)


def _pool_plan(events: list[tuple[str, str, object, tuple[str, int]]]) -> tuple[set, dict]:
    """Pair frees with later allocations of the same (dtype, bytes), graph by graph, as Inductor's
    wrapper does (a stack per key: the latest freed buffer is reused first)."""
    parked: set = set()
    reuse: dict = {}
    pool: dict[tuple[str, int], list] = {}
    stage = None
    for ev_stage, kind, key, rkey in events:
        if ev_stage != stage:  # each graph plans its own buffers
            pool, stage = {}, ev_stage
        if kind == "free":
            pool.setdefault(rkey, []).append(key)
        elif pool.get(rkey):
            old = pool[rkey].pop()
            parked.add(old)
            reuse[key] = old
    return parked, reuse


def _pooled(node: fx.Node) -> bool:
    """A buffer Inductor's wrapper allocates (and pools): the output of an op it lowers (kernels,
    and extern matmuls written with ``out=``), not of a fallback op (a custom op, a multi-output
    op read by ``getitem``), which allocates its own outputs."""
    if node.op != "call_function":
        return False
    if node.target is operator.getitem:
        return False
    try:
        from torch._inductor.lowering import lowerings  # the table Inductor lowers by (torch 2.x)
    except ImportError:  # pragma: no cover - a torch without it: every op counts as lowered
        return True
    return node.target in lowerings or getattr(node.target, "overloadpacket", None) in lowerings


def _pointwise(node: fx.Node) -> bool:
    if node.op != "call_function":
        return False
    if node.target is torch.ops.aten._to_copy.default:
        # a cast: Inductor lowers it as a pointwise op (prims.convert_element_type, tagged
        # pointwise; aten._to_copy is not), unless it moves the tensor to another device
        return all(node.kwargs.get(k) is None for k in ("device", "pin_memory"))
    return torch.Tag.pointwise in getattr(node.target, "tags", ())


_REDUCTIONS = frozenset({"sum", "mean", "amax", "amin", "max", "min", "prod", "var", "var_mean", "std", "argmax",
                         "argmin", "any", "all", "logsumexp"})
"""ATen reductions Inductor generates as one kernel, with their pointwise producers inlined."""

_SCATTERS = frozenset({"index_put", "_unsafe_index_put", "_unsafe_masked_index_put_accumulate", "scatter",
                       "scatter_add", "scatter_reduce", "index_add", "slice_scatter", "select_scatter",
                       "diagonal_scatter", "as_strided_scatter", "index_copy", "masked_scatter"})
"""Functional scatters: Inductor writes them into their first argument's buffer when it dies there."""


_INDEXED_LOADS = frozenset({"gather", "index", "_unsafe_index", "index_select", "embedding"})
"""Ops Inductor lowers to a pointwise kernel that loads its input at computed indices
(``lowering.gather``, ``index_impl``, ``embedding``: ``x.make_loader()`` inside
``Pointwise.create``): an unrealized pointwise input is computed at the gathered positions only."""


_INLINING_READERS = _SCATTERS | _INDEXED_LOADS
"""Kernels that are not pointwise themselves but compute a pointwise input inside their own loop."""


_GENERATORS = frozenset({"full", "scalar_tensor", "iota", "arange", "zeros", "ones", "full_like", "zeros_like",
                         "ones_like"})
"""Ops Inductor lowers to a constant or an index expression: a kernel that reads them loads nothing."""


def _opname(node: fx.Node) -> str:
    return str(getattr(getattr(node.target, "_schema", None), "name", "")).split("::")[-1]


def _reduction(node: fx.Node) -> bool:
    return node.op == "call_function" and not _pointwise(node) and _opname(node) in _REDUCTIONS


def _readers(node: fx.Node) -> list[fx.Node]:
    """The nodes that read ``node``'s output, looking through the views of it that keep its last
    dimension (``[B, T, V] → [B·T, V]``: the reading kernel's inner loop is unchanged, an index
    expression). A view that regroups the last dimension is a reader itself: Inductor wrote the
    ReLU gradient a group norm's backward reads as ``[N, G, C/G, H·W]`` to a buffer
    (``conv_norm``; looking through it put the estimate at 0.81 of the measured peak)."""
    out, stack = [], list(node.users)
    last = _last_dim(node)
    while stack:
        user = stack.pop()
        if is_alias_op(user) and last is not None and _last_dim(user) == last:
            stack.extend(user.users)
        else:
            out.append(user)
    return out


def _last_dim(node: fx.Node) -> int | None:
    val = node.meta.get("val")
    return int(val.shape[-1]) if isinstance(val, torch.Tensor) and val.dim() and not isinstance(val.shape[-1], torch.SymInt) \
        else None


def _fused_away(gm: fx.GraphModule, keep: set, *, into_reductions: bool = False) -> set[fx.Node]:
    """Pointwise nodes whose every reader (through views) is pointwise too — or, with
    ``into_reductions``, a reduction, a functional scatter or a gather: Inductor inlines them into
    their readers' kernels, so their output never exists (unless it leaves the graph: ``keep``).

    Views: Gemma 2's soft-capped logits ``mul(tanh, 30)`` reach the log-softmax's ``amax`` and
    ``sub`` through a view to ``[N, V]``; Inductor computes them inside those kernels.
    Gathers: a cross-entropy's ``gather(log_softmax(x), 1, target)`` reads the log-softmax's
    ``x - max - log(sum(exp))`` at the targets only; Inductor computes it there and never writes
    the ``[N, V]`` log-probabilities when nothing else reads them (Gemma 2 unchunked, the loss
    kept alone: the estimate was 1.37 of the measured peak with that buffer counted).
    Scatters: an embedding's gradient (``index_put(zeros, ids, grad)``) reads the layer norm
    backward's last pointwise ops in its own kernel, so their inputs — the three projections'
    input gradients of the first layer — are alive when the ``[V, d]`` zeros are allocated.

    Inlining stops where Inductor realizes a pointwise value anyway (:class:`_InlineLimits`):
    without that, a backward's residual-gradient adds would inline one into the next through
    every layer, and the first matmul's output would live until the embedding's scatter.
    """
    def fuses(user: fx.Node) -> bool:
        return _pointwise(user) or (into_reductions and (_reduction(user) or _opname(user) in _INLINING_READERS))

    devices = {v.device.type for n in gm.graph.nodes if isinstance(v := n.meta.get("val"), torch.Tensor)}
    limits = _InlineLimits.of_inductor(cpu=devices <= {"cpu"})
    fused: set[fx.Node] = set()
    inlined: dict[fx.Node, tuple[frozenset, int]] = {}  # fused node → (buffers read, op count)
    for n in gm.graph.nodes:
        if not _pointwise(n) or n in keep:
            continue
        readers = _readers(n)
        if not readers or not all(fuses(u) for u in readers):
            continue
        reads, ops = set(), 1
        for arg in n.all_input_nodes:
            root = storage_root(arg)
            if _opname(root) in _GENERATORS:
                continue  # an index expression or a constant in the kernel: no buffer to read
            if root in inlined:
                more, count = inlined[root]
                reads |= more
                ops += count
            else:
                reads.add(root)
        if limits.realizes(len(reads), ops):
            continue
        fused.add(n)
        inlined[n] = (frozenset(reads), ops)
    return fused


@dataclass(frozen=True)
class _InlineLimits:
    """Where Inductor stops inlining a pointwise value into its readers and writes it to a buffer
    that outlives the kernel (``GraphLowering.run_node``'s ``has_exceeded_max_reads``: an
    expression reading more than ``reads`` buffers or with more than ``ops`` ops; thresholds from
    ``torch._inductor.config``). The op count here is one per inlined node: a lower bound of
    Inductor's, which counts its loads and constants too.

    Left out on purpose: Inductor also realizes a value read twice when its expression reads more
    than ``realize_reads_threshold`` buffers or (on a CPU) holds an ``exp``/``tanh``, but its
    scheduler then fuses the readers into the producer's kernel and drops the buffer as
    kernel-local. Counting those (GELU's ``tanh``, read twice in a recomputing backward) put the
    estimate of ``gpt_block_manual`` at 1.31 of the measured peak."""

    reads: int
    ops: int

    @classmethod
    def of_inductor(cls, cpu: bool = True) -> _InlineLimits:
        from torch._inductor import config

        # torch 2.13 has CPU thresholds of its own (realize_cpu_*); 2.11 one for every device
        ops = config.realize_opcount_threshold
        if ops is None:
            ops = config.realize_cpu_opcount_threshold if cpu else config._realize_opcount_threshold_default
        if cpu:
            # 2.13's CPU value. 2.11 realizes at 8 reads on a CPU too, but its scheduler fuses the
            # realized value back into the kernel that reads it, and what is alive follows 12:
            # DistilBERT's estimate on 2.11 (tiny) is 0.97 of the measured peak at 12, 0.84 at 8
            reads = getattr(config, "realize_cpu_acc_reads_threshold", 12)
        else:
            reads = getattr(config, "_realize_acc_reads_threshold_default", config.realize_acc_reads_threshold)
        return cls(reads, ops)

    def realizes(self, reads: int, ops: int) -> bool:
        return reads > self.reads or ops > self.ops


def _addmm_fused(gm: fx.GraphModule) -> dict[fx.Node, fx.Node]:
    """``mm`` nodes Inductor rewrites into an ``addmm`` with the ``add`` that is their only user
    (its post-grad pattern ``add(mm(a, b), c) → addmm(c, a, b)``, ``is_valid_addmm_fusion``):
    mm → add. The ``mm`` then runs where the ``add`` stands, so its inputs live until there, and
    the ``add`` is no pointwise kernel (``addmm`` writes a fresh buffer, in place of nothing).

    The tied embedding of a GPT: its gradient is the embedding's scatter plus the head's
    ``logitsᵀ @ hidden``, which Inductor runs as one ``addmm`` at the end of the backward — the
    ``[N, V]`` logits gradient stays alive through the whole backward, not until the head's
    ``mm`` in graph order. The conditions are Inductor's: ``c`` a tensor of the ``mm``'s dtype,
    expandable to its shape; on a GPU, not where every use of the sum is pointwise
    (``should_prefer_unfused_addmm``: there the bias add is fused into the consumer instead).
    """
    out: dict[fx.Node, fx.Node] = {}
    add = torch.ops.aten.add.Tensor
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not add or len(node.args) != 2 or node.kwargs.get("alpha", 1) != 1:
            continue
        for mm, inp in ((node.args[0], node.args[1]), (node.args[1], node.args[0])):
            # the pattern matcher's default: the inner mm has this add as its one user
            if not (isinstance(mm, fx.Node) and mm.op == "call_function" and mm.target is torch.ops.aten.mm.default
                    and len(mm.users) == 1 and isinstance(inp, fx.Node)):
                continue
            val, a, b = inp.meta.get("val"), mm.args[0].meta.get("val"), mm.args[1].meta.get("val")
            if not all(isinstance(t, torch.Tensor) for t in (val, a, b)) or not val.dtype == a.dtype == b.dtype:
                continue
            shape = (a.shape[0], b.shape[1])
            try:
                if torch.broadcast_shapes(tuple(val.shape), shape) != shape:
                    continue  # c must expand to the mm's shape, not the other way
            except RuntimeError:
                continue
            if val.device.type != "cpu" and node.users:
                from torch._inductor.utils import is_pointwise_use  # the rule's own helper (2.11 too)

                if all(is_pointwise_use(u) for u in node.users):
                    continue
            out[mm] = node
            break
    return out


def _fusion(gm: fx.GraphModule, keep: set, *, fused: bool, reuse: bool) -> tuple[set[fx.Node], set[fx.Node]]:
    """(nodes whose output never exists: fused into a later kernel, ``add`` nodes that become an
    ``addmm``). With ``reuse``: pointwise producers inlined into reductions too, and the ``mm``
    of each :func:`_addmm_fused` pair runs inside its ``add`` — which is then an extern kernel
    whose inputs (its bias too) exist as buffers."""
    if not fused:
        return set(), set()
    skip = _fused_away(gm, keep, into_reductions=reuse)
    if not reuse:
        return skip, set()
    pairs = _addmm_fused(gm)
    adds = set(pairs.values())
    skip = {n for n in skip - adds if not any(u in adds for u in n.users)} | set(pairs)
    return skip, adds


def inductor_fusion(gm: fx.GraphModule, keep: set) -> tuple[set[fx.Node], set[fx.Node]]:
    """The fusion model of ``step_timeline(fused=True, reuse=True)`` (what fit assumes of
    Inductor's code): the nodes whose output never exists, and the ``add`` nodes that run as an
    ``addmm``. ``keep``: storages that must exist (the graph's outputs)."""
    return _fusion(gm, keep, fused=True, reuse=True)


def _reuse_candidates(node: fx.Node) -> list[fx.Node]:
    """Inputs whose buffer Inductor may write ``node``'s output into (in place) when they die at
    ``node``: any input of a pointwise kernel, the first input of a functional scatter."""
    if _pointwise(node):
        return [a for a in node.all_input_nodes]
    if node.op == "call_function" and _opname(node) in _SCATTERS and node.args and isinstance(node.args[0], fx.Node):
        return [node.args[0]]
    return []


def _kernel_inputs(node: fx.Node, skip: set[fx.Node]) -> list[fx.Node]:
    """The storages ``node``'s kernel may write its output into: its reuse candidates, looking
    through the pointwise ops fused into it (``skip``)."""
    return _storages_through(_reuse_candidates(node), skip)


def kernel_reads(node: fx.Node, skip: set[fx.Node]) -> list[fx.Node]:
    """The storages ``node``'s kernel reads: its inputs, looking through the pointwise ops fused
    into it (``skip``, from :func:`inductor_fusion`) and through views."""
    return _storages_through(node.all_input_nodes, skip)


def _storages_through(inputs: list[fx.Node], skip: set[fx.Node]) -> list[fx.Node]:
    out, stack, seen = [], list(inputs), set()
    while stack:
        inp = stack.pop()
        if inp in seen:
            continue
        seen.add(inp)
        root = storage_root(inp)
        if inp in skip:
            stack.extend(inp.all_input_nodes)
        elif root in skip:  # a view of a fused-away op: read its inputs
            stack.append(root)
        else:
            out.append(root)
    return out


def _kernel_last_uses(gm: fx.GraphModule, skip: set[fx.Node],
                      joins: dict[fx.Node, fx.Node] | None = None) -> dict[fx.Node, int]:
    """:func:`fxmem.analysis.liveness.last_uses` as Inductor's kernels read: a pointwise op fused
    into its users (``skip``) reads its inputs where the kernel it is fused into runs, so an
    input stays alive until then (``grad = saved_grad * tangent + embedding_grad``: the saved
    gradient is read by the last kernel of the backward, not where the multiply stands). A node
    that ``joins`` an earlier kernel (:func:`_joined_kernels`) reads its inputs there, and a view
    reads where its users read."""
    joins = joins or {}
    nodes = list(gm.graph.nodes)
    position = {n: i for i, n in enumerate(nodes)}
    runs_at: dict[fx.Node, int] = {}
    for node in reversed(nodes):
        if node in joins:
            runs_at[node] = position[joins[node]]
        elif node in skip or (is_alias_op(node) and node.users):  # a view is read where its readers run
            runs_at[node] = max((runs_at[u] for u in node.users), default=position[node])
        else:
            runs_at[node] = position[node]
    return last_uses(gm, runs_at)


def _numel(node: fx.Node) -> int | None:
    val = node.meta.get("val")
    return val.numel() if isinstance(val, torch.Tensor) else None


def _is_cast(node: fx.Node) -> bool:
    return node.target in (torch.ops.aten._to_copy.default, torch.ops.prims.convert_element_type.default)


def _joined_kernels(gm: fx.GraphModule, skip: set[fx.Node], externs: set[fx.Node]) -> dict[fx.Node, fx.Node]:
    """Pointwise nodes that Inductor computes in an earlier node's kernel: ``{joiner: host}``.

    Inductor's scheduler fuses a pointwise consumer into its producer's kernel when they iterate
    over the same elements, wherever the consumer stands in the graph, as long as everything else
    it reads already exists. The producer's buffer still exists when another reader needs it
    (a view feeding a matmul), and the consumer's output is written by the same kernel — so both
    outputs, and the kernel's inputs, are alive together. Seen in a bf16 training step's
    backward (the unchunked loss): ``sub_9`` (the fp32 logits gradient, [N, V]) and its two bf16
    casts, one per gradient matmul, are one kernel (three ``[N, V]`` outputs beside the
    recomputed logits), where the graph order has the second cast after the first matmul.
    Only materialized pointwise nodes join (``skip``: fused into their users anyway; ``externs``:
    run as ``addmm``), and only into a materialized pointwise host.
    """
    nodes = list(gm.graph.nodes)
    position = {n: i for i, n in enumerate(nodes)}

    def materialized_pointwise(n: fx.Node) -> bool:
        return _pointwise(n) and n not in skip and n not in externs and storage_root(n) is n

    host_of: dict[fx.Node, fx.Node] = {}
    for node in nodes:
        if not materialized_pointwise(node) or node in host_of:
            continue
        host, size, frontier = node, _numel(node), [node]
        while frontier:
            stack = list(frontier.pop().users)
            while stack:  # the consumers, through views and the pointwise ops fused into them
                user = stack.pop()
                if is_alias_op(user) or user in skip:
                    stack.extend(user.users)
                elif (user not in host_of and _is_cast(user) and materialized_pointwise(user)
                      and position[user] > position[host] and _numel(user) == size
                      and all(position[r] <= position[host] or host_of.get(r) is host
                              for r in _kernel_inputs(user, skip))):
                    host_of[user] = host
                    frontier.append(user)
    return host_of


def _channels_last_copies(fw: fx.GraphModule) -> dict[fx.Node, fx.Node]:
    """Graph inputs Inductor copies into channels-last layout for a convolution of a training
    forward: ``{input: the first convolution that reads it}``.

    On a CPU with oneDNN, Inductor lays every convolution out channels-last
    (``GraphLowering.decide_layout_opt``). A computed activation is produced in that layout
    directly; a graph input — the batch of images, the convolution's weight — is copied
    (:func:`fxmem.analysis.workspace.layout_copies`), and in training the copy, not the input, is
    what the forward saves for the convolution's backward. A ViT's patch embedding: the images
    and the patch weight exist twice from the convolution to the end of the backward. (In
    inference the copies are freed after the op: its workspace counts them.)
    """
    copies: dict[fx.Node, fx.Node] = {}
    for conv in fw.graph.find_nodes(op="call_function", target=torch.ops.aten.convolution.default):
        for placeholder in layout_copies(conv):
            copies.setdefault(placeholder, conv)
    return copies


def _reuse_in_place(live: _Live, node: fx.Node, skip: set[fx.Node], dying) -> None:
    """Free the first input buffer ``node``'s kernel can write its output into (``dying(root)``
    gives its live-set key when it dies at ``node``, else None, and whether it is pooled): the
    output takes its place."""
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        return
    size = node_bytes(node)
    for root in _kernel_inputs(node, skip):
        key, pooled = dying(root)
        other = root.meta.get("val")
        if key is not None and key in live.items and isinstance(other, torch.Tensor) and other.dtype == val.dtype \
                and live.items[key].bytes == size:
            live.drop(key, pooled=pooled)
            return


def step_timeline(fw: fx.GraphModule, bw: fx.GraphModule | None, num_fwd_outputs: int, *,
                  fused: bool = False, reuse: bool = False, pool: bool | None = None,
                  outputs_held: bool = True) -> StepTimeline:
    """Walk ``fw`` then ``bw`` (a partition's two graphs) and record the live bytes after each node.

    ``fused``: model Inductor's code — a pointwise op feeding only pointwise ops allocates
    nothing (it is fused into its users). ``reuse`` (with ``fused``): model two more things
    Inductor's generated code does (its wrapper's ``buf2 = exp_2; del exp_2  # reuse``):

    * a pointwise op feeding a reduction is inlined into the reduction's kernel too;
    * a pointwise kernel (or a functional scatter, into its first argument) writes its output
      into the buffer of an input that dies there, when dtype and size match — the input is
      freed before the output is allocated, not after (the backward's logits gradient reuses the
      saved ``exp`` of the softmax: one ``[N, V]`` buffer, not two). The kernel's inputs are
      read through the pointwise ops fused into it.

    * ``pool`` (default: :data:`fxmem.codegen.INDUCTOR_BUFFER_POOL`, off under fxmem): a freed
      buffer that a later buffer of the same dtype and size reuses stays allocated until then
      (Inductor's buffer pool, :class:`_Live`), so reuse can *raise* the peak: the backward of a
      recomputed layer keeps its recomputed buffers parked for the next layer's.
    * ``add(mm(a, b), c)`` is one ``addmm`` where the ``add`` stands (:func:`_addmm_fused`):
      ``a`` and ``b`` live until then (a tied head's ``[N, V]`` logits gradient, read by the
      weight gradient's ``addmm`` at the end of the backward).
    * pointwise ops are inlined through views that keep the last dimension and into scatters,
      up to where Inductor realizes them (:func:`_fused_away`);
    * in a training step, the channels-last copies Inductor makes of a CPU convolution's graph
      inputs are saved for the backward (:func:`_channels_last_copies`).

    Reordering is not modelled. ``fit``, remat's peak guard and explain (under Inductor) use
    ``reuse=True``.

    ``outputs_held``: the caller holds the forward's outputs through the backward
    (``out = model(...); out.loss.backward()``), the default. ``False``: it keeps only the loss —
    the 0-dim outputs — and drops the rest when the forward returns, as Hugging Face's
    ``Trainer`` does (``loss = model(**batch).loss``): an output the backward does not read (the
    logits beside the loss) is freed at the end of the forward; one it reads (saved too) when the
    backward is done with it.
    """
    reuse = reuse and fused
    pool = INDUCTOR_BUFFER_POOL if pool is None else pool
    walk = dict(fused=fused, reuse=reuse, outputs_held=outputs_held)
    if not reuse or not pool:
        return _walk(fw, bw, num_fwd_outputs, pool=None, **walk)[0]
    # twice: the first walk lists the pooled allocations and frees, the second parks the reused
    _, events = _walk(fw, bw, num_fwd_outputs, pool=None, **walk)
    return _walk(fw, bw, num_fwd_outputs, pool=_pool_plan(events), **walk)[0]


def _output_items(node: fx.Node) -> list[fx.Node]:
    """The ``getitem`` nodes that read the outputs of a multi-output op (SDPA, its backward, a
    custom op returning a tuple). The op allocates them while its inputs are still alive, so the
    walk adds them where the op runs, before its inputs' last use frees them — not at the
    ``getitem`` nodes after it, where an input that died at the op is already gone."""
    if not isinstance(node.meta.get("val"), (tuple, list)):
        return []
    return [u for u in node.users if u.op == "call_function" and u.target is operator.getitem]


def _dropped_outputs(user_outputs: list, saved_roots: set) -> set[fx.Node]:
    """The storages a caller that keeps only the loss drops when the forward returns: the roots of
    the non-scalar user outputs that the forward computed (not its inputs) and did not save."""
    dropped = set()
    for n in user_outputs:
        if not isinstance(n, fx.Node):
            continue
        val = n.meta.get("val")
        root = storage_root(n)
        if isinstance(val, torch.Tensor) and val.dim() > 0 and root.op in COMPUTING and root not in saved_roots:
            dropped.add(root)
    return dropped


def _walk(fw: fx.GraphModule, bw: fx.GraphModule | None, num_fwd_outputs: int, *, fused: bool, reuse: bool,
          pool: tuple[set, dict] | None, outputs_held: bool = True) -> tuple[StepTimeline, list]:
    timeline = StepTimeline(outputs_held=outputs_held)
    live = _Live(timeline, pool)
    pooled = _pooled if reuse else (lambda node: False)
    fw_out = forward_outputs(fw)
    user_roots = {storage_root(n) for n in fw_out[:num_fwd_outputs] if isinstance(n, fx.Node)}
    saved = [n for n in fw_out[num_fwd_outputs:] if isinstance(n, fx.Node)]
    saved_roots = {storage_root(n) for n in saved}
    # forward ---------------------------------------------------------------------------------
    for node in fw.graph.nodes:
        if node.op == "placeholder" and not is_parameter_node(node):
            live.add(node, _describe(node, "forward", "input"))
    timeline.input_bytes = live.total
    dropped = set() if outputs_held else _dropped_outputs(fw_out[:num_fwd_outputs], saved_roots)
    # the caller holds these through the step (a dropped output only until the forward returns;
    # one the backward reads too, until the backward is done with it)
    held = set(live.items) | (user_roots if outputs_held else {r for r in user_roots if r.op not in COMPUTING})
    skip, externs = _fusion(fw, user_roots | saved_roots, fused=fused, reuse=reuse)
    joins = _joined_kernels(fw, skip, externs) if reuse else {}
    last = _kernel_last_uses(fw, skip, joins) if reuse else last_uses(fw)
    frees: dict[int, list[fx.Node]] = {}
    for root, pos in last.items():
        if root.op in COMPUTING and root not in user_roots and root not in saved_roots:
            frees.setdefault(pos, []).append(root)

    def fw_dying(root: fx.Node, i: int) -> tuple[object | None, bool]:
        return (root, pooled(root)) if root in frees.get(i, ()) else (None, False)

    def fw_add(node: fx.Node) -> None:
        kind = "saved" if node in saved_roots else "output" if node in user_roots else "transient"
        live.add(node, _describe(node, "forward", kind), pooled=pooled(node))

    copies = _channels_last_copies(fw) if reuse and bw is not None else {}
    copies_made: dict[fx.Node, list[fx.Node]] = {}  # convolution → the inputs it copies first
    copy_frees: dict[int, list[fx.Node]] = {}
    for placeholder, conv in copies.items():
        copies_made.setdefault(conv, []).append(placeholder)
        if placeholder not in saved_roots:  # else the backward releases it
            copy_frees.setdefault(last.get(placeholder, 0), []).append(placeholder)

    early: set[fx.Node] = set()  # outputs of a multi-output op, added where the op runs
    for i, node in enumerate(fw.graph.nodes):
        for placeholder in copies_made.get(node, ()):
            kind = "saved" if placeholder in saved_roots else "transient"
            live.add(("channels_last", placeholder.name),
                     replace(_describe(placeholder, "forward", kind), name=f"{placeholder.name} (channels-last copy)"))
        if node.op in COMPUTING and storage_root(node) is node and not is_parameter_node(node) and node not in skip \
                and node not in joins and node not in early:
            if reuse and node not in externs:
                _reuse_in_place(live, node, skip, lambda root, i=i: fw_dying(root, i))
            fw_add(node)
            for joiner in (j for j, host in joins.items() if host is node):  # outputs of the same kernel
                fw_add(joiner)
            for item in _output_items(node):
                fw_add(item)
                early.add(item)
        if node.op in COMPUTING:
            live.mark("forward", node.name, _workspace(node, "forward", copies=fused and bw is None))
        for root in frees.get(i, ()):
            live.drop(root, pooled=pooled(root))
        for placeholder in copy_frees.get(i, ()):
            live.drop(("channels_last", placeholder.name))
    if bw is None:
        return timeline, live.events
    for root in dropped:  # the caller dropped them when the forward returned
        live.drop(root, pooled=pooled(root))
    live.stage = "backward"
    # backward: saved tensors arrive by name; each is released after its last use -------------
    fw_by_name = {n.name: storage_root(n) for n in saved}
    bw_nodes = list(bw.graph.nodes)
    grad_roots = {storage_root(n) for n in forward_outputs(bw) if isinstance(n, fx.Node)}
    skip, externs = _fusion(bw, grad_roots, fused=fused, reuse=reuse)
    joins = _joined_kernels(bw, skip, externs) if reuse else {}
    last = _kernel_last_uses(bw, skip, joins) if reuse else last_uses(bw)
    placeholder_root: dict[fx.Node, object] = {}
    for node in bw_nodes:
        if node.op != "placeholder" or is_parameter_node(node):
            continue
        if node.name in fw_by_name:
            placeholder_root[node] = fw_by_name[node.name]
        else:  # a tangent (or a saved value fxmem cannot match by name): allocated for the backward
            placeholder_root[node] = node
            is_tangent = "tangent" in node.name
            live.add(node, _describe(node, "backward", "tangent" if is_tangent else "saved"))
            if is_tangent and not RUNTIME_RELEASES_TANGENTS:
                held.add(node)  # the runtime's frame holds it until the backward returns
    # a forward storage is released when every backward placeholder that reads it is done
    readers: dict[object, int] = {}
    for root in placeholder_root.values():
        readers[root] = readers.get(root, 0) + 1
    frees = {}
    for root, pos in last.items():
        if root in grad_roots:
            continue
        if root.op == "placeholder" and root in placeholder_root:
            frees.setdefault(pos, []).append(root)
        elif root.op in COMPUTING:
            frees.setdefault(pos, []).append(root)

    copy_names = {p.name for p in copies}
    copy_frees = {}  # a saved copy is released after the backward's last read of its input
    for node in bw_nodes:
        if node.op == "placeholder" and node.name in copy_names:
            copy_frees.setdefault(last.get(node, len(bw_nodes) - 1), []).append(node)

    def bw_dying(root: fx.Node, i: int) -> tuple[object | None, bool]:
        if root not in frees.get(i, ()):
            return None, False
        if root in placeholder_root:
            key = placeholder_root[root]
            return (key, False) if readers[key] == 1 and key not in held else (None, False)
        return root, pooled(root)

    def bw_add(node: fx.Node) -> None:
        live.add(node, _describe(node, "backward", "gradient" if node in grad_roots else "transient"),
                 pooled=pooled(node))

    early = set()
    for i, node in enumerate(bw_nodes):
        if node.op in COMPUTING and storage_root(node) is node and not is_parameter_node(node) and node not in skip \
                and node not in joins and node not in early:
            if reuse and node not in externs:
                _reuse_in_place(live, node, skip, lambda root, i=i: bw_dying(root, i))
            bw_add(node)
            for joiner in (j for j, host in joins.items() if host is node):  # outputs of the same kernel
                bw_add(joiner)
            for item in _output_items(node):
                bw_add(item)
                early.add(item)
        if node.op in COMPUTING:
            live.mark("backward", node.name, _workspace(node, "backward", copies=False))
        for root in frees.get(i, ()):
            if root in placeholder_root:
                key = placeholder_root[root]
                readers[key] -= 1
                if readers[key] == 0 and key not in held:
                    live.drop(key)
            else:
                live.drop(root, pooled=pooled(root))
        for placeholder in copy_frees.get(i, ()):
            live.drop(("channels_last", placeholder.name))
    return timeline, live.events
