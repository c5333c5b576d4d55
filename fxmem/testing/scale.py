"""FSDP2 × tensor-parallel and pipeline checks run inside ``torch.distributed`` processes.

:func:`run_mesh` is what one rank does for one model on a ``dp × tp`` mesh: build the model, its
global batch and its loss (:func:`mesh_case`, the same on every rank: a small LM with next-token
cross entropy, or all-MiniLM-L6-v2 with its trained weights and the in-batch-negatives loss it
was trained with), take one AdamW step on the *global* batch in a single process, plan with
``fxmem.shard.plan(mesh=...)``, carry it out with ``fxmem.shard.apply`` on a 2-D ``DeviceMesh``,
take one AdamW step on this dp rank's slice of the batch, and compare: the loss (averaged over
dp), the parameters after the step, the model-state bytes this rank holds (parameters,
gradients, AdamW state — local shards) against the single process, and the collectives of one
forward and one backward (``CommDebugMode``) against the plan's (the loss's own collectives counted
apart). With ``checkpoint=<dir>`` it also
saves the model and optimizer with ``torch.distributed.checkpoint`` and loads them into a freshly
sharded copy. :func:`run_pipeline` does the same for :func:`fxmem.shard.pipeline` stages.
Processes are started by :func:`fxmem.testing.tp.spawn`.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import gc
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from fxmem.analysis.sizes import tensor_bytes
from fxmem.testing.tp import _kinds

LR = 1e-3
ILL_CONDITIONED_GRAD = 1e-6  # |gradient| below which Adam's first update amplifies rounding noise (see run_mesh)


SHAPES = {
    # d_model, heads, sequence, vocabulary: "tiny" is every test's; "large" is where activations
    # outweigh the fixed per-rank costs (docs/fit.md "Distributed")
    "tiny": (32, 4, 8, 64),
    "medium": (128, 4, 128, 256),  # activations most of a rank's step, a small head
    "large": (256, 4, 128, 2048),
}


def build(case: str, layers: int = 2, shape: str = "tiny") -> tuple[nn.Module, int]:
    """A small model (same on every rank) and its vocabulary size; ``shape``: a key of :data:`SHAPES`."""
    torch.manual_seed(0)
    if shape != "tiny":
        return _build_sized(case, layers, *SHAPES[shape])
    if case == "gpt2":
        import transformers

        # HF GPT-2: Conv1D layers, fused c_attn (q | k | v); dropout off so ranks and one process agree
        cfg = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=layers, n_head=4, n_positions=16,
                                      bos_token_id=0, eos_token_id=0, use_cache=False, resid_pdrop=0.0,
                                      embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="sdpa")
        return transformers.GPT2LMHeadModel(cfg), 64
    if case.startswith("gpt"):
        from fxmem.models.gpt import GPT, GPTConfig

        cfg = GPTConfig(vocab_size=64, block_size=8, n_layer=layers, n_head=4, d_model=32, attention="sdpa",
                        tie_embeddings="untied" not in case)
        return GPT(cfg), 64
    if case.startswith("llama"):
        import transformers

        # llama_kv1: grouped-query attention with one kv head (fewer kv heads than tp ranks)
        kv = 4 if "mha" in case else 1 if "kv1" in case else 2
        cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                       num_attention_heads=4, num_key_value_heads=kv,
                                       max_position_embeddings=16, use_cache=False, attn_implementation="sdpa")
        return transformers.LlamaForCausalLM(cfg), 64
    raise ValueError(f"unknown case {case!r}")


def _build_sized(case: str, layers: int, d: int, heads: int, seq: int, vocab: int) -> tuple[nn.Module, int]:
    if case.startswith("gpt") and case != "gpt2":
        from fxmem.models.gpt import GPT, GPTConfig

        cfg = GPTConfig(vocab_size=vocab, block_size=seq, n_layer=layers, n_head=heads, d_model=d, attention="sdpa",
                        tie_embeddings="untied" not in case)
        return GPT(cfg), vocab
    if case.startswith("llama"):
        import transformers

        kv = heads if "mha" in case else 1 if "kv1" in case else 2
        cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=d, intermediate_size=2 * d, num_hidden_layers=layers,
                                       num_attention_heads=heads, num_key_value_heads=kv,
                                       max_position_embeddings=seq, use_cache=False, attn_implementation="sdpa")
        return transformers.LlamaForCausalLM(cfg), vocab
    raise ValueError(f"no sized build for case {case!r}")


def batch(vocab: int, size: int, seq: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, vocab, (size, seq), generator=g), torch.randint(0, vocab, (size, seq), generator=g)


def logits(out: Any) -> torch.Tensor:
    out = getattr(out, "logits", out)
    return out[0] if isinstance(out, tuple) else out


def loss_fn(out: Any, target: torch.Tensor) -> torch.Tensor:
    out = logits(out)
    return F.cross_entropy(out.reshape(-1, out.size(-1)).float(), target.reshape(-1))


def _local(t):
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def _full(t):
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of model state this rank holds: parameters, gradients, optimizer state (local shards)."""
    params = {id(p): p for p in model.parameters()}
    out = {"params": sum(tensor_bytes(_local(p)) for p in params.values()),
           "grads": sum(tensor_bytes(_local(p.grad)) for p in params.values() if p.grad is not None),
           "optimizer": sum(tensor_bytes(_local(v)) for s in optimizer.state.values() for v in s.values()
                            if isinstance(v, torch.Tensor))}
    out["total"] = out["params"] + out["grads"] + out["optimizer"]
    return out


def single_step(model: nn.Module, inputs: tuple, target: Any, loss: Callable | None = None) -> dict:
    """One AdamW step in one process on the global batch ``model(*inputs)``: loss before,
    parameters and gradients after, bytes. ``loss(output, target, group)`` (a
    :attr:`MeshCase.loss`, called with ``group=None``); default: :func:`loss_fn`."""
    loss = loss or _lm_loss
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    value = loss(model(*inputs), target, None)
    value.backward()
    opt.step()
    held = state_bytes(model, opt)
    with torch.no_grad():
        after = loss(model(*inputs), target, None)
    return {"loss": float(value.detach()), "loss_after": float(after), "bytes": held,
            "params": {n: p.detach().clone() for n, p in model.named_parameters()},
            "grads": {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}}


def _lm_loss(out: Any, target: torch.Tensor, group=None) -> torch.Tensor:
    """:func:`loss_fn` as a :attr:`MeshCase.loss`: each token's loss is its own rank's (no collective)."""
    return loss_fn(out, target)


def _rows(t: torch.Tensor, d: int, dp: int) -> torch.Tensor:
    """Data-parallel rank ``d`` of ``dp``'s contiguous share of a batch's rows."""
    per = t.size(0) // dp
    return t[d * per:(d + 1) * per]


