"""fxmem.fit's per-rank estimate with a mesh against the measured per-rank peak (issue 15).

Each case spawns dp·tp gloo processes (:func:`fxmem.testing.scale.run_fit_mesh`): fit with
``mesh={"dp": D, "tp": T}`` (per-rank state from ``fxmem.shard.plan``), the model sharded by
``fxmem.shard.apply`` with that plan, compiled with fit's chosen options, one training step's
peak measured on every rank. Writes ``benchmarks/results/fit_mesh_cpu.json``.

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/fit_mesh.py [--quick] [--cases gpt_untied:1:2,...]
"""
from __future__ import annotations

import argparse
import json
import pathlib
import time

from fxmem.testing import scale, tp


def _rank(rank: int, world: int, case: str, dp: int, t: int) -> dict:
    return scale.run_fit_mesh(rank, world, case, dp, t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="GPT, tp 2 only")
    ap.add_argument("--cases", default="gpt_untied:1:2,gpt_untied:2:2,llama:1:2",
                    help="case:dp:tp, comma-separated (cases of fxmem.testing.scale.build)")
    ap.add_argument("--out", default="benchmarks/results/fit_mesh_cpu.json")
    a = ap.parse_args()
    cases = ["gpt_untied:1:2"] if a.quick else a.cases.split(",")
    rows = []
    for spec in cases:
        case, dp, t = spec.split(":")
        start = time.time()
        try:
            ranks = tp.spawn(_rank, int(dp) * int(t), case, int(dp), int(t))
        except Exception as exc:  # noqa: BLE001 - recorded: a composition that does not compile here
            last = [ln for ln in str(exc).splitlines() if "Error" in ln][-1:]
            rows.append({"case": case, "dp": int(dp), "tp": int(t), "error": " ".join(last)[:400]})
            print(f"{case:12} dp {dp} tp {t}: failed: {rows[-1]['error']}", flush=True)
            continue
        for r in ranks:
            r["wall_s"] = round(time.time() - start, 1)
            rows.append(r)
            print(f"{case:12} dp {dp} tp {t} rank {r['rank']}: estimate {r['estimate']} B, measured "
                  f"{r['measured']} B, estimate/measured {r['ratio']:.3f}  options={r['options']}", flush=True)
    path = pathlib.Path(a.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"rows": rows}, indent=1))
    print("wrote", path)


if __name__ == "__main__":
    main()
