"""Tensor parallelism for the built-in GPT, planned by fxmem and carried out by torch.distributed.

    torchrun --nproc-per-node 2 examples/tp_gpt.py            # CPU, gloo
    torchrun --nproc-per-node 8 examples/tp_gpt.py --cuda     # GPUs, NCCL (same code)

Every rank builds the same model (same seed), plans on its own (planning needs no process
group), applies the plan to a 1-D device mesh, checks one training step against the
single-process model, and then runs it compiled with ``backend="fxmem"``.
"""

import argparse
import copy
import os

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

import fxmem
from fxmem.models.gpt import GPT, GPTConfig, example_batch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cuda", action="store_true", help="NCCL on GPUs instead of gloo on CPU")
    parser.add_argument("--no-compile", action="store_true")
    opts = parser.parse_args()
    device = "cuda" if opts.cuda else "cpu"
    dist.init_process_group("nccl" if opts.cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if opts.cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=256, block_size=32, n_layer=2, n_head=4, n_kv_head=2 if world <= 2 else 4,
                    d_model=64, attention="sdpa")
    model = GPT(cfg).to(device)
    idx = example_batch(cfg, batch=2, seq=32).to(device)

    plan = fxmem.shard.plan(copy.deepcopy(model).cpu(), idx.cpu(), world_size=world)
    if rank == 0:
        print(plan)

    reference = copy.deepcopy(model)
    ref_out = reference(idx)
    ref_out.float().pow(2).mean().backward()

    mesh = init_device_mesh(device, (world,))
    sharded = fxmem.shard.apply(model, plan, mesh)
    out = sharded(idx)
    out.float().pow(2).mean().backward()
    err = (out - ref_out).abs().max().item()
    grad_err = max((p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).sub(q.grad).abs().max().item()
                   for p, q in zip(sharded.parameters(), reference.parameters()))
    if rank == 0:
        print(f"max |out - single process| = {err:.2e}, max |grad - single process| = {grad_err:.2e}")
    if not opts.no_compile:
        compiled = torch.compile(sharded, backend="fxmem")
        with torch.no_grad():
            err_c = (compiled(idx) - ref_out).abs().max().item()
        if rank == 0:
            print(f"compiled with backend='fxmem': max |out - single process| = {err_c:.2e}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
