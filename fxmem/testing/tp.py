"""Tensor-parallel checks run inside ``torch.distributed`` processes (tests and the benchmark).

:func:`run_case` is what one rank does for one model: build it (same seed on every rank), take
the single-process outputs and gradients, plan with :func:`fxmem.shard.plan`, carry the plan out
with :func:`fxmem.shard.apply`, and measure what the rank holds and sends — per-rank parameter
bytes (local shards of unique parameters) and the collectives of one forward and one backward,
counted by ``torch.distributed.tensor.debug.CommDebugMode``. The same is measured for a
hand-written ``parallelize_module`` plan (the PyTorch tutorial's, with its manual head-count
fix) and for ``_tp_transform.tensor_parallel_transformation`` (its failure is recorded).
:func:`spawn` runs a function on N gloo processes on this machine and gathers their results.
"""

from __future__ import annotations

import copy
import os
import tempfile
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

from fxmem.analysis.sizes import tensor_bytes


class TwoLayerMLP(nn.Module):
    """The Megatron MLP: up (column-parallel) → GELU → down (row-parallel)."""

    def __init__(self, d: int = 16, hidden: int = 64):
        super().__init__()
        self.fc_in = nn.Linear(d, hidden)
        self.fc_out = nn.Linear(hidden, d)

    def forward(self, x):
        return self.fc_out(F.gelu(self.fc_in(x)))


def build(case: str) -> tuple[nn.Module, tuple]:
    """A tiny model and its example inputs, the same on every rank."""
    torch.manual_seed(0)
    if case == "mlp":
        return TwoLayerMLP(), (torch.randn(8, 16),)
    if case == "mlp3d":
        return TwoLayerMLP(), (torch.randn(2, 4, 16),)
    if case.startswith("gpt"):
        from fxmem.models.gpt import GPT, GPTConfig, example_batch

        attention = "sdpa" if "sdpa" in case else "manual"
        kv = None if "mha" in case else 2  # gpt_mha: 4 kv heads (multi-head), else grouped-query
        cfg = GPTConfig(vocab_size=64, block_size=8, n_layer=1, n_head=4, n_kv_head=kv, d_model=32, attention=attention)
        return GPT(cfg), (example_batch(cfg, 2, 8),)
    if case in ("llama", "llama_sdpa", "llama_kv1", "llama_kv1_sdpa"):
        import transformers

        sdpa = case.endswith("sdpa")
        # llama_kv1*: grouped-query attention with a single kv head (shared by every q head)
        cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=4, num_key_value_heads=1 if "kv1" in case else 2,
                                       max_position_embeddings=16, use_cache=False,
                                       attn_implementation="sdpa" if sdpa else "eager")
        model = transformers.LlamaForCausalLM(cfg)
        idx = torch.randint(0, 64, (2, 8))
        if sdpa:
            return model, (idx,)  # planned through torch.export (transformers' mask code branches on data)
        # eager attention with an explicit mask traces with make_fx directly
        return model, (idx, torch.ones_like(idx))
    if case == "gpt2":
        import transformers

        cfg = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=4, n_positions=16, bos_token_id=0,
                                      eos_token_id=0, use_cache=False, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                      attn_implementation="sdpa")
        return transformers.GPT2LMHeadModel(cfg), (torch.randint(0, 64, (2, 8)),)
    raise ValueError(f"unknown case {case!r}")


def _logits(out: Any) -> torch.Tensor:
    out = getattr(out, "logits", out)
    return out[0] if isinstance(out, tuple) else out


def local_bytes(model: nn.Module) -> int:
    """Bytes of parameters this rank holds (local shards of DTensors; tied parameters once)."""
    from torch.distributed.tensor import DTensor

    seen, total = set(), 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += tensor_bytes(p.to_local() if isinstance(p, DTensor) else p)
    return total


def _full(t):
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _kind(name: str) -> str:
    """A collective's kind from its op name: functional (``all_gather_into_tensor``) or c10d (``_allgather_base_``)."""
    flat = name.replace("_", "")
    for kind in ("all_reduce", "all_gather", "reduce_scatter", "all_to_all"):
        if kind.replace("_", "") in flat:
            return kind
    return name


def measure(model: nn.Module, args: tuple, reference: dict | None = None) -> dict:
    """Forward + backward of a (parallelized) model: collectives, bytes, and the max error."""
    from torch.distributed.tensor.debug import CommDebugMode

    with CommDebugMode() as fwd:
        out = _logits(model(*args))
    loss = out.float().pow(2).mean()
    with CommDebugMode() as bwd:
        loss.backward()
    result = {
        "forward": _kinds(fwd), "backward": _kinds(bwd), "bytes_per_rank": local_bytes(model),
        "out": out.detach(), "grads": {n: _full(p.grad).detach() for n, p in model.named_parameters() if p.grad is not None},
    }
    if reference is not None:
        result["max_out_error"] = float((out.detach() - reference["out"]).abs().max())
        errs = [float((result["grads"][n] - g).abs().max()) for n, g in reference["grads"].items() if n in result["grads"]]
        result["max_grad_error"] = max(errs) if errs else 0.0
        result["grads_compared"] = len(errs)
        result["grads_expected"] = len(reference["grads"])
    return result


