"""Does ``fxmem.fit`` choose options that fit, and are they the fastest that fit?

Training steps (the loss inside the model, the module returns the loss only, as a training
step does): the built-in GPT and HF Llama (2 layers, GQA, vocab 32k, as in
``benchmarks/train_peak.py``), and (``--cases minilm``) all-MiniLM-L6-v2 with its trained
weights fine-tuned with in-batch negatives on 32 paragraphs × 128 tokens. Per case, in one process:

1. plain ``torch.compile``: measured peak and step time (the anchor);
2. ``fxmem.fit`` once: every candidate's estimated peak and time cost;
3. every candidate compiled with ``backend="fxmem"`` and measured (peak of a whole step:
   parameters, batch, and the peak above them from :func:`fxmem.measure.peak_memory`);
4. limits from 0.3× to 1.0× of torch.compile's measured peak: fit's choice for each
   (``FitResult.refit``, the same candidates), its measured peak against the limit, and its
   measured step time against the fastest candidate whose *measured* peak fits the limit.

Inference (``--modes inference``): the same models serving one short sequence, and
all-MiniLM-L6-v2 with its trained weights embedding a batch of 64 paragraphs × 128 tokens
(``--cases minilm``), where ``chunk={"mlp": True}`` is the option that moves the peak.

    PYTHONPATH=. python benchmarks/fit.py --quick                 # CPU, small shapes
    PYTHONPATH=. python benchmarks/fit.py --device cuda --out $OUT/fit.json
    PYTHONPATH=. python benchmarks/fit.py --quick --reuse-measured old.json   # new estimates, old measurements

Writes JSON after every case and a PNG beside it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from typing import Any

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fxmem  # noqa: E402
from fxmem.fit import FitError, measure_inference, measure_options  # noqa: E402
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
    if name == "minilm":
        # fine-tuning all-MiniLM-L6-v2 (trained weights) as it was trained: in-batch negatives
        # over paragraph pairs (train_peak.py's minilm case, at half its batch: every candidate
        # is compiled and measured here)
        from fxmem.testing import minilm

        model, tokenizer = minilm.load()
        pairs, seq = (4, 32) if quick else (16, 128)
        ids, mask = minilm.paragraph_pairs(tokenizer, pairs, seq)
        return (minilm.ContrastiveStep(model), (ids, mask),
                f"all-MiniLM-L6-v2 (trained weights, SDPA), {2 * pairs} paragraphs x T {seq}, in-batch-negatives loss")
    import transformers

    d, seq, batch = (128, 128, 2) if quick else (256, 512, 4)
    cfg = transformers.LlamaConfig(hidden_size=d, intermediate_size=4 * d, num_hidden_layers=2, num_attention_heads=8,
                                   num_key_value_heads=2, vocab_size=32000, max_position_embeddings=seq)
    model = transformers.LlamaForCausalLM(cfg)
    model.config.use_cache = False
    ids = torch.randint(0, 32000, (batch, seq), generator=torch.Generator().manual_seed(0))
    return HFLoss(model), (ids, ids), f"HF Llama, 2 layers, d {d}, GQA 8/2, vocab 32000, B {batch} x T {seq}, loss inside"


def interleaved_times(steps: dict[str, Any], *, rounds: int, device: torch.device) -> dict[str, dict[str, float]]:
    """Each compiled step timed once per round, the candidates in a new random order each round
    (on a shared CPU the load drifts over minutes: candidates timed one after the other would
    each see a different machine); per candidate the median, and the min and max, over rounds, and
    every round's time (``step_s_each``, round by round: ratios per round compare one moment)."""
    import random
    import statistics

    rng = random.Random(0)
    times: dict[str, list[float]] = {k: [] for k in steps}
    labels = list(steps)
    for _ in range(rounds):
        rng.shuffle(labels)
        for label in labels:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            steps[label]()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times[label].append(time.perf_counter() - start)
    return {k: {"step_s": statistics.median(v), "step_s_min": min(v), "step_s_max": max(v), "rounds": len(v),
                "step_s_each": v}
            for k, v in times.items()}


