"""``precision``: fp16/bf16 compute by autocast's rules; inference also stores weights low.

Before (inference, parameters frozen as ``get_attr``)::

    w = self.fc.weight                                  # fp32, 4 bytes/element
    t = aten.t(w); mm = aten.mm(x, t)
    sm = aten._softmax(mm, -1, False)
    return (sm,)

After (``precision="bf16"``)::

    w = self.fc.weight_bf16                             # bf16, 2 bytes/element (a new attribute)
    t = aten.t(w)
    x_low = aten._to_copy(x, dtype=bf16); mm = aten.mm(x_low, t)       # matmul in bf16
    mm_f = aten._to_copy(mm, dtype=fp32); sm = aten._softmax(mm_f, -1, False)  # kept in fp32
    return (sm,)                                        # outputs in the model's dtype

Every call is put in one of three classes — the classes of ``torch.autocast``
(``ATen/autocast_mode.h``), with the CUDA lists used on every device:

* ``LOW`` (``AT_FORALL_LOWER_PRECISION_FP``: mm, addmm, bmm, baddbmm, convolution, attention, ...):
  fp32 tensor inputs are cast to the low dtype; the op runs and returns low.
* ``FP32`` (``AT_FORALL_FP32`` and ``AT_FORALL_FP32_SET_OPT_DTYPE``, mapped to the ATen ops of our
  IR: ``_softmax``, ``_log_softmax``, ``native_layer_norm``, ``exp``, ``log``, ``pow``, ``rsqrt``,
  ``sum``, ``cumsum``, the losses, ... and their backward ops; fxmem adds batch norm, which
  autocast leaves to cuDNN's fp32 statistics): every input gets back the dtype it had in the
  original graph, so the op computes exactly as before.
* everything else runs on whatever dtypes reach it (autocast's "no policy"), except that a frozen
  weight stored low is shown to such an op in its original dtype — under autocast that op would
  have seen the fp32 weight. Data-movement ops (views, ``embedding``, ``cat``, ``clone``) pass the
  low weight through unchanged, so an embedding table is gathered in bf16 and only the gathered
  rows are widened. An op that cannot run on the new dtypes runs as in the original graph.

So activations carry the dtypes autocast would give them; the difference is the weights:

* Inference: every fp32 weight with two or more dimensions (matrices, embedding tables, conv
  kernels) is stored in the low dtype as a new attribute (parameter bytes about 0.5×, where
  autocast keeps 1×). One-dimensional weights (norm scales, biases, rotary frequencies) stay fp32:
  they are a fraction of a percent of a real model's bytes and the most sensitive to rounding.
  Weights read by several nodes (tied) get one low copy.
* Overflow guard (inference, ``overflow_guard=True``): the original graph runs once on
  the example inputs (``PassContext.example_inputs``; a ``torch.fx.Interpreter``); any value whose finite
  ``|x|max`` exceeds half the low dtype's largest number (fp16: 65504 / 2) keeps the op that
  produces it in fp32, and so does every ``LOW`` op that reads it — the T5 ``wo`` case
  (transformers#5651) found automatically instead of a hand-written ``_keep_in_fp32_modules``.
  Weights beyond that range stay fp32, and so do weights read only by ops the guard keeps (the
  ``wo`` weight itself, as HF's ``_keep_in_fp32_modules`` keeps it). What was kept and why is in
  ``stats["overflow_kept"]`` and ``stats["weights_kept_fp32"]``.
* ``LOW`` ops that read integers converted to float (positions) stay fp32: bf16 holds integers
  exactly only up to 256, fp16 up to 2048.
* Training (joint graph): parameters and their gradients stay fp32 (master weights). The joint
  graph is rewritten like autocast runs it: forward and backward matmuls in the low dtype (casts
  in front of them), the fp32 classes in fp32, and the gradient outputs cast back to the
  parameters' dtype — the same place the backward of autocast's cast puts them.

Preconditions: an ATen graph from AOTAutograd whose computing nodes carry ``meta["val"]``;
inference graphs with frozen ``get_attr`` weights. Only fp32 tensors change dtype (fp64 and
integer tensors are left alone). Numerical promise: outputs within the low dtype's rounding of the
fp32 reference — about the error of ``torch.autocast`` (measured in docs/passes/precision.md); on
the example inputs ``stats["max_abs_error"]`` reports it. The rewritten inference graph is run once
on the example inputs; if it fails there, the pass raises :class:`UnsupportedGraph`.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

from fxmem.analysis.sizes import fetch_attr, is_alias_op, parameter_bytes
from fxmem.config import PrecisionConfig
from fxmem.freeze import drop_unused_attrs, set_attr
from fxmem.passes.base import PassContext, PassResult, UnsupportedGraph
from fxmem.passes.base import val as _val

aten = torch.ops.aten

# autocast's AT_FORALL_LOWER_PRECISION_FP, as the ATen ops an AOTAutograd graph holds (linear and
# matmul decompose to mm/addmm/bmm; conv to convolution), plus the backward ops of those that
# have their own (convolution_backward, the attention backwards).
LOW_OPS = frozenset({
    "_convolution", "convolution", "conv1d", "conv2d", "conv3d", "conv_tbc", "conv_transpose1d",
    "conv_transpose2d", "conv_transpose3d", "prelu", "addmm", "addmv", "addr", "matmul", "einsum",
    "mm", "mv", "linalg_vecdot", "linear", "addbmm", "baddbmm", "bmm", "chain_matmul",
    "linalg_multi_dot", "_thnn_fused_lstm_cell", "_thnn_fused_gru_cell", "lstm_cell", "gru_cell",
    "rnn_tanh_cell", "rnn_relu_cell", "_scaled_dot_product_flash_attention",
    "scaled_dot_product_attention", "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
    "convolution_backward", "_scaled_dot_product_flash_attention_backward",
    "_scaled_dot_product_flash_attention_for_cpu_backward", "_scaled_dot_product_efficient_attention_backward",
})

# Arguments of LOW ops that are fp32 by the kernel's contract, never activations to cast.
_LOW_OP_FP32_ARGS = frozenset({"logsumexp"})

# autocast's AT_FORALL_FP32 and AT_FORALL_FP32_SET_OPT_DTYPE (CUDA lists).
_AUTOCAST_FP32 = (
    "acos", "asin", "cosh", "erfinv", "exp", "expm1", "log", "log10", "log2", "log1p", "reciprocal",
    "rsqrt", "sinh", "tan", "pow", "softplus", "layer_norm", "native_layer_norm", "rms_norm",
    "group_norm", "frobenius_norm", "nuclear_norm", "cosine_similarity", "poisson_nll_loss",
    "cosine_embedding_loss", "nll_loss", "nll_loss2d", "hinge_embedding_loss", "kl_div", "l1_loss",
    "smooth_l1_loss", "huber_loss", "mse_loss", "margin_ranking_loss", "multilabel_margin_loss",
    "soft_margin_loss", "triplet_margin_loss", "multi_margin_loss", "binary_cross_entropy_with_logits",
    "dist", "pdist", "cdist", "renorm", "logsumexp", "upsample_nearest1d", "_upsample_nearest_exact1d",
    "upsample_nearest2d", "_upsample_nearest_exact2d", "upsample_nearest3d", "_upsample_nearest_exact3d",
    "upsample_linear1d", "upsample_bilinear2d", "_upsample_bilinear2d_aa", "upsample_trilinear3d",
    "upsample_bicubic2d", "_upsample_bicubic2d_aa",
    # AT_FORALL_FP32_SET_OPT_DTYPE
    "prod", "softmax", "log_softmax", "cumprod", "cumsum", "linalg_vector_norm", "linalg_matrix_norm",
    "sum", "norm",
)
# fxmem's additions: batch norm (autocast on CUDA reaches cuDNN with fp32 weights and statistics).
_FXMEM_FP32 = ("batch_norm", "native_batch_norm", "_native_batch_norm_legit", "_native_batch_norm_legit_no_training",
               "_native_batch_norm_legit_functional", "native_group_norm", "_fused_rms_norm", "cross_entropy")


def _with_ir_names(names) -> frozenset[str]:
    """The ATen names an op list reaches in our IR: ``softmax`` → ``_softmax``, its backwards."""
    out = set()
    for name in names:
        for cand in (name, "_" + name, name + "_forward", name + "_backward", "_" + name + "_backward_data",
                     name + "_backward_data", "native_" + name, "native_" + name + "_backward", "_fused_" + name,
                     "_fused_" + name + "_backward", name + "2d_forward", name + "2d_backward"):
            if hasattr(aten, cand):
                out.add(cand)
    return frozenset(out)


FP32_OPS = _with_ir_names(_AUTOCAST_FP32 + _FXMEM_FP32)

# Ops that move data without arithmetic (exact in any dtype): a low weight passes through them.
MOVE_OPS = frozenset({
    "clone", "_unsafe_view", "embedding", "index_select", "index", "gather", "cat", "stack", "repeat",
    "roll", "flip", "constant_pad_nd", "expand_copy", "view_copy", "permute_copy", "t_copy",
    "transpose_copy", "unsqueeze_copy", "squeeze_copy", "slice_copy", "select_copy", "lift_fresh_copy",
})

# A value kept low must not exceed this fraction of the low dtype's largest finite number: the
# example inputs are a sample, other inputs reach further.
OVERFLOW_MARGIN = 0.5

_LOW, _FP32, _FOLLOW = "low", "fp32", "follow"


def _name(target) -> str:
    return target._opname if isinstance(target, torch._ops.OpOverload) else ""  # "pow", not "pow.Tensor_Scalar"


def op_class(target, extra_fp32: frozenset[str] = frozenset()) -> str:
    """``"low"``, ``"fp32"`` or ``"follow"`` for a call target (see the module docstring)."""
    name = _name(target)
    if name in extra_fp32 or name.lstrip("_") in extra_fp32:
        return _FP32
    if name in LOW_OPS:
        return _LOW
    if name in FP32_OPS:
        return _FP32
    return _FOLLOW


def _normalize_keep(names: tuple[str, ...]) -> frozenset[str]:
    out = set()
    for n in names:
        n = n.split("::")[-1].removeprefix("torch.ops.").removeprefix("aten.").split(".")[0]
        out |= {n, n.lstrip("_")}
    return frozenset(out)


def _dtype(node) -> torch.dtype | None:
    v = _val(node)
    return v.dtype if isinstance(v, torch.Tensor) else None


def _finite_absmax(t: torch.Tensor) -> float:
    if not t.is_floating_point() or t.numel() == 0:
        return 0.0
    t = t.detach()
    return float(torch.where(torch.isfinite(t), t.abs(), torch.zeros((), dtype=t.dtype, device=t.device)).max())


def _real(example) -> bool:
    return not any(isinstance(t, FakeTensor) for t in torch.utils._pytree.tree_leaves(example))


class _RangeInterpreter(fx.Interpreter):
    """Runs the graph and records the finite ``|x|max`` of every floating value."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.absmax: dict[fx.Node, float] = {}

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        leaves = [out] if isinstance(out, torch.Tensor) else [x for x in out if isinstance(x, torch.Tensor)] if isinstance(out, (list, tuple)) else []
        if leaves:
            self.absmax[n] = max(_finite_absmax(t) for t in leaves)
        return out