def _kinds(mode) -> dict[str, int]:
    out: dict[str, int] = {}
    for k, v in mode.get_comm_counts().items():
        kind = _kind(str(k))
        out[kind] = out.get(kind, 0) + v
    return out


def hand_plan(case: str, model: nn.Module, world_size: int) -> dict | None:
    """The tutorial's hand-written plan (with its manual head-count fix), or None if none exists."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    if case in ("mlp", "mlp3d"):
        return {"fc_in": ColwiseParallel(), "fc_out": RowwiseParallel()}
    if case.startswith("gpt"):
        attn = model.blocks[0].attn
        if attn.n_kv_head % world_size:
            return None  # the tutorial's plan needs the kv heads to divide the ranks
        attn.n_head //= world_size      # the manual fix the tutorial asks for
        attn.n_kv_head //= world_size
        plan = {"wte": RowwiseParallel(input_layouts=Replicate()),
                "lm_head": ColwiseParallel(output_layouts=Replicate())}
        for n in ("q_proj", "k_proj", "v_proj"):
            plan[f"blocks.0.attn.{n}"] = ColwiseParallel()
        plan["blocks.0.attn.o_proj"] = RowwiseParallel()
        plan["blocks.0.mlp.up_proj"] = ColwiseParallel()
        plan["blocks.0.mlp.down_proj"] = RowwiseParallel()
        return plan
    if case == "llama":
        if model.config.num_key_value_heads % world_size:
            return None
        plan = {"model.embed_tokens": RowwiseParallel(input_layouts=Replicate()),
                "lm_head": ColwiseParallel(output_layouts=Replicate())}
        p = "model.layers.0."
        for n in ("q_proj", "k_proj", "v_proj"):
            plan[p + "self_attn." + n] = ColwiseParallel()
        plan[p + "self_attn.o_proj"] = RowwiseParallel()
        for n in ("gate_proj", "up_proj"):
            plan[p + "mlp." + n] = ColwiseParallel()
        plan[p + "mlp.down_proj"] = RowwiseParallel()
        return plan
    return None


def tp_transform_strategies(case: str, model: nn.Module) -> dict:
    """The same hand plan in ``tensor_parallel_transformation``'s form (style classes)."""
    styles = hand_plan(case, copy.deepcopy(model), 1) or {}
    return {k: type(v) for k, v in styles.items() if not k.endswith(("wte", "embed_tokens", "lm_head"))}


def run_tp_transform(case: str, model: nn.Module, args: tuple, reference: dict, rank: int, world_size: int) -> dict:
    """``tensor_parallel_transformation`` on the exported model: its figures, or how it fails."""
    from torch.distributed.tensor.debug import CommDebugMode
    from torch.distributed.tensor.experimental._tp_transform import tensor_parallel_transformation

    try:
        ep = torch.export.export(model, args)
        ep = tensor_parallel_transformation(ep, rank, world_size, "cpu", tp_transform_strategies(case, model))
        module = ep.module()
        with CommDebugMode() as fwd:
            out = _logits(module(*args))
        held = sum(tensor_bytes(t) for t in ep.state_dict.values())
        err = float((out.detach() - reference["out"]).abs().max())
        return {"ok": err < 1e-4, "forward": _kinds(fwd), "bytes_per_rank": held, "max_out_error": err,
                "failure": None if err < 1e-4 else f"wrong outputs (max error {err:.3g})"}
    except Exception as exc:  # noqa: BLE001 - the point is to record how it fails
        return {"ok": False, "failure": _describe_failure(exc)}


def _describe_failure(exc: BaseException) -> str:
    """The exception's type, first line, and the innermost frame that raised it."""
    first = (str(exc).splitlines() or [""])[0][:200]
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" (at {os.path.basename(frames[-1].filename)}:{frames[-1].lineno} {frames[-1].name})" if frames else ""
    return f"{type(exc).__name__}: {first}{where}"