def run_case(name: str, quick: bool, device: torch.device, steps: int, reuse: dict | None = None,
             rounds: int | None = None) -> dict[str, Any]:
    """``reuse``: a previous run's case (same shapes, same device): its measured peaks and step
    times are kept and only the estimates and choices are computed again (after a change to
    the estimate, without compiling every candidate again). ``rounds``: interleaved timing rounds
    (default ``max(steps, 5)``)."""
    model, args, desc = make_case(name, quick)
    model = model.to(device).train()
    args = tuple(a.to(device) for a in args)
    print(f"{name}: {desc}", flush=True)
    torch._dynamo.reset()
    old = {r["label"]: r for r in reuse["candidates"]} if reuse else {}
    compiled: dict[str, Any] = {}  # label → the compiled step, timed again, interleaved, at the end
    keep: dict[str, Any] = {}
    anchor = reuse["anchor"] if reuse else measure_options(model, *args, options=None, steps=steps, device=device,
                                                           keep=keep)
    if keep:
        compiled["torch.compile"] = keep["step"]
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
            keep = {}
            try:
                row.update(measure_options(model, *args, options=cand.options, steps=steps, device=device, keep=keep))
                row["estimate_vs_measured"] = cand.estimate / row["peak_bytes"]
                compiled[cand.label] = keep["step"]
            except Exception as exc:  # noqa: BLE001 - a failing candidate is a result too
                row["error"] = f"{type(exc).__name__}: {exc}"[:300]
        rows.append(row)
        print(f"  {cand.label:28s} est {cand.estimate / 2**20:8.1f} MiB  " + (
            f"measured {row['peak_bytes'] / 2**20:8.1f} MiB ({row['estimate_vs_measured']:.3f})  "
            f"step {row['step_s'] * 1e3:7.1f} ms" if "peak_bytes" in row else row["error"][:100]), flush=True)
    if compiled:
        times = interleaved_times(compiled, rounds=rounds or max(steps, 5), device=device)
        for row in rows:
            if row["label"] in times:
                row["step_s_sequential"] = row["step_s"]
                row.update(times[row["label"]])
        if "torch.compile" in times:
            anchor = {**anchor, "step_s_sequential": anchor["step_s"], **times["torch.compile"]}
        print("  step times, interleaved (median of rounds): " + ", ".join(
            f"{k} {v['step_s'] * 1e3:.1f} ms" for k, v in sorted(times.items(), key=lambda kv: kv[1]["step_s"])),
            flush=True)
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
                if fitting and "step_s_min" in got:
                    # the same comparison on each candidate's fastest round: on a shared CPU the
                    # other jobs only ever add time, so the minimum is the least disturbed figure
                    quickest = min(fitting, key=lambda r: r.get("step_s_min", math.inf))
                    entry["fastest_measured_min"] = quickest["label"]
                    entry["step_vs_fastest_fitting_min"] = got["step_s_min"] / quickest["step_s_min"]
        limits.append(entry)
        print(f"  limit {frac:.1f}x = {limit / 2**20:7.1f} MiB: " + (
            f"{entry['chosen']:24s} measured {entry.get('measured_bytes', 0) / 2**20:7.1f} MiB "
            f"fits {entry.get('fits_measured')}  step x fastest fitting {entry.get('step_vs_fastest_fitting', float('nan')):.3f}"
            f" (min of rounds: {entry.get('step_vs_fastest_fitting_min', float('nan')):.3f})"
            if "chosen" in entry else f"no fit ({'measured: none fits either' if not fitting else 'fastest measured: ' + fastest['label']})"),
            flush=True)
    return {"case": name, "description": desc, "anchor": anchor, "fit_s": fit_s, "candidates": rows,
            "limits": limits, "table": result.table}