@dataclass
class MeshCase:
    """A model, its global batch and its loss: what :func:`run_mesh` trains on a mesh and in one process.

    ``loss(output, target, group)`` takes the model's output; ``group`` is None in one process and
    the data-parallel process group on the mesh, where the mean over dp ranks of their losses
    must be the one-process loss on the global batch (a loss over the whole batch, such as in-batch
    negatives, gathers over ``group``). ``rows(t, d, dp)`` is dp rank ``d``'s share of a batch
    tensor (inputs and target alike)."""

    name: str
    model: nn.Module
    inputs: tuple                 # the model's positional arguments, global batch on dim 0
    target: Any                   # the loss's target (global batch), or None
    loss: Callable[[Any, Any, Any], torch.Tensor] = _lm_loss
    rows: Callable[[torch.Tensor, int, int], torch.Tensor] = _rows

    def local(self, d: int, dp: int) -> tuple[tuple, Any]:
        """``(inputs, target)`` of data-parallel rank ``d`` of ``dp``."""
        target = None if self.target is None else self.rows(self.target, d, dp)
        return tuple(self.rows(t, d, dp) for t in self.inputs), target


MINILM_PAIRS_PER_DP, MINILM_SEQ = 4, 32  # 2 x 2 mesh: 8 pairs (16 paragraphs) x 32 tokens globally


def mesh_case(case: str, dp: int) -> MeshCase:
    """The :class:`MeshCase` of ``case`` with a global batch for ``dp`` data-parallel ranks: a
    :func:`build` model on :func:`batch` tokens (2 sequences of 8 per dp rank, next-token cross
    entropy), or ``"minilm"``: all-MiniLM-L6-v2 with its trained weights (dropout off, train
    mode), :data:`MINILM_PAIRS_PER_DP` paragraph pairs per dp rank of :data:`MINILM_SEQ` tokens
    (padded: the attention mask matters), fine-tuned with in-batch negatives gathered over dp
    (:func:`fxmem.testing.minilm.in_batch_negatives`); ``"minilm_l2"``: the same with only its
    first 2 (trained) encoder layers, for the tests' time budget."""
    if case in ("minilm", "minilm_l2"):
        from fxmem.testing import minilm

        model, tokenizer = minilm.load()
        if case == "minilm_l2":
            model.bert.encoder.layer = model.bert.encoder.layer[:2]
            model.bert.config.num_hidden_layers = 2
        model.train()
        ids, mask = minilm.paragraph_pairs(tokenizer, MINILM_PAIRS_PER_DP * dp, MINILM_SEQ)
        return MeshCase(case, model, (ids, mask), None,
                        loss=lambda out, _target, group: minilm.in_batch_negatives(out, group=group),
                        rows=minilm.dp_rows)
    model, vocab_size = build(case)
    x, y = batch(vocab_size, 2 * dp)
    return MeshCase(case, model, (x,), y)


def _dp_group(mesh):
    """The data-parallel process group of a ``("dp", "tp")`` mesh — what a loss over the whole batch
    gathers over (:attr:`MeshCase.loss`) — or None with one dp rank."""
    return mesh["dp"].get_group() if mesh["dp"].size() > 1 else None


def _dp_mean(value: torch.Tensor, mesh) -> float:
    if mesh["dp"].size() == 1:
        return float(value)
    t = value.detach().clone()
    dist.all_reduce(t, group=mesh["dp"].get_group())
    return float(t) / mesh["dp"].size()


