"""FSDP2 around tensor parallelism for the built-in GPT, planned by fxmem, on a 2-D device mesh.

    torchrun --nproc-per-node 4 examples/scale_gpt.py                 # CPU, gloo: dp=2 x tp=2
    torchrun --nproc-per-node 8 examples/scale_gpt.py --cuda --tp 4   # GPUs, NCCL (same code)
    torchrun --nproc-per-node 2 examples/scale_gpt.py --pipeline      # two pipeline stages, 1F1B

Every rank builds the same model (same seed) and plans on its own (planning needs no process
group). The mesh run applies the plan (``parallelize_module`` on ``tp``, ``fully_shard`` on ``dp``),
takes AdamW steps on this dp rank's slice of the batch, checks the first one against one process
on the global batch, and then runs compiled with ``backend="fxmem"`` (``--no-compile`` skips it).
The pipeline run splits the model into stages by memory and runs ``Schedule1F1B``.
"""

import argparse
import copy
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh

import fxmem
from fxmem.models.gpt import GPT, GPTConfig, example_batch


def loss_fn(logits, target):
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), target.reshape(-1))


def run_mesh(opts, device, rank, world):
    tp = opts.tp
    dp = world // tp
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=256, block_size=32, n_layer=2, n_head=4, d_model=64, attention="sdpa")
    model = GPT(cfg).to(device)
    x = example_batch(cfg, batch=2 * dp, seq=32).to(device)
    y = example_batch(cfg, batch=2 * dp, seq=32, seed=1).to(device)

    reference = copy.deepcopy(model)                      # one process, global batch
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-3)
    loss_fn(reference(x), y).backward()
    ref_opt.step()

    mesh = init_device_mesh(device, (dp, tp), mesh_dim_names=("dp", "tp"))
    d = mesh["dp"].get_local_rank()
    xs, ys = x[2 * d:2 * d + 2], y[2 * d:2 * d + 2]
    # torch.compile cannot yet trace PyTorch's vocabulary-parallel embedding (docs/shard.md,
    # "Compile"): when compiling, keep embeddings and head whole over tp (FSDP2 still shards them)
    plan = fxmem.shard.plan(copy.deepcopy(model).cpu(), xs.cpu(), mesh={"dp": dp, "tp": tp},
                            precision="bf16" if opts.bf16 else None, vocab="auto" if opts.no_compile else False)
    if rank == 0:
        print(plan)
    sharded = fxmem.shard.apply(model, plan, mesh)
    opt = torch.optim.AdamW(sharded.parameters(), lr=1e-3)   # built after apply: the sharded parameters
    step = torch.compile(sharded, backend="fxmem") if not opts.no_compile else sharded
    for i in range(opts.steps):
        loss = loss_fn(sharded(xs) if i == 0 else step(xs), ys)   # the first step eager, to compare
        loss.backward()
        opt.step()
        opt.zero_grad()
        if i == 0:
            err = max((p.full_tensor() - q).abs().max().item() for p, q in zip(sharded.parameters(), reference.parameters()))
            if rank == 0:
                print(f"after one AdamW step: max |param - one process| = {err:.2e}")
        if rank == 0:
            print(f"step {i}: loss on this dp rank {loss.item():.4f}")


def run_pipeline(opts, device, rank, world):
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=256, block_size=32, n_layer=4, n_head=4, d_model=64, attention="sdpa", tie_embeddings=False)
    model = GPT(cfg)
    x = example_batch(cfg, batch=4, seq=32)
    y = example_batch(cfg, batch=4, seq=32, seed=1)
    # the loss runs on the last stage: giving it (and the target) counts its saved tensors there
    plan = fxmem.shard.pipeline(model, x, stages=world, schedule="1f1b", microbatches=2, loss_fn=loss_fn, target=y)
    if rank == 0:
        print(plan)
    _, stage, schedule = plan.build(model.to(device), rank, device)   # the plan's loss_fn
    losses = []
    if rank == 0:
        schedule.step(x.to(device))
    elif rank == world - 1:
        schedule.step(target=y.to(device), losses=losses)
        print(f"pipeline loss (mean over microbatches): {torch.stack(losses).mean().item():.4f}")
    else:
        schedule.step()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cuda", action="store_true", help="NCCL on GPUs instead of gloo on CPU")
    parser.add_argument("--tp", type=int, default=2, help="tensor-parallel ranks (the rest is dp)")
    parser.add_argument("--bf16", action="store_true", help="FSDP2 MixedPrecisionPolicy(param_dtype=bf16)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--pipeline", action="store_true", help="pipeline stages instead of the dp x tp mesh")
    opts = parser.parse_args()
    device = "cuda" if opts.cuda else "cpu"
    dist.init_process_group("nccl" if opts.cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if opts.cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    if opts.pipeline:
        run_pipeline(opts, device, rank, world)
    else:
        if world % opts.tp:
            raise SystemExit(f"--tp {opts.tp} does not divide the {world} processes")
        run_mesh(opts, device, rank, world)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
