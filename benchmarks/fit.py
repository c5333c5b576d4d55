"""Does ``fxmem.fit`` choose options that fit, and are they the fastest that fit?

Two training steps (the loss inside the model, the module returns the loss only, as a training
step does): the built-in GPT and HF Llama (2 layers, GQA, vocab 32k, as in
``benchmarks/train_peak.py``). Per case, in one process:

1. plain ``torch.compile``: measured peak and step time (the anchor);
2. ``fxmem.fit`` once: every candidate's estimated peak and time cost;
3. every candidate compiled with ``backend="fxmem"`` and measured (peak of a whole step:
   parameters, batch, and the peak above them from :func:`fxmem.measure.peak_memory`);
4. limits from 0.3× to 1.0× of torch.compile's measured peak: fit's choice for each
   (``FitResult.refit``, the same candidates), its measured peak against the limit, and its
   measured step time against the fastest candidate whose *measured* peak fits the limit.

    PYTHONPATH=. python benchmarks/fit.py --quick                 # CPU, small shapes
    PYTHONPATH=. python benchmarks/fit.py --device cuda --out $OUT/fit.json
    PYTHONPATH=. python benchmarks/fit.py --quick --reuse-measured old.json   # new estimates, old measurements

Writes JSON after every case and a PNG beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from typing import Any

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fxmem  # noqa: E402
from fxmem.fit import FitError, measure_options  # noqa: E402
from fxmem.models.gpt import GPT, GPTConfig, example_batch  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
LIMITS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


class GPTLoss(nn.Module):
    """The built-in GPT's training step: the loss only (the logits are then no output)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, idx, targets):
        return self.model(idx, targets)[1]


