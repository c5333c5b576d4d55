"""Question: is fxmem's training step as fast as torch.compile's, and its compile as short?

The training-peak benchmark (``train_peak.py``) runs its variants one after another, a few steps
each; on a shared CPU the load moves between variants and its step-time ratios are noise. Here the
variants are compiled in one process and then **interleaved** (``fit.interleaved_times``): each
round times one step of every variant, in a new random order each round, so a change of load falls on all of them
alike. Reported per variant: the median step and the fastest step, and against torch.compile the
median of the per-round ratios (the figure to quote) and the ratio of the fastest steps. Compile
time is the first step of each variant with cold caches, in the same process (the first variant
also pays for the imports: a warm-up compile of a small function runs first).

    PYTHONPATH=. python benchmarks/step_time.py                          # all cases, 15 rounds
    PYTHONPATH=. python benchmarks/step_time.py --cases blocks_manual --rounds 30
    PYTHONPATH=. python benchmarks/step_time.py --device cuda --out $OUT/step_time.json

Cases and variants are train_peak's (same models, batches, losses). Each case runs in its own
process. Step times from a CPU are ratios only; absolute times mean something on a GPU.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fit import interleaved_times  # noqa: E402
from train_peak import CASES, RESULTS, VARIANTS, cold_caches, compile_variant, device_name  # noqa: E402

DEFAULT_VARIANTS = ("torch.compile", "fxmem")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _warm_up(device: torch.device) -> None:
    """One small Inductor compile, so the first variant's compile time does not include imports."""
    fn = torch.compile(lambda x: (x.sin() * 2).sum())
    fn(torch.randn(8, device=device, requires_grad=True)).backward()
    torch._dynamo.reset()


def run_case(name: str, quick: bool, device: torch.device, labels: list[str], rounds: int) -> dict:
    torch.manual_seed(0)
    base, args, kwargs, loss_of, desc = CASES[name](quick)
    args = tuple(a.to(device) for a in args)
    kwargs = {k: v.to(device) for k, v in kwargs.items()}
    variants = [v for v in VARIANTS if v[0] in labels]
    _warm_up(device)
    steps, compile_s = {}, {}
    for label, backend, budget in variants:
        model = copy.deepcopy(base).to(device).train()
        params = [p for p in model.parameters() if p.requires_grad]
        fn, _ = compile_variant(model, backend, budget)
        torch_budget = budget if backend == "inductor" else 1.0

        def step(fn=fn, params=params, torch_budget=torch_budget) -> None:
            for p in params:
                p.grad = None
            # torch's partitioner reads the budget when it partitions; set it for every call so a
            # recompilation (there should be none) would see the same budget
            with torch._functorch.config.patch(activation_memory_budget=torch_budget):
                loss_of(fn(*args, **kwargs)).backward()

        _sync(device)
        start = time.perf_counter()
        step()
        _sync(device)
        compile_s[label] = time.perf_counter() - start
        step()  # a second call before timing: no recompilation may hide in a timed step
        steps[label] = step
        print(f"  {name}: compiled {label} in {compile_s[label]:.1f} s", flush=True)
    measured = interleaved_times(steps, rounds=rounds, device=device)
    times = {label: m["step_s_each"] for label, m in measured.items()}
    order = list(steps)
    rows = []
    ref = times.get("torch.compile")
    for label in order:
        t = times[label]
        row: dict[str, Any] = {"variant": label, "compile_s": compile_s[label], "step_median_s": statistics.median(t),
                               "step_min_s": min(t), "step_s": t}
        if ref is not None:
            row["step_vs_torch_compile_median_of_rounds"] = statistics.median(a / b for a, b in zip(t, ref))
            row["step_vs_torch_compile_min"] = min(t) / min(ref)
            row["compile_vs_torch_compile"] = compile_s[label] / compile_s["torch.compile"]
        rows.append(row)
        print(f"  {name:14s} {label:26s} step median {row['step_median_s'] * 1e3:8.1f} ms  min {row['step_min_s'] * 1e3:8.1f} ms"
              + (f"  × tc (median of rounds) {row['step_vs_torch_compile_median_of_rounds']:.3f}"
                 f"  × tc (min) {row['step_vs_torch_compile_min']:.3f}  compile × tc {row['compile_vs_torch_compile']:.2f}"
                 if ref is not None else ""), flush=True)
    return {"case": name, "description": desc, "rounds": rounds, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="small shapes")
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    parser.add_argument("--variants", nargs="*", default=list(DEFAULT_VARIANTS), help="labels from train_peak.VARIANTS")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 15 on the CPU, 50 on CUDA)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--case-json", default=None, help=argparse.SUPPRESS)  # internal: one case, in a child
    opts = parser.parse_args()
    device = torch.device(opts.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("step_time: --device cuda asked for, but CUDA is not available; nothing measured")
        return
    unknown = sorted(set(opts.variants) - {v[0] for v in VARIANTS})
    if unknown:
        parser.error(f"unknown variants {unknown}; accepted: {[v[0] for v in VARIANTS]}")
    rounds = opts.rounds or (50 if device.type == "cuda" else 15)
    if opts.case_json:
        cold_caches()
        case = run_case(opts.cases[0], opts.quick, device, opts.variants, rounds)
        with open(opts.case_json, "w") as f:
            json.dump(case, f)
        return
    out = opts.out or os.path.join(RESULTS, f"step_time{'_quick' if opts.quick else ''}.json")
    results: dict[str, Any] = {"question": __doc__.split("\n")[0], "device": device_name(device),
                               "torch": torch.__version__, "quick": opts.quick, "rounds": rounds,
                               "load_average_before": os.getloadavg(), "cases": []}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    for name in opts.cases:
        with tempfile.TemporaryDirectory() as tmp:
            case_json = os.path.join(tmp, "case.json")
            cmd = [sys.executable, os.path.abspath(__file__), "--device", opts.device, "--cases", name,
                   "--rounds", str(rounds), "--case-json", case_json, "--variants", *opts.variants]
            if opts.quick:
                cmd.append("--quick")
            print(f"{name}:", flush=True)
            proc = subprocess.run(cmd, check=False)
            if proc.returncode == 0 and os.path.exists(case_json):
                with open(case_json) as f:
                    results["cases"].append(json.load(f))
            else:
                results["cases"].append({"case": name, "rows": [], "error": f"exited with {proc.returncode}"})
        results["load_average_after"] = os.getloadavg()
        with open(out, "w") as f:
            json.dump(results, f, indent=2)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
