"""Question: how does fxmem.shard's plan compare with a hand-written parallelize_module plan and
with tensor_parallel_transformation, in parameter bytes per rank and collectives per step?

    PYTHONPATH=. python benchmarks/shard.py            # world sizes 2 and 4, gloo on CPU

For each model and world size (gloo processes on this machine): per-rank parameter bytes (local
shards; single process for reference), collectives in one forward and one backward counted by
CommDebugMode, max error of outputs and gradients against the single process — for the fxmem
plan, the tutorial's hand-written plan (with its manual head-count fix) and
_tp_transform.tensor_parallel_transformation (how it fails is recorded). Writes
benchmarks/results/shard.json and shard.png.
"""

from __future__ import annotations

import argparse
import json
import os
import time

from fxmem.testing import tp

CASES = {2: ["mlp", "mlp3d", "gpt_manual", "gpt_sdpa", "llama"], 4: ["mlp", "mlp3d", "gpt_mha_sdpa", "gpt_sdpa", "llama"]}


def _job(rank, world, cases):
    out = {}
    for case in cases:
        start = time.perf_counter()
        r = tp.run_case(case, rank, world, tp_transform=True)
        r["seconds"] = time.perf_counter() - start
        if not case.startswith("mlp") and tp.hand_plan(case, tp.build(case)[0], world) is not None:
            # the same embedding / head split as the hand plan: bytes per rank compare like for like
            same = tp.run_case(case, rank, world, hand=False, vocab="hand")
            r["fxmem_vocab_as_hand"] = same["fxmem"]
            r["plan_vocab_as_hand"] = same["plan"]
        out[case] = r
    return out


def _row(r):
    def pick(d):
        if d is None:
            return None
        if "failure" in d and d.get("failure"):
            return {"failure": d["failure"]}
        return {k: d.get(k) for k in ("bytes_per_rank", "forward", "backward", "max_out_error", "max_grad_error")}

    return {
        "case": r["case"], "world_size": r["world_size"], "single_process_bytes": r["single_bytes"],
        "fxmem": pick(r["fxmem"]), "fxmem_plan": {k: r["plan"][k] for k in ("forward", "backward", "bytes_per_rank", "fallbacks")},
        "fxmem_vocab_as_hand": pick(r.get("fxmem_vocab_as_hand")),
        "hand": pick(r.get("hand")), "tp_transform": r.get("tp_transform"), "seconds": r["seconds"],
    }


def _plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['case']}\nN={r['world_size']}" for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 4.5))
    x = range(len(rows))
    w = 0.2
    for i, (key, name) in enumerate((("fxmem", "fxmem.shard (vocab auto)"), ("fxmem_vocab_as_hand", "fxmem.shard (vocab as hand)"),
                                     ("hand", "hand plan"), ("tp_transform", "tp_transformation"))):
        vals, fails = [], []
        for r in rows:
            d = r.get(key)
            ok = d is not None and not d.get("failure") and d.get("bytes_per_rank")
            vals.append(d["bytes_per_rank"] / r["single_process_bytes"] if ok else 0)
            fails.append(not ok)
        bars = ax1.bar([j + (i - 1.5) * w for j in x], vals, w, label=name)
        for b, failed in zip(bars, fails):
            if failed:
                ax1.text(b.get_x() + b.get_width() / 2, 0.02, "x", ha="center", color=b.get_facecolor())
        comm = []
        for r in rows:
            d = r.get(key)
            ok = d is not None and not d.get("failure") and d.get("forward") is not None
            comm.append(sum(d["forward"].values()) + sum((d.get("backward") or {}).values()) if ok else 0)
        ax2.bar([j + (i - 1.5) * w for j in x], comm, w, label=name)
    ax1.set_xticks(list(x), labels, fontsize=7)
    ax1.set_ylabel("parameter bytes per rank / single process")
    ax1.set_title("per-rank parameter bytes (x: failed / not applicable)")
    ax2.set_xticks(list(x), labels, fontsize=7)
    ax2.set_ylabel("collectives per forward + backward")
    ax2.set_title("collectives per training step (tp_transformation: forward only)")
    ax1.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--world-sizes", default="2,4")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    opts = parser.parse_args()
    rows = []
    for world in (int(w) for w in opts.world_sizes.split(",")):
        results = tp.spawn(_job, world, CASES[world])
        rows.extend(_row(r) for r in results[0].values())
    os.makedirs(opts.out, exist_ok=True)
    with open(os.path.join(opts.out, "shard.json"), "w") as f:
        json.dump({"question": __doc__.split("\n\n")[0], "rows": rows}, f, indent=1, default=str)
    _plot(rows, os.path.join(opts.out, "shard.png"))
    for r in rows:
        mine, hand, tpt = r["fxmem"], r["hand"], r["tp_transform"]
        same = r["fxmem_vocab_as_hand"]
        print(f"{r['case']:12s} N={r['world_size']} bytes/rank fxmem {mine['bytes_per_rank']} "
              f"(as-hand vocab {same and same['bytes_per_rank']}) "
              f"(single {r['single_process_bytes']}), hand {hand and hand.get('bytes_per_rank')}; "
              f"fwd {mine['forward']} bwd {mine['backward']} | hand fwd {hand and hand.get('forward')} "
              f"bwd {hand and hand.get('backward')} | tp_transform {tpt.get('forward') if tpt.get('ok') else tpt.get('failure')}")


if __name__ == "__main__":
    main()
