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

Without CUDA it SKIPS: prints and writes ``{"skipped": ...}`` and exits 0.

Run: ``PYTHONPATH=. python benchmarks/kernels_int4.py [--quick] [--out PATH]`` (default
``benchmarks/results/gpu/int4.json``; ``benchmarks/gpu/run_all.sh`` calls it as its ``int4`` part
with ``--out $OUT/int4.json``). The JSON is rewritten after every row.
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
TILES = ((16, 32, 128), (16, 64, 64), (16, 128, 64))  # (BLOCK_M, BLOCK_N, BLOCK_K); no autotuning in the kernel


def _bench(fn) -> float:
    import triton.testing

    # short runs: benchmarks/gpu/run_all.sh gives this script 45 s for every shape, M and tile
    return triton.testing.do_bench(fn, warmup=5, rep=20, return_mode="median")


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


def time_int4(quick: bool = False, out: str | None = None) -> dict:
    """Decode-shape timings on CUDA (a dict; ``{"skipped": reason}`` without CUDA). With ``out``,
    the JSON is rewritten after every row, so a run cut short by a time limit keeps what it measured."""
    if not torch.cuda.is_available():
        return {"skipped": "no CUDA device: GPU timings need one"}
    from fxmem.kernels import int4_matmul as k4

    torch.manual_seed(0)
    rows, notes = [], {}
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows, "notes": notes}
    shapes = SHAPES[:1] if quick else SHAPES
    weights = {}
    for n, k in shapes:  # quantized once per shape, on the GPU (seconds, not minutes)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5
        qw = {s: k4.quantize_lowbit(w, 4, s, 128) for s in ("int", "nf4")}
        ao, ao_err = _torchao_linear(w)
        if ao_err:
            notes["torchao"] = ao_err
        weights[(n, k)] = (w, qw, ao)
    for m in (MS[:2] if quick else MS):  # M = 1 first: the decode case matters most if time runs out
        for (n, k), (w, qw, ao) in weights.items():
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            row = {"N": n, "K": k, "M": m, "bf16_ms": _bench(lambda: torch.matmul(x, w.t()))}
            ref = x.float() @ k4.dequantize(qw["int"]).t()
            for scheme, q in qw.items():
                best = None
                for bm, bn, bk in TILES:
                    def call(bm=bm, bn=bn, bk=bk, q=q):
                        return k4.lowbit_dequant_matmul(x, q.qweight, q.scales, q.zeros, q.codebook, None, None, 4,
                                                        block_m=bm, block_n=bn, block_k=bk)
                    if scheme == "int" and best is None:
                        row["fxmem_int_rel_err"] = float((call().float() - ref).abs().max() / ref.abs().max())
                    ms = _bench(call)
                    if best is None or ms < best[0]:
                        best = (ms, (bm, bn, bk))
                row[f"fxmem_{scheme}_ms"], row[f"fxmem_{scheme}_tile"] = best[0], list(best[1])
                row[f"fxmem_{scheme}_speedup_vs_bf16"] = row["bf16_ms"] / best[0]
            if ao is not None:
                row["torchao_int4_ms"] = _bench(lambda: ao(x))
                row["torchao_speedup_vs_bf16"] = row["bf16_ms"] / row["torchao_int4_ms"]
            rows.append(row)
            print(json.dumps(row), flush=True)
            if out:
                _write(result, out)
    result["complete"] = True
    return result


def _write(result: dict, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="one shape, M = 1 and 2")
    ap.add_argument("--out", default=os.path.join(RESULTS, "gpu", "int4.json"))
    ns = ap.parse_args()
    result = time_int4(ns.quick, ns.out)
    print(json.dumps(result if "skipped" in result else {"written": ns.out, "rows": len(result["rows"])}))
    _write(result, ns.out)  # without CUDA: {"skipped": ...}, exit 0


if __name__ == "__main__":
    main()
