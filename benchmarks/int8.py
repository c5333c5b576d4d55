"""Question: what do fxmem's int8 rewrites cost in accuracy and buy in memory, next to torchao?

One run, side by side, on HF GPT-2 (tied ``wte``/``lm_head``), Llama (GQA) and BERT built from
small configs with random weights (no downloads):

* parameter bytes: eager fp32 vs fxmem int8 (weight-only per channel, per group, dynamic) vs
  torchao ``Int8WeightOnlyConfig`` where torchao imports; and the Linear weights alone
  (target: 0.25× fp32 + scales);
* output error against fp32: relative L2 error, max abs error, SQNR (dB) of the logits /
  hidden states; and fxmem vs torchao (how close the two int8 weight-only results are);
* CPU latency (1 thread) of the ATen path vs fp32, as ratios: whole models (fxmem fp32 graph vs
  fxmem int8 graph, same executor; and vs eager), at M = seq (prefill) and at one token, plus
  single linears at decode shapes. Absolute GPU figures need a GPU: none here.

Run: ``PYTHONPATH=. python benchmarks/int8.py`` (``--full --name int8_full`` for bigger configs). torchao is
optional: ``pip install torchao`` (or ``--torchao-path DIR`` for a throwaway ``pip --target``).
Writes ``benchmarks/results/<name>.json`` and ``<name>.png``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
import warnings

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import fxmem  # noqa: E402
from fxmem.analysis import module_parameter_bytes  # noqa: E402
from fxmem.kernels import int8_matmul  # noqa: E402

RESULTS = os.path.join(ROOT, "benchmarks", "results")


def load_torchao(path: str | None):
    if path:
        sys.path.insert(0, path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import torchao
            from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, quantize_
        return {"version": torchao.__version__, "quantize_": quantize_, "weight_only": Int8WeightOnlyConfig,
                "dynamic": Int8DynamicActivationInt8WeightConfig}
    except Exception as exc:  # noqa: BLE001 - any import failure means "not available"
        return {"error": f"{type(exc).__name__}: {exc}"}


# -- models ------------------------------------------------------------------------------------


def build_models(full: bool, seq: int):
    from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    d, layers, vocab = (512, 4, 8192) if full else (256, 2, 2048)
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=layers, n_embd=d, n_head=8, vocab_size=vocab, n_positions=128,
                                      bos_token_id=0, eos_token_id=0, attn_implementation="eager")).eval()
    llama = LlamaForCausalLM(LlamaConfig(hidden_size=d, intermediate_size=int(d * 2.75), num_hidden_layers=layers,
                                         num_attention_heads=8, num_key_value_heads=2, vocab_size=vocab,
                                         max_position_embeddings=128, bos_token_id=0, eos_token_id=0, pad_token_id=0,
                                         attn_implementation="eager")).eval()
    bert = BertModel(BertConfig(hidden_size=d, intermediate_size=4 * d, num_hidden_layers=layers, num_attention_heads=8,
                                vocab_size=vocab, max_position_embeddings=128, attn_implementation="eager"),
                     add_pooling_layer=False).eval()

    def inputs(s):
        ids = torch.randint(1, vocab, (1, s))
        return ids, {"attention_mask": torch.ones(1, s, dtype=torch.long)}

    def ids_only(s):
        # BERT's mask builder branches on mask.all() (data-dependent: not traceable); no mask = all ones
        return torch.randint(1, vocab, (1, s)), {}

    return {
        "gpt2 (tied wte/lm_head)": (gpt2, inputs, {"use_cache": False}),
        "llama (GQA 8/2)": (llama, inputs, {"use_cache": False}),
        "bert": (bert, ids_only, {}),
    }


def first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits") and out.logits is not None:
        return out.logits
    if hasattr(out, "last_hidden_state"):
        return out.last_hidden_state
    return out[0]


# -- measurements ------------------------------------------------------------------------------


def errors(out: torch.Tensor, ref: torch.Tensor) -> dict:
    out, ref = out.double(), ref.double()
    return {"rel_l2": float((out - ref).norm() / ref.norm()), "max_abs": float((out - ref).abs().max()),
            "sqnr_db": int8_matmul.sqnr_db(ref, out)}


def tensor_storage_bytes(t: torch.Tensor) -> int:
    """Bytes of a tensor, or of the inner tensors of a tensor subclass (torchao's Int8Tensor)."""
    if type(t) not in (torch.Tensor, torch.nn.Parameter) and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_storage_bytes(getattr(t, n)) for n in names)
    return t.untyped_storage().nbytes()