def run_case(case: str, rank: int, world_size: int, *, hand: bool = True, tp_transform: bool = False,
             compile_check: bool = False, vocab: Any = "auto") -> dict:
    """Everything one rank measures for one model (see the module docstring)."""
    from torch.distributed.device_mesh import init_device_mesh

    import fxmem

    mesh = init_device_mesh("cpu", (world_size,))
    model, args = build(case)
    single = copy.deepcopy(model)
    reference = measure(single, args)
    result: dict[str, Any] = {"case": case, "world_size": world_size,
                              "single_bytes": local_bytes(single)}
    if vocab == "hand":  # split the same embeddings / head as the hand-written plan, to compare
        styles = hand_plan(case, copy.deepcopy(model), 1) or {}
        vocab = [k for k in styles if k.endswith(("wte", "embed_tokens", "lm_head"))]
    plan = fxmem.shard.plan(copy.deepcopy(model), *args, world_size=world_size, vocab=vocab)
    result["plan"] = {"forward": plan.forward_collectives, "backward": plan.backward_collectives,
                      "bytes_per_rank": plan.per_rank_param_bytes, "param_bytes": plan.param_bytes,
                      "propagated": plan.propagated_collectives, "fallbacks": plan.fallbacks,
                      "groups": [(g.colwise, g.rowwise, g.global_views) for g in plan.groups],
                      "vocab": plan.vocab,
                      "rows": [(r.module, r.style, r.param_bytes, r.per_rank_bytes) for r in plan.rows],
                      "table": plan.table()}
    sharded = fxmem.shard.apply(copy.deepcopy(model), plan, mesh)
    result["fxmem"] = measure(sharded, args, reference)
    if hand:
        hand_model = copy.deepcopy(model)
        styles = hand_plan(case, hand_model, world_size)
        if styles is not None:
            from torch.distributed.tensor.parallel import parallelize_module

            try:
                parallelize_module(hand_model, mesh, styles)
                result["hand"] = measure(hand_model, args, reference)
            except Exception as exc:  # noqa: BLE001 - recorded, compared in the report
                result["hand"] = {"failure": _describe_failure(exc)}
    if tp_transform:
        result["tp_transform"] = run_tp_transform(case, copy.deepcopy(model), args, reference, rank, world_size)
    if compile_check:
        result["compiled"] = _compiled(model, plan, mesh, args, reference)
    for key in ("fxmem", "hand"):
        if key in result:
            result[key].pop("out", None)
            result[key].pop("grads", None)
    return result


def _compiled(model, plan, mesh, args, reference) -> dict:
    """``torch.compile(backend="fxmem")`` of the parallelized model: inference and training."""
    import fxmem

    sharded = fxmem.shard.apply(copy.deepcopy(model), plan, mesh)
    torch._dynamo.reset()
    compiled = torch.compile(sharded, backend="fxmem")
    with torch.no_grad():
        inf = _logits(compiled(*args))
    train = measure(compiled, args, reference)
    # what explain(mode="training") records, through its backend and recorder (explain itself
    # stops at module_parameter_bytes, which reads storages a DTensor parameter does not have):
    # the "shard" pass lists the collectives of each compiled graph
    from fxmem.testing.recording import recording_backend

    backend = recording_backend()
    recorder = backend.recorder
    torch._dynamo.reset()  # a fresh compile, so that this backend (not a cached graph) runs
    again = torch.compile(fxmem.shard.apply(copy.deepcopy(model), plan, mesh), backend=backend)
    _logits(again(*args)).float().pow(2).mean().backward()
    shard_stats: dict[str, dict[str, int]] = {}
    for r in recorder.records:
        if r.name == "shard":
            per_stage = shard_stats.setdefault(r.stage, {})
            for kind, n in r.stats.get("collectives", {}).items():
                per_stage[kind] = per_stage.get(kind, 0) + n
    shard_stats["graphs"] = sorted({r.graph for r in recorder.records if r.name == "shard"})
    return {"inference_error": float((inf - reference["out"]).abs().max()), "explain": shard_stats,
            "train_out_error": train["max_out_error"], "train_grad_error": train["max_grad_error"],
            "forward": train["forward"], "backward": train["backward"]}


def _worker(rank: int, world_size: int, init_file: str, fn: Callable, fn_args: tuple, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    # A rank that raises does not wait at the barrier: the other ranks may be waiting on it in a
    # collective or a pipeline recv and would never get there (a hang, not an error). The exception
    # leaves this process; mp.spawn then terminates the other ranks and raises it in the parent.
    result = fn(rank, world_size, *fn_args)
    dist.barrier()
    dist.destroy_process_group()
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


def spawn(fn: Callable, world_size: int, *fn_args: Any) -> list:
    """Run ``fn(rank, world_size, *fn_args)`` on ``world_size`` gloo processes; their results.

    A rank's exception ends the spawn (``torch.multiprocessing.ProcessRaisedException``, with that
    rank's traceback), the other ranks terminated."""
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        mp.spawn(_worker, args=(world_size, init_file, fn, fn_args, tmp), nprocs=world_size, join=True)
        results = [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=False) for r in range(world_size)]
    return results