@dataclass
class _Plan:
    """What the walk needs to know before it rewrites: forced-fp32 nodes and kept weights."""

    forced: dict[fx.Node, dict] = field(default_factory=dict)         # node → report row: why it stays fp32
    weights_fp32: dict[str, str] = field(default_factory=dict)        # attribute target → why
    guard: str = "off"
    rows: list[dict] = field(default_factory=list)                    # forced nodes that would have run low


def _overflow_plan(gm: fx.GraphModule, config: PrecisionConfig, plan: _Plan, example: tuple | None) -> dict[fx.Node, object] | None:
    """Run the original graph on the example inputs; force fp32 where values exceed the range."""
    if not config.overflow_guard:
        plan.guard = "off (overflow_guard=False)"
        return None
    if example is None:
        plan.guard = "not run: the graph has no example inputs (PassContext.example_inputs)"
        return None
    if not _real(example):
        plan.guard = "not run: the example inputs are fake tensors (no values to measure ranges on)"
        return None
    interp = _RangeInterpreter(gm)
    with torch.no_grad():
        outputs = interp.run(*example)
    limit = torch.finfo(config.dtype).max * OVERFLOW_MARGIN
    plan.guard = f"ran on the example inputs; limit |x|max <= {limit:.6g}"
    for node, amax in interp.absmax.items():
        if amax <= limit:
            continue
        if node.op == "get_attr":
            plan.weights_fp32[node.target] = f"its values reach |x|max {amax:.6g} > {limit:.6g}"
            continue
        if node.op == "call_function" and not is_alias_op(node) and op_class(node.target) != _FP32:
            plan.forced.setdefault(node, {"node": node.name, "op": _name(node.target) or str(node.target), "absmax": amax,
                                          "why": f"its output reaches |x|max {amax:.6g} > {limit:.6g}"})
        for user in node.users:
            if user.op == "call_function" and op_class(user.target) == _LOW and user not in plan.forced:
                plan.forced[user] = {"node": user.name, "op": _name(user.target), "absmax": amax,
                                     "why": f"its input {node.name} reaches |x|max {amax:.6g} > {limit:.6g}"}
    return {"outputs": outputs}