def _key(t: torch.Tensor):
    inner = t.data if isinstance(t, torch.nn.Parameter) else t
    return inner.untyped_storage().data_ptr() if type(inner) is torch.Tensor else id(t)


def subclass_param_bytes(model: torch.nn.Module) -> int:
    seen = {}
    for t in list(model.parameters()) + list(model.buffers()):
        seen[_key(t)] = tensor_storage_bytes(t.data if isinstance(t, torch.nn.Parameter) else t)
    return sum(seen.values())


def linear_weight_bytes(model: torch.nn.Module) -> int:
    seen = {}
    for m in model.modules():
        w = getattr(m, "weight", None)
        if isinstance(w, torch.Tensor) and w.dim() == 2 and type(m).__name__ in ("Linear", "Conv1D"):
            seen[_key(w)] = tensor_storage_bytes(w.data if isinstance(w, torch.nn.Parameter) else w)
    return sum(seen.values())


def timeit(fn, repeat: int) -> float:
    with torch.no_grad():
        fn()
        fn()
        times = []
        for _ in range(repeat):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    # the minimum: the machine is shared (2 cores, several users); other users only add time
    return min(times)


def timeit_round_robin(fns: dict, repeat: int) -> dict:
    """The minimum time of each callable, measured in turns (one call of each per round)."""
    best = {k: float("inf") for k in fns}
    with torch.no_grad():
        for fn in fns.values():
            fn()
        for _ in range(repeat):
            for k, fn in fns.items():
                t = time.perf_counter()
                fn()
                best[k] = min(best[k], time.perf_counter() - t)
    return best


def int8_stats(report) -> dict:
    rec = next(r for r in report.records if r.name == "int8")
    return rec.stats


