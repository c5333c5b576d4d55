"""fxmem.shard.pipeline: stages balanced by memory, run by torch.distributed.pipelining on 2 gloo processes.

The plan (this process): stage bytes within 10% of each other where the atoms allow it, every
parameter in exactly one stage, bad input rejected. On 2 processes (one spawn): GPipe and 1F1B
give the single process's loss and gradients (1e-5), and each stage holds the parameter bytes the
plan says, with the saved-activation bytes per microbatch the plan measured.
"""

import pytest

import fxmem
from fxmem.testing import scale, tp


def test_stages_balanced_by_memory_and_cover_every_parameter():
    model, vocab = scale.build("gpt_untied", layers=4)
    x, _ = scale.batch(vocab, 4)
    plan = fxmem.shard.pipeline(model, x, stages=2, schedule="gpipe")
    assert plan.imbalance <= 0.10
    assert plan.split_points and plan.split_points[0].startswith("blocks.")
    assert sum(s.param_bytes for s in plan.stages) == sum(p.numel() * 4 for p in model.parameters())
    assert [s.in_flight for s in plan.stages] == [2, 2]
    one_f_one_b = fxmem.shard.pipeline(model, x, stages=2, schedule="1f1b")
    assert [s.in_flight for s in one_f_one_b.stages] == [2, 1]  # stage 0 holds more microbatches
    # 1F1B moves the boundary towards the first stage: it holds two microbatches' activations
    first = [a.module for a in one_f_one_b.atoms].index(one_f_one_b.split_points[0])
    assert first <= [a.module for a in plan.atoms].index(plan.split_points[0])
    assert "stage" in str(plan) and "in flight" in str(plan)


def test_pipeline_rejects_bad_input():
    model, vocab = scale.build("gpt_untied", layers=2)
    x, _ = scale.batch(vocab, 4)
    with pytest.raises(ValueError, match="schedule"):
        fxmem.shard.pipeline(model, x, stages=2, schedule="zigzag")
    with pytest.raises(ValueError, match="microbatches >= stages"):
        fxmem.shard.pipeline(model, x, stages=2, microbatches=1)
    with pytest.raises(ValueError, match="not divisible"):
        fxmem.shard.pipeline(model, x, stages=2, microbatches=3, schedule="gpipe")
    with pytest.raises(ValueError, match="block children"):
        fxmem.shard.pipeline(model, x, stages=20, schedule="gpipe", microbatches=2)


def _two(rank, world):
    return {s: scale.run_pipeline(rank, world, "gpt_untied", s) for s in ("gpipe", "1f1b")}


@pytest.mark.distributed
def test_two_stages_gpipe_and_1f1b_equal_one_process():
    results = tp.spawn(_two, 2)
    for schedule in ("gpipe", "1f1b"):
        stages = [r[schedule] for r in results]
        assert stages[-1]["loss_error"] <= 1e-5, schedule
        for s in stages:
            assert s["max_grad_error"] <= 1e-5 and s["grads_compared"] > 0, (schedule, s["stage"])
            assert s["param_bytes"] == s["plan_param_bytes"], (schedule, s["stage"])
            # what autograd saved per microbatch on this stage's module is what the plan measured
            # on the whole model (within 10%: the stage module is re-traced by torch.export)
            assert abs(s["activation_bytes"] - s["plan_activation_bytes"]) <= 0.1 * s["plan_activation_bytes"], (schedule, s)
    gpipe = [r["gpipe"]["bytes"] for r in results]
    assert max(gpipe) <= 1.1 * min(gpipe)
