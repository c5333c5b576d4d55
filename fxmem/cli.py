"""The ``fxmem`` command line: ``demo``, ``explain``, ``fit`` and ``bench`` (also ``python -m fxmem``)."""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import sys
from typing import Any

import torch
from tqdm import tqdm

from fxmem.analysis.sizes import module_parameter_bytes
from fxmem.config import OptionError, parse_options
from fxmem.measure import measure_training
from fxmem.models.gpt import GPT, GPTConfig, example_batch
from fxmem.report import explain


def _mib(n: float) -> str:
    return f"{n / 2**20:.2f}"


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*headers), fmt.format(*("-" * w for w in widths))] + [fmt.format(*r) for r in cells])


def _options_from(ns: argparse.Namespace) -> tuple[dict, dict]:
    """(inference options, training options) from the command-line flags."""
    inference: dict[str, Any] = json.loads(ns.options) if getattr(ns, "options", None) else {}
    training: dict[str, Any] = {}
    if getattr(ns, "remat_budget", None) is not None:
        training["remat"] = {"budget": ns.remat_budget}
    if getattr(ns, "precision", None):
        inference["precision"] = ns.precision
        training["precision"] = ns.precision
    if getattr(ns, "int8", None):
        inference["int8"] = ns.int8
    if getattr(ns, "prune", None):
        inference["prune"] = {"ratio": ns.prune}
    parse_options(inference)  # bad flags fail here, before any work
    parse_options(training)
    return inference, training


# Each pass adds its row to the demo: (label, options) for inference and for training.
INFERENCE_VARIANTS = (
    ("fxmem (defaults: tie_weights, lower=auto)", {}),
    ("fxmem precision=bf16", {"precision": "bf16"}),
    ("fxmem int8=weight_only", {"int8": "weight_only"}),
    ("fxmem int8=dynamic", {"int8": "dynamic"}),
    ("fxmem int8 + bf16", {"int8": "weight_only", "precision": "bf16"}),
    ("fxmem prune 30% MLP", {"prune": {"ratio": 0.3, "targets": ["mlp"]}}),
)
TRAINING_VARIANTS = (
    ("fxmem remat=True (free recompute only)", {}),
    ("fxmem remat budget=0.5", {"remat": {"budget": 0.5}}),
    ("fxmem precision=bf16", {"precision": "bf16"}),
)