def run_mesh(rank: int, world_size: int, case: str, dp: int, tp: int, *, vocab: Any = "auto",
             checkpoint: str | None = None, compile_check: bool | str = False) -> dict:
    """One rank's part of the dp × tp check (see the module docstring) of :func:`mesh_case`'s ``case``."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.debug import CommDebugMode

    import fxmem

    spec = mesh_case(case, dp)
    model = spec.model
    reference = single_step(copy.deepcopy(model), spec.inputs, spec.target, spec.loss)
    mesh = init_device_mesh("cpu", (dp, tp), mesh_dim_names=("dp", "tp"))
    d = mesh["dp"].get_local_rank()
    group = _dp_group(mesh)
    xs, ys = spec.local(d, dp)
    plan = fxmem.shard.plan(copy.deepcopy(model), *xs, mesh={"dp": dp, "tp": tp}, vocab=vocab)
    compiled, plans = {}, {}
    if compile_check:
        # the plan as made and, when it splits the vocabulary, the plan without that split:
        # PyTorch's vocabulary-parallel embedding (``_MaskPartial``, whose mask lives in placement
        # metadata) does not compile on torch 2.13 with any AOTAutograd backend, and a failed
        # attempt leaves a fake mask in DTensor's cached placement, which breaks the next eager
        # vocabulary-split forward in the process. So (docs/shard.md, "Compile"): plans without
        # the split are compiled *before* the eager step (on torch 2.13 one compile after it on
        # the same mesh failed in Inductor: ``device_mesh._get_submesh is not an OpOverload``),
        # the vocabulary-split attempt after everything else (``compile_check="no_vocab_split"``
        # skips it).
        if plan.tp_plan is not None and plan.tp_plan.vocab:
            plans["compiled_no_vocab_split"] = fxmem.shard.plan(copy.deepcopy(model), *xs, mesh={"dp": dp, "tp": tp},
                                                                vocab=False)
            if compile_check != "no_vocab_split":
                plans["compiled"] = plan
        else:
            plans["compiled"] = plan
        for key, p in plans.items():
            if p is not plan or not (plan.tp_plan is not None and plan.tp_plan.vocab):
                compiled[key] = _try_compiled_step(spec, p, mesh, xs, ys, reference)
    sharded = fxmem.shard.apply(copy.deepcopy(model), plan, mesh)
    opt = torch.optim.AdamW(sharded.parameters(), lr=LR)
    with CommDebugMode() as fwd:
        out = sharded(*xs)
    # the backward in two parts, so that the model's collectives (the plan's) are counted apart
    # from the loss's (in-batch negatives gather over dp): first the loss's, down to the model's
    # output, then the model's from there — the same gradients as one ``loss.backward()``
    head = logits(out)
    cut = head.detach().requires_grad_()
    with CommDebugMode() as loss_comm:
        loss = spec.loss(cut, ys, group)
        loss.backward()
    with CommDebugMode() as bwd:
        head.backward(cut.grad)
    opt.step()
    held = state_bytes(sharded, opt)
    with torch.no_grad():
        after = spec.loss(sharded(*xs), ys, group)
    if hasattr(sharded, "reshard"):  # FSDP2 keeps the root gathered after a forward without backward
        sharded.reshard()
    mine = dict(sharded.named_parameters())
    # Adam's update lr * m / (sqrt(v) + eps) is ~lr * g / (|g| + eps) on the first step: where a
    # gradient element is within a few eps of zero (a key bias's gradient is zero in exact
    # arithmetic), float rounding noise in g moves the update by up to lr. Those elements are
    # compared apart (bounded by lr); every other element must match to 1e-5 — including those
    # whose gradient is exactly zero on both sides (embedding rows of tokens not in the batch:
    # both leave them to weight decay alone). One side's exact zero is not enough: a key bias's
    # gradient is now and then exactly 0.0 in one process and rounding noise on the mesh.
    errors, ill_errors, ill, ill_by_param, zero = {}, [], 0, {}, 0
    for n, p in reference["params"].items():
        if n not in mine:
            continue
        diff = (_full(mine[n]).detach() - p).abs()
        g = reference["grads"].get(n)
        g_mine = _full(mine[n].grad) if mine[n].grad is not None else None
        mask = _well_conditioned(g, diff, g_mine)
        zero += int(((g == 0) & (g_mine == 0)).sum()) if g is not None and g_mine is not None else 0
        errors[n] = float(diff[mask].max()) if mask.any() else 0.0
        if (~mask).any():
            ill_errors.append(float(diff[~mask].max()))
            ill += int((~mask).sum())
            ill_by_param[n] = (int((~mask).sum()), ill_errors[-1])
    # what a user saves: state_dict keys and (full) shapes as the model's own, values as one process
    sd, own = sharded.state_dict(), model.state_dict()
    full = {k: _full(v).detach() for k, v in sd.items()}
    state_dict = {"keys_equal": set(sd) == set(own),
                  "shapes_equal": all(tuple(full[k].shape) == tuple(own[k].shape) for k in own if k in full),
                  "max_param_diff": max(float((full[n] - p).abs().max()) for n, p in reference["params"].items() if n in full),
                  "params_compared": sum(1 for n in reference["params"] if n in full)}
    # parameters whose local gradient is larger than their local shard (DTensor keeps a
    # vocabulary-split embedding's gradient whole under tensor parallelism alone)
    wider = {n: (tensor_bytes(_local(p)), tensor_bytes(_local(p.grad))) for n, p in sharded.named_parameters()
             if p.grad is not None and tensor_bytes(_local(p.grad)) > tensor_bytes(_local(p))}
    result = {
        "case": case, "dp": dp, "tp": tp, "table": plan.table(), "state_dict": state_dict, "grads_wider": wider,
        "loss_error": abs(_dp_mean(loss, mesh) - reference["loss"]),
        "loss_after_error": abs(_dp_mean(after, mesh) - reference["loss_after"]),
        "max_param_error": max(errors.values()), "worst_param": max((e, n) for n, e in errors.items())[1],
        "ill_conditioned_elements": ill, "elements": sum(p.numel() for p in reference["params"].values()),
        "ill_conditioned_by_param": ill_by_param, "zero_grad_elements": zero,
        "max_ill_conditioned_error": max(ill_errors, default=0.0),
        "params_compared": len(errors), "params_expected": len(reference["params"]),
        "forward": _kinds(fwd), "backward": _kinds(bwd), "loss_collectives": _kinds(loss_comm),
        "plan_forward": plan.forward_collectives, "plan_backward": plan.backward_collectives,
        "bytes": held, "single_bytes": reference["bytes"],
        "plan_bytes": {"params": plan.per_rank.params, "grads": plan.per_rank.grads,
                       "optimizer": plan.per_rank.optimizer, "total": plan.per_rank.total},
        "plan_single_bytes": {"total": plan.single.total},
    }
    if checkpoint is not None:
        result["checkpoint"] = _checkpoint_roundtrip(model, plan, mesh, sharded, opt, checkpoint)
    if compile_check:
        for key, p in plans.items():
            if key not in compiled:  # the vocabulary-split attempt, last (see above)
                compiled[key] = _try_compiled_step(spec, p, mesh, xs, ys, reference)
        for key, c in compiled.items():
            if "params" in c:
                params, compiled_loss = c.pop("params"), c.pop("loss")
                if plans[key] is plan:  # the uncompiled step of the same plan on this rank
                    c["eager_loss_error"] = abs(compiled_loss - float(loss.detach()))
                    c["eager_max_param_error"] = max(
                        _masked_max((params[n] - _full(mine[n]).detach()).abs(), reference["grads"].get(n))
                        for n in params)
            result[key] = c
    return result


def _checkpoint_roundtrip(model, plan, mesh, sharded, opt, path: str) -> dict:
    """Save model + optimizer with DCP, load into a fresh sharded copy: max difference after reload."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    import fxmem

    model_sd, optim_sd = get_state_dict(sharded, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)
    fresh = fxmem.shard.apply(copy.deepcopy(model), plan, mesh)   # the untrained weights
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=LR)
    model_sd2, optim_sd2 = get_state_dict(fresh, fresh_opt)       # initializes AdamW's state to load into
    state = {"model": model_sd2, "optim": optim_sd2}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(fresh, fresh_opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    before = dict(sharded.named_parameters())
    param_diff = max(float((_full(p) - _full(before[n])).abs().max()) for n, p in fresh.named_parameters())
    moments = []
    for p_old, p_new in zip(sharded.parameters(), fresh.parameters()):
        for key in ("exp_avg", "exp_avg_sq"):
            moments.append(float((_full(opt.state[p_old][key]) - _full(fresh_opt.state[p_new][key])).abs().max()))
    changed = max(float((_full(p) - _full(q)).abs().max())
                  for p, q in zip(fresh.parameters(), fxmem.shard.apply(copy.deepcopy(model), plan, mesh).parameters()))
    return {"param_diff": param_diff, "moment_diff": max(moments), "moments_compared": len(moments),
            "differs_from_untrained": changed}


def _well_conditioned(grad: torch.Tensor | None, like: torch.Tensor, other: torch.Tensor | None = None) -> torch.Tensor:
    """Where Adam's first update does not amplify rounding noise (run_mesh): ``|g| >= 1e-6`` in
    one process, or (given the other run's gradient ``other``) exactly zero in both runs (no
    noise to amplify: a row of an embedding no token of the batch uses)."""
    if grad is None:
        return torch.ones_like(like, dtype=torch.bool)
    mask = grad.abs() >= ILL_CONDITIONED_GRAD
    if other is not None:
        mask |= (grad == 0) & (other == 0)
    return mask


def _masked_max(diff: torch.Tensor, grad: torch.Tensor | None) -> float:
    """Largest difference where Adam's first update is well conditioned (:func:`_well_conditioned`)."""
    mask = _well_conditioned(grad, diff)
    return float(diff[mask].max()) if mask.any() else 0.0


def _try_compiled_step(spec: MeshCase, plan, mesh, xs, ys, reference) -> dict:
    from fxmem.testing.tp import _describe_failure

    try:
        return _compiled_step(spec, plan, mesh, xs, ys, reference)
    except Exception as exc:  # noqa: BLE001 - recorded: how torch.compile fails on this composition
        return {"failure": _describe_failure(exc)}


def _compiled_step(spec: MeshCase, plan, mesh, xs: tuple, ys, reference, **compile_kwargs) -> dict:
    """``torch.compile(backend="fxmem")`` of the sharded model: one AdamW step, compared with one
    process; also returns this rank's loss and the full parameters after the step (``loss``,
    ``params``) for :func:`run_mesh` to compare with the uncompiled sharded step."""
    import fxmem

    sharded = fxmem.shard.apply(copy.deepcopy(spec.model), plan, mesh)
    opt = torch.optim.AdamW(sharded.parameters(), lr=LR)
    torch._dynamo.reset()
    compiled = torch.compile(sharded, **({"backend": "fxmem"} | compile_kwargs))
    group = _dp_group(mesh)
    loss = spec.loss(compiled(*xs), ys, group)
    loss.backward()
    opt.step()
    mine = {n: _full(p).detach() for n, p in sharded.named_parameters()}
    # as in run_mesh: Adam's ill-conditioned elements apart
    errors = [_masked_max((mine[n] - p).abs(), reference["grads"].get(n)) for n, p in reference["params"].items()
              if n in mine]
    return {"loss_error": abs(_dp_mean(loss, mesh) - reference["loss"]), "max_param_error": max(errors),
            "params_compared": len(errors), "loss": float(loss.detach()), "params": mine}


UNIT_ROUNDOFF = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}  # 8 / 11 significand bits


