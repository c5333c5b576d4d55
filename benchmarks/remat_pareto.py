"""Saved activations vs recomputation: fxmem's min-cut against PyTorch's partitioners.

GPT-2 blocks (d=768, 12 heads, B=2, T=128; hand-written attention and SDPA; 1, 4 and 12 layers).
For each stack: eager autograd, ``default_partition``, PyTorch's
``min_cut_rematerialization_partition`` at ``activation_memory_budget`` 1.0 … 0.0, and fxmem's
remat at a sweep (``remat=True`` and budgets, including the byte fractions PyTorch reached, to
test domination point by point). Per point: saved-activation bytes (distinct storages,
parameters and buffers excluded) from the analysis and — where the stack runs on real tensors —
from ``torch.autograd.graph.saved_tensors_hooks``; recompute FLOPs and bytes (forward nodes
that the backward graph computes again, priced by ``fxmem.analysis.cost``); partition time.

    PYTHONPATH=. python benchmarks/remat_pareto.py            # 1 and 4 layers measured, 12 traced with FakeTensors
    PYTHONPATH=. python benchmarks/remat_pareto.py --layers 1 --quick

Writes ``benchmarks/results/remat_pareto.json`` and ``remat_pareto.png``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import sys
import time

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from torch._functorch import config as functorch_config  # noqa: E402
from torch._functorch import partitioners as P  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402

from fxmem.analysis import measure_saved_bytes, node_bytes_moved, node_flops, saved_activation_bytes  # noqa: E402
from fxmem.analysis.sizes import PARAM_META_KEY, is_alias_op  # noqa: E402
from fxmem.models.gpt import Block, GPTConfig  # noqa: E402
from fxmem.passes import remat  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
TORCH_BUDGETS = (1.0, 0.75, 0.5, 0.3, 0.1, 0.0)
FXMEM_BUDGETS = (None, 1.0, 0.75, 0.5, 0.3, 0.1, 0.0)


def build(layers: int, attention: str, real: bool):
    """Real CPU tensors, or FakeTensors (CPU dispatch — the same ATen ops, e.g. CPU flash
    attention — without memory or compute) for stacks too large to run on 2 shared cores."""
    cfg = GPTConfig(d_model=768, n_head=12, block_size=128, n_layer=layers, attention=attention, vocab_size=64)
    torch.manual_seed(0)
    mode = contextlib.nullcontext() if real else FakeTensorMode()
    with mode:
        model = nn.Sequential(*[Block(cfg) for _ in range(layers)])
        x = torch.randn(2, 128, 768)
    return model, x


def recompute_of(joint: remat.Joint, bw: torch.fx.GraphModule) -> dict:
    """Forward nodes that ``bw`` computes again, priced on the joint graph's nodes."""
    info = P.classify_nodes(joint.graph_module, joint.static_lifetime_input_indices, joint.num_fwd_outputs)
    fw_nodes = {n.name: n for n in info.required_fw_nodes if n.op == "call_function"}
    flops = moved = count = 0
    for node in bw.graph.nodes:
        src = fw_nodes.get(node.name)
        if node.op != "call_function" or src is None:
            continue
        count += 1
        flops += node_flops(src)
        if not is_alias_op(src) and src.target.__name__ != "getitem":
            moved += node_bytes_moved(src)
    return {"recompute_flops": flops, "recompute_bytes_moved": moved, "recomputed_nodes": count}


def mark_params(fw: torch.fx.GraphModule, joint: remat.Joint) -> None:
    params = {n.name for n in joint.graph_module.graph.nodes if n.meta.get(PARAM_META_KEY)}
    for node in fw.graph.nodes:
        if node.op == "placeholder" and node.name in params:
            node.meta[PARAM_META_KEY] = True


class Partitioned(torch.autograd.Function):
    """Runs a forward/backward pair the way AOTAutograd does: save_for_backward(saved...)."""

    @staticmethod
    def forward(ctx, fw, bw, n_out, *primals):
        outs = fw(*primals)
        ctx.bw = bw
        ctx.save_for_backward(*outs[n_out:])
        return outs[0]

    @staticmethod
    def backward(ctx, grad):
        grads = ctx.bw(*ctx.saved_tensors, grad)
        return (None, None, None, *grads)


