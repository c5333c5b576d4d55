"""lowrank: Linear weights replaced by two factors from an activation-aware truncated SVD (inference).

Before (a frozen ``nn.Linear``, ``W [N, K]``)::

    t = aten.t(self.fc_weight); addmm = aten.addmm(fc_bias, x, t)

After (``lowrank={"ratio": 0.8}``; ``r = ⌊0.8·N·K / (N + K)⌋``)::

    t_b = aten.t(self.fc_weight_lowrank_B)             # B [r, K]
    h = aten.mm(x, t_b)                                # [M, r]
    t_a = aten.t(self.fc_weight_lowrank_A)             # A [N, r]
    addmm = aten.addmm(fc_bias, h, t_a)

The factors are ordinary Linear weights, so a later ``quantize`` (or ``int8``) pass quantizes them
too. ``ratio`` is the fraction of the layer's parameters kept; a layer is factored only where
``r·(N + K) < N·K`` (it saves bytes) and ``r ≥ 1``.

Methods: ``"whitened"`` (SVD-LLM, Wang et al. 2024): with the example inputs' Gram matrix
``XᵀX + λ·mean(diag)·I = L Lᵀ`` (Cholesky; ``λ = damping``, 0.01 by default: a ridge that
keeps few example inputs from over-fitting the factors to them), the SVD of
``W L = U Σ Vᵀ`` truncated to rank r gives the rank-r ``A B`` that minimizes the *output* error
``‖X Wᵀ − X (A B)ᵀ‖_F`` on those inputs: ``A = U_r Σ_r^½``, ``B = Σ_r^½ V_rᵀ L⁻¹``. ``"svd"``:
the plain truncated SVD of ``W`` (minimizes the weight error; the baseline). Without example
inputs, ``"whitened"`` falls back to ``"svd"`` and says so in ``stats["method"]``.

Which weights: a frozen 2-D floating weight whose every use is a linear (the matcher of
:mod:`fxmem.passes.int8`), grouped per unique tensor (a shared layer is factored once).

Preconditions: an inference graph; nodes carry ``meta["val"]``. Numerical promise: lossy; each
layer's output SQNR on the calibration inputs (or weight SQNR without them) is in
``stats["layers"]``. The fp32 weights replaced are watched by :class:`fxmem.freeze.WeightWatch`.
"""

from __future__ import annotations

import warnings

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import unset_fake_temporarily

from fxmem.analysis.sizes import tensor_bytes
from fxmem.config import LowRankConfig
from fxmem.kernels.int8_matmul import sqnr_db
from fxmem.passes import int8 as _int8
from fxmem.passes._calibrate import record_activations
from fxmem.passes.base import PassContext, PassResult, UnsupportedGraph, shallow_copy

aten = torch.ops.aten


