"""int8: rewrite linear layers with frozen weights to int8 weights and fp32 scales (inference).

Before (a frozen ``nn.Linear`` in the ATen IR)::

    fc_weight = self.fc.weight                      # fp32 [N, K]
    t = aten.t(fc_weight)
    addmm = aten.addmm(fc_bias, x, t)

After::

    fc_weight_int8 = self.fc_weight_int8            # int8 [N, K], quantized once, here
    fc_weight_scales = self.fc_weight_scales        # fp32 [N] (or [N, K // group_size])
    addmm = fxmem.int8_linear(x, fc_weight_int8, fc_weight_scales, fc_bias, 'weight_only')

What is rewritten: ``aten.mm(x, t(W))``, ``aten.addmm(b, x, t(W))`` (``t`` may also be
``permute(W, [1, 0])`` / ``transpose(W, 0, 1)``), ``aten.linear(x, W, b)``, and the un-transposed
form ``mm/addmm(x, W)`` of HF's ``Conv1D`` (then ``W.T`` is what is quantized), where ``W`` is a
frozen 2-D floating ``get_attr``. The ``aten.view``s around a 3-D linear stay: they are free.
Weights are quantized per unique tensor: two ``get_attr`` nodes that read one tensor (a tied
``wte``/``lm_head``, a layer applied twice) share one int8 buffer, and an ``aten.embedding`` that
reads the same tied weight becomes ``fxmem.int8_embedding`` on that buffer (per-row scales of
``lm_head`` are per-row scales of the embedding). A weight is left in fp32 when any of its uses
is something else (a conv, a ``bmm``, a weight used as an activation, both orientations), since
int8 beside the fp32 copy would add memory; such weights are listed in ``stats["skipped"]``.

Mixture-of-experts weights (HF Mixtral's ``experts.gate_up_proj`` / ``down_proj``)::

    w = self.experts.down_proj                          # fp32 [E, N, K]
    t = aten.transpose(w, -2, -1)
    y = transformers.grouped_mm_fallback(x, t, offs)    # or aten._grouped_mm(x, t, offs)
  → y = fxmem.int8_grouped_mm(x, down_proj_int8, down_proj_scales, offs)   # int8 [E, N, K], fp32 [E, N]

Options (:class:`fxmem.config.Int8Config`): ``mode`` ``"weight_only"`` (int8 weights, float
compute) or ``"dynamic"`` (per-token int8 activations too, int32 accumulation); ``granularity``
``"per_channel"`` (one scale per output row) or ``"per_group"`` (``group_size`` input columns per
scale; a weight whose K is not a multiple of it falls back to per-channel, noted in its row);
``skip``: fnmatch patterns on module paths (``fxmem_fqn`` or the ``get_attr`` target, without
``.weight``); ``min_numel``: smaller weights stay.

Preconditions: an inference graph (``ctx.stage == "inference"``, parameters frozen
as ``get_attr``); every replaced node carries ``meta["val"]`` (the new node takes it over: the
op's output has the same shape, dtype and layout).

Numerical promise: weight-only, each weight element moves by at most half its scale
(``amax/254`` of its channel or group); the per-layer weight SQNR is reported in
``stats["layers"]`` (per channel: ≈ 45 dB for Gaussian weights, ≈ 48 dB for ``nn.Linear``'s
uniform init). Expert weights (3-D, read by a grouped matmul) are quantized the same way, per
expert and output channel, weight-only. Dynamic mode adds per-token activation rounding of the same size. Outputs are not
bit-exact; the tests hold them to a relative L2 error below 3 % on the sample models and HF
models from small configs (below 5 % on random programs). The fp32 weights a
graph no longer reads are watched by :class:`fxmem.freeze.WeightWatch` (changed in place →
the backend quantizes again, an optimized module raises).
"""

from __future__ import annotations

import fnmatch
import inspect
import re
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode

from fxmem.analysis.grouped import grouped_mm_operands, is_last_two_transpose
from fxmem.analysis.sizes import fetch_attr, tensor_bytes
from fxmem.config import Int8Config, OptionError
from fxmem.kernels import int8_matmul
from fxmem.passes.base import KernelRecord, PassContext, PassResult, UnsupportedGraph, shallow_copy