INFERENCE_ALLOW = ((), ("int8", "quantize", "prune", "precision"))
INFERENCE_LIMITS = (0.2, 0.3, 0.4, 0.5, 0.7, 1.0)
SINGLES = ("defaults (tie_weights)", "int8 weight_only", "quantize 4 bit, group 64", "prune 0.3", "bf16", "chunk mlp")


def inference_case(name: str, quick: bool) -> tuple[nn.Module, tuple, dict, str]:
    """The same models, for a no-grad forward that returns the logits, on one short sequence
    (B 1 × T 32 quick, 1 × 128 full): serving, where the weights are most of the peak (at the
    training batch the fp32 logits are, and no weight option could move the peak much)."""
    if name == "minilm":
        # a sentence-embedding service's batch: all-MiniLM-L6-v2 (trained weights), 64 paragraphs
        # of 128 tokens (quick: 16 × 64), where the activations, not the weights, set the peak
        from fxmem.testing import minilm

        model, tokenizer = minilm.load()
        pairs, seq = (8, 64) if quick else (32, 128)
        ids, mask = minilm.paragraph_pairs(tokenizer, pairs, seq)
        return model, (ids, mask), {}, f"all-MiniLM-L6-v2 (trained weights), {2 * pairs} paragraphs x T {seq}, embeddings out"
    step, args, desc = make_case(name, quick)
    model = step.model.eval()
    ids = args[0][:1, :32 if quick else 128].contiguous()
    base = desc.split(", B")[0]
    if name == "gpt":
        return model, (ids,), {}, f"{base}, B 1 x T {ids.shape[1]}, logits out"
    return model, (), {"input_ids": ids}, f"{base}, B 1 x T {ids.shape[1]}, logits out"


def run_inference_case(name: str, quick: bool, device: torch.device, steps: int) -> dict[str, Any]:
    """Inference: ``fxmem.fit(mode="inference")`` with nothing lossy allowed and with everything
    allowed; every single-option candidate and every candidate chosen at some limit is measured
    (:func:`fxmem.fit.measure_inference`: the weights the options leave, the batch, and the peak
    of a no-grad forward compiled with ``backend="fxmem"``); limits are fractions of plain
    ``torch.compile``'s measured inference peak (its weights are the fp32 originals)."""
    model, args, kwargs, desc = inference_case(name, quick)
    model = model.to(device)
    args = tuple(a.to(device) for a in args)
    kwargs = {k: v.to(device) for k, v in kwargs.items()}
    print(f"{name} inference: {desc}", flush=True)
    torch._dynamo.reset()
    anchor = measure_inference(model, *args, kwargs=kwargs, options=None, steps=steps, device=device)
    print(f"  torch.compile: peak {anchor['peak_bytes'] / 2**20:.1f} MiB, forward {anchor['step_s'] * 1e3:.1f} ms", flush=True)
    out: dict[str, Any] = {"case": name, "mode": "inference", "description": desc, "anchor": anchor, "fits": []}
    measured: dict[str, dict] = {}

    def measure(cand) -> dict:
        if cand.label not in measured:
            torch._dynamo.reset()
            row: dict[str, Any] = {"label": cand.label, "options": cand.options, "estimate_bytes": cand.estimate,
                                   "parts": cand.parts}
            try:
                row.update(measure_inference(model, *args, kwargs=kwargs, options=cand.options, steps=steps,
                                             device=device))
                row["estimate_vs_measured"] = cand.estimate / row["peak_bytes"]
            except Exception as exc:  # noqa: BLE001 - a failing candidate is a result too
                row["error"] = f"{type(exc).__name__}: {exc}"[:300]
            measured[cand.label] = row
            print(f"  {cand.label:44s} est {cand.estimate / 2**20:7.2f} MiB  " + (
                f"measured {row['peak_bytes'] / 2**20:7.2f} MiB ({row['estimate_vs_measured']:.3f})  "
                f"forward {row['step_s'] * 1e3:6.1f} ms" + (f"  warned: {row['warnings']}" if row["warnings"] else "")
                if "peak_bytes" in row else row["error"][:100]), flush=True)
        return measured[cand.label]

    for allow in INFERENCE_ALLOW:
        start = time.perf_counter()
        result = fxmem.fit(model, *args, kwargs=kwargs, memory=2**50, mode="inference", allow=list(allow),
                           device=device.type)
        entry: dict[str, Any] = {"allow": list(allow), "fit_s": time.perf_counter() - start, "table": result.table,
                                 "limits": []}
        for cand in result.candidates:
            if cand.label in SINGLES:
                measure(cand)
        for frac in INFERENCE_LIMITS:
            limit = int(frac * anchor["peak_bytes"])
            row: dict[str, Any] = {"fraction": frac, "limit_bytes": limit}
            try:
                choice = result.refit(limit)
            except FitError as err:
                row["error"] = str(err)
                print(f"  allow={list(allow)} limit {frac:.1f}x = {limit / 2**20:6.1f} MiB: no fit", flush=True)
            else:
                got = measure(choice.chosen)
                row.update(chosen=choice.chosen.label, options=choice.options, estimate_bytes=choice.estimate)
                if "peak_bytes" in got:
                    row.update(measured_bytes=got["peak_bytes"], fits_measured=got["peak_bytes"] <= limit,
                               estimate_vs_measured=choice.estimate / got["peak_bytes"])
                print(f"  allow={list(allow)} limit {frac:.1f}x = {limit / 2**20:6.1f} MiB: {choice.chosen.label}, "
                      f"measured {got.get('peak_bytes', 0) / 2**20:.2f} MiB, fits {row.get('fits_measured')}", flush=True)
            entry["limits"].append(row)
        out["fits"].append(entry)
    out["candidates"] = list(measured.values())
    return out


