"""Chunked loss: measured peak memory and step time of a training step, fxmem against the others.

Workloads (random weights, no downloads):

* ``hf_llama``: HF ``LlamaForCausalLM`` (2 layers, d 256, GQA 4/2 heads, vocab 32k), the loss
  computed inside ``forward`` (``labels=``), B 4 × T 512;
* ``hf_gpt2``: HF ``GPT2LMHeadModel`` (2 layers, d 256, head tied to the embedding, vocab 32k),
  ``labels=``, B 4 × T 512;
* ``user_loss``: the Llama model above, unmodified, with a loss the user writes around it in the
  same compiled function (shifted ``F.cross_entropy``), half the labels ``-100``;
* ``long_context`` (full run only): the Llama model with vocab 128k, B 1 × T 2048;
* ``mlp_long``: the Llama model (``intermediate_size`` 4·d) at a long sequence, B 1 × T 4096,
  where the gated MLP's ``[N, I]`` activations are the largest tensors after the logits: rows
  ``torch.compile``, fxmem (the loss chunked) and fxmem with ``chunk={"mlp": True}``.

Per workload, side by side in one process: eager; ``torch.compile`` (Inductor); ``torch.compile``
with Inductor's ``auto_chunker`` (``torch._inductor.config.auto_chunker.enable``, where this torch
has it); eager model with the head and loss hand-written as ``F.linear_cross_entropy(...,
options=LinearCrossEntropyOptions())`` (torch ≥ 2.13: its chunked path; ``torch.compile`` falls
back to eager at that op, so it runs eager); fxmem with ``chunk=False``; fxmem (defaults: chunk on).

The step is forward + backward from ``grad=None`` (no optimizer). Peak memory is measured from
outside (``fxmem.measure.peak_memory``: on the CPU the allocator's events via ``torch.profiler``),
as the bytes above what was allocated when the step began; step time is the median of
``--steps`` steps after a warm-up step. Times on a shared CPU are noisy: ratios only.

    PYTHONPATH=. python benchmarks/chunked_loss.py            # full run (JSON + PNG)
    PYTHONPATH=. python benchmarks/chunked_loss.py --quick    # small shapes, for development
    PYTHONPATH=. python benchmarks/chunked_loss.py --device cuda --workloads long_context,mlp_long \
        --variants torch.compile,fxmem,"fxmem chunk.mlp" --out /tmp/chunked_loss_gpu.json   # a GPU

Writes ``benchmarks/results/chunked_loss.json`` and ``chunked_loss.png`` (``--quick``:
``chunked_loss_quick.*``; ``--out``: that path, the JSON rewritten after each workload so a run
cut short keeps what it measured). On CUDA the peak is ``max_memory_allocated`` above what was
allocated when the step began, and the chunked loss runs its Triton kernel
(:mod:`fxmem.kernels.linear_ce_triton`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fxmem  # noqa: E402
from fxmem.measure import peak_memory  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def build(kind: str, shape: dict):
    import transformers

    torch.manual_seed(0)
    inner = shape.get("inner", shape["d"] * 8 // 3 // 8 * 8)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(n_layer=shape["layers"], n_embd=shape["d"], n_head=4, vocab_size=shape["vocab"],
                                      n_positions=shape["T"], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        model = transformers.GPT2LMHeadModel(cfg)
        model.loss_type = "ForCausalLM"  # no loss_type: HF warns inside forward, a Dynamo graph break
        return model, model.transformer
    cfg = transformers.LlamaConfig(hidden_size=shape["d"], intermediate_size=inner,
                                   num_hidden_layers=shape["layers"], num_attention_heads=4, num_key_value_heads=2,
                                   vocab_size=shape["vocab"], max_position_embeddings=shape["T"],
                                   attn_implementation="sdpa")
    model = transformers.LlamaForCausalLM(cfg)
    return model, model.model


def batch(shape: dict, ignore_half: bool, device: str):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, shape["vocab"], (shape["B"], shape["T"]), generator=g)
    labels = ids.clone()
    if ignore_half:
        labels[torch.rand(labels.shape, generator=g) < 0.5] = -100
    return ids.to(device), labels.to(device)


def steps_for(workload: str, model, base):
    """The step as the user writes it (``model_step``) and with ``F.linear_cross_entropy`` hand-written."""
    vocab = model.config.vocab_size
    if workload == "user_loss":
        def model_step(ids, labels):
            logits = model(input_ids=ids).logits
            return F.cross_entropy(logits[:, :-1].reshape(-1, vocab), labels[:, 1:].reshape(-1), ignore_index=-100)
    else:
        def model_step(ids, labels):
            return model(input_ids=ids, labels=labels).loss

    def lce_step(ids, labels):
        h = base(input_ids=ids).last_hidden_state[:, :-1]
        return F.linear_cross_entropy(h.reshape(-1, h.shape[-1]), model.lm_head.weight, labels[:, 1:].reshape(-1),
                                      ignore_index=-100, options=torch.nn.LinearCrossEntropyOptions())

    return model_step, lce_step


def variants(model_step, lce_step):
    rows = [("eager", lambda: model_step), ("torch.compile", lambda: torch.compile(model_step))]
    if hasattr(torch._inductor.config, "auto_chunker"):
        rows.append(("torch.compile auto_chunker", lambda: torch.compile(model_step)))
    if hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions"):
        rows.append(("F.linear_cross_entropy (eager)", lambda: lce_step))
    rows.append(("fxmem chunk=False", lambda: torch.compile(model_step, backend=fxmem.backend(chunk=False))))
    rows.append(("fxmem", lambda: torch.compile(model_step, backend="fxmem")))
    rows.append(("fxmem chunk.mlp", lambda: torch.compile(model_step, backend=fxmem.backend(chunk={"mlp": True}))))
    return rows


# which variants each workload runs by default (all of them where not listed): the long cases
# run the comparison their targets name, within the time a CPU run has
DEFAULT_VARIANTS = {
    "long_context": ("torch.compile", "fxmem"),
    "mlp_long": ("torch.compile", "fxmem", "fxmem chunk.mlp"),
}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(name, make, model, ids, labels, steps, device):
    torch._dynamo.reset()
    patch = torch._inductor.config.patch({"auto_chunker.enable": True}) if "auto_chunker" in name else None
    if patch:
        patch.__enter__()
    try:
        fn = make()

        def step():
            loss = fn(ids, labels)
            loss.backward()
            return loss.detach()

        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        loss = step()
        _sync(device)
        first = time.perf_counter() - t0
        model.zero_grad(set_to_none=True)
        peak = peak_memory(step, device=device)[0].peak_bytes
        model.zero_grad(set_to_none=True)
        times = []
        for _ in range(steps):
            _sync(device)
            t0 = time.perf_counter()
            step()
            _sync(device)
            times.append(time.perf_counter() - t0)
            model.zero_grad(set_to_none=True)
    finally:
        if patch:
            patch.__exit__(None, None, None)
    return {"variant": name, "peak_bytes": peak, "step_s": statistics.median(times), "first_call_s": first,
            "loss": float(loss)}


def run_workload(workload: str, shape: dict, steps: int, device: str, only: tuple[str, ...] | None) -> dict:
    kind = "gpt2" if workload == "hf_gpt2" else "llama"
    model, base = build(kind, shape)
    model.to(device).train()
    ids, labels = batch(shape, ignore_half=workload == "user_loss", device=device)
    model_step, lce_step = steps_for(workload, model, base)
    rows = []
    wanted = only or DEFAULT_VARIANTS.get(workload)
    if wanted is None:
        wanted = tuple(n for n, _ in variants(model_step, lce_step) if n != "fxmem chunk.mlp")
    for name, make in variants(model_step, lce_step):
        if name not in wanted or (name == "F.linear_cross_entropy (eager)" and device != "cpu"):
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            row = measure(name, make, model, ids, labels, steps, device)
        rows.append(row)
        print(f"  {workload:13s} {name:32s} peak {row['peak_bytes'] / 2**20:8.1f} MiB  step {row['step_s'] * 1e3:8.1f} ms"
              f"  loss {row['loss']:.5f}", flush=True)
    ref = next(r for r in rows if r["variant"] == "torch.compile")
    for r in rows:
        r["peak_vs_compile"] = r["peak_bytes"] / ref["peak_bytes"]
        r["step_vs_compile"] = r["step_s"] / ref["step_s"]
    logits_bytes = shape["B"] * shape["T"] * shape["vocab"] * 4
    return {"workload": workload, "shape": shape, "fp32_logits_bytes": logits_bytes, "rows": rows}


def plot(results: dict, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    works = results["workloads"]
    fig, axes = plt.subplots(2, len(works), figsize=(4.2 * len(works), 6.5), squeeze=False)
    for j, w in enumerate(works):
        names = [r["variant"] for r in w["rows"]]
        colors = ["#36c" if n == "fxmem" else "#888" for n in names]
        for i, (key, title) in enumerate((("peak_vs_compile", "peak × torch.compile"), ("step_vs_compile", "step time × torch.compile"))):
            ax = axes[i][j]
            vals = [r[key] for r in w["rows"]]
            ax.barh(names, vals, color=colors)
            ax.axvline(1.0, color="k", lw=0.5)
            for k, v in enumerate(vals):
                ax.text(v, k, f" {v:.2f}", va="center", fontsize=7)
            ax.set_title(f"{w['workload']}: {title}", fontsize=8)
            ax.tick_params(labelsize=7)
    fig.suptitle(f"chunked loss, {results['device']}, torch {results['torch']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small shapes (vocab 4k, B 2 × T 64), for development")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--workloads", default=None, help="comma-separated subset")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--variants", default=None, help="comma-separated subset of the rows (torch.compile is always run)")
    p.add_argument("--out", default=None, help="the JSON's path (default benchmarks/results/chunked_loss[_quick].json)")
    p.add_argument("--merge", action="store_true",
                   help="replace these workloads in the existing JSON and keep the others (runs split over time)")
    ns = p.parse_args(argv)
    if ns.device == "cuda" and not torch.cuda.is_available():
        print("chunked_loss: --device cuda but CUDA is not available; nothing measured")
        return 0
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if ns.quick:
        base = {"layers": 1, "d": 64, "vocab": 4096, "B": 2, "T": 64}
        shapes = {"hf_llama": base, "hf_gpt2": base, "user_loss": base,
                  "mlp_long": {"layers": 1, "d": 64, "inner": 256, "vocab": 512, "B": 1, "T": 1024}}
    else:
        base = {"layers": 2, "d": 256, "vocab": 32000, "B": 4, "T": 512}
        shapes = {"hf_llama": base, "hf_gpt2": base, "user_loss": base,
                  "long_context": {"layers": 2, "d": 256, "vocab": 128000, "B": 1, "T": 2048},
                  "mlp_long": {"layers": 2, "d": 256, "inner": 1024, "vocab": 32000, "B": 1, "T": 4096}}
    if ns.workloads:
        shapes = {k: v for k, v in shapes.items() if k in ns.workloads.split(",")}
    only = None
    if ns.variants:
        only = tuple(dict.fromkeys(["torch.compile", *ns.variants.split(",")]))
    results = {"device": "cpu" if ns.device == "cpu" else torch.cuda.get_device_name(),
               "torch": torch.__version__, "threads": torch.get_num_threads(), "steps": ns.steps,
               "load_average": os.getloadavg()[0], "workloads": []}
    name = "chunked_loss_quick" if ns.quick else "chunked_loss"
    os.makedirs(RESULTS, exist_ok=True)
    path = ns.out or os.path.join(RESULTS, name + ".json")
    old = None
    if ns.merge and os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        results["load_average"] = [old.get("load_average"), results["load_average"]]
    out = results
    for workload, shape in shapes.items():
        print(f"{workload}: {shape}", flush=True)
        results["workloads"].append(run_workload(workload, shape, ns.steps, ns.device, only))
        out = dict(results)
        if old is not None:
            done = {w["workload"] for w in results["workloads"]}
            out["workloads"] = [w for w in old["workloads"] if w["workload"] not in done] + results["workloads"]
        with open(path, "w") as f:  # after each workload: a run cut short keeps what it measured
            json.dump(out, f, indent=2)
    plot(out, os.path.splitext(path)[0] + ".png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
