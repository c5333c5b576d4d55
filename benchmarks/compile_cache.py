"""Question: how long does a user wait for the first training step when they run the same script again?

torch.compile keeps what it compiled on disk (Inductor's FX-graph cache and AOTAutograd's cache,
both on by default), so a second run of the same script mostly loads its code. fxmem's compile
used to bypass both caches and was cold on every run. Now Inductor's FX-graph cache serves fxmem's
forward and backward graphs, and ``backend="fxmem"`` is served by AOTAutograd's cache too (keyed
by fxmem's options and sources): a warm run then skips the joint trace, the partition and
Inductor, as torch.compile's does. So is a backend object (``fxmem.backend(...)``, the form
docs/usage.md shows first); it used to keep AOTAutograd's cache off. A recording backend
(``fxmem.testing.recording_backend``: explain's, fit's and the benchmarks', which read what the
partition did) still partitions every time (docs/architecture.md): the fourth variant.

Side by side: for each case and for torch.compile and fxmem (defaults), one fresh cache directory
(``TORCHINDUCTOR_CACHE_DIR``), then three processes in a row on it: the first is cold, the next
two are warm. Each process times its first training step, which is compile plus one step, and
reports Inductor's cache counters. The cases are train_peak's at its quick shapes.

    PYTHONPATH=. python benchmarks/compile_cache.py        # ~30 min on 2 cores

Writes ``results/compile_cache_cpu.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _child  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
CASES = ("hf_llama", "hf_gpt2", "blocks_manual")
VARIANTS = (("torch.compile", "inductor"), ("fxmem", "fxmem"), ("fxmem.backend()", "fxmem-object"),
            ("recording_backend()", "fxmem-recording"))
RUNS = 3  # the first cold, the rest warm


def child(case: str, backend: str) -> dict:
    """One process: compile the case and time its first training step."""
    from torch._dynamo.utils import counters
    from train_peak import CASES as BUILDERS
    from train_peak import compile_variant

    base, args, kwargs, loss_of, desc = BUILDERS[case](True)
    model = base.train()
    if backend == "fxmem":
        fn = torch.compile(model, backend="fxmem")  # what a user writes
    elif backend == "fxmem-object":
        import fxmem

        fn = torch.compile(model, backend=fxmem.backend())  # or this
    else:
        fn, _ = compile_variant(model, "fxmem" if backend == "fxmem-recording" else backend, None)
    start = time.perf_counter()
    loss_of(fn(*args, **kwargs)).backward()
    first_step_s = time.perf_counter() - start
    return {"description": desc, "first_step_s": first_step_s,
            "inductor_counters": {k: v for k, v in counters["inductor"].items() if "cache" in k},
            "aot_autograd_counters": {k: v for k, v in counters["aot_autograd"].items() if "cache" in k}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs=2, metavar=("CASE", "BACKEND"), help=argparse.SUPPRESS)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    parser.add_argument("--out", default=os.path.join(RESULTS, "compile_cache_cpu.json"))
    opts = parser.parse_args()
    if opts.child:
        _child.report(child(*opts.child))
        return
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    results = {"question": __doc__.splitlines()[0], "device": f"cpu: {platform.machine()}, {env['OMP_NUM_THREADS']} threads",
               "torch": torch.__version__, "runs_per_variant": RUNS, "cases": []}
    for case in opts.cases:
        entry: dict = {"case": case, "variants": {}}
        for label, backend in VARIANTS:
            cache_dir = tempfile.mkdtemp(prefix=f"fxmem-compile-cache-{backend}-")
            runs = []
            for _ in range(RUNS):
                run, stderr = _child.run(__file__, ["--child", case, backend],
                                         dict(env, TORCHINDUCTOR_CACHE_DIR=cache_dir))
                if run is None:
                    raise RuntimeError(f"{case} / {label}: the child failed:\n{stderr[-3000:]}")
                runs.append(run)
            entry["description"] = runs[0].pop("description")
            for r in runs[1:]:
                r.pop("description")
            cold, warm = runs[0]["first_step_s"], min(r["first_step_s"] for r in runs[1:])
            entry["variants"][label] = {"cold_s": cold, "warm_s": warm, "warm_vs_cold": warm / cold, "runs": runs}
            print(f"{case:14s} {label:14s} cold {cold:6.1f} s  warm {warm:6.1f} s  "
                  f"{runs[-1]['inductor_counters']}", flush=True)
        tc = entry["variants"]["torch.compile"]
        entry["vs_torch_compile"] = {label: {"cold": entry["variants"][label]["cold_s"] / tc["cold_s"],
                                             "warm": entry["variants"][label]["warm_s"] / tc["warm_s"]}
                                     for label, _ in VARIANTS[1:]}
        results["cases"].append(entry)
        os.makedirs(os.path.dirname(opts.out), exist_ok=True)
        with open(opts.out, "w") as f:
            json.dump(results, f, indent=2)
    for entry in results["cases"]:
        for label, r in entry["vs_torch_compile"].items():
            print(f"{entry['case']:14s} {label} / torch.compile: cold {r['cold']:.2f}x, warm {r['warm']:.2f}x")


if __name__ == "__main__":
    main()