aten = torch.ops.aten

_TRANSPOSES = {aten.t.default, aten.permute.default, aten.transpose.int}
_EMBEDDING = aten.embedding.default


@dataclass
class _Use:
    """One node that reads a weight and will read its int8 form instead."""

    node: fx.Node            # mm / addmm / linear / embedding
    kind: str                # "linear" | "embedding"
    orientation: str         # "NK": weight rows are output channels; "KN": mm(x, W) with W [K, N]

    def operands(self) -> tuple:
        """``(x, bias)`` read now: an earlier rewrite may have replaced the node producing ``x``."""
        node = self.node
        if node.target is aten.mm.default:
            return node.args[0], None
        if node.target is aten.addmm.default:
            return node.args[1], node.args[0]
        return node.args[0], node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")  # aten.linear


@dataclass
class _Weight:
    """A unique weight tensor and every graph use of it."""

    tensor: torch.Tensor
    attrs: list[fx.Node] = field(default_factory=list)
    uses: list[_Use] = field(default_factory=list)
    problem: str | None = None

    def names(self) -> list[str]:
        out = []
        for a in self.attrs:
            for name in (a.meta.get("fxmem_fqn"), a.target):
                if name and name not in out:
                    out.append(name)
        return out

    def module_paths(self) -> list[str]:
        return [n.removesuffix(".weight") for n in self.names()]


def _is_transpose_2d(node: fx.Node) -> bool:
    if node.op != "call_function" or node.target not in _TRANSPOSES:
        return False
    if node.target is aten.permute.default:
        return list(node.args[1]) == [1, 0]
    if node.target is aten.transpose.int:
        return sorted(d % 2 for d in node.args[1:3]) == [0, 1]
    return True


def _default_scalars(node: fx.Node) -> bool:
    # addmm(b, x, w, beta=1, alpha=1): anything else is not a plain linear
    return node.kwargs.get("beta", 1) == 1 and node.kwargs.get("alpha", 1) == 1


def _linear_use(user: fx.Node, w: fx.Node, orientation: str) -> _Use | None:
    """``user`` reads ``w`` (the weight or its transpose) as the weight of a linear, or None."""
    if user.op != "call_function":
        return None
    t = user.target
    if t is aten.mm.default and len(user.args) == 2 and user.args[1] is w and user.args[0] is not w:
        return _Use(user, "linear", orientation)
    if (t is aten.addmm.default and len(user.args) == 3 and user.args[2] is w and w not in user.args[:2]
            and _default_scalars(user)):
        return _Use(user, "linear", orientation)
    return None


def _classify(attr: fx.Node, user: fx.Node) -> list[_Use] | str:
    """The uses of weight ``attr`` through ``user``, or a reason it cannot be rewritten."""
    if user.op == "call_function" and user.target is aten.linear.default and user.args[1] is attr and user.args[0] is not attr:
        return [_Use(user, "linear", "NK")]
    if user.op == "call_function" and user.target is _EMBEDDING and user.args[0] is attr and attr not in user.args[1:]:
        return [_Use(user, "embedding", "NK")]
    if _is_transpose_2d(user):
        uses = []
        for u in user.users:
            use = _linear_use(u, user, "NK")
            if use is None:
                return f"its transpose is read by {u.target}"
            uses.append(use)
        return uses
    use = _linear_use(user, attr, "KN")
    if use is not None:
        return [use]
    return f"it is read by {user.target if user.op == 'call_function' else user.op}"


def _storage_key(t: torch.Tensor) -> tuple:
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


def _collect(gm: fx.GraphModule) -> list[_Weight]:
    """Every frozen 2-D floating weight the graph reads, grouped per unique tensor."""
    weights: dict[tuple, _Weight] = {}
    for node in gm.graph.nodes:
        if node.op != "get_attr":
            continue
        value = fetch_attr(gm, node.target)
        if not isinstance(value, torch.Tensor) or value.dim() != 2 or not value.is_floating_point():
            continue
        entry = weights.setdefault(_storage_key(value), _Weight(value))
        entry.attrs.append(node)
        for user in node.users:
            found = _classify(node, user)
            if isinstance(found, str):
                entry.problem = entry.problem or found
            else:
                entry.uses.extend(found)
    return list(weights.values())