FP16_LOSS_SCALE = 2.0 ** 10  # the fp16 runs' initial loss scale, on both sides


def run_mesh_precision(rank: int, world_size: int, case: str, dp: int, tp: int, precision: str = "bf16",
                       vocab: str | bool = "auto") -> dict:
    """``plan(mesh=..., precision=...)`` end to end against one process computing in the same dtypes.

    The mesh: FSDP2's ``MixedPrecisionPolicy(param_dtype=low, reduce_dtype=float32)`` — parameters
    all-gathered and cast low, forward and backward computed low (no autocast), gradients cast to
    fp32 and reduced in fp32 onto fp32 master shards, AdamW in fp32. The reference does the same in
    one process on the global batch: a copy whose *parameters* (not buffers: FSDP2 casts only
    parameters) are cast low, its gradients cast to fp32 onto the fp32 model, AdamW in fp32. The
    two round the same values; they differ where the order of operations differs (the batch split
    over dp, tensor parallelism's partial sums rounded low before their all-reduce), each by a few
    roundings of relative size u (``UNIT_ROUNDOFF``). Returned: the loss error (relative), each
    parameter's gradient error ``|g - g_ref| / |g_ref|`` (norms), and after the step the largest
    parameter error where the reference gradient is well above the rounding noise (there Adam's
    first update is ``lr · sign(g)`` on both sides, so the fp32 masters must match) and the share of
    elements below it.

    ``"fp16"`` trains with :func:`fxmem.shard.grad_scaler` (loss scale :data:`FP16_LOSS_SCALE`;
    the reference scales its loss the same and divides its gradients back), the gradients compared
    after ``unscale_``. Then a second step with an overflow in the last rank's shard of a
    tensor-parallel gradient only: ``overflow`` says how many parameters moved on this rank (every
    rank must skip the step) and the scale after it (halved on every rank).
    """
    from torch.distributed.device_mesh import init_device_mesh

    import fxmem
    from fxmem.shard.mesh import _PRECISIONS

    dtype = _PRECISIONS[precision]
    loss_scale = FP16_LOSS_SCALE if precision == "fp16" else None
    spec = mesh_case(case, dp)
    model = spec.model
    ref_loss, ref_grads, ref_params = _low_reference(model, spec.inputs, spec.target, dtype, spec.loss, loss_scale)

    mesh = init_device_mesh("cpu", (dp, tp), mesh_dim_names=("dp", "tp"))
    xs, ys = spec.local(mesh["dp"].get_local_rank(), dp)
    plan = fxmem.shard.plan(copy.deepcopy(model), *xs, mesh={"dp": dp, "tp": tp}, precision=precision, vocab=vocab)
    sharded = fxmem.shard.apply(copy.deepcopy(model), plan, mesh)
    opt = torch.optim.AdamW(sharded.parameters(), lr=LR)
    scaler = fxmem.shard.grad_scaler(plan, "cpu", init_scale=loss_scale or 1.0)

    out = sharded(*xs)
    loss = spec.loss(out, ys, _dp_group(mesh))
    scaler.scale(loss).backward()
    scaler.unscale_(opt)  # the gradients compared are the unscaled ones
    grads = {n: _full(p.grad) for n, p in sharded.named_parameters()}
    master_dtypes = {str(p.dtype) for p in sharded.parameters()} | {str(g.dtype) for g in grads.values()}
    scaler.step(opt)
    scaler.update()
    params = {n: _full(p).detach() for n, p in sharded.named_parameters()}
    errors = _precision_errors(grads, params, ref_grads, ref_params)
    # both low-precision runs against fp32 (one process, global batch): where the model's gradients
    # cancel heavily (a sentence embedder's normalisation), two bf16 runs that round in different
    # orders differ by more than a few u; what matters then is that the mesh is no further from
    # the exact gradient than one process in the same dtype
    exact = single_step(copy.deepcopy(model), spec.inputs, spec.target, spec.loss)["grads"]
    fp32_norm = sum(float(g.norm()) ** 2 for g in exact.values()) ** 0.5

    def from_fp32(gs: dict) -> float:
        return sum(float((gs[n] - g).norm()) ** 2 for n, g in exact.items()) ** 0.5 / fp32_norm

    global_loss = _dp_mean(loss, mesh)
    result = {"case": case, "dp": dp, "tp": tp, "precision": precision, "unit_roundoff": UNIT_ROUNDOFF[dtype],
              "output_dtype": str(logits(out).dtype), "master_dtypes": sorted(master_dtypes),
              "loss": global_loss, "ref_loss": ref_loss, "loss_rel_error": abs(global_loss - ref_loss) / abs(ref_loss),
              "scaler_enabled": scaler.is_enabled(), **errors,
              "grad_rel_error_vs_fp32": from_fp32(grads), "ref_grad_rel_error_vs_fp32": from_fp32(ref_grads)}
    if loss_scale is not None:
        result["overflow"] = _overflow_step(rank, world_size, sharded, opt, scaler, xs, ys, spec, mesh)
    return result


