"""How do fxmem's precision and tie_weights passes compare with torch.autocast?

For HF GPT2, Llama (GQA) and BERT built from small configs with random weights (no download), one
run measures, side by side:

* fp32 eager (the reference), CPU ``torch.autocast`` with bf16 and with fp16 (CPU autocast's op
  lists; the model's parameters stay fp32 → 1× bytes), and fxmem ``precision`` bf16 / fp16 with
  ``weights="low"`` (default) and ``weights="autocast"``: parameter bytes of the graph, and the
  output error against fp32 (max |out - ref| / max |ref| on the logits / last hidden state);
* training on GPT2: gradient error of fxmem bf16 (fp32 master weights) and of CPU autocast bf16
  against fp32 gradients;
* the overflow guard on a T5-like feed-forward and on an HF T5 encoder whose ``wo`` outputs
  exceed fp16's range (weights scaled up; the transformers#5651 case);
* tie_weights on GPT2 with an untied copy of ``lm_head`` (``tie_word_embeddings=False``, weight
  copied from ``wte``): bytes before and after, and whether the output is bitwise identical;
* the parameter-byte ratio the two weight policies give at the models' real sizes, computed from
  parameter shapes on the meta device (a projection, not a run).

Writes ``benchmarks/results/precision_tying.json`` and ``precision_tying.png``.
Run: ``PYTHONPATH=. python benchmarks/precision_tying.py`` (about 2-3 minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
import warnings

import torch

from fxmem.analysis.sizes import module_parameter_bytes
from fxmem.testing import recording_backend

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")


def build(name: str, size: str = "small"):
    import transformers as tf

    torch.manual_seed(0)
    if size == "full":
        cfgs = {"gpt2": tf.GPT2Config(), "llama": tf.LlamaConfig(num_key_value_heads=8), "bert": tf.BertConfig()}
    else:
        cfgs = {
            "gpt2": tf.GPT2Config(vocab_size=1024, n_positions=128, n_embd=128, n_layer=2, n_head=4, bos_token_id=0,
                                  eos_token_id=0, attn_implementation="eager"),
            "llama": tf.LlamaConfig(vocab_size=1024, hidden_size=128, intermediate_size=352, num_hidden_layers=2,
                                    num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=128,
                                    attn_implementation="sdpa"),
            "bert": tf.BertConfig(vocab_size=1024, hidden_size=128, intermediate_size=512, num_hidden_layers=2,
                                  num_attention_heads=4, max_position_embeddings=128, attn_implementation="eager"),
        }
    cls = {"gpt2": tf.GPT2LMHeadModel, "llama": tf.LlamaForCausalLM, "bert": tf.BertModel}[name]
    return cls(cfgs[name])


def call(model, name, ids):
    if name == "bert":
        return model(ids).last_hidden_state
    return model(ids, use_cache=False).logits


def rel_err(out, ref) -> float:
    return float((out.double() - ref.double()).abs().max() / ref.double().abs().max())


def run_fxmem(model, name, ids, options):
    backend = recording_backend(strict=True, **options)
    rec = backend.recorder
    torch._dynamo.reset()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = call(torch.compile(model, backend=backend), name, ids)
    torch._dynamo.reset()
    last = [r for r in rec.records if r.stage == "inference"][-1]
    return out, last.param_bytes, rec


def inference_rows(models):
    rows = []
    for name in models:
        model = build(name).eval()
        ids = torch.randint(0, 1024, (2, 32))
        with torch.no_grad():
            ref = call(model, name, ids)
        full = module_parameter_bytes(model)
        rows.append({"model": name, "method": "fp32", "param_bytes": full, "ratio": 1.0, "rel_err": 0.0})
        for label, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
            with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
                out = call(model, name, ids)
            rows.append({"model": name, "method": f"autocast-cpu {label}", "param_bytes": full, "ratio": 1.0,
                         "rel_err": rel_err(out.float(), ref)})
        for label in ("bf16", "fp16"):
            for weights in ("low", "autocast"):
                t = time.perf_counter()
                out, pbytes, rec = run_fxmem(model, name, ids, {"precision": {"dtype": label, "weights": weights}})
                prec = next(r for r in rec.records if r.name == "precision")
                rows.append({"model": name, "method": f"fxmem {label}" + ("" if weights == "low" else " weights=autocast"),
                             "param_bytes": pbytes, "ratio": pbytes / full, "rel_err": rel_err(out, ref),
                             "status": prec.status, "out_dtype": str(out.dtype), "compile_s": time.perf_counter() - t})
        print(*(f"{r['model']:6s} {r['method']:30s} bytes {r['ratio']:.3f}x  rel err {r['rel_err']:.2e}"
                for r in rows if r["model"] == name), sep="\n")
    return rows


def training_row():
    model = build("gpt2").train()
    model.config.dropout = 0.0
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    ids = torch.randint(0, 1024, (2, 32))

    def grads(m, runner):
        for p in m.parameters():
            p.grad = None
        runner(ids).float().pow(2).mean().backward()
        return [p.grad.clone() for p in m.parameters()]

    ref32 = copy.deepcopy(model)
    g32 = grads(ref32, lambda i: call(ref32, "gpt2", i))
    auto = copy.deepcopy(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        gauto = grads(auto, lambda i: call(auto, "gpt2", i))
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=recording_backend(precision="bf16", strict=True))
    gfx = grads(model, lambda i: call(compiled, "gpt2", i))
    torch._dynamo.reset()
    scale = max(float(g.abs().max()) for g in g32)

    def worst(gs):
        return max(float((g - e).abs().max()) for g, e in zip(gs, g32)) / scale

    return {"model": "gpt2", "grad_rel_err_fxmem_bf16": worst(gfx), "grad_rel_err_autocast_cpu_bf16": worst(gauto),
            "param_dtypes": sorted({str(p.dtype) for p in model.parameters()}),
            "grad_dtypes": sorted({str(p.grad.dtype) for p in model.parameters()})}


def overflow_row():
    import torch.nn as nn

    class T5LikeFF(nn.Module):
        def __init__(self, d=64):
            super().__init__()
            self.wi, self.wo, self.norm = nn.Linear(d, 4 * d), nn.Linear(4 * d, d), nn.LayerNorm(d)
            with torch.no_grad():
                self.wo.weight.mul_(50000.0)

        def forward(self, x):
            return self.norm(x + self.wo(torch.relu(self.wi(x))))

    import fxmem

    torch.manual_seed(0)
    model, x = T5LikeFF().eval(), torch.randn(8, 64) * 4
    with torch.no_grad():
        ref = model(x)
        wo_max = float(model.wo(torch.relu(model.wi(x))).abs().max())
    row = {"wo_output_absmax": wo_max}
    for guard in (True, False):
        rep = fxmem.explain(model, x, precision={"dtype": "fp16", "overflow_guard": guard}, strict=True)
        with torch.no_grad():
            out = rep.module(x)
        rec = next(r for r in rep.records if r.name == "precision")
        key = "guard_on" if guard else "guard_off"
        row[key] = {"finite": bool(torch.isfinite(out).all()),
                    "rel_err": rel_err(out, ref) if torch.isfinite(out).all() else float("nan"),
                    "kept": [{k: r[k] for k in ("node", "op", "absmax", "why")} for r in rec.stats["overflow_kept"]]}
    return row


def t5_overflow_row():
    """HF T5 encoder whose ``wo`` projections overflow fp16 (transformers#5651), pass-level.

    The pass is called directly (with the example inputs in its ``PassContext``), once with the
    overflow guard and once without.
    """
    import transformers as tf

    from fxmem.capture import capture_inference
    from fxmem.config import PrecisionConfig
    from fxmem.passes.base import PassContext, shallow_copy
    from fxmem.passes.precision import cast_precision

    torch.manual_seed(0)
    cfg = tf.T5Config(vocab_size=1024, d_model=64, d_kv=16, d_ff=256, num_layers=2, num_heads=4)
    model = tf.T5EncoderModel(cfg).eval()
    with torch.no_grad():
        for block in model.encoder.block:
            block.layer[1].DenseReluDense.wo.weight.mul_(30000.0)
    ids = torch.randint(0, 1024, (2, 32))
    with torch.no_grad():
        ref = model(ids).last_hidden_state
    c = capture_inference(model, (ids,), {}, {})
    row = {"model": "T5EncoderModel (wo x 30000)", "hf_keep_in_fp32_modules": sorted(model._keep_in_fp32_modules)}
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
        auto = model(ids).last_hidden_state.float()
    row["autocast_cpu_fp16"] = {"finite": bool(torch.isfinite(auto).all()),
                                "rel_err": rel_err(auto, ref) if torch.isfinite(auto).all() else float("nan")}
    for guard in (True, False):
        res = cast_precision(shallow_copy(c.gm), PrecisionConfig(dtype=torch.float16, overflow_guard=guard),
                             PassContext(stage="inference", example_inputs=c.example_tensors))
        with torch.no_grad():
            out = res.gm(ids)[0]
        finite = bool(torch.isfinite(out).all())
        row["guard_on" if guard else "guard_off"] = {
            "finite": finite, "rel_err": rel_err(out, ref) if finite else float("nan"),
            "param_ratio": res.stats["param_bytes_after"] / res.stats["param_bytes_before"],
            "ops_kept": [{k: r[k] for k in ("node", "op", "absmax")} for r in res.stats["overflow_kept"]],
            "weights_kept_fp32": [w["weight"] for w in res.stats["weights_kept_fp32"]]}
    return row


def tying_row():
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.GPT2Config(vocab_size=1024, n_positions=128, n_embd=128, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0,
                        tie_word_embeddings=False, attn_implementation="eager")
    model = tf.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.copy_(model.transformer.wte.weight)
    ids = torch.randint(0, 1024, (2, 32))
    with torch.no_grad():
        ref = call(model, "gpt2", ids)
    out, _, rec = run_fxmem(model, "gpt2", ids, {})
    tie = next(r for r in rec.records if r.name == "tie_weights")
    lm = [t for t in tie.stats["ties"] if t["tied"] == "lm_head.weight"]
    full = tf.GPT2Config()
    return {"model": "gpt2 (untied lm_head copy)", "param_bytes_before": tie.stats["param_bytes_before"],
            "param_bytes_after": tie.stats["param_bytes_after"], "bytes_saved": tie.stats["param_bytes_saved"],
            "lm_head_tie": lm, "all_ties": len(tie.stats["ties"]), "bitwise_identical": bool(torch.equal(out, ref)),
            "full_size_lm_head_bytes": full.vocab_size * full.n_embd * 4}


def projection_rows():
    """Parameter-byte ratio at real sizes, from shapes (meta device): which weights each policy lowers."""
    rows = []
    # weights some use of which is not a matmul (gathers): weights="autocast" keeps them fp32; GPT2's
    # wte is also the (tied) lm_head, but its gather keeps it fp32 there too
    embedding_only = {"gpt2": ("wte", "wpe"), "llama": ("embed_tokens",), "bert": ("embeddings.",)}
    for name in ("gpt2", "llama", "bert"):
        with torch.device("meta"):
            model = build(name, size="full")
        seen, total, low_all, low_autocast = set(), 0, 0, 0
        for pname, p in model.named_parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            n = p.numel() * 4
            total += n
            if p.dim() >= 2:
                low_all += n // 2
                gather_only = any(k in pname for k in embedding_only[name])
                low_autocast += n if gather_only else n // 2
            else:
                low_all += n
                low_autocast += n
        rows.append({"model": name + " (full size, projected)", "params": total // 4,
                     "ratio_weights_low": low_all / total, "ratio_weights_autocast": low_autocast / total})
    return rows


def plot(result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["inference"]
    models = sorted({r["model"] for r in rows}, key=["gpt2", "llama", "bert"].index)
    methods = [m for m in dict.fromkeys(r["method"] for r in rows)]
    fig, axes = plt.subplots(1, 2, figsize=(14, 5))
    width = 0.8 / len(methods)
    for i, method in enumerate(methods):
        xs = [j + i * width for j in range(len(models))]
        get = {r["model"]: r for r in rows if r["method"] == method}
        axes[0].bar(xs, [get[m]["ratio"] for m in models], width, label=method)
        axes[1].bar(xs, [max(get[m]["rel_err"], 1e-7) for m in models], width, label=method)
    for ax, title in zip(axes, ("parameter bytes (x fp32)", "output error vs fp32 (max|d| / max|ref|)")):
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(models))], models)
        ax.set_title(title)
    axes[1].set_yscale("log")
    axes[1].text(0.0, 1.2e-7, "fp32 = reference (0)", fontsize=7)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(methods), fontsize=8)
    fig.suptitle("fxmem precision vs torch.autocast (CPU lists), HF models from small configs")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=["gpt2", "llama", "bert"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    result = {
        "torch": torch.__version__,
        "autocast": "CPU autocast (torch.autocast('cpu', dtype)), whose op lists are CPU's; fxmem uses the CUDA lists",
        "inference": inference_rows(args.models),
        "training": training_row(),
        "overflow_guard": overflow_row(),
        "overflow_guard_t5": t5_overflow_row(),
        "tying": tying_row(),
        "full_size_projection": projection_rows(),
    }
    result["wall_s"] = time.perf_counter() - start
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "precision_tying.json"), "w") as f:
        json.dump(result, f, indent=2)
    plot(result, os.path.join(RESULTS, "precision_tying.png"))
    print(json.dumps({k: result[k] for k in ("training", "overflow_guard", "overflow_guard_t5", "tying", "full_size_projection")}, indent=2))


if __name__ == "__main__":
    main()