class HFLoss(nn.Module):
    """An HF causal LM's training step: ``model(input_ids=..., labels=...).loss``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, labels):
        return self.model(input_ids=input_ids, labels=labels).loss


def make_case(name: str, quick: bool) -> tuple[nn.Module, tuple, str]:
    torch.manual_seed(0)
    if name == "gpt":
        d, layers, seq, batch, vocab = (128, 2, 128, 4, 4096) if quick else (512, 4, 512, 8, 32000)
        cfg = GPTConfig(n_layer=layers, d_model=d, n_head=8 if d >= 512 else 4, block_size=seq, vocab_size=vocab)
        args = (example_batch(cfg, batch=batch), example_batch(cfg, batch=batch, seed=1))
        return GPTLoss(GPT(cfg)), args, f"built-in GPT, {layers} layers, d {d}, vocab {vocab}, B {batch} x T {seq}"
    import transformers

    d, seq, batch = (128, 128, 2) if quick else (256, 512, 4)
    cfg = transformers.LlamaConfig(hidden_size=d, intermediate_size=4 * d, num_hidden_layers=2, num_attention_heads=8,
                                   num_key_value_heads=2, vocab_size=32000, max_position_embeddings=seq)
    model = transformers.LlamaForCausalLM(cfg)
    model.config.use_cache = False
    ids = torch.randint(0, 32000, (batch, seq), generator=torch.Generator().manual_seed(0))
    return HFLoss(model), (ids, ids), f"HF Llama, 2 layers, d {d}, GQA 8/2, vocab 32000, B {batch} x T {seq}, loss inside"


def run_case(name: str, quick: bool, device: torch.device, steps: int, reuse: dict | None = None) -> dict[str, Any]:
    """``reuse``: a previous run's case (same shapes, same device): its measured peaks and step
    times are kept and only the estimates and choices are computed again (after a change to
    the estimate, without compiling every candidate again)."""
    model, args, desc = make_case(name, quick)
    model = model.to(device).train()
    args = tuple(a.to(device) for a in args)
    print(f"{name}: {desc}", flush=True)
    torch._dynamo.reset()
    old = {r["label"]: r for r in reuse["candidates"]} if reuse else {}
    anchor = reuse["anchor"] if reuse else measure_options(model, *args, options=None, steps=steps, device=device)
    print(f"  torch.compile: peak {anchor['peak_bytes'] / 2**20:.1f} MiB, step {anchor['step_s'] * 1e3:.1f} ms", flush=True)
    start = time.perf_counter()
    result = fxmem.fit(model, *args, memory=2**50, device=device.type)
    fit_s = time.perf_counter() - start
    rows = []
    for cand in sorted(result.candidates, key=lambda c: c.cost):
        row: dict[str, Any] = {"label": cand.label, "options": cand.options, "estimate_bytes": cand.estimate,
                               "cost": cand.cost, "parts": cand.parts, "error": cand.error}
        if cand.label in old and "peak_bytes" in old[cand.label]:
            row.update(peak_bytes=old[cand.label]["peak_bytes"], step_s=old[cand.label]["step_s"], reused=True)
            row["estimate_vs_measured"] = cand.estimate / row["peak_bytes"]
        elif not cand.error:
            torch._dynamo.reset()
            try:
                row.update(measure_options(model, *args, options=cand.options, steps=steps, device=device))
                row["estimate_vs_measured"] = cand.estimate / row["peak_bytes"]
            except Exception as exc:  # noqa: BLE001 - a failing candidate is a result too
                row["error"] = f"{type(exc).__name__}: {exc}"[:300]
        rows.append(row)
        print(f"  {cand.label:28s} est {cand.estimate / 2**20:8.1f} MiB  " + (
            f"measured {row['peak_bytes'] / 2**20:8.1f} MiB ({row['estimate_vs_measured']:.3f})  "
            f"step {row['step_s'] * 1e3:7.1f} ms" if "peak_bytes" in row else row["error"][:100]), flush=True)
    measured = {r["label"]: r for r in rows if "peak_bytes" in r}
    limits = []
    for frac in LIMITS:
        limit = int(frac * anchor["peak_bytes"])
        entry: dict[str, Any] = {"fraction": frac, "limit_bytes": limit}
        fitting = [r for r in measured.values() if r["peak_bytes"] <= limit]
        fastest = min(fitting, key=lambda r: r["step_s"]) if fitting else None
        entry["fastest_measured"] = fastest["label"] if fastest else None
        try:
            choice = result.refit(limit)
        except FitError as err:
            entry["error"] = str(err)
        else:
            got = measured.get(choice.chosen.label)
            entry.update(chosen=choice.chosen.label, options=choice.options, estimate_bytes=choice.estimate)
            if got is not None:
                entry.update(measured_bytes=got["peak_bytes"], fits_measured=got["peak_bytes"] <= limit,
                             estimate_vs_measured=choice.estimate / got["peak_bytes"], step_s=got["step_s"])
                if fastest:
                    entry["step_vs_fastest_fitting"] = got["step_s"] / fastest["step_s"]
        limits.append(entry)
        print(f"  limit {frac:.1f}x = {limit / 2**20:7.1f} MiB: " + (
            f"{entry['chosen']:24s} measured {entry.get('measured_bytes', 0) / 2**20:7.1f} MiB "
            f"fits {entry.get('fits_measured')}  step x fastest fitting {entry.get('step_vs_fastest_fitting', float('nan')):.3f}"
            if "chosen" in entry else f"no fit ({'measured: none fits either' if not fitting else 'fastest measured: ' + fastest['label']})"),
            flush=True)
    return {"case": name, "description": desc, "anchor": anchor, "fit_s": fit_s, "candidates": rows,
            "limits": limits, "table": result.table}


def plot(results: dict, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    cases = results["cases"]
    fig, axes = plt.subplots(1, len(cases), figsize=(5.5 * len(cases), 4.2), squeeze=False)
    for ax, case in zip(axes[0], cases):
        anchor = case["anchor"]["peak_bytes"]
        xs = [e["fraction"] for e in case["limits"]]
        ax.plot(xs, xs, "k--", lw=1, label="limit")
        ok = [e for e in case["limits"] if "measured_bytes" in e]
        ax.plot([e["fraction"] for e in ok], [e["measured_bytes"] / anchor for e in ok], "o-", label="measured peak of fit's choice")
        ax.plot([e["fraction"] for e in ok], [e["estimate_bytes"] / anchor for e in ok], "x:", label="fit's estimate")
        for e in ok:
            if "step_vs_fastest_fitting" in e:
                ax.annotate(f"{e['step_vs_fastest_fitting']:.2f}", (e["fraction"], e["measured_bytes"] / anchor),
                            fontsize=7, textcoords="offset points", xytext=(0, 6), ha="center")
        ax.set_xlabel("limit / torch.compile's measured peak")
        ax.set_ylabel("bytes / torch.compile's measured peak")
        ax.set_title(f"{case['case']} (labels: step time / fastest fitting)", fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(f"fxmem.fit, {results['device']}, torch {results['torch']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(os.path.splitext(path)[0] + ".png", dpi=110)
    plt.close(fig)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="small shapes (CPU)")
    parser.add_argument("--cases", nargs="*", default=["gpt", "hf_llama"], choices=["gpt", "hf_llama"])
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 5 on the CPU, 20 on CUDA)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--reuse-measured", default=None, metavar="JSON",
                        help="keep the measurements of this earlier run; estimate and choose again")
    opts = parser.parse_args()
    device = torch.device(opts.device)
    steps = opts.steps or (20 if device.type == "cuda" else 5)
    out = opts.out or os.path.join(RESULTS, f"fit{'_quick' if opts.quick else ''}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    results: dict[str, Any] = {"question": __doc__.split("\n")[0], "device": device_name(device),
                               "torch": torch.__version__, "quick": opts.quick, "steps": steps, "cases": []}
    reuse = {}
    if opts.reuse_measured:
        with open(opts.reuse_measured) as f:
            previous = json.load(f)
        reuse = {c["case"]: c for c in previous["cases"]}
        results["measured_in"] = opts.reuse_measured
    for name in opts.cases:
        results["cases"].append(run_case(name, opts.quick, device, steps, reuse.get(name)))
        with open(out, "w") as f:
            json.dump(results, f, indent=2, default=str)
    plot(results, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