def overflow_by_scaler(rank: int, world_size: int, case: str = "gpt", dp: int = 2, tp: int = 2) -> dict:
    """fp16 on a ``dp × tp`` mesh planned with ``vocab=False`` (the embedding whole over tp: the
    first gradient FSDP2 holds is sharded over dp only), one step with an overflow in the last
    rank's shard of a tensor-parallel gradient (:func:`_overflow_step`), under
    :func:`fxmem.shard.grad_scaler` and under ``torch.amp.GradScaler``: what each rank did."""
    from torch.distributed.device_mesh import init_device_mesh

    import fxmem

    spec = mesh_case(case, dp)
    mesh = init_device_mesh("cpu", (dp, tp), mesh_dim_names=("dp", "tp"))
    xs, ys = spec.local(mesh["dp"].get_local_rank(), dp)
    plan = fxmem.shard.plan(copy.deepcopy(spec.model), *xs, mesh={"dp": dp, "tp": tp}, precision="fp16", vocab=False)
    rows = {}
    for kind in ("fxmem.shard.grad_scaler", "torch.amp.GradScaler"):
        sharded = fxmem.shard.apply(copy.deepcopy(spec.model), plan, mesh)
        opt = torch.optim.AdamW(sharded.parameters(), lr=LR)
        scaler = (fxmem.shard.grad_scaler(plan, "cpu", init_scale=FP16_LOSS_SCALE) if kind.startswith("fxmem")
                  else torch.amp.GradScaler("cpu", init_scale=FP16_LOSS_SCALE))
        rows[kind] = _overflow_step(rank, world_size, sharded, opt, scaler, xs, ys, spec, mesh)
    return rows


def _overflow_step(rank: int, world_size: int, sharded: nn.Module, opt, scaler, xs, ys, spec: MeshCase, mesh) -> dict:
    """A training step whose last rank alone finds an overflow, in its shard of a gradient that is
    sharded over ``tp`` (its other ranks' gradients finite): the parameters this rank's step moved
    and the scale after it."""
    from torch.distributed.tensor import DTensor

    opt.zero_grad()
    out = sharded(*xs)
    scaler.scale(spec.loss(out, ys, _dp_group(mesh))).backward()
    tp_sharded = [p for p in sharded.parameters() if isinstance(p.grad, DTensor)
                  and any(pl.is_shard() for pl, name in zip(p.grad.placements, p.grad.device_mesh.mesh_dim_names)
                          if name == "tp")]
    if rank == world_size - 1:
        tp_sharded[-1].grad.to_local().view(-1)[0] = float("inf")
    before = [_local(p).detach().clone() for p in sharded.parameters()]
    scaler.step(opt)
    scaler.update()
    moved = sum(int(not torch.equal(b, _local(p).detach())) for b, p in zip(before, sharded.parameters()))
    return {"params_moved": moved, "scale": float(scaler.get_scale()), "tp_sharded_grads": len(tp_sharded)}


def _low_reference(model: nn.Module, inputs: tuple, target: Any, dtype: torch.dtype, loss: Callable | None = None,
                   loss_scale: float | None = None):
    """One process computing as FSDP2's ``MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=fp32)``
    does, without autocast: a copy whose *parameters* (not buffers) are ``dtype``, on the global
    batch ``model(*inputs)`` with ``loss(output, target, None)`` (default :func:`loss_fn`); its
    gradients cast to fp32 onto an fp32 copy, one AdamW step in fp32. ``loss_scale``: the loss is
    multiplied by it before the backward and the fp32 gradients divided by it (a loss scaler's
    first step). Returns the loss, the fp32 gradients and the parameters after the step, by name."""
    single = copy.deepcopy(model)
    low = copy.deepcopy(model)
    for p in low.parameters():
        p.data = p.data.to(dtype)
    ref_loss = (loss or _lm_loss)(low(*inputs), target, None)
    (ref_loss * loss_scale if loss_scale else ref_loss).backward()
    for p, q in zip(single.parameters(), low.parameters()):
        p.grad = q.grad.float() / loss_scale if loss_scale else q.grad.float()
    ref_grads = {n: p.grad.clone() for n, p in single.named_parameters()}
    torch.optim.AdamW(single.parameters(), lr=LR).step()
    return float(ref_loss.detach()), ref_grads, {n: p.detach().clone() for n, p in single.named_parameters()}


def _precision_errors(grads: dict, params: dict, ref_grads: dict, ref_params: dict) -> dict:
    """Low-precision gradients and parameters against :func:`_low_reference` over the names in
    ``grads`` (a pipeline stage: its own): the gradient vector's relative error as a whole, each
    tensor's (where its gradient is clear of the rounding noise), and the parameters after AdamW
    where the reference gradient is clear of the noise (there Adam's first update is
    ``lr · sign(g)`` on both sides, so the fp32 masters must match)."""
    ref_grads = {n: ref_grads[n] for n in grads}
    # a gradient that is zero or tiny in exact arithmetic (a key projection's bias: softmax ignores
    # a per-row constant; the query bias's is small) is mostly rounding noise on both sides: such
    # tensors (norm below 1e-3 of the largest) are compared only inside the global figure
    norms = {n: float(g.norm()) for n, g in ref_grads.items()}
    signal = {n for n, v in norms.items() if v >= 1e-3 * max(norms.values())}
    diff_sq = sum(float((grads[n] - g).norm()) ** 2 for n, g in ref_grads.items())
    grad_errors, param_errors, noisy, elements = {}, {}, 0, 0
    for n in signal:
        g_ref = ref_grads[n]
        grad_errors[n] = float((grads[n] - g_ref).norm()) / norms[n]
        # well above the noise: 2**-5 of the tensor's largest gradient (the noise is a few u = 2**-8 of it)
        clear = g_ref.abs() >= 2.0 ** -5 * g_ref.abs().max()
        diff = (params[n] - ref_params[n]).abs()
        param_errors[n] = float(diff[clear].max())
        noisy += int((~clear).sum())
        elements += g_ref.numel()
    return {"grad_rel_error": diff_sq ** 0.5 / sum(v * v for v in norms.values()) ** 0.5,
            "max_grad_rel_error": max(grad_errors.values()), "worst_grad": max((e, n) for n, e in grad_errors.items())[1],
            "grads_compared": len(grad_errors), "params_expected": len(ref_grads),
            "structurally_zero": sorted(set(norms) - signal),
            "max_param_error_clear": max(param_errors.values()), "noisy_share": noisy / elements}


def _schedule_step(sched, stage_index: int, stages: int, x: torch.Tensor, y: torch.Tensor, losses: list) -> None:
    """One ``schedule.step`` as stage ``stage_index`` of ``stages`` takes it: the batch on the
    first, the target (and the list the losses go into) on the last, nothing in between."""
    if stage_index == 0:
        sched.step(x)
    elif stage_index == stages - 1:
        sched.step(target=y, losses=losses)
    else:
        sched.step()


