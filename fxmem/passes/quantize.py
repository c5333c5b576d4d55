"""quantize: Linear and embedding weights below 16 bits, packed (inference).

Before (a frozen ``nn.Linear`` and an embedding table in the ATen IR)::

    fc_weight = self.fc.weight                         # fp32 [N, K]
    t = aten.t(fc_weight); addmm = aten.addmm(fc_bias, x, t)
    emb_weight = self.emb.weight                       # fp32 [V, D]
    rows = aten.embedding(emb_weight, ids)

After (``quantize={"bits": 4, "scheme": "int", "group_size": 64}``)::

    fc_weight_q = self.fc_weight_q                     # uint8 [N, K // 2]: two 4-bit codes a byte
    fc_weight_scales = self.fc_weight_scales           # fp16 [N, K // 64]
    fc_weight_zeros = self.fc_weight_zeros             # fp16 [N, K // 64]
    addmm = fxmem.lowbit_linear(x, fc_weight_q, fc_weight_scales, fc_weight_zeros, None, None, fc_bias, 4)
    rows = fxmem.lowbit_embedding(emb_weight_q, emb_weight_scales, emb_weight_zeros, None, ids, 4, torch.float32)

Which weights and uses: those of :mod:`fxmem.passes.int8` (this pass shares its matcher): a frozen
2-D floating weight read by ``mm``/``addmm`` (through ``t``), ``linear``, or ``embedding``, grouped
per unique tensor, so a tied embedding/head (or a layer applied twice) keeps **one** packed buffer
read by both ops. ``embeddings=False`` leaves tables that no linear reads in fp32. A weight with
any other use stays fp32 (listed in ``stats["skipped"]``).

Schemes (:mod:`fxmem.kernels.int4_matmul`): ``int`` (8 bits: the int8 pass's symmetric format and
ops, ``fxmem::int8_linear``/``int8_embedding``; 4 bits: affine codes 0…15 with a 16-bit scale and
zero per group), ``nf4`` (QLoRA's 16 NormalFloat levels × an absmax scale per group) and ``log``
(a sign bit and log-spaced magnitudes × an absmax scale per group; 4 or 8 bits). One codebook
buffer per scheme is shared by every layer. ``group_size`` columns per scale (a row whose K is not
a multiple of it gets one group per row, noted in its ``granularity``).

Calibration (``calibration="gptq"`` — :func:`_gptq`, measured best on MiniLM — or ``"awq"``) uses the example inputs (``ctx.real_example_inputs()``,
the batch the module is specialized to): the graph runs once in fp32 and each linear's input
``X`` is kept; ``gptq`` then spreads each column's rounding error over the columns not yet
quantized through ``(XᵀX)⁻¹``; ``awq``, as AWQ does, a per-input-channel scale ``s = mean|X|^α`` is searched
(α ∈ {0, 0.1, …, 1}) minimizing ``‖X Wᵀ − (X/s) Q(W·s)ᵀ‖²``, and then a per-group clipping
ratio (1.0 … 0.75) minimizing each group's share of that error. ``s`` is stored (``act_scale``,
``[K]``) and the op divides ``x`` by it (a tied embedding/head gets the clip search only).
Embedding tables, which have no input activations, get the clip search on their own squared
error. Without example inputs the pass falls back to round-to-nearest and says so in
``stats["calibration"]`` and with a warning.

Preconditions: an inference graph (``ctx.stage == "inference"``); replaced nodes
carry ``meta["val"]``.

Numerical promise: lossy. Per group, round-to-nearest moves each element by at most half a
step: ``(max − min) / (2·(2**bits − 1))`` for ``int``, ``absmax · (largest gap between
neighbouring levels) / 2`` for ``nf4``/``log`` (tested per scheme). Each layer's weight SQNR and,
where calibration data exist, its output SQNR on them are reported in ``stats["layers"]``.
The fp32 weights the graph no longer reads are watched by :class:`fxmem.freeze.WeightWatch`
(changed in place → the backend quantizes again; an optimized module raises).
"""

from __future__ import annotations

import warnings

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import unset_fake_temporarily

from fxmem.analysis.sizes import tensor_bytes
from fxmem.config import Int8Config, QuantizeConfig
from fxmem.kernels import int4_matmul as k4
from fxmem.kernels import int8_matmul
from fxmem.passes import int8 as _int8
from fxmem.passes._calibrate import record_activations
from fxmem.passes.base import KernelRecord, PassContext, PassResult, UnsupportedGraph, shallow_copy

ALPHAS = tuple(i / 10 for i in range(11))
CLIPS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)


