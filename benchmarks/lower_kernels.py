"""Question: what does ``lower`` fuse, is it exact, and how does it compare with Inductor?

For a fixed suite — an unfused softmax chain, an unfused layer norm chain, a GELU chain,
softmax → layer_norm → relu, a GPT block's forward and backward graphs — and a few Hugging Face
models built from small configs, this runs side by side in one process:

* eager PyTorch (the reference),
* fxmem with ``lower=True`` (generated Triton kernels, run by Triton's interpreter on this CPU),
* TorchInductor (the anchor): its Triton CPU backend needs a Triton CPU driver, which this
  machine does not have (the attempt and its error are recorded); its C++ backend runs, so its
  fused C++ kernels (``cpp_fused_*``, the same scheduler's fusion decisions) are counted instead.

It records the numerics of every generated kernel against eager (max abs error; fp32 target
≤ 1e-5), the number of kernels each compiler emits, and the bytes of memory traffic and of
intermediates fusion removes (fxmem's cost model: :func:`fxmem.analysis.node_bytes_moved`).
Kernel speed is NOT measured: the interpreter runs kernels in NumPy, and no GPU is lent; the GPU
targets (fused softmax / layer_norm ≥ 3× the unfused eager chain and ≥ 0.9× Inductor) stay
unmeasured here.

    PYTHONPATH=. python benchmarks/lower_kernels.py            # --quick (default) suite, a few minutes
    PYTHONPATH=. python benchmarks/lower_kernels.py --no-inductor --no-hf

Writes ``benchmarks/results/kernels.json`` and ``benchmarks/results/kernels.png``.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is first imported (Dynamo imports it)

import argparse  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import fxmem  # noqa: E402
from fxmem.backend import FxmemBackend  # noqa: E402
from fxmem.config import parse_options  # noqa: E402
from fxmem.kernels import codegen  # noqa: E402
from fxmem.models.gpt import Block, GPTConfig  # noqa: E402


class Chain(nn.Module):
    def __init__(self, fn, d: int):
        super().__init__()
        self.fn = fn
        self.weight = nn.Parameter(torch.randn(d))
        self.bias = nn.Parameter(torch.randn(d))

    def forward(self, x):
        return self.fn(self, x)


def unfused_softmax(m, x):
    # the Triton tutorial's naive softmax: max, subtract, exp, sum, divide — 4 intermediates
    e = torch.exp(x - x.amax(-1, keepdim=True))
    return e / e.sum(-1, keepdim=True)


def unfused_layer_norm(m, x):
    mean = x.mean(-1, keepdim=True)
    xc = x - mean
    var = (xc * xc).mean(-1, keepdim=True)
    return xc * torch.rsqrt(var + 1e-5) * m.weight + m.bias


def gelu_chain(m, x):
    return F.gelu(x + m.bias) * m.weight + 1.0


def softmax_layer_norm_relu(m, x):
    return torch.relu(F.layer_norm(torch.softmax(x, -1), (x.shape[-1],), m.weight, m.bias))


def suite(quick: bool):
    # quick: [8, 64, 64] — a batch of attention-score rows; full: [32, 128, 256]
    shape = (8, 64, 64) if quick else (32, 128, 256)
    d = shape[-1]
    x = torch.randn(*shape)
    return [
        ("softmax", Chain(unfused_softmax, d), x),
        ("layer_norm", Chain(unfused_layer_norm, d), x),
        ("gelu_chain", Chain(gelu_chain, d), x),
        ("softmax_layer_norm_relu", Chain(softmax_layer_norm_relu, d), x),
    ]


def _max_err(a, b) -> float:
    return float((a.detach() - b.detach()).abs().max())


def fxmem_inference(model, x) -> dict:
    with torch.no_grad():
        start = time.perf_counter()
        report = fxmem.explain(model, x, lower=True, strict=True)
        compile_s = time.perf_counter() - start
        out = report.module(x)
        ref = model(x)
    rec = next(r for r in report.records if r.name == "lower")
    return {
        "kernels": len(report.kernels),
        "kernel_names": [k.name for k in report.kernels],
        "forms": [r["form"] for r in rec.stats.get("regions", [])],
        "nodes_replaced": [k.nodes_replaced for k in report.kernels],
        "traffic_bytes_saved": rec.stats.get("traffic_bytes_saved", 0),
        "intermediate_bytes_eliminated": rec.stats.get("intermediate_bytes", 0),
        "max_abs_err": _max_err(out, ref),
        "compile_s": round(compile_s, 2),
        "regions": rec.stats.get("regions", []),
    }


def _count_cpp(codes: list[str]) -> list[int]:
    return [len(set(re.findall(r"^(cpp_fused_\w+) = async_compile", c, flags=re.M))) for c in codes]


def _count_triton(codes: list[str]) -> list[int]:
    return [len(set(re.findall(r"def (triton_(?:poi|red|per)_\w+)\(", c))) for c in codes]


def inductor(fn, *args, backend: str) -> dict:
    import torch._inductor.config as ic
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    old = ic.cpu_backend
    ic.cpu_backend = backend
    try:
        start = time.perf_counter()
        _, codes = run_and_get_code(fn, *args)
        counts = _count_cpp(codes) if backend == "cpp" else _count_triton(codes)
        return {"backend": backend, "kernels_per_graph": counts, "kernels": sum(counts),
                "compile_s": round(time.perf_counter() - start, 2)}
    except Exception as exc:  # noqa: BLE001 - record why the anchor could not run
        return {"backend": backend, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
    finally:
        ic.cpu_backend = old
        torch._dynamo.reset()


def _loss(out: torch.Tensor) -> torch.Tensor:
    # a fixed non-uniform weighting (as fxmem.testing.assert_equivalent): gradients of order 1
    w = torch.linspace(0.5, 1.5, out.numel()).view(out.shape)
    return (out * w).sum()


def gqa_training() -> dict:
    """The 2-layer GQA GPT sample (embeddings, 2 blocks, tied head) trained one step."""
    from fxmem.testing import sample

    s = sample("gpt_gqa")
    model, args = s.model, s.args
    _loss(model(*args)).backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    backend = FxmemBackend(parse_options({"lower": True, "codegen": "eager", "strict": True}))
    _loss(torch.compile(model, backend=backend)(*args)).backward()
    errs = {n: _max_err(p.grad, ref[n]) for n, p in model.named_parameters()}
    worst = max(errs, key=errs.get)
    torch._dynamo.reset()
    return {"kernels": len(backend.recorder.kernels), "max_abs_err_grad": errs[worst], "worst_param": worst,
            "worst_param_grad_scale": float(ref[worst].abs().max()),
            "max_abs_err_grad_over_global_grad_scale": errs[worst] / max(float(g.abs().max()) for g in ref.values())}


def gpt_block_training(quick: bool) -> tuple[dict, nn.Module, torch.Tensor]:
    cfg = GPTConfig(d_model=64, n_head=4, block_size=16, n_layer=1, vocab_size=128) if quick else \
        GPTConfig(d_model=128, n_head=4, block_size=64, n_layer=1, vocab_size=128)
    torch.manual_seed(0)
    block = Block(cfg)
    x = torch.randn(2, cfg.block_size, cfg.d_model)
    ref_out = block(x)
    _loss(ref_out).backward()
    ref_grads = {n: p.grad.clone() for n, p in block.named_parameters()}
    block.zero_grad()
    backend = FxmemBackend(parse_options({"lower": True, "codegen": "eager", "strict": True}))
    compiled = torch.compile(block, backend=backend)
    start = time.perf_counter()
    out = compiled(x)
    _loss(out).backward()
    elapsed = time.perf_counter() - start
    grads = {n: p.grad.clone() for n, p in block.named_parameters()}
    block.zero_grad()
    per_graph: dict[str, dict] = {}
    for rec in backend.recorder.records:
        if rec.name == "lower":
            stage = rec.graph.split("#")[0]
            per_graph[stage] = {"kernels": rec.stats.get("lowered", 0), "traffic_bytes_saved": rec.stats.get("traffic_bytes_saved", 0),
                                "intermediate_bytes_eliminated": rec.stats.get("intermediate_bytes", 0),
                                "regions": rec.stats.get("regions", [])}
    grad_err = max(_max_err(grads[n], ref_grads[n]) for n in ref_grads)
    grad_scale = max(float(g.abs().max()) for g in ref_grads.values())
    result = {
        "config": {"d_model": cfg.d_model, "n_head": cfg.n_head, "T": cfg.block_size, "batch": 2},
        "forward": per_graph.get("forward", {}), "backward": per_graph.get("backward", {}),
        "max_abs_err_out": _max_err(out, ref_out), "max_abs_err_grad": grad_err, "grad_scale": grad_scale,
        "run_s": round(elapsed, 2),
    }
    torch._dynamo.reset()
    return result, block, x


def hf_models() -> list[dict]:
    try:
        import transformers
    except ImportError:
        return [{"error": "transformers is not installed"}]
    out = []
    builds = {
        "GPT2LMHeadModel": lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
            n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=16, attn_implementation="eager")),
        "LlamaForCausalLM(GQA)": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
            num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=64, max_position_embeddings=16, attn_implementation="eager")),
        "BertModel": lambda: transformers.BertModel(transformers.BertConfig(
            num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=2, vocab_size=64,
            max_position_embeddings=16, attn_implementation="eager")),
    }
    for name, build in builds.items():
        torch.manual_seed(0)
        try:
            model = build().eval()
            ids = torch.randint(0, 64, (1, 8))
            kwargs = {"input_ids": ids} if name == "BertModel" else {"input_ids": ids, "use_cache": False}
            # the torch.compile front end (tests/passes/test_lower.py covers fxmem.explain)
            backend = FxmemBackend(parse_options({"lower": True, "codegen": "eager", "strict": True}))
            with torch.no_grad():
                ref = model(**kwargs)[0]
                got = torch.compile(model, backend=backend)(**kwargs)[0]
            kernels = backend.recorder.kernels
            out.append({"model": name, "front_end": "torch.compile", "kernels": len(kernels),
                        "max_abs_err": _max_err(got, ref), "nodes_replaced": [k.nodes_replaced for k in kernels]})
        except Exception as exc:  # noqa: BLE001 - a model that fails is recorded, not hidden
            out.append({"model": name, "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
        torch._dynamo.reset()
    return out


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, fx, ind, unf, fus = [], [], [], [], []
    for case in results["suite"]:
        names.append(case["name"])
        fx.append(case["fxmem"]["kernels"])
        ind.append(case.get("inductor_cpp", {}).get("kernels", 0) or 0)
        unf.append(case["bytes_unfused"] / 1024)
        fus.append(case["bytes_fused"] / 1024)
    gpt = results["gpt_block"]
    for stage in ("forward", "backward"):
        names.append(f"gpt_block {stage}")
        fx.append(gpt[stage].get("kernels", 0))
        counts = gpt.get("inductor_cpp", {}).get("kernels_per_graph", [])
        ind.append(counts[0 if stage == "forward" else 1] if len(counts) > 1 else 0)
        unf.append(float("nan"))
        fus.append(float("nan"))
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    xs = range(len(names))
    axes[0].bar([i - 0.2 for i in xs], fx, width=0.4, label="fxmem (generated Triton)")
    axes[0].bar([i + 0.2 for i in xs], ind, width=0.4, label="Inductor (C++ backend, cpp_fused_*)")
    axes[0].set_xticks(list(xs), names, rotation=30, ha="right")
    axes[0].set_ylabel("kernels emitted")
    axes[0].legend()
    axes[0].set_title("kernels per graph")
    k = len(results["suite"])
    axes[1].bar([i - 0.2 for i in range(k)], unf[:k], width=0.4, label="unfused eager chain")
    axes[1].bar([i + 0.2 for i in range(k)], fus[:k], width=0.4, label="fxmem fused kernel")
    axes[1].set_xticks(list(range(k)), names[:k], rotation=30, ha="right")
    axes[1].set_ylabel("KiB read + written")
    axes[1].legend()
    axes[1].set_title("memory traffic (cost model), CPU interpreter run")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--full", action="store_true", help="larger shapes (slow under the interpreter)")
    parser.add_argument("--no-inductor", action="store_true")
    parser.add_argument("--no-hf", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "kernels.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    if not codegen.interpreter_enabled() and not torch.cuda.is_available():
        raise SystemExit("needs TRITON_INTERPRET=1 before Triton is imported (or a GPU)")
    quick = not args.full
    results: dict = {"device": "cpu (Triton interpreter)", "torch": torch.__version__, "quick": quick, "suite": []}
    inductor_triton_error = None
    for name, model, x in suite(quick):
        print(f"[kernels] {name} {tuple(x.shape)}", flush=True)
        case = {"name": name, "shape": list(x.shape), "fxmem": fxmem_inference(model, x)}
        case["bytes_unfused"] = sum(r["bytes_unfused"] for r in case["fxmem"]["regions"])
        case["bytes_fused"] = sum(r["bytes_fused"] for r in case["fxmem"]["regions"])
        if not args.no_inductor:
            with torch.no_grad():
                case["inductor_cpp"] = inductor(torch.compile(model, backend="inductor"), x, backend="cpp")
                if inductor_triton_error is None:
                    trial = inductor(torch.compile(model, backend="inductor"), x, backend="triton")
                    inductor_triton_error = trial.get("error", "ran")
        results["suite"].append(case)
    results["inductor_triton_cpu"] = inductor_triton_error
    print("[kernels] gpt block training", flush=True)
    gpt, block, x = gpt_block_training(quick)
    if not args.no_inductor:
        def step(inp):
            out = compiled(inp)
            _loss(out).backward()
            return out
        compiled = torch.compile(block, backend="inductor")
        gpt["inductor_cpp"] = inductor(step, x, backend="cpp")
        block.zero_grad()
    results["gpt_block"] = gpt
    print("[kernels] gpt_gqa sample training", flush=True)
    results["gpt_gqa_training"] = gqa_training()
    if not args.no_hf:
        print("[kernels] hf models", flush=True)
        results["hf_models"] = hf_models()
    results["gpu"] = ("not measured: no GPU lent; targets fused softmax/layer_norm >= 3x unfused eager chain "
                      "and >= 0.9x Inductor, GB/s vs device bandwidth")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str))
    plot(results, out.with_suffix(".png"))
    print(json.dumps({c["name"]: {"fxmem": c["fxmem"]["kernels"], "inductor_cpp": c.get("inductor_cpp", {}).get("kernels"),
                                  "err": c["fxmem"]["max_abs_err"], "saved": c["fxmem"]["traffic_bytes_saved"]}
                      for c in results["suite"]}, indent=1))
    print(json.dumps({k: v for k, v in gpt.items() if k not in ("forward", "backward")}, indent=1, default=str))


if __name__ == "__main__":
    main()