def measure(fw, bw, joint: remat.Joint, model, x) -> int:
    primals = [*dict(model.named_parameters(remove_duplicate=False)).values(),
               *dict(model.named_buffers(remove_duplicate=False)).values(), x]
    m = measure_saved_bytes(lambda: Partitioned.apply(fw, bw, joint.num_fwd_outputs, *primals),
                            [*model.parameters(), *model.buffers()])
    m.output.sum().backward()
    return m.bytes


def run_stack(layers: int, attention: str, real: bool, quick: bool) -> dict:
    device = "cpu" if real else "fake (cpu)"
    model, x = build(layers, attention, real)
    t = time.perf_counter()
    joint = remat.trace_joint(model, x)
    trace_s = time.perf_counter() - t
    kw = dict(num_fwd_outputs=joint.num_fwd_outputs, static_lifetime_input_indices=joint.static_lifetime_input_indices)
    points = []

    def add(kind, budget, fw, bw, seconds, extra=None):
        mark_params(fw, joint)
        row = {"partitioner": kind, "budget": budget, "saved_bytes": saved_activation_bytes(fw, joint.num_fwd_outputs),
               "partition_s": seconds, **recompute_of(joint, bw), **(extra or {})}
        if real:
            row["saved_bytes_hooks"] = measure(fw, bw, joint, model, x)
        points.append(row)
        print(f"  {kind:10s} budget={budget if budget is None else round(budget, 4)!s:6s} saved={row['saved_bytes'] / 1e6:7.2f} MB "
              f"hooks={row.get('saved_bytes_hooks', float('nan')) / 1e6:7.2f} MB "
              f"recompute={row['recompute_flops'] / 1e9:6.3f} GFLOP {row['recompute_bytes_moved'] / 1e6:7.1f} MB moved "
              f"t={seconds:6.2f}s", flush=True)
        return row

    if real:
        m = measure_saved_bytes(lambda: model(x), [*model.parameters(), *model.buffers()])
        m.output.sum().backward()
        points.append({"partitioner": "eager", "budget": None, "saved_bytes_hooks": m.bytes, "recompute_flops": 0,
                       "recompute_bytes_moved": 0})
        print(f"  eager autograd              hooks={m.bytes / 1e6:7.2f} MB", flush=True)
    t = time.perf_counter()
    fw, bw = P.default_partition(copy.deepcopy(joint.graph_module), joint.inputs, **kw)
    add("default", None, fw, bw, time.perf_counter() - t)
    torch_ratios = []
    eager_bytes = points[-1]["saved_bytes"]
    for b in TORCH_BUDGETS if not quick else (1.0, 0.5):
        g = copy.deepcopy(joint.graph_module)
        with functorch_config.patch(activation_memory_budget=b):
            t = time.perf_counter()
            fw, bw = P.min_cut_rematerialization_partition(g, joint.inputs, **kw)
            seconds = time.perf_counter() - t
        row = add("torch", b, fw, bw, seconds)
        torch_ratios.append(row["saved_bytes"] / eager_bytes)
    sweep = list(FXMEM_BUDGETS if not quick else (None, 0.5, 0.0))
    # PyTorch's reached byte fractions, nudged up by one part in 10^9 so that float rounding of
    # fraction × eager bytes cannot put PyTorch's own point a byte over the target
    sweep += sorted({min(1.0, r * (1 + 1e-9)) for r in torch_ratios if r < 1.0}, reverse=True)
    for b in sweep:
        t = time.perf_counter()
        r = remat.rematerialize(copy.deepcopy(joint.graph_module), remat.RematConfig(budget=b), **kw)
        seconds = time.perf_counter() - t
        add("fxmem", b, r.forward, r.backward, seconds,
            {"solve_s": r.stats["solve_s"], "budget_met": r.stats["budget_met"], "min_cut_solves": r.stats["min_cut_solves"]})
    return {"layers": layers, "attention": attention, "device": device, "trace_s": trace_s,
            "joint_nodes": len(joint.graph_module.graph.nodes), "points": points, "targets": targets(points)}