def plot(results: dict, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    cases = [c for c in results["cases"] if c.get("mode") != "inference"]
    if not cases:
        return
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
    parser.add_argument("--cases", nargs="*", default=["gpt", "hf_llama"], choices=["gpt", "hf_llama", "minilm"],
                        help="minilm: all-MiniLM-L6-v2 (trained weights): fine-tuning with in-batch negatives, "
                             "and an embedding batch in inference")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 5 on the CPU, 20 on CUDA)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="interleaved timing rounds of every compiled candidate (default: max(steps, 5))")
    parser.add_argument("--modes", nargs="*", default=["training", "inference"], choices=["training", "inference"])
    parser.add_argument("--out", default=None)
    parser.add_argument("--reuse-measured", default=None, metavar="JSON",
                        help="keep the measurements of this earlier run; estimate and choose again")
    opts = parser.parse_args()
    device = torch.device(opts.device)
    # every candidate's compiled step stays alive to be timed interleaved at the end: one Dynamo
    # cache entry each (their backends differ), beyond the default limit of 8 per frame
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 256))
    steps = opts.steps or (20 if device.type == "cuda" else 5)
    out = opts.out or os.path.join(RESULTS, f"fit{'_quick' if opts.quick else ''}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    results: dict[str, Any] = {"question": __doc__.split("\n")[0], "device": device_name(device),
                               "torch": torch.__version__, "quick": opts.quick, "steps": steps,
                               "rounds": opts.rounds or max(steps, 5), "cases": []}
    reuse = {}
    if opts.reuse_measured:
        with open(opts.reuse_measured) as f:
            previous = json.load(f)
        reuse = {c["case"]: c for c in previous["cases"]}
        results["measured_in"] = opts.reuse_measured
    for name in opts.cases:
        if "training" in opts.modes:
            results["cases"].append(run_case(name, opts.quick, device, steps, reuse.get(name), opts.rounds))
        if "inference" in opts.modes:
            results["cases"].append(run_inference_case(name, opts.quick, device, steps))
        with open(out, "w") as f:
            json.dump(results, f, indent=2, default=str)
    plot(results, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
