"""Question (CUDA only): how fast are fxmem's Triton kernels against eager, Inductor and cuBLAS?

* ``lower``: the generated kernels for the unfused softmax / layer-norm / GELU chains of
  ``benchmarks/lower_kernels.py`` at a GPU-sized shape, against the same chain in eager PyTorch
  (unfused) and under ``torch.compile`` (Inductor's fused Triton). Targets from docs/passes/lower.md:
  ≥ 3× the unfused eager chain, ≥ 0.9× Inductor. Max abs error against eager is recorded.
* ``int8``: the weight-only int8 Triton matmul at decode shapes against bf16 cuBLAS
  (``benchmarks/int8.py``'s ``bench_gpu``: M = 1–16, 4096×4096, 11008×4096, 4096×11008).

Times are ``triton.testing.do_bench`` medians in milliseconds. Without CUDA it writes a JSON that
says it skipped and exits 0.

    PYTHONPATH=. python benchmarks/gpu/kernels_gpu.py --out $OUT/kernels_gpu.json
"""

from __future__ import annotations

import os

# Real kernels, never Triton's interpreter: benchmarks/lower_kernels.py (imported below for its chains)
# defaults TRITON_INTERPRET to 1 for CPU runs.
os.environ["TRITON_INTERPRET"] = "0"

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402

import torch  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(HERE))  # benchmarks/, for its scripts' functions


def bench_lower(shape: tuple[int, ...]) -> list[dict]:
    from lower_kernels import Chain, gelu_chain, softmax_layer_norm_relu, unfused_layer_norm, unfused_softmax
    from triton.testing import do_bench

    import fxmem

    rows = []
    d = shape[-1]
    for name, fn in (("softmax", unfused_softmax), ("layer_norm", unfused_layer_norm), ("gelu_chain", gelu_chain),
                     ("softmax_layer_norm_relu", softmax_layer_norm_relu)):
        torch.manual_seed(0)
        model = Chain(fn, d).cuda().eval()
        x = torch.randn(*shape, device="cuda")
        row: dict = {"chain": name, "shape": list(shape)}
        try:
            with torch.no_grad():
                ref = model(x)
                report = fxmem.explain(model, x, lower=True, strict=True)
                lowered = report.module
                out = lowered(x)
                row["fxmem_kernels"] = len(report.kernels)
                row["fxmem_max_abs_err"] = float((out - ref).abs().max())
                torch._dynamo.reset()
                inductor = torch.compile(model)
                row["inductor_max_abs_err"] = float((inductor(x) - ref).abs().max())
                row["eager_ms"] = do_bench(lambda: model(x), return_mode="median")
                row["fxmem_ms"] = do_bench(lambda: lowered(x), return_mode="median")
                row["inductor_ms"] = do_bench(lambda: inductor(x), return_mode="median")
            row["fxmem_speedup_vs_eager"] = row["eager_ms"] / row["fxmem_ms"]
            row["fxmem_vs_inductor"] = row["inductor_ms"] / row["fxmem_ms"]  # > 1: fxmem faster
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {exc}"[:800]
            traceback.print_exc()
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def bench_int8() -> list[dict]:
    from int8 import bench_gpu

    rows = bench_gpu()
    for r in rows:
        print(json.dumps(r), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "gpu", "kernels_gpu.json"))
    parser.add_argument("--shape", type=int, nargs="+", default=[64, 1024, 1024])
    parser.add_argument("--parts", nargs="*", default=["lower", "int8"], choices=["lower", "int8"])
    opts = parser.parse_args()
    os.makedirs(os.path.dirname(os.path.abspath(opts.out)), exist_ok=True)
    if not torch.cuda.is_available():
        result = {"skipped": "CUDA is not available: the GPU kernel timings need a GPU"}
        print(result["skipped"])
    else:
        result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
        import triton

        result["triton"] = triton.__version__
        for part in opts.parts:
            try:
                result[part] = bench_lower(tuple(opts.shape)) if part == "lower" else bench_int8()
            except Exception as exc:  # one part failing must not lose the others
                result[part] = {"error": f"{type(exc).__name__}: {exc}"[:800]}
                traceback.print_exc()
            with open(opts.out, "w") as f:
                json.dump(result, f, indent=2)
    with open(opts.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {opts.out}")


if __name__ == "__main__":
    main()