def run_pipeline(rank: int, world_size: int, case: str, schedules: tuple[str, ...] = ("gpipe", "1f1b"), *,
                 layers: int = 4, microbatches: int = 2) -> dict:
    """One rank's part of the pipeline check, per schedule: its stage's bytes, the loss and gradients
    against one process. The model is measured once (``fxmem.shard.pipeline`` with the loss) and
    balanced for each schedule with :meth:`PipelinePlan.with_schedule`."""
    import fxmem

    model, vocab_size = build(case, layers=layers)
    x, y = batch(vocab_size, 2 * microbatches)
    single = copy.deepcopy(model)
    ref_loss = loss_fn(single(x), y)
    ref_loss.backward()
    ref = dict(single.named_parameters())
    measured = fxmem.shard.pipeline(model, x, stages=world_size, schedule=schedules[0], microbatches=microbatches,
                                    loss_fn=loss_fn, target=y)
    out = {}
    for schedule in schedules:
        plan = measured.with_schedule(schedule)
        pipe, stage, sched = plan.build(copy.deepcopy(model), rank, "cpu")
        del pipe  # the other stages' modules: not this rank's memory

        def step(losses, sched=sched):
            _schedule_step(sched, rank, world_size, x, y, losses)

        # The first step, on the fresh stage, measured by the CPU allocator's events: parameter
        # gradients, receive buffers and fwd_cache are made in it (the parameters exist before).
        gc.collect()
        peak, _ = fxmem.measure.peak_memory(lambda: step([]), device="cpu")
        for p in stage.submod.parameters():
            p.grad = None
        losses: list[torch.Tensor] = []
        saved = [0]
        seen: set[int] = set()
        keep: list[torch.Tensor] = []  # alive until the end: a freed storage's address is not reused and missed
        params = {p.untyped_storage().data_ptr() for p in stage.submod.parameters()}

        def pack(t, params=params, seen=seen, keep=keep, saved=saved):  # this schedule's sets, bound now
            ptr = t.untyped_storage().data_ptr()
            if ptr not in params and ptr not in seen:
                seen.add(ptr)
                keep.append(t)
                saved[0] += t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            step(losses)
        grad_errors = [float((p.grad - ref[n].grad).abs().max()) for n, p in stage.submod.named_parameters()]
        param_bytes = sum(tensor_bytes(p) for p in {id(p): p for p in stage.submod.parameters()}.values())
        per_mb = saved[0] // microbatches
        planned = plan.stages[rank]
        out[schedule] = {
            "case": case, "schedule": schedule, "stage": rank, "table": plan.table(),
            "param_bytes": param_bytes, "activation_bytes": per_mb, "in_flight": planned.in_flight,
            "bytes": param_bytes + planned.in_flight * per_mb, "plan_bytes": planned.bytes,
            "plan_param_bytes": planned.param_bytes, "plan_activation_bytes": planned.activation_bytes,
            "peak_bytes": param_bytes + peak.peak_bytes,
            "plan_grad_bytes": planned.grad_bytes, "plan_boundary_bytes": planned.boundary_bytes,
            "loss_error": abs(float(sum(losses) / len(losses)) - float(ref_loss)) if losses else None,
            "max_grad_error": max(grad_errors), "grads_compared": len(grad_errors)}
    return out


