"""Question: how long does fxmem take to compile, and what does a step cost, next to eager,
aot_eager and Inductor? (issue 2; training steps on the built-in GPT, CPU)

    python benchmarks/compile_overhead.py            # writes benchmarks/results/compile_overhead.{json,png}

Compile time = the first training step (trace + compile + run), step time = median of the next
steps, both as ratios to eager measured side by side in one process.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fxmem.benchmarking import compile_overhead, write_results  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--backends", default="eager,aot_eager,inductor,fxmem")
    p.add_argument("--out", default=os.path.join(HERE, "results", "compile_overhead.json"))
    ns = p.parse_args()
    results = compile_overhead(layers=ns.layers, d_model=ns.d_model, seq=ns.seq, batch=ns.batch,
                               backends=ns.backends.split(","), steps=ns.steps)
    results["command"] = "python benchmarks/compile_overhead.py " + " ".join(sys.argv[1:])
    write_results(results, ns.out)
    for r in results["rows"]:
        print(f"{r['backend']:10s} compile {r['compile_s']:7.2f} s ({r['compile_ratio']:6.1f}× eager)   "
              f"step {r['step_s'] * 1e3:8.1f} ms ({r['step_ratio']:.2f}× eager)   saved {r['saved_bytes'] / 2**20:.2f} MiB")
    print(f"wrote {ns.out}")


if __name__ == "__main__":
    main()