class _LossOnly(torch.nn.Module):
    """The demo GPT's training step returning the loss alone (``(None, loss)``): the logits are
    then not a graph output, so fxmem's ``chunk`` pass can compute the loss without them."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, idx, targets):
        return None, self.model(idx, targets)[1]


TORCH_COMPILE = "torch.compile (Inductor)"

# (label, options) of the chunk rows: the same step, returning the loss only, with and without chunking
CHUNK_VARIANTS = (
    ("fxmem chunk=False, step returns the loss only", {"chunk": False}),
    ("fxmem chunk (default), step returns the loss only", {}),
)


def _pytorch_min_cut(model: torch.nn.Module):
    """torch.compile with AOTAutograd and PyTorch's min-cut partitioner (Inductor's), no codegen."""
    from functorch.compile import make_boxed_func, min_cut_rematerialization_partition
    from torch._dynamo.backends.common import aot_autograd

    backend = aot_autograd(fw_compiler=lambda g, _: make_boxed_func(g.forward), bw_compiler=lambda g, _: make_boxed_func(g.forward),
                           partition_fn=min_cut_rematerialization_partition)
    return torch.compile(model, backend=backend)


def demo(ns: argparse.Namespace) -> int:
    """Compile the built-in GPT for inference and for a few training steps; print the tables."""
    inference_opts, training_opts = _options_from(ns)
    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=ns.layers, d_model=ns.d_model, n_head=4, block_size=ns.seq, vocab_size=512)
    base = GPT(cfg)
    idx = example_batch(cfg, batch=ns.batch, seed=0)
    targets = example_batch(cfg, batch=ns.batch, seed=1)
    print(f"fxmem demo: built-in GPT, {cfg.n_layer} layers, d_model {cfg.d_model}, "
          f"{sum(p.numel() for p in base.parameters()) / 1e6:.2f} M parameters, batch {ns.batch} × {ns.seq} tokens")
    inference_variants = [("fxmem (your options)", inference_opts)] if inference_opts else list(INFERENCE_VARIANTS)
    training_contenders = [
        ("eager", lambda m: m),
        # what fxmem is judged against: Inductor with its own partitioner, buffer reuse and fusion
        (TORCH_COMPILE, lambda m: torch.compile(m)),
        ("aot_eager (PyTorch default partitioner)", lambda m: torch.compile(m, backend="aot_eager")),
        ("PyTorch min-cut partitioner", _pytorch_min_cut),
    ] + [
        (label, lambda m, o=opts: torch.compile(m, backend="fxmem", options=o or None))
        for label, opts in ([("fxmem (your options)", training_opts)] if training_opts else TRAINING_VARIANTS)
    ] + ([] if training_opts else [
        (label, lambda m, o=opts: torch.compile(_LossOnly(m), backend="fxmem", options=o or None))
        for label, opts in CHUNK_VARIANTS
    ])
    bar = tqdm(total=len(inference_variants) + 2 + len(training_contenders) + 1, desc="compiling", unit="step",
               file=sys.stderr, disable=ns.quiet)

    # -- inference ---------------------------------------------------------------------------
    # Measured as a user runs it: each variant compiled (torch.compile(backend="fxmem"), Inductor
    # generating the code), beside plain torch.compile; peak = the weights the graph reads + the
    # batch + the forward's measured peak (fxmem.fit.measure_inference, as fit estimates it)
    from fxmem.fit import measure_inference

    model = copy.deepcopy(base).eval()
    with torch.no_grad():
        ref = model(idx)
    first_report = explain(model, idx, mode="inference", **inference_variants[0][1])

    def rel_error(fn) -> float:
        with torch.no_grad():
            got = fn(idx)
        return float((got.float() - ref.float()).abs().max() / ref.float().abs().max())

    rows = []
    for label, opts in [("eager fp32", None), (TORCH_COMPILE, None), *inference_variants]:
        bar.set_description(f"inference: {label}")
        torch._dynamo.reset()
        fn = (model if label == "eager fp32" else torch.compile(model) if opts is None
              else torch.compile(model, backend="fxmem", options=opts))
        measured = measure_inference(model, idx, options=opts, steps=5, compiled=fn)
        rows.append((label, measured, rel_error(fn)))
        bar.update()
    anchor = rows[1][1]  # torch.compile's
    inference_table = [[label, _mib(m["weights_bytes"]), f"{error:.2e}", _mib(m["peak_bytes"]),
                        f"{m['peak_bytes'] / anchor['peak_bytes']:.2f}", f"{m['step_s'] / anchor['step_s']:.2f}"]
                       for label, m, error in rows]

    # -- training ----------------------------------------------------------------------------
    bar.set_description("training: fxmem.explain")
    train_report = explain(copy.deepcopy(base).train(), idx, targets, mode="training", **training_opts)
    bar.update()
    results = []
    for name, make in training_contenders:
        bar.set_description(f"training: {name}")
        torch._dynamo.reset()
        results.append(measure_training(name, copy.deepcopy(base).train(), make, (idx, targets), steps=ns.steps))
        bar.update()
    bar.close()

    print()
    print(first_report)
    print()
    print(train_report)
    print("\ninference (each compiled; peak measured from outside: weights + batch + the forward's peak; "
          "error = max |Δ logits| / max |logits| against fp32 eager):")
    print(_table(["", "params MiB", "rel. error", "peak MiB", "peak × torch.compile", "latency × torch.compile"],
                 inference_table))
    print(f"\ntraining ({ns.steps} steps, SGD; peak measured from outside (allocator events), saved activations "
          "with saved_tensors_hooks):")
    eager = results[0]
    inductor = next(r for r in results if r.name == TORCH_COMPILE)
    print(_table(
        ["", "peak MiB", "peak × eager", "peak × torch.compile", "saved MiB", "saved × eager", "params MiB",
         "compile s", "step × eager", "step × torch.compile", "final loss"],
        [[r.name, _mib(r.peak_bytes), f"{r.peak_bytes / max(eager.peak_bytes, 1):.2f}",
          f"{r.peak_bytes / max(inductor.peak_bytes, 1):.2f}", _mib(r.saved_bytes),
          f"{r.saved_bytes / max(eager.saved_bytes, 1):.2f}", _mib(r.param_bytes),
          f"{r.compile_s:.2f}", f"{r.step_s / eager.step_s:.2f}", f"{r.step_s / inductor.step_s:.2f}", f"{r.loss:.4f}"]
         for r in results],
    ))
    if not training_opts:
        _demo_fit(base, idx, targets, eager.peak_bytes)
    return 0


def _demo_fit(base: torch.nn.Module, idx: torch.Tensor, targets: torch.Tensor, eager_peak: int) -> None:
    """One ``fxmem.fit``: the loss-only training step under 60% of eager's whole step
    (parameters + batch + the measured peak above them) — or, where nothing fits that (a model so
    small that its parameters are most of it), the tightest limit fit can answer — then the
    choice compiled and measured."""
    from fxmem.fit import FitError, fit, measure_options

    model = _LossOnly(copy.deepcopy(base)).train()
    whole = module_parameter_bytes(model) + idx.numel() * idx.element_size() * 2 + eager_peak
    limit = int(0.6 * whole)
    print(f"\nfxmem.fit(step, idx, targets, memory={limit}, budgets=(0.5, 0.0)) — 60% of eager's whole step "
          f"({_mib(whole)} MiB); remat off / free / 0.5 / 0.0 × chunk on / off:")
    # two budgets beside remat off and free recompute (each costs a min-cut solve); traced once,
    # at a limit everything fits, then chosen for the demo's limit without tracing again
    every = fit(model, idx, targets, memory=10 * whole, budgets=(0.5, 0.0))
    try:
        result = every.refit(limit)
    except FitError as err:
        print(err)
        smallest = min(c.estimate for c in every.candidates if not c.error)
        limit = int(smallest / (1 - every.headroom)) + 1
        print(f"\nthe tightest limit fit can answer instead: memory={limit}")
        result = every.refit(limit)
    print(result)
    torch._dynamo.reset()
    measured = measure_options(model, idx, targets, options=result.options, steps=1)
    print(f"compiled with {result.options!r} and measured: whole step {_mib(measured['peak_bytes'])} MiB "
          f"(estimate {_mib(result.estimate)} MiB, limit {_mib(limit)} MiB)")


def _load_target(spec: str) -> torch.nn.Module:
    if ":" not in spec:
        raise SystemExit(f"fxmem explain: expected module:Class (e.g. mypkg.models:Net), got {spec!r}")
    module_name, attr = spec.split(":", 1)
    obj = getattr(importlib.import_module(module_name), attr)
    model = obj() if not isinstance(obj, torch.nn.Module) else obj
    if not isinstance(model, torch.nn.Module):
        raise SystemExit(f"fxmem explain: {spec} did not give a torch.nn.Module (got {type(model).__name__})")
    return model


def explain_cmd(ns: argparse.Namespace) -> int:
    inference_opts, training_opts = _options_from(ns)
    if ns.target == "builtin":
        cfg = GPTConfig(n_layer=2, d_model=64, n_head=4, block_size=32, vocab_size=256)
        model, inputs = GPT(cfg), (example_batch(cfg, batch=2),)
    else:
        model, inputs = _target_inputs(ns, "explain")
    mode = ns.mode
    if mode == "inference":
        model.eval()
    report = explain(model, *inputs, mode=mode, **(inference_opts if mode == "inference" else training_opts))
    print(report)
    if ns.html:
        print(f"\nwrote {report.to_html(ns.html)}")
    if ns.show_graph:
        print(report.graphs.get(ns.show_graph, f"no graph named {ns.show_graph!r}; have {sorted(report.graphs)}"))
    return 0


def _target_inputs(ns: argparse.Namespace, command: str) -> tuple[torch.nn.Module, tuple]:
    """The model of ``module:Class`` and its example inputs (``example_inputs()`` or ``--shape``)."""
    model = _load_target(ns.target)
    if hasattr(model, "example_inputs"):
        return model, tuple(model.example_inputs())
    if ns.shape:
        shape = tuple(int(s) for s in ns.shape.split(","))
        return model, (torch.randint(0, ns.high, shape) if ns.dtype == "int64" else torch.randn(shape),)
    raise SystemExit(f"fxmem {command}: give --shape (and --dtype) or define example_inputs() on the model")


def fit_cmd(ns: argparse.Namespace) -> int:
    """``fxmem fit module:Class --memory 2GiB``: the fastest options that fit, and the candidates tried."""
    from fxmem.fit import FitError, fit

    model, inputs = _target_inputs(ns, "fit")
    model.train(ns.mode == "training")
    try:
        result = fit(model, *inputs, memory=ns.memory, mode=ns.mode, allow=ns.allow or (),
                     optimizer=ns.optimizer, world_size=ns.world_size)
    except FitError as err:
        print(str(err), file=sys.stderr)
        return 1
    print(result)
    print(f"\ntorch.compile(model, backend='fxmem', options={result.options!r})")
    return 0


def bench(ns: argparse.Namespace) -> int:
    from fxmem.benchmarking import compile_overhead, write_results

    results = compile_overhead(layers=ns.layers, d_model=ns.d_model, seq=ns.seq, batch=ns.batch,
                               backends=ns.backends.split(","), steps=ns.steps)
    print(_table(["backend", "compile s", "compile × eager", "step s", "step × eager"],
                 [[r["backend"], f"{r['compile_s']:.2f}", f"{r['compile_ratio']:.2f}", f"{r['step_s']:.4f}",
                   f"{r['step_ratio']:.2f}"] for r in results["rows"]]))
    if ns.out:
        write_results(results, ns.out)
        print(f"wrote {ns.out}")
    return 0


def _add_option_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--options", help="fxmem options as JSON, e.g. '{\"int8\": \"weight_only\"}'")
    p.add_argument("--precision", choices=["fp16", "bf16"])
    p.add_argument("--int8", choices=["weight_only", "dynamic"])
    p.add_argument("--prune", type=float, metavar="RATIO")
    p.add_argument("--remat-budget", type=float, metavar="B")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fxmem", description="Graph-level memory passes for PyTorch")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="compile the built-in GPT for inference and training; print the report")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_option_flags(p)
    p.set_defaults(func=demo)
    p = sub.add_parser("explain", help="run explain on the built-in model or on module:Class")
    p.add_argument("target", nargs="?", default="builtin", help="'builtin' or module:Class")
    p.add_argument("--mode", choices=["inference", "training"], default="inference")
    p.add_argument("--shape", help="input shape, e.g. 2,16")
    p.add_argument("--dtype", choices=["float32", "int64"], default="float32")
    p.add_argument("--high", type=int, default=100, help="upper bound of int64 inputs")
    p.add_argument("--html", help="also write the HTML report here")
    p.add_argument("--show-graph", metavar="PASS", help="print the graph after this pass")
    _add_option_flags(p)
    p.set_defaults(func=explain_cmd)
    p = sub.add_parser("fit", help="the fastest options whose estimated peak fits a memory limit")
    p.add_argument("target", help="module:Class (constructed without arguments), or module:instance")
    p.add_argument("--memory", required=True, help="the limit: bytes, or e.g. 2GiB, 500MB")
    p.add_argument("--mode", choices=["training", "inference"], default="training")
    p.add_argument("--allow", nargs="*", choices=["precision", "int8", "quantize", "prune"],
                   help="options that change numerics fit may choose")
    p.add_argument("--optimizer", choices=["sgd", "momentum", "adam", "adamw"], default=None,
                   help="count this optimizer's state (training)")
    p.add_argument("--world-size", type=int, default=None, help="per-rank estimate with FSDP over this many ranks")
    p.add_argument("--shape", help="input shape, e.g. 2,16")
    p.add_argument("--dtype", choices=["float32", "int64"], default="float32")
    p.add_argument("--high", type=int, default=100, help="upper bound of int64 inputs")
    p.set_defaults(func=fit_cmd)
    p = sub.add_parser("bench", help="compile and step time: eager, aot_eager, inductor, fxmem")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--backends", default="eager,aot_eager,inductor,fxmem")
    p.add_argument("--out", help="write the JSON here (and a PNG beside it)")
    p.set_defaults(func=bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    try:
        return ns.func(ns)
    except OptionError as err:
        print(f"fxmem: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
