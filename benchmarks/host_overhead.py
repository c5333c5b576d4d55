"""Question: how much host time does fxmem's chunked loss add to a training step whose compute is negligible?

A small model's GPU step waits on the host (Python, the dispatcher, kernel launches), so what the
loss adds to the host's work per step is what it adds to that step. On a CPU with tiny shapes the
compute is negligible too, and the step time is that host work: a proxy for the launch-bound GPU
step of issue 11's small HF Llama (torch.compile 5.2 ms on the H200), measured without a GPU.

Side by side in one process: torch.compile, ``backend="fxmem"`` (chunked loss) and
``backend="fxmem"`` with ``chunk=False``, on HF Llama (2 layers, d 32, vocab 256, B 1 × T 8,
labels in the batch, the logits returned as HF returns them). Steps are interleaved (20 steps of
each variant per round, 15 rounds, medians), then one profiled step per variant counts the ATen
calls it makes.

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/host_overhead.py          # ~3 min on 2 cores
    PYTHONPATH=. python benchmarks/host_overhead.py --device cuda              # on a GPU: the real thing

Writes ``results/host_overhead_cpu.json`` (``_cuda`` on a GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
VARIANTS = {"torch.compile": None, "fxmem": {}, "fxmem chunk=False": {"chunk": False}}


def build(device: torch.device):
    from transformers import LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=256, max_position_embeddings=64, use_cache=False)
    return cfg, torch.randint(0, cfg.vocab_size, (1, 8), device=device)


def make_step(cfg, ids: torch.Tensor, options: dict | None):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(ids.device).train()
    fn = torch.compile(model) if options is None else torch.compile(model, backend="fxmem", options=options)
    params = list(model.parameters())

    def step() -> None:
        for p in params:
            p.grad = None
        fn(input_ids=ids, labels=ids).loss.backward()

    return step


def aten_calls(step, device: torch.device) -> tuple[int, list[str]]:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
    events = prof.key_averages()
    calls = sum(e.count for e in events if e.key.startswith("aten::"))
    custom = sorted(e.key for e in events if e.key.startswith("fxmem::"))
    return calls, custom


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", default=None)
    opts = parser.parse_args()
    device = torch.device(opts.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("host_overhead.py: no CUDA device; skipped")
        return
    out = opts.out or os.path.join(RESULTS, f"host_overhead_{device.type}.json")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    cfg, ids = build(device)
    steps = {name: make_step(cfg, ids, options) for name, options in VARIANTS.items()}
    for step in steps.values():  # compile, then run past any recompilation
        for _ in range(3):
            step()
    sync()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(opts.rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            for _ in range(opts.steps):
                step()
            sync()
            times[name].append((time.perf_counter() - start) / opts.steps)
    base = statistics.median(times["torch.compile"])
    rows = []
    for name, step in steps.items():
        median = statistics.median(times[name])
        calls, custom = aten_calls(step, device)
        rows.append({"variant": name, "options": VARIANTS[name], "step_us": median * 1e6,
                     "step_vs_torch_compile": median / base, "aten_calls_per_step": calls,
                     "fxmem_custom_ops": custom, "rounds_us": [t * 1e6 for t in times[name]]})
        print(f"{name:20s} {median * 1e6:8.0f} us  {median / base:5.2f}x torch.compile  "
              f"{calls:4d} ATen calls  {custom}", flush=True)
    where = (f"cpu: {platform.machine()}, {torch.get_num_threads()} threads" if device.type == "cpu"
             else torch.cuda.get_device_name(device))
    results = {"question": __doc__.splitlines()[0], "device": where, "torch": torch.__version__,
               "model": "HF Llama, 2 layers, d 32, vocab 256, B 1 x T 8, labels inside", "rows": rows}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