def _skip_reason(weight: _Weight, config: Int8Config) -> str | None:
    """Why a weight that a linear reads stays fp32 (None: quantize it)."""
    if weight.problem is not None:
        return f"kept fp32: {weight.problem}"
    orientations = {u.orientation for u in weight.uses}
    if len(orientations) > 1:
        return "kept fp32: read both as W and as W.T by linears"
    if "KN" in orientations and any(u.kind == "embedding" for u in weight.uses):
        return "kept fp32: read by an embedding and un-transposed by a matmul"
    return skipped_by_user(weight, config.skip, config.min_numel)


def skipped_by_user(weight: _Weight, skip: tuple[str, ...], min_numel: int) -> str | None:
    """Why the user's ``skip`` patterns or ``min_numel`` leave a weight alone (None: they don't).
    Shared by every weight rewrite that takes those two options (int8, quantize, lowrank)."""
    for path in weight.module_paths():
        for pattern in skip:
            if fnmatch.fnmatchcase(path, pattern):
                return f"skipped by pattern {pattern!r}"
    if weight.tensor.numel() < min_numel:
        return f"smaller than min_numel={min_numel}"
    return None


def _flat_name(gm: fx.GraphModule, base: str) -> str:
    name = re.sub(r"\W", "_", base)
    name = "_" + name if name[0].isdigit() else name
    candidate, i = name, 1
    while hasattr(gm, candidate):
        candidate, i = f"{name}_{i}", i + 1
    return candidate


def _add_constant(gm: fx.GraphModule, base: str, value: torch.Tensor, before: fx.Node, fake_mode, fqn: str, role: str) -> fx.Node:
    """A new buffer on ``gm`` and a ``get_attr`` reading it (never touches the model's tensors)."""
    name = _flat_name(gm, base)
    gm.register_buffer(name, value)
    with gm.graph.inserting_before(before):
        node = gm.graph.get_attr(name)
    if fake_mode is not None:
        node.meta["val"] = fake_mode.from_tensor(value, static_shapes=True)
    node.meta["fxmem_fqn"] = fqn
    node.meta["fxmem_int8"] = role  # "qweight" | "scales": later weight passes leave these alone
    return node


def _rewrite_use(gm: fx.GraphModule, use: _Use, qnode: fx.Node, snode: fx.Node, mode: str, dtype: torch.dtype) -> fx.Node:
    with gm.graph.inserting_before(use.node):
        if use.kind == "embedding":
            new = gm.graph.call_function(torch.ops.fxmem.int8_embedding.default, (qnode, snode, use.node.args[1], dtype))
        else:
            x, bias = use.operands()
            new = gm.graph.call_function(torch.ops.fxmem.int8_linear.default, (x, qnode, snode, bias, mode))
    # same shape, dtype and (contiguous) layout as the node it replaces
    new.meta.update(use.node.meta)
    use.node.replace_all_uses_with(new)
    gm.graph.erase_node(use.node)
    return new


def _granularity(k: int, config: Int8Config) -> tuple[int | None, str]:
    if config.granularity == "per_group":
        if k % config.group_size == 0:
            return config.group_size, f"per_group({config.group_size})"
        return None, f"per_channel (K={k} not a multiple of group_size={config.group_size})"
    return None, "per_channel"


def _kernel_record(config: Int8Config, replaced: list[str], saved: int) -> KernelRecord:
    if config.mode == "weight_only":
        return KernelRecord(name=int8_matmul.KERNEL_NAME, nodes_replaced=replaced, bytes_saved=saved,
                            source=int8_matmul.kernel_source())
    return KernelRecord(name="fxmem_int8_dynamic_linear (torch._int_mm)", nodes_replaced=replaced, bytes_saved=saved,
                        source=inspect.getsource(int8_matmul.dynamic_linear_aten))


# --------------------------------------------------------------------------------------------
# Mixture-of-experts weights: 3-D [E, N, K] parameters read by a grouped matmul
# --------------------------------------------------------------------------------------------