def bench_model(name, model, make_inputs, extra_kwargs, seq, repeat, tao) -> dict:
    ids, kw = make_inputs(seq)
    kwargs = {**kw, **extra_kwargs}
    with torch.no_grad():
        ref = first_tensor(model(ids, **kwargs))
    row: dict = {"model": name, "seq": seq, "eager_param_bytes": module_parameter_bytes(model),
                 "eager_linear_weight_bytes": linear_weight_bytes(model), "variants": {}}
    modules = {}
    fp32_module = fxmem.optimize(model, ids, kwargs=kwargs)  # same graph executor, no int8: the latency baseline
    modules["fxmem fp32 graph"] = fp32_module
    variants = {
        "fxmem weight_only": "weight_only",
        "fxmem weight_only per_group(64)": {"granularity": "per_group", "group_size": 64},
        "fxmem dynamic": "dynamic",
    }
    outs = {}
    for vname, opt in variants.items():
        report = fxmem.explain(model, ids, kwargs=kwargs, int8=opt, strict=True)
        stats = int8_stats(report)
        rec = next(r for r in report.records if r.name == "int8")
        with torch.no_grad():
            out = first_tensor(report.module(ids, **kwargs))
        outs[vname] = out
        modules[vname] = report.module
        row["variants"][vname] = {
            "param_bytes": rec.param_bytes, "param_ratio": rec.param_bytes / row["eager_param_bytes"],
            "int8_weight_bytes_before": stats["weight_bytes_before"], "int8_weight_bytes_after": stats["weight_bytes_after"],
            "int8_weight_ratio": stats["weight_bytes_after"] / stats["weight_bytes_before"],
            "layers_rewritten": stats["layers_rewritten"], "skipped": stats["skipped"],
            "min_layer_sqnr_db": min(r["sqnr_db"] for r in stats["layers"]),
            "tied_rows": [r for r in stats["layers"] if r["uses"] > 1],
            "kernels": [k.name for k in report.kernels],
            **errors(out, ref),
        }
    if "error" not in tao:
        for vname, cfg in (("torchao Int8WeightOnlyConfig", tao["weight_only"]()),
                           ("torchao Int8DynamicActivationInt8WeightConfig", tao["dynamic"]())):
            qmodel = copy.deepcopy(model)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                tao["quantize_"](qmodel, cfg)
            with torch.no_grad():
                out = first_tensor(qmodel(ids, **kwargs))
            outs[vname] = out
            modules[vname] = qmodel
            pbytes = subclass_param_bytes(qmodel)
            quantized = [n for n, mod in qmodel.named_modules()
                         if isinstance(getattr(mod, "weight", None), torch.Tensor)
                         and type(mod.weight.data if isinstance(mod.weight, torch.nn.Parameter) else mod.weight) not in (torch.Tensor,)]
            row["variants"][vname] = {"param_bytes": pbytes, "param_ratio": pbytes / row["eager_param_bytes"],
                                      "layers_rewritten": len(quantized),
                                      "int8_weight_ratio": linear_weight_bytes(qmodel) / row["eager_linear_weight_bytes"],
                                      **errors(out, ref)}
        ao = outs["torchao Int8WeightOnlyConfig"]
        row["fxmem_vs_torchao_weight_only"] = errors(outs["fxmem weight_only"], ao)
    # CPU latency (1 thread), as ratios to fp32; round-robin so that load drift hits all alike
    calls = {"eager fp32": model, **modules}
    row["latency_s"] = timeit_round_robin({k: (lambda m=m: m(ids, **kwargs)) for k, m in calls.items()}, repeat)
    base = row["latency_s"]["fxmem fp32 graph"]
    row["latency_ratio_vs_fp32_graph"] = {k: v / base for k, v in row["latency_s"].items()}
    return row


def bench_linears(repeat: int) -> list[dict]:
    """Single linears at decode shapes: fp32 mm vs the op's ATen paths (1 thread)."""
    rows = []
    for n, k in ((1024, 1024), (2816, 1024), (1024, 2816)):
        w = torch.randn(n, k)
        q, s = int8_matmul.quantize_weight(w)
        qg, sg = int8_matmul.quantize_weight(w, 64)
        for m in (1, 16, 128):
            x = torch.randn(m, k)
            fp32 = timeit(lambda: torch.mm(x, w.t()), repeat)
            wo = timeit(lambda: torch.ops.fxmem.int8_linear(x, q, s, None, "weight_only"), repeat)
            wg = timeit(lambda: torch.ops.fxmem.int8_linear(x, qg, sg, None, "weight_only"), repeat)
            dyn = timeit(lambda: torch.ops.fxmem.int8_linear(x, q, s, None, "dynamic"), repeat)
            xb, wb = x.bfloat16(), w.bfloat16()
            bf16 = timeit(lambda: torch.mm(xb, wb.t()), repeat)
            wob = timeit(lambda: torch.ops.fxmem.int8_linear(xb, q, s, None, "weight_only"), repeat)  # _weight_int8pack_mm
            rows.append({"M": m, "N": n, "K": k, "fp32_mm_s": fp32,
                         "weight_only_ratio": wo / fp32, "weight_only_per_group_ratio": wg / fp32, "dynamic_ratio": dyn / fp32,
                         "bf16_mm_s": bf16, "bf16_weight_only_ratio_vs_bf16_mm": wob / bf16})
    return rows


