"""fxmem.fit's estimate against the measured peak on every sample model (issue 15's test list:
"estimates within 10% of measured peaks on the sample models").

Each of :data:`fxmem.testing.samples.SAMPLES` is fitted with a limit nothing reaches (the default
options are chosen) and measured with those options: inference — the weights the options leave,
the batch and a compiled no-grad forward's peak (:func:`fxmem.fit.measure_inference`); training —
the model with its loss inside (:meth:`Sample.training_module`), one step's whole peak
(:func:`fxmem.fit.measure_options`). Peaks are the CPU allocator's events: exact, not timings.
Writes ``benchmarks/results/fit_samples_cpu.json``.

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/fit_samples.py [--modes inference,training] [--samples conv_norm,...]
"""
from __future__ import annotations

import argparse
import json
import pathlib
import platform
import time

import torch

import fxmem
from fxmem.fit import measure_inference, measure_options
from fxmem.testing.samples import SAMPLES


def one(name: str, mode: str) -> dict:
    sample = SAMPLES[name]()
    model = sample.model.eval() if mode == "inference" else sample.training_module()
    start = time.perf_counter()
    fitted = fxmem.fit(model, *sample.args, kwargs=sample.kwargs, memory="64GiB", mode=mode, budgets=())
    fit_s = time.perf_counter() - start
    torch._dynamo.reset()
    if mode == "inference":
        measured = measure_inference(model, *sample.args, kwargs=sample.kwargs, options=fitted.options, steps=1)
    else:
        measured = measure_options(model, *sample.args, kwargs=sample.kwargs, options=fitted.options, steps=1)
    torch._dynamo.reset()
    return {"sample": name, "mode": mode, "options": fitted.options, "estimate": fitted.estimate,
            "measured": int(measured["peak_bytes"]), "ratio": round(fitted.estimate / measured["peak_bytes"], 4),
            "parts": dict(fitted.chosen.parts), "fit_s": round(fit_s, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--modes", default="inference,training")
    ap.add_argument("--samples", default=",".join(SAMPLES))
    ap.add_argument("--out", default="benchmarks/results/fit_samples_cpu.json")
    a = ap.parse_args()
    rows = []
    for mode in a.modes.split(","):
        for name in a.samples.split(","):
            row = one(name, mode)
            rows.append(row)
            print(f"{name:18} {mode:9} estimate {row['estimate']:8} B  measured {row['measured']:8} B  "
                  f"estimate/measured {row['ratio']:.3f}", flush=True)
    ratios = [r["ratio"] for r in rows]
    print(f"all {len(rows)} within {min(ratios):.3f}–{max(ratios):.3f}")
    out = pathlib.Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"torch": torch.__version__, "machine": platform.machine(),
                               "threads": torch.get_num_threads(), "measured_at": time.strftime("%Y-%m-%d %H:%M"),
                               "rows": rows}, indent=1))
    print("wrote", out)


if __name__ == "__main__":
    main()