def rank_for(n: int, k: int, ratio: float) -> int:
    """The rank that keeps ``ratio`` of an ``[n, k]`` weight's parameters."""
    return int(ratio * n * k // (n + k))


def whitening_factor(x: torch.Tensor, damping: float = 0.01) -> torch.Tensor:
    """Lower-triangular ``L`` with ``L Lᵀ = XᵀX + damping·mean(diag)·I`` (more damping until
    Cholesky succeeds), in fp64."""
    gram = x.to(torch.float64).t() @ x.to(torch.float64)
    mean_diag = float(gram.diagonal().mean().clamp(min=1e-12))
    damp = max(damping, 1e-6) * mean_diag
    eye = torch.eye(gram.shape[0], dtype=torch.float64)
    for _ in range(8):
        chol, info = torch.linalg.cholesky_ex(gram + damp * eye)
        if int(info) == 0:
            return chol
        damp *= 100
    raise RuntimeError("lowrank: the calibration Gram matrix is not positive definite even with damping")


def factorize_weight(w: torch.Tensor, rank: int, x: torch.Tensor | None, damping: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A [N, r], B [r, K])`` with ``A @ B ≈ w``: whitened by ``x`` when given, else plain SVD."""
    w64 = w.detach().to(torch.float64)
    if x is None:
        u, s, vh = torch.linalg.svd(w64, full_matrices=False)
        root = s[:rank].sqrt()
        return u[:, :rank] * root, root[:, None] * vh[:rank]
    chol = whitening_factor(x, damping)
    u, s, vh = torch.linalg.svd(w64 @ chol, full_matrices=False)
    root = s[:rank].sqrt()
    a = u[:, :rank] * root
    # B = Σ^½ V_rᵀ L⁻¹, i.e. B L = Σ^½ V_rᵀ: a triangular solve, never an explicit inverse
    b = torch.linalg.solve_triangular(chol, (root[:, None] * vh[:rank]), upper=False, left=False)
    return a, b


def _skip(weight: _int8._Weight, config: LowRankConfig) -> str | None:
    if weight.problem is not None:
        return f"kept: {weight.problem}"
    if any(u.kind != "linear" for u in weight.uses):
        return "kept: read by an embedding"
    if len({u.orientation for u in weight.uses}) > 1:
        return "kept: read both as W and as W.T"
    return _int8.skipped_by_user(weight, config.skip, config.min_numel)


def _call(gm: fx.GraphModule, target, args: tuple, fake_mode) -> fx.Node:
    node = gm.graph.call_function(target, args)
    if fake_mode is not None:
        vals = [a.meta["val"] if isinstance(a, fx.Node) else a for a in args]
        with fake_mode:
            node.meta["val"] = target(*vals)
    return node


def _attr(gm: fx.GraphModule, base: str, value: torch.Tensor, fake_mode, fqn: str) -> fx.Node:
    name = _int8._flat_name(gm, base)
    gm.register_buffer(name, value)
    node = gm.graph.get_attr(name)
    if fake_mode is not None:
        node.meta["val"] = fake_mode.from_tensor(value, static_shapes=True)
    node.meta["fxmem_fqn"] = fqn
    return node


def factorize(gm: fx.GraphModule, config: LowRankConfig, ctx: PassContext = PassContext()) -> PassResult:
    """Replace Linear weights by two low-rank factors (see the module docstring).

    Computes real tensors: the pipeline runs it outside AOTAutograd's fake mode."""
    if not ctx.inference:
        raise UnsupportedGraph("lowrank", (
            f"runs on inference graphs only (frozen weights), got a {ctx.stage!r} graph; "
            "call the model under torch.no_grad() / model.eval()"))
    fake_mode = detect_fake_mode([n.meta.get("val") for n in gm.graph.nodes if isinstance(n.meta.get("val"), torch.Tensor)])
    chosen, skipped = [], []
    for weight in _int8._collect(gm):
        if not weight.uses:
            continue
        reason = _skip(weight, config)
        w = weight.tensor
        n, k = (w.shape[0], w.shape[1]) if weight.uses[0].orientation == "NK" else (w.shape[1], w.shape[0])
        rank = rank_for(n, k, config.ratio)
        if reason is None and (rank < 1 or rank * (n + k) >= n * k):
            reason = f"kept: rank {rank} at ratio {config.ratio} saves no bytes for [{n}, {k}]"
        if reason is not None:
            skipped.append({"layer": weight.names()[0], "reason": reason})
            continue
        chosen.append((weight, rank))
    method = config.method
    acts = None
    if method == "whitened" and chosen:
        watch = {u.operands()[0] for w, _ in chosen for u in w.uses}
        with unset_fake_temporarily():
            acts = record_activations(gm, watch, ctx.real_example_inputs(), max_rows=1 << 16)
        if acts is None:
            method = "svd (whitened asked, but no real example inputs)"
            warnings.warn("fxmem lowrank: method='whitened' needs example inputs; using plain truncated SVD", stacklevel=2)
    # each weight's calibration rows, looked up now: rewriting one layer replaces nodes that
    # later layers read as their input
    inputs = {}
    if acts is not None:
        for weight, _ in chosen:
            xs = [acts[u.operands()[0]] for u in weight.uses if u.operands()[0] in acts]
            inputs[id(weight)] = torch.cat(xs) if xs else None
    layers = []
    total_before = total_after = 0
    for weight, rank in chosen:
        first = weight.attrs[0]
        fqn = first.meta.get("fxmem_fqn", first.target)
        with unset_fake_temporarily():
            w_nk = (weight.tensor if weight.uses[0].orientation == "NK" else weight.tensor.t()).detach()
            x = inputs.get(id(weight))
            a, b = factorize_weight(w_nk, rank, x, config.damping)
            a = a.to(w_nk.dtype).contiguous()
            b = b.to(w_nk.dtype).contiguous()
            approx = (a.double() @ b.double())
            quality = (sqnr_db(x.double() @ w_nk.double().t(), x.double() @ approx.t()) if x is not None
                       else sqnr_db(w_nk, approx))
        with gm.graph.inserting_before(first):
            b_node = _attr(gm, f"{first.target}_lowrank_B", b, fake_mode, f"{fqn.removesuffix('.weight')}.lowrank_B.weight")
            a_node = _attr(gm, f"{first.target}_lowrank_A", a, fake_mode, f"{fqn.removesuffix('.weight')}.lowrank_A.weight")
        for use in weight.uses:
            _rewrite(gm, use, a_node, b_node, fake_mode)
        for attr in weight.attrs:
            for user in list(attr.users):
                if _int8._is_transpose_2d(user) and not user.users:
                    gm.graph.erase_node(user)
            gm.graph.erase_node(attr)
        before, after = tensor_bytes(weight.tensor), tensor_bytes(a) + tensor_bytes(b)
        total_before += before
        total_after += after
        layers.append({"layer": fqn.removesuffix(".weight"), "shape": list(w_nk.shape), "rank": rank,
                       "method": method, "bytes_before": before, "bytes_after": after,
                       ("output_sqnr_db" if x is not None else "sqnr_db"): round(quality, 2)})
    if not layers:
        return PassResult(gm, False, {"layers": [], "skipped": skipped, "ratio": config.ratio})
    gm.graph.lint()
    out = shallow_copy(gm)
    stats = {"ratio": config.ratio, "method": method, "layers_rewritten": len(layers), "weight_bytes_before": total_before,
             "weight_bytes_after": total_after, "param_bytes_saved": total_before - total_after, "layers": layers, "skipped": skipped}
    return PassResult(out, True, stats)


def _rewrite(gm: fx.GraphModule, use: _int8._Use, a_node: fx.Node, b_node: fx.Node, fake_mode) -> None:
    """``x @ Wᵀ (+ bias)`` → ``(x @ Bᵀ) @ Aᵀ (+ bias)`` in the op family the graph used."""
    x, bias = use.operands()
    node = use.node
    with gm.graph.inserting_before(node):
        if node.target is aten.linear.default:
            h = _call(gm, aten.linear.default, (x, b_node), fake_mode)
            new = _call(gm, aten.linear.default, (h, a_node, bias), fake_mode)
        else:
            h = _call(gm, aten.mm.default, (x, _call(gm, aten.t.default, (b_node,), fake_mode)), fake_mode)
            at = _call(gm, aten.t.default, (a_node,), fake_mode)
            new = (_call(gm, aten.mm.default, (h, at), fake_mode) if bias is None
                   else _call(gm, aten.addmm.default, (bias, h, at), fake_mode))
    if fake_mode is None:
        new.meta.update(node.meta)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