def _group(k: int, config: QuantizeConfig) -> tuple[int, str]:
    if config.group_size is None:
        return k, "per_channel"
    if k % config.group_size == 0:
        return config.group_size, f"per_group({config.group_size})"
    return k, f"per_channel (K={k} not a multiple of group_size={config.group_size})"


def _group_errors(x: torch.Tensor | None, diff: torch.Tensor, group: int) -> torch.Tensor:
    """``[N, G]``: each group's contribution ``Σ_m (Σ_{k∈g} x[m,k]·diff[n,k])²`` (``x=None``: ``Σ diff²``)."""
    n, k = diff.shape
    dg = diff.reshape(n, k // group, group)
    if x is None:
        return dg.pow(2).sum(2)
    xg = x.reshape(x.shape[0], k // group, group)
    return torch.einsum("mgk,ngk->mng", xg, dg).pow(2).sum(0)


def _clip_search(w: torch.Tensor, x: torch.Tensor | None, bits: int, scheme: str, group: int) -> torch.Tensor:
    """Per-group clipping ratio (from :data:`CLIPS`) with the smallest output (or weight) error."""
    best_err, best_clip = None, None
    for c in CLIPS:
        qw = k4.quantize_lowbit(w, bits, scheme, group, clip=c)
        err = _group_errors(x, w - k4.dequantize(qw), group)
        if best_err is None:
            best_err, best_clip = err, torch.full_like(err, c)
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_clip = torch.where(better, torch.full_like(err, c), best_clip)
    return best_clip


def _awq(w: torch.Tensor, x: torch.Tensor, bits: int, scheme: str, group: int, pdtype: torch.dtype) -> tuple[torch.Tensor, float]:
    """AWQ's activation-aware per-input-channel scale ``s`` (stored in ``pdtype``) and its α."""
    ref = x @ w.t()
    xmean = x.abs().mean(0).clamp(min=1e-6)
    best = (None, None, 0.0)
    for alpha in ALPHAS:
        s = xmean.pow(alpha)
        s = (s / (s.max() * s.min()).sqrt()).to(pdtype).to(torch.float32)
        weff = k4.dequantize(k4.quantize_lowbit(w * s, bits, scheme, group)) / s
        err = float((x @ weff.t() - ref).pow(2).mean())
        if best[0] is None or err < best[0]:
            best = (err, s, alpha)
    return best[1], best[2]


def _gptq(w: torch.Tensor, x: torch.Tensor, bits: int, scheme: str, group: int, damping: float = 0.01,
          block: int = 128) -> k4.LowBitWeight:
    """GPTQ (Frantar et al. 2023): quantize columns left to right, each column's rounding error
    spread over the columns not yet quantized through the inverse Hessian ``(XᵀX)⁻¹`` (Cholesky
    form, lazy block updates). A group's scale (and zero) is set when its first column is
    reached, from the columns as updated so far. With ``XᵀX = I`` it is round-to-nearest."""
    n, k = w.shape
    w = w.to(torch.float32).clone()
    hess = (x.to(torch.float64).t() @ x.to(torch.float64))
    dead = hess.diagonal() == 0
    hess[dead, dead] = 1.0
    w[:, dead] = 0.0
    hess += damping * float(hess.diagonal().mean()) * torch.eye(k, dtype=torch.float64)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hess)), upper=True).to(torch.float32)
    codebook = k4.codebook_for(scheme, bits)
    codes = torch.zeros(n, k, dtype=torch.uint8)
    g = k // group
    scales = torch.zeros(n, g, dtype=k4._param_dtype(w.dtype))
    zeros = torch.zeros(n, g, dtype=scales.dtype) if codebook is None else None
    block = max(group, block - block % group)  # blocks hold whole groups: a group's scale sees its updated columns
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        h1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % group == 0:
                scale, zero = k4.group_params(w1[:, i:i + group], bits, scheme)
                scales[:, col // group] = scale
                if zeros is not None:
                    zeros[:, col // group] = zero
            gi = col // group
            q, deq = k4.encode_column(w1[:, i], scales[:, gi], None if zeros is None else zeros[:, gi], codebook, bits)
            codes[:, col] = q
            err = (w1[:, i] - deq) / h1[i, i]
            w1[:, i:] -= err[:, None] * h1[i, i:][None, :]
            err1[:, i] = err
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    qweight = k4.pack_int4(codes) if bits == 4 else codes
    return k4.LowBitWeight(qweight, scales, zeros, codebook, bits, (n, k))


def _output_sqnr(x: torch.Tensor | None, w: torch.Tensor, weff: torch.Tensor) -> float | None:
    if x is None:
        return None
    return round(int8_matmul.sqnr_db(x @ w.t(), x @ weff.t()), 2)


def _quantize_one(w: torch.Tensor, x: torch.Tensor | None, embedding_use: bool, config: QuantizeConfig,
                  group: int, calibrate: bool) -> tuple[dict, torch.Tensor, str]:
    """The new tensors for one ``[N, K]`` weight, its dequantized effective weight, and how it was calibrated."""
    if config.bits == 8 and config.scheme == "int":
        qweight, scales = int8_matmul.quantize_weight(w, None if group == w.shape[1] else group)
        return {"q": qweight, "scales": scales}, int8_matmul.dequantize_weight(qweight, scales), "round-to-nearest"
    pdtype = k4._param_dtype(w.dtype)
    act_scale, how = None, "round-to-nearest"
    wq, xq = w.to(torch.float32), x
    if config.calibration == "gptq" and calibrate and x is not None and not embedding_use:
        qw = _gptq(wq, x, config.bits, config.scheme, group)
        new = {"q": qw.qweight, "scales": qw.scales, **({"zeros": qw.zeros} if qw.zeros is not None else {})}
        return new, k4.dequantize(qw), "gptq"
    if calibrate and x is not None and not embedding_use:
        act_scale, alpha = _awq(wq, x, config.bits, config.scheme, group, pdtype)
        wq, xq = wq * act_scale, x / act_scale
        how = f"awq(alpha={alpha:.1f})+clip"
    elif calibrate:
        how = "clip search (" + ("output error" if x is not None else "weight error") + ")"
    clip = _clip_search(wq, xq, config.bits, config.scheme, group) if calibrate else 1.0
    qw = k4.quantize_lowbit(wq, config.bits, config.scheme, group, clip=clip)
    weff = k4.dequantize(qw)
    if act_scale is not None:
        weff = weff / act_scale
    new = {"q": qw.qweight, "scales": qw.scales}
    if qw.zeros is not None:
        new["zeros"] = qw.zeros
    if act_scale is not None:
        new["act_scale"] = act_scale.to(pdtype)
    return new, weff, how


def quantize(gm: fx.GraphModule, config: QuantizeConfig, ctx: PassContext = PassContext()) -> PassResult:
    """Quantize frozen Linear/embedding weights to ``config.bits`` (see the module docstring).

    Computes real tensors (and runs the graph on the example inputs to calibrate): the pipeline
    runs it outside AOTAutograd's fake mode (``real_tensors`` in :data:`fxmem.pipeline.PASSES`)."""
    if not ctx.inference:
        raise UnsupportedGraph("quantize", (
            f"runs on inference graphs only (frozen weights), got a {ctx.stage!r} graph; "
            "quantization changes weights, so call the model under torch.no_grad() / model.eval()"))
    fake_mode = detect_fake_mode([n.meta.get("val") for n in gm.graph.nodes if isinstance(n.meta.get("val"), torch.Tensor)])
    skip_config = Int8Config(skip=config.skip, min_numel=config.min_numel)
    chosen, skipped = [], []
    for weight in _int8._collect(gm):
        kinds = {u.kind for u in weight.uses}
        if not kinds or (kinds == {"embedding"} and not config.embeddings):
            continue  # not read by a linear (nor, when asked, by an embedding): not this pass's business
        reason = _int8._skip_reason(weight, skip_config)
        k = weight.tensor.shape[1] if weight.uses[0].orientation == "NK" else weight.tensor.shape[0]
        if reason is None and config.bits == 4 and k % 2:
            reason = f"kept: K={k} is odd (4-bit codes are packed two per byte)"
        if reason is not None:
            skipped.append({"layer": weight.names()[0], "reason": reason})
            continue
        chosen.append(weight)
    if not chosen:
        return PassResult(gm, False, {"layers": [], "skipped": skipped, "bits": config.bits, "scheme": config.scheme})

    calibrate = config.calibration != "none"
    acts = None
    calibration_note = "none: round-to-nearest" if not calibrate else config.calibration
    if calibrate:
        watch = {u.operands()[0] for w in chosen for u in w.uses if u.kind == "linear"}
        with unset_fake_temporarily():
            acts = record_activations(gm, watch, ctx.real_example_inputs())
        if acts is None:
            calibration_note = f"{config.calibration} asked, but no real example inputs: round-to-nearest"
            warnings.warn(f"fxmem quantize: calibration={config.calibration!r} needs real example inputs "
                          "(PassContext.example_inputs); falling back to round-to-nearest", stacklevel=2)
            calibrate = False

    int8_format = config.bits == 8 and config.scheme == "int"
    codebook = None if config.scheme == "int" else k4.codebook_for(config.scheme, config.bits)
    cb_node = None
    if codebook is not None:
        first_op = next(n for n in gm.graph.nodes if n.op != "placeholder")
        cb_node = _int8._add_constant(gm, f"fxmem_{config.scheme}{config.bits}_codebook", codebook, first_op, fake_mode,
                                      f"{config.scheme}{config.bits}_codebook", "codebook")
    # each weight's calibration rows, looked up now: rewriting one layer replaces nodes that
    # later layers read as their input
    inputs = {id(w): _inputs_of(w, acts) for w in chosen} if calibrate else {}
    layers, replaced = [], []
    total_before, total_after = 0, 0 if codebook is None else tensor_bytes(codebook)
    for weight in chosen:
        orientation = weight.uses[0].orientation
        first = weight.attrs[0]
        fqn = first.meta.get("fxmem_fqn", first.target)
        embedding_use = any(u.kind == "embedding" for u in weight.uses)
        with unset_fake_temporarily():  # real weights, even inside AOTAutograd's fake mode
            w_nk = (weight.tensor if orientation == "NK" else weight.tensor.t()).detach()
            group, granularity = _group(w_nk.shape[1], config)
            x = inputs.get(id(weight))
            new, weff, how = _quantize_one(w_nk, x, embedding_use, config, group, calibrate)
            sqnr = round(int8_matmul.sqnr_db(w_nk, weff), 2)
            out_sqnr = _output_sqnr(x, w_nk.to(torch.float32), weff)
        nodes = {role: _int8._add_constant(gm, f"{first.target}_{role}", t, first, fake_mode, fqn, role)
                 for role, t in new.items()}
        for use in weight.uses:
            replaced.append(_rewrite(gm, use, nodes, cb_node, config, int8_format, weight.tensor.dtype).name)
        for attr in weight.attrs:
            for user in list(attr.users):  # transposes the rewritten linears read
                if _int8._is_transpose_2d(user) and not user.users:
                    gm.graph.erase_node(user)
            gm.graph.erase_node(attr)
        before = tensor_bytes(weight.tensor)
        after = sum(tensor_bytes(t) for t in new.values())
        total_before += before
        total_after += after
        layers.append({
            "layer": fqn.removesuffix(".weight"), "names": weight.names(), "shape": list(w_nk.shape),
            "kind": "+".join(sorted({u.kind for u in weight.uses})), "scheme": config.scheme, "bits": config.bits,
            "granularity": granularity, "calibration": how, "uses": len(weight.uses),
            "bytes_before": before, "bytes_after": after, "sqnr_db": sqnr, "output_sqnr_db": out_sqnr,
        })
    gm.graph.lint()
    out = shallow_copy(gm)  # only the attributes the graph reads: no stale fp32 copies held
    saved = total_before - total_after
    kernel = (_int8._kernel_record(Int8Config(), replaced, saved) if int8_format else
              KernelRecord(name=k4.KERNEL_NAME, nodes_replaced=replaced, bytes_saved=saved, source=k4.kernel_source()))
    stats = {
        "bits": config.bits, "scheme": config.scheme, "group_size": config.group_size, "calibration": calibration_note,
        "layers_rewritten": len(layers), "nodes_rewritten": len(replaced),
        "weight_bytes_before": total_before, "weight_bytes_after": total_after, "param_bytes_saved": saved,
        "layers": layers, "skipped": skipped, "kernels": [kernel],
    }
    return PassResult(out, True, stats)


def _inputs_of(weight: _int8._Weight, acts: dict) -> torch.Tensor | None:
    """The calibration rows reaching the weight's linear uses (at most 4096), or None."""
    xs = [acts[u.operands()[0]] for u in weight.uses if u.kind == "linear" and u.operands()[0] in acts]
    return torch.cat(xs)[:4096] if xs else None


def _rewrite(gm: fx.GraphModule, use: _int8._Use, nodes: dict[str, fx.Node], cb_node: fx.Node | None,
             config: QuantizeConfig, int8_format: bool, dtype: torch.dtype) -> fx.Node:
    if int8_format:
        return _int8._rewrite_use(gm, use, nodes["q"], nodes["scales"], "weight_only", dtype)
    q, s, z, a = nodes["q"], nodes["scales"], nodes.get("zeros"), nodes.get("act_scale")
    with gm.graph.inserting_before(use.node):
        if use.kind == "embedding":
            new = gm.graph.call_function(torch.ops.fxmem.lowbit_embedding.default,
                                         (q, s, z, cb_node, use.node.args[1], config.bits, dtype))
        else:
            x, bias = use.operands()
            new = gm.graph.call_function(torch.ops.fxmem.lowbit_linear.default, (x, q, s, z, cb_node, a, bias, config.bits))
    new.meta.update(use.node.meta)  # same shape, dtype and (contiguous) layout as the node it replaces
    use.node.replace_all_uses_with(new)
    gm.graph.erase_node(use.node)
    return new