def _collect_experts(gm: fx.GraphModule) -> list[tuple[fx.Node, torch.Tensor, str, list[fx.Node] | str]]:
    """Frozen 3-D floating weights read by grouped matmuls: ``(attr, tensor, orientation, uses or
    reason)``; orientation ``"ENK"`` when the graph transposes ``[E, N, K]`` to ``[E, K, N]``
    first (HF's ``MixtralExperts``), ``"EKN"`` when it is read as is."""
    found = []
    for node in gm.graph.nodes:
        if node.op != "get_attr":
            continue
        value = fetch_attr(gm, node.target)
        if not isinstance(value, torch.Tensor) or value.dim() != 3 or not value.is_floating_point():
            continue
        uses: list[fx.Node] = []
        problem = None
        orientations = set()
        for user in node.users:
            readers = list(user.users) if is_last_two_transpose(user) else [user]
            orientations.add("ENK" if is_last_two_transpose(user) else "EKN")
            via = user if is_last_two_transpose(user) else node
            for r in readers:
                g = grouped_mm_operands(r)
                if g is None or g[1] is not via:
                    problem = problem or f"it is read by {r.target if r.op == 'call_function' else r.op}"
                else:
                    uses.append(r)
        if not uses and problem is None:
            continue
        if len(orientations) > 1:
            problem = problem or "read both as W and as W.T"
        found.append((node, value, orientations.pop() if orientations else "EKN", problem or uses))
    return found


def _quantize_experts(gm: fx.GraphModule, config: Int8Config, fake_mode, skipped: list, layers: list,
                      replaced: list) -> tuple[int, int]:
    """Rewrite grouped matmuls over frozen expert weights to ``fxmem::int8_grouped_mm``
    (weight-only, per expert and output channel, whatever ``mode``: the tokens of one expert
    are few, and there is no int8 grouped kernel to feed dynamic activations to)."""
    before_total = after_total = 0
    for attr, value, orientation, uses in _collect_experts(gm):
        fqn = attr.meta.get("fxmem_fqn", attr.target)
        path = fqn.removesuffix(".weight")
        if isinstance(uses, str):
            skipped.append({"layer": fqn, "reason": f"kept fp32: {uses}"})
            continue
        pattern = next((p for p in config.skip if fnmatch.fnmatchcase(path, p) or fnmatch.fnmatchcase(attr.target, p)), None)
        if pattern is not None:
            skipped.append({"layer": fqn, "reason": f"skipped by pattern {pattern!r}"})
            continue
        if value.numel() < config.min_numel:
            skipped.append({"layer": fqn, "reason": f"smaller than min_numel={config.min_numel}"})
            continue
        # real weights: the pipeline runs this pass outside fake mode (real_tensors)
        w_enk = value if orientation == "ENK" else value.transpose(1, 2)
        e, n, k = w_enk.shape
        qweight, scales = int8_matmul.quantize_weight(w_enk.reshape(e * n, k))
        sqnr = int8_matmul.sqnr_db(w_enk.reshape(e * n, k), int8_matmul.dequantize_weight(qweight, scales))
        qweight, scales = qweight.reshape(e, n, k).contiguous(), scales.reshape(e, n).contiguous()
        qnode = _add_constant(gm, f"{attr.target}_int8", qweight, attr, fake_mode, fqn, "qweight")
        snode = _add_constant(gm, f"{attr.target}_scales", scales, attr, fake_mode, fqn, "scales")
        for use in uses:
            x, _, offs = grouped_mm_operands(use)
            with gm.graph.inserting_before(use):
                new = gm.graph.call_function(torch.ops.fxmem.int8_grouped_mm.default, (x, qnode, snode, offs))
            new.meta.update(use.meta)
            use.replace_all_uses_with(new)
            gm.graph.erase_node(use)
            replaced.append(new.name)
        for user in list(attr.users):
            if is_last_two_transpose(user) and not user.users:
                gm.graph.erase_node(user)
        gm.graph.erase_node(attr)
        b, a = tensor_bytes(value), tensor_bytes(qweight) + tensor_bytes(scales)
        before_total += b
        after_total += a
        layers.append({"layer": path, "names": [fqn], "shape": [e, n, k], "granularity": "per_expert_channel",
                       "uses": len(uses), "bytes_before": b, "bytes_after": a, "sqnr_db": round(sqnr, 2),
                       "kind": "experts (weight_only)"})
    return before_total, after_total