class _Rewriter:
    """Walks the graph once in order, inserting casts and recomputing ``meta["val"]``."""

    def __init__(self, gm: fx.GraphModule, config: PrecisionConfig, plan: _Plan, inference: bool):
        self.gm, self.graph, self.config, self.plan, self.inference = gm, gm.graph, config, plan, inference
        self.low = config.dtype
        self.extra_fp32 = _normalize_keep(config.keep_fp32)
        vals = [n.meta.get("val") for n in gm.graph.nodes]
        self.fake_mode = detect_fake_mode(vals) or FakeTensorMode(allow_non_fake_inputs=True)
        self.orig: dict[fx.Node, torch.dtype | None] = {n: _dtype(n) for n in gm.graph.nodes}
        self.derived: set[fx.Node] = set()      # values that are (moved) low-stored weights
        self.int_derived: set[fx.Node] = set()  # values converted from integer tensors
        self.casts: dict[tuple[fx.Node, torch.dtype], fx.Node] = {}
        self.counts = {"low": 0, "fp32": 0, "follow_restored": 0, "casts": 0}
        self.kept: list[dict] = []
        self.weights_low: list[str] = []
        self.weights_fp32: list[dict] = []

    # -- casts ------------------------------------------------------------------------------
    def cast(self, src: fx.Node, dtype: torch.dtype, before: fx.Node) -> fx.Node:
        if _dtype(src) == dtype:
            return src
        key = (src, dtype)
        if key not in self.casts:
            with self.graph.inserting_before(before):
                node = self.graph.call_function(aten._to_copy.default, (src,), {"dtype": dtype})
            with self.fake_mode:
                node.meta["val"] = aten._to_copy.default(src.meta["val"], dtype=dtype)
            node.meta["fxmem_precision_cast"] = True
            self.casts[key] = node
            self.orig[node] = dtype
            self.counts["casts"] += 1
        return self.casts[key]

    # -- weights ----------------------------------------------------------------------------
    def store_weights_low(self) -> None:
        """Inference: one low copy per distinct fp32 weight tensor with >= 2 dimensions."""
        made: dict[int, tuple[str, torch.Tensor]] = {}
        taken = {name for name, _ in self.gm.named_buffers()} | {name for name, _ in self.gm.named_parameters()}
        suffix = {torch.float16: "fp16", torch.bfloat16: "bf16"}[self.low]
        for node in list(self.graph.nodes):
            if node.op != "get_attr":
                continue
            value = fetch_attr(self.gm, node.target)
            if not isinstance(value, torch.Tensor) or value.dtype != torch.float32:
                continue
            fqn = node.meta.get("fxmem_fqn", node.target)
            if node.target in self.plan.weights_fp32:
                if value.dim() >= 2:
                    self.weights_fp32.append({"weight": fqn, "why": self.plan.weights_fp32[node.target]})
                continue
            if value.dim() < 2:
                continue
            if self.config.weights == "autocast" and not self._only_low_uses(node):
                continue
            if self.plan.forced and self._only_forced_uses(node):
                self.weights_fp32.append({"weight": fqn, "why": "only read by ops the overflow guard keeps in fp32"})
                continue
            key = id(value)
            if key not in made:
                target = f"{node.target}_{suffix}"
                i = 1
                while target in taken:
                    target, i = f"{node.target}_{suffix}{i}", i + 1
                taken.add(target)
                low = value.detach().to(self.low)
                set_attr(self.gm, target, low)
                made[key] = (target, low)
                self.weights_low.append(fqn)
            target, low = made[key]
            node.target = target
            node.meta["val"] = self.fake_mode.from_tensor(low, static_shapes=True)
            self.derived.add(node)

    def _final_uses(self, node: fx.Node) -> list[fx.Node]:
        """The nodes that compute with the weight's values (views and data movement followed)."""
        stack, seen, out = list(node.users), set(), []
        while stack:
            user = stack.pop()
            if user in seen:
                continue
            seen.add(user)
            if user.op == "call_function" and (is_alias_op(user) or _name(user.target) in MOVE_OPS):
                stack.extend(user.users)
            else:
                out.append(user)
        return out

    def _is_low_use(self, user: fx.Node) -> bool:
        return user.op == "call_function" and op_class(user.target, self.extra_fp32) == _LOW and user not in self.plan.forced

    def _only_low_uses(self, node: fx.Node) -> bool:
        """Every use of the weight is a LOW op that runs low (autocast rounds it there anyway)."""
        return all(self._is_low_use(u) for u in self._final_uses(node))

    def _only_forced_uses(self, node: fx.Node) -> bool:
        """The overflow guard keeps every op that computes with the weight in fp32 (T5's ``wo``)."""
        uses = self._final_uses(node)
        return bool(uses) and all(u in self.plan.forced for u in uses)

    # -- the walk -----------------------------------------------------------------------------
    def _arg_names(self, node: fx.Node) -> list[tuple[object, str, str | int]]:
        schema = getattr(node.target, "_schema", None)
        names = [a.name for a in schema.arguments] if schema is not None else []
        items = []
        for i, a in enumerate(node.args):
            items.append((a, names[i] if i < len(names) else str(i), i))
        for k, a in node.kwargs.items():
            items.append((a, k, k))
        return items

    def _rebuild(self, node: fx.Node, decide) -> None:
        """Replace every tensor input ``x`` (also inside lists) by ``decide(x, arg_name)``."""
        args, kwargs = list(node.args), dict(node.kwargs)
        for value, name, where in self._arg_names(node):
            if isinstance(value, fx.Node):
                new = decide(value, name)
            elif isinstance(value, (list, tuple)):
                new = type(value)(decide(v, name) if isinstance(v, fx.Node) else v for v in value)
            else:
                continue
            if isinstance(where, int):
                args[where] = new
            else:
                kwargs[where] = new
        node.args, node.kwargs = tuple(args), kwargs

    def _restore_all(self, node: fx.Node) -> None:
        def restore(x: fx.Node, name: str) -> fx.Node:
            d, o = _dtype(x), self.orig.get(x)
            return self.cast(x, o, node) if d is not None and o is not None and d != o else x
        self._rebuild(node, restore)

    def _inputs_changed(self, node: fx.Node) -> bool:
        return any(_dtype(x) != self.orig.get(x) for x in node.all_input_nodes)

    def _recompute(self, node: fx.Node) -> None:
        if node.target is operator.getitem:
            parent = node.args[0].meta.get("val")
            node.meta["val"] = parent[node.args[1]]
            return
        args = fx.node.map_arg(node.args, _val)
        kwargs = fx.node.map_arg(node.kwargs, _val)
        with self.fake_mode:
            node.meta["val"] = node.target(*args, **kwargs)

    def visit(self, node: fx.Node) -> None:
        inputs = node.all_input_nodes
        args_before = (node.args, dict(node.kwargs))
        if node.target is operator.getitem:
            if self._inputs_changed(node):
                self._recompute(node)
            return
        name = _name(node.target)
        if name == "_assert_tensor_metadata":
            # export's dtype assertion on a value whose dtype this pass changed: assert the new one
            checked = _dtype(node.args[0])
            if len(node.args) > 3 and node.args[3] is not None and checked is not None:
                node.args = (*node.args[:3], checked, *node.args[4:])
            elif node.kwargs.get("dtype") is not None and checked is not None:
                node.kwargs = {**node.kwargs, "dtype": checked}
            return
        cls = op_class(node.target, self.extra_fp32)
        why = None
        if node in self.plan.forced:
            row = self.plan.forced[node]
            # report it only where the guard changed something: the op would have run low
            if cls == _LOW or any(_dtype(x) != self.orig.get(x) for x in inputs):
                self.plan.rows.append(row)
            cls = _FP32  # reported in stats["overflow_kept"]
        elif cls == _LOW and any(x in self.int_derived for x in inputs):
            cls, why = _FP32, "reads integers converted to float (exact in bf16 only to 256, in fp16 to 2048)"
        elif cls == _FP32 and (name in self.extra_fp32 or name.lstrip("_") in self.extra_fp32):
            why = "keep_fp32 option"
        if why is not None:
            self.kept.append({"node": node.name, "op": name, "why": why})

        if cls == _LOW:
            def to_low(x: fx.Node, arg: str) -> fx.Node:
                if _dtype(x) == torch.float32 and arg not in _LOW_OP_FP32_ARGS:
                    return self.cast(x, self.low, node)
                return x
            self._rebuild(node, to_low)
            self.counts["low"] += 1
        elif cls == _FP32:
            self._restore_all(node)
            self.counts["fp32"] += 1
        else:
            moving = is_alias_op(node) or name in MOVE_OPS
            if not moving:
                # a weight stored low is seen as autocast shows it: in its original dtype
                def widen(x: fx.Node, arg: str) -> fx.Node:
                    if x in self.derived and _dtype(x) != self.orig.get(x):
                        return self.cast(x, self.orig[x], node)
                    return x
                self._rebuild(node, widen)
            if any(x in self.derived for x in node.all_input_nodes) and moving:
                self.derived.add(node)
            if moving and any(x in self.int_derived for x in node.all_input_nodes):
                self.int_derived.add(node)
        if name == "_to_copy" and inputs and _dtype(inputs[0]) is not None and not _dtype(inputs[0]).is_floating_point \
                and node.kwargs.get("dtype") in (torch.float32, torch.float64):
            self.int_derived.add(node)

        if not self._inputs_changed(node) and (node.args, dict(node.kwargs)) == args_before:
            return  # same inputs as before: meta["val"] stays valid
        try:
            self._recompute(node)
        except Exception as exc:  # noqa: BLE001 - the op does not accept these dtypes: run it as before
            if cls == _FP32:
                raise UnsupportedGraph(node.target, "cannot recompute its value with its original input dtypes") from exc
            self._restore_all(node)
            self.counts["follow_restored"] += 1
            self.kept.append({"node": node.name, "op": name, "why": "does not accept the low dtype: runs as before"})
            self.derived.discard(node)
            self._recompute(node)

    def run(self) -> None:
        for node in list(self.graph.nodes):
            if node.op == "call_function" and not node.meta.get("fxmem_precision_cast"):
                self.visit(node)
            elif node.op == "output":
                self._restore_all(node)


