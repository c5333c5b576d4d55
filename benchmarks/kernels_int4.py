"""Question: how fast are fxmem's Triton int4 and int8 weight-only matmuls at decode shapes, next
to bf16 cuBLAS and torchao — and does splitting K help at small M?

Times ``y = x @ W.T`` for ``x [M, K]`` bf16, M = 1, 2, 4, 8, 16, and ``W [N, K]`` of
4096×4096, 11008×4096 (up projection: K = 4096, N = 11008) and 4096×11008 (down projection),
with ``triton.testing.do_bench`` (median ms), each variant beside the others on one device:

* ``bf16``: ``torch.matmul(x, W.T)`` (cuBLAS);
* ``fxmem int4``: :func:`fxmem.kernels.int4_matmul.lowbit_dequant_matmul`, 4-bit affine codes,
  group 128, bf16 scales and zeros (the ``quantize={"bits": 4}`` format), in three launches:
  ``tiled`` (one program per output tile over all of K: the kernel before split-K),
  ``splitk`` (the automatic plan at M ≤ 16: K split for ~2 programs per SM) and ``gemv``
  (split-K with the ``tl.sum`` inner product instead of ``tl.dot``); ``fxmem nf4`` the
  automatic plan with the NF4 codebook;
* ``fxmem int8``: :func:`fxmem.kernels.int8_matmul.int8_weight_only_matmul` (per-channel),
  ``tiled`` (``split_k=1``) and ``splitk`` (automatic);
* ``torchao int4``: ``Int4WeightOnlyConfig(group_size=128)`` on an ``nn.Linear`` (tinygemm),
  and ``torchao int8``: ``Int8WeightOnlyConfig()``, where torchao imports and runs.

Every fxmem row also records the kernel's max relative error against the dequantized reference.
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
DEVICE = "cuda"  # a dry run under TRITON_INTERPRET=1 sets "cpu" (the tests' check that the script runs)


def _bench(fn) -> float:
    import triton.testing

    # short runs: benchmarks/gpu/run_all.sh gives this script 45 s for every shape, M and tile
    return triton.testing.do_bench(fn, warmup=5, rep=20, return_mode="median")


def _torchao_linear(weight: torch.Tensor, which: str):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_
            lin = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=DEVICE, dtype=torch.bfloat16)
            lin.weight.data.copy_(weight)
            cfg = (Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d") if which == "int4"  # tinygemm
                   else Int8WeightOnlyConfig())
            quantize_(lin, cfg)
        return lin, None
    except Exception as exc:  # noqa: BLE001 - optional comparison
        return None, f"{type(exc).__name__}: {str(exc)[:200]}"


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref).abs().max() / ref.abs().max())


def time_int4(quick: bool = False, out: str | None = None) -> dict:
    """Decode-shape timings on CUDA (a dict; ``{"skipped": reason}`` without CUDA). With ``out``,
    the JSON is rewritten after every row, so a run cut short by a time limit keeps what it measured."""
    if DEVICE == "cuda" and not torch.cuda.is_available():
        return {"skipped": "no CUDA device: GPU timings need one"}
    from fxmem.kernels import int4_matmul as k4
    from fxmem.kernels import int8_matmul as k8

    torch.manual_seed(0)
    rows, notes = [], {}
    result = {"device": torch.cuda.get_device_name() if DEVICE == "cuda" else DEVICE, "torch": torch.__version__, "rows": rows, "notes": notes}
    shapes = SHAPES[:1] if quick else SHAPES
    weights = {}
    for n, k in shapes:  # quantized once per shape, on the GPU (seconds, not minutes)
        w = torch.randn(n, k, device=DEVICE, dtype=torch.bfloat16) / k ** 0.5
        qw = {s: k4.quantize_lowbit(w, 4, s, 128) for s in ("int", "nf4")}
        q8 = k8.quantize_weight(w)
        ao = {}
        for which in ("int4", "int8"):
            ao[which], err = _torchao_linear(w, which)
            if err:
                notes[f"torchao_{which}"] = err
        weights[(n, k)] = (w, qw, q8, ao)
    for m in (MS[:2] if quick else MS):  # M = 1 first: the decode case matters most if time runs out
        for (n, k), (w, qw, q8, ao) in weights.items():
            x = torch.randn(m, k, device=DEVICE, dtype=torch.bfloat16)
            row = {"N": n, "K": k, "M": m, "bf16_ms": _bench(lambda: torch.matmul(x, w.t()))}
            q = qw["int"]
            ref4 = x.float() @ k4.dequantize(q).t()
            int4_launches = {"tiled": {"split_k": 1}, "splitk": {}, "gemv": {"use_dot": False}}
            for label, kw in int4_launches.items():
                def call(kw=kw, q=q):
                    return k4.lowbit_dequant_matmul(x, q.qweight, q.scales, q.zeros, None, None, None, 4, **kw)
                plan = k4.plan_launch(m, n, k, x.device, **kw)
                row[f"fxmem_int4_{label}_plan"] = [plan.block_m, plan.block_n, plan.block_k, plan.split_k]
                row[f"fxmem_int4_{label}_rel_err"] = _rel_err(call(), ref4)
                row[f"fxmem_int4_{label}_ms"] = _bench(call)
                row[f"fxmem_int4_{label}_speedup_vs_bf16"] = row["bf16_ms"] / row[f"fxmem_int4_{label}_ms"]
            nf4 = qw["nf4"]
            row["fxmem_nf4_ms"] = _bench(lambda: k4.lowbit_dequant_matmul(x, nf4.qweight, nf4.scales, None, nf4.codebook,
                                                                          None, None, 4))
            row["fxmem_nf4_speedup_vs_bf16"] = row["bf16_ms"] / row["fxmem_nf4_ms"]
            ref8 = x.float() @ k8.dequantize_weight(*q8).t()
            for label, split in (("tiled", 1), ("splitk", None)):
                def call8(split=split):
                    return k8.int8_weight_only_matmul(x, q8[0], q8[1], split_k=split)
                row[f"fxmem_int8_{label}_rel_err"] = _rel_err(call8(), ref8)
                row[f"fxmem_int8_{label}_ms"] = _bench(call8)
                row[f"fxmem_int8_{label}_speedup_vs_bf16"] = row["bf16_ms"] / row[f"fxmem_int8_{label}_ms"]
            for which, lin in ao.items():
                if lin is not None:
                    row[f"torchao_{which}_ms"] = _bench(lambda lin=lin: lin(x))
                    row[f"torchao_{which}_speedup_vs_bf16"] = row["bf16_ms"] / row[f"torchao_{which}_ms"]
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