def run_pipeline_dp(rank: int, world_size: int, case: str, schedule: str = "1f1b", *, dp: int = 2,
                    layers: int = 2, microbatches: int = 2, precision: str | None = None) -> dict:
    """One rank's part of the pipeline × FSDP2 check on a ``("pp", "dp")`` mesh of ``world_size``
    ranks (``world_size / dp`` stages): the plan (``fxmem.shard.pipeline(..., dp=dp)``) built with
    ``dp_mesh=mesh["dp"]``, one schedule step on this dp rank's slice of the global batch and one
    AdamW step, against one process taking one AdamW step on the global batch: the loss (mean over
    microbatches and dp), the gradients and the parameters after the step (whole tensors), and the
    rank's peak in ``schedule.step`` (CPU allocator events) against the plan's per-rank bytes.

    ``precision`` (``"bf16"``): the stages under FSDP2's ``MixedPrecisionPolicy``, against one
    process computing in the same dtypes (:func:`_low_reference`); the errors are then relative,
    as :func:`run_mesh_precision` reports them (:func:`_precision_errors`, over this stage's
    parameters)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule

    import fxmem
    from fxmem.shard.mesh import _PRECISIONS

    stages = world_size // dp
    mesh = init_device_mesh("cpu", (stages, dp), mesh_dim_names=("pp", "dp"))
    stage_index, dp_rank = mesh.get_local_rank("pp"), mesh.get_local_rank("dp")
    model, vocab_size = build(case, layers=layers)
    x, y = batch(vocab_size, 2 * dp * microbatches)
    if precision is None:
        reference = single_step(copy.deepcopy(model), (x,), y)
    else:
        ref_loss, ref_grads, ref_params = _low_reference(model, (x,), y, _PRECISIONS[precision])
    plan = fxmem.shard.pipeline(model, x, stages=stages, schedule=schedule, microbatches=microbatches,
                                loss_fn=loss_fn, target=y, dp=dp, precision=precision)
    pipe, stage, sched = plan.build(copy.deepcopy(model), stage_index, "cpu", group=mesh["pp"].get_group(),
                                    dp_mesh=mesh["dp"])
    del pipe
    xs, ys = x.chunk(dp)[dp_rank], y.chunk(dp)[dp_rank]
    losses: list[torch.Tensor] = []

    def step():
        _schedule_step(sched, stage_index, stages, xs, ys, losses)

    params = {id(p): p for p in stage.submod.parameters()}
    shard = sum(tensor_bytes(_local(p)) for p in params.values())
    gc.collect()
    peak, _ = fxmem.measure.peak_memory(step, device="cpu")
    grads = {n: _full(p.grad) for n, p in stage.submod.named_parameters()}
    master_dtypes = sorted({str(p.dtype) for p in stage.submod.parameters()} | {str(g.dtype) for g in grads.values()})
    opt = torch.optim.AdamW(stage.submod.parameters(), lr=LR)
    opt.step()
    state = state_bytes(stage.submod, opt)
    out = {n: _full(p.detach()) for n, p in stage.submod.named_parameters()}
    loss = None
    if losses:
        loss = torch.stack([t.detach().float() for t in losses]).mean()
        loss = _dp_mean(loss, mesh)
    planned = plan.stages[stage_index]
    result = {"case": case, "schedule": schedule, "precision": precision, "stage": stage_index, "dp_rank": dp_rank,
              "table": plan.table(), "fsdp": isinstance(stage.submod, FSDPModule), "master_dtypes": master_dtypes,
              "params_compared": len(out), "shard_bytes": shard, "plan_shard_bytes": planned.shard_bytes,
              "state_bytes": state["total"], "plan_state_bytes": planned.state_bytes,
              "single_stage_param_bytes": planned.param_bytes,
              "peak_bytes": shard + peak.peak_bytes, "plan_bytes": planned.bytes}
    if precision is None:
        result.update({
            "loss_error": abs(loss - reference["loss"]) if loss is not None else None,
            "max_grad_error": max(float((g - reference["grads"][n]).abs().max()) for n, g in grads.items()),
            "max_param_error": max(float((p - reference["params"][n]).abs().max()) for n, p in out.items())})
    else:
        result.update({"unit_roundoff": UNIT_ROUNDOFF[_PRECISIONS[precision]],
                       # the last stage's output (the logits): computed in the low dtype
                       "output_dtype": str(logits(stage.output_chunks[0]).dtype) if losses else None,
                       "loss_rel_error": abs(loss - ref_loss) / abs(ref_loss) if loss is not None else None,
                       **_precision_errors(grads, out, ref_grads, ref_params)})
    # The first step measured once more, on a second stage built the same way: the profiler now
    # and then misses a free made on gloo's worker thread and counts that all-gather buffer live
    # to the end of the step (docs/shard.md, "the race"). Without it the two measure the same to
    # the byte; the smaller is the step's peak.
    _, stage_again, sched_again = plan.build(copy.deepcopy(model), stage_index, "cpu", group=mesh["pp"].get_group(),
                                             dp_mesh=mesh["dp"])
    gc.collect()
    again, _ = fxmem.measure.peak_memory(lambda: _schedule_step(sched_again, stage_index, stages, xs, ys, []),
                                         device="cpu")
    shard_again = sum(tensor_bytes(_local(p)) for p in stage_again.submod.parameters())
    result["peak_bytes_each_build"] = [shard + peak.peak_bytes, shard_again + again.peak_bytes]
    result["peak_bytes"] = min(result["peak_bytes_each_build"])
    return result


@contextlib.contextmanager
def count_functional_collectives():
    """Count the calls of ``torch.distributed._functional_collectives``' collectives (DTensor's
    redistributions call them) while the block runs: ``{name: calls}``. (``CommDebugMode``'s module
    tracker fails inside a pipeline schedule: its forward hooks lose their parent.)"""
    import torch.distributed._functional_collectives as funcol

    calls: Counter = Counter()
    names = ("all_reduce", "all_gather_tensor", "all_gather_tensor_autograd", "reduce_scatter_tensor",
             "reduce_scatter_tensor_autograd", "all_to_all_single")
    originals = {n: getattr(funcol, n) for n in names if hasattr(funcol, n)}

    def counting(name, fn):
        @functools.wraps(fn)
        def call(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return call

    for name, fn in originals.items():
        setattr(funcol, name, counting(name, fn))
    try:
        yield calls
    finally:
        for name, fn in originals.items():
            setattr(funcol, name, fn)


def run_pipeline_tp(rank: int, world_size: int, case: str, schedule: str = "1f1b", *, tp: int = 2,
                    layers: int = 2, microbatches: int = 2) -> dict:
    """One rank's part of the pipeline × tensor-parallel check on a ``("pp", "tp")`` mesh of
    ``world_size`` ranks (``world_size / tp`` stages): ``fxmem.shard.pipeline(..., tp=tp)`` built
    with ``tp_mesh=mesh["tp"]``, one schedule step (every tp rank of a stage on the same batch)
    and one AdamW step, against one process on the same batch: the loss, the gradients and the
    parameters after the step (whole tensors), the functional collectives of the step, and the
    rank's peak in ``schedule.step`` (CPU allocator events; its parameter shards counted) against
    the plan's bytes."""
    from torch.distributed.device_mesh import init_device_mesh

    import fxmem

    stages = world_size // tp
    mesh = init_device_mesh("cpu", (stages, tp), mesh_dim_names=("pp", "tp"))
    stage_index = mesh.get_local_rank("pp")
    model, vocab_size = build(case, layers=layers)
    x, y = batch(vocab_size, 2 * microbatches)
    reference = single_step(copy.deepcopy(model), (x,), y)
    plan = fxmem.shard.pipeline(model, x, stages=stages, schedule=schedule, microbatches=microbatches,
                                loss_fn=loss_fn, target=y, tp=tp)
    pipe, stage, sched = plan.build(copy.deepcopy(model), stage_index, "cpu", group=mesh["pp"].get_group(),
                                    tp_mesh=mesh["tp"])
    del pipe
    losses: list[torch.Tensor] = []
    shard = sum(tensor_bytes(_local(p)) for p in {id(p): p for p in stage.submod.parameters()}.values())
    gc.collect()
    with count_functional_collectives() as calls:
        peak, _ = fxmem.measure.peak_memory(lambda: _schedule_step(sched, stage_index, stages, x, y, losses),
                                            device="cpu")
    grads = {n: _full(p.grad) for n, p in stage.submod.named_parameters()}
    sharded = sum(1 for p in stage.submod.parameters() if any(pl.is_shard() for pl in p.placements))
    grads_as_params = all(tuple(p.grad.placements) == tuple(p.placements) for p in stage.submod.parameters())
    opt = torch.optim.AdamW(stage.submod.parameters(), lr=LR)
    with count_functional_collectives() as optimizer_calls:
        opt.step()
    out = {n: _full(p.detach()) for n, p in stage.submod.named_parameters()}
    loss = torch.stack([t.detach().float() for t in losses]).mean() if losses else None
    planned = plan.stages[stage_index]
    return {"case": case, "schedule": schedule, "stage": stage_index, "tp_rank": mesh.get_local_rank("tp"),
            "table": plan.table(), "split_points": plan.split_points, "params_compared": len(out),
            "sharded_params": sharded, "shard_bytes": shard, "plan_param_bytes": planned.param_bytes,
            "peak_bytes": shard + peak.peak_bytes, "plan_bytes": planned.bytes,
            "collectives": dict(calls), "optimizer_collectives": dict(optimizer_calls),
            "grads_as_params": grads_as_params, "plan_forward": plan.tp_plan.forward_collectives,
            "plan_backward": plan.tp_plan.backward_collectives,
            "loss_error": abs(float(loss) - reference["loss"]) if loss is not None else None,
            "max_grad_error": max(float((g - reference["grads"][n]).abs().max()) for n, g in grads.items()),
            "max_param_error": max(float((p - reference["params"][n]).abs().max()) for n, p in out.items())}


