"""Chunk the loss: ``linear → (float cast) → cross_entropy`` becomes one op that never holds the logits.

Runs on the torch-level graph of a training call (stage ``"dynamo"``: the graph Dynamo hands the
backend, before AOTAutograd traces the joint graph). Before::

    logits = torch._C._nn.linear(hidden, lm_head_weight, None)    # [B, T, V]
    logits_1 = logits.float()
    logits_2 = logits_1.view(-1, 32000)                           # [B*T, V]
    loss = torch.nn.functional.cross_entropy(logits_2, labels, ignore_index=-100, reduction='mean')

After::

    reshape = hidden.reshape(-1, 256)                             # [B*T, d]
    reshape_1 = labels.reshape(-1)
    lce = torch.ops.fxmem.linear_cross_entropy(reshape, lm_head_weight, None, reshape_1, -100,
                                               'mean', 0.0, True, 0, True, True, False)
    loss = lce[0]

``fxmem::linear_cross_entropy`` (:mod:`fxmem.kernels.linear_ce`) is a custom op with a fake
implementation and an autograd formula: AOTAutograd puts it in the joint graph as one node (its
backward is a scaling of the gradients it computed), and Inductor compiles around it.

Matched (each spelling Dynamo produces): ``F.linear`` (HF's ``lm_head``, tied to the embedding or
not, with or without bias) over a vocabulary wider than its input (a classifier's few labels are
left alone: chunked, it would save no bytes), optionally ``+ b`` with one ``b`` per vocabulary
entry (BART's ``final_logits_bias``, folded into the op's bias), optionally soft-capped right after
(Gemma 2's ``final_logit_softcapping``: ``logits / c → tanh → * c``, folded into the op's
``softcap``), then any of ``.float()``,
``.to(torch.float32)``, ``.view``, ``.reshape``, ``.contiguous()``, ``.flatten`` and row slicing
(``logits[..., :-1, :]``: it is replayed on ``hidden``), then ``F.cross_entropy``
(``ignore_index``, ``reduction`` ``"mean"``/``"sum"``, ``label_smoothing``) or ``F.log_softmax``
+ ``F.nll_loss``. Left unchanged, with the reason in the statistics and a warning: class
weights, ``reduction="none"``, soft (probability) targets, a log-softmax used beyond the loss,
an autocast region, any other op between a vocabulary-sized output layer and the loss (a
soft-cap after a cast or a reshape, or one whose intermediate values are used elsewhere). Logits
that something else uses (HF models return them)
stay computed for that use; the loss is chunked all the same.

Why the torch-level graph and not the joint graph: at the torch level the pattern is the forward
alone and AOTAutograd derives the backward from the op's autograd formula; in the joint graph the
backward of the loss (``nll_loss_backward``, ``_log_softmax_backward_data``, the two weight and
input matmuls, their transposes and casts) would have to be found and replaced too, and with
Inductor's decompositions those ops are already decomposed into ``amax``/``exp``/``gather``/
``scatter`` chains. The rewrite here is independent of the code generator and the decomposition
table.

With ``chunk={"mlp": True}`` the pass also replaces every position-wise MLP (up [+ gate] →
element-wise activation → down) by one ``fxmem::chunked_mlp`` (:mod:`fxmem.passes.chunk_mlp`
finds them, :mod:`fxmem.kernels.chunked_mlp` is the op): its ``[N, I]`` intermediates exist one
chunk of tokens at a time, forward and backward (MsT).

Precondition: every node carries ``meta["example_value"]`` (Dynamo's fake values). Numerical
promise: exact up to float rounding (loss and gradients within 1e-5 relative in fp32).
"""

from __future__ import annotations

import inspect
import operator
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

from fxmem.config import ChunkConfig
from fxmem.kernels import linear_ce, logits_output  # noqa: F401  (register fxmem::linear_cross_entropy, the logits ops)
from fxmem.passes import chunk_mlp
from fxmem.passes.base import PassContext, PassResult, traced_value