def _max_abs_error(ref, out) -> float:
    leaves_r = [t for t in torch.utils._pytree.tree_leaves(ref) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    leaves_o = [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    errs = [float((o.double() - r.double()).abs().max()) for r, o in zip(leaves_r, leaves_o) if r.numel()]
    return max(errs) if errs else 0.0


def cast_precision(gm: fx.GraphModule, config: PrecisionConfig, ctx: PassContext = PassContext()) -> PassResult:
    """Rewrite ``gm`` to compute in ``config.dtype`` (see the module docstring).

    Casts real weights and runs the graph on ``ctx.example_inputs``: the pipeline runs it outside
    AOTAutograd's fake mode (``real_tensors`` in :data:`fxmem.pipeline.PASSES`)."""
    ctx.require_stage("precision", "inference", "joint")
    stage = ctx.stage
    inference = ctx.inference
    example = ctx.example_inputs
    bytes_before = parameter_bytes(gm)
    attrs_before = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    plan = _Plan()
    reference = _overflow_plan(gm, config, plan, example) if inference else None
    if not inference:
        plan.guard = f"not run on the {stage} graph: it has no example inputs; parameters stay fp32 (master weights)"
    rw = _Rewriter(gm, config, plan, inference)
    if inference:
        rw.store_weights_low()
    rw.run()
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    if inference:
        drop_unused_attrs(gm, attrs_before)

    stats: dict = {
        "dtype": str(config.dtype).removeprefix("torch."),
        "stage": stage,
        "ops_low": rw.counts["low"],
        "ops_fp32": rw.counts["fp32"],
        "casts_inserted": rw.counts["casts"],
        "ops_run_as_before": rw.counts["follow_restored"],
        "param_bytes_before": bytes_before,
        "param_bytes_after": parameter_bytes(gm),
        "weights_low": len(rw.weights_low),
        "weights_kept_fp32": rw.weights_fp32,
        "overflow_guard": plan.guard,
        "overflow_kept": plan.rows,
        "kept_fp32": rw.kept,
    }
    if reference is not None:
        try:
            with torch.no_grad():
                out = gm(*example)
        except Exception as exc:  # noqa: BLE001 - a kernel missing for the low dtype on this device
            raise UnsupportedGraph("low-precision graph", f"fails on the example inputs: {exc}") from exc
        stats["max_abs_error"] = _max_abs_error(reference["outputs"], out)
    changed = rw.counts["casts"] > 0 or bool(rw.weights_low)
    return PassResult(gm, changed, stats)


__all__ = ["cast_precision", "op_class", "LOW_OPS", "FP32_OPS", "MOVE_OPS", "OVERFLOW_MARGIN", "PrecisionConfig"]
