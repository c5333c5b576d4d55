"""Compile-overhead comparison on the built-in GPT, shared by ``fxmem bench`` and
``benchmarks/compile_overhead.py``: eager, ``aot_eager``, Inductor and fxmem, one process, one run.

Compile time is the first training step (forward + backward + SGD update) with cold compile
caches — what a user waits for the first time; step time is the median of the following steps. Both are reported as
ratios to eager's, measured side by side.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import platform
from typing import Any

import torch
import torch._functorch.config
import torch._inductor.config
import torch._inductor.utils

from fxmem.measure import measure_training
from fxmem.models.gpt import GPT, GPTConfig, example_batch


@contextlib.contextmanager
def _cold_caches():
    """Compile from scratch: Inductor's and AOTAutograd's on-disk caches would turn a second run's
    compile into a cache lookup (we measured 141 s cold vs 3.6 s warm for Inductor here).

    Scoped, not process-wide: PyTorch's own ``fresh_inductor_cache`` (a temporary cache
    directory, restored on exit) and ``config.patch`` for the two caches."""
    fresh = getattr(torch._inductor.utils, "fresh_cache", None) or torch._inductor.utils.fresh_inductor_cache
    with fresh(), torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        yield


def _compiler(backend: str):
    if backend == "eager":
        return lambda m: m
    return lambda m: torch.compile(m, backend=backend)


def compile_overhead(*, layers: int = 4, d_model: int = 128, seq: int = 128, batch: int = 4,
                     backends: list[str] | tuple[str, ...] = ("eager", "aot_eager", "inductor", "fxmem"),
                     steps: int = 3) -> dict[str, Any]:
    with _cold_caches():
        return _compile_overhead(layers=layers, d_model=d_model, seq=seq, batch=batch, backends=backends, steps=steps)


def _compile_overhead(*, layers, d_model, seq, batch, backends, steps) -> dict[str, Any]:
    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=layers, d_model=d_model, n_head=4, block_size=seq, vocab_size=512)
    base = GPT(cfg)
    args = (example_batch(cfg, batch, seed=0), example_batch(cfg, batch, seed=1))
    rows = []
    for backend in backends:
        torch._dynamo.reset()
        m = measure_training(backend, copy.deepcopy(base).train(), _compiler(backend), args, steps=steps)
        rows.append({"backend": backend, **m.as_dict()})
    eager = next((r for r in rows if r["backend"] == "eager"), rows[0])
    for r in rows:
        r["compile_ratio"] = r["compile_s"] / eager["compile_s"]
        r["step_ratio"] = r["step_s"] / eager["step_s"]
    return {
        "question": "compile time and step time of fxmem vs eager, aot_eager and Inductor (training, built-in GPT)",
        "device": "cpu: " + (platform.processor() or platform.machine()) + f", {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "model": {"layers": layers, "d_model": d_model, "seq": seq, "batch": batch, "params": sum(p.numel() for p in base.parameters())},
        "steps": steps,
        "rows": rows,
    }


def write_results(results: dict[str, Any], path: str) -> None:
    """Write the JSON, and a PNG bar chart of the ratios beside it (when matplotlib is installed)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(results, f, indent=2)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = results["rows"]
    names = [r["backend"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, key, title in ((axes[0], "compile_ratio", "compile (first step) × eager"), (axes[1], "step_ratio", "step time × eager")):
        ax.bar(names, [r[key] for r in rows], color=["#888", "#4a7", "#c63", "#36c"][: len(rows)])
        ax.set_title(title)
        for i, r in enumerate(rows):
            ax.text(i, r[key], f"{r[key]:.2f}", ha="center", va="bottom")
    fig.suptitle(f"{results['model']['layers']}-layer GPT, d={results['model']['d_model']}, {results['device']}")
    fig.tight_layout()
    fig.savefig(os.path.splitext(path)[0] + ".png", dpi=110)
    plt.close(fig)
