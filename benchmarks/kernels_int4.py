"""Question: how fast is fxmem's Triton int4 dequantize-matmul at decode shapes, next to bf16
cuBLAS and torchao's int4?

Times ``y = x @ W.T`` for ``x [M, K]`` bf16, M = 1, 2, 4, 8, 16, and ``W [N, K]`` of
4096×4096, 11008×4096 (up projection: K = 4096, N = 11008) and 4096×11008 (down projection),
with ``triton.testing.do_bench`` (median ms):

* ``bf16``: ``torch.matmul(x, W.T)`` (cuBLAS);
* ``fxmem int4``: :func:`fxmem.kernels.int4_matmul.lowbit_dequant_matmul`, 4-bit affine codes,
  group 128, bf16 scales and zeros (the ``quantize={"bits": 4}`` format), a few tile sizes, best
  one reported (the kernel is not autotuned); ``fxmem nf4`` the same with the NF4 codebook;
* ``torchao int4``: ``Int4WeightOnlyConfig(group_size=128)`` on an ``nn.Linear`` (tinygemm),
  where torchao imports and runs.

Without CUDA it SKIPS: prints ``{"skipped": ...}`` and exits 0 (no results file written).

Run: ``PYTHONPATH=. python benchmarks/kernels_int4.py [--quick]`` → ``benchmarks/results/kernels_int4.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

RESULTS = os.path.join(ROOT, "benchmarks", "results")
SHAPES = ((4096, 4096), (11008, 4096), (4096, 11008))  # (N, K)
MS = (1, 2, 4, 8, 16)
TILES = ((16, 32, 64), (16, 64, 64), (16, 64, 128), (16, 128, 64), (16, 32, 128))  # (BLOCK_M, BLOCK_N, BLOCK_K)


def _torchao_linear(weight: torch.Tensor):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from torchao.quantization import Int4WeightOnlyConfig, quantize_
            lin = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="cuda", dtype=torch.bfloat16)
            lin.weight.data.copy_(weight)
            quantize_(lin, Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d"))  # tinygemm
        return lin, None
    except Exception as exc:  # noqa: BLE001 - optional comparison
        return None, f"{type(exc).__name__}: {str(exc)[:200]}"


def time_int4(quick: bool = False) -> dict:
    """Decode-shape timings on CUDA (a dict; ``{"skipped": reason}`` without CUDA)."""
    if not torch.cuda.is_available():
        return {"skipped": "no CUDA device: GPU timings need one"}
    import triton.testing

    from fxmem.kernels import int4_matmul as k4

    torch.manual_seed(0)
    rows, notes = [], {}
    shapes = SHAPES[:1] if quick else SHAPES
    for n, k in shapes:
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5
        qw = {s: k4.quantize_lowbit(w.float().cpu().to(torch.bfloat16), 4, s, 128) for s in ("int", "nf4")}
        dev = {s: {f: (getattr(q, f).cuda() if getattr(q, f) is not None else None) for f in ("qweight", "scales", "zeros", "codebook")}
               for s, q in qw.items()}
        ao, ao_err = _torchao_linear(w)
        if ao_err:
            notes["torchao"] = ao_err
        for m in (MS[:2] if quick else MS):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            row = {"N": n, "K": k, "M": m, "bf16_ms": triton.testing.do_bench(lambda: torch.matmul(x, w.t()))}
            ref = (x.float() @ k4.dequantize(qw["int"]).cuda().t())
            for scheme, t in dev.items():
                best = None
                for bm, bn, bk in TILES:
                    def call(bm=bm, bn=bn, bk=bk, t=t):
                        return k4.lowbit_dequant_matmul(x, t["qweight"], t["scales"], t["zeros"], t["codebook"], None, None, 4,
                                                        block_m=bm, block_n=bn, block_k=bk)
                    if scheme == "int" and best is None:
                        err = float((call().float() - ref).abs().max() / ref.abs().max())
                        row["fxmem_int_rel_err"] = err
                    ms = triton.testing.do_bench(call)
                    if best is None or ms < best[0]:
                        best = (ms, (bm, bn, bk))
                row[f"fxmem_{scheme}_ms"], row[f"fxmem_{scheme}_tile"] = best[0], list(best[1])
                row[f"fxmem_{scheme}_speedup_vs_bf16"] = row["bf16_ms"] / best[0]
            if ao is not None:
                row["torchao_int4_ms"] = triton.testing.do_bench(lambda: ao(x))
                row["torchao_speedup_vs_bf16"] = row["bf16_ms"] / row["torchao_int4_ms"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    return {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows, "notes": notes}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="one shape, M = 1 and 2")
    ap.add_argument("--name", default="kernels_int4")
    ns = ap.parse_args()
    result = time_int4(ns.quick)
    if "skipped" in result:
        print(json.dumps(result))  # exit 0, and no results file overwritten by a machine without a GPU
        return
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, f"{ns.name}.json"), "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