_LINEAR = {F.linear, torch._C._nn.linear}
_CROSS_ENTROPY = {F.cross_entropy}
_LOG_SOFTMAX = {F.log_softmax, torch.log_softmax, torch._C._VariableFunctions.log_softmax}
_NLL = {F.nll_loss}
_RESHAPE_METHODS = {"view", "reshape"}
_FLOAT32 = (torch.float32, "torch.float32")

_CE_SIG = inspect.signature(F.cross_entropy)
_NLL_SIG = inspect.signature(F.nll_loss)
_LOG_SOFTMAX_SIG = inspect.signature(F.log_softmax)


class NotChunkable(Exception):
    """A loss that looks like the pattern but is not safe to chunk; the message says why."""



@dataclass
class _Match:
    loss: fx.Node                 # the cross_entropy / nll_loss node
    linear: fx.Node
    chain: list[fx.Node]          # nodes from the linear's output to the loss input, in order
    target: fx.Node
    ignore_index: int
    reduction: str
    label_smoothing: float
    upcast: bool
    extra: list[fx.Node] = field(default_factory=list)  # log_softmax node (nll path)
    bias_add: fx.Node | None = None  # ``linear(h, W) + b`` with a [V] (or [1, .., V]) b: BART's final_logits_bias
    bias_term: fx.Node | None = None  # that ``b``
    softcap: float = 0.0  # Gemma 2's final soft-cap ``c`` of ``c·tanh(logits / c)``, 0 for none
    cap: list[fx.Node] = field(default_factory=list)  # its div, tanh and mul nodes, in order

    @property
    def head(self) -> list[fx.Node]:
        """The output layer, in order: the linear, the bias add folded into it and the soft-cap, if any."""
        return [self.linear, *([self.bias_add] if self.bias_add is not None else []), *self.cap]


