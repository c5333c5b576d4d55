"""fxmem.fit's per-rank estimate with a mesh against the measured per-rank peak (issue 15).

Each case spawns dp·tp gloo processes (:func:`fxmem.testing.scale.run_fit_mesh`): one
``fxmem.shard.plan(mesh={"dp": D, "tp": T})`` given to fit (``plan=``: per-rank state from it,
activations as one rank holds them, FSDP2's gathered bytes with D > 1) and to
``fxmem.shard.apply``, the sharded model compiled with fit's chosen
options and with a remat budget, one training step's peak measured on every rank. Shapes
(``fxmem.testing.scale.SHAPES``): ``tiny`` (d 32, 4 heads, T 8, vocab 64, batch 2), ``medium``
(d 128, T 128, vocab 256, batch 4: the sharded activations most of the step) and ``large`` (d 256,
4 heads, T 128, vocab 2048, batch 4), 2 layers. ``--modes inference`` measures fit's inference
choice instead: each rank's no-grad forward peak (:func:`fxmem.testing.scale.mesh_inference_peak`).
A case ``case:dp:tp:shape:novocab`` plans with ``vocab=False`` (embeddings and head whole over tp:
the plan that compiles with dp > 1 on torch 2.13, docs/shard.md "Compile"); fit gets the same plan
(``plan=``). Writes ``benchmarks/results/fit_mesh_cpu.json``; rows of cases not run this time are
kept from the file (each row says when it was measured: ``measured_at``).

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/fit_mesh.py [--quick] [--modes training,inference]
        [--cases gpt_untied:1:2:tiny,gpt_untied:2:2:tiny:novocab,...]
"""
from __future__ import annotations

import argparse
import json
import pathlib
import time

from fxmem.testing import scale, tp

FULL = "gpt_untied:1:2:tiny,llama:1:2:tiny,gpt_untied:1:2:medium,gpt_untied:1:2:large,llama:1:2:large"
BUDGET = 0.5  # the remat budget measured beside fit's choice


def _rank(rank: int, world: int, case: str, dp: int, t: int, shape: str, budgets: tuple, mode: str,
          vocab) -> list[dict]:
    if mode == "inference":  # fit's choice only: the remat budgets are training options
        return scale.run_fit_mesh(rank, world, case, dp, t, shape=shape, mode=mode, vocab=vocab)
    # with dp > 1 the loss chunk does not run (fit refuses it: the root runs eagerly under FSDP2)
    extra = tuple({"remat": {"budget": b}, **({"chunk": False} if dp > 1 else {})} for b in budgets)
    return scale.run_fit_mesh(rank, world, case, dp, t, shape=shape, budgets=budgets, extra=extra, vocab=vocab)


def _key(row: dict) -> tuple:
    # rows before vocab=False cases were planned with the vocabulary split wherever it applied
    novocab = row.get("planned_vocab") is False
    return row["case"], row["shape"], row["dp"], row["tp"], row.get("mode", "training"), novocab


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="GPT, tp 2, tiny shape, fit's choice only")
    ap.add_argument("--cases", default=FULL, help="case:dp:tp:shape, comma-separated (cases of fxmem.testing.scale.build)")
    ap.add_argument("--modes", default="training", help="training, inference or both, comma-separated")
    ap.add_argument("--out", default="benchmarks/results/fit_mesh_cpu.json")
    a = ap.parse_args()
    cases = ["gpt_untied:1:2:tiny"] if a.quick else a.cases.split(",")
    budgets = () if a.quick else (BUDGET,)
    stamp = time.strftime("%Y-%m-%d %H:%M")
    rows = []
    for spec, mode in [(c, m) for m in a.modes.split(",") for c in cases]:
        case, dp, t, shape, *flags = spec.split(":")
        vocab = False if flags == ["novocab"] else "auto"
        start = time.time()
        try:
            ranks = tp.spawn(_rank, int(dp) * int(t), case, int(dp), int(t), shape, budgets, mode, vocab)
        except Exception as exc:  # noqa: BLE001 - recorded: a composition that does not compile here
            last = [ln for ln in str(exc).splitlines() if "Error" in ln][-1:]
            rows.append({"case": case, "shape": shape, "dp": int(dp), "tp": int(t), "mode": mode,
                         "planned_vocab": vocab, "error": " ".join(last)[:400], "measured_at": stamp})
            print(f"{case:12} {shape:5} dp {dp} tp {t}: failed: {rows[-1]['error']}", flush=True)
            continue
        for rank_rows in ranks:
            for r in rank_rows:
                r["wall_s"] = round(time.time() - start, 1)
                r["planned_vocab"] = vocab
                r["measured_at"] = stamp
                rows.append(r)
                print(f"{case:12} {shape:5} {mode:9} dp {dp} tp {t} rank {r['rank']}: estimate {r['estimate']} B, measured "
                      f"{r['measured']} B, estimate/measured {r['ratio']:.3f}  options={r['options']}"
                      f"{' (chosen)' if r['chosen'] else ''}", flush=True)
    path = pathlib.Path(a.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    run = {_key(r) for r in rows}
    kept = [r for r in json.loads(path.read_text())["rows"] if _key(r) not in run] if path.exists() else []
    rows = kept + rows
    path.write_text(json.dumps({"rows": rows}, indent=1))
    print("wrote", path)


if __name__ == "__main__":
    main()
