"""Question: across HF architectures, does fxmem's training step peak below torch.compile's, with eager's gradients?

The sixteen architectures of :mod:`fxmem.testing.hf_zoo` at its ``"small"`` size (2 layers,
d 128, vocab 8192, B 4 × T 128; ViT 121 patches; T5 and BART a target half as long), loss inside.
Each architecture runs in its own process with a fresh Inductor cache directory. Side by side,
the same weights and batch:
- eager;
- torch.compile (Inductor, defaults);
- fxmem (defaults: Inductor as code generator).

Per row, from ``train_peak.run_variant``:
- the measured peak of one step (CPU allocator events), output dropped before the backward as
  HF's Trainer does;
- the step time (median of 3: indicative only on a shared CPU);
- the compile time (first step, cold, after a warm-up compile of a small layer);
- fxmem's estimate of that step (its timeline with the output dropped, ``outputs_dropped``);
- the gradients' relative error against eager.

Then the peak again with the output held through the backward (``out = model(...);
out.loss.backward()``), beside the estimate with the output held. That second compile is served
by the first one's cache.

    PYTHONPATH=. python benchmarks/hf_architectures.py                 # ~30 min on 2 cores
    PYTHONPATH=. python benchmarks/hf_architectures.py --archs opt t5

Writes ``results/hf_architectures_cpu.json`` after every architecture.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _child  # noqa: E402

from fxmem.testing.hf_zoo import ARCHITECTURES, SIZES, build  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
# (label, backend, budget): torch.compile at its default activation budget 1.0, fxmem at its default
VARIANTS = (("eager", "eager", None), ("torch.compile", "inductor", 1.0), ("fxmem", "fxmem", None))


def child(name: str, steps: int) -> dict:
    from train_peak import run_variant

    # a warm-up compile pays for the imports and Inductor's first-use set-up, which the first
    # compiled variant would otherwise carry alone
    warm = torch.nn.Linear(4, 4)
    torch.compile(warm)(torch.randn(2, 4)).sum().backward()
    torch._dynamo.reset()
    case = build(name, "small")
    device = torch.device("cpu")
    rows, reference = [], None
    for label, backend, budget in VARIANTS:
        row = run_variant(case.model, (), case.inputs, lambda out: out.loss, device, label, backend, budget, steps,
                          reference)
        if reference is None:
            reference = row.pop("_grads")
        if backend != "eager":
            held = run_variant(case.model, (), case.inputs, lambda out: out.loss, device, label, backend, budget, 1,
                               None, hold_outputs=True)
            row["peak_bytes_outputs_held"] = held["peak_bytes"]
            if "estimated_peak_bytes" in held:
                row["estimate_vs_measured_outputs_held"] = held["estimate_vs_measured"]
        rows.append(row)
    tc = next(r for r in rows if r["variant"] == "torch.compile")
    for r in rows:
        r["peak_vs_torch_compile"] = r["peak_bytes"] / tc["peak_bytes"]
        if "peak_bytes_outputs_held" in r:
            r["peak_vs_torch_compile_outputs_held"] = r["peak_bytes_outputs_held"] / tc["peak_bytes_outputs_held"]
        r["step_vs_torch_compile"] = r["step_s"] / tc["step_s"]
    return {"arch": name, "parameters": sum(p.numel() for p in case.model.parameters()),
            "inputs": {k: list(v.shape) for k, v in case.inputs.items()}, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", nargs="+", default=list(ARCHITECTURES), choices=list(ARCHITECTURES))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=os.path.join(RESULTS, "hf_architectures_cpu.json"))
    opts = parser.parse_args()
    if opts.child:
        _child.report(child(opts.child, opts.steps))
        return
    threads = os.environ.get("OMP_NUM_THREADS", "1")
    results = {"question": __doc__.splitlines()[0], "device": f"cpu: {platform.machine()}, {threads} threads",
               "torch": torch.__version__, "size": SIZES["small"], "archs": []}
    def describe(entry: dict) -> None:
        name = entry["arch"]
        fx = next(r for r in entry["rows"] if r["variant"] == "fxmem")
        tc = next(r for r in entry["rows"] if r["variant"] == "torch.compile")
        print(f"{name:11s} peak MiB tc {tc['peak_mib']:7.1f} fxmem {fx['peak_mib']:7.1f} "
              f"({fx['peak_vs_torch_compile']:.2f}x; held {fx['peak_vs_torch_compile_outputs_held']:.2f}x)  "
              f"step {fx['step_vs_torch_compile']:.2f}x  compile {fx['compile_s'] / tc['compile_s']:.2f}x  "
              f"grad err {fx.get('grad_rel_err', float('nan')):.1e}  est/meas {fx.get('estimate_vs_measured', 0):.2f} "
              f"(held {fx.get('estimate_vs_measured_outputs_held', 0):.2f})",
              flush=True)

    _child.run_each(__file__, opts.archs, ["--steps", str(opts.steps)], results, opts.out, describe, threads,
                    "fxmem-zoo-")


if __name__ == "__main__":
    main()