def _bind(sig: inspect.Signature, node: fx.Node) -> dict[str, Any]:
    bound = sig.bind(*node.args, **node.kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


def _is_float32_cast(node: fx.Node) -> bool:
    if node.op != "call_method":
        return False
    if node.target == "float" and len(node.args) == 1 and not node.kwargs:
        return True
    if node.target == "to":
        rest = list(node.args[1:]) + [v for k, v in node.kwargs.items() if k == "dtype"]
        other = [k for k in node.kwargs if k != "dtype"]
        return len(rest) == 1 and rest[0] in _FLOAT32 and not other
    return False


def _last_dim_untouched(index: Any, ndim: int) -> bool:
    """Whether ``x[index]`` keeps ``x``'s last dimension whole and last (a row selection)."""
    index = index if isinstance(index, tuple) else (index,)
    if any(not isinstance(i, (int, slice, type(None), type(Ellipsis))) for i in index):
        return False
    if Ellipsis in index:
        after = index[index.index(Ellipsis) + 1:]
        return not after or after[-1] == slice(None)
    consumed = [i for i in index if i is not None]
    return len(consumed) < ndim or index[-1] == slice(None)


def _log_softmax_args(node: fx.Node) -> dict[str, Any] | None:
    """Normalized arguments of a log_softmax node (any spelling), or None if it is not one."""
    if node.op == "call_method" and node.target == "log_softmax":
        return dict(zip(("input", "dim", "_stacklevel", "dtype"), node.args)) | dict(node.kwargs)
    if node.op == "call_function" and node.target in _LOG_SOFTMAX:
        if node.target is F.log_softmax:
            return _bind(_LOG_SOFTMAX_SIG, node)
        return dict(zip(("input", "dim", "dtype"), node.args)) | dict(node.kwargs)
    return None


def _loss_node(node: fx.Node) -> tuple[fx.Node, dict[str, Any], bool] | None:
    """``(loss input, normalized arguments, whether a log_softmax must precede)`` for a supported loss."""
    if node.op != "call_function":
        return None
    if node.target in _CROSS_ENTROPY:
        return _bind(_CE_SIG, node)["input"], _bind(_CE_SIG, node), False
    if node.target in _NLL:
        args = _bind(_NLL_SIG, node)
        return args["input"], dict(args, label_smoothing=0.0), True
    return None


def find_loss(node: fx.Node) -> _Match | None:
    """The pattern ending at ``node`` (a loss), or None; raises :class:`NotChunkable` with a reason."""
    found = _loss_node(node)
    if found is None:
        return None
    x, args, needs_log_softmax = found
    upcast, extra = False, []
    bias_add = bias_term = None
    softcap, cap = 0.0, []
    for key in ("weight", "size_average", "reduce"):
        if args.get(key) is not None:
            raise NotChunkable(f"{node.target.__name__} with {key}= (class weights / legacy reduction)")
    if args["reduction"] not in linear_ce.REDUCTIONS:
        raise NotChunkable(f"reduction={args['reduction']!r} (chunked: 'mean' and 'sum')")
    target = args["target"]
    tval, xval = traced_value(target), traced_value(x)
    if not isinstance(target, fx.Node) or not isinstance(tval, torch.Tensor) or tval.is_floating_point():
        raise NotChunkable("the target is not an integer class-index tensor (probability targets)")
    if not isinstance(xval, torch.Tensor) or xval.dim() != 2:
        raise NotChunkable("the loss input is not [N, V] logits")
    chain: list[fx.Node] = []
    while isinstance(x, fx.Node) and not (x.op == "call_function" and x.target in _LINEAR):
        v = traced_value(x)
        ls_args = _log_softmax_args(x)
        if ls_args is not None:
            if not needs_log_softmax or extra:
                return None  # cross_entropy of log-probabilities, or two log_softmax: not the pattern
            ndim = v.dim()
            if ls_args.get("dim") not in (-1, ndim - 1):
                raise NotChunkable(f"log_softmax over dim {ls_args.get('dim')} of a {ndim}-d tensor (not the vocabulary)")
            if len(x.users) != 1:
                raise NotChunkable("the log_softmax output is used beyond nll_loss (e.g. a hand-written label smoothing)")
            if ls_args.get("dtype") not in (None, *_FLOAT32):
                raise NotChunkable(f"log_softmax with dtype={ls_args.get('dtype')}")
            upcast = upcast or ls_args.get("dtype") is not None
            extra.append(x)
            x = ls_args["input"]
            continue
        # casts, reshapes and row slices between the head and the loss are replayed on the hidden states
        passes_through = ((x.op == "call_method" and (_is_float32_cast(x) or x.target in _RESHAPE_METHODS | {"contiguous", "flatten"}))
                          or (x.op == "call_function" and x.target is torch.reshape))
        row_slice = x.op == "call_function" and x.target is operator.getitem and isinstance(traced_value(x.args[0]), torch.Tensor)
        if row_slice and not _last_dim_untouched(x.args[1], traced_value(x.args[0]).dim()):
            return None
        if x.op == "placeholder":
            raise NotChunkable("the logits are an input of this graph: the output layer is in another graph, split "
                               "from the loss by a graph break (TORCH_LOGS=graph_breaks shows where; "
                               "docs/passes/chunk.md lists known ones, e.g. transformers' GPT2LMHeadModel)")
        found_cap = _soft_cap(x)
        if found_cap is not None and not cap:
            if bias_add is not None:
                raise NotChunkable(f"a bias {bias_add.name} added after the soft-cap {_describe(x)}")
            softcap, cap = found_cap
            x = cap[0].args[0]
            if not (x.op == "call_function" and x.target in _LINEAR) and _vocabulary_bias(x) is None:
                raise NotChunkable(f"the soft-cap {_describe(cap[-1])} is not applied right after the output layer "
                                   f"(chunked: linear [+ bias] → div → tanh → mul)")
            continue
        term = _vocabulary_bias(x)
        if term is not None and bias_add is None:
            bias_add, bias_term = x, term
            x = next(a for a in x.args if a is not term)
            continue
        if not (passes_through or row_slice):
            head = _vocabulary_head_above(x, xval.shape[-1])
            if head is not None:
                raise NotChunkable(f"{_describe(x)} between the output layer {head.name} and the loss (chunked "
                                   f"between them: casts, reshapes, row slices, a bias add)")
            return None
        if not isinstance(v, torch.Tensor) or v.dim() < 1:
            return None
        chain.append(x)
        if _is_float32_cast(x):
            upcast = True
        x = x.args[0]
    if not isinstance(x, fx.Node) or needs_log_softmax and not extra:
        return None
    linear = x
    lin_args = list(linear.args) + [None] * (3 - len(linear.args))
    weight = linear.kwargs.get("weight", lin_args[1])
    vocab, d = traced_value(weight).shape
    if vocab <= d:
        # a classifier (2 labels, 10 classes): chunked, the loss would save its [N, d] and [V, d]
        # gradients instead of [N, V] logits — no fewer bytes — at the cost of the op's loop
        return None
    for n in [linear, *chain]:
        if traced_value(n).shape[-1] != vocab:
            raise NotChunkable(f"{n.name} reshapes the vocabulary dimension")
    if cap:
        # the chunked op makes the capped logits only: the uncapped ones and tanh may have no other use
        for n in [bias_add or linear, *cap[:-1]]:
            if len(n.users) != 1:
                raise NotChunkable(f"{n.name}, inside the soft-cap of the output layer {linear.name}, is used elsewhere")
    if bias_add is not None:
        if linear.kwargs.get("bias", lin_args[2]) is not None:
            raise NotChunkable(f"{bias_add.name} adds a second bias to the output layer {linear.name}")
        if len(linear.users) != 1:
            raise NotChunkable(f"the output layer {linear.name} is used before its bias {bias_term.name} is added")
        if traced_value(bias_add).dtype != traced_value(linear).dtype:
            raise NotChunkable(f"{bias_add.name} adds a {traced_value(bias_term).dtype} bias to "
                               f"{traced_value(linear).dtype} logits (the sum changes their dtype)")
    chain.reverse()
    # Logits also used elsewhere (HF returns them) stay computed for that use, and the loss is
    # chunked all the same: the log-softmax and the gradients of the loss are still never whole
    # (measured: half the peak of leaving the loss, at no step-time cost; docs/passes/chunk.md).
    if xval.dtype != torch.float32 and upcast:
        raise NotChunkable("cast to a dtype other than float32")
    return _Match(loss=node, linear=linear, chain=chain, target=target, ignore_index=int(args["ignore_index"]),
                  reduction=args["reduction"], label_smoothing=float(args["label_smoothing"]), upcast=upcast,
                  extra=extra, bias_add=bias_add, bias_term=bias_term, softcap=softcap, cap=cap)


_ADD = {operator.add, torch.add}
_DIV = {operator.truediv, torch.div, torch.true_divide}
_MUL = {operator.mul, torch.mul}
_TANH = {torch.tanh, torch._C._VariableFunctions.tanh}


def _is_call(node: Any, functions: set, method: str) -> bool:
    return isinstance(node, fx.Node) and (
        (node.op == "call_function" and node.target in functions) or (node.op == "call_method" and node.target == method))


def _soft_cap(node: fx.Node) -> tuple[float, list[fx.Node]] | None:
    """``(c, [div, tanh, mul])`` when ``node`` is ``tanh(x / c) * c`` (either factor order), the
    final logit soft-capping of Gemma 2 (transformers' ``final_logit_softcapping``); else None."""
    if not _is_call(node, _MUL, "mul") or len(node.args) != 2 or node.kwargs:
        return None
    for tanh, c in (node.args, node.args[::-1]):
        if not (_is_call(tanh, _TANH, "tanh") and isinstance(c, (int, float)) and not isinstance(c, bool) and c > 0):
            continue
        div = tanh.args[0] if len(tanh.args) == 1 and not tanh.kwargs else None
        if _is_call(div, _DIV, "div") and len(div.args) == 2 and not div.kwargs and isinstance(div.args[0], fx.Node) \
                and div.args[1] == c and not isinstance(div.args[1], bool):
            return float(c), [div, tanh, node]
    return None


def _vocabulary_bias(node: fx.Node) -> fx.Node | None:
    """``b`` when ``node`` is ``logits + b`` (either order) and ``b`` is one value per vocabulary entry
    (shape ``[V]`` or ``[1, .., 1, V]``) that broadcasts over the logits' rows; else None."""
    if node.op != "call_function" or node.target not in _ADD or len(node.args) != 2 or node.kwargs:
        return None
    out = traced_value(node)
    for term, other in (node.args, node.args[::-1]):
        tv, ov = traced_value(term), traced_value(other)
        if not (isinstance(term, fx.Node) and isinstance(other, fx.Node) and isinstance(tv, torch.Tensor)
                and isinstance(ov, torch.Tensor)):
            continue
        if tv.dim() >= 1 and tv.numel() == tv.shape[-1] == out.shape[-1] and ov.shape == out.shape:
            return term
    return None


def _vocabulary_head_above(node: fx.Node, vocab: int, depth: int = 8) -> fx.Node | None:
    """A ``linear`` with ``vocab`` > its input width among the first tensor inputs above ``node``
    (``depth`` steps): the output layer of a loss whose logits pass through an op the pattern does
    not cover (Gemma 2's soft-capping ``tanh``). None for anything else — a classifier, a loss
    over values that no output layer made."""
    x = node
    for _ in range(depth):
        if not isinstance(x, fx.Node):
            return None
        if x.op == "call_function" and x.target in _LINEAR:
            w = traced_value(x.kwargs.get("weight", x.args[1] if len(x.args) > 1 else None))
            return x if isinstance(w, torch.Tensor) and w.shape[0] == vocab > w.shape[1] else None
        x = next((a for a in x.args if isinstance(a, fx.Node) and isinstance(traced_value(a), torch.Tensor)), None)
    return None


def _describe(node: fx.Node) -> str:
    """``tanh (node tanh_1)``: the op a node calls, for a message."""
    target = node.target if node.op == "call_method" else getattr(node.target, "__name__", str(node.target))
    return f"{target} (node {node.name})"


def _fake_mode(gm: fx.GraphModule):
    for n in gm.graph.nodes:
        v = traced_value(n)
        if isinstance(v, torch._subclasses.FakeTensor):
            return v.fake_mode
    return None


def _set_value(node: fx.Node, fake_mode) -> None:
    """Give a new node its fake value, computed from its arguments' fake values."""
    args = fx.node.map_arg(node.args, traced_value)
    kwargs = fx.node.map_arg(node.kwargs, traced_value)
    with fake_mode:
        if node.op == "call_method":
            value = getattr(args[0], node.target)(*args[1:], **kwargs)
        else:
            value = node.target(*args, **kwargs)
    node.meta["example_value"] = value


def _with_last(shape_args: tuple, d: int) -> tuple:
    """``view``/``reshape`` arguments with the last size replaced by ``d`` (the hidden size)."""
    if len(shape_args) == 1 and isinstance(shape_args[0], (tuple, list, torch.Size)):
        return (tuple(shape_args[0][:-1]) + (d,),)
    return tuple(shape_args[:-1]) + (d,)


def _rewrite(gm: fx.GraphModule, m: _Match, config: ChunkConfig, fake_mode) -> int:
    """Replace one match; return the bytes of the logits chain no longer materialized."""
    graph = gm.graph
    lin_args = list(m.linear.args) + [None] * (3 - len(m.linear.args))
    hidden = m.linear.kwargs.get("input", lin_args[0])
    weight = m.linear.kwargs.get("weight", lin_args[1])
    bias = m.linear.kwargs.get("bias", lin_args[2])
    vocab, d = traced_value(weight).shape
    # forward tensors that are never made: the logits, their fp32 copy, the log-softmax (inside
    # cross_entropy, or its own node); the backward makes a gradient of each of them
    made = [n for n in [*m.head, *m.chain] if not (n.op == "call_method" and n.target in _RESHAPE_METHODS | {"contiguous"})
            and not (n.op == "call_function" and n.target in (operator.getitem, torch.reshape))
            and not (_is_float32_cast(n) and traced_value(n.args[0]).dtype == torch.float32)]  # .float() of fp32: no copy
    logits_in = traced_value(m.loss.args[0])  # the size of the log-softmax (cross_entropy makes one inside)
    created: list[fx.Node] = []

    def add(op: str, target: Any, args: tuple) -> fx.Node:
        node = graph.create_node(op, target, args)
        created.append(node)
        _set_value(node, fake_mode)
        return node

    def replay(start: fx.Node, last: int) -> fx.Node:
        """The row selections and reshapes of the chain, replayed on ``start`` (last dim ``last``), as [rows, last]."""
        cur = start
        for n in m.chain:
            if n.op == "call_function" and n.target is operator.getitem:
                cur = add("call_function", operator.getitem, (cur, n.args[1]))
            elif n.op == "call_method" and n.target in _RESHAPE_METHODS:
                cur = add("call_method", "reshape", (cur, *_with_last(n.args[1:], last)))
            elif n.op == "call_function" and n.target is torch.reshape:
                cur = add("call_method", "reshape", (cur, *_with_last(n.args[1:], last)))
            elif n.op == "call_method" and n.target == "flatten":
                cur = add("call_method", n.target, (cur, *n.args[1:]))
        return add("call_method", "reshape", (cur, -1, last))

    # Logits that something else uses (HF models return them) are computed once for that use;
    # the loss then reads them instead of multiplying again, and their backward skips the
    # matmuls when their gradient is zero (an output nobody differentiates): kernels/logits_output.py
    pattern = {*m.head, *m.chain, *m.extra, m.loss}
    logits_kept = any(u not in pattern for n in pattern - {m.loss} for u in n.users)
    with graph.inserting_before(m.loss):
        rows = traced_value(m.loss.args[0]).shape[0]
        h2d = replay(hidden, d)
        if traced_value(h2d).shape[0] != rows:
            for node in reversed(created):
                graph.erase_node(node)
            raise NotChunkable("the rows of the loss do not map onto the rows of the hidden states")
    logits = None
    # the logits are the output layer's last node: after a folded bias add (BART's
    # final_logits_bias), the linear with that bias
    source = m.head[-1]
    if m.bias_add is not None:
        with graph.inserting_after(source):
            bias = add("call_method", "reshape", (m.bias_term, -1))
    if logits_kept:
        # after the bias, which it reads (each inserting_after puts its node right after the one named)
        with graph.inserting_after(source if m.bias_add is None else bias):
            logits = add("call_function", torch.ops.fxmem.output_linear.default,
                         (hidden, weight, bias, *([m.softcap] if m.softcap else [])))
        source.replace_all_uses_with(logits)
        logits.meta.update({k: v for k, v in source.meta.items() if k not in ("example_value", "val")})
        for node in reversed(m.head):  # the logits' last node, then what only it used (bias add, cap)
            graph.erase_node(node)
        m.linear, m.bias_add, m.cap = logits, None, []
    with graph.inserting_before(m.loss):
        tgt = add("call_method", "reshape", (m.target, -1))
        bval = traced_value(bias)
        # a loss traced without grad (an evaluation under no_grad) needs no gradient, though the
        # weight is a parameter that requires one: the op then computes the loss alone
        grad = bool(traced_value(m.loss).requires_grad)
        loss_args = (h2d, weight, bias, tgt, m.ignore_index, m.reduction, m.label_smoothing, m.upcast,
                     config.chunk_tokens or 0, grad and bool(traced_value(hidden).requires_grad),
                     grad and bool(traced_value(weight).requires_grad),
                     grad and bool(bval is not None and bval.requires_grad),
                     *([m.softcap] if m.softcap else []))
        # a row slice (``logits[..., :-1, :]``) replayed on the logits would copy them whole: the
        # op then multiplies its chunks again instead (one matmul more, no [N, V] copy)
        sliced = any(n.op == "call_function" and n.target is operator.getitem for n in m.chain)
        if logits is None or sliced:
            op = add("call_function", torch.ops.fxmem.linear_cross_entropy.default, loss_args)
        else:
            op = add("call_function", torch.ops.fxmem.logits_cross_entropy.default, (replay(logits, vocab), *loss_args))
        loss = add("call_function", operator.getitem, (op, 0))
    m.loss.replace_all_uses_with(loss)
    loss.meta.update({k: v for k, v in m.loss.meta.items() if k not in ("example_value", "val")})
    position = {n: i for i, n in enumerate(graph.nodes)}
    erased = set()
    for node in sorted([m.loss, *m.chain, *m.extra, *m.head], key=position.__getitem__, reverse=True):
        if not node.users:
            graph.erase_node(node)
            erased.add(node)
    # forward tensors never made: the log-softmax, and the logits (and a real fp32 copy) unless
    # something else still uses them
    return logits_in.numel() * logits_in.element_size() + sum(
        traced_value(n).numel() * traced_value(n).element_size() for n in made if n in erased)


def chunk(gm: fx.GraphModule, config: ChunkConfig, ctx: PassContext = PassContext(stage="dynamo")) -> PassResult:
    """Replace every chunkable ``linear → cross_entropy`` (and, with ``config.mlp``, every
    position-wise MLP) of a torch-level training graph."""
    ctx.require_stage("chunk", "dynamo")
    stats: dict[str, Any] = {"regions": [], "bytes_never_materialized": 0, "not_chunked": []}
    fake_mode = _fake_mode(gm)
    autocast = any(n.op == "call_function" and "autocast" in str(n.target) for n in gm.graph.nodes)
    if config.loss:
        _chunk_losses(gm, config, fake_mode, autocast, stats)
    if config.mlp:
        _chunk_mlps(gm, config, fake_mode, autocast, stats)
    if stats["not_chunked"]:
        # the chunked loss is on by default: a user who counts on it hears why it did not apply
        warnings.warn("fxmem chunk: left as written (not chunked): " + "; ".join(stats["not_chunked"]), UserWarning,
                      stacklevel=2)
    else:
        del stats["not_chunked"]
    changed = bool(stats["regions"])
    if changed:
        gm.graph.lint()
        gm.recompile()
    return PassResult(gm, changed, stats)


def _chunk_losses(gm: fx.GraphModule, config: ChunkConfig, fake_mode, autocast: bool, stats: dict) -> None:
    for node in list(gm.graph.nodes):
        try:
            m = find_loss(node)
            if m is None:
                continue
            if autocast:
                raise NotChunkable("the loss is in an autocast region (the chunked op would not follow autocast)")
            if fake_mode is None:
                raise NotChunkable("the graph carries no fake values")
            name, linear = node.name, m.linear.name
            forward = _rewrite(gm, m, config, fake_mode)
        except NotChunkable as exc:
            stats["not_chunked"].append(f"{node.name}: {exc}")
            continue
        stats["regions"].append(f"{linear} → {name}")
        stats["bytes_never_materialized"] += 2 * forward  # the forward tensors and their gradients


def _chunk_mlps(gm: fx.GraphModule, config: ChunkConfig, fake_mode, autocast: bool, stats: dict) -> None:
    """MsT-style: each MLP becomes one ``fxmem::chunked_mlp`` (:mod:`fxmem.passes.chunk_mlp`)."""
    erased: set[fx.Node] = set()
    for node in list(gm.graph.nodes):
        if node in erased:
            continue
        m = chunk_mlp.find_mlp(node)
        if m is None:
            continue
        if autocast or fake_mode is None:
            why = "an autocast region (the chunked op would not follow autocast)" if autocast else "no fake values"
            stats["not_chunked"].append(f"{m.label}: {why}")
            continue
        label, never = m.label, m.intermediate_bytes()
        erased |= chunk_mlp.rewrite_mlp(gm, m, config.chunk_tokens or 0, lambda n: _set_value(n, fake_mode))
        stats["regions"].append(label)
        # the [N, I] intermediates are made a chunk at a time, forward and (recomputed) backward,
        # and so are their gradients
        stats["bytes_never_materialized"] += 2 * never
