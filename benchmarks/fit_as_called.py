"""Question: does ``fxmem.fit`` estimate an HF model as called — logits beside the loss, KV cache on — for both loops users write?

fit's other benchmarks (``fit.py``, ``fit_samples.py``) wrap each model in a module that returns
the loss alone. Users do not: they call ``model(**batch)`` with ``labels=``, get the logits back
beside the loss, and leave ``use_cache`` at the config's default (on). Then either they hold the
output through the backward (``out = model(**batch); out.loss.backward()``) or keep only the loss
(``loss = model(**batch).loss``, HF's ``Trainer``).

Per architecture of :mod:`fxmem.testing.hf_zoo` (``"small"``: 2 layers, d 128, vocab 8192,
B 4 × T 128; logits 16 MiB in fp32), in its own process:

1. ``fxmem.fit(model, kwargs=batch, memory="1GiB", budgets=(0.5,))`` twice: ``hold_outputs``
   True and False;
2. per loop, every candidate without an error compiled with ``backend="fxmem"`` and measured by
   ``fit.measure_options(hold_outputs=...)`` (the whole step: parameters, batch, the allocator's
   peak above them);
3. estimate ÷ measured per candidate, and how far the held estimate is from the dropped
   measurement (what a Trainer user got before ``hold_outputs``).

    PYTHONPATH=. python benchmarks/fit_as_called.py                    # ~10 min on 2 cores
    PYTHONPATH=. python benchmarks/fit_as_called.py --archs qwen2

Writes ``results/fit_as_called_cpu.json`` after every architecture.
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

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
ARCHS = ("qwen2", "opt", "gemma2")


def child(name: str) -> dict:
    import fxmem
    from fxmem.fit import measure_options
    from fxmem.testing.hf_zoo import build

    case = build(name, "small")
    use_cache = bool(getattr(case.model.config, "use_cache", False))
    fits = {hold: fxmem.fit(case.model, kwargs=case.inputs, memory="1GiB", budgets=(0.5,), hold_outputs=hold)
            for hold in (True, False)}
    rows = []
    for cand in fits[True].candidates:
        if cand.error:
            rows.append({"label": cand.label, "error": cand.error})
            continue
        row = {"label": cand.label, "options": cand.options}
        for hold in (True, False):
            estimate = next(c for c in fits[hold].candidates if c.label == cand.label).estimate
            torch._dynamo.reset()
            measured = measure_options(case.model, kwargs=case.inputs, options=cand.options, steps=1,
                                       hold_outputs=hold)["peak_bytes"]
            key = "held" if hold else "dropped"
            row[key] = {"estimate": estimate, "measured": measured, "estimate_vs_measured": estimate / measured}
        # a Trainer user's step estimated as if the output were held (fit before hold_outputs)
        row["held_estimate_vs_dropped_measured"] = row["held"]["estimate"] / row["dropped"]["measured"]
        rows.append(row)
    return {"arch": name, "use_cache": use_cache, "inputs": {k: list(v.shape) for k, v in case.inputs.items()},
            "chosen": {"held": fits[True].chosen.label, "dropped": fits[False].chosen.label}, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", nargs="+", default=list(ARCHS))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=os.path.join(RESULTS, "fit_as_called_cpu.json"))
    opts = parser.parse_args()
    if opts.child:
        _child.report(child(opts.child))
        return
    threads = os.environ.get("OMP_NUM_THREADS", "1")
    results = {"question": __doc__.splitlines()[0], "device": f"cpu: {platform.machine()}, {threads} threads",
               "torch": torch.__version__, "archs": []}

    def describe(entry: dict) -> None:
        name = entry["arch"]
        for r in entry["rows"]:
            if "error" in r:
                print(f"{name:8s} {r['label']:24s} error: {r['error'][:80]}", flush=True)
                continue
            print(f"{name:8s} {r['label']:24s} held est/meas {r['held']['estimate_vs_measured']:.3f}  "
                  f"dropped est/meas {r['dropped']['estimate_vs_measured']:.3f}  "
                  f"held est / dropped meas {r['held_estimate_vs_dropped_measured']:.3f}  "
                  f"(meas held {r['held']['measured'] / 2**20:.1f} MiB, dropped {r['dropped']['measured'] / 2**20:.1f})",
                  flush=True)

    _child.run_each(__file__, opts.archs, [], results, opts.out, describe, threads, "fxmem-fit-")


if __name__ == "__main__":
    main()