def targets(points: list[dict]) -> dict:
    torch_pts = [p for p in points if p["partitioner"] == "torch"]
    fx = [p for p in points if p["partitioner"] == "fxmem"]
    default_mc = next((p for p in torch_pts if p["budget"] == 1.0), None)
    free = next(p for p in fx if p["budget"] is None)
    dominated, strictly = [], False
    for p in torch_pts:
        better = [f for f in fx if f["saved_bytes"] <= p["saved_bytes"] and f["recompute_flops"] <= p["recompute_flops"]]
        dominated.append(bool(better))
        if any(f["saved_bytes"] < p["saved_bytes"] or f["recompute_flops"] < p["recompute_flops"] for f in better):
            strictly = True
    torch_s = max((p["partition_s"] for p in torch_pts), default=0.0)
    return {
        "free_vs_torch_default_bytes": free["saved_bytes"] / default_mc["saved_bytes"] if default_mc else None,
        "free_recompute_flops": free["recompute_flops"],
        "free_ok": bool(default_mc) and free["saved_bytes"] <= 0.67 * default_mc["saved_bytes"] and free["recompute_flops"] == 0,
        "every_torch_point_dominated": all(dominated),
        "strictly_better_somewhere": strictly,
        "fxmem_free_partition_s": free["partition_s"],
        "torch_default_partition_s": default_mc["partition_s"] if default_mc else None,
        "fxmem_max_partition_s": max(f["partition_s"] for f in fx),
        "torch_max_partition_s": torch_s,
    }


def plot(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    attentions = sorted({r["attention"] for r in results})
    layers = sorted({r["layers"] for r in results})
    fig, axes = plt.subplots(len(attentions), len(layers), figsize=(4.4 * len(layers), 3.6 * len(attentions)), squeeze=False)
    for res in results:
        ax = axes[attentions.index(res["attention"])][layers.index(res["layers"])]
        for kind, style in (("torch", "o-"), ("fxmem", "s-")):
            pts = sorted((p for p in res["points"] if p["partitioner"] == kind), key=lambda p: p["recompute_flops"])
            ax.plot([p["recompute_flops"] / 1e9 for p in pts], [p["saved_bytes"] / 1e6 for p in pts], style,
                    label="PyTorch min-cut (budgets)" if kind == "torch" else "fxmem remat (sweep)", alpha=0.8)
        d = next(p for p in res["points"] if p["partitioner"] == "default")
        ax.axhline(d["saved_bytes"] / 1e6, color="gray", ls="--", label="default_partition")
        ax.set_title(f"{res['layers']} layer(s), {res['attention']}")
        ax.set_xlabel("recompute GFLOP")
        ax.set_ylabel("saved activations (MB)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, nargs="*", default=[1, 4, 12])
    parser.add_argument("--attention", nargs="*", default=["manual", "sdpa"])
    parser.add_argument("--measure-up-to", type=int, default=4,
                        help="stacks up to this many layers run on real tensors (hooks); deeper ones use FakeTensors")
    parser.add_argument("--quick", action="store_true", help="fewer budgets")
    parser.add_argument("--out", default=os.path.join(RESULTS, "remat_pareto.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = []
    for layers in args.layers:
        for attention in args.attention:
            print(f"{layers} layer(s), {attention} attention", flush=True)
            results.append(run_stack(layers, attention, real=layers <= args.measure_up_to, quick=args.quick))
            print("  targets:", json.dumps(results[-1]["targets"]), flush=True)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    meta = {"command": " ".join(["python", "benchmarks/remat_pareto.py", *sys.argv[1:]]), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "note": "CPU; bytes from the analysis and (real stacks) saved_tensors_hooks"}
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1, default=str)
    plot(results, args.out.replace(".json", ".png"))
    print("wrote", args.out)


if __name__ == "__main__":
    main()
