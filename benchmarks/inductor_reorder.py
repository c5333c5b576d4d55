"""Question: does Inductor's reordering for peak memory help or hurt fxmem's training graphs?

fxmem turns Inductor's ``reorder_for_peak_memory`` off for its training compiles
(``fxmem.codegen.INDUCTOR_PEAK_REORDER``; docs/architecture.md, "Inductor as the code generator").
This measures the choice, side by side in one process: on the sample models at 16 rows
(``tests/test_backend_codegen.py``'s shape, where the activations make the peak), the measured peak
of one training step (CPU allocator events / ``max_memory_allocated``) for torch.compile and for
fxmem at remat budgets default / 0.5 / 0.0 with the pass on and off, and fxmem's own estimate of
the order it hands Inductor.

    PYTHONPATH=. python benchmarks/inductor_reorder.py          # ~3 min on 2 CPU cores
    PYTHONPATH=. python benchmarks/inductor_reorder.py --device cuda --out $OUT/inductor_reorder.json

The issue-11 cases at full size: ``benchmarks/train_peak.py`` with and without ``--inductor-reorder``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fxmem  # noqa: E402
import fxmem.codegen  # noqa: E402
from fxmem.measure import training_step_peak  # noqa: E402
from fxmem.testing import recording_backend, sample  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
SAMPLES = ("gpt_block_manual", "gpt_block_sdpa", "mlp")
BUDGETS = (None, 0.5, 0.0)


def measure(name: str, batch: int, device: torch.device, backend, reorder: bool | None) -> dict:
    """One compile of sample ``name`` with ``batch`` rows; ``reorder``: fxmem's switch (None: torch.compile)."""
    torch._dynamo.reset()
    s = sample(name)
    x = torch.randn(batch, *s.args[0].shape[1:], generator=torch.Generator().manual_seed(0)).to(device)
    model = copy.deepcopy(s.model).to(device).train()
    saved_switch = fxmem.codegen.INDUCTOR_PEAK_REORDER
    if reorder is not None:
        fxmem.codegen.INDUCTOR_PEAK_REORDER = reorder
    try:
        fn = torch.compile(model, backend=backend)

        def step() -> None:
            for p in model.parameters():
                p.grad = None
            fn(x).float().pow(2).mean().backward()

        step()  # the backward is compiled here, with the switch as set
    finally:
        fxmem.codegen.INDUCTOR_PEAK_REORDER = saved_switch
    row = {"peak_bytes": training_step_peak(step, device=device).peak_bytes}
    if not isinstance(backend, str) and backend.recorder.timelines:
        timeline = backend.recorder.timelines[-1]
        row["estimate_bytes"] = timeline.peak_bytes - timeline.input_bytes
        row["estimate_vs_measured"] = row["estimate_bytes"] / row["peak_bytes"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--samples", nargs="*", default=list(SAMPLES), choices=list(SAMPLES))
    parser.add_argument("--out", default=os.path.join(HERE, "results", "inductor_reorder_cpu.json"))
    opts = parser.parse_args()
    device = torch.device(opts.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("inductor_reorder: --device cuda asked for, but CUDA is not available; nothing measured")
        return
    results = {"question": __doc__.split("\n")[0], "torch": torch.__version__, "device": str(device),
               "batch": opts.batch, "command": "python benchmarks/inductor_reorder.py " + " ".join(sys.argv[1:]),
               "rows": []}
    for name in opts.samples:
        tc = measure(name, opts.batch, device, "inductor", None)
        results["rows"].append({"sample": name, "variant": "torch.compile", **tc})
        print(f"{name:18s} torch.compile            {tc['peak_bytes']:>10d} B", flush=True)
        for budget in BUDGETS:
            for reorder in (True, False):
                backend = recording_backend(**({} if budget is None else {"remat": {"budget": budget}}))
                row = measure(name, opts.batch, device, backend, reorder)
                label = f"fxmem {'default' if budget is None else budget}, reorder {'on' if reorder else 'off'}"
                results["rows"].append({"sample": name, "variant": label, "budget": budget, "inductor_reorder": reorder,
                                        **row, "peak_vs_torch_compile": row["peak_bytes"] / tc["peak_bytes"]})
                print(f"{name:18s} {label:24s} {row['peak_bytes']:>10d} B  estimate × {row.get('estimate_vs_measured', 0):.3f}",
                      flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(opts.out)), exist_ok=True)
    with open(opts.out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {opts.out}")


if __name__ == "__main__":
    main()