def bench_gpu() -> list[dict]:
    """Where a GPU is lent: the Triton kernel vs bf16 cuBLAS at decode shapes (target >= 1.4x at M=1)."""
    from triton.testing import do_bench

    rows = []
    for n, k in ((4096, 4096), (11008, 4096), (4096, 11008)):
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        q, s = int8_matmul.quantize_weight(w)
        for m in (1, 2, 4, 8, 16):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            cublas = do_bench(lambda: torch.mm(x, w.t()))
            kernel = do_bench(lambda: int8_matmul.int8_weight_only_matmul(x, q, s))
            rows.append({"M": m, "N": n, "K": k, "bf16_cublas_ms": cublas, "int8_triton_ms": kernel, "speedup": cublas / kernel})
    return rows


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [r["model"] for r in result["models"]]
    variants = [v for v in result["models"][0]["variants"]]
    fig, axes = plt.subplots(1, 3, figsize=(17, 5))
    width = 0.8 / len(variants)
    for i, v in enumerate(variants):
        xs = [j + i * width for j in range(len(models))]
        axes[0].bar(xs, [r["variants"][v]["param_ratio"] for r in result["models"]], width, label=v)
        axes[1].bar(xs, [r["variants"][v]["sqnr_db"] for r in result["models"]], width, label=v)
        axes[2].bar(xs, [r["latency_ratio_vs_fp32_graph"].get(v, float("nan")) for r in result["models"]], width, label=v)
    for ax, title in zip(axes, ("parameter bytes / fp32 eager", "output SQNR vs fp32 (dB, higher is better)",
                                f"CPU latency / fxmem fp32 graph (1 thread, seq {result['seq']})")):
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(models))])
        ax.set_xticklabels(models, fontsize=8)
        ax.set_title(title, fontsize=10)
    axes[0].axhline(0.25, color="gray", ls="--", lw=0.8)
    axes[2].axhline(1.0, color="gray", ls="--", lw=0.8)
    axes[0].legend(fontsize=7)
    fig.suptitle("fxmem int8 vs fp32 and torchao (random-weight small configs, CPU)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="bigger configs (d=512, 4 layers, vocab 8192)")
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--name", default="int8", help="output name under benchmarks/results/ (default int8)")
    ap.add_argument("--torchao-path", default=None, help="a directory holding torchao (pip install --target DIR torchao)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    tao = load_torchao(args.torchao_path)
    result = {"question": "int8 memory / accuracy / CPU latency vs fp32 and torchao", "command": " ".join(sys.argv),
              "torch": torch.__version__, "machine": platform.processor() or platform.machine(), "threads": 1,
              "torchao": tao.get("version", tao.get("error")), "seq": args.seq,
              "gpu": "none lent: the Triton kernel's GPU timing target (>= 1.4x bf16 cuBLAS at M=1) is unmeasured",
              "models": [], "models_decode": [], "linears": []}
    for name, (model, make_inputs, extra) in build_models(args.full, args.seq).items():
        print(f"[int8] {name} seq={args.seq}", flush=True)
        result["models"].append(bench_model(name, model, make_inputs, extra, args.seq, args.repeat, tao))
        print(f"[int8] {name} seq=1", flush=True)
        result["models_decode"].append(bench_model(name, model, make_inputs, extra, 1, args.repeat, tao))
    print("[int8] linears", flush=True)
    result["linears"] = bench_linears(args.repeat)
    if torch.cuda.is_available():
        result["gpu"] = {"device": torch.cuda.get_device_name(), "decode": bench_gpu()}
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, f"{args.name}.json"), "w") as f:
        json.dump(result, f, indent=1, default=str)
    plot(result, os.path.join(RESULTS, f"{args.name}.png"))
    for r in result["models"] + result["models_decode"]:
        print(r["model"], "seq", r["seq"])
        for v, d in r["variants"].items():
            print(f"  {v:48s} params {d['param_ratio']:.3f}x  sqnr {d['sqnr_db']:.1f} dB  rel {d['rel_l2']:.4f}  "
                  f"latency {r['latency_ratio_vs_fp32_graph'].get(v, float('nan')):.2f}x")
        if "fxmem_vs_torchao_weight_only" in r:
            print("  fxmem vs torchao weight-only:", r["fxmem_vs_torchao_weight_only"])
    for r in result["linears"]:
        print(r)


if __name__ == "__main__":
    main()