@contextlib.contextmanager
def fake_rank(world_size: int, rank: int = 0):
    """This process as ``rank`` of ``world_size`` on PyTorch's fake process group
    (``torch.testing._internal.distributed.fake_pg``): collectives return at once and compute
    nothing, but every tensor a rank allocates is allocated — one rank's memory, measured in one
    process (a dp 2 × tp 2 GPT step's peak equals gloo's rank to the byte, docs/fit.md
    "Distributed"). Numbers computed under it are meaningless. The group is destroyed on exit."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError(f"fake_rank: a default process group ({dist.get_backend()}, world size "
                           f"{dist.get_world_size()}) is already initialized in this process; destroy it "
                           "(torch.distributed.destroy_process_group()) before measuring a fake rank")
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def fit_case(case: str, shape: str = "tiny", layers: int = 2, per_dp: int | None = None) -> tuple[nn.Module, tuple, dict]:
    """A model of :func:`build` and the arguments of its training step: ``(model, args, kwargs)``.

    The loss is inside the model, as fit traces it: HF models take labels (their ModelOutput
    carries the loss), the built-in GPT targets. (Without them the step's loss —
    ``logits.pow(2).mean()`` — runs eagerly outside the compiled graph, where fit does not look:
    three logits-sized buffers, what the tiny cases' estimates lacked before.)"""
    torch.manual_seed(0)
    model, vocab_size = build(case, layers=layers, shape=shape)
    x, y = batch(vocab_size, per_dp or (2 if shape == "tiny" else 4), seq=SHAPES[shape][2])
    if case.startswith(("llama", "gpt2")):
        return model, (x,), {"labels": x}
    return model, (x, y), {}


def _sharded_fit_case(case: str, dp: int, tp: int, shape: str, layers: int, per_dp: int | None, plan
                      ) -> tuple[nn.Module, tuple, dict]:
    """:func:`fit_case`'s model sharded by ``fxmem.shard.apply`` on a fresh ``dp × tp`` mesh
    (``plan``, or ``fxmem.shard.plan``'s for ``mesh={"dp": dp, "tp": tp}``), and its arguments."""
    from torch.distributed.device_mesh import init_device_mesh

    import fxmem

    model, args, kw = fit_case(case, shape, layers, per_dp)
    if plan is None:
        plan = fxmem.shard.plan(copy.deepcopy(model), *args, kwargs=kw, mesh={"dp": dp, "tp": tp})
    mesh = init_device_mesh("cpu", (dp, tp), mesh_dim_names=("dp", "tp"))
    torch._dynamo.reset()
    return fxmem.shard.apply(model, plan, mesh), args, kw


def _param_groups(state) -> list:
    """An FSDP2 state's parameter groups: torch 2.13 keeps a list (``_fsdp_param_groups``), 2.11
    one group or None (``_fsdp_param_group``)."""
    if state is None:
        return []
    if hasattr(state, "_fsdp_param_groups"):
        return list(state._fsdp_param_groups)
    group = getattr(state, "_fsdp_param_group", None)
    return [group] if group is not None else []


def _held_bytes(sharded: nn.Module, args: tuple, kw: dict) -> int:
    """This rank's local bytes of the parameters, buffers and batch, each tensor once (HF models
    take their ``labels`` as the ``input_ids`` tensor itself). A module FSDP2 left unsharded (the
    root after a no-grad call: it is not resharded after forward) holds its shards *and* its
    gathered parameters, which ``parameters()`` then returns: both are counted."""
    tensors = {id(t): t for t in [*sharded.parameters(), *sharded.buffers(), *args, *kw.values()]
               if isinstance(t, torch.Tensor)}
    for module in sharded.modules():
        state = module._get_fsdp_state() if hasattr(module, "_get_fsdp_state") else None
        for group in _param_groups(state):
            tensors.update((id(fp.sharded_param), fp.sharded_param) for fp in group.fsdp_params)
    return sum(tensor_bytes(_local(t)) for t in tensors.values())


def mesh_step_peak(rank: int, world_size: int, case: str, dp: int, tp: int, options: dict, shape: str = "tiny",
                   layers: int = 2, per_dp: int | None = None, plan=None) -> int:
    """This rank's whole-step peak of :func:`fit_case`'s model sharded by ``fxmem.shard.apply``
    (``plan``, or ``fxmem.shard.plan``'s for ``mesh={"dp": dp, "tp": tp}``), compiled with
    ``backend="fxmem"`` and ``options``, measured as fit defines it: the local parameters, buffers
    and batch held before the step plus :func:`fxmem.measure.peak_memory`'s peak above them."""
    from fxmem.fit import training_step
    from fxmem.measure import peak_memory

    sharded, args, kw = _sharded_fit_case(case, dp, tp, shape, layers, per_dp, plan)
    step = training_step(sharded, *args, kwargs=kw, options=options)
    step()
    step()  # compiled, and no recompilation left in the measured step
    for p in sharded.parameters():
        p.grad = None
    before = _held_bytes(sharded, args, kw)
    peak, _ = peak_memory(step, device="cpu")
    del step, sharded
    gc.collect()
    return before + peak.peak_bytes


def mesh_inference_peak(rank: int, world_size: int, case: str, dp: int, tp: int, options: dict, shape: str = "tiny",
                        layers: int = 2, per_dp: int | None = None, plan=None) -> int:
    """This rank's no-grad forward peak of :func:`fit_case`'s model sharded as in
    :func:`mesh_step_peak`, compiled with ``backend="fxmem"`` and ``options``, measured as fit's
    inference estimate defines it: the local parameters, buffers and batch plus
    :func:`fxmem.measure.peak_memory`'s peak of the third call (its output held)."""
    from fxmem.measure import peak_memory

    sharded, args, kw = _sharded_fit_case(case, dp, tp, shape, layers, per_dp, plan)
    sharded.eval()
    fn = torch.compile(sharded, backend="fxmem", options=dict(options))
    with torch.no_grad():
        fn(*args, **kw)
        fn(*args, **kw)  # compiled, and no recompilation left in the measured call
        before = _held_bytes(sharded, args, kw)
        peak, out = peak_memory(functools.partial(fn, *args, **kw), device="cpu")
        del out
    del fn, sharded
    gc.collect()
    return before + peak.peak_bytes


def run_fit_mesh(rank: int, world_size: int, case: str, dp: int, tp: int, layers: int = 2, per_dp: int | None = None,
                 shape: str = "tiny", budgets: tuple = (), extra: tuple = (), mode: str = "training",
                 vocab: Any = "auto") -> list[dict]:
    """One rank's check of :func:`fxmem.fit`'s per-rank estimate on a ``dp × tp`` mesh in ``mode``
    (inference: measured by :func:`mesh_inference_peak`): ``fxmem.shard.plan(mesh={"dp": dp, "tp":
    tp}, vocab=vocab)`` made once and given to both fit (``plan=``) and the measurement, as a user
    would; fit's chosen options (no optimizer state) and each of ``extra`` (option dicts among
    fit's candidates: ``budgets`` adds remat budgets to them), each measured by
    :func:`mesh_step_peak`. One row per options measured."""
    import fxmem

    model, args, kw = fit_case(case, shape, layers, per_dp)
    plan = fxmem.shard.plan(copy.deepcopy(model), *args, kwargs=kw, mesh={"dp": dp, "tp": tp}, vocab=vocab)
    fit = fxmem.fit(copy.deepcopy(model), *args, kwargs=kw, memory="64GiB", mode=mode, plan=plan, budgets=budgets)
    measure = mesh_step_peak if mode == "training" else mesh_inference_peak
    rows = []
    for options in [fit.options, *[o for o in extra if o != fit.options]]:
        (cand,) = [c for c in fit.candidates if c.options == options]
        measured = measure(rank, world_size, case, dp, tp, options, shape, layers, per_dp, plan=plan)
        rows.append({"case": case, "shape": shape, "dp": dp, "tp": tp, "rank": rank, "mode": mode, "options": options,
                     "chosen": options == fit.options, "estimate": cand.estimate, "parts": dict(cand.parts),
                     "source": fit.per_rank_source, "measured": measured, "ratio": cand.estimate / measured,
                     "vocab_split": bool(plan.tp_plan is not None and plan.tp_plan.vocab)})
    return rows