def quantize_int8(gm: fx.GraphModule, config: Int8Config, ctx: PassContext = PassContext()) -> PassResult:
    """Rewrite linears with frozen weights to ``fxmem::int8_linear`` (see the module docstring).

    Quantizes real weights: the pipeline runs it outside AOTAutograd's fake mode (``real_tensors``
    in :data:`fxmem.pipeline.PASSES`)."""
    if not ctx.inference:
        raise UnsupportedGraph("int8", (
            f"runs on inference graphs only (frozen weights), got a {ctx.stage!r} graph; "
            "int8 changes weights, so call the model under torch.no_grad() / model.eval()"))
    if config.mode == "dynamic" and config.granularity != "per_channel":
        raise OptionError("fxmem int8: mode='dynamic' needs granularity='per_channel' (torch._int_mm sums whole rows)")
    fake_mode = detect_fake_mode([n.meta.get("val") for n in gm.graph.nodes if isinstance(n.meta.get("val"), torch.Tensor)])
    layers, skipped, replaced = [], [], []
    total_before = total_after = 0
    for weight in _collect(gm):
        if not any(u.kind == "linear" for u in weight.uses):
            continue  # not a linear weight (an embedding table alone, a norm): not this pass's business
        reason = _skip_reason(weight, config)
        names = weight.names()
        if reason is not None:
            skipped.append({"layer": names[0], "reason": reason})
            continue
        orientation = weight.uses[0].orientation
        k = weight.tensor.shape[1] if orientation == "NK" else weight.tensor.shape[0]
        group_size, granularity = _granularity(k, config)
        w_nk = weight.tensor if orientation == "NK" else weight.tensor.t()
        qweight, scales = int8_matmul.quantize_weight(w_nk, group_size)
        deq = int8_matmul.dequantize_weight(qweight, scales)
        sqnr = int8_matmul.sqnr_db(w_nk, deq)
        fqn = weight.attrs[0].meta.get("fxmem_fqn", weight.attrs[0].target)
        first = weight.attrs[0]
        qnode = _add_constant(gm, f"{first.target}_int8", qweight, first, fake_mode, fqn, "qweight")
        snode = _add_constant(gm, f"{first.target}_scales", scales, first, fake_mode, fqn, "scales")
        for use in weight.uses:
            new = _rewrite_use(gm, use, qnode, snode, config.mode, weight.tensor.dtype)
            replaced.append(new.name)
        for attr in weight.attrs:
            for user in list(attr.users):  # transposes the rewritten linears read (or dead ones)
                if _is_transpose_2d(user) and not user.users:
                    gm.graph.erase_node(user)
            gm.graph.erase_node(attr)
        before = tensor_bytes(weight.tensor)
        after = tensor_bytes(qweight) + tensor_bytes(scales)
        total_before += before
        total_after += after
        layers.append({
            "layer": fqn.removesuffix(".weight"), "names": names, "shape": list(w_nk.shape), "granularity": granularity,
            "uses": len(weight.uses), "bytes_before": before, "bytes_after": after,
            "sqnr_db": round(sqnr, 2),
        })
    expert_before, expert_after = _quantize_experts(gm, config, fake_mode, skipped, layers, replaced)
    total_before += expert_before
    total_after += expert_after
    if not layers:
        return PassResult(gm, False, {"layers": [], "skipped": skipped, "mode": config.mode})
    gm.graph.lint()
    out = shallow_copy(gm)  # a new module holding only the attributes the graph reads: no stale fp32 copies
    saved = total_before - total_after
    stats = {
        "mode": config.mode, "layers_rewritten": len(layers), "nodes_rewritten": len(replaced),
        "weight_bytes_before": total_before, "weight_bytes_after": total_after, "param_bytes_saved": saved,
        "layers": layers, "skipped": skipped, "kernels": [_kernel_record(config, replaced, saved)],
    }
    return PassResult(out, True, stats)
